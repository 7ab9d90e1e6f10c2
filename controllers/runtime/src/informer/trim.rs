//! The one trim each kind gets on arrival: what no controller reads is dropped before the
//! object is stored, so it is never held at all. A list read from JSON keeps room for at least
//! four entries; lists are shrunk to their length, which over every cached object adds up.

use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;

/// Drops managedFields from any object (no controller reads them).
pub fn meta<K: kube::Resource>(mut o: K) -> K {
    o.meta_mut().managed_fields = None;
    o
}

/// Drops managedFields from a Service and shrinks its lists. The status stays: the
/// load-balancer controller reads `status.loadBalancer`.
pub fn service(mut svc: Service) -> Service {
    svc.metadata.managed_fields = None;
    if let Some(spec) = svc.spec.as_mut() {
        for v in [spec.cluster_ips.as_mut(), spec.ip_families.as_mut()]
            .into_iter()
            .flatten()
        {
            v.shrink_to_fit();
        }
        if let Some(p) = spec.ports.as_mut() {
            p.shrink_to_fit();
        }
    }
    svc
}

/// Drops managedFields and the parts of a Node's status no controller reads: its images (often
/// the largest part of a Node), attached volumes, daemon endpoints and config.
pub fn node(mut n: Node) -> Node {
    n.metadata.managed_fields = None;
    if let Some(st) = n.status.as_mut() {
        st.images = None;
        st.volumes_attached = None;
        st.volumes_in_use = None;
        st.config = None;
        st.daemon_endpoints = None;
    }
    n
}

/// Drops managedFields from an EndpointSlice and shrinks its lists.
pub fn endpoint_slice(mut s: EndpointSlice) -> EndpointSlice {
    s.metadata.managed_fields = None;
    if let Some(o) = s.metadata.owner_references.as_mut() {
        o.shrink_to_fit();
    }
    if let Some(p) = s.ports.as_mut() {
        p.shrink_to_fit();
    }
    if let Some(eps) = s.endpoints.as_mut() {
        eps.shrink_to_fit();
        for e in eps {
            e.addresses.shrink_to_fit();
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{ContainerImage, NodeStatus};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ManagedFieldsEntry, ObjectMeta};

    #[test]
    fn node_keeps_what_controllers_read_and_drops_images() {
        let n = Node {
            metadata: ObjectMeta {
                name: Some("n1".into()),
                labels: Some([("topology.kubernetes.io/zone".into(), "z1".into())].into()),
                managed_fields: Some(vec![ManagedFieldsEntry::default()]),
                ..Default::default()
            },
            status: Some(NodeStatus {
                images: Some(vec![ContainerImage::default()]),
                allocatable: Some([("cpu".into(), Default::default())].into()),
                ..Default::default()
            }),
            ..Default::default()
        };
        let t = node(n);
        assert!(t.metadata.managed_fields.is_none());
        assert!(t.metadata.labels.is_some());
        let st = t.status.expect("status kept");
        assert!(st.images.is_none());
        assert!(st.allocatable.is_some());
    }
}
