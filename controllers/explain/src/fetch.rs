//! Gathers what [`crate::explain`] reads, with GET and LIST calls only: the Service, its
//! EndpointSlices, the pods its selector matches and those the slices name, every Node, and
//! the Events about it.

use std::collections::BTreeSet;

use endpointslice::common::LABEL_SERVICE_NAME;
use k8s_openapi::api::core::v1::{Event, Node, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, ListParams};
use kube::{Client, Error as KubeError};

use crate::Observed;

/// Why the objects could not be read.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// The Service does not exist.
    #[error("service {namespace}/{name} not found")]
    NotFound {
        /// Namespace.
        namespace: String,
        /// Name.
        name: String,
    },
    /// An API call failed.
    #[error("{what}: {source}")]
    Api {
        /// Which call.
        what: String,
        /// The client's error.
        #[source]
        source: KubeError,
    },
}

fn api_err(what: impl Into<String>) -> impl FnOnce(KubeError) -> FetchError {
    let what = what.into();
    move |source| FetchError::Api { what, source }
}

fn is_not_found(e: &KubeError) -> bool {
    matches!(e, KubeError::Api(s) if s.code == 404)
}

/// Reads the Service `namespace/name` and everything around it.
pub async fn observe(
    client: &Client,
    namespace: &str,
    name: &str,
    cluster_domain: &str,
) -> Result<Observed, FetchError> {
    let services: Api<Service> = Api::namespaced(client.clone(), namespace);
    let service = match services.get(name).await {
        Ok(s) => s,
        Err(e) if is_not_found(&e) => {
            return Err(FetchError::NotFound {
                namespace: namespace.into(),
                name: name.into(),
            });
        }
        Err(e) => return Err(api_err(format!("getting service {namespace}/{name}"))(e)),
    };
    let slices = Api::<EndpointSlice>::namespaced(client.clone(), namespace)
        .list(&ListParams::default().labels(&format!("{LABEL_SERVICE_NAME}={name}")))
        .await
        .map_err(api_err("listing endpointslices"))?
        .items;

    let pod_api: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let selector = service
        .spec
        .as_ref()
        .and_then(|s| s.selector.clone())
        .unwrap_or_default();
    let mut pods = if selector.is_empty() {
        vec![]
    } else {
        let sel: Vec<String> = selector.iter().map(|(k, v)| format!("{k}={v}")).collect();
        pod_api
            .list(&ListParams::default().labels(&sel.join(",")))
            .await
            .map_err(api_err("listing pods"))?
            .items
    };
    // Pods the slices name that the selector did not bring (selector-less Services, or pods
    // relabelled since): fetched one by one; one gone since is simply absent.
    let have: BTreeSet<String> = pods
        .iter()
        .filter_map(|p| p.metadata.name.clone())
        .collect();
    let named: BTreeSet<String> = slices
        .iter()
        .flat_map(|s| s.endpoints.iter().flatten())
        .filter_map(|e| e.target_ref.as_ref())
        .filter(|r| r.kind.as_deref() == Some("Pod"))
        .filter(|r| r.namespace.as_deref().is_none_or(|n| n == namespace))
        .filter_map(|r| r.name.clone())
        .filter(|n| !have.contains(n))
        .collect();
    for n in named {
        match pod_api.get(&n).await {
            Ok(p) => pods.push(p),
            Err(e) if is_not_found(&e) => {}
            Err(e) => return Err(api_err(format!("getting pod {namespace}/{n}"))(e)),
        }
    }

    let nodes = Api::<Node>::all(client.clone())
        .list(&ListParams::default())
        .await
        .map_err(api_err("listing nodes"))?
        .items;
    let events = Api::<Event>::namespaced(client.clone(), namespace)
        .list(&ListParams::default().fields(&format!(
            "involvedObject.kind=Service,involvedObject.name={name}"
        )))
        .await
        .map_err(api_err("listing events"))?
        .items;
    Ok(Observed {
        service,
        slices,
        pods,
        nodes,
        events,
        cluster_domain: cluster_domain.to_string(),
        endpoint_aware_targets: false,
    })
}
