//! Terminating fallback (KEP-1669, kube-proxy's `CategorizeEndpoints`): kube-proxy sends traffic
//! to ready endpoints only, but when a traffic policy has none it falls back to the endpoints
//! that are serving and terminating, independently for Cluster (all endpoints) and Local (the
//! node's own endpoints). A pod is made terminating but serving by deleting its object with a
//! long grace period: with no kubelet to finish the deletion it stays, Ready, with a
//! `deletionTimestamp`, and our slices carry it as `ready: false, serving: true,
//! terminating: true`.

use std::time::Instant;

use anyhow::Result;
use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kube::api::DeleteParams;
use serde_json::json;
use test_support::set_pod_status;

use crate::cluster::{self, web_spec};
use crate::scenarios::{Row, Setup, wait_answers, wait_silent};

/// Deletes pod `name` with a grace period no one will wait out: it stays terminating.
async fn start_terminating(c: &kube::Client, ns: &str, name: &str) -> Result<()> {
    let dp = DeleteParams {
        grace_period_seconds: Some(3600),
        ..Default::default()
    };
    Api::<Pod>::namespaced(c.clone(), ns)
        .delete(name, &dp)
        .await?;
    Ok(())
}

/// The scenario on pods c (node 1) and d (node 2), labelled `app: term`, behind a NodePort
/// Service with `externalTrafficPolicy: Local` (its ClusterIP uses the Cluster policy). Rows:
/// - `terminating-prefer-ready`: d terminating: the ClusterIP goes to c only (ready ones win),
///   while node 2's NodePort keeps using d (its only local endpoint, serving-terminating);
/// - `terminating-fallback`: c terminating too: the ClusterIP falls back to both;
/// - `terminating-not-serving`: d's Ready goes false (serving false): it gets no traffic,
///   node 2's NodePort drops traffic, and with c not serving either the ClusterIP is silent.
pub async fn scenario(s: &Setup, rows: &mut Vec<Row>) -> Result<()> {
    let (c, ns) = (&s.client, s.ns.as_str());
    let (pod_c, pod_d) = (&s.pods[2], &s.pods[3]);
    let svc = cluster::service(
        c,
        ns,
        "term",
        web_spec(
            "NodePort",
            &[("app", "term")],
            json!({"externalTrafficPolicy": "Local"}),
        ),
    )
    .await?;
    let vip = format!("{}:80", cluster::cluster_ip(&svc)?);
    let n2 = format!("10.0.0.12:{}", cluster::node_port(&svc)?);
    wait_answers(&s.net, &vip, &["pod-c", "pod-d"]).await?;
    wait_answers(&s.net, &n2, &["pod-d"]).await?;

    let t = Instant::now();
    start_terminating(c, ns, &pod_d.name).await?;
    let r = async {
        wait_answers(&s.net, &vip, &["pod-c"]).await?;
        wait_answers(&s.net, &n2, &["pod-d"]).await?;
        Ok(t.elapsed())
    };
    rows.push(Row {
        scenario: "terminating-prefer-ready",
        result: r.await,
    });

    let t = Instant::now();
    start_terminating(c, ns, &pod_c.name).await?;
    rows.push(Row {
        scenario: "terminating-fallback",
        result: wait_answers(&s.net, &vip, &["pod-c", "pod-d"])
            .await
            .map(|_| t.elapsed()),
    });

    let t = Instant::now();
    set_pod_status(c, ns, &pod_d.name, false, &pod_d.ips()).await?;
    let r = async {
        wait_answers(&s.net, &vip, &["pod-c"]).await?;
        wait_silent(&s.net, &n2).await?;
        set_pod_status(c, ns, &pod_c.name, false, &pod_c.ips()).await?;
        wait_silent(&s.net, &vip).await?;
        Ok(t.elapsed())
    };
    rows.push(Row {
        scenario: "terminating-not-serving",
        result: r.await,
    });

    // Finish the deletions (no kubelet will).
    let now = DeleteParams {
        grace_period_seconds: Some(0),
        ..Default::default()
    };
    let pods = Api::<Pod>::namespaced(c.clone(), ns);
    for p in [pod_c, pod_d] {
        pods.delete(&p.name, &now).await?;
    }
    Ok(())
}
