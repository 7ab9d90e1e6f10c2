//! Kubernetes Events on the objects we act for. `warn_once` reports a problem once while it
//! lasts (not once per resync); `clear` forgets it so a recurrence is reported again.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use k8s_openapi::api::core::v1::ObjectReference;
use kube::Client;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use tracing::warn;

/// Publishes Events as one reporting controller, deduplicating standing problems.
#[derive(Clone)]
pub struct EventRecorder {
    recorder: Recorder,
    reported: Arc<Mutex<HashSet<(String, String, String)>>>,
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
            recorder: Recorder::new(client, reporter),
            reported: Arc::new(Mutex::new(HashSet::new())),
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
            if !set.insert(key) {
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
        set.retain(|(o, r, _)| !(o == &k && reason.is_none_or(|want| want == r)));
    }

    async fn publish(
        &self,
        obj: &ObjectReference,
        type_: EventType,
        reason: &str,
        action: &str,
        note: String,
    ) {
        let ev = Event {
            type_,
            reason: reason.to_string(),
            note: Some(note),
            action: action.to_string(),
            secondary: None,
        };
        if let Err(e) = self.recorder.publish(&ev, obj).await {
            warn!(
                object = %ref_key(obj),
                reason,
                error = %e,
                "could not publish event"
            );
        }
    }
}
