//! `endpoints.kubernetes.io/last-change-trigger-time` on what the EndpointSlice and legacy
//! Endpoints controllers write (issue 16): the Service's creation on its first sync, then the
//! Ready `lastTransitionTime` of the pod whose change made the write.

use super::*;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;

const ANNOTATION: &str = "endpoints.kubernetes.io/last-change-trigger-time";

/// The API's spelling of a time (`metav1.Time`: RFC 3339, whole seconds, UTC): what the
/// annotation must read for a trigger at that time.
pub(crate) fn api_time(t: &Time) -> Result<String> {
    match serde_json::to_value(t)? {
        serde_json::Value::String(s) => Ok(s),
        v => bail!("time serialised as {v}"),
    }
}

/// A time `offset` seconds from now, whole seconds as the API keeps them.
pub(crate) fn at(offset: i64) -> Result<Time> {
    Ok(Time(Timestamp::from_second(
        Timestamp::now().as_second() + offset,
    )?))
}

/// Sets a pod Running with one IP and its Ready condition changed at `since`, as a kubelet
/// records a transition (the harness's `set_pod_status` leaves `lastTransitionTime` unset).
pub(crate) async fn ready_since(
    client: &Client,
    ns: &str,
    name: &str,
    ready: bool,
    ip: &str,
    since: &Time,
) -> Result<()> {
    let status = if ready { "True" } else { "False" };
    let patch = serde_json::json!({"status": {
        "phase": "Running",
        "podIP": ip,
        "podIPs": [{"ip": ip}],
        "conditions": [{"type": "Ready", "status": status, "lastTransitionTime": since}],
    }});
    Api::<Pod>::namespaced(client.clone(), ns)
        .patch_status(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await?;
    Ok(())
}

pub(crate) fn trigger_of(a: &Option<BTreeMap<String, String>>) -> Option<&str> {
    a.as_ref()
        .and_then(|a| a.get(ANNOTATION))
        .map(String::as_str)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slices_carry_the_service_creation_then_the_pods_ready_transition() -> Result<()> {
    let e = env("es-trigger").await?;
    let _c = start_slices(&e.client, &e.ns, EndpointSliceConfig::default());
    let svc = e.service("web", basic_spec(serde_json::json!({}))).await?;
    let created = api_time(
        svc.metadata
            .creation_timestamp
            .as_ref()
            .ok_or_else(|| anyhow::anyhow!("no creationTimestamp"))?,
    )?;
    // First sync of a new Service: its creation time, on the placeholder slice.
    e.wait_slices("web", "placeholder with the Service's creation", |s| {
        s.len() == 1 && trigger_of(&s[0].metadata.annotations) == Some(created.as_str())
    })
    .await?;

    // A pod made ready an hour ago (a time nothing else could produce).
    let mut b = PodBuilder::new(&e.ns, "web-0", &[("app", "web")]);
    b.node_name = Some(e.node(0));
    b.ports = vec![(Some("http".into()), 8080, "TCP".into())];
    create_pod(&e.client, &b).await?;
    let t1 = at(-3600)?;
    ready_since(&e.client, &e.ns, "web-0", true, &pod_ip(0), &t1).await?;
    let want = api_time(&t1)?;
    e.wait_slices("web", "the pod's Ready transition", |s| {
        ready_count(s) == 1
            && s.iter()
                .all(|s| trigger_of(&s.metadata.annotations) == Some(want.as_str()))
    })
    .await?;

    // It stops being ready 10 s later: that transition is the trigger.
    let t2 = at(-3590)?;
    ready_since(&e.client, &e.ns, "web-0", false, &pod_ip(0), &t2).await?;
    let want = api_time(&t2)?;
    e.wait_slices("web", "the pod's second transition", |s| {
        total_endpoints(s) == 1
            && ready_count(s) == 0
            && s.iter()
                .all(|s| trigger_of(&s.metadata.annotations) == Some(want.as_str()))
    })
    .await?;

    // A change no pod or Service transition explains (a label on the Service) clears it.
    let svcs: Api<Service> = Api::namespaced(e.client.clone(), &e.ns);
    svcs.patch(
        "web",
        &PatchParams::default(),
        &Patch::Merge(serde_json::json!({"metadata": {"labels": {"tier": "front"}}})),
    )
    .await?;
    e.wait_slices("web", "relabelled slice without a trigger time", |s| {
        s.iter().all(|s| {
            labels_of(&s.metadata.labels)
                .get("tier")
                .map(String::as_str)
                == Some("front")
                && trigger_of(&s.metadata.annotations).is_none()
        })
    })
    .await?;
    Ok(())
}

fn labels_of(l: &Option<BTreeMap<String, String>>) -> BTreeMap<String, String> {
    l.clone().unwrap_or_default()
}
