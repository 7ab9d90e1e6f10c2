//! The `endpoints.kubernetes.io/last-change-trigger-time` annotation, computed as upstream's
//! trigger-time tracker does (k8s.io/endpointslice `TriggerTimeTracker`, shared there by the
//! EndpointSlice and the legacy Endpoints controllers, as here). kube-proxy subtracts it from
//! the moment it programs the change to export `kubeproxy_network_programming_duration_seconds`.
//!
//! Per Service, the tracker remembers what the last sync saw: the Service's creation time and
//! each selected pod's Ready `lastTransitionTime`. A sync's trigger time is the *earliest* of
//! the times that moved forward since then (a pod new to the Service counts with its time),
//! or the Service's creation time on the first sync of a Service. None means "no trigger
//! known": the slices (or Endpoints) written in that sync lose the annotation. Only objects
//! written in a sync get it; an unchanged slice keeps whatever it carried.
//!
//! Deliberately unlike upstream in one respect: upstream moves the tracker forward before it
//! writes, so a sync whose write fails retries with no trigger time; the shells here record
//! the new [`SeenTimes`] only once the plan is applied, so the retry still carries it.
//!
//! Memory: a Service's [`SeenTimes`] holds 12 bytes per pod (a 64-bit hash of the pod's name
//! and its time in seconds), not the pod's name; two names of one Service sharing a hash would
//! only make the annotation an approximation, which upstream's tracker admits it is anyway.

use std::collections::{BTreeMap, HashMap};
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::Arc;

use k8s_openapi::api::core::v1::Service;
use scm_runtime::ObjectKey;

use crate::common::PodView;

/// `endpoints.kubernetes.io/last-change-trigger-time`.
pub const TRIGGER_TIME_ANNOTATION: &str = "endpoints.kubernetes.io/last-change-trigger-time";

/// What one Service's last successful sync saw (see the module doc).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SeenTimes {
    service: Option<i64>,
    // Sorted by hash; `times[i]` belongs to `pods[i]`. Two arrays, so no padding per entry.
    pods: Box<[u64]>,
    times: Box<[u32]>,
}

impl SeenTimes {
    fn pod(&self, hash: u64) -> Option<u32> {
        self.pods.binary_search(&hash).ok().map(|i| self.times[i])
    }

    /// How many pods with a Ready transition the sync saw.
    pub fn pods(&self) -> usize {
        self.pods.len()
    }
}

fn name_hash(name: &str) -> u64 {
    let mut h = DefaultHasher::new();
    name.hash(&mut h);
    h.finish()
}

/// The trigger time of a sync of `svc` with `pods` (its selected pods), given what the last
/// sync saw (`None`: the first sync of this Service since we started, or since it was
/// deleted), and what to remember once this sync is applied.
pub fn trigger_time<P: PodView>(
    seen: Option<&SeenTimes>,
    svc: &Service,
    pods: &[&P],
) -> (Option<i64>, SeenTimes) {
    let mut earliest: Option<i64> = None;
    let mut changed = |t: i64| earliest = Some(earliest.map_or(t, |e| e.min(t)));
    let mut now: Vec<(u64, u32)> = Vec::with_capacity(pods.len());
    for p in pods {
        // Times four bytes cannot hold are left out, as the pod record leaves them out.
        let Some(t) = p.ready_transition().and_then(|t| u32::try_from(t).ok()) else {
            continue;
        };
        if t == 0 {
            continue;
        }
        let hash = name_hash(p.name().unwrap_or_default());
        if seen
            .and_then(|s| s.pod(hash))
            .is_none_or(|before| t > before)
        {
            changed(i64::from(t));
        }
        now.push((hash, t));
    }
    let created = svc
        .metadata
        .creation_timestamp
        .as_ref()
        .map(|t| t.0.as_second());
    if let Some(c) = created
        && seen.and_then(|s| s.service).is_none_or(|before| c > before)
    {
        changed(c);
    }
    now.sort_unstable();
    now.dedup_by_key(|(h, _)| *h);
    let next = SeenTimes {
        service: created,
        pods: now.iter().map(|(h, _)| *h).collect(),
        times: now.iter().map(|(_, t)| *t).collect(),
    };
    let time = if seen.is_none() { created } else { earliest };
    (time, next)
}

/// The annotation's value: UTC, RFC 3339 with fractional seconds only when there are any
/// (Go's `RFC3339Nano`, which drops trailing zeros), so `2026-12-06T19:01:14Z`.
pub fn format_trigger_time(secs: i64) -> Option<String> {
    k8s_openapi::jiff::Timestamp::from_second(secs)
        .ok()
        .map(|t| t.to_string())
}

/// Sets the annotation to `time`, or removes it when there is none (as upstream does on every
/// object it writes).
pub fn annotate(annotations: &mut Option<BTreeMap<String, String>>, time: Option<i64>) {
    match time.and_then(format_trigger_time) {
        Some(v) => {
            annotations
                .get_or_insert_with(BTreeMap::new)
                .insert(TRIGGER_TIME_ANNOTATION.into(), v);
        }
        None => {
            if let Some(a) = annotations.as_mut() {
                a.remove(TRIGGER_TIME_ANNOTATION);
            }
        }
    }
}

/// The tracker's memory for every Service a shell syncs.
#[derive(Default)]
pub struct TriggerTimes {
    seen: HashMap<ObjectKey, Arc<SeenTimes>>,
}

impl TriggerTimes {
    /// What the last applied sync of `key` saw.
    pub fn seen(&self, key: &ObjectKey) -> Option<Arc<SeenTimes>> {
        self.seen.get(key).cloned()
    }

    /// Remembers what an applied sync of `key` saw.
    pub fn record(&mut self, key: &ObjectKey, seen: SeenTimes) {
        self.seen.insert(key.clone(), Arc::new(seen));
    }

    /// Forgets a deleted Service: if it comes back, its first sync counts as a new Service's.
    pub fn forget(&mut self, key: &ObjectKey) {
        self.seen.remove(key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{Pod, PodCondition, PodStatus};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
    use k8s_openapi::jiff::Timestamp;

    const T0: i64 = 1_780_000_000;

    fn time(s: i64) -> Time {
        Time(Timestamp::from_second(s).expect("in range"))
    }

    fn svc(created: Option<i64>) -> Service {
        Service {
            metadata: ObjectMeta {
                name: Some("web".into()),
                creation_timestamp: created.map(time),
                ..Default::default()
            },
            ..Default::default()
        }
    }

    fn pod(name: &str, ready_at: Option<i64>) -> Pod {
        Pod {
            metadata: ObjectMeta {
                name: Some(name.into()),
                ..Default::default()
            },
            status: Some(PodStatus {
                conditions: ready_at.map(|t| {
                    vec![PodCondition {
                        type_: "Ready".into(),
                        status: "True".into(),
                        last_transition_time: Some(time(t)),
                        ..Default::default()
                    }]
                }),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    /// Runs syncs in order, feeding each one's memory to the next; the trigger times.
    fn syncs(s: &Service, rounds: &[Vec<Pod>]) -> Vec<Option<i64>> {
        let mut seen: Option<SeenTimes> = None;
        rounds
            .iter()
            .map(|pods| {
                let refs: Vec<&Pod> = pods.iter().collect();
                let (t, next) = trigger_time(seen.as_ref(), s, &refs);
                seen = Some(next);
                t
            })
            .collect()
    }

    #[test]
    fn first_sync_is_the_service_creation_whatever_the_pods() {
        let s = svc(Some(T0));
        let t = syncs(
            &s,
            &[vec![pod("a", Some(T0 + 50)), pod("b", Some(T0 - 50))]],
        );
        assert_eq!(t, vec![Some(T0)]);
        // A Service without a creation time (never from the API server): no annotation.
        assert_eq!(syncs(&svc(None), &[vec![pod("a", Some(T0))]]), vec![None]);
    }

    #[test]
    fn later_syncs_take_the_earliest_transition_that_moved() {
        let s = svc(Some(T0));
        let t = syncs(
            &s,
            &[
                vec![pod("a", Some(T0 + 1)), pod("b", Some(T0 + 2))],
                // Nothing moved: no trigger time (the annotation is cleared on what is written).
                vec![pod("a", Some(T0 + 1)), pod("b", Some(T0 + 2))],
                // b flipped at +20, a at +30: the earliest that moved.
                vec![pod("a", Some(T0 + 30)), pod("b", Some(T0 + 20))],
                // A pod new to the Service counts with its own (older) time.
                vec![
                    pod("a", Some(T0 + 30)),
                    pod("b", Some(T0 + 20)),
                    pod("c", Some(T0 + 5)),
                ],
                // A pod leaving, or a pod without a Ready condition, triggers nothing.
                vec![pod("a", Some(T0 + 30)), pod("d", None)],
                // A time going backwards is not a change.
                vec![pod("a", Some(T0 + 29))],
            ],
        );
        assert_eq!(
            t,
            vec![Some(T0), None, Some(T0 + 20), Some(T0 + 5), None, None]
        );
    }

    #[test]
    fn a_pod_that_left_and_came_back_counts_again() {
        let s = svc(Some(T0));
        let p = || pod("a", Some(T0 + 7));
        let t = syncs(&s, &[vec![p()], vec![], vec![p()]]);
        assert_eq!(t, vec![Some(T0), None, Some(T0 + 7)]);
    }

    #[test]
    fn a_recreated_service_is_new_again() {
        let (old, new) = (svc(Some(T0)), svc(Some(T0 + 100)));
        let (_, seen) = trigger_time::<Pod>(None, &old, &[]);
        let (t, _) = trigger_time::<Pod>(Some(&seen), &new, &[]);
        assert_eq!(t, Some(T0 + 100), "a later creation time moved");
        let mut tracker = TriggerTimes::default();
        let k = ObjectKey::new("ns", "web");
        tracker.record(&k, seen);
        assert!(tracker.seen(&k).is_some());
        tracker.forget(&k);
        assert!(tracker.seen(&k).is_none());
    }

    #[test]
    fn memory_is_one_hash_and_time_per_pod_with_a_transition() {
        let s = svc(Some(T0));
        let pods: Vec<Pod> = (0..100)
            .map(|i| pod(&format!("p{i}"), (i % 2 == 0).then_some(T0 + i)))
            .collect();
        let refs: Vec<&Pod> = pods.iter().collect();
        let (_, seen) = trigger_time(None, &s, &refs);
        assert_eq!(seen.pods(), 50);
        assert_eq!(seen.pod(name_hash("p4")), Some((T0 + 4) as u32));
        assert_eq!(seen.pod(name_hash("p5")), None);
    }

    #[test]
    fn formatted_as_rfc3339_in_utc_and_set_or_cleared() {
        assert_eq!(
            format_trigger_time(T0).as_deref(),
            Some("2026-05-28T20:26:40Z")
        );
        let mut a = Some(BTreeMap::from([("keep".to_string(), "me".to_string())]));
        annotate(&mut a, Some(T0));
        assert_eq!(
            a.as_ref()
                .and_then(|a| a.get(TRIGGER_TIME_ANNOTATION))
                .map(String::as_str),
            Some("2026-05-28T20:26:40Z")
        );
        annotate(&mut a, None);
        assert_eq!(
            a,
            Some(BTreeMap::from([("keep".to_string(), "me".to_string())]))
        );
        let mut none = None;
        annotate(&mut none, None);
        assert_eq!(none, None, "nothing to clear makes no map");
    }
}
