//! The trigger-time annotation on what a plan writes (upstream's finalize).

use super::*;
use crate::slices::trigger_time::TRIGGER_TIME_ANNOTATION;

const T0: i64 = 1_780_000_000;

fn trigger(s: &EndpointSlice) -> Option<&str> {
    s.metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(TRIGGER_TIME_ANNOTATION))
        .map(String::as_str)
}

#[test]
fn created_and_updated_slices_carry_the_sync_trigger_time() {
    let mut w = World::new(svc(), vec![pod(1, true, 8080)], 100);
    w.trigger_time = Some(T0);
    let p = w.plan();
    assert_eq!(p.create.len(), 1);
    assert_eq!(trigger(&p.create[0]), Some("2026-05-28T20:26:40Z"));
    w.apply(p);
    w.pods[0] = pod(1, false, 8080);
    w.trigger_time = Some(T0 + 1);
    let p = w.plan();
    assert_eq!(p.update.len(), 1);
    assert_eq!(trigger(&p.update[0]), Some("2026-05-28T20:26:41Z"));
}

#[test]
fn a_new_trigger_time_alone_writes_nothing() {
    let mut w = World::new(svc(), vec![pod(1, true, 8080)], 100);
    w.trigger_time = Some(T0);
    w.converge();
    w.trigger_time = Some(T0 + 60);
    assert_eq!(w.plan().writes(), 0);
}

#[test]
fn a_write_without_a_trigger_time_clears_it_and_keeps_other_annotations() {
    let mut w = World::new(svc(), vec![pod(1, true, 8080)], 100);
    w.trigger_time = Some(T0);
    w.converge();
    w.slices[0]
        .metadata
        .annotations
        .get_or_insert_with(Default::default)
        .insert("someone/else".into(), "kept".into());
    w.pods.push(pod(2, true, 8080));
    w.trigger_time = None;
    let p = w.plan();
    assert_eq!(p.update.len(), 1);
    let a = p.update[0].metadata.annotations.clone().unwrap_or_default();
    assert_eq!(trigger(&p.update[0]), None);
    assert_eq!(a.get("someone/else").map(String::as_str), Some("kept"));
}

#[test]
fn only_the_slices_written_in_the_sync_get_it() {
    // Three full slices of 2; a change to a pod of one of them rewrites that one only.
    let pods: Vec<Pod> = (0..6).map(|i| pod(i, true, 8080)).collect();
    let mut w = World::new(svc(), pods, 2);
    w.trigger_time = Some(T0);
    w.converge();
    assert_eq!(w.slices.len(), 3);
    assert!(
        w.slices
            .iter()
            .all(|s| trigger(s) == Some("2026-05-28T20:26:40Z"))
    );
    w.pods[4] = pod(4, false, 8080);
    w.trigger_time = Some(T0 + 5);
    let p = w.plan();
    assert_eq!((p.create.len(), p.update.len(), p.delete.len()), (0, 1, 0));
    w.apply(p);
    let mut times: Vec<&str> = w.slices.iter().filter_map(trigger).collect();
    times.sort();
    assert_eq!(
        times,
        vec![
            "2026-05-28T20:26:40Z",
            "2026-05-28T20:26:40Z",
            "2026-05-28T20:26:45Z"
        ]
    );
}
