//! Invariants a scenario must leave behind, checked against the real API server: our
//! EndpointSlices equal what upstream's controller produced for the same objects (the
//! differential comparison), no ClusterIP, NodePort or load-balancer address held twice, no
//! cloud resource leaked, and no panic in this process.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Once;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::Client;
use kube::api::{Api, ListParams};

/// `endpointslice.kubernetes.io/managed-by`.
pub const LABEL_MANAGED_BY: &str = "endpointslice.kubernetes.io/managed-by";
/// `kubernetes.io/service-name`.
pub const LABEL_SERVICE_NAME: &str = "kubernetes.io/service-name";
/// Our EndpointSlice controller's managed-by value.
pub const OURS: &str = "endpointslice.service-controller-manager.k8s.io";
/// kube-controller-manager's managed-by value.
pub const UPSTREAM: &str = "endpointslice-controller.k8s.io";

/// How much a converged comparison covered.
#[derive(Default, Debug)]
pub struct Compared {
    /// Endpoints compared.
    pub endpoints: usize,
    /// Endpoints with hints.
    pub hinted: usize,
}

/// One endpoint as compared: everything but the order it sits in.
type EpView = BTreeMap<String, String>;
/// (addressType, sorted ports) -> endpoints by address.
type View = BTreeMap<(String, Vec<String>), BTreeMap<Vec<String>, EpView>>;

fn view(slices: &[EndpointSlice], hint_counts: bool) -> (View, BTreeMap<String, usize>) {
    let mut v: View = BTreeMap::new();
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for s in slices {
        let mut ports: Vec<String> = s
            .ports
            .iter()
            .flatten()
            .map(|p| {
                format!(
                    "{}/{}/{}/{:?}",
                    p.name.clone().unwrap_or_default(),
                    p.port.unwrap_or(0),
                    p.protocol.clone().unwrap_or_default(),
                    p.app_protocol
                )
            })
            .collect();
        ports.sort();
        let group = v.entry((s.address_type.clone(), ports)).or_default();
        for e in s.endpoints.iter().flatten() {
            let c = e.conditions.clone().unwrap_or_default();
            let mut m = BTreeMap::new();
            m.insert("ready".into(), format!("{:?}", c.ready));
            m.insert("serving".into(), format!("{:?}", c.serving));
            m.insert("terminating".into(), format!("{:?}", c.terminating));
            m.insert("hostname".into(), format!("{:?}", e.hostname));
            m.insert("nodeName".into(), format!("{:?}", e.node_name));
            m.insert("zone".into(), format!("{:?}", e.zone));
            m.insert(
                "target".into(),
                format!(
                    "{:?}",
                    e.target_ref
                        .as_ref()
                        .map(|r| (&r.kind, &r.namespace, &r.name, &r.uid))
                ),
            );
            let hint = format!(
                "{:?}",
                e.hints.as_ref().map(|h| (
                    h.for_zones
                        .as_ref()
                        .map(|z| z.iter().map(|z| z.name.clone()).collect::<Vec<_>>()),
                    h.for_nodes
                        .as_ref()
                        .map(|z| z.iter().map(|z| z.name.clone()).collect::<Vec<_>>())
                ))
            );
            if hint_counts {
                *counts.entry(hint).or_default() += 1;
            } else {
                m.insert("hints".into(), hint);
            }
            let mut addrs = e.addresses.clone();
            addrs.sort();
            group.insert(addrs, m);
        }
    }
    (v, counts)
}

struct Side {
    slices: usize,
    view: (View, BTreeMap<String, usize>),
    labels: BTreeSet<BTreeMap<String, String>>,
}

async fn side(
    client: &Client,
    ns: &str,
    svc: &str,
    managed_by: &str,
    hint_counts: bool,
) -> Result<Side> {
    let api: Api<EndpointSlice> = Api::namespaced(client.clone(), ns);
    let lp = ListParams::default().labels(&format!(
        "{LABEL_SERVICE_NAME}={svc},{LABEL_MANAGED_BY}={managed_by}"
    ));
    let items = api.list(&lp).await?.items;
    let labels = items
        .iter()
        .map(|s| {
            let mut l = s.metadata.labels.clone().unwrap_or_default();
            l.remove(LABEL_MANAGED_BY);
            l
        })
        .collect();
    Ok(Side {
        slices: items.len(),
        view: view(&items, hint_counts),
        labels,
    })
}

/// Waits until ours and upstream's agree for every Service and keep agreeing for 1.5 s
/// (upstream delays some syncs by 1 s); fails with the last difference.
pub async fn converge(
    client: &Client,
    ns: &str,
    svcs: &[String],
    hint_counts: bool,
    what: &str,
) -> Result<Compared> {
    agree_steadily(what, Duration::from_secs(90), || async {
        let mut compared = Compared::default();
        for s in svcs {
            let ours = side(client, ns, s, OURS, hint_counts).await?;
            let up = side(client, ns, s, UPSTREAM, hint_counts).await?;
            let diff = if ours.view != up.view {
                format!("service {s}: ours {:?}\nupstream {:?}", ours.view, up.view)
            } else if ours.labels != up.labels {
                format!(
                    "service {s} labels: ours {:?} upstream {:?}",
                    ours.labels, up.labels
                )
            } else if ours.slices != up.slices {
                format!(
                    "service {s}: {} slices here, {} upstream",
                    ours.slices, up.slices
                )
            } else {
                compared.endpoints += ours.view.0.values().map(BTreeMap::len).sum::<usize>();
                compared.hinted += ours
                    .view
                    .1
                    .iter()
                    .filter(|(k, _)| k.as_str() != "None")
                    .map(|(_, n)| n)
                    .sum::<usize>();
                continue;
            };
            return Ok(Err(format!("ours and upstream differ:\n{diff}")));
        }
        Ok(Ok(compared))
    })
    .await
}

/// Polls `round` every 150 ms until it agrees (`Ok`) in every round for 1.5 s, and returns what
/// the last round counted; fails with the last difference (`Err`) once `limit` has passed
/// without that. Both sides of a differential test settle at their own pace, so one agreeing
/// look is not enough.
pub async fn agree_steadily<T, F, Fut>(what: &str, limit: Duration, mut round: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<Result<T, String>>>,
{
    let deadline = Instant::now() + limit;
    let mut agreed_since: Option<Instant> = None;
    loop {
        match round().await? {
            Ok(compared) => {
                let since = *agreed_since.get_or_insert_with(Instant::now);
                if since.elapsed() >= Duration::from_millis(1500) {
                    return Ok(compared);
                }
            }
            Err(d) => {
                agreed_since = None;
                if Instant::now() >= deadline {
                    bail!("{what}: {d}");
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
}

static PANICS: AtomicU64 = AtomicU64::new(0);
static HOOK: Once = Once::new();

thread_local! {
    /// Set on the threads of tests that called [`count_panics`]: a failing assertion there is
    /// the test's own report, not a panic of the code under test. Counting it made every
    /// scenario running at the same time fail with "a panic in this process", hiding which
    /// one had failed.
    static TEST_THREAD: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Counts panics in this process from now on (controller tasks on any thread, but not a test
/// thread's own failed assertions), keeping the default report. Call at the start of a
/// scenario, on the test's thread.
pub fn count_panics() {
    TEST_THREAD.with(|t| t.set(true));
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !TEST_THREAD.with(|t| t.get()) && !on_a_test_thread() {
                PANICS.fetch_add(1, Ordering::SeqCst);
            }
            previous(info);
        }));
    });
}

/// Whether this thread is one libtest runs a test on (named after the test) rather than one
/// the code under test runs on (tokio's workers and blocking threads, unnamed threads): a test
/// that never called [`count_panics`] failing its own assertion must not fail every scenario
/// running beside it with "a panic in this process".
fn on_a_test_thread() -> bool {
    std::thread::current()
        .name()
        .is_some_and(|n| !n.starts_with("tokio-"))
}

/// Panics seen since [`count_panics`].
pub fn panics() -> u64 {
    PANICS.load(Ordering::SeqCst)
}

/// ClusterIPs and NodePorts held by more than one Service, cluster-wide (empty when none).
pub async fn double_allocations(client: &Client) -> Result<Vec<String>> {
    let svcs = Api::<Service>::all(client.clone())
        .list(&ListParams::default())
        .await?
        .items;
    let mut ips: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut ports: BTreeMap<i32, BTreeSet<String>> = BTreeMap::new();
    for s in &svcs {
        let key = format!(
            "{}/{}",
            s.metadata.namespace.as_deref().unwrap_or(""),
            s.metadata.name.as_deref().unwrap_or("")
        );
        let Some(spec) = s.spec.as_ref() else {
            continue;
        };
        for ip in spec.cluster_ips.iter().flatten() {
            if !ip.is_empty() && ip != "None" {
                ips.entry(ip.clone()).or_default().push(key.clone());
            }
        }
        // One Service may use a port number for two protocols; two Services may not share it.
        for p in spec.ports.iter().flatten() {
            if let Some(np) = p.node_port.filter(|n| *n > 0) {
                ports.entry(np).or_default().insert(key.clone());
            }
        }
    }
    let mut out: Vec<String> = ips
        .into_iter()
        .filter(|(_, v)| v.len() > 1)
        .map(|(ip, v)| format!("ClusterIP {ip}: {v:?}"))
        .collect();
    out.extend(
        ports
            .into_iter()
            .filter(|(_, v)| v.len() > 1)
            .map(|(p, v)| format!("NodePort {p}: {v:?}")),
    );
    Ok(out)
}

/// Load-balancer addresses (`status.loadBalancer.ingress[].ip`) published by more than one
/// Service, cluster-wide (empty when none): an address pool must never give one address twice.
pub async fn double_load_balancer_addresses(client: &Client) -> Result<Vec<String>> {
    let svcs = Api::<Service>::all(client.clone())
        .list(&ListParams::default())
        .await?
        .items;
    let mut held: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for s in &svcs {
        let key = format!(
            "{}/{}",
            s.metadata.namespace.as_deref().unwrap_or(""),
            s.metadata.name.as_deref().unwrap_or("")
        );
        let ingress = s
            .status
            .as_ref()
            .and_then(|st| st.load_balancer.as_ref())
            .and_then(|lb| lb.ingress.as_ref());
        for ip in ingress.into_iter().flatten().filter_map(|i| i.ip.as_ref()) {
            held.entry(ip.clone()).or_default().insert(key.clone());
        }
    }
    Ok(held
        .into_iter()
        .filter(|(_, v)| v.len() > 1)
        .map(|(ip, v)| format!("load-balancer address {ip}: {v:?}"))
        .collect())
}

/// Watches every Service's `status.loadBalancer` from now on and remembers each moment an
/// address was published by two Services at once (the invariant *during* a scenario, from every
/// change the API server sends, not from samples). Stops when dropped.
pub struct AddressWatch {
    seen: std::sync::Arc<std::sync::Mutex<BTreeSet<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl AddressWatch {
    /// Starts watching all Services of the cluster.
    pub fn start(client: &Client) -> AddressWatch {
        use futures::StreamExt;
        use kube::runtime::watcher::{self, Event};
        let seen: std::sync::Arc<std::sync::Mutex<BTreeSet<String>>> = Default::default();
        let found = seen.clone();
        let api = Api::<Service>::all(client.clone());
        let task = tokio::spawn(async move {
            let mut held: BTreeMap<String, Vec<String>> = BTreeMap::new();
            let mut stream = watcher::watcher(api, watcher::Config::default()).boxed();
            while let Some(ev) = stream.next().await {
                let key = |s: &Service| {
                    format!(
                        "{}/{}",
                        s.metadata.namespace.as_deref().unwrap_or(""),
                        s.metadata.name.as_deref().unwrap_or("")
                    )
                };
                let ips = |s: &Service| -> Vec<String> {
                    s.status
                        .as_ref()
                        .and_then(|st| st.load_balancer.as_ref())
                        .and_then(|lb| lb.ingress.as_ref())
                        .into_iter()
                        .flatten()
                        .filter_map(|i| i.ip.clone())
                        .collect()
                };
                match ev {
                    Ok(Event::Apply(s)) | Ok(Event::InitApply(s)) => {
                        held.insert(key(&s), ips(&s));
                    }
                    Ok(Event::Delete(s)) => {
                        held.remove(&key(&s));
                    }
                    Ok(Event::Init) => held.clear(),
                    Ok(Event::InitDone) | Err(_) => continue,
                }
                let mut by_ip: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
                for (k, v) in &held {
                    for ip in v {
                        by_ip.entry(ip).or_default().push(k);
                    }
                }
                let mut f = found.lock().unwrap_or_else(|e| e.into_inner());
                for (ip, holders) in by_ip.iter().filter(|(_, h)| h.len() > 1) {
                    f.insert(format!("load-balancer address {ip}: {holders:?}"));
                }
            }
        });
        AddressWatch { seen, task }
    }

    /// Every address seen held twice so far, with its holders.
    pub fn doubles(&self) -> Vec<String> {
        let seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        seen.iter().cloned().collect()
    }
}

impl Drop for AddressWatch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// ELBv2 load balancers and target groups tagged `kubernetes.io/cluster/<cluster>=owned` that
/// belong to no live LoadBalancer Service (the cloud-leak invariant): the Service their
/// `kubernetes.io/service-name` tag names must exist, be of type LoadBalancer and not be being
/// deleted. One line per leaked resource, with its ARN and the Service its tags name (empty
/// when none leaks).
pub async fn leaked_cloud_resources(
    elb: &aws_sdk_elasticloadbalancingv2::Client,
    cluster: &str,
    client: &Client,
) -> Result<Vec<String>> {
    let mut arns: Vec<String> = all_load_balancers(elb)
        .await?
        .iter()
        .filter_map(|l| l.load_balancer_arn().map(str::to_string))
        .collect();
    let mut marker = None;
    loop {
        let page = match elb
            .describe_target_groups()
            .set_marker(marker.take())
            .send()
            .await
        {
            Ok(p) => p,
            Err(e)
                if e.as_service_error().and_then(|s| s.meta().code())
                    == Some("TargetGroupNotFound") =>
            {
                break;
            }
            Err(e) => return Err(e.into()),
        };
        arns.extend(
            page.target_groups()
                .iter()
                .filter_map(|t| t.target_group_arn().map(str::to_string)),
        );
        match page.next_marker() {
            Some(m) if !m.is_empty() => marker = Some(m.to_string()),
            _ => break,
        }
    }
    let live: BTreeSet<String> = Api::<Service>::all(client.clone())
        .list(&ListParams::default())
        .await?
        .items
        .iter()
        .filter(|s| {
            s.metadata.deletion_timestamp.is_none()
                && s.spec.as_ref().and_then(|sp| sp.type_.as_deref()) == Some("LoadBalancer")
        })
        .map(|s| {
            format!(
                "{}/{}",
                s.metadata.namespace.as_deref().unwrap_or(""),
                s.metadata.name.as_deref().unwrap_or("")
            )
        })
        .collect();
    let cluster_tag = format!("kubernetes.io/cluster/{cluster}");
    let mut out = vec![];
    for chunk in arns.chunks(20) {
        let tags = elb
            .describe_tags()
            .set_resource_arns(Some(chunk.to_vec()))
            .send()
            .await?;
        for d in tags.tag_descriptions() {
            let get = |k: &str| {
                d.tags()
                    .iter()
                    .find(|t| t.key() == Some(k))
                    .and_then(|t| t.value())
            };
            if get(&cluster_tag) != Some("owned") {
                continue;
            }
            let svc = get(LABEL_SERVICE_NAME).unwrap_or("");
            if !live.contains(svc) {
                out.push(format!(
                    "{} (tagged for Service {svc:?})",
                    d.resource_arn().unwrap_or("")
                ));
            }
        }
    }
    Ok(out)
}

/// Every ELBv2 load balancer, all pages.
async fn all_load_balancers(
    elb: &aws_sdk_elasticloadbalancingv2::Client,
) -> Result<Vec<aws_sdk_elasticloadbalancingv2::types::LoadBalancer>> {
    let mut out = vec![];
    let mut marker = None;
    loop {
        let page = elb
            .describe_load_balancers()
            .set_marker(marker.take())
            .send()
            .await?;
        out.extend(page.load_balancers().iter().cloned());
        match page.next_marker() {
            Some(m) if !m.is_empty() => marker = Some(m.to_string()),
            _ => break,
        }
    }
    Ok(out)
}

/// LoadBalancer Services of `namespace` (not being deleted) whose `status.loadBalancer` names
/// a hostname no existing ELBv2 load balancer has: a status pointing at a deleted load
/// balancer. Services whose ingress has only IPs (another provider) are not judged.
pub async fn dangling_load_balancer_status(
    elb: &aws_sdk_elasticloadbalancingv2::Client,
    client: &Client,
    namespace: &str,
) -> Result<Vec<String>> {
    let dns: BTreeSet<String> = all_load_balancers(elb)
        .await?
        .iter()
        .filter_map(|l| l.dns_name().map(str::to_string))
        .collect();
    let mut out = vec![];
    for s in Api::<Service>::namespaced(client.clone(), namespace)
        .list(&ListParams::default())
        .await?
        .items
    {
        if s.metadata.deletion_timestamp.is_some()
            || s.spec.as_ref().and_then(|sp| sp.type_.as_deref()) != Some("LoadBalancer")
        {
            continue;
        }
        let ingress = s
            .status
            .and_then(|st| st.load_balancer?.ingress)
            .unwrap_or_default();
        for h in ingress.iter().filter_map(|i| i.hostname.as_deref()) {
            if !dns.contains(h) {
                out.push(format!(
                    "{}/{} -> {h}",
                    s.metadata.namespace.as_deref().unwrap_or(""),
                    s.metadata.name.as_deref().unwrap_or("")
                ));
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_panics_elsewhere_but_not_the_calling_tests_own() {
        count_panics();
        let before = panics();
        let own = std::panic::catch_unwind(|| panic!("the test's own assertion"));
        assert!(own.is_err());
        assert_eq!(
            panics(),
            before,
            "the test thread's panic is its own report"
        );
        let other = std::thread::spawn(|| panic!("a controller task")).join();
        assert!(other.is_err());
        assert_eq!(panics(), before + 1, "a panic on another thread counts");
        let worker = std::thread::Builder::new()
            .name("tokio-runtime-worker".into())
            .spawn(|| panic!("a controller task on a tokio worker"))
            .expect("spawn")
            .join();
        assert!(worker.is_err());
        assert_eq!(panics(), before + 2, "a tokio worker's panic counts");
        // Another test (named by libtest) that never called count_panics, failing its own
        // assertion: counting it failed every scenario beside it.
        let other_test = std::thread::Builder::new()
            .name("pool_objects::another_test".into())
            .spawn(|| panic!("another test's assertion"))
            .expect("spawn")
            .join();
        assert!(other_test.is_err());
        assert_eq!(
            panics(),
            before + 2,
            "another test's own assertion does not count"
        );
    }
}
