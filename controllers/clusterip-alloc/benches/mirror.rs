//! Time and peak memory to mirror 10,000 existing Services.
//!
//! 1. Pure: `Mirror::build` (ClusterIP, dual-stack /16 + /108) and the NodePort mirror over
//!    10,000 generated Services (2,000 of them NodePort).
//!    The same Services again in a `10.0.0.0/8` + IPv6 `/64` range with an IPAddress object per
//!    address (the v1.37 state): the ranges' size must not show in the peak.
//! 2. At start against the real control plane (when `bin/controlplane` exists and
//!    `SCM_BENCH_E2E` is not `0`): 10,000 Services are created through a stock kube-apiserver,
//!    then `clusterip-alloc` and `nodeport-alloc` are started and timed until their caches
//!    have synced and their gauges account for every Service; then the `ClusterIPValid`
//!    condition writes of the start and 2 s after are counted (none: every Service is healthy).
//!
//! Peak memory is the peak of live heap bytes (a counting global allocator) above the level
//! before the measured step, so it excludes the inputs that existed before.
//!
//! Run: `cargo bench -p clusterip-alloc --bench mirror`

use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Service, ServicePort, ServiceSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, PostParams};

struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(l) };
        if !p.is_null() {
            let now = LIVE.fetch_add(l.size(), Ordering::Relaxed) + l.size();
            PEAK.fetch_max(now, Ordering::Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        unsafe { System.dealloc(p, l) };
        LIVE.fetch_sub(l.size(), Ordering::Relaxed);
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn reset_peak() -> usize {
    let now = LIVE.load(Ordering::Relaxed);
    PEAK.store(now, Ordering::Relaxed);
    now
}

fn mib(b: usize) -> f64 {
    b as f64 / (1024.0 * 1024.0)
}

const N: usize = 10_000;
const NODEPORTS: usize = 2_000;

fn service(i: usize, with_values: bool) -> Service {
    let nodeport = i < NODEPORTS;
    let dual = i.is_multiple_of(5);
    let mut spec = ServiceSpec {
        selector: Some([("app".to_string(), format!("a{i}"))].into()),
        type_: Some(if nodeport { "NodePort" } else { "ClusterIP" }.into()),
        ports: Some(vec![ServicePort {
            port: 80,
            protocol: Some("TCP".into()),
            node_port: (with_values && nodeport).then(|| 30000 + i as i32),
            ..Default::default()
        }]),
        ..Default::default()
    };
    if with_values {
        let v4 = format!("10.96.{}.{}", 1 + i / 250, 1 + i % 250);
        let mut ips = vec![v4];
        let mut fams = vec!["IPv4".to_string()];
        if dual {
            ips.push(format!("fd00:10::{:x}", 0x100 + i));
            fams.push("IPv6".into());
        }
        spec.cluster_ip = Some(ips[0].clone());
        spec.cluster_ips = Some(ips);
        spec.ip_families = Some(fams);
        spec.ip_family_policy = Some(
            if dual {
                "PreferDualStack"
            } else {
                "SingleStack"
            }
            .into(),
        );
    }
    Service {
        metadata: ObjectMeta {
            namespace: Some(format!("ns{}", i % 50)),
            name: Some(format!("svc-{i}")),
            resource_version: Some("1".into()),
            ..Default::default()
        },
        spec: Some(spec),
        status: None,
    }
}

fn pure() {
    let services: Vec<Service> = (0..N).map(|i| service(i, true)).collect();
    let refs: Vec<&Service> = services.iter().collect();
    let cfg = clusterip_alloc::core::RangeConfig::from_flag(&[
        "10.96.0.0/16".parse().expect("cidr"),
        "fd00:10::/108".parse().expect("cidr"),
    ])
    .expect("config");
    let span = "30000-32767".parse().expect("span");
    // Warm up once, then measure the median of several builds.
    let _ = clusterip_alloc::core::build(&cfg, &refs, &BTreeMap::new());
    let mut times = Vec::new();
    let mut peak = 0;
    let mut used = (0, 0);
    for _ in 0..7 {
        let base = reset_peak();
        let t = Instant::now();
        let m = clusterip_alloc::core::build(&cfg, &refs, &BTreeMap::new());
        let n = nodeport_alloc::core::build(span, &refs, &BTreeMap::new());
        times.push(t.elapsed());
        peak = peak.max(PEAK.load(Ordering::Relaxed) - base);
        used = (m.owners.len(), nodeport_alloc::core::capacity(&n).0);
        assert!(m.findings.is_empty() && n.findings.is_empty());
    }
    times.sort();
    println!(
        "pure mirror of {N} Services ({} ClusterIPs incl. the reserved one, {} node ports):",
        used.0, used.1
    );
    println!(
        "  build time (median of 7): {:>8.2} ms",
        times[3].as_secs_f64() * 1e3
    );
    println!("  peak heap above inputs:   {:>8.2} MiB", mib(peak));
}

/// The IPAddress kube-apiserver's allocator keeps for `svc`'s address `ip`.
fn ip_address(ip: &str, svc: &Service) -> k8s_openapi::api::networking::v1::IPAddress {
    use k8s_openapi::api::networking::v1::{IPAddress, IPAddressSpec, ParentReference};
    let fam = if ip.contains(':') { "IPv6" } else { "IPv4" };
    IPAddress {
        metadata: ObjectMeta {
            name: Some(ip.into()),
            labels: Some(
                [
                    (
                        "ipaddress.kubernetes.io/managed-by".to_string(),
                        "ipallocator.k8s.io".to_string(),
                    ),
                    ("ipaddress.kubernetes.io/ip-family".into(), fam.into()),
                ]
                .into(),
            ),
            ..Default::default()
        },
        spec: IPAddressSpec {
            parent_ref: ParentReference {
                group: Some(String::new()),
                resource: "services".into(),
                namespace: svc.metadata.namespace.clone(),
                name: svc.metadata.name.clone().unwrap_or_default(),
            },
        },
    }
}

/// The pure mirror over wide ranges with IPAddress objects.
fn pure_wide() {
    let services: Vec<Service> = (0..N).map(|i| service(i, true)).collect();
    let refs: Vec<&Service> = services.iter().collect();
    let ips: Vec<_> = services
        .iter()
        .flat_map(|s| {
            let spec = s.spec.as_ref().expect("spec");
            let ips = spec.cluster_ips.clone().unwrap_or_default();
            ips.into_iter().map(move |ip| ip_address(&ip, s))
        })
        .collect();
    let objects: Vec<_> = ips.iter().collect();
    let view = clusterip_alloc::core::IpAddresses {
        objects: &objects,
        grace: Default::default(),
        current: true,
    };
    let cfg = clusterip_alloc::core::RangeConfig::from_flag(&[
        "10.0.0.0/8".parse().expect("cidr"),
        "fd00:10::/64".parse().expect("cidr"),
    ])
    .expect("config");
    let mut times = Vec::new();
    let mut peak = 0;
    let mut used = 0;
    for _ in 0..7 {
        let base = reset_peak();
        let t = Instant::now();
        let m = clusterip_alloc::core::build_with(&cfg, &refs, &BTreeMap::new(), Some(&view));
        times.push(t.elapsed());
        peak = peak.max(PEAK.load(Ordering::Relaxed) - base);
        used = m.pool.capacity().iter().map(|c| c.1).sum();
        assert!(m.findings.is_empty(), "{:?}", m.findings.iter().next());
    }
    times.sort();
    println!(
        "pure mirror of {N} Services in 10.0.0.0/8 + fd00:10::/64 with {} IPAddresses ({used} counted):",
        ips.len()
    );
    println!(
        "  build time (median of 7): {:>8.2} ms",
        times[3].as_secs_f64() * 1e3
    );
    println!("  peak heap above inputs:   {:>8.2} MiB", mib(peak));
}

async fn e2e() -> anyhow::Result<()> {
    let cp =
        test_support::ControlPlane::start(test_support::ControlPlaneOptions::default()).await?;
    let client = cp.client().await?;
    let t = Instant::now();
    for n in 0..50 {
        let ns = k8s_openapi::api::core::v1::Namespace {
            metadata: ObjectMeta {
                name: Some(format!("ns{n}")),
                ..Default::default()
            },
            ..Default::default()
        };
        Api::<k8s_openapi::api::core::v1::Namespace>::all(client.clone())
            .create(&PostParams::default(), &ns)
            .await?;
    }
    let results: Vec<anyhow::Result<()>> = futures::stream::iter(0..N)
        .map(|i| {
            let client = client.clone();
            async move {
                let mut s = service(i, false);
                s.metadata.resource_version = None;
                let api: Api<Service> =
                    Api::namespaced(client, s.metadata.namespace.as_deref().unwrap_or("default"));
                api.create(&PostParams::default(), &s).await?;
                Ok(())
            }
        })
        .buffer_unordered(32)
        .collect()
        .await;
    for r in results {
        r?;
    }
    println!(
        "created {N} Services through kube-apiserver in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    let (leader, tx) = scm_runtime::LeaderGate::fixed(true);
    let ctx_base = scm_runtime::ContextBase::new(client.clone(), leader);
    let (metrics, shutdown, readiness) = (
        ctx_base.metrics.clone(),
        ctx_base.shutdown.clone(),
        ctx_base.readiness.clone(),
    );
    let mk = |name: &str| ctx_base.context(name, name);
    let (c1, c2) = (mk("clusterip-alloc"), mk("nodeport-alloc"));
    let base = reset_peak();
    let t = Instant::now();
    let h1 = tokio::spawn(clusterip_alloc::run(
        c1,
        clusterip_alloc::ClusterIpAllocConfig {
            service_cluster_ip_range: vec!["10.96.0.0/16".parse()?],
            concurrent_syncs: 5,
            ..Default::default()
        },
    ));
    let h2 = tokio::spawn(nodeport_alloc::run(
        c2,
        nodeport_alloc::NodePortAllocConfig::default(),
    ));
    let mut ready_at = None;
    let done = loop {
        if ready_at.is_none() && readiness.pending().is_empty() {
            ready_at = Some(t.elapsed());
        }
        let text = metrics.encode();
        let ips = text
            .lines()
            .find_map(|l| {
                l.strip_prefix(
                    "kube_apiserver_clusterip_allocator_allocated_ips{cidr=\"10.96.0.0/16\"} ",
                )
            })
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0);
        let ports = text
            .lines()
            .find_map(|l| l.strip_prefix("kube_apiserver_nodeport_allocator_allocated_ports "))
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0);
        if ips as usize > N && ports as usize >= NODEPORTS {
            break t.elapsed();
        }
        if t.elapsed() > Duration::from_secs(300) {
            anyhow::bail!("gauges did not reach {N} ({ips} IPs, {ports} ports)");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let peak = PEAK.load(Ordering::Relaxed) - base;
    println!("at start against kube-apiserver ({N} Services, clusterip-alloc + nodeport-alloc):");
    println!(
        "  caches synced (ready):     {:>8.2} s",
        ready_at.unwrap_or(done).as_secs_f64()
    );
    println!("  gauges account for all:    {:>8.2} s", done.as_secs_f64());
    println!(
        "  peak heap (both caches + mirrors): {:>8.2} MiB",
        mib(peak)
    );
    // Issue 15: ClusterIPValid is written only where a finding stands, so a healthy cluster
    // costs no condition write, at start or after (a bench may wait; 2 s of steady state).
    tokio::time::sleep(Duration::from_secs(2)).await;
    let writes = metrics
        .encode()
        .lines()
        .find_map(|l| {
            l.strip_prefix(
                "service_controller_manager_condition_writes_total{controller=\"clusterip-alloc\"} ",
            )
        })
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(0.0);
    println!("  ClusterIPValid writes (start + 2 s): {writes:>4}");
    shutdown.cancel();
    drop(tx);
    let _ = tokio::time::timeout(Duration::from_secs(10), async {
        let _ = h1.await;
        let _ = h2.await;
    })
    .await;
    cp.stop().await;
    Ok(())
}

fn main() {
    pure();
    pure_wide();
    let e2e_wanted = std::env::var("SCM_BENCH_E2E")
        .map(|v| v != "0")
        .unwrap_or(true);
    if e2e_wanted && test_support::tool("controlplane").is_ok() {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .expect("runtime");
        if let Err(e) = rt.block_on(e2e()) {
            println!("end-to-end part failed: {e:#}");
        }
    } else {
        println!("(end-to-end part skipped: bin/controlplane missing or SCM_BENCH_E2E=0)");
    }
}
