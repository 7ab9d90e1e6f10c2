//! The allocator's condition on a Service ([`super::Allocator::CONDITION`]): what it should be
//! from the Service's findings, by the same due rule as their Events.

use std::time::SystemTime;

use k8s_openapi::api::core::v1::Service;
use scm_runtime::conditions::{Desired, Writer};
use scm_runtime::{ControllerContext, ObjectKey};

use super::{Allocator, FirstSeen, MirrorOf, Shell};
use crate::mirror::Report;

/// Hands the condition `svc` should hold after this reconcile to the shell's writer (started
/// on first use), which writes only on a transition and only while leading.
pub(super) fn want<A: Allocator>(
    ctx: &ControllerContext,
    shell: &Shell<A>,
    key: &ObjectKey,
    svc: &Service,
    findings: &[A::Finding],
) {
    let Some(t) = A::CONDITION else { return };
    let desired = wanted_condition(&shell.first_seen, t, key, findings, SystemTime::now());
    // `&'static` as the writer needs it: the slice of the (constant) Option.
    let owned: &'static [&'static str] = const { &A::CONDITION }.as_slice();
    shell
        .conditions
        .get_or_init(|| Writer::start(ctx, owned))
        .set(svc, owned, desired);
}

/// Services that show our condition but have no finding in `next`: their finding went while we
/// were not running or not leading, so they are looked at again and the condition goes.
pub(super) fn stale<A: Allocator>(services: &[&Service], next: &MirrorOf<A>) -> Vec<ObjectKey> {
    let Some(t) = A::CONDITION else {
        return vec![];
    };
    // Only Services showing the condition get a key built: most show none.
    services
        .iter()
        .filter(|s| shows_condition(s, t))
        .map(|s| ObjectKey::of(*s))
        .filter(|k| !next.findings.contains_key(k))
        .collect()
}

/// The condition of type `t` a Service with `findings` should hold at `now`: `False` once a
/// finding is due (by the rule its Event follows: `first_seen`), with the first due one's
/// reason and every due one's message; none (ours removed) while nothing is due.
pub fn wanted_condition<F: Report>(
    first_seen: &FirstSeen,
    t: &'static str,
    key: &ObjectKey,
    findings: &[F],
    now: SystemTime,
) -> Vec<Desired> {
    let due: Vec<&F> = findings
        .iter()
        .filter(|f| first_seen.due(key, *f) <= now)
        .collect();
    let Some(first) = due.first() else {
        return vec![];
    };
    let message: Vec<String> = due.iter().map(|f| f.message()).collect();
    vec![Desired::failed(t, first.reason(), message.join("; "))]
}

/// Whether `svc` shows a condition of type `t`.
fn shows_condition(svc: &Service, t: &str) -> bool {
    svc.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == t))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::time::Duration;

    use super::*;

    use super::super::test_finding::{F, t};

    #[test]
    fn false_once_a_finding_is_due_and_none_without_findings() {
        let seen = FirstSeen::default();
        let key = ObjectKey::new("a", "s");
        let none: Vec<F> = vec![];
        assert!(wanted_condition(&seen, "C", &key, &none, t(0)).is_empty());
        let quick = F::new("Out", "out of range", Duration::ZERO);
        let slow = F::new("NotAllocated", "not allocated", Duration::from_secs(1));
        let both = vec![slow.clone(), quick.clone()];
        seen.note(&BTreeMap::from([(key.clone(), both.clone())]), t(0));
        // The waiting one is not in the condition yet; the one that never waits is.
        assert_eq!(
            wanted_condition(&seen, "C", &key, &both, t(0)),
            vec![Desired::failed("C", "Out", "out of range")]
        );
        // Once settled, the first due finding gives the reason and every due one its message.
        assert_eq!(
            wanted_condition(&seen, "C", &key, &both, t(1)),
            vec![Desired::failed(
                "C",
                "NotAllocated",
                "not allocated; out of range"
            )]
        );
        // A finding still settling alone: no condition (it may be gone before it is due).
        let only = vec![slow];
        assert!(wanted_condition(&seen, "C", &key, &only, t(0)).is_empty());
    }

    #[test]
    fn shows_only_the_given_type() {
        use k8s_openapi::api::core::v1::ServiceStatus;
        use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
        let mut svc = Service::default();
        assert!(!shows_condition(&svc, "C"));
        svc.status = Some(ServiceStatus {
            conditions: Some(vec![Condition {
                type_: "Other".into(),
                status: "False".into(),
                reason: "R".into(),
                message: String::new(),
                observed_generation: None,
                last_transition_time: k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                    k8s_openapi::jiff::Timestamp::UNIX_EPOCH,
                ),
            }]),
            ..Default::default()
        });
        assert!(!shows_condition(&svc, "C"));
        assert!(shows_condition(&svc, "Other"));
    }
}
