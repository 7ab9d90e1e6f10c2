//! Kubernetes Events on the objects we act for. `warn_once` reports a problem once while it
//! lasts (not once per resync), and again once the API server has let the first Event expire;
//! `clear` forgets it so a recurrence is reported again.
//!
//! Repeats of one Event (same object, type, reason, action and note) become one Event with a
//! growing series count, as client-go's events recorder does. kube's `Recorder` alone would
//! also fold an Event whose note changed into the earlier one, leaving the old message on
//! show (a pool that was full and is now disabled would still say "full"): a changed note
//! starts a new series here.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::ObjectReference;
use kube::Client;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use tracing::warn;

/// Publishes Events as one reporting controller, deduplicating standing problems.
#[derive(Clone)]
pub struct EventRecorder {
    client: Client,
    reporter: Reporter,
    series: Arc<Mutex<SeriesMap>>,
    reported: Arc<Mutex<Reported>>,
}

/// How long a series stays open for repeats: kube's Recorder keeps its own cache as long.
const SERIES_TTL: Duration = Duration::from_secs(6 * 60);

/// (object, type, reason, action).
type SeriesKey = (String, &'static str, String, String);

/// The open series: the note each shows and the Recorder that extends it.
#[derive(Default)]
struct SeriesMap {
    open: HashMap<SeriesKey, (String, Recorder, Instant)>,
    /// Size after the last prune: the next one runs when the map has doubled.
    pruned_len: usize,
}

/// How long a standing problem stays reported: kube-apiserver's default `--event-ttl`. After
/// it the Event is gone from `kubectl describe`, so a problem still there is reported again;
/// and entries of objects deleted meanwhile (nobody clears those) are dropped, which bounds
/// the set to the last hour's problems.
const REPORT_TTL: Duration = Duration::from_secs(3600);

type ReportKey = (String, String, String);

/// Standing problems already reported, with when.
#[derive(Default)]
struct Reported {
    at: HashMap<ReportKey, Instant>,
    /// Size after the last prune: the next one runs when the map has doubled.
    pruned_len: usize,
}

impl Reported {
    /// Records `key` now unless it was reported within `ttl`; true if it should be reported.
    fn insert(&mut self, key: ReportKey, now: Instant, ttl: Duration) -> bool {
        if self.at.len() >= 2 * self.pruned_len.max(64) {
            self.at.retain(|_, t| now.duration_since(*t) < ttl);
            self.pruned_len = self.at.len();
        }
        match self.at.get(&key) {
            Some(t) if now.duration_since(*t) < ttl => false,
            _ => {
                self.at.insert(key, now);
                true
            }
        }
    }
}

fn ref_key(r: &ObjectReference) -> String {
    format!(
        "{}/{}/{}/{}",
        r.kind.as_deref().unwrap_or(""),
        r.namespace.as_deref().unwrap_or(""),
        r.name.as_deref().unwrap_or(""),
        r.uid.as_deref().unwrap_or("")
    )
}

impl EventRecorder {
    /// A recorder reporting as `controller` (e.g. `endpointslice-controller`) from `instance`.
    pub fn new(client: Client, controller: &str, instance: Option<String>) -> Self {
        let reporter = Reporter {
            controller: controller.to_string(),
            instance,
        };
        EventRecorder {
            client,
            reporter,
            series: Arc::default(),
            reported: Arc::new(Mutex::new(Reported::default())),
        }
    }

    /// Publishes a Normal Event. Failures are logged, never returned: an Event is advisory.
    pub async fn normal(&self, obj: &ObjectReference, reason: &str, action: &str, note: String) {
        self.publish(obj, EventType::Normal, reason, action, note)
            .await
    }

    /// Publishes a Warning Event.
    pub async fn warning(&self, obj: &ObjectReference, reason: &str, action: &str, note: String) {
        self.publish(obj, EventType::Warning, reason, action, note)
            .await
    }

    /// Publishes a Warning Event unless this (object, reason, note) was already reported and
    /// not cleared since. Returns whether an Event was sent.
    pub async fn warn_once(
        &self,
        obj: &ObjectReference,
        reason: &str,
        action: &str,
        note: String,
    ) -> bool {
        let key = (ref_key(obj), reason.to_string(), note.clone());
        {
            let mut set = self.reported.lock().unwrap_or_else(|e| e.into_inner());
            if !set.insert(key, Instant::now(), REPORT_TTL) {
                return false;
            }
        }
        self.publish(obj, EventType::Warning, reason, action, note)
            .await;
        true
    }

    /// Forgets standing problems of `reason` on `obj` (all reasons if `None`).
    pub fn clear(&self, obj: &ObjectReference, reason: Option<&str>) {
        let k = ref_key(obj);
        let mut set = self.reported.lock().unwrap_or_else(|e| e.into_inner());
        set.at
            .retain(|(o, r, _), _| !(o == &k && reason.is_none_or(|want| want == r)));
    }

    async fn publish(
        &self,
        obj: &ObjectReference,
        type_: EventType,
        reason: &str,
        action: &str,
        note: String,
    ) {
        let recorder = self.series_for(obj, type_, reason, action, &note, Instant::now());
        let ev = Event {
            type_,
            reason: reason.to_string(),
            note: Some(note),
            action: action.to_string(),
            secondary: None,
        };
        if let Err(e) = recorder.publish(&ev, obj).await {
            warn!(
                object = %ref_key(obj),
                reason,
                error = %e,
                "could not publish event"
            );
        }
    }
}

impl EventRecorder {
    /// The Recorder whose series this Event extends: the open one if it shows the same note,
    /// else a new one (a new Event).
    fn series_for(
        &self,
        obj: &ObjectReference,
        type_: EventType,
        reason: &str,
        action: &str,
        note: &str,
        now: Instant,
    ) -> Recorder {
        let type_ = match type_ {
            EventType::Normal => "Normal",
            EventType::Warning => "Warning",
        };
        let key = (ref_key(obj), type_, reason.to_string(), action.to_string());
        let mut g = self.series.lock().unwrap_or_else(|e| e.into_inner());
        if g.open.len() >= 2 * g.pruned_len.max(64) {
            g.open
                .retain(|_, (_, _, at)| now.duration_since(*at) < SERIES_TTL);
            g.pruned_len = g.open.len();
        }
        match g.open.get_mut(&key) {
            Some((n, r, at)) if n == note && now.duration_since(*at) < SERIES_TTL => {
                *at = now;
                r.clone()
            }
            _ => {
                let r = Recorder::new(self.client.clone(), self.reporter.clone());
                g.open.insert(key, (note.to_string(), r.clone(), now));
                r
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(i: usize) -> ReportKey {
        (format!("Service/ns/s{i}/uid"), "R".into(), "note".into())
    }

    #[test]
    fn a_standing_problem_is_reported_once_per_ttl() {
        let mut r = Reported::default();
        let t0 = Instant::now();
        let ttl = Duration::from_secs(3600);
        assert!(r.insert(key(1), t0, ttl));
        assert!(!r.insert(key(1), t0 + Duration::from_secs(60), ttl));
        assert!(
            r.insert(key(1), t0 + ttl, ttl),
            "again once the Event has expired"
        );
    }

    #[test]
    fn problems_of_deleted_objects_do_not_accumulate() {
        // Objects deleted while a problem stood were never cleared: the set grew for ever.
        let mut r = Reported::default();
        let t0 = Instant::now();
        let ttl = Duration::from_secs(3600);
        for hour in 0..10u64 {
            let now = t0 + Duration::from_secs(hour * 3600 + 1);
            for i in 0..1000 {
                r.insert(key(hour as usize * 1000 + i), now, ttl);
            }
        }
        assert!(r.at.len() <= 2 * 1000 + 64, "{} entries kept", r.at.len());
    }
}
