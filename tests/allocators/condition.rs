//! clusterip-alloc's `ClusterIPValid` condition (issue 15) against a real API server: `False`
//! with the finding's reason while a repair finding about the Service's ClusterIP stands,
//! removed once it is gone (also when it went while we were not running), never on a healthy
//! Service, and no write at steady state or while not leading.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use test_support::InProcess;

use super::*;

/// Our range is the lowest `/24` of the API server's `10.96.0.0/16`.
const OURS: &str = "10.96.0.0/24";
const MANAGER: &str = "service-controller-manager/clusterip-alloc";

fn clusterip_from(procs: InProcess, range: &str) -> Running {
    let cfg = clusterip_alloc::ClusterIpAllocConfig {
        service_cluster_ip_range: vec![range.parse().expect("cidr")],
        concurrent_syncs: 2,
        ..Default::default()
    };
    procs.start("clusterip-alloc", "clusterip-allocator", |ctx| {
        clusterip_alloc::run(ctx, cfg)
    });
    Running {
        metrics: procs.base.metrics.clone(),
        procs,
    }
}

fn writes(r: &Running) -> f64 {
    sample(
        &r.metrics.encode(),
        "service_controller_manager_condition_writes_total{controller=\"clusterip-alloc\"}",
    )
    .unwrap_or(0.0)
}

fn at(name: &str, ip: &str) -> Service {
    svc(name, |s| s.cluster_ip = Some(ip.into()))
}

fn valid(s: &Service) -> Option<Condition> {
    s.status
        .as_ref()
        .and_then(|st| st.conditions.as_ref())
        .and_then(|cs| {
            cs.iter()
                .find(|c| c.type_ == clusterip_alloc::CLUSTER_IP_VALID)
        })
        .cloned()
}

/// Whether our field manager has ever written `s`.
fn touched_by_us(s: &Service) -> bool {
    s.metadata
        .managed_fields
        .iter()
        .flatten()
        .any(|m| m.manager.as_deref() == Some(MANAGER))
}

/// Waits until `name`'s ClusterIPValid satisfies `want`, returning the Service.
async fn wait_valid(
    api: &Api<Service>,
    name: &str,
    what: &str,
    want: impl Fn(Option<&Condition>) -> bool,
) -> Service {
    wait_for(what, DEADLINE, || {
        let api = api.clone();
        let got = async move { api.get(name).await.ok() };
        let want = &want;
        async move { got.await.filter(|s| want(valid(s).as_ref())) }
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"))
}

fn out_of_range(c: Option<&Condition>, ip: &str) -> bool {
    c.is_some_and(|c| {
        c.status == "False"
            && c.reason == "ClusterIPOutOfRange"
            && c.message
                == format!(
                    "Cluster IP [IPv4]: {ip} is not within any configured Service CIDR; please recreate service"
                )
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_ip_valid_appears_for_a_finding_and_goes_with_it() {
    // Its own control plane: our range leaves out most of the API server's, which would put
    // conditions on other tests' Services.
    let cp = ControlPlane::start(ControlPlaneOptions::default())
        .await
        .expect("control plane");
    let client = cp.client().await.expect("client");
    let ns = test_support::namespace(&client, "cipvalid")
        .await
        .expect("ns");
    let api: Api<Service> = Api::namespaced(client.clone(), &ns);
    let pp = PostParams::default();
    api.create(&pp, &at("healthy", "10.96.0.50"))
        .await
        .expect("healthy");
    api.create(&pp, &at("stray", "10.96.200.7"))
        .await
        .expect("stray");

    let cip = clusterip_from(InProcess::new(client.clone()), OURS);
    let s = wait_valid(&api, "stray", "stray's ClusterIPValid=False", |c| {
        out_of_range(c, "10.96.200.7")
    })
    .await;
    assert!(touched_by_us(&s), "{:?}", s.metadata.managed_fields);
    assert_eq!(writes(&cip), 1.0);
    let h = api.get("healthy").await.expect("healthy");
    assert!(valid(&h).is_none() && !touched_by_us(&h), "{h:?}");

    // The cause goes (an ExternalName Service has no ClusterIP): so does the condition.
    let to_external = serde_json::json!({"spec": {"type": "ExternalName",
        "externalName": "example.com", "selector": null}});
    api.patch(
        "stray",
        &PatchParams::default(),
        &Patch::Merge(&to_external),
    )
    .await
    .expect("to ExternalName");
    wait_valid(&api, "stray", "stray's ClusterIPValid removed", |c| {
        c.is_none()
    })
    .await;
    assert_eq!(writes(&cip), 2.0);

    // Steady state: changes to the healthy Service write nothing. A second stray, created
    // after them, shows they went through the queue before its condition appears.
    for i in 0..3 {
        let p = serde_json::json!({"metadata": {"labels": {"touch": format!("{i}")}}});
        api.patch("healthy", &PatchParams::default(), &Patch::Merge(&p))
            .await
            .expect("touch");
    }
    api.create(&pp, &at("stray2", "10.96.201.9"))
        .await
        .expect("stray2");
    wait_valid(&api, "stray2", "stray2's ClusterIPValid=False", |c| {
        out_of_range(c, "10.96.201.9")
    })
    .await;
    assert_eq!(writes(&cip), 3.0, "one write per transition");
    let h = api.get("healthy").await.expect("healthy");
    assert!(valid(&h).is_none() && !touched_by_us(&h), "{h:?}");
    cip.stop().await;

    // Restarted with a range that holds stray2's address, as a standby first: its finding
    // is gone, but nothing is written until it leads; then the stale condition goes.
    let standby = InProcess::with_leading(client.clone(), false);
    let cip = clusterip_from(standby, "10.96.0.0/16");
    let m = cip.metrics.clone();
    wait_for("mirrored the /16", DEADLINE, || {
        let t = m.encode();
        async move {
            t.contains("kube_apiserver_clusterip_allocator_allocated_ips{cidr=\"10.96.0.0/16\"}")
                .then_some(())
        }
    })
    .await
    .expect("mirrored");
    let s = api.get("stray2").await.expect("stray2");
    assert!(out_of_range(valid(&s).as_ref(), "10.96.201.9"), "{s:?}");
    assert_eq!(writes(&cip), 0.0, "a standby writes nothing");
    cip.procs.set_leading(true);
    wait_valid(
        &api,
        "stray2",
        "stray2's stale ClusterIPValid removed",
        |c| c.is_none(),
    )
    .await;
    assert_eq!(writes(&cip), 1.0);
    let h = api.get("healthy").await.expect("healthy");
    assert!(valid(&h).is_none() && !touched_by_us(&h), "{h:?}");
    cip.stop().await;
    cp.stop().await;
}
