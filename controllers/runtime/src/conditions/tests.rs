use super::*;
use k8s_openapi::api::core::v1::ServiceStatus;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

const T: &str = "EndpointsReady";
const OTHER: &str = "LoadBalancerReady";

fn at(s: i64) -> Timestamp {
    Timestamp::from_second(s).unwrap()
}

fn svc(generation: i64, conditions: Vec<Condition>) -> Service {
    Service {
        metadata: ObjectMeta {
            name: Some("web".into()),
            namespace: Some("ns".into()),
            generation: Some(generation),
            ..Default::default()
        },
        status: Some(ServiceStatus {
            conditions: Some(conditions),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn with(s: &Service, applied: Vec<Condition>) -> Service {
    let mut s = s.clone();
    let st = s.status.get_or_insert_with(Default::default);
    let mut c: Vec<Condition> = st
        .conditions
        .take()
        .unwrap_or_default()
        .into_iter()
        .filter(|c| c.type_ != T)
        .collect();
    c.extend(applied);
    st.conditions = Some(c);
    s
}

#[test]
fn a_new_condition_is_written_once_then_steady() {
    let s = svc(1, vec![]);
    let d = [Desired::failed(T, "NoReadyPods", "0 of 2 ready")];
    let applied = transition(&s, &[T], &d, at(100)).expect("first write");
    assert_eq!(applied.len(), 1);
    assert_eq!(applied[0].status, "False");
    assert_eq!(applied[0].observed_generation, Some(1));
    assert_eq!(applied[0].last_transition_time, Time(at(100)));
    let s = with(&s, applied);
    assert_eq!(
        transition(&s, &[T], &d, at(200)),
        None,
        "steady state: no write"
    );
}

#[test]
fn transition_time_moves_only_when_status_flips() {
    let s = with(
        &svc(1, vec![]),
        transition(
            &svc(1, vec![]),
            &[T],
            &[Desired::failed(T, "NoReadyPods", "a")],
            at(100),
        )
        .unwrap(),
    );
    // Same status, another reason: written, time kept.
    let d = [Desired::failed(T, "PodsWithoutIP", "b")];
    let c = transition(&s, &[T], &d, at(200)).unwrap();
    assert_eq!(c[0].reason, "PodsWithoutIP");
    assert_eq!(c[0].last_transition_time, Time(at(100)));
    let s = with(&s, c);
    // Flip: new time.
    let c = transition(&s, &[T], &[Desired::ok(T, "Ready", "1 ready")], at(300)).unwrap();
    assert_eq!(c[0].status, "True");
    assert_eq!(c[0].last_transition_time, Time(at(300)));
}

#[test]
fn a_generation_change_rewrites_observed_generation_only() {
    let d = [Desired::ok(T, "Ready", "ok")];
    let s = with(
        &svc(1, vec![]),
        transition(&svc(1, vec![]), &[T], &d, at(100)).unwrap(),
    );
    let mut s2 = s.clone();
    s2.metadata.generation = Some(2);
    let c = transition(&s2, &[T], &d, at(200)).expect("observedGeneration behind");
    assert_eq!(c[0].observed_generation, Some(2));
    assert_eq!(c[0].last_transition_time, Time(at(100)));
}

#[test]
fn removal_applies_an_empty_set_and_ignores_other_managers_types() {
    let other = Condition {
        type_: OTHER.into(),
        status: "True".into(),
        reason: "Published".into(),
        message: String::new(),
        observed_generation: Some(1),
        last_transition_time: Time(at(1)),
    };
    let s = svc(1, vec![other.clone()]);
    // Nothing of ours there and none wanted: nothing to do, whatever others hold.
    assert_eq!(transition(&s, &[T], &[], at(5)), None);
    let s = with(
        &s,
        transition(&s, &[T], &[Desired::ok(T, "Ready", "")], at(5)).unwrap(),
    );
    assert_eq!(
        transition(&s, &[T], &[], at(6)),
        Some(vec![]),
        "ours removed by applying none"
    );
}
