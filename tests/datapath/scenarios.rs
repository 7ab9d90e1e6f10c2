//! Every scenario in one kube-proxy mode: the network, the objects, and traffic from the
//! client checked against what the objects say, with the time each change took to show.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use test_support::{ControlPlane, namespace, upstream_controllers, wait_for};
use tokio::sync::Mutex;

use crate::cluster::{self, T};
use crate::net::{self, Net, PodNet};
use crate::{basic, dns, dualstack, terminating};

/// One data-path test at a time: each starts its own manager against the shared control plane.
pub static SERIAL: Mutex<()> = Mutex::const_new(());

/// The answers of one round of `n` GETs from the client to `addr`.
pub async fn round(net: &Net, addr: &str, n: usize, timeout_ms: u64) -> Vec<String> {
    net.client_get(addr, n, timeout_ms).await
}

/// Waits until a round of 16 GETs to `addr` is answered by exactly the pods `want`, each at
/// least once and nothing else (no error, no other pod); the time it took.
pub async fn wait_answers(net: &Net, addr: &str, want: &[&str]) -> Result<Duration> {
    let start = Instant::now();
    let want: BTreeSet<String> = want.iter().map(|s| s.to_string()).collect();
    let last = std::sync::Mutex::new(vec![]);
    let r = wait_for(&format!("{addr} answered by {want:?}"), T, || async {
        let got = round(net, addr, 16, 1000).await;
        let seen: BTreeSet<String> = got.iter().cloned().collect();
        *last.lock().unwrap_or_else(|e| e.into_inner()) = got;
        (seen == want).then_some(())
    })
    .await;
    r.with_context(|| format!("last round: {:?}", last.lock().map(|l| l.clone())))?;
    Ok(start.elapsed())
}

/// Waits until `addr` does not answer at all (3 GETs, 500 ms each, all fail); the time taken.
pub async fn wait_silent(net: &Net, addr: &str) -> Result<Duration> {
    let start = Instant::now();
    wait_for(&format!("{addr} not answering"), T, || async {
        let got = round(net, addr, 3, 500).await;
        got.iter().all(|g| g.starts_with("ERR")).then_some(())
    })
    .await?;
    Ok(start.elapsed())
}

/// A scenario's outcome row.
pub struct Row {
    /// Scenario name.
    pub scenario: &'static str,
    /// Time from the API change to traffic following it, or why it did not.
    pub result: Result<Duration>,
}

/// Who writes the EndpointSlices kube-proxy and CoreDNS consume.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Slices {
    /// Our manager's EndpointSlice and mirroring controllers.
    Ours,
    /// The control: kube-controller-manager's (`endpointslice,endpointslicemirroring`), ours
    /// turned off; our manager still runs its other controllers (load-balancer addresses).
    Kcm,
}

impl Slices {
    fn name(self) -> &'static str {
        match self {
            Slices::Ours => "ours",
            Slices::Kcm => "kcm",
        }
    }
}

/// Prints the table (lines `datapath-row<TAB>scenario<TAB>mode<TAB>slices<TAB>result<TAB>time`,
/// which `make e2e` collects) and fails if any scenario failed.
pub fn report(mode: &str, slices: Slices, rows: Vec<Row>) -> Result<()> {
    let mut failed = vec![];
    let by = slices.name();
    eprintln!("datapath-row\tscenario\tmode\tslices\tresult\ttime-to-traffic");
    for r in &rows {
        match &r.result {
            Ok(d) => eprintln!(
                "datapath-row\t{}\t{mode}\t{by}\tpass\t{:.2}s",
                r.scenario,
                d.as_secs_f64()
            ),
            Err(e) => {
                // One short line: the whole error is in the failure message.
                let first: String = format!("{e:#}")
                    .replace('\n', " ")
                    .chars()
                    .take(200)
                    .collect();
                eprintln!("datapath-row\t{}\t{mode}\t{by}\tFAIL\t{first}", r.scenario);
                failed.push(format!("{}: {e:#}", r.scenario));
            }
        }
    }
    if !failed.is_empty() {
        bail!(
            "{mode}: {} of {} scenarios failed:\n{}",
            failed.len(),
            rows.len(),
            failed.join("\n")
        );
    }
    Ok(())
}

/// What a mode's run sets up: the network with two nodes, pods a (node 1) and b (node 2)
/// labelled `app: web`, and pods c (node 1) and d (node 2) labelled `app: term`.
pub struct Setup {
    /// The network (torn down on drop).
    pub net: Net,
    /// Admin client.
    pub client: kube::Client,
    /// The test's Kubernetes namespace.
    pub ns: String,
    /// Pods a, b, c and d.
    pub pods: Vec<PodNet>,
    /// Node names, index 0 = node 1.
    pub nodes: Vec<String>,
    _manager: test_support::Manager,
    _kcm: Option<tokio::process::Child>,
    _relay: RelayGuard,
    _dir: tempfile::TempDir,
}

/// Stops the API relay task when dropped.
pub struct RelayGuard(tokio::task::JoinHandle<()>);
impl Drop for RelayGuard {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Builds the network, starts our manager (and kube-controller-manager's slice controllers
/// instead of ours when `slices` says so) and kube-proxy (`mode`, with `proxy_flags`) on two
/// nodes, and creates the Nodes and pods a to d. `tag` keeps node names apart across tests.
pub async fn setup(
    cp: &ControlPlane,
    tag: &str,
    (mode, slices): (&str, Slices),
    proxy_flags: &[&str],
) -> Result<Setup> {
    net::sweep_stale();
    net::preflight()?;
    let dir = tempfile::Builder::new().prefix("scm-datapath-").tempdir()?;
    let client = cp.client().await?;
    let ns = namespace(&client, &format!("dp-{tag}")).await?;
    let (manager, kcm) = match slices {
        Slices::Ours => (cluster::start_manager(cp, dir.path(), &[])?, None),
        Slices::Kcm => {
            let off = ["--controllers=*,-endpointslice,-endpointslice-mirroring"];
            let kcm = upstream_controllers(cp, "endpointslice,endpointslicemirroring")?;
            (cluster::start_manager(cp, dir.path(), &off)?, Some(kcm))
        }
    };
    let mut net = Net::new(tag, 2, dir.path())?;
    let socket = dir.path().join("api.sock");
    let relay = RelayGuard(cluster::api_relay(cp, &socket)?);
    let mut nodes = vec![];
    for i in 1..=2 {
        let name = format!("dp-{tag}-n{i}");
        let ips = (format!("10.0.0.1{i}"), format!("fd00::1{i}"));
        cluster::node(&client, &name, (&ips.0, &ips.1), &format!("zone-{i}")).await?;
        cluster::start_kube_proxy(&mut net, cp, &socket, (i, &name), mode, proxy_flags)?;
        nodes.push(name);
    }
    cluster::start_coredns(&mut net, cp, dir.path(), 1)?;
    net.set_resolver("client", "10.0.0.11")?;
    let mut pods = vec![];
    let pod_nodes = [
        ("pod-a", 1, "web"),
        ("pod-b", 2, "web"),
        ("pod-c", 1, "term"),
        ("pod-d", 2, "term"),
    ];
    for (name, i, app) in pod_nodes {
        let p = net.add_pod(name, i, 8080)?;
        cluster::pod(&client, &ns, &p, (&nodes[i - 1], app)).await?;
        pods.push(p);
    }
    Ok(Setup {
        net,
        client,
        ns,
        pods,
        nodes,
        _manager: manager,
        _kcm: kcm,
        _relay: relay,
        _dir: dir,
    })
}

/// Runs every scenario in `mode` with `slices` and reports them all. A group that stops
/// early (an object it could not create) leaves a row naming the group.
pub async fn run_mode(tag: &str, mode: &str, slices: Slices) -> Result<()> {
    let _serial = SERIAL.lock().await;
    let cp = cluster::control_plane().await?;
    // Traffic from outside the pod range to a ClusterIP is masqueraded, so replies from a pod
    // on another node come back through the node that translated it.
    let cidr = "--cluster-cidr=10.244.0.0/16,fd00:244::/48";
    let s = setup(cp, tag, (mode, slices), &[cidr]).await?;
    let mut rows = vec![];
    if let Err(e) = basic::run(&s, &mut rows).await {
        rows.push(Row {
            scenario: "basic (stopped)",
            result: Err(e),
        });
    }
    if let Err(e) = dns::scenario(&s, &mut rows).await {
        rows.push(Row {
            scenario: "dns-records (stopped)",
            result: Err(e),
        });
    }
    if let Err(e) = terminating::scenario(&s, &mut rows).await {
        rows.push(Row {
            scenario: "terminating (stopped)",
            result: Err(e),
        });
    }
    if let Err(e) = dualstack::scenario(&s, &mut rows).await {
        rows.push(Row {
            scenario: "dual-stack (stopped)",
            result: Err(e),
        });
    }
    rows.push(Row {
        scenario: "network-programming-duration",
        result: programming_duration(&s.net).await,
    });
    if rows.iter().any(|r| r.result.is_err()) {
        for i in 1..=2 {
            eprintln!(
                "--- kube-proxy on node {i}:\n{}",
                s.net.log_tail(&format!("kube-proxy-{i}.log"), 15)
            );
        }
    }
    report(mode, slices, rows)
}

/// kube-proxy's `kubeproxy_network_programming_duration_seconds` on both nodes (the time from
/// the trigger-time annotation of the slices to the rules being programmed; one series per IP
/// family), printed; fails when a node has no sample. The row's time is the mean of all.
async fn programming_duration(net: &Net) -> Result<Duration> {
    const METRIC: &str = "kubeproxy_network_programming_duration_seconds";
    let (mut count, mut sum) = (0.0, 0.0);
    for i in 1..=2 {
        let lines = net.kube_proxy_metrics(i, METRIC).await;
        // `<METRIC>_<suffix>{ip_family="IPv4"} <value>`, summed over the families.
        let total = |suffix: &str| -> Result<f64> {
            let name = format!("{METRIC}_{suffix}");
            let mut values = lines
                .iter()
                .filter(|l| {
                    l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} "))
                })
                .map(|l| l.rsplit(' ').next().unwrap_or_default().parse::<f64>())
                .peekable();
            if values.peek().is_none() {
                bail!("no {name} on node {i}: {:?}", &lines[..lines.len().min(3)]);
            }
            Ok(values.sum::<Result<f64, _>>()?)
        };
        let (c, s) = (total("count")?, total("sum")?);
        eprintln!("datapath\tmetric\tnode{i}\t{METRIC}\tcount {c}\tsum {s:.3}s");
        if c == 0.0 {
            bail!("{METRIC} has no samples on node {i}");
        }
        count += c;
        sum += s;
    }
    Ok(Duration::from_secs_f64(sum / count))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn iptables_mode() -> Result<()> {
    run_mode("ipt", "iptables", Slices::Ours).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nftables_mode() -> Result<()> {
    run_mode("nft", "nftables", Slices::Ours).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "control run (kube-controller-manager's slices): make e2e"]
async fn iptables_mode_kcm_control() -> Result<()> {
    run_mode("iptk", "iptables", Slices::Kcm).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "control run (kube-controller-manager's slices): make e2e"]
async fn nftables_mode_kcm_control() -> Result<()> {
    run_mode("nftk", "nftables", Slices::Kcm).await
}
