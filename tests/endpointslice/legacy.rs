//! The legacy Endpoints controller.

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn legacy_endpoints_object() -> Result<()> {
    let e = env("es-legacy").await?;
    let _ep = start_endpoints(&e.client, &e.ns);
    e.service("web", basic_spec(serde_json::json!({}))).await?;
    e.pod(0, "web", true, 8080).await?;
    e.pod(1, "web", false, 8080).await?;
    let api: Api<Endpoints> = Api::namespaced(e.client.clone(), &e.ns);
    let ep = wait_for("Endpoints with one ready, one not", WAIT, || {
        let api = api.clone();
        async move {
            let ep = api.get_opt("web").await.ok().flatten()?;
            let subsets = ep.subsets.clone().unwrap_or_default();
            let ready: usize = subsets
                .iter()
                .map(|s| s.addresses.as_ref().map_or(0, Vec::len))
                .sum();
            let nr: usize = subsets
                .iter()
                .map(|s| s.not_ready_addresses.as_ref().map_or(0, Vec::len))
                .sum();
            (ready == 1 && nr == 1).then_some(ep)
        }
    })
    .await?;
    let subsets = ep.subsets.unwrap_or_default();
    assert_eq!(subsets[0].ports.as_ref().map(|p| p[0].port), Some(8080));
    assert_eq!(
        subsets[0].addresses.as_ref().map(|a| a[0].ip.clone()),
        Some(pod_ip(0))
    );
    // Service deleted: Endpoints deleted.
    let svcs: Api<Service> = Api::namespaced(e.client.clone(), &e.ns);
    svcs.delete("web", &DeleteParams::default()).await?;
    wait_for("Endpoints removed", WAIT, || {
        let api = api.clone();
        async move {
            api.get_opt("web")
                .await
                .ok()
                .filter(|x| x.is_none())
                .map(|_| ())
        }
    })
    .await?;
    Ok(())
}

/// Issue 16: a v1.33+ kube-controller-manager labels the Endpoints it maintains
/// `endpoints.kubernetes.io/managed-by: endpoint-controller` (we wrote a value of our own, so
/// the two controllers would relabel each other's object), and sets the trigger time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn legacy_endpoints_labelled_as_upstream_with_trigger_time() -> Result<()> {
    use super::trigger_time::{api_time, at, ready_since, trigger_of};
    let e = env("es-legacy-label").await?;
    let _ep = start_endpoints(&e.client, &e.ns);
    let svc = e.service("web", basic_spec(serde_json::json!({}))).await?;
    let created = api_time(
        svc.metadata
            .creation_timestamp
            .as_ref()
            .ok_or_else(|| anyhow::anyhow!("no creationTimestamp"))?,
    )?;
    let api: Api<Endpoints> = Api::namespaced(e.client.clone(), &e.ns);
    let wait = |what: &'static str, want: String, ready: usize| {
        let api = api.clone();
        wait_for(what, WAIT, move || {
            let (api, want) = (api.clone(), want.clone());
            async move {
                let ep = api.get_opt("web").await.ok().flatten()?;
                let n: usize = ep
                    .subsets
                    .iter()
                    .flatten()
                    .map(|s| s.addresses.as_ref().map_or(0, Vec::len))
                    .sum();
                (n == ready && trigger_of(&ep.metadata.annotations) == Some(want.as_str()))
                    .then_some(ep)
            }
        })
    };
    let ep = wait("Endpoints of a new Service", created, 0).await?;
    let labels = ep.metadata.labels.clone().unwrap_or_default();
    assert_eq!(
        labels
            .get("endpoints.kubernetes.io/managed-by")
            .map(String::as_str),
        Some("endpoint-controller")
    );
    assert_eq!(
        labels.get("scm-test").map(String::as_str),
        Some(e.ns.as_str())
    );
    let mut b = PodBuilder::new(&e.ns, "web-0", &[("app", "web")]);
    b.node_name = Some(e.node(0));
    b.ports = vec![(Some("http".into()), 8080, "TCP".into())];
    create_pod(&e.client, &b).await?;
    let t1 = at(-1800)?;
    ready_since(&e.client, &e.ns, "web-0", true, &pod_ip(0), &t1).await?;
    let ep = wait("Endpoints after the pod's transition", api_time(&t1)?, 1).await?;
    assert_eq!(
        ep.metadata
            .labels
            .unwrap_or_default()
            .get("endpoints.kubernetes.io/managed-by")
            .map(String::as_str),
        Some("endpoint-controller")
    );
    Ok(())
}

/// Issue 16: a failed Endpoints write gets upstream's Warning Event on the Endpoints object
/// (`FailedToCreateEndpoint` / `FailedToUpdateEndpoint`, with upstream's message), and is
/// retried.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_endpoints_writes_get_upstreams_events_and_are_retried() -> Result<()> {
    use reqwest::Method;
    use test_support::apiproxy::{Action, ApiProxy, Match};
    use test_support::events::events_with_reason;
    let e = env("es-legacy-events").await?;
    let proxy = ApiProxy::start(e.client.clone()).await?;
    let via = Client::try_from(proxy.config()?)?;
    let fault = Action::Status {
        code: 500,
        retry_after: None,
    };
    proxy.fail(Match::writes(Method::POST, "endpoints"), fault.clone(), 1);
    let _ep = start_endpoints(&via, &e.ns);
    e.service("web", basic_spec(serde_json::json!({}))).await?;
    let (client, ns) = (e.client.clone(), e.ns.clone());
    let event = |reason: &'static str| {
        let (client, ns) = (client.clone(), ns.clone());
        wait_for(reason, WAIT, move || {
            let (client, ns) = (client.clone(), ns.clone());
            async move {
                events_with_reason(&client, &ns, "web", reason)
                    .await
                    .into_iter()
                    .find(|ev| {
                        ev.regarding.as_ref().and_then(|r| r.kind.as_deref()) == Some("Endpoints")
                    })
            }
        })
    };
    let ev = event("FailedToCreateEndpoint").await?;
    let note = ev.note.unwrap_or_default();
    assert!(
        note.starts_with(&format!(
            "Failed to create endpoint for service {}/web: ",
            e.ns
        )),
        "{note}"
    );
    assert_eq!(ev.type_.as_deref(), Some("Warning"));
    let api: Api<Endpoints> = Api::namespaced(e.client.clone(), &e.ns);
    wait_for("Endpoints created on the retry", WAIT, || {
        let api = api.clone();
        async move { api.get_opt("web").await.ok().flatten() }
    })
    .await?;

    proxy.fail(Match::writes(Method::PUT, "endpoints"), fault, 1);
    e.pod(0, "web", true, 8080).await?;
    let ev = event("FailedToUpdateEndpoint").await?;
    let note = ev.note.unwrap_or_default();
    assert!(
        note.starts_with(&format!("Failed to update endpoint {}/web: ", e.ns)),
        "{note}"
    );
    wait_for("the pod's address on the retry", WAIT, || {
        let api = api.clone();
        async move {
            let ep = api.get_opt("web").await.ok().flatten()?;
            let n: usize = ep
                .subsets
                .iter()
                .flatten()
                .map(|s| s.addresses.as_ref().map_or(0, Vec::len))
                .sum();
            (n == 1).then_some(())
        }
    })
    .await?;
    assert_eq!(proxy.injected(), 2, "both faults were used");
    Ok(())
}
