//! The writer against a recording double: the exact calls a plan produces, and what the
//! tracker and cache hold after each kind of answer.

use std::collections::VecDeque;
use std::sync::Mutex;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::core::Status;
use scm_runtime::Metrics;

use super::*;
use crate::common::{LABEL_MANAGED_BY, LABEL_SERVICE_NAME, MIRRORING_CONTROLLER_NAME};

/// Records every call; answers from a script (default: success, generation 1).
#[derive(Default)]
struct Recorder {
    calls: Mutex<Vec<String>>,
    // The token-bucket class each call was made in (`with_priority`).
    classes: Mutex<Vec<scm_runtime::Priority>>,
    // The change each call said it carries (`with_class`), in seconds since the epoch.
    ages: Mutex<Vec<Option<u64>>>,
    answers: Mutex<VecDeque<Option<kube::Error>>>,
}

impl Recorder {
    fn answer(&self) -> Result<(), kube::Error> {
        let class = scm_runtime::client::current_class();
        self.classes.lock().unwrap().push(class.priority);
        let age = class.since.map(|t| {
            t.duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs()
        });
        self.ages.lock().unwrap().push(age);
        match self.answers.lock().unwrap().pop_front().flatten() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
    fn calls(&self) -> Vec<String> {
        self.calls.lock().unwrap().clone()
    }
    fn script(&self, answers: Vec<Option<kube::Error>>) {
        *self.answers.lock().unwrap() = answers.into();
    }
}

fn echo(s: &EndpointSlice, uid: &str) -> EndpointSlice {
    let mut out = s.clone();
    if out.metadata.name.is_none() {
        out.metadata.name = s.metadata.generate_name.clone().map(|g| format!("{g}x"));
    }
    out.metadata.uid.get_or_insert_with(|| uid.to_string());
    out.metadata.generation = Some(s.metadata.generation.unwrap_or(0) + 1);
    out
}

impl SliceApi for Recorder {
    async fn create(&self, ns: &str, s: &EndpointSlice) -> Result<EndpointSlice, kube::Error> {
        let g = s.metadata.generate_name.clone().unwrap_or_default();
        self.calls.lock().unwrap().push(format!("create {ns}/{g}"));
        self.answer().map(|_| echo(s, "new-uid"))
    }
    async fn replace(&self, ns: &str, s: &EndpointSlice) -> Result<EndpointSlice, kube::Error> {
        let n = s.metadata.name.clone().unwrap_or_default();
        let rv = s.metadata.resource_version.clone().unwrap_or_default();
        self.calls
            .lock()
            .unwrap()
            .push(format!("replace {ns}/{n} rv={rv}"));
        self.answer().map(|_| echo(s, ""))
    }
    async fn delete(&self, ns: &str, name: &str, uid: Option<String>) -> Result<(), kube::Error> {
        let uid = uid.unwrap_or_default();
        self.calls
            .lock()
            .unwrap()
            .push(format!("delete {ns}/{name} uid={uid}"));
        self.answer()
    }
}

fn api_error(code: u16, message: &str) -> Option<kube::Error> {
    Some(kube::Error::Api(
        Status::failure(message, "").with_code(code).boxed(),
    ))
}

fn slice(name: Option<&str>, uid: &str, generation: i64) -> EndpointSlice {
    EndpointSlice {
        metadata: ObjectMeta {
            namespace: Some("ns".into()),
            name: name.map(String::from),
            generate_name: Some("svc-".into()),
            uid: (!uid.is_empty()).then(|| uid.to_string()),
            generation: Some(generation),
            resource_version: Some("7".into()),
            labels: Some(
                [
                    (LABEL_SERVICE_NAME.to_string(), "svc".to_string()),
                    (
                        LABEL_MANAGED_BY.to_string(),
                        MIRRORING_CONTROLLER_NAME.to_string(),
                    ),
                ]
                .into(),
            ),
            ..Default::default()
        },
        address_type: "IPv4".into(),
        ..Default::default()
    }
}

fn fixture() -> (Slices, SliceMetrics, ObjectKey) {
    let metrics = SliceMetrics::register(&Metrics::new(), "test", "test");
    (
        Slices::new(vec![MIRRORING_CONTROLLER_NAME]),
        metrics,
        ObjectKey::new("ns", "svc"),
    )
}

fn names(s: &Slices, key: &ObjectKey) -> Vec<String> {
    s.cache()
        .of(key)
        .filter_map(|s| s.metadata.name.clone())
        .collect()
}

#[tokio::test]
async fn creates_then_updates_then_uid_preconditioned_deletes() {
    let (s, m, key) = fixture();
    let api = Recorder::default();
    let (c, u, d) = (
        [slice(None, "", 0)],
        [slice(Some("svc-a"), "ua", 3)],
        [slice(Some("svc-b"), "ub", 1)],
    );
    let w = SliceWrites {
        create: &c,
        update: &u,
        delete: &d,
        before: None,
        ..Default::default()
    };
    assert_eq!(
        s.write(&api, &key, w, true, &m).await.unwrap(),
        Written::All
    );
    assert_eq!(
        api.calls(),
        vec![
            "create ns/svc-",
            "replace ns/svc-a rv=7",
            "delete ns/svc-b uid=ub"
        ]
    );
    // Both written slices are cached at the generation the server answered, and the tracker
    // takes the cache as current; the deleted one is expected gone.
    assert_eq!(names(&s, &key), vec!["svc-a", "svc-x"]);
    assert!(!s.tracker.stale(&key, &s.current(&key)));
    assert!(!s.tracker.should_sync(&key, &echo(&u[0], "")));
    assert!(s.tracker.handle_deletion(&key, &d[0]));
}

#[tokio::test]
async fn no_creates_while_the_owner_is_deleted() {
    let (s, m, key) = fixture();
    let api = Recorder::default();
    let (c, d) = ([slice(None, "", 0)], [slice(Some("svc-b"), "ub", 1)]);
    let w = SliceWrites {
        create: &c,
        delete: &d,
        ..Default::default()
    };
    s.write(&api, &key, w, false, &m).await.unwrap();
    assert_eq!(api.calls(), vec!["delete ns/svc-b uid=ub"]);
}

#[tokio::test]
async fn a_terminating_namespace_ends_the_plan_quietly() {
    let (s, m, key) = fixture();
    let api = Recorder::default();
    let terminating = || {
        api_error(
            403,
            "endpointslices \"svc-\" is forbidden: unable to create new content in namespace ns because it is being terminated",
        )
    };
    // Any create in flight meanwhile is refused too.
    api.script(vec![terminating(), terminating()]);
    let (c, u) = (
        [slice(None, "", 0), slice(None, "", 0)],
        [slice(Some("svc-a"), "ua", 3)],
    );
    let w = SliceWrites {
        create: &c,
        update: &u,
        ..Default::default()
    };
    assert_eq!(
        s.write(&api, &key, w, true, &m).await.unwrap(),
        Written::NamespaceTerminating
    );
    let calls = api.calls();
    assert!(
        !calls.is_empty() && calls.iter().all(|c| c == "create ns/svc-"),
        "only creates, no update: {calls:?}"
    );
    let none: &[EndpointSlice] = &[];
    assert!(!s.tracker.stale(&key, none), "nothing recorded");
    // Any other 403 is an error.
    api.script(vec![api_error(403, "forbidden: RBAC")]);
    assert!(s.write(&api, &key, w, true, &m).await.is_err());
}

#[tokio::test]
async fn not_found_on_delete_is_done_and_a_uid_conflict_is_not() {
    let (s, m, key) = fixture();
    let api = Recorder::default();
    let d = [slice(Some("svc-b"), "ub", 1)];
    s.cache().write_through(&key, d[0].clone());
    api.script(vec![api_error(404, "not found")]);
    let w = SliceWrites {
        delete: &d,
        ..Default::default()
    };
    assert_eq!(
        s.write(&api, &key, w, true, &m).await.unwrap(),
        Written::All
    );
    assert!(names(&s, &key).is_empty());
    assert!(s.tracker.handle_deletion(&key, &d[0]));
    // Someone deleted and recreated the slice under the same name: the precondition fails
    // (409), the slice is not deleted, and nothing is recorded as expected gone.
    s.cache().write_through(&key, d[0].clone());
    api.script(vec![api_error(
        409,
        "Precondition failed: UID in precondition: ub, UID in object meta: other",
    )]);
    let err = s.write(&api, &key, w, true, &m).await.unwrap_err();
    assert!(matches!(err, Error::Kube(kube::Error::Api(ref st)) if st.code == 409));
    assert_eq!(names(&s, &key), vec!["svc-b"]);
    assert!(!s.tracker.handle_deletion(&key, &d[0]));
}

fn with_endpoints(mut s: EndpointSlice, eps: &[(&str, bool)]) -> EndpointSlice {
    use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions};
    s.endpoints = Some(
        eps.iter()
            .map(|(ip, ready)| Endpoint {
                addresses: vec![ip.to_string()],
                conditions: Some(EndpointConditions {
                    ready: Some(*ready),
                    ..Default::default()
                }),
                ..Default::default()
            })
            .collect(),
    );
    s
}

/// Under a saturated budget the write that stops traffic to a pod that is no longer ready
/// must not wait behind writes that only add capacity: it is made first and in the urgent
/// class; an endpoint that only moves to another slice is not urgent.
#[tokio::test]
async fn updates_that_drop_a_ready_endpoint_go_first_in_the_urgent_class() {
    use scm_runtime::Priority::{Ordinary, Urgent};
    let (slices, metrics, key) = fixture();
    let api = Recorder::default();
    let a = with_endpoints(slice(Some("a"), "ua", 1), &[("10.0.0.1", true)]);
    let b = with_endpoints(slice(Some("b"), "ub", 1), &[("10.0.0.2", true)]);
    let c = with_endpoints(slice(Some("c"), "uc", 1), &[("10.0.0.3", true)]);
    let before = [&a, &b, &c];
    // a gains an endpoint, b loses its ready one, c's endpoint moves to the new slice.
    let a2 = with_endpoints(a.clone(), &[("10.0.0.1", true), ("10.0.0.4", true)]);
    let b2 = with_endpoints(b.clone(), &[("10.0.0.2", false)]);
    let new = with_endpoints(slice(None, "", 0), &[("10.0.0.3", true)]);
    let w = SliceWrites {
        create: std::slice::from_ref(&new),
        update: &[a2, b2],
        delete: std::slice::from_ref(&c),
        before: Some(&before),
        ..Default::default()
    };
    slices.write(&api, &key, w, true, &metrics).await.unwrap();
    assert_eq!(
        api.calls(),
        [
            "create ns/svc-",
            "replace ns/b rv=7",
            "replace ns/a rv=7",
            "delete ns/c uid=uc"
        ]
    );
    assert_eq!(
        *api.classes.lock().unwrap(),
        [Ordinary, Urgent, Ordinary, Ordinary]
    );

    // The first slice of a Service is urgent; with no known prior state, nothing is.
    let api = Recorder::default();
    let w = SliceWrites {
        create: std::slice::from_ref(&new),
        before: Some(&[]),
        ..Default::default()
    };
    slices.write(&api, &key, w, true, &metrics).await.unwrap();
    let d = with_endpoints(slice(Some("d"), "ud", 1), &[("10.0.0.9", true)]);
    let w = SliceWrites {
        delete: std::slice::from_ref(&d),
        ..Default::default()
    };
    slices.write(&api, &key, w, true, &metrics).await.unwrap();
    assert_eq!(*api.classes.lock().unwrap(), [Urgent, Ordinary]);
}

/// With `defer_ordinary`, a plan that both stops traffic to a pod and adds capacity makes only
/// the first part and says so; a plan with nothing urgent, or only urgent writes, is made whole.
#[tokio::test]
async fn deferring_makes_only_the_urgent_writes_of_a_mixed_plan() {
    let (slices, metrics, key) = fixture();
    let a = with_endpoints(slice(Some("a"), "ua", 1), &[("10.0.0.1", true)]);
    let b = with_endpoints(slice(Some("b"), "ub", 1), &[("10.0.0.2", true)]);
    let gone = with_endpoints(slice(Some("g"), "ug", 1), &[("10.0.0.5", true)]);
    let before = [&a, &b, &gone];
    let a2 = with_endpoints(a.clone(), &[("10.0.0.1", true), ("10.0.0.4", true)]);
    let b2 = with_endpoints(b.clone(), &[("10.0.0.2", false)]);
    let new = with_endpoints(slice(None, "", 0), &[("10.0.0.3", true)]);
    let updates = [a2.clone(), b2.clone()];
    let mixed = SliceWrites {
        create: std::slice::from_ref(&new),
        update: &updates,
        delete: std::slice::from_ref(&gone),
        before: Some(&before),
        defer_ordinary: true,
        ..Default::default()
    };
    let api = Recorder::default();
    let got = slices
        .write(&api, &key, mixed, true, &metrics)
        .await
        .unwrap();
    assert_eq!(got, Written::Deferred);
    assert_eq!(api.calls(), ["replace ns/b rv=7", "delete ns/g uid=ug"]);

    // Nothing urgent: the whole plan.
    let api = Recorder::default();
    let ordinary = SliceWrites {
        create: std::slice::from_ref(&new),
        update: std::slice::from_ref(&a2),
        before: Some(&before),
        defer_ordinary: true,
        ..Default::default()
    };
    let got = slices
        .write(&api, &key, ordinary, true, &metrics)
        .await
        .unwrap();
    assert_eq!(got, Written::All);
    assert_eq!(api.calls(), ["create ns/svc-", "replace ns/a rv=7"]);

    // Only urgent writes: the whole plan, nothing left.
    let api = Recorder::default();
    let only_urgent = SliceWrites {
        update: std::slice::from_ref(&b2),
        before: Some(&before),
        defer_ordinary: true,
        ..Default::default()
    };
    let got = slices
        .write(&api, &key, only_urgent, true, &metrics)
        .await
        .unwrap();
    assert_eq!(got, Written::All);
    assert_eq!(api.calls(), ["replace ns/b rv=7"]);
}

/// Writes `w` (creates allowed) against a fresh recorder: how it ended, and the calls made
/// (joined by ", ").
async fn run(
    slices: &Slices,
    key: &ObjectKey,
    metrics: &SliceMetrics,
    w: SliceWrites<'_>,
) -> (Written, String) {
    let api = Recorder::default();
    let got = slices.write(&api, key, w, true, metrics).await.unwrap();
    (got, api.calls().join(", "))
}

/// Once the owner has changed again, the writer starts no further call and stops when those
/// in flight are done, but only where stopping leaves every endpoint the plan keeps ready in
/// some slice; slices already written in the pass go after the others.
#[tokio::test]
async fn an_interrupt_stops_between_calls_where_no_kept_endpoint_is_missing() {
    let (slices, metrics, key) = fixture();
    // More slices than calls in flight at once, each gaining an endpoint.
    let n = MAX_IN_FLIGHT + 2;
    let names: Vec<String> = (0..n).map(|i| format!("s{i:02}")).collect();
    let olds: Vec<EndpointSlice> = (0..n)
        .map(|i| {
            let ip = format!("10.0.1.{i}");
            with_endpoints(slice(Some(&names[i]), "u", 1), &[(ip.as_str(), true)])
        })
        .collect();
    let news: Vec<EndpointSlice> = (0..n)
        .map(|i| {
            let (a, b) = (format!("10.0.1.{i}"), format!("10.0.2.{i}"));
            with_endpoints(olds[i].clone(), &[(a.as_str(), true), (b.as_str(), true)])
        })
        .collect();
    let before: Vec<&EndpointSlice> = olds.iter().collect();
    let changed = || true;
    let w = SliceWrites {
        update: &news,
        before: Some(&before),
        interrupt: Some(&changed),
        ..Default::default()
    };
    let (got, calls) = run(&slices, &key, &metrics, w).await;
    let first: Vec<String> = names[..MAX_IN_FLIGHT].to_vec();
    let Written::Interrupted(mut stopped_after) = got else {
        panic!("{got:?}")
    };
    stopped_after.sort();
    assert_eq!(stopped_after, first);
    assert_eq!(calls.matches("replace").count(), MAX_IN_FLIGHT);

    // Next plan of the pass: the slices not written yet go first.
    let pass = first.into_iter().collect();
    let w = SliceWrites {
        written: Some(&pass),
        ..w
    };
    let (got, calls) = run(&slices, &key, &metrics, w).await;
    let next = format!("replace ns/{} rv=7", names[MAX_IN_FLIGHT]);
    assert!(calls.starts_with(&next), "{calls}");
    assert!(matches!(got, Written::Interrupted(_)), "{got:?}");

    // Unchanged owner: the whole plan.
    let unchanged = || false;
    let w = SliceWrites {
        interrupt: Some(&unchanged),
        ..w
    };
    let (got, calls) = run(&slices, &key, &metrics, w).await;
    assert_eq!((got, calls.matches("replace").count()), (Written::All, n));

    // 10.0.0.2 moves from b to a: b's update waits until a's (and c's) are written, and the
    // writer may stop before it (nothing kept is missing then), never after it alone.
    let a = with_endpoints(slice(Some("a"), "ua", 1), &[("10.0.0.1", true)]);
    let b = with_endpoints(slice(Some("b"), "ub", 1), &[("10.0.0.2", true)]);
    let c = with_endpoints(slice(Some("c"), "uc", 1), &[("10.0.0.5", true)]);
    let b3 = with_endpoints(b.clone(), &[("10.0.0.4", true)]);
    let a3 = with_endpoints(a.clone(), &[("10.0.0.1", true), ("10.0.0.2", true)]);
    let c3 = with_endpoints(c.clone(), &[("10.0.0.5", true), ("10.0.0.6", true)]);
    let before = [&a, &b, &c];
    let updates = [b3, a3, c3];
    let w = SliceWrites {
        update: &updates,
        before: Some(&before),
        interrupt: Some(&changed),
        ..Default::default()
    };
    let (got, calls) = run(&slices, &key, &metrics, w).await;
    assert!(calls.starts_with("replace ns/a rv=7"), "{calls}");
    assert!(!calls.contains("ns/b"), "{calls}");
    assert!(matches!(got, Written::Interrupted(_)), "{got:?}");
    let w = SliceWrites {
        interrupt: Some(&unchanged),
        ..w
    };
    let (got, calls) = run(&slices, &key, &metrics, w).await;
    assert_eq!(got, Written::All);
    assert!(calls.ends_with("replace ns/b rv=7"), "{calls}");

    // With no known prior state nothing can be judged: never interrupted.
    let w = SliceWrites {
        before: None,
        interrupt: Some(&changed),
        ..w
    };
    let (got, calls) = run(&slices, &key, &metrics, w).await;
    assert_eq!((got, calls.matches("replace").count()), (Written::All, 3));
}

/// Within a class, an update carrying an older change goes first: a slice of a large Service
/// whose pod changed long ago is not left behind slices that keep changing.
#[tokio::test]
async fn updates_carrying_older_changes_go_first() {
    use k8s_openapi::api::core::v1::ObjectReference;
    let (slices, metrics, key) = fixture();
    let with_pod = |mut s: EndpointSlice, pods: &[&str]| {
        for (e, p) in s.endpoints.iter_mut().flatten().zip(pods) {
            e.target_ref = Some(ObjectReference {
                name: Some(p.to_string()),
                ..Default::default()
            });
        }
        s
    };
    let x = with_pod(
        with_endpoints(slice(Some("x"), "ux", 1), &[("10.0.0.1", true)]),
        &["px"],
    );
    let y = with_pod(
        with_endpoints(slice(Some("y"), "uy", 1), &[("10.0.0.2", true)]),
        &["py"],
    );
    // Both gain a ready pod: py2 changed at 50, px2 at 100.
    let x2 = with_pod(
        with_endpoints(x.clone(), &[("10.0.0.1", true), ("10.0.0.3", true)]),
        &["px", "px2"],
    );
    let y2 = with_pod(
        with_endpoints(y.clone(), &[("10.0.0.2", true), ("10.0.0.4", true)]),
        &["py", "py2"],
    );
    let before = [&x, &y];
    let updates = [x2, y2];
    let age = |pod: &str| match pod {
        "px2" => Some(100),
        "py2" => Some(50),
        _ => Some(1),
    };
    let w = SliceWrites {
        update: &updates,
        before: Some(&before),
        age: Some(&age),
        ..Default::default()
    };
    let api = Recorder::default();
    let got = slices.write(&api, &key, w, true, &metrics).await.unwrap();
    assert_eq!(
        (got, api.calls().join(", ")),
        (Written::All, "replace ns/y rv=7, replace ns/x rv=7".into())
    );
    // Each call tells the client's token bucket the change it carries.
    assert_eq!(*api.ages.lock().unwrap(), [Some(50), Some(100)]);
    // Without ages, the plan's order.
    let w = SliceWrites { age: None, ..w };
    assert_eq!(
        run(&slices, &key, &metrics, w).await.1,
        "replace ns/x rv=7, replace ns/y rv=7"
    );
}
