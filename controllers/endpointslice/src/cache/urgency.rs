//! Which pod changes are urgent: under a tight API budget the writes that stop traffic going to
//! a pod that cannot serve go before those that only add capacity or resync.

use scm_runtime::Priority;

use crate::common::{PodRecord, PodView};

/// Whether traffic may be sent to the pod now: its endpoint is in slices as ready.
fn serving(p: &PodRecord) -> bool {
    let has_ip = p.pod_ip().is_some_and(|s| !s.is_empty()) || p.pod_ips().next().is_some();
    p.ready() && !p.terminal() && !p.deleting() && has_ip
}

/// The priority of the Services a pod change from `old` to `new` touches (`new` None: the pod
/// is gone). Urgent when a serving pod stops serving (not ready, being deleted, deleted,
/// terminal, no IP) or moves to other addresses: until the slices change, traffic goes to an
/// address that cannot answer. Everything else (a pod becoming ready, relabels, ports) only
/// adds capacity or detail and stays ordinary.
pub fn pod_change_priority(old: Option<&PodRecord>, new: Option<&PodRecord>) -> Priority {
    let Some(old) = old.filter(|o| serving(o)) else {
        return Priority::Ordinary;
    };
    match new {
        Some(n) if serving(n) && n.pod_ips().eq(old.pod_ips()) && n.pod_ip() == old.pod_ip() => {
            Priority::Ordinary
        }
        _ => Priority::Urgent,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{Pod, PodCondition, PodIP, PodStatus};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};

    #[derive(Clone, Copy, Debug)]
    enum S {
        Ready,
        NotReady,
        Deleting,
        Failed,
        Succeeded,
        NoIp,
        OtherIp,
        Relabelled,
    }

    fn rec(s: S) -> PodRecord {
        let ip = if matches!(s, S::OtherIp) {
            "10.0.0.2"
        } else {
            "10.0.0.1"
        };
        let app = if matches!(s, S::Relabelled) { "b" } else { "a" };
        PodRecord::from_pod(Pod {
            metadata: ObjectMeta {
                namespace: Some("ns".into()),
                name: Some("p".into()),
                labels: Some([("app".to_string(), app.to_string())].into()),
                deletion_timestamp: matches!(s, S::Deleting).then(|| Time(Default::default())),
                ..Default::default()
            },
            status: Some(PodStatus {
                phase: Some(
                    match s {
                        S::Failed => "Failed",
                        S::Succeeded => "Succeeded",
                        _ => "Running",
                    }
                    .into(),
                ),
                pod_ip: (!matches!(s, S::NoIp)).then(|| ip.into()),
                pod_ips: (!matches!(s, S::NoIp)).then(|| vec![PodIP { ip: ip.into() }]),
                conditions: Some(vec![PodCondition {
                    type_: "Ready".into(),
                    status: if matches!(s, S::NotReady) {
                        "False"
                    } else {
                        "True"
                    }
                    .into(),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
            ..Default::default()
        })
    }

    #[test]
    fn only_a_serving_pod_that_stops_serving_is_urgent() {
        use Priority::{Ordinary as O, Urgent as U};
        let cases: &[(Option<S>, Option<S>, Priority)] = &[
            // Traffic is going to a pod that cannot serve.
            (Some(S::Ready), Some(S::NotReady), U),
            (Some(S::Ready), Some(S::Deleting), U),
            (Some(S::Ready), None, U),
            (Some(S::Ready), Some(S::Failed), U),
            (Some(S::Ready), Some(S::Succeeded), U),
            (Some(S::Ready), Some(S::NoIp), U),
            (Some(S::Ready), Some(S::OtherIp), U),
            // Capacity, detail, or a pod that was not serving anyway.
            (None, Some(S::Ready), O),
            (Some(S::NotReady), Some(S::Ready), O),
            (Some(S::NotReady), None, O),
            (Some(S::NotReady), Some(S::Deleting), O),
            (Some(S::Deleting), None, O),
            (Some(S::Failed), None, O),
            (Some(S::NoIp), Some(S::Ready), O),
            (Some(S::Ready), Some(S::Ready), O),
            (Some(S::Ready), Some(S::Relabelled), O),
            (None, None, O),
        ];
        for &(old, new, want) in cases {
            let (o, n) = (old.map(rec), new.map(rec));
            assert_eq!(
                pod_change_priority(o.as_ref(), n.as_ref()),
                want,
                "{old:?} -> {new:?}"
            );
        }
    }

    #[test]
    fn the_index_gives_every_service_of_the_change_its_priority_and_a_relist_the_highest() {
        use crate::cache::PodServiceIndex;
        use k8s_openapi::api::core::v1::{Service, ServiceSpec};
        use scm_runtime::ObjectKey;
        use scm_runtime::informer::Change;
        use std::sync::Arc;
        let mut idx = PodServiceIndex::default();
        idx.put_service(Arc::new(Service {
            metadata: ObjectMeta {
                namespace: Some("ns".into()),
                name: Some("web".into()),
                ..Default::default()
            },
            spec: Some(ServiceSpec {
                selector: Some([("app".to_string(), "a".to_string())].into()),
                ..Default::default()
            }),
            ..Default::default()
        }));
        let web = ObjectKey::new("ns", "web");
        let apply = |idx: &mut PodServiceIndex, s: S| {
            idx.apply_pod_change_by_priority(&Change::Apply(Arc::new(rec(s))))
        };
        assert_eq!(
            apply(&mut idx, S::Ready),
            vec![(web.clone(), Priority::Ordinary)]
        );
        assert_eq!(
            apply(&mut idx, S::NotReady),
            vec![(web.clone(), Priority::Urgent)]
        );
        assert_eq!(
            apply(&mut idx, S::Ready),
            vec![(web.clone(), Priority::Ordinary)]
        );
        // A relist that misses the deletion of a serving pod: urgent.
        assert_eq!(
            idx.apply_pod_change_by_priority(&Change::Relisted(vec![])),
            vec![(web.clone(), Priority::Urgent)]
        );
        assert_eq!(
            apply(&mut idx, S::Ready),
            vec![(web.clone(), Priority::Ordinary)]
        );
        assert_eq!(
            idx.apply_pod_change_by_priority(&Change::Delete(Arc::new(rec(S::Ready)))),
            vec![(web, Priority::Urgent)]
        );
    }
}
