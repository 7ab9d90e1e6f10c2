//! Dry run (`--dry-run` and `plan`): every controller runs against the live cluster, but no
//! write takes effect. Each controller's client sends its mutating requests (POST, PUT, PATCH,
//! DELETE) as the API server's own server-side dry run (`?dryRun=All`): the server validates
//! them for real (admission, conflicts, field validation) and answers with the object it would
//! have stored, so the shells keep working unchanged. Each such write is recorded once: a
//! structured log line, the counter `service_controller_manager_dry_run_writes_total
//! {controller,verb,resource}`, and a [`Record`] that `plan` prints. Cloud calls that mutate
//! are recorded through [`DryRun::record`] by their provider, which skips them.
//!
//! Nothing the server answers is ever stored, so a controller would see no effect of its
//! write; [`crate::run_workers`] therefore reconciles each key once per observed change in a
//! dry run (no retries, no scheduled looks) and reports its activity here, so that `plan`
//! knows when every queue has drained.

use std::collections::BTreeMap;
use std::sync::{Arc, LazyLock, Mutex};

use http::{Method, Request, Response, Uri};
use kube::client::Body;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use serde_json::Value;
use tracing::{debug, info, warn};

/// Labels of `service_controller_manager_dry_run_writes_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DryRunLabels {
    /// The controller (as in `--controllers`) that would write.
    pub controller: String,
    /// `create`, `update`, `patch`, `delete`, or a cloud operation (`CreateLoadBalancer`).
    pub verb: String,
    /// The API resource (`endpointslices`, `services/status`) or the cloud API (`elbv2`, `ec2`).
    pub resource: String,
}

/// The process-wide counter (the client is built before any registry exists).
static WRITES: LazyLock<Family<DryRunLabels, Counter>> = LazyLock::new(Family::default);

/// Registers the dry-run counter in `registry` (every [`crate::Metrics`] does, through
/// [`super::metrics::register`]).
pub fn register(registry: &mut Registry) {
    registry.register(
        "service_controller_manager_dry_run_writes",
        "Writes a dry run would have made (API requests sent as server-side dry run, cloud calls skipped)",
        WRITES.clone(),
    );
}

/// One write a dry run would have made.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    /// The controller that would write.
    pub controller: String,
    /// `create`, `update`, `patch`, `delete`, or a cloud operation name.
    pub verb: String,
    /// API resource (with subresource) or cloud API.
    pub resource: String,
    /// `namespace/name` (or `name`) of the object written; a load balancer's name for cloud
    /// calls; for Events, the object the Event is about.
    pub object: String,
    /// A short summary of the change.
    pub change: String,
}

/// What a controller's workers are doing, for `plan` to know when all are idle.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Activity {
    /// Its workers have started (caches synced, gate open).
    pub started: bool,
    /// Keys waiting in its queue.
    pub queued: usize,
    /// Keys being reconciled.
    pub in_flight: usize,
    /// Reconciles finished so far.
    pub reconciled: u64,
}

#[derive(Default)]
struct Inner {
    records: Mutex<Vec<Record>>,
    activity: Mutex<BTreeMap<String, Activity>>,
}

/// The dry run of one process: where writes are recorded. Cheap to clone.
#[derive(Clone, Default)]
pub struct DryRun {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for DryRun {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DryRun")
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl DryRun {
    /// A new, empty dry run.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records one write that was not made: logged, counted, kept for [`Self::records`].
    pub fn record(&self, controller: &str, verb: &str, resource: &str, object: &str, change: &str) {
        info!(
            dry_run = true,
            controller, verb, resource, object, change, "dry run: would write"
        );
        WRITES
            .get_or_create(&DryRunLabels {
                controller: controller.to_string(),
                verb: verb.to_string(),
                resource: resource.to_string(),
            })
            .inc();
        lock(&self.inner.records).push(Record {
            controller: controller.to_string(),
            verb: verb.to_string(),
            resource: resource.to_string(),
            object: object.to_string(),
            change: change.to_string(),
        });
    }

    /// Every write recorded so far, in order.
    pub fn records(&self) -> Vec<Record> {
        lock(&self.inner.records).clone()
    }

    /// How many writes were recorded so far.
    pub fn count(&self) -> usize {
        lock(&self.inner.records).len()
    }

    /// Reports `controller`'s workers: started, with `queued` keys waiting and `in_flight`
    /// being reconciled; `finished` reconciles just ended.
    pub fn report_activity(
        &self,
        controller: &str,
        queued: usize,
        in_flight: usize,
        finished: u64,
    ) {
        let mut g = lock(&self.inner.activity);
        let a = g.entry(controller.to_string()).or_default();
        a.started = true;
        a.queued = queued;
        a.in_flight = in_flight;
        a.reconciled += finished;
    }

    /// Each controller's last reported activity.
    pub fn activity(&self) -> BTreeMap<String, Activity> {
        lock(&self.inner.activity).clone()
    }

    /// `inner` for `controller`: its mutating requests are sent as server-side dry runs and
    /// recorded; reads (watches included) pass through unchanged.
    pub fn client(&self, inner: kube::Client, controller: &str) -> kube::Client {
        let ns = inner.default_namespace().to_string();
        let dry = self.clone();
        let controller: Arc<str> = Arc::from(controller);
        let svc = tower::service_fn(move |req: Request<Body>| {
            let (inner, dry, controller) = (inner.clone(), dry.clone(), controller.clone());
            async move { dry.send(&inner, &controller, req).await }
        });
        kube::Client::new(svc, ns)
    }

    async fn send(
        &self,
        inner: &kube::Client,
        controller: &str,
        req: Request<Body>,
    ) -> Result<Response<Body>, kube::Error> {
        let verb = match *req.method() {
            Method::POST => "create",
            Method::PUT => "update",
            Method::PATCH => "patch",
            Method::DELETE => "delete",
            _ => return inner.send(req).await,
        };
        if is_dry_run(req.uri()) {
            // Already rewritten (and recorded) by a client wrapping this one.
            return inner.send(req).await;
        }
        let (mut parts, body) = req.into_parts();
        let body = body.collect_bytes().await?;
        let target = Target::parse(parts.uri.path());
        let before = match verb {
            "update" | "patch" => current(inner, parts.uri.path()).await,
            _ => None,
        };
        parts.uri = with_dry_run(&parts.uri);
        let resp = inner
            .send(Request::from_parts(parts, Body::from(body.clone())))
            .await?;
        let (rparts, rbody) = resp.into_parts();
        let rbytes = rbody.collect_bytes().await?;
        let after: Option<Value> = serde_json::from_slice(&rbytes).ok();
        let sent: Option<Value> = serde_json::from_slice(&body).ok();
        let object = target.object(after.as_ref(), sent.as_ref());
        if rparts.status.is_success() {
            let change = summarize(
                verb,
                &target.resource,
                before.as_ref(),
                after.as_ref(),
                sent.as_ref(),
            );
            self.record(controller, verb, &target.resource, &object, &change);
        } else {
            // A write the server refuses would fail for real too: the controller sees the same
            // answer and reports it as it always does.
            warn!(
                dry_run = true,
                controller,
                verb,
                resource = %target.resource,
                object = %object,
                status = rparts.status.as_u16(),
                "dry run: the API server would refuse this write"
            );
        }
        Ok(Response::from_parts(rparts, Body::from(rbytes)))
    }
}

fn is_dry_run(uri: &Uri) -> bool {
    uri.query()
        .is_some_and(|q| q.split('&').any(|p| p.starts_with("dryRun=")))
}

/// `uri` with `dryRun=All` added to its query.
fn with_dry_run(uri: &Uri) -> Uri {
    let pq = match uri.query() {
        Some(q) if !q.is_empty() => format!("{}?{q}&dryRun=All", uri.path()),
        _ => format!("{}?dryRun=All", uri.path()),
    };
    let mut parts = uri.clone().into_parts();
    match pq.parse() {
        Ok(pq) => {
            parts.path_and_query = Some(pq);
            Uri::from_parts(parts).unwrap_or_else(|_| uri.clone())
        }
        Err(_) => uri.clone(),
    }
}

/// The object at `path` now, if it can be read.
async fn current(inner: &kube::Client, path: &str) -> Option<Value> {
    let req = Request::get(path).body(Body::empty()).ok()?;
    let resp = inner.send(req).await.ok()?;
    if !resp.status().is_success() {
        return None;
    }
    let bytes = resp.into_body().collect_bytes().await.ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// What a request path names: `/api/v1/namespaces/{ns}/{resource}[/{name}[/{sub}]]`,
/// `/apis/{group}/{version}/…` and the cluster-scoped forms.
#[derive(Debug, PartialEq, Eq)]
struct Target {
    /// `resource` or `resource/subresource`.
    resource: String,
    namespace: String,
    name: Option<String>,
}

impl Target {
    fn parse(path: &str) -> Target {
        let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
        let rest: &[&str] = match segs.first() {
            Some(&"api") => segs.get(2..).unwrap_or(&[]),
            Some(&"apis") => segs.get(3..).unwrap_or(&[]),
            _ => &segs[..],
        };
        let (namespace, rest) = match rest {
            ["namespaces", ns, tail @ ..] if !tail.is_empty() => (ns.to_string(), tail),
            _ => (String::new(), rest),
        };
        let resource = rest.first().copied().unwrap_or("").to_string();
        let name = rest.get(1).map(|s| s.to_string());
        let resource = match rest.get(2) {
            Some(sub) => format!("{resource}/{sub}"),
            None => resource,
        };
        Target {
            resource,
            namespace,
            name,
        }
    }

    /// The key shown for the write: for an Event, the object it is about.
    fn object(&self, after: Option<&Value>, sent: Option<&Value>) -> String {
        if self.resource == "events"
            && let Some(r) =
                sent.and_then(|s| s.get("regarding").or_else(|| s.get("involvedObject")))
        {
            let kind = r.get("kind").and_then(Value::as_str).unwrap_or("");
            let ns = r.get("namespace").and_then(Value::as_str).unwrap_or("");
            let name = r.get("name").and_then(Value::as_str).unwrap_or("");
            let key = if ns.is_empty() {
                name.to_string()
            } else {
                format!("{ns}/{name}")
            };
            return format!("{kind} {key}").trim().to_string();
        }
        let meta_name = |v: Option<&Value>| {
            v.and_then(|v| v.pointer("/metadata/name"))
                .and_then(Value::as_str)
                .map(str::to_string)
        };
        let name = self
            .name
            .clone()
            .or_else(|| meta_name(sent))
            .or_else(|| {
                sent.and_then(|v| v.pointer("/metadata/generateName"))
                    .and_then(Value::as_str)
                    .map(|g| format!("{g}*"))
            })
            .or_else(|| meta_name(after))
            .unwrap_or_default();
        if self.namespace.is_empty() {
            name
        } else {
            format!("{}/{name}", self.namespace)
        }
    }
}

/// Longest summary of one write.
const MAX_CHANGE: usize = 400;
/// Longest rendering of one value in a summary.
const MAX_VALUE: usize = 80;

/// A short summary of a write: an Event's type, reason and note; a create's size; the fields
/// an update or patch would change (from the object now to the one the server answered).
fn summarize(
    verb: &str,
    resource: &str,
    before: Option<&Value>,
    after: Option<&Value>,
    sent: Option<&Value>,
) -> String {
    if resource == "events" {
        let s = |p: &str| {
            sent.and_then(|v| v.pointer(p))
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string()
        };
        let note = if s("/note").is_empty() {
            s("/message")
        } else {
            s("/note")
        };
        return clip(
            &format!("{} {}: {note}", s("/type"), s("/reason")),
            MAX_CHANGE,
        );
    }
    match verb {
        "create" => {
            let n = after
                .and_then(|v| v.get("endpoints").or_else(|| v.get("subsets")))
                .and_then(Value::as_array)
                .map(|a| format!(" ({} entries)", a.len()))
                .unwrap_or_default();
            format!("create{n}")
        }
        "delete" => "delete".to_string(),
        _ => {
            let (Some(b), Some(a)) = (before, after) else {
                return verb.to_string();
            };
            let mut out = vec![];
            diff("", b, a, &mut out);
            if out.is_empty() {
                return "no change".to_string();
            }
            let total = out.len();
            let mut text = String::new();
            for (i, d) in out.iter().enumerate() {
                let sep = if i == 0 { "" } else { "; " };
                if text.len() + sep.len() + d.len() > MAX_CHANGE {
                    text.push_str(&format!(" (+{} more)", total - i));
                    break;
                }
                text.push_str(sep);
                text.push_str(d);
            }
            text
        }
    }
}

/// Fields the server changes on every write: no part of what a controller asks for.
const NOISE: [&str; 5] = [
    ".metadata.resourceVersion",
    ".metadata.managedFields",
    ".metadata.generation",
    ".metadata.creationTimestamp",
    ".metadata.uid",
];

fn child(path: &str, key: &str) -> String {
    if key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
        format!("{path}.{key}")
    } else {
        format!("{path}[{key}]")
    }
}

/// Appends `path: old -> new` for each leaf that differs between `a` and `b`.
fn diff(path: &str, a: &Value, b: &Value, out: &mut Vec<String>) {
    if a == b || NOISE.contains(&path) {
        return;
    }
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            let keys: std::collections::BTreeSet<&String> = x.keys().chain(y.keys()).collect();
            for k in keys {
                let (va, vb) = (
                    x.get(k).unwrap_or(&Value::Null),
                    y.get(k).unwrap_or(&Value::Null),
                );
                diff(&child(path, k), va, vb, out);
            }
        }
        (Value::Array(x), Value::Array(y)) if x.len() == y.len() => {
            for (i, (va, vb)) in x.iter().zip(y).enumerate() {
                diff(&format!("{path}[{i}]"), va, vb, out);
            }
        }
        (Value::Array(x), Value::Array(y)) => out.push(format!(
            "{}: {} items -> {} items",
            show_path(path),
            x.len(),
            y.len()
        )),
        _ => out.push(format!("{}: {} -> {}", show_path(path), show(a), show(b))),
    }
}

fn show_path(path: &str) -> &str {
    path.strip_prefix('.').unwrap_or(path)
}

fn show(v: &Value) -> String {
    if let Some(c) = conditions(v) {
        return clip(&c, MAX_VALUE);
    }
    match v {
        Value::Null => "(none)".to_string(),
        Value::String(s) => clip(s, MAX_VALUE),
        other => clip(&other.to_string(), MAX_VALUE),
    }
}

/// A list of conditions as `Type=Status (Reason)`, the part a reader wants of them.
fn conditions(v: &Value) -> Option<String> {
    let items = v.as_array().filter(|a| !a.is_empty())?;
    let mut out = vec![];
    for c in items {
        let t = c.get("type")?.as_str()?;
        let s = c.get("status")?.as_str()?;
        out.push(match c.get("reason").and_then(Value::as_str) {
            Some(r) if !r.is_empty() => format!("{t}={s} ({r})"),
            _ => format!("{t}={s}"),
        });
    }
    Some(format!("[{}]", out.join(", ")))
}

fn clip(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        return s.to_string();
    }
    let mut t: String = s.chars().take(max.saturating_sub(1)).collect();
    t.push('…');
    t
}

/// [`crate::run_workers`]'s end of a reconcile in a dry run. Nothing a dry run writes takes
/// effect, so a retry or a scheduled look would find the same work and plan it again, forever:
/// each key is reconciled once per change the informers deliver.
pub(crate) fn finish<K, E>(
    ctx: &crate::ControllerContext,
    queue: &crate::WorkQueue<K>,
    name: &str,
    key: K,
    result: Result<crate::Requeue, E>,
) where
    K: Clone + Eq + std::hash::Hash + Send + std::fmt::Display + 'static,
    E: crate::ReconcileError,
{
    queue.forget(&key);
    match result {
        Ok(crate::Requeue::Done) => {}
        Ok(crate::Requeue::After(d)) => {
            debug!(controller = %name, key = %key, after = ?d, "dry run: scheduled look dropped")
        }
        Err(e) => {
            ctx.metrics.record_error(name, e.metric_label());
            warn!(controller = %name, key = %key, error = %e, "dry run: reconcile failed; not retried");
        }
    }
}

#[cfg(test)]
mod tests;
