//! Property tests: random pod churn converges and keeps the invariants.

use super::*;

#[derive(Clone, Debug)]
struct PodState {
    present: bool,
    ready: bool,
    terminating: bool,
    port: i32,
}

fn pod_state() -> impl Strategy<Value = PodState> {
    (
        any::<bool>(),
        any::<bool>(),
        prop::bool::weighted(0.1),
        prop::sample::select(vec![8080, 9090]),
    )
        .prop_map(|(present, ready, terminating, port)| PodState {
            present,
            ready,
            terminating,
            port,
        })
}

fn materialise(states: &[PodState]) -> Vec<Pod> {
    states
        .iter()
        .enumerate()
        .filter(|(_, s)| s.present)
        .map(|(i, s)| {
            let mut p = pod(i, s.ready, s.port);
            if s.terminating {
                p.metadata.deletion_timestamp =
                    Some(Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH));
            }
            p
        })
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Through any sequence of pod changes: every ready pod appears exactly once with the
    /// right port, no slice is over max, applying a plan yields a fixed point, and the
    /// placeholder exists only when there are no endpoints.
    #[test]
    fn converges_and_invariants_hold(
        steps in prop::collection::vec(prop::collection::vec(pod_state(), 0..40), 1..6),
        max in 1usize..12,
        dual in any::<bool>(),
    ) {
        let mut s = svc();
        if dual && let Some(spec) = s.spec.as_mut() {
            spec.ip_families = Some(vec!["IPv4".into(), "IPv6".into()]);
        }
        let mut w = World::new(s, vec![], max);
        for states in steps {
            w.pods = materialise(&states);
            w.converge();
            prop_assert_eq!(w.converge(), 0, "not a fixed point");
            let families: Vec<&str> = if dual { vec!["IPv4", "IPv6"] } else { vec!["IPv4"] };
            for at in families {
                let eps = w.endpoints(at);
                let mut seen = BTreeSet::new();
                for e in &eps {
                    prop_assert!(seen.insert(ep_name(e)), "duplicate endpoint {}", ep_name(e));
                }
                for (i, st) in states.iter().enumerate() {
                    let name = format!("p{i}");
                    let want_ready = st.present && st.ready && !st.terminating;
                    let e = eps.iter().find(|e| ep_name(e) == name);
                    prop_assert_eq!(e.is_some(), st.present, "presence of {}", name);
                    if let Some(e) = e {
                        prop_assert_eq!(e.conditions.as_ref().and_then(|c| c.ready), Some(want_ready));
                    }
                }
                let typed: Vec<&EndpointSlice> = w.slices.iter().filter(|s| s.address_type == at).collect();
                for sl in &typed {
                    let n = sl.endpoints.as_ref().map_or(0, Vec::len);
                    prop_assert!(n <= max);
                    let port = sl.ports.as_ref().and_then(|p| p.first()).and_then(|p| p.port);
                    for e in sl.endpoints.iter().flatten() {
                        let i: usize = ep_name(e)[1..].parse().unwrap_or(usize::MAX);
                        prop_assert_eq!(port, states.get(i).map(|s| s.port));
                    }
                }
                if eps.is_empty() {
                    prop_assert_eq!(typed.len(), 1, "exactly one placeholder");
                } else {
                    prop_assert!(typed.iter().all(|s| s.endpoints.as_ref().is_some_and(|e| !e.is_empty())));
                }
            }
        }
    }

    /// Writes are bounded: a change of k pods touches at most k slices per family (plus one
    /// create when new endpoints overflow), never rewriting untouched slices.
    #[test]
    fn churn_is_local(
        n in 1usize..300,
        flips in prop::collection::btree_set(0usize..300, 1..5),
    ) {
        let mut states: Vec<PodState> = (0..n).map(|_| PodState { present: true, ready: true, terminating: false, port: 8080 }).collect();
        let mut w = World::new(svc(), materialise(&states), 100);
        w.converge();
        let flips: Vec<usize> = flips.into_iter().filter(|i| *i < n).collect();
        for i in &flips {
            states[*i].ready = false;
        }
        w.pods = materialise(&states);
        let p = w.plan();
        prop_assert!(p.create.is_empty() && p.delete.is_empty());
        prop_assert!(p.update.len() <= flips.len());
    }
}
