//! Event listing for tests: the Events (`events.k8s.io/v1`, which also shows those written as
//! `core/v1`) about one object, as a controller's recorder wrote them.

use anyhow::Result;
use k8s_openapi::api::events::v1::Event;
use kube::Client;
use kube::api::{Api, ListParams};

/// Every Event in `namespace` whose `regarding` (`involvedObject` in `core/v1`) names `name`,
/// oldest first.
pub async fn events_about(client: &Client, namespace: &str, name: &str) -> Result<Vec<Event>> {
    let api: Api<Event> = Api::namespaced(client.clone(), namespace);
    let mut evs: Vec<Event> = api
        .list(&ListParams::default())
        .await?
        .items
        .into_iter()
        .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name))
        .collect();
    evs.sort_by(|a, b| {
        let t = |e: &Event| e.metadata.creation_timestamp.clone();
        t(a).cmp(&t(b))
    });
    Ok(evs)
}

/// The Events about `name` in `namespace` with reason `reason`, oldest first; empty when the
/// list fails, so a test can poll it.
pub async fn events_with_reason(
    client: &Client,
    namespace: &str,
    name: &str,
    reason: &str,
) -> Vec<Event> {
    events_about(client, namespace, name)
        .await
        .unwrap_or_default()
        .into_iter()
        .filter(|e| e.reason.as_deref() == Some(reason))
        .collect()
}

/// The notes (messages) of [`events_with_reason`].
pub async fn event_notes(
    client: &Client,
    namespace: &str,
    name: &str,
    reason: &str,
) -> Vec<String> {
    events_with_reason(client, namespace, name, reason)
        .await
        .into_iter()
        .map(|e| e.note.unwrap_or_default())
        .collect()
}
