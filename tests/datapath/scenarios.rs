//! Every scenario in one kube-proxy mode: the network, the objects, and traffic from the
//! client checked against what the objects say, with the time each change took to show.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::json;
use test_support::{ControlPlane, namespace, set_pod_status, wait_for};
use tokio::sync::Mutex;

use crate::cluster::{self, T, web_spec};
use crate::net::{self, Net, PodNet};

/// One data-path test at a time: each starts its own manager against the shared control plane.
pub static SERIAL: Mutex<()> = Mutex::const_new(());

/// The answers of one round of `n` GETs from the client to `addr`.
async fn round(net: &Net, addr: &str, n: usize, timeout_ms: u64) -> Vec<String> {
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
    scenario: &'static str,
    result: Result<Duration>,
}

/// Prints the table and fails if any scenario failed.
pub fn report(mode: &str, rows: Vec<Row>) -> Result<()> {
    let mut failed = vec![];
    eprintln!("datapath\tscenario\tmode\tresult\ttime-to-traffic");
    for r in &rows {
        match &r.result {
            Ok(d) => eprintln!(
                "datapath\t{}\t{mode}\tpass\t{:.2}s",
                r.scenario,
                d.as_secs_f64()
            ),
            Err(e) => {
                eprintln!("datapath\t{}\t{mode}\tFAIL\t{e:#}", r.scenario);
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

/// What a mode's run sets up: the network with two nodes and pods a (node 1) and b (node 2).
pub struct Setup {
    /// The network (torn down on drop).
    pub net: Net,
    /// Admin client.
    pub client: kube::Client,
    /// The test's Kubernetes namespace.
    pub ns: String,
    /// Pods a and b.
    pub pods: Vec<PodNet>,
    /// Node names, index 0 = node 1.
    pub nodes: Vec<String>,
    _manager: test_support::Manager,
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

/// Builds the network, starts our manager and kube-proxy (`mode`, with `proxy_flags`) on two
/// nodes, and creates the Nodes and pods a and b. `tag` keeps node names apart across tests.
pub async fn setup(
    cp: &ControlPlane,
    tag: &str,
    mode: &str,
    proxy_flags: &[&str],
) -> Result<Setup> {
    net::sweep_stale();
    net::preflight()?;
    let dir = tempfile::Builder::new().prefix("scm-datapath-").tempdir()?;
    let client = cp.client().await?;
    let ns = namespace(&client, &format!("dp-{tag}")).await?;
    let manager = cluster::start_manager(cp, dir.path())?;
    let mut net = Net::new(tag, 2, dir.path())?;
    let socket = dir.path().join("api.sock");
    let relay = RelayGuard(cluster::api_relay(cp, &socket)?);
    let mut nodes = vec![];
    for i in 1..=2 {
        let name = format!("dp-{tag}-n{i}");
        cluster::node(
            &client,
            &name,
            &format!("10.0.0.1{i}"),
            &format!("zone-{i}"),
        )
        .await?;
        cluster::start_kube_proxy(&mut net, cp, &socket, (i, &name), mode, proxy_flags)?;
        nodes.push(name);
    }
    cluster::start_coredns(&mut net, cp, dir.path(), 1)?;
    net.set_resolver("client", "10.0.0.11")?;
    let mut pods = vec![];
    for (name, i) in [("pod-a", 1), ("pod-b", 2)] {
        let p = net.add_pod(name, i, 8080)?;
        cluster::pod(&client, &ns, &p, &nodes[i - 1]).await?;
        pods.push(p);
    }
    Ok(Setup {
        net,
        client,
        ns,
        pods,
        nodes,
        _manager: manager,
        _relay: relay,
        _dir: dir,
    })
}

/// Runs every scenario in `mode` and reports them all.
pub async fn run_mode(tag: &str, mode: &str) -> Result<()> {
    let _serial = SERIAL.lock().await;
    let cp = ControlPlane::shared().await?;
    // Traffic from outside the pod range to a ClusterIP is masqueraded, so replies from a pod
    // on another node come back through the node that translated it.
    let s = setup(cp, tag, mode, &["--cluster-cidr=10.244.0.0/16"]).await?;
    let mut rows = vec![];
    let r = scenarios(&s, &mut rows).await;
    if let Err(e) = r {
        rows.push(Row {
            scenario: "setup",
            result: Err(e),
        });
    }
    if rows.iter().any(|r| r.result.is_err()) {
        for i in 1..=2 {
            eprintln!(
                "--- kube-proxy on node {i}:\n{}",
                s.net.log_tail(&format!("kube-proxy-{i}.log"), 15)
            );
        }
    }
    report(mode, rows)
}

async fn scenarios(s: &Setup, rows: &mut Vec<Row>) -> Result<()> {
    let (c, ns) = (&s.client, s.ns.as_str());
    let both = ["pod-a", "pod-b"];
    let (n1, n2) = ("10.0.0.11", "10.0.0.12");

    // ClusterIP: both pods answer through node 1's rules.
    let web = cluster::service(
        c,
        ns,
        "web",
        web_spec("ClusterIP", &[("app", "web")], json!({})),
    )
    .await?;
    let vip = format!("{}:80", cluster::cluster_ip(&web)?);
    rows.push(Row {
        scenario: "clusterip",
        result: wait_answers(&s.net, &vip, &both).await,
    });

    // DNS: CoreDNS answers the Service's name with its ClusterIP, and traffic to the name
    // reaches the pods; a headless Service's name gives one address per ready endpoint.
    let t = Instant::now();
    let r = async {
        let name = format!("web.{ns}.svc.cluster.local");
        let want = vec![cluster::cluster_ip(&web)?];
        wait_for(&format!("{name} resolving to {want:?}"), T, || async {
            (s.net.client_resolve(&name).await == want).then_some(())
        })
        .await?;
        wait_answers(&s.net, &format!("{name}:80"), &both).await?;
        // SRV for the named port: port 80 at the Service's name.
        let srv = format!("_http._tcp.{name}");
        let want = vec![format!("80 {name}")];
        wait_for(&format!("{srv} SRV {want:?}"), T, || async {
            (s.net.client_srv(&srv, "10.0.0.11:53").await == want).then_some(())
        })
        .await?;
        let spec = web_spec("ClusterIP", &[("app", "web")], json!({"clusterIP": "None"}));
        cluster::service(c, ns, "web-headless", spec).await?;
        let name = format!("web-headless.{ns}.svc.cluster.local");
        let mut want: Vec<String> = s.pods.iter().map(|p| p.ip.clone()).collect();
        want.sort();
        wait_for(&format!("{name} resolving to {want:?}"), T, || async {
            (s.net.client_resolve(&name).await == want).then_some(())
        })
        .await?;
        eprintln!("datapath\tdns\t{name}\t{want:?}");
        Ok(t.elapsed())
    };
    rows.push(Row {
        scenario: "dns-coredns",
        result: r.await,
    });

    // NodePort: each node forwards to both pods.
    let np = cluster::service(
        c,
        ns,
        "web-np",
        web_spec("NodePort", &[("app", "web")], json!({})),
    )
    .await?;
    let port = cluster::node_port(&np)?;
    let t = Instant::now();
    let r = async {
        wait_answers(&s.net, &format!("{n1}:{port}"), &both).await?;
        wait_answers(&s.net, &format!("{n2}:{port}"), &both).await?;
        Ok(t.elapsed())
    };
    rows.push(Row {
        scenario: "nodeport",
        result: r.await,
    });

    // externalTrafficPolicy Local: a node answers only with its own pod; a node without one
    // drops the traffic.
    let local = cluster::service(
        c,
        ns,
        "web-local",
        web_spec(
            "NodePort",
            &[("app", "web")],
            json!({"externalTrafficPolicy": "Local"}),
        ),
    )
    .await?;
    let port = cluster::node_port(&local)?;
    let only_a = cluster::service(
        c,
        ns,
        "a-local",
        web_spec(
            "NodePort",
            &[("pod", "pod-a")],
            json!({"externalTrafficPolicy": "Local"}),
        ),
    )
    .await?;
    let port_a = cluster::node_port(&only_a)?;
    let t = Instant::now();
    let r = async {
        wait_answers(&s.net, &format!("{n1}:{port}"), &["pod-a"]).await?;
        wait_answers(&s.net, &format!("{n2}:{port}"), &["pod-b"]).await?;
        wait_answers(&s.net, &format!("{n1}:{port_a}"), &["pod-a"]).await?;
        wait_silent(&s.net, &format!("{n2}:{port_a}")).await?;
        Ok(t.elapsed())
    };
    rows.push(Row {
        scenario: "external-traffic-policy-local",
        result: r.await,
    });

    // LoadBalancer: the local pool's address, routed by the client to node 1.
    let t = Instant::now();
    cluster::service(
        c,
        ns,
        "web-lb",
        web_spec("LoadBalancer", &[("app", "web")], json!({})),
    )
    .await?;
    let r = async {
        let addr = cluster::lb_address(c, ns, "web-lb").await?;
        wait_answers(&s.net, &format!("{addr}:80"), &both).await?;
        Ok(t.elapsed())
    };
    rows.push(Row {
        scenario: "loadbalancer",
        result: r.await,
    });

    // ClientIP session affinity: with both pods ready, one client keeps one pod.
    let sticky = cluster::service(
        c,
        ns,
        "web-sticky",
        web_spec(
            "ClusterIP",
            &[("app", "web")],
            json!({"sessionAffinity": "ClientIP"}),
        ),
    )
    .await?;
    let addr = format!("{}:80", cluster::cluster_ip(&sticky)?);
    let t = Instant::now();
    let r = async {
        let first = wait_for("the sticky Service answering", T, || async {
            round(&s.net, &addr, 1, 1000)
                .await
                .into_iter()
                .find(|g| !g.starts_with("ERR"))
        })
        .await?;
        let got = round(&s.net, &addr, 12, 1000).await;
        if got.iter().any(|g| *g != first) {
            bail!("affinity to {first} not kept: {got:?}");
        }
        Ok(t.elapsed())
    };
    rows.push(Row {
        scenario: "session-affinity-clientip",
        result: r.await,
    });

    // trafficDistribution PreferSameZone: our slices carry zone hints, so node 1 (zone-1,
    // where the client's traffic enters) sends it only to pod a, in the same zone.
    let spec = web_spec(
        "ClusterIP",
        &[("app", "web")],
        json!({"trafficDistribution": "PreferSameZone"}),
    );
    let zonal = cluster::service(c, ns, "web-zonal", spec).await?;
    let addr = format!("{}:80", cluster::cluster_ip(&zonal)?);
    let t = Instant::now();
    rows.push(Row {
        scenario: "prefer-same-zone",
        result: wait_answers(&s.net, &addr, &["pod-a"])
            .await
            .map(|_| t.elapsed()),
    });

    // PreferSameNode: node hints keep node 1's traffic on its own pod.
    let spec = web_spec(
        "ClusterIP",
        &[("app", "web")],
        json!({"trafficDistribution": "PreferSameNode"}),
    );
    let same_node = cluster::service(c, ns, "web-same-node", spec).await?;
    let addr = format!("{}:80", cluster::cluster_ip(&same_node)?);
    let t = Instant::now();
    rows.push(Row {
        scenario: "prefer-same-node",
        result: wait_answers(&s.net, &addr, &["pod-a"])
            .await
            .map(|_| t.elapsed()),
    });

    // A selector-less Service with hand-made Endpoints: traffic follows the mirrored slice.
    let manual = cluster::service(
        c,
        ns,
        "manual",
        json!({"ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}]}),
    )
    .await?;
    let addr = format!("{}:80", cluster::cluster_ip(&manual)?);
    let t = Instant::now();
    cluster::endpoints(c, ns, "manual", &[&s.pods[1].ip]).await?;
    let r = async {
        wait_answers(&s.net, &addr, &["pod-b"]).await?;
        Ok(t.elapsed())
    };
    rows.push(Row {
        scenario: "selectorless-mirrored",
        result: r.await,
    });

    // Readiness: pod b turns unready (traffic to it stops), then ready again (it resumes).
    let t = Instant::now();
    set_pod_status(c, ns, "pod-b", false, &[&s.pods[1].ip]).await?;
    rows.push(Row {
        scenario: "readiness-unready",
        result: wait_answers(&s.net, &vip, &["pod-a"])
            .await
            .map(|_| t.elapsed()),
    });
    let t = Instant::now();
    set_pod_status(c, ns, "pod-b", true, &[&s.pods[1].ip]).await?;
    rows.push(Row {
        scenario: "readiness-ready-again",
        result: wait_answers(&s.net, &vip, &both).await.map(|_| t.elapsed()),
    });
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn iptables_mode() -> Result<()> {
    run_mode("ipt", "iptables").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nftables_mode() -> Result<()> {
    run_mode("nft", "nftables").await
}
