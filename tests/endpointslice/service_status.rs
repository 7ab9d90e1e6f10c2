//! The Service informer keeps status (the load-balancer controller reads it): a status-only
//! write must cost the EndpointSlice controller nothing, not even a reconcile.

use super::*;
use test_support::wait_stable;

/// `service_controller_manager_reconcile_total` of the EndpointSlice controller.
fn reconciles(r: &Running) -> Option<u64> {
    let text = r.metrics.encode();
    text.lines()
        .find(|l| {
            l.starts_with("service_controller_manager_reconcile_total{")
                && l.contains("controller=\"endpointslice\"")
        })
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|n| n.parse().ok())
}

async fn settled_reconciles(r: &Running) -> Result<u64> {
    wait_stable(
        "reconcile count settled",
        WAIT,
        Duration::from_millis(200),
        5,
        || async { reconciles(r) },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_only_service_updates_cost_no_reconcile() -> Result<()> {
    let e = env("es-status").await?;
    let c = start_slices(&e.client, &e.ns, EndpointSliceConfig::default());
    e.service(
        "web",
        basic_spec(serde_json::json!({"type": "LoadBalancer"})),
    )
    .await?;
    e.pod(0, "web", true, 8080).await?;
    let before = e
        .wait_slices("web", "one ready endpoint", |s| ready_count(s) == 1)
        .await?;
    let n0 = settled_reconciles(&c).await?;
    // What a load-balancer controller writes.
    let svcs: Api<Service> = Api::namespaced(e.client.clone(), &e.ns);
    let status =
        serde_json::json!({"status": {"loadBalancer": {"ingress": [{"ip": "192.0.2.10"}]}}});
    svcs.patch_status("web", &PatchParams::default(), &Patch::Merge(&status))
        .await?;
    // A later change the controller reconciles without writing (a selector-less Service):
    // once it has, the status update (earlier in the watch) has been seen too.
    e.service(
        "marker",
        serde_json::json!({"ports": [{"name": "http", "port": 80}]}),
    )
    .await?;
    wait_for("the marker reconciled", WAIT, || async {
        reconciles(&c).filter(|n| *n > n0)
    })
    .await?;
    let n1 = settled_reconciles(&c).await?;
    assert_eq!(n1, n0 + 1, "only the marker Service was reconciled");
    assert!(e.slices("marker").await?.is_empty());
    let after = e.slices("web").await?;
    assert_eq!(
        after
            .iter()
            .map(|s| s.metadata.resource_version.clone())
            .collect::<Vec<_>>(),
        before
            .iter()
            .map(|s| s.metadata.resource_version.clone())
            .collect::<Vec<_>>(),
        "no slice written"
    );
    Ok(())
}
