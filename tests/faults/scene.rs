//! What the scenarios share: Services scoped to one namespace, the watch-down helper, and the
//! [`Scene`] (our controllers through the proxy beside kube-controller-manager's) with its
//! end-of-scenario invariants, which end in a row of the chaos table
//! (`test_support::chaos`).

use std::collections::BTreeSet;
use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant};

use anyhow::Result;
use k8s_openapi::api::core::v1::{Service, ServicePort, ServiceSpec};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, ListParams, PostParams};
use kube::core::ObjectMeta;
use test_support::apiproxy::{Action, ApiProxy, Match};
use test_support::chaos::{Row, report};
use test_support::inprocess::InProcess;
use test_support::invariants::{LABEL_MANAGED_BY, LABEL_SERVICE_NAME, converge};
use test_support::invariants::{double_allocations, panics};
use test_support::{
    ControlPlane, NodeSpecBuilder, PodBuilder, create_node, create_pod, namespace, set_pod_status,
    wait_for,
};
use tokio::sync::{OwnedRwLockReadGuard, OwnedRwLockWriteGuard, RwLock};

pub const WAIT: Duration = Duration::from_secs(60);

/// Turns at running our controllers in this process. Our EndpointSlice controller deletes the
/// slices of any deleted Service it comes across (on a relist it looks at every Service holding
/// slices of ours, in scope or not), so a scenario that needs nothing of ours to move while it
/// has no leader runs alone; so do the class scenario and the failover one, beside which
/// upstream's slices of a failover Service went missing (see `failover.rs`). The others share.
static TURNS: LazyLock<Arc<RwLock<()>>> = LazyLock::new(Arc::default);

/// A turn shared with other scenarios.
pub async fn shared_turn() -> Turn {
    Turn {
        _shared: Some(TURNS.clone().read_owned().await),
        _alone: None,
    }
}

/// A turn alone: no other scenario's controllers run meanwhile.
pub async fn turn_alone() -> Turn {
    Turn {
        _shared: None,
        _alone: Some(TURNS.clone().write_owned().await),
    }
}

/// A scenario's turn, held (never read) until it ends.
pub struct Turn {
    _shared: Option<OwnedRwLockReadGuard<()>>,
    _alone: Option<OwnedRwLockWriteGuard<()>>,
}

/// The label that scopes a scenario's Services: our controllers serve only those of their own
/// namespace (`--service-label-selector`), so scenarios running side by side in one control
/// plane do not write each other's slices (but for those of deleted Services: see [`TURNS`]).
pub const SCOPE: &str = "faults.scm.test/scene";

/// Our EndpointSlice controller's configuration for the scenario in namespace `ns`.
pub fn scoped(ns: &str) -> endpointslice::EndpointSliceConfig {
    let mut cfg = endpointslice::EndpointSliceConfig::default();
    cfg.shell.service_label_selector = Some(format!("{SCOPE}={ns}"));
    cfg
}

/// A Service with port 80 (and `selector`), labelled with the scope of its namespace.
pub fn service(ns: &str, name: &str, selector: Option<(&str, &str)>) -> Service {
    Service {
        metadata: ObjectMeta {
            namespace: Some(ns.into()),
            name: Some(name.into()),
            labels: Some([(SCOPE.to_string(), ns.to_string())].into()),
            ..Default::default()
        },
        spec: Some(ServiceSpec {
            selector: selector.map(|(k, v)| [(k.to_string(), v.to_string())].into()),
            ports: Some(vec![ServicePort {
                port: 80,
                ..Default::default()
            }]),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Takes the watches of `resource` down (every list and watch answers 503), runs `meanwhile`,
/// then lets them back with a `410 Gone` on the first watch, so the client must relist.
pub async fn while_watch_down<F, Fut>(proxy: &ApiProxy, resource: &str, meanwhile: F) -> Result<()>
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = Result<()>>,
{
    let down = Action::Status {
        code: 503,
        retry_after: None,
    };
    proxy.fail(
        Match {
            watch: None,
            ..Match::resource(resource)
        },
        down,
        u32::MAX,
    );
    proxy.end_watches(resource);
    let before = proxy.injected();
    // The client has noticed: at least one of its attempts was refused.
    wait_for("a refused re-watch", WAIT, || async {
        (proxy.injected() > before).then_some(())
    })
    .await?;
    meanwhile().await?;
    proxy.clear_faults();
    proxy.fail(Match::watches(resource), Action::Gone, 1);
    Ok(())
}

/// The end of a scenario: waits until our slices of `services` equal upstream's, counts double
/// allocations and panics (this process's plus `other_panics`, e.g. found in a manager's log),
/// reports the row and fails on any broken invariant. `converged_in` is measured from `since`
/// unless the scenario measured something more telling itself.
pub async fn check(
    admin: &kube::Client,
    ns: &str,
    services: &[String],
    scenario: &str,
    faults: u64,
    since: Instant,
    other_panics: u64,
) -> Result<Duration> {
    let found = Found::default();
    check_with(
        admin,
        ns,
        services,
        scenario,
        faults,
        since,
        other_panics,
        found,
    )
    .await
}

/// What a scenario found itself, beyond what [`check`] looks at: values held twice (e.g.
/// load-balancer addresses seen during the scenario) and resources leaked, if it can leak any.
#[derive(Default)]
pub struct Found {
    pub doubles: Vec<String>,
    pub leaked: Option<usize>,
}

/// [`check`] with the scenario's own findings in the row and the verdict.
#[allow(clippy::too_many_arguments)]
pub async fn check_with(
    admin: &kube::Client,
    ns: &str,
    services: &[String],
    scenario: &str,
    faults: u64,
    since: Instant,
    other_panics: u64,
    found: Found,
) -> Result<Duration> {
    let slices = converge(admin, ns, services, false, scenario).await;
    let converged_in = since.elapsed();
    let mut doubles = double_allocations(admin).await?;
    doubles.extend(found.doubles);
    report(&Row {
        scenario,
        faults,
        converged_in,
        slices_differ: Some(slices.is_err()),
        doubles: doubles.len(),
        leaked: found.leaked,
        panics: panics() + other_panics,
    });
    let compared = slices?;
    assert!(compared.endpoints > 0, "{scenario}: nothing was compared");
    assert!(
        doubles.is_empty(),
        "{scenario}: allocated twice: {doubles:?}"
    );
    assert_eq!(found.leaked.unwrap_or(0), 0, "{scenario}: leaked");
    assert_eq!(panics(), 0, "{scenario}: a panic in this process");
    assert_eq!(other_panics, 0, "{scenario}: a panic in a manager");
    Ok(converged_in)
}

/// The slices of Service `svc` managed by `managed_by` (terminating ones included).
pub async fn slices_of(
    admin: &kube::Client,
    ns: &str,
    svc: &str,
    managed_by: &str,
) -> Result<Vec<EndpointSlice>> {
    let api: Api<EndpointSlice> = Api::namespaced(admin.clone(), ns);
    let lp = ListParams::default().labels(&format!(
        "{LABEL_SERVICE_NAME}={svc},{LABEL_MANAGED_BY}={managed_by}"
    ));
    Ok(api.list(&lp).await?.items)
}

/// What the slices that are not being deleted serve: (address, port, ready) triples.
pub fn served(slices: &[EndpointSlice]) -> BTreeSet<(String, i32, bool)> {
    let mut out = BTreeSet::new();
    for s in slices
        .iter()
        .filter(|s| s.metadata.deletion_timestamp.is_none())
    {
        for p in s.ports.iter().flatten() {
            for e in s.endpoints.iter().flatten() {
                let ready = e.conditions.as_ref().and_then(|c| c.ready).unwrap_or(false);
                for a in &e.addresses {
                    out.insert((a.clone(), p.port.unwrap_or(0), ready));
                }
            }
        }
    }
    out
}

/// The address of pod `p` of Service number `i` in a scene of `services` Services.
pub fn pod_ip(services: usize, i: usize, p: usize) -> String {
    format!("10.{}.{i}.{}", 40 + services % 100, p + 1)
}

/// A namespace of `services` Services (`svc-<i>`, selecting `app=svc-<i>`) with `pods` ready
/// pods each on one node, served by our EndpointSlice controller through `proxy` (scoped to
/// this namespace) and by kube-controller-manager's directly.
pub struct Scene {
    pub admin: kube::Client,
    pub ns: String,
    pub node: String,
    pub services: Vec<String>,
    _kcm: tokio::process::Child,
    /// Our controllers; a scenario may start more (allocators) or take leadership away.
    pub ours: InProcess,
    // Last: released once our controllers and kube-controller-manager have stopped.
    _turn: Turn,
}

impl Scene {
    pub async fn start(
        cp: &ControlPlane,
        proxy: &ApiProxy,
        prefix: &str,
        services: usize,
        pods: usize,
    ) -> Result<Scene> {
        Self::start_in(shared_turn().await, cp, proxy, prefix, services, pods).await
    }

    /// [`Self::start`] in a given turn (e.g. alone).
    pub async fn start_in(
        turn: Turn,
        cp: &ControlPlane,
        proxy: &ApiProxy,
        prefix: &str,
        services: usize,
        pods: usize,
    ) -> Result<Scene> {
        test_support::invariants::count_panics();
        let admin = cp.client().await?;
        let ns = namespace(&admin, prefix).await?;
        let node = format!("{ns}-node");
        create_node(
            &admin,
            NodeSpecBuilder {
                name: node.clone(),
                ..Default::default()
            },
        )
        .await?;
        let api: Api<Service> = Api::namespaced(admin.clone(), &ns);
        let mut names = Vec::new();
        for i in 0..services {
            let name = format!("svc-{i}");
            api.create(
                &PostParams::default(),
                &service(&ns, &name, Some(("app", &name))),
            )
            .await?;
            for p in 0..pods {
                let pod = format!("{name}-{p}");
                let mut pb = PodBuilder::new(&ns, &pod, &[("app", &name)]);
                pb.node_name = Some(node.clone());
                create_pod(&admin, &pb).await?;
                set_pod_status(&admin, &ns, &pod, true, &[&pod_ip(services, i, p)]).await?;
            }
            names.push(name);
        }
        let kcm = test_support::upstream_endpointslice_controller(cp)?;
        let ours = InProcess::new(kube::Client::try_from(proxy.config()?)?);
        let cfg = scoped(&ns);
        ours.start("endpointslice", "endpoint-slice-controller", |ctx| {
            endpointslice::run(ctx, cfg)
        });
        Ok(Scene {
            admin,
            ns,
            node,
            services: names,
            _kcm: kcm,
            ours,
            _turn: turn,
        })
    }

    /// Flips the readiness of every pod of every Service `rounds` times.
    pub async fn flap(&self, pods: usize, rounds: usize) -> Result<()> {
        for r in 0..rounds {
            self.set_ready(pods, r % 2 == 1).await?;
        }
        Ok(())
    }

    /// Sets the readiness of every pod of every Service.
    pub async fn set_ready(&self, pods: usize, ready: bool) -> Result<()> {
        let n = self.services.len();
        for (i, s) in self.services.iter().enumerate() {
            for p in 0..pods {
                let ip = pod_ip(n, i, p);
                set_pod_status(&self.admin, &self.ns, &format!("{s}-{p}"), ready, &[&ip]).await?;
            }
        }
        Ok(())
    }

    /// Waits until our slices of every Service equal upstream's (a scenario's starting point).
    pub async fn settled(&self, what: &str) -> Result<()> {
        converge(&self.admin, &self.ns, &self.services, false, what).await?;
        Ok(())
    }

    /// Checks the invariants over every Service, reports the row and fails on any broken one.
    pub async fn finish(&self, scenario: &str, proxy: &ApiProxy, since: Instant) -> Result<()> {
        self.finish_for(scenario, proxy.injected(), since, &self.services)
            .await
            .map(|_| ())
    }

    /// [`Self::finish`] over some of the Services, with the faults counted by the scenario.
    pub async fn finish_for(
        &self,
        scenario: &str,
        faults: u64,
        since: Instant,
        services: &[String],
    ) -> Result<Duration> {
        check(&self.admin, &self.ns, services, scenario, faults, since, 0).await
    }

    /// [`Self::finish_for`] with what the scenario found itself.
    pub async fn finish_with(
        &self,
        scenario: &str,
        faults: u64,
        since: Instant,
        services: &[String],
        found: Found,
    ) -> Result<Duration> {
        let (admin, ns) = (&self.admin, &self.ns);
        check_with(admin, ns, services, scenario, faults, since, 0, found).await
    }
}
