//! The exact API calls of an allocator shell, recorded by the API double: a simple assignment
//! is one replace with the read's resourceVersion as precondition; a 409 is followed by one
//! re-read and one re-planned replace with the new resourceVersion.

use super::*;

const SERVICES: &str = "/api/v1/namespaces/ns/services";

/// Creates `ns/name` without ClusterIP fields in the double; returns its resourceVersion.
fn create_plain(d: &double::Double, name: &str) -> u64 {
    let mut s = svc(name, |_| {});
    s.metadata.namespace = Some("ns".into());
    let created = d.create(s);
    created
        .metadata
        .resource_version
        .and_then(|rv| rv.parse().ok())
        .expect("resourceVersion")
}

/// Waits until `name` has a ClusterIP and the shell's mirror has seen it (2 addresses held:
/// it and the one reserved for default/kubernetes), so no write of this round is still to come.
async fn assigned_and_mirrored(
    d: &Arc<double::Double>,
    cip: &Running,
    name: &'static str,
) -> Service {
    let got = wait_for("assigned", DEADLINE, || {
        let d = d.clone();
        async move {
            d.get("ns", name)
                .filter(|s| spec_of(s).cluster_ip.is_some())
        }
    })
    .await
    .expect("assigned");
    settled(
        cip,
        "kube_apiserver_clusterip_allocator_allocated_ips{cidr=\"10.96.0.0/16\"}",
        2.0,
    )
    .await;
    got
}

/// Waits until the controller's gauge `sample_name` shows `want`: its mirror has seen the write
/// (or holds it as pending), so no write of this round is still to come.
async fn settled(ctl: &Running, sample_name: &str, want: f64) {
    let m = ctl.metrics.clone();
    wait_for("mirror saw the write", DEADLINE, || {
        let t = m.encode();
        async move { (sample(&t, sample_name)? == want).then_some(()) }
    })
    .await
    .expect("mirrored");
}

/// Asserts that the only call to `ns/name` was one replace preconditioned on `rv`; returns it.
fn the_only_replace(d: &double::Double, name: &str, rv: &str) -> double::Call {
    assert_eq!(
        d.calls_to(SERVICES),
        vec![format!("PUT {SERVICES}/{name} rv={rv}")],
        "{:#?}",
        d.calls()
    );
    d.calls()
        .into_iter()
        .find(|c| c.method == "PUT")
        .expect("the replace")
}

/// The ClusterIP fields of a recorded replace.
fn written_ips(call: &double::Call) -> serde_json::Value {
    call.body["spec"]["clusterIPs"].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_simple_assignment_is_exactly_one_replace_preconditioned_on_the_read() {
    let d = double::Double::new();
    let client = double::serve(d.clone()).await;
    let rv = create_plain(&d, "plain");
    let cip = assigning_clusterip(&client, &["10.96.0.0/16"]);
    let got = assigned_and_mirrored(&d, &cip, "plain").await;
    let put = the_only_replace(&d, "plain", &rv.to_string());
    let sp = spec_of(&got);
    assert_eq!(written_ips(&put), serde_json::json!(sp.cluster_ips));
    assert_eq!(put.body["spec"]["ipFamilies"], serde_json::json!(["IPv4"]));
    assert_eq!(put.body["spec"]["ipFamilyPolicy"], "SingleStack");
    // The rest of the Service is written back as read.
    assert_eq!(put.body["metadata"]["name"], "plain");
    assert_eq!(put.body["spec"]["ports"][0]["port"], 80);
    assert_eq!(d.stats(), (1, 0));
    cip.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_conflict_is_re_read_and_re_planned_with_the_new_resource_version() {
    let d = double::Double::new();
    let client = double::serve(d.clone()).await;
    d.conflict_next_write("ns", "contested");
    let rv = create_plain(&d, "contested");
    let cip = assigning_clusterip(&client, &["10.96.0.0/16"]);
    let got = assigned_and_mirrored(&d, &cip, "contested").await;
    // The double commits a concurrent change (rv + 1) before answering the first replace 409.
    assert_eq!(
        d.calls_to(SERVICES),
        vec![
            format!("PUT {SERVICES}/contested rv={rv}"),
            format!("GET {SERVICES}/contested"),
            format!("PUT {SERVICES}/contested rv={}", rv + 1),
        ],
        "{:#?}",
        d.calls()
    );
    let puts: Vec<double::Call> = d
        .calls()
        .into_iter()
        .filter(|c| c.method == "PUT")
        .collect();
    // The re-planned write carries the concurrent change and what is stored now.
    assert_eq!(puts[1].body["metadata"]["labels"]["touched"], "yes");
    assert_eq!(
        written_ips(&puts[1]),
        serde_json::json!(spec_of(&got).cluster_ips)
    );
    assert_eq!(
        got.metadata
            .labels
            .as_ref()
            .and_then(|l| l.get("touched"))
            .map(String::as_str),
        Some("yes")
    );
    assert_eq!(d.stats(), (1, 1));
    cip.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_node_port_shell_writes_one_preconditioned_replace_too() {
    let d = double::Double::new();
    let client = double::serve(d.clone()).await;
    let mut s = svc("np", |s| s.type_ = Some("NodePort".into()));
    s.metadata.namespace = Some("ns".into());
    let rv = d.create(s).metadata.resource_version.expect("rv");
    let np = assigning_nodeport(&client, "30000-32767");
    let got = wait_for("node port assigned", DEADLINE, || {
        let d = d.clone();
        async move {
            d.get("ns", "np").filter(|s| {
                spec_of(s)
                    .ports
                    .iter()
                    .flatten()
                    .all(|p| p.node_port.is_some())
            })
        }
    })
    .await
    .expect("assigned");
    settled(
        &np,
        "kube_apiserver_nodeport_allocator_allocated_ports",
        1.0,
    )
    .await;
    let put = the_only_replace(&d, "np", &rv);
    let port = spec_of(&got).ports.as_ref().and_then(|p| p[0].node_port);
    assert_eq!(
        put.body["spec"]["ports"][0]["nodePort"],
        serde_json::json!(port)
    );
    assert_eq!(d.stats(), (1, 0));
    np.stop().await;
}
