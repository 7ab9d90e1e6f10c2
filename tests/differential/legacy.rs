//! Legacy Endpoints, ours against kube-controller-manager's `endpoint` controller. There is one
//! Endpoints object per Service, so the two cannot both write it here; kube-controller-manager
//! writes it, and our core (`endpoints_core::plan`), given the same Service, pods and that
//! object, must find nothing to change: same subsets and the same labels, upstream's
//! `endpoints.kubernetes.io/managed-by: endpoint-controller` included.

use std::time::Duration;

use anyhow::{Result, bail};
use endpointslice::endpoints_core::{self, ENDPOINTS_MANAGED_BY, EndpointsPlan};
use k8s_openapi::api::core::v1::{Endpoints, Pod, Service};
use kube::Client;
use kube::api::{Api, ListParams};
use tokio::time::Instant;

/// Upstream's value of `endpoints.kubernetes.io/managed-by` (v1.33+).
const UPSTREAM_ENDPOINTS_MANAGER: &str = "endpoint-controller";

/// `Ok(true)`: compared and equal; `Ok(false)`: nothing to compare (no such Service, or no
/// selector); `Err`: the difference.
async fn check_service(client: &Client, ns: &str, name: &str) -> Result<Result<bool, String>> {
    let Some(svc) = Api::<Service>::namespaced(client.clone(), ns)
        .get_opt(name)
        .await?
    else {
        return Ok(Ok(false));
    };
    let Some(selector) = svc.spec.as_ref().and_then(|s| s.selector.clone()) else {
        return Ok(Ok(false));
    };
    let Some(ep) = Api::<Endpoints>::namespaced(client.clone(), ns)
        .get_opt(name)
        .await?
    else {
        return Ok(Err(format!("{name}: no Endpoints from upstream yet")));
    };
    let manager = ep
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(ENDPOINTS_MANAGED_BY));
    if manager.map(String::as_str) != Some(UPSTREAM_ENDPOINTS_MANAGER) {
        return Ok(Err(format!(
            "{name}: upstream's Endpoints labelled {ENDPOINTS_MANAGED_BY}={manager:?}"
        )));
    }
    let sel: Vec<String> = selector.iter().map(|(k, v)| format!("{k}={v}")).collect();
    let pods = Api::<Pod>::namespaced(client.clone(), ns)
        .list(&ListParams::default().labels(&sel.join(",")))
        .await?
        .items;
    let refs: Vec<&Pod> = pods.iter().collect();
    Ok(match endpoints_core::plan(&svc, &refs, Some(&ep), None) {
        EndpointsPlan::Unchanged => Ok(true),
        EndpointsPlan::Create(ours) | EndpointsPlan::Update(ours) => Err(format!(
            "{name}: ours would rewrite upstream's Endpoints\nupstream labels {:?} subsets {:?}\nours labels {:?} subsets {:?}",
            ep.metadata.labels, ep.subsets, ours.metadata.labels, ours.subsets
        )),
    })
}

/// Polls until our core agrees with upstream's Endpoints of every Service (kube-controller-
/// manager may still be catching up when the slices have converged); returns how many
/// Endpoints objects were compared.
pub async fn check(client: &Client, ns: &str, svcs: &[String], what: &str) -> Result<usize> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let mut diff = None;
        let mut compared = 0;
        for s in svcs {
            match check_service(client, ns, s).await? {
                Ok(c) => compared += usize::from(c),
                Err(d) => {
                    diff = Some(d);
                    break;
                }
            }
        }
        match diff {
            None => return Ok(compared),
            Some(d) if Instant::now() >= deadline => {
                bail!("{what}: legacy Endpoints differ: {d}")
            }
            Some(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}
