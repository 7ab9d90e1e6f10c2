//! Footprint benchmark (not a test; prints a report): the heap bytes our caches hold per pod
//! at the scalability envelope's shape, counted by a global allocator, with no API server
//! involved. It feeds the same structures the EndpointSlice controller keeps (the shared Pod,
//! Service, Node and EndpointSlice informer stores, the Service/Pod index, our slice cache)
//! and reports each one's share, so a change to one of them shows its effect in bytes.
//!
//! The process RSS the convergence benchmark reports is this plus the allocator's overhead
//! (fragmentation), the runtime and the transient cost of decoding lists.
//!
//! Run: `cargo bench -p endpointslice --bench footprint` (`SCM_FOOTPRINT_PODS`, default
//! 150,000 pods in Services of 12 with 10 of 3,012, over 5,000 Nodes).

use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicIsize, Ordering};

use endpointslice::cache::PodServiceIndex;
use endpointslice::common::{CONTROLLER_NAME, PodRecord};
use endpointslice::slice_record::SliceRecord;
use endpointslice::slice_store::Slices;
use endpointslice::slices::trigger_time::{TriggerTimes, trigger_time};
use endpointslice::slices::{SliceInput, plan};
use endpointslice::topology::ZoneRatios;
use k8s_openapi::api::core::v1::{
    Node, Pod, PodCondition, PodIP, PodStatus, Service, ServicePort, ServiceSpec,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use scm_runtime::informer::{Change, Informer, key_of, trim};
use test_support::PodBuilder;

struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);

// SAFETY: every call is forwarded to the system allocator unchanged; only a counter is added.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        LIVE.fetch_add(l.size() as isize, Ordering::Relaxed);
        // SAFETY: forwarded with the caller's layout.
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        LIVE.fetch_sub(l.size() as isize, Ordering::Relaxed);
        // SAFETY: `p` was allocated by `System` with this layout.
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        LIVE.fetch_add(new as isize - l.size() as isize, Ordering::Relaxed);
        // SAFETY: forwarded with the caller's pointer and layout.
        unsafe { System.realloc(p, l, new) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn live() -> isize {
    LIVE.load(Ordering::Relaxed)
}

const NS: &str = "bench";

fn pod(i: usize, service: &str, node: usize) -> Pod {
    let mut b = PodBuilder::new(NS, &format!("{service}-{i}"), &[("app", service)]);
    b.node_name = Some(format!("node-{node}"));
    let mut p = b.build();
    p.metadata.uid = Some(format!("{:08x}-0000-4000-8000-{:012x}", i, i));
    p.metadata.resource_version = Some((100_000 + i).to_string());
    let ip = format!("10.{}.{}.{}", (i >> 16) & 255, (i >> 8) & 255, i & 255);
    p.status = Some(PodStatus {
        phase: Some("Running".into()),
        pod_ip: Some(ip.clone()),
        pod_ips: Some(vec![PodIP { ip }]),
        conditions: Some(vec![PodCondition {
            type_: "Ready".into(),
            status: "True".into(),
            // As a kubelet records it; the trigger-time tracker keeps it per pod.
            last_transition_time: Some(Time(
                k8s_openapi::jiff::Timestamp::from_second(1_780_000_000 + i as i64)
                    .expect("in range"),
            )),
            ..Default::default()
        }]),
        ..Default::default()
    });
    p
}

fn service(name: &str) -> Service {
    Service {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some(NS.into()),
            uid: Some(format!("uid-{name}")),
            ..Default::default()
        },
        spec: Some(ServiceSpec {
            selector: Some(BTreeMap::from([("app".into(), name.into())])),
            ports: Some(vec![ServicePort {
                port: 80,
                target_port: Some(IntOrString::Int(8080)),
                protocol: Some("TCP".into()),
                ..Default::default()
            }]),
            cluster_ip: Some("10.96.0.10".into()),
            ..Default::default()
        }),
        status: None,
    }
}

/// Prints one row: what, bytes in all, bytes per pod.
fn row(what: &str, bytes: isize, pods: usize) {
    println!(
        "{what:<44} {:>10.1} MiB {:>8.0} B/pod",
        bytes as f64 / (1024.0 * 1024.0),
        bytes as f64 / pods as f64
    );
}

fn main() {
    let pods: usize = std::env::var("SCM_FOOTPRINT_PODS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(150_000);
    // The convergence benchmark's envelope shape, scaled like its `SCM_BENCH_SCALE`.
    let scale = pods as f64 / 150_000.0;
    let n = |full: usize| ((full as f64 * scale).round() as usize).max(1);
    let (small, big, big_pods) = (n(9990), n(10), 3012);
    let nodes = n(5000).max(3);
    let mut names: Vec<(String, usize)> = (0..small).map(|i| (format!("small-{i}"), 12)).collect();
    names.extend((0..big).map(|i| (format!("big-{i}"), big_pods)));
    let total: usize = names.iter().map(|(_, n)| n).sum();
    println!("{total} pods, {} Services, {nodes} Nodes", names.len());

    let t = live();
    let node_inf: Informer<Node> = Informer::detached("Node", key_of);
    node_inf.deliver(Change::Relisted(
        (0..nodes)
            .map(|i| {
                let name = format!("node-{i}");
                let zone = ["zone-a", "zone-b", "zone-c"][i % 3];
                Arc::new(trim::node(Node {
                    metadata: ObjectMeta {
                        labels: Some(BTreeMap::from([
                            ("kubernetes.io/hostname".into(), name.clone()),
                            ("topology.kubernetes.io/zone".into(), zone.into()),
                        ])),
                        name: Some(name),
                        ..Default::default()
                    },
                    ..Default::default()
                }))
            })
            .collect(),
    ));
    row("Node informer store", live() - t, total);

    let t = live();
    let svc_inf: Informer<Service> = Informer::detached("Service", key_of);
    svc_inf.deliver(Change::Relisted(
        names
            .iter()
            .map(|(n, _)| Arc::new(trim::service(service(n))))
            .collect(),
    ));
    row("Service informer store", live() - t, total);

    let t = live();
    let pod_inf: Informer<PodRecord> = Informer::detached("Pod", PodRecord::key_ref);
    let mut list = Vec::with_capacity(total);
    let mut i = 0;
    for (svc, n) in &names {
        for _ in 0..*n {
            list.push(Arc::new(PodRecord::from_pod(pod(i, svc, i % nodes))));
            i += 1;
        }
    }
    let records = live() - t;
    row("pod records", records, total);
    pod_inf.deliver(Change::Relisted(list));
    row("Pod informer store (its map)", live() - t - records, total);

    let t = live();
    let mut idx = PodServiceIndex::default();
    idx.apply_pod_change(&Change::Relisted(pod_inf.list()));
    for s in svc_inf.list() {
        idx.put_service(s);
    }
    row("Service/Pod index", live() - t, total);

    // What the EndpointSlice controller's trigger-time tracker remembers after one sync of each.
    let t = live();
    let mut tracker = TriggerTimes::default();
    for s in svc_inf.list() {
        let sel = s
            .spec
            .as_ref()
            .and_then(|sp| sp.selector.clone())
            .unwrap_or_default();
        let matched = idx.pods_for(NS, &sel);
        let pods: Vec<&PodRecord> = matched.iter().map(|p| p.as_ref()).collect();
        let (_, seen) = trigger_time(None, &s, &pods);
        drop(matched);
        tracker.record(&scm_runtime::ObjectKey::of(s.as_ref()), seen);
    }
    row("trigger-time tracker", live() - t, total);

    // The slices our controller writes for these pods, as the API server returns them.
    let t = live();
    let ratios = ZoneRatios::default();
    let zone = |_: &str| Some(Some("zone-a".to_string()));
    let mut slices: Vec<Arc<SliceRecord>> = Vec::new();
    for s in svc_inf.list() {
        let sel = s
            .spec
            .as_ref()
            .and_then(|sp| sp.selector.clone())
            .unwrap_or_default();
        let matched = idx.pods_for(NS, &sel);
        let p = plan(&SliceInput {
            service: &s,
            pods: matched.iter().map(|p| p.as_ref()).collect(),
            node_zone: &zone,
            existing: vec![],
            max_endpoints_per_slice: 100,
            controller_name: CONTROLLER_NAME,
            zone_ratios: &ratios,
            hints_populated: false,
            // A first sync's trigger time (the Service's creation): every slice written has one.
            trigger_time: Some(1_780_000_000),
        });
        for mut sl in p.create {
            let n = slices.len();
            sl.metadata.name = Some(format!(
                "{}-{n:05x}",
                s.metadata.name.as_deref().unwrap_or("")
            ));
            sl.metadata.uid = Some(format!("{n:08x}-0000-4000-8000-000000000000"));
            sl.metadata.resource_version = Some((500_000 + n).to_string());
            sl.metadata.generation = Some(1);
            slices.push(Arc::new(SliceRecord::from_slice(sl)));
        }
    }
    let slice_inf: Informer<SliceRecord> =
        Informer::detached("EndpointSlice", SliceRecord::key_ref);
    let n_slices = slices.len();
    let objects = live() - t;
    let full: usize = slices.iter().map(|s| s.full_count()).sum();
    row(
        &format!("{n_slices} EndpointSlices (records; {full} endpoints not compacted)"),
        objects,
        total,
    );
    slice_inf.deliver(Change::Relisted(slices));
    row(
        "EndpointSlice informer store (its map)",
        live() - t - objects,
        total,
    );

    let t = live();
    let ours = Slices::new(vec![CONTROLLER_NAME]);
    ours.apply_change(&Change::Relisted(slice_inf.list()));
    row("our slice cache", live() - t, total);

    println!();
    row("all of the above", live(), total);
}
