//! Endpoint-aware targets and graceful drain (`--endpoint-aware-load-balancer-targets`, issue
//! 13): our EndpointSlice controller and cloud-lb in one process (one EndpointSlice watch),
//! real pods made Ready through the status subresource, moto's target groups.

use std::collections::BTreeSet;

use anyhow::{Result, anyhow};
use k8s_openapi::api::core::v1::{Node, Pod};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use test_support::{InProcess, PodBuilder, set_pod_status, wait_for};

use crate::aws::*;
use crate::harness::*;

/// Keeps a deleted pod in the API (no kubelet here would finish it either; this makes it
/// certain), so "deregistered before the pod is gone" is observable.
const HOLD: &str = "test.example.com/hold";

async fn pod(
    client: &kube::Client,
    ns: &str,
    name: &str,
    app: &str,
    node: &str,
    ip: &str,
) -> Result<()> {
    let mut b = PodBuilder::new(ns, name, &[("app", app)]);
    b.node_name = Some(node.into());
    b.ports = vec![(Some("http".into()), 8080, "TCP".into())];
    let mut p = b.build();
    p.metadata.finalizers = Some(vec![HOLD.into()]);
    Api::<Pod>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &p)
        .await?;
    set_pod_status(client, ns, name, true, &[ip]).await?;
    Ok(())
}

async fn release(client: &kube::Client, ns: &str, name: &str) -> Result<()> {
    let api: Api<Pod> = Api::namespaced(client.clone(), ns);
    let p = serde_json::json!({"metadata": {"finalizers": null}});
    api.patch(name, &PatchParams::default(), &Patch::Merge(&p))
        .await?;
    Ok(())
}

async fn cordon(client: &kube::Client, name: &str, on: bool) -> Result<()> {
    let api: Api<Node> = Api::all(client.clone());
    let p = serde_json::json!({"spec": {"unschedulable": on}});
    api.patch(name, &PatchParams::default(), &Patch::Merge(&p))
        .await?;
    Ok(())
}

fn want(nodes: &[&str], port: i32) -> BTreeSet<(String, i32)> {
    nodes.iter().map(|n| (instance(n), port)).collect()
}

/// The (only) target group of the Service's load balancer, and the port its targets use.
async fn target_group(
    aws: &Aws,
    client: &kube::Client,
    ns: &str,
    name: &str,
) -> Result<(String, i32)> {
    let svc = wait_status(client, ns, name).await?;
    let lb = aws
        .lb_of(&svc)
        .await
        .ok_or_else(|| anyhow!("no load balancer"))?;
    let tgs = aws.tgs_of(lb.load_balancer_arn().unwrap_or_default()).await;
    let tg = tgs.first().ok_or_else(|| anyhow!("no target group"))?;
    Ok((
        tg.target_group_arn().unwrap_or_default().to_string(),
        tg.port().unwrap_or_default(),
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn local_targets_follow_ready_endpoints_and_drain_before_the_pod_goes() -> Result<()> {
    let _g = SERIAL.lock().await;
    let (client, ns) = setup().await?;
    let aws = Aws::start("it-drain").await?;
    let class = "test.example.com/drain";
    for n in ["drain-a", "drain-b", "drain-c"] {
        node(&client, n).await?;
    }
    let c = InProcess::new(client.clone());
    c.start("endpointslice", "endpoint-slice-controller", |ctx| {
        endpointslice::run(ctx, Default::default())
    });
    let (config, provider) = (
        cloud_lb::CloudLbConfig {
            endpoint_aware_targets: true,
            ..aws.config(class, false)
        },
        aws.provider(),
    );
    c.start("cloud-lb", "service-controller", move |ctx| {
        cloud_lb::run_with_provider(ctx, config, provider)
    });

    pod(&client, &ns, "web-1", "web", "drain-a", "10.244.1.1").await?;
    pod(&client, &ns, "web-2", "web", "drain-b", "10.244.2.1").await?;
    let mut svc = lb_service(&ns, "web", Some(class), &[("http", 80, "TCP", None)]);
    if let Some(s) = svc.spec.as_mut() {
        s.external_traffic_policy = Some("Local".into());
    }
    create(&client, &svc).await?;
    // The same pods behind the Cluster policy: every node, until one is cordoned.
    create(
        &client,
        &lb_service(&ns, "all", Some(class), &[("http", 80, "TCP", None)]),
    )
    .await?;
    let (tg, port) = target_group(&aws, &client, &ns, "web").await?;
    // Only the nodes holding a ready endpoint (upstream would register drain-c too).
    wait_targets(&aws, &tg, want(&["drain-a", "drain-b"], port)).await?;

    // A pod on drain-c: a target once Ready, not before.
    let mut b = PodBuilder::new(&ns, "web-3", &[("app", "web")]);
    b.node_name = Some("drain-c".into());
    b.ports = vec![(Some("http".into()), 8080, "TCP".into())];
    Api::<Pod>::namespaced(client.clone(), &ns)
        .create(&PostParams::default(), &b.build())
        .await?;
    set_pod_status(&client, &ns, "web-3", false, &["10.244.3.1"]).await?;
    wait_for("web-3 in a slice, not ready", T, || async {
        let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), &ns);
        let l = slices
            .list(&ListParams::default().labels("kubernetes.io/service-name=web"))
            .await
            .ok()?;
        l.items
            .iter()
            .flat_map(|s| s.endpoints.iter().flatten())
            .any(|e| e.node_name.as_deref() == Some("drain-c"))
            .then_some(())
    })
    .await?;
    // The slice showing says nothing of whether the cloud-lb controller has acted on it yet.
    wait_idle(&c.base.metrics, "cloud-lb").await?;
    assert_eq!(
        aws.targets(&tg).await,
        want(&["drain-a", "drain-b"], port),
        "a node whose only endpoint is not ready is no target"
    );
    set_pod_status(&client, &ns, "web-3", true, &["10.244.3.1"]).await?;
    wait_targets(&aws, &tg, want(&["drain-a", "drain-b", "drain-c"], port)).await?;

    // web-2, drain-b's last endpoint, is deleted; the finalizer keeps it terminating. drain-b
    // is deregistered while the pod is still there (and its endpoint still serving).
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    pods.delete("web-2", &DeleteParams::default()).await?;
    wait_targets(&aws, &tg, want(&["drain-a", "drain-c"], port)).await?;
    let held = pods
        .get_opt("web-2")
        .await?
        .ok_or_else(|| anyhow!("web-2 gone before its node was deregistered"))?;
    assert!(
        held.metadata.deletion_timestamp.is_some(),
        "web-2 is terminating"
    );
    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), &ns);
    let l = slices
        .list(&ListParams::default().labels("kubernetes.io/service-name=web"))
        .await?;
    let on_b: Vec<_> = l
        .items
        .iter()
        .flat_map(|s| s.endpoints.iter().flatten())
        .filter(|e| e.node_name.as_deref() == Some("drain-b"))
        .collect();
    assert!(
        on_b.iter()
            .all(|e| e.conditions.as_ref().and_then(|c| c.terminating) == Some(true)),
        "drain-b's endpoint is terminating, not gone: {on_b:?}"
    );

    // Cordoning drain-c (kubectl drain's first step) deregisters it although web-3 is ready,
    // for the Cluster policy too.
    let (all_tg, all_port) = target_group(&aws, &client, &ns, "all").await?;
    let every = ["drain-a", "drain-b", "drain-c"];
    wait_targets(&aws, &all_tg, want(&every, all_port)).await?;
    cordon(&client, "drain-c", true).await?;
    wait_targets(&aws, &tg, want(&["drain-a"], port)).await?;
    wait_targets(&aws, &all_tg, want(&["drain-a", "drain-b"], all_port)).await?;
    cordon(&client, "drain-c", false).await?;
    wait_targets(&aws, &tg, want(&["drain-a", "drain-c"], port)).await?;
    wait_targets(&aws, &all_tg, want(&every, all_port)).await?;

    // Every endpoint terminating: the nodes still serving them stay (nothing better is left).
    for p in ["web-1", "web-3"] {
        pods.delete(p, &DeleteParams::default()).await?;
    }
    wait_targets(&aws, &tg, want(&["drain-a", "drain-b", "drain-c"], port))
        .await
        .map_err(|e| anyhow!("no ready endpoint anywhere keeps the serving nodes: {e}"))?;

    for p in ["web-1", "web-2", "web-3"] {
        release(&client, &ns, p).await?;
        // No kubelet finishes the graceful deletion.
        let _ = pods
            .delete(p, &DeleteParams::default().grace_period(0))
            .await;
    }
    let services: Api<k8s_openapi::api::core::v1::Service> = Api::namespaced(client.clone(), &ns);
    for s in ["web", "all"] {
        services.delete(s, &DeleteParams::default()).await?;
    }
    wait_for("both Services deleted", T, || async {
        (get(&client, &ns, "web").await.is_none() && get(&client, &ns, "all").await.is_none())
            .then_some(())
    })
    .await?;
    Ok(())
}
