//! A pool object's status from its compiled pool and report (pure): the counts and the `Ready`
//! and `Conflicting` conditions, keeping each condition's transition time while its status
//! holds.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;

use super::crd::{CONFLICTING, FamilyCounts, LoadBalancerIPPoolStatus, READY};
use super::plan::{Pool, PoolReport};

fn count(v: u128) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn cond(
    type_: &str,
    ok: bool,
    reason: &str,
    message: String,
    generation: Option<i64>,
) -> Condition {
    Condition {
        type_: type_.into(),
        status: if ok { "True" } else { "False" }.into(),
        reason: reason.into(),
        message,
        observed_generation: generation,
        last_transition_time: Time(Timestamp::UNIX_EPOCH),
    }
}

/// The status the pool should show. `matches_nothing`: it has selectors and no Service of ours
/// matches them (said in `Ready`'s message, since the pool still serves).
pub fn desired(
    pool: &Pool,
    report: &PoolReport,
    matches_nothing: bool,
    previous: Option<&LoadBalancerIPPoolStatus>,
    generation: Option<i64>,
    now: Timestamp,
) -> LoadBalancerIPPoolStatus {
    let ready = if !pool.invalid.is_empty() {
        cond(
            READY,
            false,
            "InvalidSpec",
            pool.invalid.join("; "),
            generation,
        )
    } else if !pool.overlaps.is_empty() {
        cond(
            READY,
            false,
            "Overlapping",
            format!(
                "overlaps pool {}: it serves nothing until that is resolved",
                pool.overlaps.join(", ")
            ),
            generation,
        )
    } else if pool.def.disabled {
        cond(
            READY,
            false,
            "Disabled",
            "spec.disabled: no new addresses; given ones stay".into(),
            generation,
        )
    } else if matches_nothing {
        cond(
            READY,
            true,
            "SelectorMatchesNothing",
            "serving, but its selectors match no LoadBalancer Service".into(),
            generation,
        )
    } else {
        cond(
            READY,
            true,
            "Serving",
            "serving addresses".into(),
            generation,
        )
    };
    let conflicting = if !pool.overlaps.is_empty() {
        cond(
            CONFLICTING,
            true,
            "Overlapping",
            format!("overlaps pool {}", pool.overlaps.join(", ")),
            generation,
        )
    } else if !report.outside.is_empty() {
        let list: Vec<String> = report
            .outside
            .iter()
            .take(10)
            .map(|(ip, who)| format!("{ip} ({who})"))
            .collect();
        let more = report.outside.len().saturating_sub(10);
        cond(
            CONFLICTING,
            true,
            "AddressesOutsidePool",
            format!(
                "{} address(es) given from this pool are no longer in it and stay with their Services: {}{}",
                report.outside.len(),
                list.join(", "),
                if more > 0 {
                    format!(" and {more} more")
                } else {
                    String::new()
                }
            ),
            generation,
        )
    } else {
        cond(
            CONFLICTING,
            false,
            "NoConflicts",
            "no conflicts".into(),
            generation,
        )
    };
    let conditions = [ready, conflicting]
        .into_iter()
        .map(|mut c| {
            let before = previous.and_then(|p| p.conditions.iter().find(|o| o.type_ == c.type_));
            c.last_transition_time = match before {
                Some(b) if b.status == c.status => b.last_transition_time.clone(),
                _ => Time(now),
            };
            c
        })
        .collect();
    LoadBalancerIPPoolStatus {
        conditions,
        allocated: FamilyCounts {
            ipv4: count(report.allocated.0),
            ipv6: count(report.allocated.1),
        },
        available: FamilyCounts {
            ipv4: count(report.available.0),
            ipv6: count(report.available.1),
        },
        observed_generation: generation,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::local::plan::{PoolDef, compile};

    fn pool(cidrs: &[&str]) -> Vec<Pool> {
        compile(&[
            PoolDef {
                name: "first".into(),
                cidrs: vec!["10.0.0.0/24".into()],
                ..PoolDef::default()
            },
            PoolDef {
                name: "p".into(),
                cidrs: cidrs.iter().map(|s| s.to_string()).collect(),
                ..PoolDef::default()
            },
        ])
    }

    fn get<'a>(s: &'a LoadBalancerIPPoolStatus, t: &str) -> &'a Condition {
        s.conditions
            .iter()
            .find(|c| c.type_ == t)
            .expect("condition")
    }

    #[test]
    fn conditions_say_why_and_keep_their_transition_time() {
        let t0 = Timestamp::from_second(1_000).expect("t0");
        let t1 = Timestamp::from_second(2_000).expect("t1");
        let ok = pool(&["10.1.0.0/30"]);
        let rep = PoolReport {
            allocated: (1, 0),
            available: (1, 0),
            outside: vec![],
        };
        let s0 = desired(&ok[1], &rep, false, None, Some(3), t0);
        assert_eq!(
            (
                get(&s0, READY).status.as_str(),
                get(&s0, READY).reason.as_str()
            ),
            ("True", "Serving")
        );
        assert_eq!(get(&s0, CONFLICTING).status, "False");
        assert_eq!(
            (s0.allocated.ipv4, s0.available.ipv4, s0.observed_generation),
            (1, 1, Some(3))
        );
        // Same status later: the transition time stays.
        let s1 = desired(&ok[1], &rep, true, Some(&s0), Some(3), t1);
        assert_eq!(get(&s1, READY).last_transition_time, Time(t0));
        assert_eq!(get(&s1, READY).reason, "SelectorMatchesNothing");
        // Shrunk under a Service: Conflicting, naming the address and its holder.
        let shrunk = PoolReport {
            outside: vec![("10.1.0.2".parse().expect("ip"), "ns/a".into())],
            ..rep.clone()
        };
        let s2 = desired(&ok[1], &shrunk, false, Some(&s1), Some(4), t1);
        let c = get(&s2, CONFLICTING);
        assert_eq!(
            (c.status.as_str(), c.reason.as_str()),
            ("True", "AddressesOutsidePool")
        );
        assert!(c.message.contains("10.1.0.2 (ns/a)"), "{}", c.message);
        assert_eq!(c.last_transition_time, Time(t1));
        // Overlapping and invalid pools are not Ready.
        let over = pool(&["10.0.0.128/25"]);
        let s3 = desired(&over[1], &PoolReport::default(), false, None, None, t0);
        assert_eq!(get(&s3, READY).reason, "Overlapping");
        assert_eq!(get(&s3, CONFLICTING).status, "True");
        let bad = pool(&["10.1.0.0/33"]);
        let s4 = desired(&bad[1], &PoolReport::default(), false, None, None, t0);
        assert_eq!(
            (
                get(&s4, READY).status.as_str(),
                get(&s4, READY).reason.as_str()
            ),
            ("False", "InvalidSpec")
        );
    }
}
