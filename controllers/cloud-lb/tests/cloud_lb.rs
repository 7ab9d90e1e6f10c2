//! The cloud-lb controller against the real local control plane and moto's real server on
//! loopback (installed by tests/moto/install.sh). Faults are scripted only by the thin layer in
//! front of moto (`test_support::moto::FaultProxy`); moto does everything it can do itself.
//!
//! Nodes are cluster-scoped and the control plane is shared, so the tests in this binary run
//! one at a time (a global lock) and each starts from no nodes.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Result, anyhow};
use cloud_lb::aws::elbv2_sdk as elbv2;
use cloud_lb::aws::{
    AwsCloudConfig, AwsProvider, budget::Rate, budget::RateLimits, ec2_sdk as ec2, emulator_client,
    emulator_ec2_client,
};
use cloud_lb::local::{LocalCloudConfig, LocalProvider, REQUESTED_IPS_ANNOTATION};
use cloud_lb::{CloudLbConfig, LoadBalancerProvider, ProviderKind, run_with_provider};
use k8s_openapi::api::core::v1::{Node, Service, ServicePort, ServiceSpec};
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use scm_runtime::{ContextBase, LeaderGate, Metrics};
use test_support::moto::{Fault, FaultKind, FaultProxy, Moto, REGION, is_mutating};
use test_support::{ControlPlane, NodeSpecBuilder, create_node, namespace, wait_for};
use tokio_util::sync::CancellationToken;

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
const T: Duration = Duration::from_secs(60);
const FINALIZER: &str = "service.kubernetes.io/load-balancer-cleanup";

/// A controller running in this process (a crash is `abort`).
struct Ctrl {
    token: CancellationToken,
    task: Option<tokio::task::JoinHandle<()>>,
    metrics: Metrics,
    leader: tokio::sync::watch::Sender<bool>,
}

impl Ctrl {
    fn start(
        client: &kube::Client,
        config: CloudLbConfig,
        provider: Arc<dyn LoadBalancerProvider>,
    ) -> Ctrl {
        Self::start_as(client, config, provider, true)
    }

    /// Starts leading or following; `set_leading` flips it later.
    fn start_as(
        client: &kube::Client,
        config: CloudLbConfig,
        provider: Arc<dyn LoadBalancerProvider>,
        leading: bool,
    ) -> Ctrl {
        // Logs with RUST_LOG=cloud_lb=debug (and --nocapture).
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
        let (leader, tx) = LeaderGate::fixed(leading);
        let base = ContextBase::new(client.clone(), leader);
        let (token, metrics) = (base.shutdown.clone(), base.metrics.clone());
        let ctx = base.context("cloud-lb", "service-controller");
        let task = tokio::spawn(async move {
            if let Err(e) = run_with_provider(ctx, config, provider).await {
                eprintln!("controller stopped: {e}");
            }
        });
        Ctrl {
            token,
            task: Some(task),
            metrics,
            leader: tx,
        }
    }

    fn set_leading(&self, leading: bool) {
        let _ = self.leader.send(leading);
    }

    /// Reconciles completed so far.
    fn reconciles_done(&self) -> u64 {
        self.count("service_controller_manager_reconcile_duration_seconds_count")
    }

    /// The value of a metric line starting with `name` (0 when absent).
    fn count(&self, name: &str) -> u64 {
        self.metrics
            .encode()
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().last()?.parse().ok())
            .unwrap_or(0)
    }

    async fn stop(mut self) {
        self.token.cancel();
        if let Some(t) = self.task.take() {
            let _ = tokio::time::timeout(Duration::from_secs(10), t).await;
        }
    }

    fn crash(mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

impl Drop for Ctrl {
    // A failing test must not leave its controller running into the next one.
    fn drop(&mut self) {
        self.token.cancel();
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

struct Aws {
    moto: Moto,
    proxy: FaultProxy,
    /// Straight to moto, for assertions (not counted by the proxy).
    elb: elbv2::Client,
    /// EC2 straight to moto, for setup and assertions.
    ec2: ec2::Client,
    subnets: Vec<String>,
    cluster: String,
}

impl Aws {
    async fn start(cluster: &str) -> Result<Aws> {
        let moto = Moto::start().await?;
        let proxy = FaultProxy::start(&moto.addr).await?;
        let subnets = moto.default_subnets().await?;
        let elb = emulator_client(&moto.endpoint, REGION, 1);
        let ec2 = emulator_ec2_client(&moto.endpoint, REGION, 1);
        Ok(Aws {
            moto,
            proxy,
            elb,
            ec2,
            subnets,
            cluster: cluster.into(),
        })
    }

    fn provider(&self) -> Arc<AwsProvider> {
        self.provider_with(AwsCloudConfig {
            subnets: self.subnets[..1].to_vec(),
            ..Default::default()
        })
    }

    /// A provider with `cfg` and a budget that never slows a test.
    fn provider_with(&self, cfg: AwsCloudConfig) -> Arc<AwsProvider> {
        let fast = Rate {
            qps: 1000.0,
            burst: 1000,
        };
        Arc::new(
            // Two SDK attempts: most injected faults surface to the controller's backoff.
            AwsProvider::for_emulator(
                &self.proxy.endpoint,
                REGION,
                2,
                AwsCloudConfig {
                    rate_limits: RateLimits::uniform(fast),
                    ..cfg
                },
            ),
        )
    }

    async fn vpc_of_subnet(&self, subnet: &str) -> Result<String> {
        let r = self
            .ec2
            .describe_subnets()
            .subnet_ids(subnet)
            .send()
            .await?;
        r.subnets()
            .first()
            .and_then(|s| s.vpc_id())
            .map(str::to_string)
            .ok_or_else(|| anyhow!("no subnet {subnet}"))
    }

    async fn tag(&self, id: &str, tags: &[(&str, &str)]) -> Result<()> {
        let mut req = self.ec2.create_tags().resources(id);
        for (k, v) in tags {
            req = req.tags(ec2::types::Tag::builder().key(*k).value(*v).build());
        }
        req.send().await?;
        Ok(())
    }

    async fn security_group(&self, vpc: &str, name: &str, tags: &[(&str, &str)]) -> Result<String> {
        let g = self
            .ec2
            .create_security_group()
            .group_name(name)
            .description(name)
            .vpc_id(vpc)
            .send()
            .await?;
        let id = g
            .group_id()
            .ok_or_else(|| anyhow!("no group id"))?
            .to_string();
        if !tags.is_empty() {
            self.tag(&id, tags).await?;
        }
        Ok(id)
    }

    /// Starts an instance in `subnet` with `groups`; its ID.
    async fn instance(&self, subnet: &str, groups: &[&str]) -> Result<String> {
        let r = self
            .ec2
            .run_instances()
            .image_id("ami-12c6146b")
            .min_count(1)
            .max_count(1)
            .subnet_id(subnet)
            .set_security_group_ids(Some(groups.iter().map(|g| g.to_string()).collect()))
            .send()
            .await?;
        r.instances()
            .first()
            .and_then(|i| i.instance_id())
            .map(str::to_string)
            .ok_or_else(|| anyhow!("no instance"))
    }

    /// A group's ingress rules as (protocol, from port, range, description).
    async fn rules(&self, group: &str) -> BTreeSet<(String, i32, String, String)> {
        let Ok(r) = self
            .ec2
            .describe_security_groups()
            .group_ids(group)
            .send()
            .await
        else {
            return BTreeSet::new();
        };
        let mut out = BTreeSet::new();
        for p in r.security_groups().iter().flat_map(|g| g.ip_permissions()) {
            let proto = p.ip_protocol().unwrap_or("").to_string();
            let from = p.from_port().unwrap_or(-1);
            for x in p.ip_ranges() {
                out.insert((
                    proto.clone(),
                    from,
                    x.cidr_ip().unwrap_or("").to_string(),
                    x.description().unwrap_or("").to_string(),
                ));
            }
            for x in p.ipv6_ranges() {
                out.insert((
                    proto.clone(),
                    from,
                    x.cidr_ipv6().unwrap_or("").to_string(),
                    x.description().unwrap_or("").to_string(),
                ));
            }
        }
        out
    }

    /// Subnets a load balancer was created in.
    async fn lb_subnets(&self, svc: &Service) -> BTreeSet<String> {
        self.lb_of(svc)
            .await
            .map(|l| {
                l.availability_zones()
                    .iter()
                    .filter_map(|z| z.subnet_id().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default()
    }

    fn config(&self, class: &str, default: bool) -> CloudLbConfig {
        CloudLbConfig {
            cloud_provider: ProviderKind::Aws,
            cloud_config: None,
            cluster_name: self.cluster.clone(),
            concurrent_service_syncs: 4,
            load_balancer_class: Some(class.into()),
            default_load_balancer: default,
        }
    }

    async fn lbs_named(&self, name: &str) -> Vec<elbv2::types::LoadBalancer> {
        match self.elb.describe_load_balancers().names(name).send().await {
            Ok(o) => o.load_balancers().to_vec(),
            Err(_) => vec![],
        }
    }

    async fn lb_of(&self, svc: &Service) -> Option<elbv2::types::LoadBalancer> {
        let name = cloud_lb::aws::spec::load_balancer_name(&self.cluster, svc);
        self.lbs_named(&name).await.into_iter().next()
    }

    async fn tgs_of(&self, lb_arn: &str) -> Vec<elbv2::types::TargetGroup> {
        self.elb
            .describe_target_groups()
            .load_balancer_arn(lb_arn)
            .send()
            .await
            .map(|o| o.target_groups().to_vec())
            .unwrap_or_default()
    }

    async fn targets(&self, tg_arn: &str) -> BTreeSet<(String, i32)> {
        self.elb
            .describe_target_health()
            .target_group_arn(tg_arn)
            .send()
            .await
            .map(|o| {
                o.target_health_descriptions()
                    .iter()
                    .filter_map(|d| {
                        let t = d.target()?;
                        Some((t.id()?.to_string(), t.port()?))
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Listeners as port → (protocol, target group ARN).
    async fn listeners(&self, lb_arn: &str) -> BTreeMap<i32, (String, String)> {
        self.elb
            .describe_listeners()
            .load_balancer_arn(lb_arn)
            .send()
            .await
            .map(|o| {
                o.listeners()
                    .iter()
                    .filter_map(|l| {
                        Some((
                            l.port()?,
                            (
                                l.protocol()?.as_str().to_string(),
                                l.default_actions().first()?.target_group_arn()?.to_string(),
                            ),
                        ))
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Every load balancer and target group tagged with the Service `ns/name` (a tag scan).
    async fn tagged(&self, ns: &str, name: &str) -> Result<Vec<String>> {
        let mut arns: Vec<String> = vec![];
        let lbs = self.elb.describe_load_balancers().send().await?;
        arns.extend(
            lbs.load_balancers()
                .iter()
                .filter_map(|l| l.load_balancer_arn().map(str::to_string)),
        );
        let tgs = self.elb.describe_target_groups().send().await?;
        arns.extend(
            tgs.target_groups()
                .iter()
                .filter_map(|t| t.target_group_arn().map(str::to_string)),
        );
        let mut out = vec![];
        for chunk in arns.chunks(20) {
            let r = self
                .elb
                .describe_tags()
                .set_resource_arns(Some(chunk.to_vec()))
                .send()
                .await?;
            for d in r.tag_descriptions() {
                let ours = d.tags().iter().any(|t| {
                    t.key() == Some("kubernetes.io/service-name")
                        && t.value() == Some(&format!("{ns}/{name}"))
                });
                if ours {
                    out.extend(d.resource_arn().map(str::to_string));
                }
            }
        }
        Ok(out)
    }
}

/// A local provider with one pool.
fn local_pool(cidr: &str) -> Arc<dyn LoadBalancerProvider> {
    Arc::new(
        LocalProvider::new(LocalCloudConfig {
            pools: vec![cidr.parse().expect("cidr")],
            ip_mode: None,
        })
        .expect("valid pools"),
    )
}

/// The controller's configuration for the local provider, serving only `class`.
fn local_config(cluster: &str, class: &str) -> CloudLbConfig {
    CloudLbConfig {
        cloud_provider: ProviderKind::Local,
        cloud_config: None,
        cluster_name: cluster.into(),
        concurrent_service_syncs: 2,
        load_balancer_class: Some(class.into()),
        default_load_balancer: false,
    }
}

async fn setup() -> Result<(kube::Client, String)> {
    let cp = ControlPlane::shared().await?;
    let client = cp.client().await?;
    // Start from no nodes: they are cluster-wide and would be targets of every test.
    let nodes: Api<Node> = Api::all(client.clone());
    for n in nodes.list(&ListParams::default()).await?.items {
        if let Some(name) = n.metadata.name {
            let _ = nodes.delete(&name, &DeleteParams::default()).await;
        }
    }
    wait_for("nodes gone", T, || {
        let nodes = nodes.clone();
        async move {
            nodes
                .list(&ListParams::default())
                .await
                .ok()
                .filter(|l| l.items.is_empty())
        }
    })
    .await?;
    let ns = namespace(&client, "cloudlb").await?;
    Ok((client, ns))
}

fn instance(name: &str) -> String {
    let hex: String = name.bytes().map(|b| format!("{b:02x}")).collect();
    format!("i-{hex}")
}

async fn node(client: &kube::Client, name: &str) -> Result<Node> {
    node_on(client, name, &instance(name)).await
}

/// A Node whose providerID names EC2 instance `id`.
async fn node_on(client: &kube::Client, name: &str, id: &str) -> Result<Node> {
    create_node(
        client,
        NodeSpecBuilder {
            name: name.into(),
            zone: Some("us-east-1a".into()),
            provider_id: Some(format!("aws:///us-east-1a/{id}")),
            ..Default::default()
        },
    )
    .await
}

fn lb_service(
    ns: &str,
    name: &str,
    class: Option<&str>,
    ports: &[(&str, i32, &str, Option<i32>)],
) -> Service {
    Service {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some(ns.into()),
            ..Default::default()
        },
        spec: Some(ServiceSpec {
            type_: Some("LoadBalancer".into()),
            load_balancer_class: class.map(str::to_string),
            selector: Some([("app".to_string(), name.to_string())].into()),
            ports: Some(
                ports
                    .iter()
                    .map(|(n, p, proto, np)| ServicePort {
                        name: Some(n.to_string()),
                        port: *p,
                        protocol: Some(proto.to_string()),
                        node_port: *np,
                        ..Default::default()
                    })
                    .collect(),
            ),
            ..Default::default()
        }),
        status: None,
    }
}

async fn create(client: &kube::Client, svc: &Service) -> Result<Service> {
    let api: Api<Service> = Api::namespaced(
        client.clone(),
        svc.metadata.namespace.as_deref().unwrap_or("default"),
    );
    Ok(api.create(&PostParams::default(), svc).await?)
}

async fn get(client: &kube::Client, ns: &str, name: &str) -> Option<Service> {
    Api::<Service>::namespaced(client.clone(), ns)
        .get_opt(name)
        .await
        .ok()
        .flatten()
}

fn hostname(s: &Service) -> Option<String> {
    s.status
        .as_ref()?
        .load_balancer
        .as_ref()?
        .ingress
        .as_ref()?
        .first()?
        .hostname
        .clone()
}

fn ips(s: &Service) -> Vec<String> {
    s.status
        .as_ref()
        .and_then(|st| st.load_balancer.as_ref())
        .and_then(|l| l.ingress.as_ref())
        .into_iter()
        .flatten()
        .filter_map(|i| i.ip.clone())
        .collect()
}

fn has_finalizer(s: &Service) -> bool {
    s.metadata
        .finalizers
        .iter()
        .flatten()
        .any(|f| f == FINALIZER)
}

async fn wait_status(client: &kube::Client, ns: &str, name: &str) -> Result<Service> {
    wait_for(&format!("{ns}/{name} load balancer status"), T, || async {
        get(client, ns, name)
            .await
            .filter(|s| hostname(s).is_some() || !ips(s).is_empty())
    })
    .await
}

async fn events(client: &kube::Client, ns: &str, name: &str, reason: &str) -> Vec<String> {
    let api: Api<Event> = Api::namespaced(client.clone(), ns);
    api.list(&ListParams::default())
        .await
        .map(|l| {
            l.items
                .into_iter()
                .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name))
                .filter(|e| e.reason.as_deref() == Some(reason))
                .map(|e| e.note.unwrap_or_default())
                .collect()
        })
        .unwrap_or_default()
}

async fn wait_event(
    client: &kube::Client,
    ns: &str,
    name: &str,
    reason: &str,
    contains: &str,
) -> Result<String> {
    wait_for(
        &format!("{reason} event on {ns}/{name} containing {contains:?}"),
        T,
        || async {
            events(client, ns, name, reason)
                .await
                .into_iter()
                .find(|n| n.contains(contains))
        },
    )
    .await
}

async fn patch(
    client: &kube::Client,
    ns: &str,
    name: &str,
    p: serde_json::Value,
) -> Result<Service> {
    let api: Api<Service> = Api::namespaced(client.clone(), ns);
    Ok(api
        .patch(name, &PatchParams::default(), &Patch::Merge(&p))
        .await?)
}

async fn wait_targets(aws: &Aws, tg_arn: &str, want: BTreeSet<(String, i32)>) -> Result<()> {
    wait_for(&format!("targets {want:?}"), T, || {
        let want = want.clone();
        async move { (aws.targets(tg_arn).await == want).then_some(()) }
    })
    .await
}

fn node_port(s: &Service, port: i32) -> i32 {
    s.spec
        .as_ref()
        .and_then(|sp| sp.ports.as_ref())
        .and_then(|ps| ps.iter().find(|p| p.port == port))
        .and_then(|p| p.node_port)
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn create_update_ports_and_delete() -> Result<()> {
    let _g = SERIAL.lock().await;
    let (client, ns) = setup().await?;
    let aws = Aws::start("it-ports").await?;
    let class = "test.example.com/ports";
    let ctrl = Ctrl::start(&client, aws.config(class, false), aws.provider());
    node(&client, "ports-a").await?;
    node(&client, "ports-b").await?;

    create(
        &client,
        &lb_service(&ns, "web", Some(class), &[("http", 80, "TCP", None)]),
    )
    .await?;
    let svc = wait_status(&client, &ns, "web").await?;
    assert!(
        has_finalizer(&svc),
        "finalizer is added before the cloud call"
    );
    let lb = aws
        .lb_of(&svc)
        .await
        .ok_or_else(|| anyhow!("no load balancer"))?;
    assert_eq!(hostname(&svc).as_deref(), lb.dns_name());
    let lb_arn = lb.load_balancer_arn().unwrap_or_default().to_string();
    let np80 = node_port(&svc, 80);
    let tgs = aws.tgs_of(&lb_arn).await;
    assert_eq!(tgs.len(), 1);
    let tg = &tgs[0];
    assert_eq!(tg.port(), Some(np80), "targets on the NodePort");
    assert_eq!(tg.health_check_protocol().map(|p| p.as_str()), Some("TCP"));
    assert_eq!(tg.health_check_port(), Some("traffic-port"));
    assert!(tg.target_group_name().is_some_and(|n| n.len() <= 32));
    let want: BTreeSet<_> = ["ports-a", "ports-b"]
        .iter()
        .map(|n| (instance(n), np80))
        .collect();
    wait_targets(&aws, tg.target_group_arn().unwrap_or_default(), want).await?;
    let l = aws.listeners(&lb_arn).await;
    assert_eq!(l.get(&80).map(|(p, _)| p.as_str()), Some("TCP"));
    assert_eq!(
        aws.tagged(&ns, "web").await?.len(),
        2,
        "load balancer and target group carry the Service tag"
    );
    wait_event(&client, &ns, "web", "EnsuredLoadBalancer", "").await?;

    // Add DNS on 53 over TCP and UDP (one TCP_UDP listener, one shared nodePort).
    let p = serde_json::json!({"spec": {"ports": [
        {"name": "http", "port": 80, "protocol": "TCP", "nodePort": np80},
        {"name": "dns-tcp", "port": 53, "protocol": "TCP", "nodePort": 31053},
        {"name": "dns-udp", "port": 53, "protocol": "UDP", "nodePort": 31053},
    ]}});
    patch(&client, &ns, "web", p).await?;
    wait_for("TCP_UDP listener on 53", T, || async {
        let l = aws.listeners(&lb_arn).await;
        (l.get(&53).map(|(p, _)| p.as_str()) == Some("TCP_UDP") && l.len() == 2).then_some(())
    })
    .await?;

    // Move port 80 to another NodePort: a new target group, the old one deleted. The first
    // delete fails (both SDK attempts) and is retried. (On AWS a detached group is found
    // neither through the load balancer nor by name, so the provider remembers it; moto keeps
    // reporting it as attached, so this checks the retry, not that memory.)
    aws.proxy
        .inject(Fault::unavailable(Some("DeleteTargetGroup"), 2));
    let p = serde_json::json!({"spec": {"ports": [
        {"name": "http", "port": 80, "protocol": "TCP", "nodePort": 31080},
        {"name": "dns-tcp", "port": 53, "protocol": "TCP", "nodePort": 31053},
        {"name": "dns-udp", "port": 53, "protocol": "UDP", "nodePort": 31053},
    ]}});
    patch(&client, &ns, "web", p).await?;
    let new_tg = wait_for("listener 80 on a target group at 31080", T, || async {
        let l = aws.listeners(&lb_arn).await;
        let arn = l.get(&80)?.1.clone();
        // By ARN: moto does not record a moved listener's group as attached.
        let tgs = aws
            .elb
            .describe_target_groups()
            .target_group_arns(&arn)
            .send()
            .await
            .ok()?;
        tgs.target_groups()
            .iter()
            .find(|t| t.port() == Some(31080))
            .map(|_| arn.clone())
    })
    .await?;
    let want: BTreeSet<_> = ["ports-a", "ports-b"]
        .iter()
        .map(|n| (instance(n), 31080))
        .collect();
    wait_targets(&aws, &new_tg, want).await?;
    wait_for("old target group deleted", T, || async {
        let all = aws.elb.describe_target_groups().send().await.ok()?;
        let n = all.target_groups().len();
        (n == 2).then_some(())
    })
    .await?;
    assert_eq!(aws.proxy.injected(), 2);

    // Delete: the Service goes away only after every ELBv2 resource it owned is gone.
    Api::<Service>::namespaced(client.clone(), &ns)
        .delete("web", &DeleteParams::default())
        .await?;
    wait_for("service gone", T, || async {
        get(&client, &ns, "web").await.is_none().then_some(())
    })
    .await?;
    assert!(
        aws.tagged(&ns, "web").await?.is_empty(),
        "tag scan finds leftovers"
    );
    assert!(
        aws.elb
            .describe_load_balancers()
            .send()
            .await?
            .load_balancers()
            .is_empty()
    );
    drop(svc);
    ctrl.stop().await;
    drop(aws.moto);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nodes_added_removed_and_excluded() -> Result<()> {
    let _g = SERIAL.lock().await;
    let (client, ns) = setup().await?;
    let aws = Aws::start("it-nodes").await?;
    let class = "test.example.com/nodes";
    let ctrl = Ctrl::start(&client, aws.config(class, false), aws.provider());
    node(&client, "n-a").await?;
    node(&client, "n-b").await?;
    create(
        &client,
        &lb_service(&ns, "app", Some(class), &[("http", 80, "TCP", None)]),
    )
    .await?;
    let svc = wait_status(&client, &ns, "app").await?;
    let np = node_port(&svc, 80);
    let lb = aws.lb_of(&svc).await.ok_or_else(|| anyhow!("no lb"))?;
    let tg_arn = aws.tgs_of(lb.load_balancer_arn().unwrap_or_default()).await[0]
        .target_group_arn()
        .unwrap_or_default()
        .to_string();
    let set = |names: &[&str]| {
        names
            .iter()
            .map(|n| (instance(n), np))
            .collect::<BTreeSet<_>>()
    };
    wait_targets(&aws, &tg_arn, set(&["n-a", "n-b"])).await?;

    // Additions: a batch of nodes arrives; every one becomes a target.
    aws.proxy.reset_counts();
    for n in ["n-c", "n-d", "n-e", "n-f"] {
        node(&client, n).await?;
    }
    wait_targets(
        &aws,
        &tg_arn,
        set(&["n-a", "n-b", "n-c", "n-d", "n-e", "n-f"]),
    )
    .await?;
    let c = aws.proxy.counts();
    eprintln!("calls for 4 node additions: {c:?}");
    assert!(!c.contains_key("CreateLoadBalancer") && !c.contains_key("CreateTargetGroup"));
    // Host updates go straight to the remembered target group: no load balancer lookup.
    assert!(!c.contains_key("DescribeLoadBalancers"), "{c:?}");
    wait_event(&client, &ns, "app", "UpdatedLoadBalancer", "new hosts").await?;

    // A node with no AWS providerID cannot be a target; readiness does not matter.
    create_node(
        &client,
        NodeSpecBuilder {
            name: "n-noid".into(),
            ..Default::default()
        },
    )
    .await?;
    let nodes: Api<Node> = Api::all(client.clone());
    let not_ready = serde_json::json!({"status": {"conditions": [{"type": "Ready", "status": "False", "reason": "KubeletNotReady", "message": "test"}]}});
    nodes
        .patch_status("n-f", &PatchParams::default(), &Patch::Merge(&not_ready))
        .await?;

    // The exclusion label removes a node (read as upstream: "true" excludes).
    let label = serde_json::json!({"metadata": {"labels": {"node.kubernetes.io/exclude-from-external-load-balancers": "true"}}});
    nodes
        .patch("n-a", &PatchParams::default(), &Patch::Merge(&label))
        .await?;
    wait_targets(&aws, &tg_arn, set(&["n-b", "n-c", "n-d", "n-e", "n-f"])).await?;

    // Deletions.
    nodes.delete("n-b", &DeleteParams::default()).await?;
    nodes.delete("n-c", &DeleteParams::default()).await?;
    wait_targets(&aws, &tg_arn, set(&["n-d", "n-e", "n-f"])).await?;

    // A label unrelated to load balancing triggers nothing.
    aws.proxy.reset_counts();
    let done = ctrl.reconciles_done();
    let other = serde_json::json!({"metadata": {"labels": {"team": "blue"}}});
    nodes
        .patch("n-d", &PatchParams::default(), &Patch::Merge(&other))
        .await?;
    // Followed by a change that does trigger, so we know the first was processed.
    nodes.delete("n-e", &DeleteParams::default()).await?;
    wait_targets(&aws, &tg_arn, set(&["n-d", "n-f"])).await?;
    let c = aws.proxy.counts();
    assert_eq!(c.get("DeregisterTargets"), Some(&1), "{c:?}");
    assert!(!c.contains_key("RegisterTargets"), "{c:?}");
    // The targets change inside the reconcile; it is counted once it has returned.
    wait_for("the host update's reconcile to finish", T, || async {
        (ctrl.reconciles_done() > done).then_some(())
    })
    .await?;

    // Every node excluded: no hosts, and an UnAvailableLoadBalancer Warning.
    for n in ["n-d", "n-f", "n-noid"] {
        nodes.delete(n, &DeleteParams::default()).await?;
    }
    wait_targets(&aws, &tg_arn, BTreeSet::new()).await?;
    wait_event(
        &client,
        &ns,
        "app",
        "UnAvailableLoadBalancer",
        "no available nodes",
    )
    .await?;
    ctrl.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn external_traffic_policy_local_health_checks() -> Result<()> {
    let _g = SERIAL.lock().await;
    let (client, ns) = setup().await?;
    let aws = Aws::start("it-etp").await?;
    let class = "test.example.com/etp";
    let ctrl = Ctrl::start(&client, aws.config(class, false), aws.provider());
    node(&client, "etp-a").await?;
    let mut s = lb_service(&ns, "local", Some(class), &[("http", 80, "TCP", None)]);
    if let Some(spec) = s.spec.as_mut() {
        spec.external_traffic_policy = Some("Local".into());
    }
    create(&client, &s).await?;
    let svc = wait_status(&client, &ns, "local").await?;
    let hc_port = svc
        .spec
        .as_ref()
        .and_then(|s| s.health_check_node_port)
        .unwrap_or(0);
    assert!(hc_port > 0);
    let lb = aws.lb_of(&svc).await.ok_or_else(|| anyhow!("no lb"))?;
    let lb_arn = lb.load_balancer_arn().unwrap_or_default().to_string();
    let tg = aws
        .tgs_of(&lb_arn)
        .await
        .into_iter()
        .next()
        .ok_or_else(|| anyhow!("no tg"))?;
    assert_eq!(tg.health_check_protocol().map(|p| p.as_str()), Some("HTTP"));
    assert_eq!(tg.health_check_port(), Some(hc_port.to_string().as_str()));
    assert_eq!(tg.health_check_path(), Some("/healthz"));
    // Local gets the same node set as Cluster.
    wait_targets(
        &aws,
        tg.target_group_arn().unwrap_or_default(),
        [(instance("etp-a"), node_port(&svc, 80))].into(),
    )
    .await?;

    // Back to Cluster: a TCP check on the traffic port, changed in place.
    patch(
        &client,
        &ns,
        "local",
        serde_json::json!({"spec": {"externalTrafficPolicy": "Cluster"}}),
    )
    .await?;
    wait_for("TCP traffic-port health check", T, || async {
        let tg = aws.tgs_of(&lb_arn).await.into_iter().next()?;
        (tg.health_check_protocol().map(|p| p.as_str()) == Some("TCP")
            && tg.health_check_port() == Some("traffic-port"))
        .then_some(())
    })
    .await?;
    ctrl.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn class_filtering_and_type_change() -> Result<()> {
    let _g = SERIAL.lock().await;
    let (client, ns) = setup().await?;
    let aws = Aws::start("it-class").await?;
    let ours = "test.example.com/ours";
    node(&client, "cls-a").await?;
    // Only our class; not the default implementation.
    let ctrl = Ctrl::start(&client, aws.config(ours, false), aws.provider());
    create(
        &client,
        &lb_service(
            &ns,
            "foreign",
            Some("other.example.com/lb"),
            &[("http", 80, "TCP", None)],
        ),
    )
    .await?;
    create(
        &client,
        &lb_service(&ns, "classless", None, &[("http", 80, "TCP", None)]),
    )
    .await?;
    create(
        &client,
        &lb_service(&ns, "mine", Some(ours), &[("http", 80, "TCP", None)]),
    )
    .await?;
    let mut external = lb_service(&ns, "external", Some(ours), &[("http", 80, "TCP", None)]);
    external.metadata.annotations = Some(
        [(
            "service.beta.kubernetes.io/aws-load-balancer-type".to_string(),
            "external".to_string(),
        )]
        .into(),
    );
    create(&client, &external).await?;
    let mine = wait_status(&client, &ns, "mine").await?;
    // Services were created before ours, and the controller has finished everything queued.
    wait_for("idle controller", T, || async {
        (ctrl.reconciles_done() >= 1).then_some(())
    })
    .await?;
    wait_for("the external Service's reconcile", T, || async {
        (ctrl.reconciles_done() >= 2).then_some(())
    })
    .await?;
    // Our class, but the AWS Load Balancer Controller's type: implemented elsewhere.
    for name in ["foreign", "classless", "external"] {
        let s = get(&client, &ns, name)
            .await
            .ok_or_else(|| anyhow!("{name} missing"))?;
        assert!(!has_finalizer(&s), "{name} must not be touched");
        assert!(hostname(&s).is_none());
        assert!(aws.lb_of(&s).await.is_none());
    }
    ctrl.stop().await;

    // As the default implementation, class-less Services are ours too; foreign ones still not.
    let ctrl = Ctrl::start(&client, aws.config(ours, true), aws.provider());
    wait_status(&client, &ns, "classless").await?;
    let foreign = get(&client, &ns, "foreign")
        .await
        .ok_or_else(|| anyhow!("foreign missing"))?;
    assert!(!has_finalizer(&foreign));

    // Type change away from LoadBalancer: load balancer deleted, status cleared, finalizer gone.
    patch(
        &client,
        &ns,
        "mine",
        serde_json::json!({"spec": {"type": "ClusterIP"}}),
    )
    .await?;
    let s = wait_for("mine cleaned up", T, || async {
        get(&client, &ns, "mine")
            .await
            .filter(|s| !has_finalizer(s) && hostname(s).is_none())
    })
    .await?;
    assert!(aws.lb_of(&mine).await.is_none());
    assert!(aws.tagged(&ns, "mine").await?.is_empty());
    assert_eq!(
        s.spec.as_ref().and_then(|s| s.type_.as_deref()),
        Some("ClusterIP")
    );
    wait_event(&client, &ns, "mine", "DeletedLoadBalancer", "").await?;
    wait_event(&client, &ns, "mine", "DeletingLoadBalancer", "").await?;
    ctrl.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn crash_mid_create_then_restart_adopts() -> Result<()> {
    let _g = SERIAL.lock().await;
    let (client, ns) = setup().await?;
    let aws = Aws::start("it-crash").await?;
    let class = "test.example.com/crash";
    node(&client, "crash-a").await?;
    // CreateLoadBalancer reaches moto (the load balancer exists) but the answer never comes.
    aws.proxy.inject(Fault {
        action: Some("CreateLoadBalancer".into()),
        kind: FaultKind::ForwardThenHang,
        times: 1,
    });
    let ctrl = Ctrl::start(&client, aws.config(class, false), aws.provider());
    let svc = create(
        &client,
        &lb_service(&ns, "crashy", Some(class), &[("http", 80, "TCP", None)]),
    )
    .await?;
    let name = cloud_lb::aws::spec::load_balancer_name(&aws.cluster, &svc);
    wait_for("half-created load balancer", T, || async {
        (!aws.lbs_named(&name).await.is_empty()).then_some(())
    })
    .await?;
    ctrl.crash();

    let ctrl = Ctrl::start(&client, aws.config(class, false), aws.provider());
    let svc = wait_status(&client, &ns, "crashy").await?;
    let lbs = aws.lbs_named(&name).await;
    assert_eq!(
        lbs.len(),
        1,
        "adopted, not duplicated (moto would duplicate on a second create)"
    );
    assert_eq!(hostname(&svc).as_deref(), lbs[0].dns_name());
    assert_eq!(aws.proxy.counts().get("CreateLoadBalancer"), Some(&1));
    let tgs = aws
        .tgs_of(lbs[0].load_balancer_arn().unwrap_or_default())
        .await;
    assert_eq!(tgs.len(), 1);
    ctrl.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_annotation_event_without_api_call_then_fixed() -> Result<()> {
    let _g = SERIAL.lock().await;
    let (client, ns) = setup().await?;
    let aws = Aws::start("it-bad").await?;
    let class = "test.example.com/bad";
    node(&client, "bad-a").await?;
    let ctrl = Ctrl::start(&client, aws.config(class, false), aws.provider());
    let mut s = lb_service(&ns, "bad", Some(class), &[("http", 80, "TCP", None)]);
    s.metadata.annotations = Some(
        [(
            "service.beta.kubernetes.io/aws-load-balancer-scheme".to_string(),
            "public".to_string(),
        )]
        .into(),
    );
    create(&client, &s).await?;
    let note = wait_event(
        &client,
        &ns,
        "bad",
        "SyncLoadBalancerFailed",
        "aws-load-balancer-scheme",
    )
    .await?;
    assert!(note.contains("public"), "{note}");
    assert!(
        aws.proxy.counts().is_empty(),
        "no ELBv2 call for an invalid Service: {:?}",
        aws.proxy.counts()
    );
    // No retry until the Service changes.
    let done = ctrl.reconciles_done();
    assert!(
        events(&client, &ns, "bad", "SyncLoadBalancerFailed")
            .await
            .len()
            == 1
    );
    // Fixing the annotation converges.
    patch(&client, &ns, "bad", serde_json::json!({"metadata": {"annotations": {"service.beta.kubernetes.io/aws-load-balancer-scheme": "internal"}}})).await?;
    let svc = wait_status(&client, &ns, "bad").await?;
    wait_for("the fixing reconcile to finish", T, || async {
        (ctrl.reconciles_done() > done).then_some(())
    })
    .await?;
    let lb = aws.lb_of(&svc).await.ok_or_else(|| anyhow!("no lb"))?;
    assert_eq!(lb.scheme().map(|s| s.as_str()), Some("internal"));
    ctrl.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn throttling_and_5xx_converge_and_steady_state_is_quiet() -> Result<()> {
    let _g = SERIAL.lock().await;
    let (client, ns) = setup().await?;
    let aws = Aws::start("it-faults").await?;
    let class = "test.example.com/faults";
    node(&client, "f-a").await?;
    node(&client, "f-b").await?;
    aws.proxy
        // The SDK never retries a create: every one of these reaches the controller's backoff.
        .inject(Fault::throttle(Some("CreateLoadBalancer"), 4));
    aws.proxy
        .inject(Fault::unavailable(Some("CreateTargetGroup"), 2));
    aws.proxy
        .inject(Fault::throttle(Some("RegisterTargets"), 1));
    let ctrl = Ctrl::start(&client, aws.config(class, false), aws.provider());
    for n in ["s1", "s2", "s3"] {
        create(
            &client,
            &lb_service(&ns, n, Some(class), &[("http", 80, "TCP", None)]),
        )
        .await?;
    }
    let deadline = Duration::from_secs(120);
    for n in ["s1", "s2", "s3"] {
        wait_for(
            &format!("{n} converges despite faults"),
            deadline,
            || async { get(&client, &ns, n).await.filter(|s| hostname(s).is_some()) },
        )
        .await?;
    }
    assert_eq!(aws.proxy.injected(), 7, "every scripted fault was served");
    let failed: usize = {
        let mut n = 0;
        for s in ["s1", "s2", "s3"] {
            n += events(&client, &ns, s, "SyncLoadBalancerFailed")
                .await
                .len();
        }
        n
    };
    assert!(
        failed >= 1,
        "faults beyond the SDK's own retries reach the controller"
    );
    for n in ["s1", "s2", "s3"] {
        let s = get(&client, &ns, n).await.ok_or_else(|| anyhow!("gone"))?;
        assert_eq!(
            aws.lbs_named(&cloud_lb::aws::spec::load_balancer_name(&aws.cluster, &s))
                .await
                .len(),
            1
        );
    }
    ctrl.stop().await;

    // Steady state: a fresh controller re-ensures everything and changes nothing.
    aws.proxy.reset_counts();
    let ctrl = Ctrl::start(&client, aws.config(class, false), aws.provider());
    wait_for("three ensures", T, || async {
        (ctrl.reconciles_done() >= 3
            && aws
                .proxy
                .counts()
                .get("DescribeListeners")
                .copied()
                .unwrap_or(0)
                >= 3)
            .then_some(())
    })
    .await?;
    let c = aws.proxy.counts();
    let mutating: BTreeMap<_, _> = c.iter().filter(|(k, _)| is_mutating(k)).collect();
    assert!(
        mutating.is_empty(),
        "mutating calls at steady state: {mutating:?}"
    );
    // Each ensure ends with DescribeListeners; the three load balancer lookups may share
    // one batched DescribeLoadBalancers.
    assert_eq!(c.get("DescribeListeners"), Some(&3), "{c:?}");
    assert!(
        c.get("DescribeLoadBalancers")
            .is_some_and(|n| (1..=3).contains(n)),
        "{c:?}"
    );
    eprintln!("steady-state calls for 3 Services: {c:?}");
    ctrl.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn local_pools_requests_exhaustion_and_restart() -> Result<()> {
    let _g = SERIAL.lock().await;
    let (client, ns) = setup().await?;
    let class = "test.example.com/local";
    // Two usable addresses: .1 and .2.
    let pools = || local_pool("10.200.0.0/30");
    let config = local_config("it-local", class);
    let ctrl = Ctrl::start(&client, config.clone(), pools());
    let mut a = lb_service(&ns, "a", Some(class), &[("http", 80, "TCP", None)]);
    a.metadata.annotations = Some(
        [(
            REQUESTED_IPS_ANNOTATION.to_string(),
            "10.200.0.2".to_string(),
        )]
        .into(),
    );
    create(&client, &a).await?;
    let a = wait_status(&client, &ns, "a").await?;
    assert_eq!(ips(&a), vec!["10.200.0.2"]);
    let mode = a
        .status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|l| l.ingress.as_ref())
        .and_then(|i| i[0].ip_mode.clone());
    assert_eq!(mode.as_deref(), Some("VIP"));
    create(
        &client,
        &lb_service(&ns, "b", Some(class), &[("http", 80, "TCP", None)]),
    )
    .await?;
    let b = wait_status(&client, &ns, "b").await?;
    assert_eq!(ips(&b), vec!["10.200.0.1"]);

    // Exhausted: an Event, and retries.
    create(
        &client,
        &lb_service(&ns, "c", Some(class), &[("http", 80, "TCP", None)]),
    )
    .await?;
    wait_event(
        &client,
        &ns,
        "c",
        "SyncLoadBalancerFailed",
        "no free IPv4 address",
    )
    .await?;
    // Outside the pools, and taken: Events.
    let mut d = lb_service(&ns, "d", Some(class), &[("http", 80, "TCP", None)]);
    d.metadata.annotations =
        Some([(REQUESTED_IPS_ANNOTATION.to_string(), "10.9.9.9".to_string())].into());
    create(&client, &d).await?;
    wait_event(
        &client,
        &ns,
        "d",
        "SyncLoadBalancerFailed",
        "outside every local pool",
    )
    .await?;
    let mut e = lb_service(&ns, "e", Some(class), &[("http", 80, "TCP", None)]);
    e.metadata.annotations = Some(
        [(
            REQUESTED_IPS_ANNOTATION.to_string(),
            "10.200.0.2".to_string(),
        )]
        .into(),
    );
    create(&client, &e).await?;
    wait_event(&client, &ns, "e", "SyncLoadBalancerFailed", "already used").await?;

    // Restart with empty memory: a and b keep their addresses; c still waits.
    ctrl.stop().await;
    let ctrl = Ctrl::start(&client, config.clone(), pools());
    wait_for("reconciles after restart", T, || async {
        (ctrl.reconciles_done() >= 5).then_some(())
    })
    .await?;
    assert_eq!(
        ips(&get(&client, &ns, "a").await.ok_or_else(|| anyhow!("a"))?),
        vec!["10.200.0.2"]
    );
    assert_eq!(
        ips(&get(&client, &ns, "b").await.ok_or_else(|| anyhow!("b"))?),
        vec!["10.200.0.1"]
    );
    assert!(ips(&get(&client, &ns, "c").await.ok_or_else(|| anyhow!("c"))?).is_empty());

    // Deleting a releases 10.200.0.2; c gets it on its next retry.
    Api::<Service>::namespaced(client.clone(), &ns)
        .delete("a", &DeleteParams::default())
        .await?;
    wait_for("a gone", T, || async {
        get(&client, &ns, "a").await.is_none().then_some(())
    })
    .await?;
    let c = wait_for(
        "c gets the freed address",
        Duration::from_secs(90),
        || async { get(&client, &ns, "c").await.filter(|s| !ips(s).is_empty()) },
    )
    .await?;
    assert_eq!(ips(&c), vec!["10.200.0.2"]);
    ctrl.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn annotations_reach_elbv2() -> Result<()> {
    let _g = SERIAL.lock().await;
    let (client, ns) = setup().await?;
    let aws = Aws::start("it-ann").await?;
    let class = "test.example.com/ann";
    node(&client, "ann-a").await?;
    let ctrl = Ctrl::start(&client, aws.config(class, false), aws.provider());
    let a = "service.beta.kubernetes.io/aws-load-balancer-";
    let mut s = lb_service(&ns, "ann", Some(class), &[("http", 80, "TCP", None)]);
    s.metadata.annotations = Some(
        [
            ("type", "nlb"),
            ("internal", "true"),
            ("cross-zone-load-balancing-enabled", "true"),
            ("additional-resource-tags", "team=payments,env=test"),
            (
                "target-group-attributes",
                "deregistration_delay.timeout_seconds=15",
            ),
            ("healthcheck-protocol", "HTTP"),
            ("healthcheck-path", "/ready"),
            ("healthcheck-interval", "20"),
            ("healthcheck-timeout", "5"),
            ("healthcheck-healthy-threshold", "4"),
            ("subnets", aws.subnets[0].as_str()),
        ]
        .into_iter()
        .map(|(k, v)| (format!("{a}{k}"), v.to_string()))
        .collect(),
    );
    create(&client, &s).await?;
    let svc = wait_status(&client, &ns, "ann").await?;
    let lb = aws.lb_of(&svc).await.ok_or_else(|| anyhow!("no lb"))?;
    let lb_arn = lb.load_balancer_arn().unwrap_or_default().to_string();
    assert_eq!(lb.scheme().map(|s| s.as_str()), Some("internal"));
    let attrs = aws
        .elb
        .describe_load_balancer_attributes()
        .load_balancer_arn(&lb_arn)
        .send()
        .await?;
    let cross = attrs
        .attributes()
        .iter()
        .find(|x| x.key() == Some("load_balancing.cross_zone.enabled"))
        .and_then(|x| x.value());
    assert_eq!(cross, Some("true"));
    let tg = aws
        .tgs_of(&lb_arn)
        .await
        .into_iter()
        .next()
        .ok_or_else(|| anyhow!("no tg"))?;
    let tg_arn = tg.target_group_arn().unwrap_or_default().to_string();
    assert_eq!(tg.health_check_protocol().map(|p| p.as_str()), Some("HTTP"));
    assert_eq!(tg.health_check_path(), Some("/ready"));
    assert_eq!(tg.health_check_interval_seconds(), Some(20));
    assert_eq!(tg.health_check_timeout_seconds(), Some(5));
    assert_eq!(tg.healthy_threshold_count(), Some(4));
    let tg_attrs = aws
        .elb
        .describe_target_group_attributes()
        .target_group_arn(&tg_arn)
        .send()
        .await?;
    let delay = tg_attrs
        .attributes()
        .iter()
        .find(|x| x.key() == Some("deregistration_delay.timeout_seconds"))
        .and_then(|x| x.value());
    assert_eq!(delay, Some("15"));
    for arn in [&lb_arn, &tg_arn] {
        let t = aws.elb.describe_tags().resource_arns(arn).send().await?;
        let tags: BTreeMap<String, String> = t
            .tag_descriptions()
            .iter()
            .flat_map(|d| d.tags())
            .filter_map(|t| Some((t.key()?.to_string(), t.value()?.to_string())))
            .collect();
        assert_eq!(
            tags.get("team").map(String::as_str),
            Some("payments"),
            "{arn}"
        );
        assert_eq!(
            tags.get("kubernetes.io/cluster/it-ann").map(String::as_str),
            Some("owned")
        );
    }

    // Changing a health-check annotation modifies in place; nothing is recreated.
    aws.proxy.reset_counts();
    patch(
        &client,
        &ns,
        "ann",
        serde_json::json!({"metadata": {"annotations": {format!("{a}healthcheck-interval"): "30"}}}),
    )
    .await?;
    wait_for("interval 30", T, || async {
        let tg = aws.tgs_of(&lb_arn).await.into_iter().next()?;
        (tg.health_check_interval_seconds() == Some(30)).then_some(())
    })
    .await?;
    let c = aws.proxy.counts();
    let mutating: BTreeMap<_, _> = c.iter().filter(|(k, _)| is_mutating(k)).collect();
    assert_eq!(
        mutating.keys().map(|k| k.as_str()).collect::<Vec<_>>(),
        vec!["ModifyTargetGroup"],
        "{c:?}"
    );
    ctrl.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn foreign_load_balancer_with_our_name_is_never_touched() -> Result<()> {
    let _g = SERIAL.lock().await;
    let (client, ns) = setup().await?;
    let aws = Aws::start("it-foreign").await?;
    let class = "test.example.com/foreign";
    node(&client, "for-a").await?;
    // The Service exists before the controller, so its name (from its UID) is known.
    let svc = create(
        &client,
        &lb_service(&ns, "taken", Some(class), &[("http", 80, "TCP", None)]),
    )
    .await?;
    let name = cloud_lb::aws::spec::load_balancer_name(&aws.cluster, &svc);
    // Someone else's load balancer with that name (no ownership tags).
    aws.elb
        .create_load_balancer()
        .name(&name)
        .r#type(elbv2::types::LoadBalancerTypeEnum::Network)
        .subnets(&aws.subnets[0])
        .tags(
            elbv2::types::Tag::builder()
                .key("owner")
                .value("someone-else")
                .build(),
        )
        .send()
        .await?;
    let ctrl = Ctrl::start(&client, aws.config(class, false), aws.provider());
    let note = wait_event(
        &client,
        &ns,
        "taken",
        "SyncLoadBalancerFailed",
        "not tagged as owned",
    )
    .await?;
    assert!(note.contains(&name), "{note}");
    let c = aws.proxy.counts();
    let mutating: BTreeMap<_, _> = c.iter().filter(|(k, _)| is_mutating(k)).collect();
    assert!(
        mutating.is_empty(),
        "touched a foreign load balancer: {c:?}"
    );
    assert_eq!(aws.lbs_named(&name).await.len(), 1);

    // Deleting the Service does not delete the foreign load balancer either.
    Api::<Service>::namespaced(client.clone(), &ns)
        .delete("taken", &DeleteParams::default())
        .await?;
    let note = wait_event(
        &client,
        &ns,
        "taken",
        "SyncLoadBalancerFailed",
        "before cleanup",
    )
    .await?;
    assert!(note.contains("not tagged as owned"), "{note}");
    let c = aws.proxy.counts();
    assert!(!c.contains_key("DeleteLoadBalancer"), "{c:?}");
    assert_eq!(aws.lbs_named(&name).await.len(), 1);
    // Release the Service for the next tests: drop our finalizer by hand.
    ctrl.stop().await;
    Api::<Service>::namespaced(client.clone(), &ns)
        .patch(
            "taken",
            &PatchParams::default(),
            &Patch::Merge(&serde_json::json!({"metadata": {"finalizers": null}})),
        )
        .await
        .ok();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn host_update_recovers_from_resources_deleted_out_of_band() -> Result<()> {
    let _g = SERIAL.lock().await;
    let aws = Aws::start("it-stale").await?;
    let provider = aws.provider();
    let mut svc = lb_service("ns", "stale", None, &[("http", 80, "TCP", Some(30080))]);
    svc.metadata.uid = Some("uid-stale".into());
    let n = |name: &str| Node {
        metadata: ObjectMeta {
            name: Some(name.into()),
            ..Default::default()
        },
        spec: Some(k8s_openapi::api::core::v1::NodeSpec {
            provider_id: Some(format!("aws:///us-east-1a/{}", instance(name))),
            ..Default::default()
        }),
        status: None,
    };
    provider.ensure("it-stale", &svc, &[n("s-a")]).await?;
    let lb = aws.lb_of(&svc).await.ok_or_else(|| anyhow!("no lb"))?;
    let lb_arn = lb.load_balancer_arn().unwrap_or_default().to_string();
    let tg_arn = aws.tgs_of(&lb_arn).await[0]
        .target_group_arn()
        .unwrap_or_default()
        .to_string();
    // Someone deletes everything behind our back.
    aws.elb
        .delete_load_balancer()
        .load_balancer_arn(&lb_arn)
        .send()
        .await?;
    aws.elb
        .delete_target_group()
        .target_group_arn(&tg_arn)
        .send()
        .await?;
    // The remembered group is gone: the host update notices, looks up again, finds nothing
    // to update, and succeeds; the next ensure recreates everything.
    provider
        .update_hosts("it-stale", &svc, &[n("s-a"), n("s-b")])
        .await?;
    provider
        .ensure("it-stale", &svc, &[n("s-a"), n("s-b")])
        .await?;
    let lb = aws
        .lb_of(&svc)
        .await
        .ok_or_else(|| anyhow!("not recreated"))?;
    let tg = aws.tgs_of(lb.load_balancer_arn().unwrap_or_default()).await;
    assert_eq!(tg.len(), 1);
    let want: BTreeSet<_> = ["s-a", "s-b"]
        .iter()
        .map(|x| (instance(x), 30080))
        .collect();
    assert_eq!(
        aws.targets(tg[0].target_group_arn().unwrap_or_default())
            .await,
        want
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn local_pool_state_is_rebuilt_each_leadership_term() -> Result<()> {
    let _g = SERIAL.lock().await;
    let (client, ns) = setup().await?;
    let class = "test.example.com/terms";
    let pools = || local_pool("10.201.0.0/30");
    let config = local_config("it-terms", class);
    let requesting = |name: &str, ip: Option<&str>| {
        let mut s = lb_service(&ns, name, Some(class), &[("http", 80, "TCP", None)]);
        if let Some(ip) = ip {
            s.metadata.annotations =
                Some([(REQUESTED_IPS_ANNOTATION.to_string(), ip.to_string())].into());
        }
        s
    };
    // Two replicas; p1 leads first.
    let p1 = Ctrl::start_as(&client, config.clone(), pools(), true);
    let p2 = Ctrl::start_as(&client, config.clone(), pools(), false);
    create(&client, &requesting("a", Some("10.201.0.1"))).await?;
    assert_eq!(
        ips(&wait_status(&client, &ns, "a").await?),
        vec!["10.201.0.1"]
    );

    // p2 takes over and changes the world while p1 follows.
    p1.set_leading(false);
    p2.set_leading(true);
    create(&client, &requesting("b", Some("10.201.0.2"))).await?;
    assert_eq!(
        ips(&wait_status(&client, &ns, "b").await?),
        vec!["10.201.0.2"]
    );
    Api::<Service>::namespaced(client.clone(), &ns)
        .delete("a", &DeleteParams::default())
        .await?;
    wait_for("a gone", T, || async {
        get(&client, &ns, "a").await.is_none().then_some(())
    })
    .await?;
    create(&client, &requesting("c", None)).await?;
    assert_eq!(
        ips(&wait_status(&client, &ns, "c").await?),
        vec!["10.201.0.1"]
    );

    // p1 leads again: what it remembers is stale (a held .1, .2 was free). It must rebuild
    // from the Services, so the pool is full and d gets nothing rather than a duplicate.
    p2.set_leading(false);
    p1.set_leading(true);
    create(&client, &requesting("d", None)).await?;
    wait_event(
        &client,
        &ns,
        "d",
        "SyncLoadBalancerFailed",
        "no free IPv4 address",
    )
    .await?;
    assert!(ips(&get(&client, &ns, "d").await.ok_or_else(|| anyhow!("d"))?).is_empty());
    assert_eq!(
        ips(&get(&client, &ns, "b").await.ok_or_else(|| anyhow!("b"))?),
        vec!["10.201.0.2"]
    );
    assert_eq!(
        ips(&get(&client, &ns, "c").await.ok_or_else(|| anyhow!("c"))?),
        vec!["10.201.0.1"]
    );
    p1.stop().await;
    p2.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn source_ranges_are_enforced_in_node_security_groups() -> Result<()> {
    let _g = SERIAL.lock().await;
    let (client, ns) = setup().await?;
    let cluster = "it-sg";
    let aws = Aws::start(cluster).await?;
    let class = "test.example.com/sg";
    let subnet = aws.subnets[0].clone();
    let vpc = aws.vpc_of_subnet(&subnet).await?;
    let cluster_tag = format!("kubernetes.io/cluster/{cluster}");
    let nodes_sg = aws
        .security_group(&vpc, "nodes", &[(&cluster_tag, "owned")])
        .await?;
    let extra_sg = aws.security_group(&vpc, "extra", &[]).await?;
    // Two groups: the one tagged for the cluster is opened, the other left alone.
    let i_a = aws.instance(&subnet, &[&nodes_sg, &extra_sg]).await?;
    let i_b = aws.instance(&subnet, &[&nodes_sg]).await?;
    node_on(&client, "sg-a", &i_a).await?;
    node_on(&client, "sg-b", &i_b).await?;
    let ctrl = Ctrl::start(&client, aws.config(class, false), aws.provider());

    let mut s = lb_service(&ns, "web", Some(class), &[("http", 80, "TCP", None)]);
    if let Some(sp) = s.spec.as_mut() {
        sp.load_balancer_source_ranges = Some(vec!["203.0.113.0/24".into()]);
    }
    create(&client, &s).await?;
    let svc = wait_status(&client, &ns, "web").await?;
    let np = node_port(&svc, 80);
    let lb_name = cloud_lb::aws::spec::load_balancer_name(cluster, &svc);
    let client_desc = format!("kubernetes.io/rule/nlb/client={lb_name}");
    let health_desc = format!("kubernetes.io/rule/nlb/health={lb_name}");
    let subnet_cidr = aws
        .ec2
        .describe_subnets()
        .subnet_ids(&subnet)
        .send()
        .await?
        .subnets()
        .first()
        .and_then(|s| s.cidr_block())
        .unwrap_or_default()
        .to_string();
    let ours = |rules: &BTreeSet<(String, i32, String, String)>| -> BTreeSet<(String, i32, String, String)> {
        rules
            .iter()
            .filter(|r| r.3.starts_with("kubernetes.io/rule/nlb/"))
            .cloned()
            .collect()
    };
    let want = |ranges: &[&str]| -> BTreeSet<(String, i32, String, String)> {
        let mut w = BTreeSet::new();
        for r in ranges {
            w.insert(("tcp".to_string(), np, r.to_string(), client_desc.clone()));
            let (proto, from) = if r.contains(':') {
                ("icmpv6", 2)
            } else {
                ("icmp", 3)
            };
            w.insert((
                proto.to_string(),
                from,
                r.to_string(),
                "kubernetes.io/rule/nlb/mtu".to_string(),
            ));
        }
        w.insert((
            "tcp".to_string(),
            np,
            subnet_cidr.clone(),
            health_desc.clone(),
        ));
        w
    };
    wait_for(
        "client, health and MTU rules on the nodes' group",
        T,
        || async { (ours(&aws.rules(&nodes_sg).await) == want(&["203.0.113.0/24"])).then_some(()) },
    )
    .await?;
    assert!(ours(&aws.rules(&extra_sg).await).is_empty());

    // Changing the ranges moves the rules; nothing else on the group is touched.
    aws.ec2
        .authorize_security_group_ingress()
        .group_id(&nodes_sg)
        .ip_permissions(
            ec2::types::IpPermission::builder()
                .ip_protocol("tcp")
                .from_port(22)
                .to_port(22)
                .ip_ranges(
                    ec2::types::IpRange::builder()
                        .cidr_ip("192.0.2.0/24")
                        .description("ssh by hand")
                        .build(),
                )
                .build(),
        )
        .send()
        .await?;
    patch(
        &client,
        &ns,
        "web",
        serde_json::json!({"spec": {"loadBalancerSourceRanges": ["198.51.100.0/24", "2001:db8::/32"]}}),
    )
    .await?;
    wait_for("rules for the new ranges only", T, || async {
        (ours(&aws.rules(&nodes_sg).await) == want(&["198.51.100.0/24", "2001:db8::/32"]))
            .then_some(())
    })
    .await?;
    assert!(
        aws.rules(&nodes_sg)
            .await
            .iter()
            .any(|r| r.3 == "ssh by hand")
    );

    // A node from another pool, whose instance has one untagged group: that group opens too.
    let pool_sg = aws.security_group(&vpc, "pool-2", &[]).await?;
    let i_c = aws.instance(&subnet, &[&pool_sg]).await?;
    node_on(&client, "sg-c", &i_c).await?;
    wait_for("rules on the new pool's group", T, || async {
        (ours(&aws.rules(&pool_sg).await) == want(&["198.51.100.0/24", "2001:db8::/32"]))
            .then_some(())
    })
    .await?;

    // Steady state: a resync changes no rule.
    aws.proxy.reset_counts();
    patch(
        &client,
        &ns,
        "web",
        serde_json::json!({"metadata": {"annotations": {"example.com/touch": "1"}}}),
    )
    .await?;
    wait_for("a resync's security group describe", T, || async {
        aws.proxy
            .counts()
            .contains_key("DescribeSecurityGroups")
            .then_some(())
    })
    .await?;
    let c = aws.proxy.counts();
    assert!(
        !c.contains_key("AuthorizeSecurityGroupIngress")
            && !c.contains_key("RevokeSecurityGroupIngress"),
        "{c:?}"
    );

    // Deletion revokes every rule of ours (MTU included, no other load balancer needs it)
    // before the load balancer goes; the hand-made rule stays.
    Api::<Service>::namespaced(client.clone(), &ns)
        .delete("web", &DeleteParams::default())
        .await?;
    wait_for("service gone", T, || async {
        get(&client, &ns, "web").await.is_none().then_some(())
    })
    .await?;
    for g in [&nodes_sg, &pool_sg, &extra_sg] {
        assert!(
            ours(&aws.rules(g).await).is_empty(),
            "{g}: {:?}",
            aws.rules(g).await
        );
    }
    assert!(
        aws.rules(&nodes_sg)
            .await
            .iter()
            .any(|r| r.3 == "ssh by hand")
    );
    assert!(aws.tagged(&ns, "web").await?.is_empty());

    // A group at EC2's rule quota (60 inbound, enforced by moto as by AWS): a clear Warning
    // naming the group and the ways out, instead of an opaque API error.
    let mut fill = ec2::types::IpPermission::builder()
        .ip_protocol("tcp")
        .from_port(23)
        .to_port(23);
    for i in 0..59 {
        fill = fill.ip_ranges(
            ec2::types::IpRange::builder()
                .cidr_ip(format!("10.250.{i}.0/24"))
                .build(),
        );
    }
    aws.ec2
        .authorize_security_group_ingress()
        .group_id(&nodes_sg)
        .ip_permissions(fill.build())
        .send()
        .await?;
    create(
        &client,
        &lb_service(&ns, "full", Some(class), &[("http", 80, "TCP", None)]),
    )
    .await?;
    let note = wait_event(&client, &ns, "full", "SyncLoadBalancerFailed", "is full").await?;
    assert!(note.contains(&nodes_sg), "{note}");
    ctrl.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn subnets_are_discovered_by_tag_or_resolved_by_name() -> Result<()> {
    let _g = SERIAL.lock().await;
    let (client, ns) = setup().await?;
    let cluster = "it-disc";
    let aws = Aws::start(cluster).await?;
    let class = "test.example.com/disc";
    let ours = format!("kubernetes.io/cluster/{cluster}");
    let vpc = aws
        .ec2
        .create_vpc()
        .cidr_block("10.20.0.0/16")
        .send()
        .await?
        .vpc()
        .and_then(|v| v.vpc_id())
        .unwrap_or_default()
        .to_string();
    let subnet = |cidr: &'static str, zone: &'static str| {
        let ec2 = aws.ec2.clone();
        let vpc = vpc.clone();
        async move {
            let r = ec2
                .create_subnet()
                .vpc_id(vpc)
                .cidr_block(cidr)
                .availability_zone(zone)
                .send()
                .await?;
            r.subnet()
                .and_then(|s| s.subnet_id())
                .map(str::to_string)
                .ok_or_else(|| anyhow!("no subnet"))
        }
    };
    let a1 = subnet("10.20.1.0/24", "us-east-1a").await?;
    let a2 = subnet("10.20.2.0/24", "us-east-1a").await?;
    let b = subnet("10.20.3.0/24", "us-east-1b").await?;
    let c = subnet("10.20.4.0/24", "us-east-1c").await?;
    let other = subnet("10.20.5.0/24", "us-east-1d").await?;
    aws.tag(
        &a1,
        &[(&ours, "shared"), ("kubernetes.io/role/internal-elb", "1")],
    )
    .await?;
    aws.tag(&a2, &[(&ours, "shared"), ("kubernetes.io/role/elb", "1")])
        .await?;
    aws.tag(&c, &[(&ours, "owned"), ("Name", "private-c")])
        .await?;
    aws.tag(&other, &[("kubernetes.io/cluster/someone-else", "owned")])
        .await?;
    // a1, a2, b and other are public (their table routes to an internet gateway); c uses
    // the main table, which does not.
    let igw = aws
        .ec2
        .create_internet_gateway()
        .send()
        .await?
        .internet_gateway()
        .and_then(|g| g.internet_gateway_id())
        .unwrap_or_default()
        .to_string();
    aws.ec2
        .attach_internet_gateway()
        .internet_gateway_id(&igw)
        .vpc_id(&vpc)
        .send()
        .await?;
    let rt = aws
        .ec2
        .create_route_table()
        .vpc_id(&vpc)
        .send()
        .await?
        .route_table()
        .and_then(|t| t.route_table_id())
        .unwrap_or_default()
        .to_string();
    aws.ec2
        .create_route()
        .route_table_id(&rt)
        .destination_cidr_block("0.0.0.0/0")
        .gateway_id(&igw)
        .send()
        .await?;
    for s in [&a1, &a2, &b, &other] {
        aws.ec2
            .associate_route_table()
            .route_table_id(&rt)
            .subnet_id(s)
            .send()
            .await?;
    }
    // The VPC is found through the nodes' instances.
    let sg = aws
        .security_group(&vpc, "nodes", &[(&ours, "owned")])
        .await?;
    let i = aws.instance(&c, &[&sg]).await?;
    node_on(&client, "disc-a", &i).await?;
    let ctrl = Ctrl::start(
        &client,
        aws.config(class, false),
        aws.provider_with(AwsCloudConfig::default()),
    );

    let public = lb_service(&ns, "public", Some(class), &[("http", 80, "TCP", None)]);
    create(&client, &public).await?;
    let mut internal = lb_service(&ns, "internal", Some(class), &[("http", 80, "TCP", None)]);
    internal.metadata.annotations = Some(
        [(
            "service.beta.kubernetes.io/aws-load-balancer-internal".to_string(),
            "true".to_string(),
        )]
        .into(),
    );
    create(&client, &internal).await?;
    let mut named = lb_service(&ns, "named", Some(class), &[("http", 80, "TCP", None)]);
    named.metadata.annotations = Some(
        [(
            "service.beta.kubernetes.io/aws-load-balancer-subnets".to_string(),
            format!("private-c, {b}"),
        )]
        .into(),
    );
    create(&client, &named).await?;
    let mut missing = lb_service(&ns, "missing", Some(class), &[("http", 80, "TCP", None)]);
    missing.metadata.annotations = Some(
        [(
            "service.beta.kubernetes.io/aws-load-balancer-subnets".to_string(),
            "no-such-subnet".to_string(),
        )]
        .into(),
    );
    create(&client, &missing).await?;

    let svc = wait_status(&client, &ns, "public").await?;
    // Zone a: the role tag wins; zone b: the only (untagged) subnet; c is private; the other
    // cluster's subnet is never used.
    assert_eq!(aws.lb_subnets(&svc).await, [a2.clone(), b.clone()].into());
    let svc = wait_status(&client, &ns, "internal").await?;
    assert_eq!(
        aws.lb_subnets(&svc).await,
        [a1.clone(), b.clone(), c.clone()].into()
    );
    let svc = wait_status(&client, &ns, "named").await?;
    assert_eq!(aws.lb_subnets(&svc).await, [c.clone(), b.clone()].into());
    wait_event(
        &client,
        &ns,
        "missing",
        "SyncLoadBalancerFailed",
        "no subnet named \"no-such-subnet\"",
    )
    .await?;
    assert!(aws.lb_of(&missing).await.is_none());
    ctrl.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn node_sync_latency_is_one_observation_per_pass() -> Result<()> {
    let _g = SERIAL.lock().await;
    let (client, ns) = setup().await?;
    let aws = Aws::start("it-pass").await?;
    let class = "test.example.com/pass";
    node(&client, "pass-a").await?;
    let ctrl = Ctrl::start(&client, aws.config(class, false), aws.provider());
    let names = ["p1", "p2", "p3"];
    for n in names {
        create(
            &client,
            &lb_service(&ns, n, Some(class), &[("http", 80, "TCP", None)]),
        )
        .await?;
    }
    for n in names {
        wait_status(&client, &ns, n).await?;
    }
    let passes = "service_controller_nodesync_latency_seconds_count";
    let hosts = "service_controller_update_loadbalancer_host_latency_seconds_count";
    let (p0, h0) = (ctrl.count(passes), ctrl.count(hosts));
    node(&client, "pass-b").await?;
    wait_for(
        "every load balancer updated with the new host",
        T,
        || async { (ctrl.count(hosts) >= h0 + 3).then_some(()) },
    )
    .await?;
    wait_for("the pass to be observed", T, || async {
        (ctrl.count(passes) > p0).then_some(())
    })
    .await?;
    // One node event: one pass over three Services, observed once (upstream measures the
    // whole pass), while each Service's host update is observed on its own. (The start-up
    // pass may still finish inside this window, so "fewer than hosts", not "exactly one".)
    let (dp, dh) = (ctrl.count(passes) - p0, ctrl.count(hosts) - h0);
    assert_eq!(dh, 3);
    assert!(dp >= 1 && dp < dh, "passes {dp}, host updates {dh}");
    ctrl.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unknown_instances_never_strip_a_load_balancers_rules() -> Result<()> {
    let _g = SERIAL.lock().await;
    let cluster = "it-unknown";
    let aws = Aws::start(cluster).await?;
    let provider = aws.provider();
    let subnet = aws.subnets[0].clone();
    let vpc = aws.vpc_of_subnet(&subnet).await?;
    let tag = format!("kubernetes.io/cluster/{cluster}");
    let sg = aws
        .security_group(&vpc, "nodes", &[(&tag, "owned")])
        .await?;
    let real = aws.instance(&subnet, &[&sg]).await?;
    let mut svc = lb_service("ns", "keep", None, &[("http", 80, "TCP", Some(30081))]);
    svc.metadata.uid = Some("uid-keep".into());
    let on = |name: &str, id: &str| Node {
        metadata: ObjectMeta {
            name: Some(name.into()),
            ..Default::default()
        },
        spec: Some(k8s_openapi::api::core::v1::NodeSpec {
            provider_id: Some(format!("aws:///us-east-1a/{id}")),
            ..Default::default()
        }),
        status: None,
    };
    let client_rules = || async {
        aws.rules(&sg)
            .await
            .into_iter()
            .filter(|r| r.3.starts_with("kubernetes.io/rule/nlb/client="))
            .count()
    };
    provider.ensure(cluster, &svc, &[on("k-a", &real)]).await?;
    assert_eq!(client_rules().await, 1);
    // Every node now names an instance EC2 does not know (a lagging describe, say): the
    // rules stay rather than being revoked as "no node uses this group".
    provider
        .ensure(cluster, &svc, &[on("k-b", "i-0000000000000dead")])
        .await?;
    assert_eq!(client_rules().await, 1);
    // With a known instance elsewhere, the plan runs again (and keeps the rule on its group).
    provider
        .ensure(
            cluster,
            &svc,
            &[on("k-a", &real), on("k-b", "i-0000000000000dead")],
        )
        .await?;
    assert_eq!(client_rules().await, 1);
    provider.ensure_deleted(cluster, &svc).await?;
    assert_eq!(client_rules().await, 0);
    Ok(())
}
