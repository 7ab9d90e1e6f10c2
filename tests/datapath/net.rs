//! A small network of namespaces for one test: a LAN (a bridge in its own namespace), a client,
//! nodes that forward and run kube-proxy, and pods behind their node. Everything it creates is
//! named `scmdp-<test process id>-<tag>-...`; dropping the [`Net`] (also while a test panics)
//! kills its processes and deletes its namespaces, and [`sweep_stale`] removes what a killed
//! test process left behind.
//!
//! Addresses (private, and only inside these namespaces): LAN 10.0.0.0/24 and fd00::/64
//! (client .2 and ::2, node i .1i and ::1i), pods of node i in 10.244.i.0/24 and
//! fd00:244:i::/64 (gateway .1 and ::1 on the node). The client routes the Service ranges and
//! the load-balancer pool through node 1, as a router in front of a cluster would. IPv6
//! addresses skip duplicate address detection (`nodad`): nothing else is on these links, and a
//! tentative address would fail the first connections.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use anyhow::{Context, Result, bail};

use crate::helper::ROLE_ENV;

/// The prefix of every namespace the data-path tests make.
pub const PREFIX: &str = "scmdp-";
/// Where the client sends Service traffic: through node 1.
pub const ROUTED_VIA_NODE1: &[&str] = &["10.96.0.0/16", "10.250.0.0/28"];
/// The IPv6 Service range, also routed through node 1.
pub const ROUTED_VIA_NODE1_V6: &[&str] = &["fd00:10:96::/112"];

/// Runs `ip` with `args`; fails with its stderr.
pub fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("running ip")?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Runs `args` inside namespace `ns`; its stdout, or an error with its stderr.
pub fn exec(ns: &str, args: &[&str]) -> Result<String> {
    let out = Command::new("ip")
        .args(["netns", "exec", ns])
        .args(args)
        .output()
        .with_context(|| format!("ip netns exec {ns} {}", args.join(" ")))?;
    if !out.status.success() {
        bail!(
            "in {ns}: {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Deletes namespaces with our prefix whose test process is gone (killed before its cleanup
/// ran), after killing what still runs in them.
pub fn sweep_stale() {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else {
        return;
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or_default();
        let Some(rest) = name.strip_prefix(PREFIX) else {
            continue;
        };
        let pid = rest.split('-').next().unwrap_or_default();
        if Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        delete_namespace(name);
    }
}

/// Kills the processes inside `name` (ours: only our tests make such namespaces) and deletes it.
fn delete_namespace(name: &str) {
    if let Ok(out) = Command::new("ip").args(["netns", "pids", name]).output() {
        for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
            let _ = Command::new("kill").args(["-9", pid]).status();
        }
    }
    let _ = Command::new("ip").args(["netns", "del", name]).status();
    // `ip netns exec` bind-mounts /etc/netns/<name>/* (our resolver files) over /etc.
    let _ = std::fs::remove_dir_all(Path::new("/etc/netns").join(name));
}

/// Whether this machine can run the data-path tests: root, `ip`, `iptables-restore`, `nft`;
/// `Err` names what is missing.
pub fn preflight() -> Result<()> {
    let mut missing = vec![];
    for tool in ["ip", "iptables-save", "iptables-restore", "nft"] {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .stdout(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if !found {
            missing.push(tool);
        }
    }
    if !missing.is_empty() {
        bail!(
            "missing {} (tests/scripts/datapath-deps.sh installs them)",
            missing.join(", ")
        );
    }
    let probe = format!("{PREFIX}{}-probe", std::process::id());
    ip(&["netns", "add", &probe]).context("network namespaces need root")?;
    delete_namespace(&probe);
    Ok(())
}

/// Adds IPv6 address `cidr` to `dev` in `ns`, without duplicate address detection.
fn add_v6(ns: &str, cidr: &str, dev: &str) -> Result<()> {
    exec(ns, &["ip", "-6", "addr", "add", cidr, "dev", dev, "nodad"])?;
    Ok(())
}

/// A pod: its name and addresses.
#[derive(Clone, Debug)]
pub struct PodNet {
    /// Pod name (what its server answers).
    pub name: String,
    /// Its IPv4 address.
    pub ip: String,
    /// Its IPv6 address.
    pub ip6: String,
}

impl PodNet {
    /// Both addresses, IPv4 first (the pod's `status.podIPs`).
    pub fn ips(&self) -> [&str; 2] {
        [&self.ip, &self.ip6]
    }
}

/// One test's network; torn down on drop.
pub struct Net {
    tag: String,
    namespaces: Vec<String>,
    children: Vec<Child>,
    /// Where process logs go.
    pub logs: PathBuf,
    pods_per_node: Vec<usize>,
}

impl Net {
    /// A LAN, a client and `nodes` forwarding nodes (no pods yet); `tag` keeps parallel tests'
    /// names apart.
    pub fn new(tag: &str, nodes: usize, logs: &Path) -> Result<Net> {
        let mut net = Net {
            tag: format!("{PREFIX}{}-{tag}", std::process::id()),
            namespaces: vec![],
            children: vec![],
            logs: logs.to_path_buf(),
            pods_per_node: vec![0; nodes + 1],
        };
        let lan = net.add_ns("lan")?;
        exec(&lan, &["ip", "link", "add", "br0", "type", "bridge"])?;
        exec(&lan, &["ip", "link", "set", "br0", "up"])?;
        let client = net.add_ns("client")?;
        net.join_lan(&client, "cl", ("10.0.0.2", "fd00::2"))?;
        for via in ROUTED_VIA_NODE1 {
            exec(&client, &["ip", "route", "add", via, "via", "10.0.0.11"])?;
        }
        for via in ROUTED_VIA_NODE1_V6 {
            exec(
                &client,
                &["ip", "-6", "route", "add", via, "via", "fd00::11"],
            )?;
        }
        for i in 1..=nodes {
            let node = net.add_ns(&format!("node{i}"))?;
            let addrs = (format!("10.0.0.1{i}"), format!("fd00::1{i}"));
            net.join_lan(&node, &format!("n{i}"), (&addrs.0, &addrs.1))?;
            exec(&node, &["sysctl", "-qw", "net.ipv4.ip_forward=1"])?;
            exec(&node, &["sysctl", "-qw", "net.ipv6.conf.all.forwarding=1"])?;
            for j in (1..=nodes).filter(|j| *j != i) {
                let dst = format!("10.244.{j}.0/24");
                exec(
                    &node,
                    &["ip", "route", "add", &dst, "via", &format!("10.0.0.1{j}")],
                )?;
                let dst = format!("fd00:244:{j}::/64");
                let via = format!("fd00::1{j}");
                exec(&node, &["ip", "-6", "route", "add", &dst, "via", &via])?;
            }
        }
        Ok(net)
    }

    /// The namespace of `host` (`lan`, `client`, `node1`, a pod's name).
    pub fn ns(&self, host: &str) -> String {
        format!("{}-{host}", self.tag)
    }

    fn add_ns(&mut self, host: &str) -> Result<String> {
        let name = self.ns(host);
        ip(&["netns", "add", &name])?;
        self.namespaces.push(name.clone());
        exec(&name, &["ip", "link", "set", "lo", "up"])?;
        Ok(name)
    }

    /// Connects `ns` to the LAN bridge as `v4`/24 and `v6`/64 (`port` names the bridge side).
    fn join_lan(&self, ns: &str, port: &str, (v4, v6): (&str, &str)) -> Result<()> {
        let lan = self.ns("lan");
        ip(&[
            "link", "add", "eth0", "netns", ns, "type", "veth", "peer", "name", port, "netns", &lan,
        ])?;
        exec(&lan, &["ip", "link", "set", port, "master", "br0", "up"])?;
        exec(
            ns,
            &["ip", "addr", "add", &format!("{v4}/24"), "dev", "eth0"],
        )?;
        add_v6(ns, &format!("{v6}/64"), "eth0")?;
        exec(ns, &["ip", "link", "set", "eth0", "up"])?;
        Ok(())
    }

    /// A pod on node `node` (1-based) with the next free address there, running an HTTP
    /// server on `port` that answers its name.
    pub fn add_pod(&mut self, name: &str, node: usize, port: u16) -> Result<PodNet> {
        self.pods_per_node[node] += 1;
        let k = self.pods_per_node[node];
        let pod_ip = format!("10.244.{node}.{}", 9 + k);
        let gw = format!("10.244.{node}.1");
        let (pod_ip6, gw6) = (
            format!("fd00:244:{node}::{}", 9 + k),
            format!("fd00:244:{node}::1"),
        );
        let ns = self.add_ns(name)?;
        let node_ns = self.ns(&format!("node{node}"));
        let node_if = format!("p{k}");
        ip(&[
            "link", "add", "eth0", "netns", &ns, "type", "veth", "peer", "name", &node_if, "netns",
            &node_ns,
        ])?;
        exec(
            &ns,
            &["ip", "addr", "add", &format!("{pod_ip}/32"), "dev", "eth0"],
        )?;
        add_v6(&ns, &format!("{pod_ip6}/128"), "eth0")?;
        exec(&ns, &["ip", "link", "set", "eth0", "up"])?;
        exec(&ns, &["ip", "route", "add", &gw, "dev", "eth0"])?;
        exec(&ns, &["ip", "route", "add", "default", "via", &gw])?;
        exec(&ns, &["ip", "-6", "route", "add", &gw6, "dev", "eth0"])?;
        exec(&ns, &["ip", "-6", "route", "add", "default", "via", &gw6])?;
        // The node answers for the gateway address on every pod link (as the CNI bridge would).
        exec(
            &node_ns,
            &["ip", "addr", "add", &format!("{gw}/32"), "dev", &node_if],
        )?;
        add_v6(&node_ns, &format!("{gw6}/128"), &node_if)?;
        exec(&node_ns, &["ip", "link", "set", &node_if, "up"])?;
        exec(
            &node_ns,
            &[
                "ip",
                "route",
                "add",
                &format!("{pod_ip}/32"),
                "dev",
                &node_if,
            ],
        )?;
        let route6 = format!("{pod_ip6}/128");
        exec(
            &node_ns,
            &["ip", "-6", "route", "add", &route6, "dev", &node_if],
        )?;
        self.spawn_helper(name, &format!("http {name} {port}"))?;
        Ok(PodNet {
            name: name.into(),
            ip: pod_ip,
            ip6: pod_ip6,
        })
    }

    /// Runs this test binary as helper `role` inside `host`'s namespace, until the net drops.
    pub fn spawn_helper(&mut self, host: &str, role: &str) -> Result<()> {
        let exe = std::env::current_exe()?;
        let ns = self.ns(host);
        let log = std::fs::File::create(self.logs.join(format!("{host}-helper.log")))?;
        let child = Command::new("ip")
            .args(["netns", "exec", &ns])
            .arg(exe)
            .args(["helper_process", "--exact", "--ignored", "--nocapture"])
            .env(ROLE_ENV, role)
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("helper {role} in {ns}"))?;
        self.children.push(child);
        Ok(())
    }

    /// Runs `program args` inside `host`'s namespace until the net drops, its output in
    /// `<logs>/<log>`.
    pub fn spawn(&mut self, host: &str, log: &str, program: &Path, args: &[String]) -> Result<()> {
        let ns = self.ns(host);
        let file = std::fs::File::create(self.logs.join(log))?;
        let child = Command::new("ip")
            .args(["netns", "exec", &ns])
            .arg(program)
            .args(args)
            .stdout(file.try_clone()?)
            .stderr(file)
            .spawn()
            .with_context(|| format!("{} in {ns}", program.display()))?;
        self.children.push(child);
        Ok(())
    }

    /// Makes `host` resolve names with the DNS server at `server` (`ip netns exec` mounts
    /// /etc/netns/<namespace>/resolv.conf over /etc/resolv.conf; removed with the namespace).
    pub fn set_resolver(&self, host: &str, server: &str) -> Result<()> {
        let dir = Path::new("/etc/netns").join(self.ns(host));
        std::fs::create_dir_all(&dir)?;
        std::fs::write(
            dir.join("resolv.conf"),
            format!("nameserver {server}\noptions timeout:1 attempts:2\n"),
        )?;
        Ok(())
    }

    /// The addresses `name` resolves to in the client (its resolver), sorted; `ERR ...` when
    /// it does not resolve.
    pub async fn client_resolve(&self, name: &str) -> Vec<String> {
        let mut v = self.client_helper(&format!("resolve {name}")).await;
        v.sort();
        v
    }

    /// The client's `qtype` query (`SRV`, `AAAA`, `CNAME`, `A`) for `name` to `server`, its
    /// answers sorted (SRV: `port target`).
    pub async fn client_dns(&self, qtype: &str, name: &str, server: &str) -> Vec<String> {
        let mut v = self
            .client_helper(&format!("dns {qtype} {name} {server}"))
            .await;
        v.sort();
        v
    }

    /// Runs helper `role` in the client and returns its `DP` lines.
    async fn client_helper(&self, role: &str) -> Vec<String> {
        self.helper_output("client", role).await
    }

    /// The lines of kube-proxy's metrics on node `i` (`/metrics` on 127.0.0.1:10249 in its
    /// namespace) that start with `prefix`; `ERR ...` when it cannot be scraped.
    pub async fn kube_proxy_metrics(&self, i: usize, prefix: &str) -> Vec<String> {
        self.helper_output(
            &format!("node{i}"),
            &format!("scrape 127.0.0.1:10249 {prefix}"),
        )
        .await
    }

    /// Runs helper `role` in `host`'s namespace and returns its `DP` lines.
    async fn helper_output(&self, host: &str, role: &str) -> Vec<String> {
        let exe = match std::env::current_exe() {
            Ok(e) => e,
            Err(e) => return vec![format!("ERR {e}")],
        };
        let out = tokio::process::Command::new("ip")
            .args(["netns", "exec", &self.ns(host)])
            .arg(exe)
            .args(["helper_process", "--exact", "--ignored", "--nocapture"])
            .env(ROLE_ENV, role)
            .output()
            .await;
        match out {
            Ok(o) => String::from_utf8_lossy(&o.stdout)
                .lines()
                .filter_map(|l| l.strip_prefix("DP "))
                .map(str::to_string)
                .collect(),
            Err(e) => vec![format!("ERR {e}")],
        }
    }

    /// `count` GETs from the client to `addr` (`ip:port`), each with `timeout_ms`: the bodies
    /// (pod names) and `ERR ...` lines.
    pub async fn client_get(&self, addr: &str, count: usize, timeout_ms: u64) -> Vec<String> {
        self.client_helper(&format!("get {addr} {count} {timeout_ms}"))
            .await
    }

    /// The last `n` lines of log `name`.
    pub fn log_tail(&self, name: &str, n: usize) -> String {
        let text = std::fs::read_to_string(self.logs.join(name)).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        for ns in self.namespaces.iter().rev() {
            delete_namespace(ns);
        }
    }
}
