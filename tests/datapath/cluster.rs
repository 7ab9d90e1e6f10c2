//! The Kubernetes side of a data-path test: the shared control plane reached from node
//! namespaces through a relay, our manager writing EndpointSlices and load-balancer addresses,
//! kube-proxy on each node, and the Node, Pod and Service objects.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, anyhow};
use k8s_openapi::api::core::v1::{Endpoints, Node, Service};
use kube::Api;
use kube::api::{Patch, PatchParams, PostParams};
use serde_json::{Value, json};
use test_support::{
    ControlPlane, ControlPlaneOptions, Manager, NodeSpecBuilder, PodBuilder, create_node,
    create_pod, free_addr, set_pod_status, tool, wait_for,
};
use tokio::net::{TcpStream, UnixListener};
use tokio::sync::OnceCell;

use crate::net::{Net, PodNet};

/// How long any one change may take to show in the data path.
pub const T: Duration = Duration::from_secs(30);

/// Serves `socket` (a unix socket the node namespaces' relays connect to, the filesystem being
/// shared) by piping each connection to the API server on the host's loopback; stops with the
/// returned task. The API server itself keeps listening on loopback only.
pub fn api_relay(cp: &ControlPlane, socket: &Path) -> Result<tokio::task::JoinHandle<()>> {
    let target = api_hostport(cp)?;
    let _ = std::fs::remove_file(socket);
    let listener = UnixListener::bind(socket).context("binding the API relay socket")?;
    Ok(tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            let target = target.clone();
            tokio::spawn(async move {
                if let Ok(mut up) = TcpStream::connect(&target).await {
                    let _ = tokio::io::copy_bidirectional(&mut conn, &mut up).await;
                }
            });
        }
    }))
}

/// `127.0.0.1:port` of the API server.
pub fn api_hostport(cp: &ControlPlane) -> Result<String> {
    cp.server
        .strip_prefix("https://")
        .map(str::to_string)
        .ok_or_else(|| anyhow!("unexpected API server URL {}", cp.server))
}

/// Starts, in node `i`'s namespace, the relay to the API server (same loopback port, so the
/// admin kubeconfig and the server certificate work unchanged) and kube-proxy in `mode` with
/// `extra` flags.
pub fn start_kube_proxy(
    net: &mut Net,
    cp: &ControlPlane,
    socket: &Path,
    (i, node_name): (usize, &str),
    mode: &str,
    extra: &[&str],
) -> Result<()> {
    let host = format!("node{i}");
    let port = api_hostport(cp)?
        .rsplit(':')
        .next()
        .unwrap_or_default()
        .to_string();
    net.spawn_helper(&host, &format!("relay {port} {}", socket.display()))?;
    let mut args: Vec<String> = [
        format!("--kubeconfig={}", cp.kubeconfig.display()),
        format!("--hostname-override={node_name}"),
        format!("--proxy-mode={mode}"),
        // nf_conntrack_max and the TCP timeouts are not per namespace: leave them alone.
        "--conntrack-max-per-core=0".into(),
        "--conntrack-tcp-timeout-established=0".into(),
        "--conntrack-tcp-timeout-close-wait=0".into(),
        "--healthz-bind-address=0.0.0.0:10256".into(),
        "--metrics-bind-address=127.0.0.1:10249".into(),
    ]
    .into();
    args.extend(extra.iter().map(|s| s.to_string()));
    net.spawn(
        &host,
        &format!("kube-proxy-{i}.log"),
        &tool("kube-proxy")?,
        &args,
    )
}

/// Starts CoreDNS (its kubernetes plugin, zone cluster.local) in node `i`'s namespace, which
/// already runs the API relay; it answers on port 53 of the node's addresses.
pub fn start_coredns(net: &mut Net, cp: &ControlPlane, dir: &Path, i: usize) -> Result<()> {
    let corefile = dir.join("Corefile");
    std::fs::write(
        &corefile,
        format!(
            ".:53 {{\n  errors\n  kubernetes cluster.local {{\n    kubeconfig {}\n  }}\n}}\n",
            cp.kubeconfig.display()
        ),
    )?;
    let args = vec!["-conf".to_string(), corefile.display().to_string()];
    net.spawn(&format!("node{i}"), "coredns.log", &tool("coredns")?, &args)
}

/// The control plane of the data-path tests: dual-stack Service ranges (IPv4 first, so a
/// Service is IPv4 unless it asks for more), shared by the tests of this binary.
pub async fn control_plane() -> Result<&'static ControlPlane> {
    static CP: OnceCell<ControlPlane> = OnceCell::const_new();
    CP.get_or_try_init(|| {
        ControlPlane::start(ControlPlaneOptions {
            service_cluster_ip_range: "10.96.0.0/16,fd00:10:96::/112".into(),
            ..Default::default()
        })
    })
    .await
}

/// Our manager (every controller, the local address-pool provider on 10.250.0.0/28), with
/// `extra` flags, plus whatever `SCM_DATAPATH_MANAGER_ARGS` adds (e.g.
/// `--controllers=*,-endpointslice` to see the tests fail without our slices).
pub fn start_manager(cp: &ControlPlane, dir: &Path, extra: &[&str]) -> Result<Manager> {
    let pools = dir.join("pools.yaml");
    std::fs::write(&pools, "pools: [10.250.0.0/28]\nipMode: VIP\n")?;
    let mut args = vec![
        "--leader-elect=false".to_string(),
        format!("--http-address={}", free_addr()),
        // No HTTPS port: its fixed default (10257) may be taken by another test's manager.
        "--secure-port=0".into(),
        "--cloud-provider=local".into(),
        format!("--cloud-config={}", pools.display()),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    if let Ok(extra) = std::env::var("SCM_DATAPATH_MANAGER_ARGS") {
        args.extend(extra.split_whitespace().map(str::to_string));
    }
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    Manager::start(cp, &refs)
}

/// Creates Node `name` with `ips` (IPv4, IPv6) as its InternalIPs, Ready, in zone `zone`.
pub async fn node(client: &kube::Client, name: &str, ips: (&str, &str), zone: &str) -> Result<()> {
    create_node(
        client,
        NodeSpecBuilder {
            name: name.into(),
            zone: Some(zone.into()),
            ..Default::default()
        },
    )
    .await?;
    let addresses = [ips.0, ips.1].map(|ip| json!({"type": "InternalIP", "address": ip}));
    let patch = json!({"status": {"addresses": addresses}});
    Api::<Node>::all(client.clone())
        .patch_status(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await?;
    Ok(())
}

/// Creates the Pod object of `pod` on `node_name`, labelled `app: <app>` and `pod: <name>`,
/// with a named port `http` 8080, Running and Ready at its addresses. `app: web` pods have
/// their name as hostname in subdomain `web-headless` (per-hostname DNS records).
pub async fn pod(
    client: &kube::Client,
    ns: &str,
    pod: &PodNet,
    (node_name, app): (&str, &str),
) -> Result<()> {
    let mut b = PodBuilder::new(ns, &pod.name, &[("app", app), ("pod", &pod.name)]);
    b.node_name = Some(node_name.into());
    b.ports = vec![(Some("http".into()), 8080, "TCP".into())];
    if app == "web" {
        b.hostname = Some(pod.name.clone());
        b.subdomain = Some("web-headless".into());
    }
    create_pod(client, &b).await?;
    set_pod_status(client, ns, &pod.name, true, &pod.ips()).await?;
    Ok(())
}

/// Creates a Service from `spec` (JSON) and returns it as created.
pub async fn service(client: &kube::Client, ns: &str, name: &str, spec: Value) -> Result<Service> {
    let svc: Service = serde_json::from_value(json!({
        "metadata": {"name": name, "namespace": ns},
        "spec": spec,
    }))?;
    Ok(Api::<Service>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &svc)
        .await?)
}

/// A selector Service of `type_` on port 80 to the pods' `http` port, with `extra` spec fields.
pub fn web_spec(type_: &str, selector: &[(&str, &str)], extra: Value) -> Value {
    let selector: BTreeMap<&str, &str> = selector.iter().copied().collect();
    let mut spec = json!({
        "type": type_,
        "selector": selector,
        "ports": [{"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"}],
    });
    if let (Some(s), Some(e)) = (spec.as_object_mut(), extra.as_object()) {
        s.extend(e.clone());
    }
    spec
}

/// A hand-made Endpoints object for the selector-less Service `name`: `ips` on port 8080.
pub async fn endpoints(client: &kube::Client, ns: &str, name: &str, ips: &[&str]) -> Result<()> {
    let ep: Endpoints = serde_json::from_value(json!({
        "metadata": {"name": name, "namespace": ns},
        "subsets": [{
            "addresses": ips.iter().map(|ip| json!({"ip": ip})).collect::<Vec<_>>(),
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        }],
    }))?;
    Api::<Endpoints>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &ep)
        .await?;
    Ok(())
}

/// The Service's ClusterIP.
pub fn cluster_ip(svc: &Service) -> Result<String> {
    svc.spec
        .as_ref()
        .and_then(|s| s.cluster_ip.clone())
        .ok_or_else(|| anyhow!("Service without a ClusterIP"))
}

/// The Service's first NodePort.
pub fn node_port(svc: &Service) -> Result<i32> {
    svc.spec
        .as_ref()
        .and_then(|s| s.ports.as_ref())
        .and_then(|p| p.first())
        .and_then(|p| p.node_port)
        .ok_or_else(|| anyhow!("Service without a NodePort"))
}

/// Waits for the load-balancer address our manager publishes for `name`.
pub async fn lb_address(client: &kube::Client, ns: &str, name: &str) -> Result<String> {
    let api = Api::<Service>::namespaced(client.clone(), ns);
    wait_for("a load-balancer address", T, || async {
        api.get(name)
            .await
            .ok()?
            .status?
            .load_balancer?
            .ingress?
            .first()?
            .ip
            .clone()
    })
    .await
}
