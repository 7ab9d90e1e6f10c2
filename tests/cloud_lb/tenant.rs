//! Tenant safety (issue 13): what one namespace's Service may not ask of what every Service
//! shares. Each refusal is a Warning Event, a metric and no cloud call (or, for subnets, only
//! the describes that prove the refusal), and never names another namespace's Service. Also:
//! unsupported `aws-load-balancer-*` annotations are warned about once per Service and set.

use anyhow::{Result, anyhow};
use cloud_lb::LoadBalancerProvider;
use k8s_openapi::api::events::v1::Event;
use kube::api::{Api, ListParams};
use test_support::moto::is_mutating;
use test_support::{namespace, wait_for};

use crate::aws::*;
use crate::harness::*;

const A: &str = "service.beta.kubernetes.io/aws-load-balancer-";

fn annotated(
    ns: &str,
    name: &str,
    class: &str,
    ann: &[(&str, &str)],
) -> k8s_openapi::api::core::v1::Service {
    let mut s = lb_service(ns, name, Some(class), &[("http", 80, "TCP", None)]);
    s.metadata.annotations = Some(
        ann.iter()
            .map(|(k, v)| (format!("{A}{k}"), v.to_string()))
            .collect(),
    );
    s
}

/// The refusal metric for `reason`.
fn refusals(ctrl: &Ctrl, reason: &str) -> u64 {
    ctrl.count(&format!(
        "service_controller_loadbalancer_refusals_total{{reason=\"{reason}\"}}"
    ))
}

/// A subnet in a VPC of its own (not the cluster's).
async fn foreign_subnet(aws: &Aws) -> Result<String> {
    let vpc = aws
        .ec2
        .create_vpc()
        .cidr_block("10.99.0.0/16")
        .send()
        .await?
        .vpc()
        .and_then(|v| v.vpc_id())
        .map(str::to_string)
        .ok_or_else(|| anyhow!("no vpc"))?;
    aws.ec2
        .create_subnet()
        .vpc_id(&vpc)
        .cidr_block("10.99.1.0/24")
        .availability_zone("us-east-1a")
        .send()
        .await?
        .subnet()
        .and_then(|s| s.subnet_id())
        .map(str::to_string)
        .ok_or_else(|| anyhow!("no subnet"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unsafe_asks_are_refused_with_a_warning_and_no_cloud_call() -> Result<()> {
    let _g = SERIAL.lock().await;
    let (client, ns) = setup().await?;
    let aws = Aws::start("it-tenant").await?;
    let class = "test.example.com/tenant";
    node(&client, "tenant-a").await?;
    let ctrl = Ctrl::start(&client, aws.config(class, false), aws.provider());

    // A neighbour in another namespace, served normally: no message may name it.
    let other_ns = namespace(&client, "cloudlb-neighbour").await?;
    create(&client, &annotated(&other_ns, "neighbour", class, &[])).await?;
    let neighbour = wait_status(&client, &other_ns, "neighbour").await?;
    let neighbour_lb = cloud_lb::aws::spec::load_balancer_name(&aws.cluster, &neighbour);
    let neighbour_np = node_port(&neighbour, 80);
    wait_for("the first inventory sweep", T, || async {
        (ctrl.count("service_controller_cloud_inventory_sweeps_total") >= 1).then_some(())
    })
    .await?;
    aws.proxy.reset_counts();

    // Health checks on another Service's node port (or SSH, the kubelet): refused.
    let hc = annotated(
        &ns,
        "hc",
        class,
        &[("healthcheck-port", &neighbour_np.to_string())],
    );
    create(&client, &hc).await?;
    // Twelve source ranges: 12 client rules + 12 MTU rules, over the default cap of 20.
    let mut cap = annotated(&ns, "cap", class, &[]);
    if let Some(sp) = cap.spec.as_mut() {
        sp.load_balancer_source_ranges =
            Some((1..=12).map(|i| format!("198.51.{i}.0/24")).collect());
    }
    create(&client, &cap).await?;
    wait_event(
        &client,
        &ns,
        "hc",
        "SyncLoadBalancerFailed",
        &format!("healthcheck-port=\"{neighbour_np}\" is refused"),
    )
    .await?;
    wait_event(
        &client,
        &ns,
        "cap",
        "SyncLoadBalancerFailed",
        "more than the 20 one Service may use",
    )
    .await?;
    // Both refused before any call: the proxy saw nothing at all.
    assert_eq!(aws.proxy.counts(), Default::default());
    assert_eq!(refusals(&ctrl, "HealthCheckPortNotOwned"), 1);
    assert_eq!(refusals(&ctrl, "SecurityGroupRuleCapExceeded"), 1);

    // A subnet of another VPC: described, then refused; nothing made.
    let foreign = foreign_subnet(&aws).await?;
    create(
        &client,
        &annotated(&ns, "subnet", class, &[("subnets", &foreign)]),
    )
    .await?;
    wait_event(
        &client,
        &ns,
        "subnet",
        "SyncLoadBalancerFailed",
        &format!("{foreign} is not in the cluster's VPC"),
    )
    .await?;
    let counts = aws.proxy.counts();
    assert!(counts.contains_key("DescribeSubnets"), "{counts:?}");
    assert!(!counts.keys().any(|op| is_mutating(op)), "{counts:?}");
    assert_eq!(refusals(&ctrl, "SubnetOutsideClusterVpc"), 1);
    for name in ["hc", "cap", "subnet"] {
        let svc = get(&client, &ns, name)
            .await
            .ok_or_else(|| anyhow!("{name} gone"))?;
        assert!(
            aws.lb_of(&svc).await.is_none(),
            "{name} got a load balancer"
        );
    }

    // No Event in this namespace names the neighbour (its namespace, name or load balancer).
    let notes: Vec<String> = Api::<Event>::namespaced(client.clone(), &ns)
        .list(&ListParams::default())
        .await?
        .items
        .into_iter()
        .filter_map(|e| e.note)
        .collect();
    assert!(notes.len() >= 3, "{notes:?}");
    for n in &notes {
        assert!(
            !n.contains(&other_ns) && !n.contains(&neighbour_lb),
            "names the neighbour: {n}"
        );
    }

    // Its own node port is fine: the load balancer is made, checking that port.
    let hc_svc = get(&client, &ns, "hc")
        .await
        .ok_or_else(|| anyhow!("hc gone"))?;
    let own = node_port(&hc_svc, 80).to_string();
    patch(
        &client,
        &ns,
        "hc",
        serde_json::json!({"metadata": {"annotations": {format!("{A}healthcheck-port"): own}}}),
    )
    .await?;
    let hc_svc = wait_status(&client, &ns, "hc").await?;
    let lb = aws
        .lb_of(&hc_svc)
        .await
        .ok_or_else(|| anyhow!("no lb for hc"))?;
    let tgs = aws.tgs_of(lb.load_balancer_arn().unwrap_or_default()).await;
    assert_eq!(
        tgs.iter()
            .map(|t| t.health_check_port().unwrap_or_default().to_string())
            .collect::<Vec<_>>(),
        vec![own]
    );
    ctrl.stop().await;
    Ok(())
}

/// Event objects about `name` with `reason`.
async fn events_of(client: &kube::Client, ns: &str, name: &str, reason: &str) -> Vec<Event> {
    Api::<Event>::namespaced(client.clone(), ns)
        .list(&ListParams::default())
        .await
        .map(|l| l.items)
        .unwrap_or_default()
        .into_iter()
        .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name))
        .filter(|e| e.reason.as_deref() == Some(reason))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unsupported_annotations_are_warned_about_once_per_set() -> Result<()> {
    let _g = SERIAL.lock().await;
    let (client, ns) = setup().await?;
    let aws = Aws::start("it-unsupported").await?;
    let class = "test.example.com/unsupported";
    node(&client, "unsup-a").await?;
    let ctrl = Ctrl::start(&client, aws.config(class, false), aws.provider());
    let reason = "UnsupportedAnnotation";
    let metric = "service_controller_loadbalancer_unsupported_annotations_total";

    create(
        &client,
        &annotated(
            &ns,
            "web",
            class,
            &[("proxy-protocol", "*"), ("healthcheck-interval", "20")],
        ),
    )
    .await?;
    // Served anyway: the annotation is ignored, and said to be.
    wait_status(&client, &ns, "web").await?;
    let note = wait_event(&client, &ns, "web", reason, &format!("{A}proxy-protocol")).await?;
    assert!(!note.contains("healthcheck-interval"), "{note}");
    assert_eq!(ctrl.count(metric), 1);

    // Another ensure with the same set (an unrelated annotation changed): no second warning.
    patch(
        &client,
        &ns,
        "web",
        serde_json::json!({"metadata": {"annotations": {"example.com/touch": "1"}}}),
    )
    .await?;
    wait_for("a second ensure", T, || async {
        (events(&client, &ns, "web", "EnsuredLoadBalancer")
            .await
            .len()
            >= 2
            || events_of(&client, &ns, "web", "EnsuredLoadBalancer")
                .await
                .iter()
                .any(|e| e.series.is_some()))
        .then_some(())
    })
    .await?;
    let warned = events_of(&client, &ns, "web", reason).await;
    assert_eq!(warned.len(), 1);
    assert!(warned[0].series.is_none(), "{:?}", warned[0].series);
    assert_eq!(ctrl.count(metric), 1);

    // A new set: one more warning. (kube's event recorder folds a second Event of the same
    // reason into the first one's series within minutes, keeping the first note; so the
    // Event shows a count of 2 rather than a second note.)
    patch(
        &client,
        &ns,
        "web",
        serde_json::json!({"metadata": {"annotations": {format!("{A}access-log-enabled"): "true"}}}),
    )
    .await?;
    wait_for("a second warning for the new set", T, || async {
        let warned = events_of(&client, &ns, "web", reason).await;
        let shown = warned.len()
            + warned
                .iter()
                .filter_map(|e| e.series.as_ref())
                .map(|s| s.count as usize - 1)
                .sum::<usize>();
        (shown == 2 && ctrl.count(metric) == 2).then_some(())
    })
    .await?;
    ctrl.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_cap_counts_health_rules_before_any_group_changes() -> Result<()> {
    let _g = SERIAL.lock().await;
    let cluster = "it-cap-health";
    let aws = Aws::start(cluster).await?;
    let subnet = aws.subnets[0].clone();
    let vpc = aws.vpc_of_subnet(&subnet).await?;
    let tag = format!("kubernetes.io/cluster/{cluster}");
    let sg = aws
        .security_group(&vpc, "nodes", &[(&tag, "owned")])
        .await?;
    let id = aws.instance(&subnet, &[&sg]).await?;
    let node = k8s_openapi::api::core::v1::Node {
        metadata: kube::api::ObjectMeta {
            name: Some("cap-a".into()),
            ..Default::default()
        },
        spec: Some(k8s_openapi::api::core::v1::NodeSpec {
            provider_id: Some(format!("aws:///us-east-1a/{id}")),
            ..Default::default()
        }),
        status: None,
    };
    // One port from one range: a client and an MTU rule (within a cap of 2), plus the health
    // rule from the load balancer's subnet, known only once it exists: 3.
    let mut svc = lb_service("ns", "capped", None, &[("http", 80, "TCP", Some(30090))]);
    svc.metadata.uid = Some("uid-capped".into());
    if let Some(sp) = svc.spec.as_mut() {
        sp.load_balancer_source_ranges = Some(vec!["203.0.113.0/24".into()]);
    }
    let ours = || async {
        aws.rules(&sg)
            .await
            .into_iter()
            .filter(|r| r.3.starts_with("kubernetes.io/rule/nlb/"))
            .count()
    };
    let capped = aws.provider_with(cloud_lb::aws::AwsCloudConfig {
        subnets: aws.subnets[..1].to_vec(),
        max_rules_per_service: Some(2),
        ..Default::default()
    });
    let e = capped
        .ensure(cluster, &svc, std::slice::from_ref(&node))
        .await
        .expect_err("3 rules over a cap of 2");
    assert!(e.is_permanent(), "{e}");
    assert_eq!(e.code(), Some("SecurityGroupRuleCapExceeded"), "{e}");
    assert!(e.to_string().contains("needs 3 ingress rules"), "{e}");
    assert_eq!(ours().await, 0, "no rule granted");
    assert!(
        !aws.proxy
            .counts()
            .contains_key("AuthorizeSecurityGroupIngress")
    );
    // Under the default cap the same Service gets its three rules; deletion takes them.
    let provider = aws.provider();
    provider
        .ensure(cluster, &svc, std::slice::from_ref(&node))
        .await?;
    assert_eq!(ours().await, 3);
    provider.ensure_deleted(cluster, &svc).await?;
    assert_eq!(ours().await, 0);
    Ok(())
}
