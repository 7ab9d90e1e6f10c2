//! Changes made while no replica leads: a Service deleted, types changed both ways, a selector
//! changed. Nothing of ours may be written meanwhile; once leadership returns the slices and
//! the NodePort ledger must match the cluster as it now is.

use std::collections::BTreeSet;
use std::time::Instant;

use anyhow::{Result, anyhow};
use k8s_openapi::api::core::v1::Service;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use nodeport_alloc::NodePortAllocConfig;
use nodeport_alloc::shell::NodePorts;
use scm_allocator::shell::{MetricsOf, Shell};
use scm_runtime::ObjectKey;
use test_support::apiproxy::ApiProxy;
use test_support::invariants::{OURS, UPSTREAM};
use test_support::{ControlPlane, PodBuilder, create_pod, set_pod_status, wait_for};

use crate::scene::{Scene, WAIT, pod_ip, served, service, slices_of, turn_alone};

fn node_port(s: &Service) -> Option<i32> {
    s.spec
        .as_ref()?
        .ports
        .iter()
        .flatten()
        .find_map(|p| p.node_port)
}

async fn set_type(api: &Api<Service>, name: &str, type_: &str) -> Result<Service> {
    let p = serde_json::json!({"spec": {"type": type_}});
    Ok(api
        .patch(name, &PatchParams::default(), &Patch::Merge(&p))
        .await?)
}

/// Every node port held by a Service in the cluster, as the API server has them.
async fn cluster_node_ports(admin: &kube::Client) -> Option<BTreeSet<i32>> {
    let all = Api::<Service>::all(admin.clone())
        .list(&ListParams::default())
        .await
        .ok()?;
    Some(
        all.items
            .iter()
            .flat_map(nodeport_alloc::core::collect_node_ports)
            .collect(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deletes_and_type_changes_while_no_leader_runs_converge_once_one_leads() -> Result<()> {
    let cp = ControlPlane::shared().await?;
    let proxy = ApiProxy::start(cp.client().await?).await?;
    let turn = turn_alone().await;
    let scene = Scene::start_in(turn, cp, &proxy, "faults-leaderless", 4, 2).await?;
    let (ns, admin) = (scene.ns.clone(), scene.admin.clone());
    scene
        .ours
        .start("nodeport-alloc", "portallocator-repair-controller", |ctx| {
            nodeport_alloc::run(ctx, NodePortAllocConfig::default())
        });
    let svcs: Api<Service> = Api::namespaced(admin.clone(), &ns);
    // svc-2 starts as a NodePort Service; the API server allocates its port.
    let released = node_port(&set_type(&svcs, "svc-2", "NodePort").await?)
        .ok_or_else(|| anyhow!("svc-2 got no node port"))?;
    // Pods for svc-3's next selector.
    let moved: BTreeSet<(String, i32, bool)> = (0..2)
        .map(|p| (pod_ip(scene.services.len(), 9, p), 80, true))
        .collect();
    for (p, (ip, _, _)) in moved.iter().enumerate() {
        let name = format!("svc-3-b-{p}");
        let mut pb = PodBuilder::new(&ns, &name, &[("app", "svc-3-b")]);
        pb.node_name = Some(scene.node.clone());
        create_pod(&admin, &pb).await?;
        set_pod_status(&admin, &ns, &name, true, &[ip]).await?;
    }
    scene.settled("before leadership is taken away").await?;
    let before_svc3 = served(&slices_of(&admin, &ns, "svc-3", OURS).await?);

    scene.ours.set_leading(false);
    let gone_uid = svcs.get("svc-0").await?.metadata.uid;
    svcs.delete("svc-0", &DeleteParams::default()).await?;
    let taken = node_port(&set_type(&svcs, "svc-1", "NodePort").await?)
        .ok_or_else(|| anyhow!("svc-1 got no node port"))?;
    let cip = set_type(&svcs, "svc-2", "ClusterIP").await?;
    assert_eq!(
        node_port(&cip),
        None,
        "the API server drops the node port of a Service turned ClusterIP"
    );
    let sel = serde_json::json!({"spec": {"selector": {"app": "svc-3-b"}}});
    svcs.patch("svc-3", &PatchParams::default(), &Patch::Merge(&sel))
        .await?;
    // Upstream follows at once; nothing of ours moves while no one leads.
    wait_for("upstream to follow svc-3's new selector", WAIT, || async {
        let up = served(&slices_of(&admin, &ns, "svc-3", UPSTREAM).await.ok()?);
        (up == moved).then_some(())
    })
    .await?;
    // Upstream having followed says nothing of our watch: wait until our controllers' shared
    // informer has seen every change (a writer would act on them now), else "nothing moved"
    // can be read before ours had its chance.
    let informer = scene.ours.base.informers.services();
    wait_for("our informer to see the changes", WAIT, || async {
        let get = |name: &str| informer.get(&ObjectKey::new(ns.clone(), name));
        let type_of = |name: &str| get(name)?.spec.as_ref()?.type_.clone();
        let selector = get("svc-3")?.spec.as_ref()?.selector.clone()?;
        let deleted = get("svc-0").is_none_or(|s| s.metadata.deletion_timestamp.is_some());
        (deleted
            && type_of("svc-1").as_deref() == Some("NodePort")
            && type_of("svc-2").as_deref() == Some("ClusterIP")
            && selector.get("app").map(String::as_str) == Some("svc-3-b"))
        .then_some(())
    })
    .await?;
    assert!(
        !slices_of(&admin, &ns, "svc-0", OURS).await?.is_empty(),
        "our slices of the deleted svc-0 were removed while no one led"
    );
    assert_eq!(
        served(&slices_of(&admin, &ns, "svc-3", OURS).await?),
        before_svc3,
        "our slices of svc-3 changed while no one led"
    );

    let started = Instant::now();
    scene.ours.set_leading(true);
    // No garbage collector runs in this control plane: upstream's slices of svc-0 wait for one
    // (they are owned by the deleted Service); ours are removed by our controller.
    wait_for("our slices of the deleted svc-0 removed", WAIT, || async {
        slices_of(&admin, &ns, "svc-0", OURS)
            .await
            .ok()?
            .is_empty()
            .then_some(())
    })
    .await?;
    let upstream_left = slices_of(&admin, &ns, "svc-0", UPSTREAM).await?;
    assert!(
        !upstream_left.is_empty()
            && upstream_left.iter().all(|s| s
                .metadata
                .owner_references
                .iter()
                .flatten()
                .any(|o| o.kind == "Service" && Some(&o.uid) == gone_uid.as_ref())),
        "upstream leaves the slices of a deleted Service to the garbage collector"
    );

    // The NodePort ledger, built from the same Service informer as the running controller's.
    let ledger = Shell::new(
        NodePorts {
            span: NodePortAllocConfig::default().service_node_port_range,
        },
        scene.ours.base.informers.services(),
        MetricsOf::<NodePorts>::default(),
        false,
    );
    let holder = |port: i32| {
        ledger.rebuild();
        ledger.with_mirror(|m| m.and_then(|m| m.holder(&port)).map(|k| k.name.clone()))
    };
    wait_for(
        "the ledger: svc-2's port free, svc-1's held",
        WAIT,
        || async {
            (holder(released).is_none() && holder(taken).as_deref() == Some("svc-1")).then_some(())
        },
    )
    .await?;
    // The released port can be asked for again, and is held once.
    let mut reuse = service(&ns, "reuse", None);
    if let Some(spec) = reuse.spec.as_mut() {
        spec.type_ = Some("NodePort".into());
        if let Some(p) = spec.ports.as_mut().and_then(|p| p.first_mut()) {
            p.node_port = Some(released);
        }
    }
    svcs.create(&PostParams::default(), &reuse).await?;
    wait_for(
        "the ledger: the released port held by reuse",
        WAIT,
        || async { (holder(released).as_deref() == Some("reuse")).then_some(()) },
    )
    .await?;
    let reuse_key = ObjectKey::new(ns.clone(), "reuse");
    let findings = ledger
        .with_mirror(|m| m.and_then(|m| m.findings.get(&reuse_key).map(|f| format!("{f:?}"))));
    assert_eq!(findings, None, "a finding on the reused port");
    // The running controller's own ledger counts what the cluster holds, and found nothing
    // held twice.
    wait_for(
        "our allocated-ports gauge to match the cluster",
        WAIT,
        || async {
            let want = cluster_node_ports(&admin).await?.len() as f64;
            let have = scene
                .ours
                .metrics()
                .get("kube_apiserver_nodeport_allocator_allocated_ports", &[])?;
            (have == want).then_some(())
        },
    )
    .await?;
    let repairs = scene
        .ours
        .metrics()
        .sum("apiserver_nodeport_repair_port_errors_total", &[]);
    assert_eq!(
        repairs, 0.0,
        "our NodePort ledger reported a repair finding"
    );

    let remaining: Vec<String> = scene.services[1..].to_vec();
    scene
        .finish_for(
            "no leader while a Service is deleted, types change both ways, a selector changes",
            4,
            started,
            &remaining,
        )
        .await?;
    Ok(())
}
