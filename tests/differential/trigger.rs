//! The `endpoints.kubernetes.io/last-change-trigger-time` annotation, ours against
//! kube-controller-manager's, after each step has converged.
//!
//! Which writes a controller makes depends on when it syncs (three pods made ready one after
//! the other may be one write or three), and upstream's value is the earliest transition since
//! its previous sync, so values are compared only where both controllers necessarily saw the
//! same change:
//! - every slice of a Service that has no pods yet carries the Service's creationTimestamp;
//! - after one pod's Ready transition, the slices holding that pod carry exactly its
//!   `lastTransitionTime`, on both sides;
//! - after a step that is one event (a readiness flip, a deletion, a Service patch), a Service
//!   whose slices are one per address type and port set on both sides has the same value (or
//!   none) in each such slice both sides rewrote in that step;
//! - presence alone is compared for such Services after every step.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Result, bail};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::Client;
use kube::api::{Api, ListParams, Patch, PatchParams};
use test_support::invariants::{LABEL_MANAGED_BY, LABEL_SERVICE_NAME, OURS, UPSTREAM};
use tokio::time::Instant;

const ANNOTATION: &str = "endpoints.kubernetes.io/last-change-trigger-time";

/// The readiness the test gave each pod and when it last changed, as a kubelet records it.
#[derive(Default)]
pub struct Readiness {
    pods: BTreeMap<String, (bool, i64)>,
}

impl Readiness {
    /// The Ready condition's time for `pod` becoming `ready` now: a new time (later than any
    /// before, whole seconds) if that is a transition, else the one it has.
    pub fn transition(&mut self, pod: &str, ready: bool) -> Result<Time> {
        let now = Timestamp::now().as_second();
        let t = match self.pods.get(pod) {
            Some((was, t)) if *was == ready => *t,
            Some((_, t)) => now.max(t + 1),
            None => now,
        };
        self.pods.insert(pod.to_string(), (ready, t));
        Ok(Time(Timestamp::from_second(t)?))
    }
}

/// Sets a pod Running with `ips` and its Ready condition changed at `since` (the harness's
/// `set_pod_status` leaves `lastTransitionTime` unset, which no kubelet does).
pub async fn set_status(
    client: &Client,
    ns: &str,
    name: &str,
    ready: bool,
    ips: &[String],
    since: &Time,
) -> Result<()> {
    let status = if ready { "True" } else { "False" };
    let conditions = serde_json::json!([
        {"type": "Ready", "status": status, "lastTransitionTime": since},
        {"type": "ContainersReady", "status": status, "lastTransitionTime": since},
    ]);
    let patch = serde_json::json!({"status": {
        "phase": "Running",
        "podIP": ips.first(),
        "podIPs": ips.iter().map(|ip| serde_json::json!({"ip": ip})).collect::<Vec<_>>(),
        "conditions": conditions,
    }});
    Api::<Pod>::namespaced(client.clone(), ns)
        .patch_status(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await?;
    Ok(())
}

/// The API's spelling of a time, which is the annotation's for a whole-second trigger.
pub fn api_time(t: &Time) -> Result<String> {
    match serde_json::to_value(t)? {
        serde_json::Value::String(s) => Ok(s),
        v => bail!("time serialised as {v}"),
    }
}

/// What changed in a step, as far as the annotation goes.
pub enum StepKind {
    /// Services just created, no pods yet: (Service, its creationTimestamp).
    Created(Vec<(String, String)>),
    /// Pods created: sync timing decides the values, so presence only.
    PodsCreated,
    /// One pod's Ready transition at this time (the API's spelling).
    Transition { pod: String, at: String },
    /// One event of another kind (deletion, Service patch).
    OneEvent,
}

fn trigger(s: &EndpointSlice) -> Option<String> {
    s.metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(ANNOTATION))
        .cloned()
}

fn group(s: &EndpointSlice) -> (String, Vec<String>) {
    let mut ports: Vec<String> = s
        .ports
        .iter()
        .flatten()
        .map(|p| format!("{:?}/{:?}/{:?}", p.name, p.port, p.protocol))
        .collect();
    ports.sort();
    (s.address_type.clone(), ports)
}

async fn slices(client: &Client, ns: &str, svc: &str, by: &str) -> Result<Vec<EndpointSlice>> {
    let lp = ListParams::default().labels(&format!(
        "{LABEL_SERVICE_NAME}={svc},{LABEL_MANAGED_BY}={by}"
    ));
    Ok(Api::<EndpointSlice>::namespaced(client.clone(), ns)
        .list(&lp)
        .await?
        .items)
}

fn holds(s: &EndpointSlice, pod: &str) -> bool {
    s.endpoints
        .iter()
        .flatten()
        .any(|e| e.target_ref.as_ref().and_then(|r| r.name.as_deref()) == Some(pod))
}

type Group = (String, Vec<String>);
/// A slice's resourceVersion and annotation.
type Seen = (Option<String>, Option<String>);

/// One slice per (address type, port set): each group's [`Seen`], if every group has one slice.
fn single(slices: &[EndpointSlice]) -> Option<BTreeMap<Group, Seen>> {
    let mut out = BTreeMap::new();
    for s in slices {
        let v = (s.metadata.resource_version.clone(), trigger(s));
        if out.insert(group(s), v).is_some() {
            return None;
        }
    }
    Some(out)
}

/// The resourceVersion of every slice of single-slice groups, per Service and side, before a
/// step: a group both sides rewrote in the step is one whose value is compared.
#[derive(Default)]
pub struct Versions(BTreeMap<(String, &'static str, Group), Option<String>>);

/// Takes [`Versions`] before a step.
pub async fn versions(client: &Client, ns: &str, svcs: &[String]) -> Result<Versions> {
    let mut v = Versions::default();
    for svc in svcs {
        for (side, by) in [("ours", OURS), ("upstream", UPSTREAM)] {
            for (g, (rv, _)) in single(&slices(client, ns, svc, by).await?).unwrap_or_default() {
                v.0.insert((svc.clone(), side, g), rv);
            }
        }
    }
    Ok(v)
}

/// How many annotations were compared, by value and by presence only.
#[derive(Clone, Copy, Debug, Default)]
pub struct Compared {
    /// Compared by value (absent on both sides counts as equal).
    pub values: usize,
    /// Compared by presence only.
    pub presence: usize,
}

impl std::ops::AddAssign for Compared {
    fn add_assign(&mut self, o: Compared) {
        self.values += o.values;
        self.presence += o.presence;
    }
}

/// The first difference for one Service, if any; what was compared.
async fn check_service(
    client: &Client,
    ns: &str,
    svc: &str,
    kind: &StepKind,
    before: &Versions,
) -> Result<(Option<String>, Compared)> {
    let ours = slices(client, ns, svc, OURS).await?;
    let up = slices(client, ns, svc, UPSTREAM).await?;
    let mut compared = Compared::default();
    match kind {
        StepKind::Created(created) => {
            let Some((_, want)) = created.iter().find(|(s, _)| s == svc) else {
                return Ok((None, compared));
            };
            for (side, list) in [("ours", &ours), ("upstream", &up)] {
                for s in list.iter() {
                    compared.values += 1;
                    if trigger(s).as_deref() != Some(want.as_str()) {
                        return Ok((
                            Some(format!(
                                "{svc}: {side} slice {:?} has {:?}, want the creation {want}",
                                s.metadata.name,
                                trigger(s)
                            )),
                            compared,
                        ));
                    }
                }
            }
        }
        StepKind::Transition { pod, at } => {
            let o: Vec<&EndpointSlice> = ours.iter().filter(|s| holds(s, pod)).collect();
            let u: Vec<&EndpointSlice> = up.iter().filter(|s| holds(s, pod)).collect();
            if o.is_empty() != u.is_empty() {
                return Ok((
                    Some(format!("{svc}: {pod} held on one side only")),
                    compared,
                ));
            }
            for s in o.iter().chain(u.iter()) {
                compared.values += 1;
                if trigger(s).as_deref() != Some(at.as_str()) {
                    let side = if o.iter().any(|x| std::ptr::eq(*x, *s)) {
                        "ours"
                    } else {
                        "upstream"
                    };
                    return Ok((
                        Some(format!(
                            "{svc}: {side} slice {:?} holding {pod} has {:?}, want its transition {at}",
                            s.metadata.name,
                            trigger(s)
                        )),
                        compared,
                    ));
                }
            }
        }
        StepKind::PodsCreated | StepKind::OneEvent => {}
    }
    // Services laid out one slice per group on both sides: the same presence (and, after a
    // single event, the same value).
    if let (Some(o), Some(u)) = (single(&ours), single(&up))
        && o.keys().eq(u.keys())
    {
        let rewritten = |side: &'static str, g: &Group, rv: &Option<String>| {
            before
                .0
                .get(&(svc.to_string(), side, g.clone()))
                .is_none_or(|was| was != rv)
        };
        for ((g, (orv, a)), (urv, b)) in o.iter().zip(u.values()) {
            let values = !matches!(kind, StepKind::PodsCreated)
                && rewritten("ours", g, orv)
                && rewritten("upstream", g, urv);
            if values {
                compared.values += 1;
            } else {
                compared.presence += 1;
            }
            let differ = if values {
                a != b
            } else {
                a.is_some() != b.is_some()
            };
            if differ {
                return Ok((
                    Some(format!(
                        "{svc} {g:?}: ours {a:?}, upstream {b:?} ({})",
                        if values { "value" } else { "presence" }
                    )),
                    compared,
                ));
            }
        }
    }
    Ok((None, compared))
}

/// Polls (the views already agree, so this settles at once unless the annotations differ)
/// until every Service passes; returns what was compared.
pub async fn check(
    client: &Client,
    ns: &str,
    svcs: &[String],
    kind: &StepKind,
    before: &Versions,
    what: &str,
) -> Result<Compared> {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let mut diff = None;
        let mut compared = Compared::default();
        for s in svcs {
            let (d, n) = check_service(client, ns, s, kind, before).await?;
            compared += n;
            if d.is_some() {
                diff = d;
                break;
            }
        }
        match diff {
            None => return Ok(compared),
            Some(d) if Instant::now() >= deadline => {
                bail!("{what}: trigger-time annotations differ: {d}")
            }
            Some(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}
