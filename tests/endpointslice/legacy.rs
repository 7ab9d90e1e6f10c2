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
