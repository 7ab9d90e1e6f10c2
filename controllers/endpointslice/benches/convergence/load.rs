//! Loads the objects of a [`Shape`] into the control plane: Nodes (Ready, in three zones),
//! Services, and pods bound to Nodes with a Ready status, created many at a time by an
//! unthrottled admin client so that loading the envelope takes minutes, not hours.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use anyhow::Result;
use futures::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Service};
use kube::Client;
use kube::api::{Api, PostParams};
use test_support::{NodeSpecBuilder, PodBuilder, create_node, create_pod, set_pod_status};

use crate::shape::Shape;

/// Requests in flight while loading (the API server's default mutating in-flight limit is 200).
const CONCURRENCY: usize = 128;

/// Runs `f(i)` for `i in 0..n` with [`CONCURRENCY`] in flight, failing on the first error and
/// printing progress every `every` items.
async fn for_each<F, Fut>(what: &str, n: usize, every: usize, f: F) -> Result<()>
where
    F: Fn(usize) -> Fut,
    Fut: Future<Output = Result<()>>,
{
    let done = AtomicUsize::new(0);
    let t = Instant::now();
    let mut results = futures::stream::iter(0..n)
        .map(|i| {
            let fut = f(i);
            let done = &done;
            async move {
                fut.await?;
                let d = done.fetch_add(1, Ordering::Relaxed) + 1;
                if d.is_multiple_of(every) {
                    eprintln!("  {what}: {d}/{n} in {:.0?}", t.elapsed());
                }
                Ok::<(), anyhow::Error>(())
            }
        })
        .buffer_unordered(CONCURRENCY);
    while let Some(r) = results.next().await {
        r?;
    }
    Ok(())
}

/// Creates namespace `ns` and everything in `shape`; returns every pod's readiness (all ready).
pub async fn load(client: &Client, ns: &str, shape: &Shape) -> Result<HashMap<String, bool>> {
    let nss: Api<Namespace> = Api::all(client.clone());
    nss.create(
        &PostParams::default(),
        &serde_json::from_value(serde_json::json!({"metadata": {"name": ns}}))?,
    )
    .await?;
    for_each("nodes", shape.nodes, 1000, |i| {
        let client = client.clone();
        async move {
            let zone = ["zone-a", "zone-b", "zone-c"][i % 3];
            create_node(
                &client,
                NodeSpecBuilder {
                    name: format!("node-{i}"),
                    zone: Some(zone.into()),
                    ..Default::default()
                },
            )
            .await?;
            Ok::<(), anyhow::Error>(())
        }
    })
    .await?;
    let svcs: Api<Service> = Api::namespaced(client.clone(), ns);
    let name_of = |i: usize| {
        if i < shape.small_services {
            format!("small-{i}")
        } else {
            format!("big-{}", i - shape.small_services)
        }
    };
    for_each("services", shape.services(), 2000, |i| {
        let svcs = svcs.clone();
        let name = name_of(i);
        async move {
            let s: Service = serde_json::from_value(serde_json::json!({
                "metadata": {"name": name},
                "spec": {"selector": {"app": name}, "ports": [{"port": 80, "targetPort": 8080}]},
            }))?;
            svcs.create(&PostParams::default(), &s).await?;
            Ok::<(), anyhow::Error>(())
        }
    })
    .await?;
    // A pod counts once it is bound to a Node and has an IP and a Ready condition; the API
    // server resets the status of a created pod, so that takes a second request.
    for_each("pods", shape.total_pods(), 10_000, |i| {
        let client = client.clone();
        let name = shape.pod_name(i);
        let app = shape.service_of(i);
        let node = shape.node_of(i);
        let ip = shape.pod_ip(i);
        async move {
            let mut b = PodBuilder::new(ns, &name, &[("app", app.as_str())]);
            b.node_name = Some(node);
            create_pod(&client, &b).await?;
            set_pod_status(&client, ns, &name, true, &[ip.as_str()]).await?;
            Ok::<(), anyhow::Error>(())
        }
    })
    .await?;
    Ok((0..shape.total_pods())
        .map(|i| (shape.pod_name(i), true))
        .collect())
}
