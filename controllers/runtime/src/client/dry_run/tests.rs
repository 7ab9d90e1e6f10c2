use super::*;
use serde_json::json;
use std::sync::Mutex as StdMutex;

#[test]
fn paths_name_resource_namespace_and_name() {
    let t = Target::parse("/apis/discovery.k8s.io/v1/namespaces/a/endpointslices/web-x");
    assert_eq!(t.resource, "endpointslices");
    assert_eq!(t.namespace, "a");
    assert_eq!(t.name.as_deref(), Some("web-x"));
    let t = Target::parse("/api/v1/namespaces/a/services/web/status");
    assert_eq!(t.resource, "services/status");
    assert_eq!(t.name.as_deref(), Some("web"));
    let t = Target::parse("/api/v1/namespaces/a/events");
    assert_eq!((t.resource.as_str(), t.name), ("events", None));
    let t = Target::parse("/apis/networking.k8s.io/v1/servicecidrs/kubernetes/status");
    assert_eq!(t.resource, "servicecidrs/status");
    assert_eq!(t.namespace, "");
    // A namespace itself is a cluster-scoped object.
    let t = Target::parse("/api/v1/namespaces/a");
    assert_eq!(
        (t.resource.as_str(), t.name.as_deref()),
        ("namespaces", Some("a"))
    );
}

#[test]
fn the_dry_run_parameter_is_added_once() {
    let u: Uri = "/api/v1/namespaces/a/services/web?fieldManager=x"
        .parse()
        .unwrap();
    let d = with_dry_run(&u);
    assert_eq!(
        d.to_string(),
        "/api/v1/namespaces/a/services/web?fieldManager=x&dryRun=All"
    );
    assert!(is_dry_run(&d));
    let u: Uri = "/api/v1/namespaces/a/services".parse().unwrap();
    assert_eq!(with_dry_run(&u).query(), Some("dryRun=All"));
}

#[test]
fn an_update_is_summarized_as_the_fields_it_changes() {
    let before = json!({"metadata": {"name": "s", "resourceVersion": "1", "labels": {
        "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io"}},
        "endpoints": [{"addresses": ["10.0.0.1"]}]});
    let after = json!({"metadata": {"name": "s", "resourceVersion": "2", "labels": {
        "endpointslice.kubernetes.io/managed-by": "ours"}},
        "endpoints": [{"addresses": ["10.0.0.1"]}]});
    let s = summarize(
        "update",
        "endpointslices",
        Some(&before),
        Some(&after),
        None,
    );
    assert_eq!(
        s,
        "metadata.labels[endpointslice.kubernetes.io/managed-by]: endpointslice-controller.k8s.io -> ours"
    );
    assert_eq!(
        summarize("patch", "services", Some(&before), Some(&before), None),
        "no change"
    );
    let grown = json!({"metadata": {"name": "s"}, "endpoints": [1, 2, 3]});
    let s = summarize(
        "update",
        "endpointslices",
        Some(&before),
        Some(&grown),
        None,
    );
    assert!(s.contains("endpoints: 1 items -> 3 items"), "{s}");
    assert!(s.contains("metadata.labels: "), "{s}");
}

#[test]
fn an_event_is_summarized_by_type_reason_and_note_and_keyed_by_its_object() {
    let sent = json!({"type": "Warning", "reason": "SyncLoadBalancerFailed", "note": "pool full",
        "regarding": {"kind": "Service", "namespace": "a", "name": "web"}});
    let t = Target::parse("/apis/events.k8s.io/v1/namespaces/a/events");
    assert_eq!(t.object(None, Some(&sent)), "Service a/web");
    assert_eq!(
        summarize("create", "events", None, None, Some(&sent)),
        "Warning SyncLoadBalancerFailed: pool full"
    );
}

#[test]
fn conditions_are_summarized_by_type_status_and_reason() {
    let before = json!({"status": {}});
    let after = json!({"status": {"conditions": [{"type": "EndpointsReady", "status": "False",
        "reason": "SelectorMatchesNothing", "lastTransitionTime": "2026-01-01T00:00:00Z"}]}});
    assert_eq!(
        summarize(
            "patch",
            "services/status",
            Some(&before),
            Some(&after),
            None
        ),
        "status.conditions: (none) -> [EndpointsReady=False (SelectorMatchesNothing)]"
    );
}

#[test]
fn long_summaries_are_clipped() {
    let before = json!({"a": (0..100).map(|i| (format!("k{i}"), json!(i))).collect::<serde_json::Map<_, _>>()});
    let after = json!({"a": (0..100).map(|i| (format!("k{i}"), json!(i + 1))).collect::<serde_json::Map<_, _>>()});
    let s = summarize("update", "x", Some(&before), Some(&after), None);
    assert!(s.len() <= MAX_CHANGE + 20, "{}", s.len());
    assert!(s.ends_with("more)"), "{s}");
}

/// A fake API server: remembers each request's method and URI, answers every one with `body`.
fn fake(body: Value) -> (kube::Client, Arc<StdMutex<Vec<String>>>) {
    let seen = Arc::new(StdMutex::new(vec![]));
    let s = seen.clone();
    let svc = tower::service_fn(move |req: Request<Body>| {
        s.lock()
            .unwrap()
            .push(format!("{} {}", req.method(), req.uri()));
        let b = serde_json::to_vec(&body).unwrap();
        async move { Ok::<_, std::convert::Infallible>(Response::new(Body::from(b))) }
    });
    (kube::Client::new(svc, "default"), seen)
}

#[tokio::test]
async fn writes_become_server_side_dry_runs_and_are_recorded_reads_pass() {
    let obj = json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web", "namespace": "a"}});
    let (inner, seen) = fake(obj.clone());
    let dry = DryRun::new();
    // Wrapped twice (the base client and a controller's): recorded once, by the outer one.
    let client = dry.client(dry.client(inner, "manager"), "cloud-lb");
    let api: kube::Api<k8s_openapi::api::core::v1::Service> = kube::Api::namespaced(client, "a");
    api.get("web").await.unwrap();
    let pp = kube::api::PatchParams::default();
    api.patch_status("web", &pp, &kube::api::Patch::Merge(json!({"status": {}})))
        .await
        .unwrap();
    api.delete("web", &Default::default()).await.unwrap();
    let seen = seen.lock().unwrap().clone();
    assert!(
        seen[0].starts_with("GET ") && !seen[0].contains("dryRun"),
        "{seen:?}"
    );
    let writes: Vec<&String> = seen.iter().filter(|s| !s.starts_with("GET ")).collect();
    assert_eq!(writes.len(), 2, "{seen:?}");
    assert!(writes.iter().all(|w| w.contains("dryRun=All")), "{seen:?}");
    let recs = dry.records();
    assert_eq!(recs.len(), 2, "{recs:?}");
    assert_eq!(
        (
            recs[0].controller.as_str(),
            recs[0].verb.as_str(),
            recs[0].resource.as_str(),
            recs[0].object.as_str()
        ),
        ("cloud-lb", "patch", "services/status", "a/web")
    );
    assert_eq!(recs[0].change, "no change");
    assert_eq!(
        (recs[1].verb.as_str(), recs[1].change.as_str()),
        ("delete", "delete")
    );
}

#[derive(Debug)]
struct Boom;
impl std::fmt::Display for Boom {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("boom")
    }
}
impl crate::ReconcileError for Boom {
    fn metric_label(&self) -> &'static str {
        "boom"
    }
}

/// Without this a failing or requeueing reconcile would plan the same writes again and again
/// (nothing it writes takes effect), spinning the CPU and flooding the plan.
#[tokio::test(start_paused = true)]
async fn in_a_dry_run_each_key_is_reconciled_once_per_change() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let cfg = kube::Config::new("http://127.0.0.1:9".parse().expect("uri"));
    let client = kube::Client::try_from(cfg).expect("client");
    let (gate, _tx) = crate::LeaderGate::fixed(true);
    let mut base = crate::ContextBase::new(client, gate);
    let dry = DryRun::new();
    base.dry_run = Some(dry.clone());
    let ctx = base.context("test", "test");
    let queue = crate::WorkQueue::new(crate::Backoff {
        base: std::time::Duration::from_millis(1),
        max: std::time::Duration::from_millis(1),
    });
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    let (wctx, wq) = (ctx.clone(), queue.clone());
    let w = tokio::spawn(async move {
        crate::run_workers(
            &wctx,
            wq,
            crate::WorkerConfig::default(),
            move |k: String| {
                let n = c.fetch_add(1, Ordering::SeqCst);
                async move {
                    match (k.as_str(), n % 2) {
                        ("fails", _) => Err(Boom),
                        _ => Ok(crate::Requeue::After(std::time::Duration::from_millis(1))),
                    }
                }
            },
        )
        .await
    });
    queue.add("fails".to_string());
    queue.add("again".to_string());
    tokio::time::sleep(std::time::Duration::from_secs(10)).await;
    assert_eq!(calls.load(Ordering::SeqCst), 2, "each key once");
    let a = dry.activity()["test"];
    assert!(a.started && a.queued == 0 && a.in_flight == 0, "{a:?}");
    assert_eq!(a.reconciled, 2);
    // A new change of a key reconciles it again, once.
    queue.add("again".to_string());
    tokio::time::sleep(std::time::Duration::from_secs(10)).await;
    assert_eq!(calls.load(Ordering::SeqCst), 3);
    ctx.shutdown.cancel();
    let _ = w.await;
}
