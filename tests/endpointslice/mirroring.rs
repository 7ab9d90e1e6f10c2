//! The mirroring controller: selector-less Services' Endpoints mirrored to slices, and the
//! shared writer's behaviours for mirrored slices.

use endpointslice::metrics::SliceMetrics;
use endpointslice::slice_store::Slices;
use endpointslice::writer::SliceWrites;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use scm_runtime::ObjectKey;
use test_support::apiproxy::{Action, ApiProxy, Match};

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mirroring_of_selectorless_services() -> Result<()> {
    let e = env("es-mirror").await?;
    let _m = start_mirroring(&e.client, &e.ns);
    e.service(
        "ext",
        serde_json::json!({"ports": [{"name": "http", "port": 80}]}),
    )
    .await?;
    let api: Api<Endpoints> = Api::namespaced(e.client.clone(), &e.ns);
    let ep: Endpoints = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "ext", "labels": {"team": "a"}},
        "subsets": [{"addresses": [{"ip": "192.0.2.1"}, {"ip": "192.0.2.2"}], "notReadyAddresses": [{"ip": "192.0.2.3"}],
                     "ports": [{"name": "http", "port": 8080}]}],
    }))?;
    api.create(&PostParams::default(), &ep).await?;
    let s = wait_for("mirrored slice", WAIT, || {
        let f = e.slices_by("ext", MIRRORING_CONTROLLER_NAME);
        async move { f.await.ok().filter(|s| total_endpoints(s) == 3) }
    })
    .await?;
    assert_eq!(s.len(), 1);
    assert_eq!(
        s[0].metadata
            .labels
            .as_ref()
            .and_then(|l| l.get("team"))
            .map(String::as_str),
        Some("a")
    );
    let not_ready = s[0]
        .endpoints
        .iter()
        .flatten()
        .filter(|x| x.conditions.as_ref().and_then(|c| c.ready) == Some(false))
        .count();
    assert_eq!(not_ready, 1);
    assert_eq!(s[0].ports.as_ref().and_then(|p| p[0].port), Some(8080));
    // An update to the Endpoints is mirrored.
    let patch = serde_json::json!({"subsets": [{"addresses": [{"ip": "192.0.2.9"}], "ports": [{"name": "http", "port": 8080}]}]});
    api.patch("ext", &PatchParams::default(), &Patch::Merge(&patch))
        .await?;
    wait_for("mirrored update", WAIT, || {
        let f = e.slices_by("ext", MIRRORING_CONTROLLER_NAME);
        async move {
            f.await.ok().filter(|s| {
                s.len() == 1
                    && s[0].endpoints.as_ref().is_some_and(|x| {
                        x.len() == 1 && x[0].addresses == vec!["192.0.2.9".to_string()]
                    })
            })
        }
    })
    .await?;
    // skip-mirror removes the mirrored slices.
    let patch = serde_json::json!({"metadata": {"labels": {LABEL_SKIP_MIRROR: "true"}}});
    api.patch("ext", &PatchParams::default(), &Patch::Merge(&patch))
        .await?;
    wait_for("mirrored slices removed", WAIT, || {
        let f = e.slices_by("ext", MIRRORING_CONTROLLER_NAME);
        async move { f.await.ok().filter(|s| s.is_empty()) }
    })
    .await?;
    Ok(())
}

/// Creates the selector-less Service `ext` and its hand-made Endpoints (two addresses).
async fn selectorless_service(e: &Env) -> Result<()> {
    e.service(
        "ext",
        serde_json::json!({"ports": [{"name": "http", "port": 80}]}),
    )
    .await?;
    let api: Api<Endpoints> = Api::namespaced(e.client.clone(), &e.ns);
    let ep: Endpoints = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "ext"},
        "subsets": [{"addresses": [{"ip": "192.0.2.1"}, {"ip": "192.0.2.2"}],
                     "ports": [{"name": "http", "port": 8080}]}],
    }))?;
    api.create(&PostParams::default(), &ep).await?;
    Ok(())
}

/// A namespace being terminated (held open by an object with a finalizer) that still holds a
/// selector-less Service and its Endpoints: the API server refuses the mirrored slice's
/// create with 403, and the sync must end quietly instead of failing and retrying forever.
/// Failed before the shared writer: mirroring returned the 403 as an error, so the key was
/// retried with backoff and never synced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mirroring_in_a_terminating_namespace_is_quiet() -> Result<()> {
    let e = env("es-mirror-term").await?;
    let cms: Api<ConfigMap> = Api::namespaced(e.client.clone(), &e.ns);
    let hold: ConfigMap = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "hold", "finalizers": ["scm-test.k8s.io/hold"]},
    }))?;
    cms.create(&PostParams::default(), &hold).await?;
    selectorless_service(&e).await?;
    let nss: Api<Namespace> = Api::all(e.client.clone());
    nss.delete(&e.ns, &DeleteParams::default()).await?;
    wait_for("namespace terminating", WAIT, || {
        let nss = nss.clone();
        let ns = e.ns.clone();
        async move {
            let n = nss.get_opt(&ns).await.ok().flatten()?;
            (n.status?.phase.as_deref() == Some("Terminating")).then_some(())
        }
    })
    .await?;
    let m = start_mirroring(&e.client, &e.ns);
    let text = wait_for("the terminating namespace's Endpoints synced", WAIT, || {
        let text = m.metrics.encode();
        async move {
            text.contains("endpoint_slice_mirroring_controller_syncs_total{result=\"success\"}")
                .then_some(text)
        }
    })
    .await?;
    assert!(
        !text.contains("service_controller_manager_reconcile_errors_total{"),
        "no failed reconciles expected: {text}"
    );
    let retries: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("workqueue_retries_total{") && !l.ends_with(" 0"))
        .collect();
    assert!(retries.is_empty(), "no retries expected: {text}");
    assert!(
        e.slices_by("ext", MIRRORING_CONTROLLER_NAME)
            .await?
            .is_empty()
    );
    // Let the namespace go.
    let release = serde_json::json!({"metadata": {"finalizers": null}});
    cms.patch("hold", &PatchParams::default(), &Patch::Merge(&release))
        .await?;
    Ok(())
}

/// A mirrored slice deleted and recreated under the same name by someone else is not deleted
/// by a delete planned from the old one: the shared writer (mirroring's writer since it
/// replaced mirroring's own, which deleted by name alone) sends the uid it read as a
/// precondition, so the stale delete is a conflict and the new slice stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mirrored_slice_recreated_under_its_name_survives_a_stale_delete() -> Result<()> {
    let e = env("es-mirror-uid").await?;
    let m = start_mirroring(&e.client, &e.ns);
    selectorless_service(&e).await?;
    let old = wait_for("mirrored slice", WAIT, || {
        let f = e.slices_by("ext", MIRRORING_CONTROLLER_NAME);
        async move { f.await.ok().filter(|s| total_endpoints(s) == 2) }
    })
    .await?
    .remove(0);
    // Stopped, not just told to stop: a reconcile still in flight could otherwise touch the
    // slice this test deletes and recreates (CI saw the slice gone under the test once).
    m.stop().await;
    let name = old.metadata.name.clone().unwrap_or_default();
    let api = e.slices_api();
    api.delete(&name, &DeleteParams::default()).await?;
    let mut again = old.clone();
    again.metadata = ObjectMeta {
        name: Some(name.clone()),
        labels: old.metadata.labels.clone(),
        ..Default::default()
    };
    let again = wait_for("slice recreated under the same name", WAIT, || {
        let (api, again) = (api.clone(), again.clone());
        async move { api.create(&PostParams::default(), &again).await.ok() }
    })
    .await?;
    assert_ne!(again.metadata.uid, old.metadata.uid);
    let slices = Slices::new(vec![MIRRORING_CONTROLLER_NAME]);
    let metrics = SliceMetrics::register(&Metrics::new(), "test_mirroring", "test");
    let key = ObjectKey::new(&e.ns, "ext");
    let stale = SliceWrites {
        delete: std::slice::from_ref(&old),
        ..Default::default()
    };
    let r = slices.write(&e.client, &key, stale, false, &metrics).await;
    assert!(
        matches!(r, Err(endpointslice::Error::Kube(kube::Error::Api(ref s))) if s.code == 409),
        "{r:?}"
    );
    let now = api.get(&name).await?;
    assert_eq!(now.metadata.uid, again.metadata.uid, "the new slice stays");
    // The same delete planned from what is there now goes through, and NotFound after it
    // counts as done.
    let current = SliceWrites {
        delete: std::slice::from_ref(&now),
        ..Default::default()
    };
    slices
        .write(&e.client, &key, current, false, &metrics)
        .await?;
    assert!(api.get_opt(&name).await?.is_none());
    slices
        .write(&e.client, &key, current, false, &metrics)
        .await?;
    Ok(())
}

/// Issue 12 defect 1, for mirroring: a mirrored slice deleted while the slice watch was down
/// (every slice request refused, then a `410 Gone` forcing a relist) is mirrored again after
/// the relist. Before the relist reconciled the generation tracker, the tracker kept the
/// deleted slice, every sync of the Endpoints failed as stale and it never synced again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mirrored_slice_deleted_while_the_watch_was_down_is_mirrored_again() -> Result<()> {
    let e = env("es-mirror-relist").await?;
    let proxy = ApiProxy::start(e.client.clone()).await?;
    let via_proxy = Client::try_from(proxy.config()?)?;
    let _m = start_mirroring(&via_proxy, &e.ns);
    selectorless_service(&e).await?;
    let first = wait_for("mirrored slice", WAIT, || {
        let f = e.slices_by("ext", MIRRORING_CONTROLLER_NAME);
        async move { f.await.ok().filter(|s| total_endpoints(s) == 2) }
    })
    .await?
    .remove(0);
    // The slice watch goes down: every slice request is refused until the relist.
    let down = Action::Status {
        code: 503,
        retry_after: None,
    };
    let all = Match {
        watch: None,
        ..Match::resource("endpointslices")
    };
    proxy.fail(all, down, u32::MAX);
    proxy.end_watches("endpointslices");
    let before = proxy.injected();
    wait_for("a refused re-watch", WAIT, || async {
        (proxy.injected() > before).then_some(())
    })
    .await?;
    let name = first.metadata.name.clone().unwrap_or_default();
    e.slices_api()
        .delete(&name, &DeleteParams::default())
        .await?;
    proxy.clear_faults();
    proxy.fail(Match::watches("endpointslices"), Action::Gone, 1);
    wait_for("the Endpoints mirrored again", WAIT, || {
        let f = e.slices_by("ext", MIRRORING_CONTROLLER_NAME);
        let first_uid = first.metadata.uid.clone();
        async move {
            f.await
                .ok()
                .filter(|s| s.len() == 1 && s[0].metadata.uid != first_uid)
                .filter(|s| total_endpoints(s) == 2)
        }
    })
    .await?;
    Ok(())
}
