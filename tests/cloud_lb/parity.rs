//! AWS parity with cloud-provider-aws (issue 13): TLS listeners from `ssl-cert`, `ssl-ports`
//! and `ssl-negotiation-policy`; `target-node-labels`; `eip-allocations` and
//! `private-ipv4-addresses`, against moto.

use std::sync::{Arc, Mutex};

use anyhow::{Result, anyhow};
use cloud_lb::aws::elbv2_sdk as elbv2;
use elbv2::config::interceptors::BeforeSerializationInterceptorContextRef;
use elbv2::config::{ConfigBag, Intercept};
use elbv2::error::BoxError;
use elbv2::operation::create_load_balancer::CreateLoadBalancerInput;
use test_support::moto::is_mutating;
use test_support::{NodeSpecBuilder, create_node, wait_for};

use crate::batches::provider_seen_by;

use crate::aws::*;
use crate::harness::*;

const A: &str = "service.beta.kubernetes.io/aws-load-balancer-";
/// An IAM server certificate ARN (moto checks ACM ARNs against its ACM, not IAM ones).
const CERT: &str = "arn:aws:iam::123456789012:server-certificate/it-tls";
const POLICY: &str = "ELBSecurityPolicy-TLS13-1-2-2021-06";
const POLICY_2: &str = "ELBSecurityPolicy-TLS13-1-3-2021-06";

/// Port → (protocol, certificate, policy) of the load balancer's listeners, straight from moto.
async fn tls_view(
    aws: &Aws,
    lb_arn: &str,
) -> Result<Vec<(i32, String, Option<String>, Option<String>)>> {
    let out = aws
        .elb
        .describe_listeners()
        .load_balancer_arn(lb_arn)
        .send()
        .await?;
    let mut v: Vec<_> = out
        .listeners()
        .iter()
        .map(|l| {
            (
                l.port().unwrap_or_default(),
                l.protocol()
                    .map(|p| p.as_str().to_string())
                    .unwrap_or_default(),
                l.certificates()
                    .first()
                    .and_then(|c| c.certificate_arn())
                    .map(str::to_string),
                l.ssl_policy().map(str::to_string),
            )
        })
        .collect();
    v.sort();
    Ok(v)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tls_listeners_follow_the_ssl_annotations() -> Result<()> {
    let _g = SERIAL.lock().await;
    let (client, ns) = setup().await?;
    let aws = Aws::start("it-tls").await?;
    let class = "test.example.com/tls";
    node(&client, "tls-a").await?;
    let ctrl = Ctrl::start(&client, aws.config(class, false), aws.provider());

    let mut s = lb_service(
        &ns,
        "tls",
        Some(class),
        &[("http", 80, "TCP", None), ("https", 443, "TCP", None)],
    );
    s.metadata.annotations = Some(
        [
            ("ssl-cert", CERT),
            ("ssl-ports", "https"),
            ("ssl-negotiation-policy", POLICY),
        ]
        .into_iter()
        .map(|(k, v)| (format!("{A}{k}"), v.to_string()))
        .collect(),
    );
    create(&client, &s).await?;
    let svc = wait_status(&client, &ns, "tls").await?;
    let lb = aws.lb_of(&svc).await.ok_or_else(|| anyhow!("no lb"))?;
    let lb_arn = lb.load_balancer_arn().unwrap_or_default().to_string();
    let tls_listener = |policy: &str| {
        (
            443,
            "TLS".to_string(),
            Some(CERT.to_string()),
            Some(policy.to_string()),
        )
    };
    let view = tls_view(&aws, &lb_arn).await?;
    assert_eq!(view.len(), 2, "{view:?}");
    assert_eq!((view[0].0, view[0].1.as_str()), (80, "TCP"));
    assert_eq!(view[1], tls_listener(POLICY));
    // Both forward to the ports' TCP target groups.
    assert!(
        aws.tgs_of(&lb_arn)
            .await
            .iter()
            .all(|t| t.protocol().map(|p| p.as_str()) == Some("TCP"))
    );

    // Converged: a resync makes no mutating call. (Counted from idle, and read once that
    // resync is done: its last describe comes before any change it would make.)
    ctrl.wait_idle().await?;
    aws.proxy.reset_counts();
    patch(
        &client,
        &ns,
        "tls",
        serde_json::json!({"metadata": {"annotations": {"example.com/touch": "1"}}}),
    )
    .await?;
    wait_for("a resync's last describe", T, || async {
        aws.proxy
            .counts()
            .contains_key("DescribeSecurityGroups")
            .then_some(())
    })
    .await?;
    ctrl.wait_idle().await?;
    let c = aws.proxy.counts();
    assert!(!c.keys().any(|op| is_mutating(op)), "{c:?}");

    // Another policy: changed in place.
    patch(
        &client,
        &ns,
        "tls",
        serde_json::json!({"metadata": {"annotations": {format!("{A}ssl-negotiation-policy"): POLICY_2}}}),
    )
    .await?;
    wait_for("the new policy", T, || async {
        let v = tls_view(&aws, &lb_arn).await.ok()?;
        (v.get(1) == Some(&tls_listener(POLICY_2))).then_some(())
    })
    .await?;
    assert!(aws.proxy.counts().contains_key("ModifyListener"));

    // No certificate any more: plain TCP again.
    patch(
        &client,
        &ns,
        "tls",
        serde_json::json!({"metadata": {"annotations": {format!("{A}ssl-cert"): null}}}),
    )
    .await?;
    wait_for("443 back to TCP", T, || async {
        let v = tls_view(&aws, &lb_arn).await.ok()?;
        v.iter()
            .all(|(_, proto, cert, _)| proto == "TCP" && cert.is_none())
            .then_some(())
    })
    .await?;
    ctrl.stop().await;
    Ok(())
}

/// Subnet mappings (subnet, allocation, private address) of every CreateLoadBalancer sent:
/// moto accepts them but does not model the addresses, so the request is what can be checked.
#[derive(Clone, Debug, Default)]
struct Creates(Arc<Mutex<Vec<SentMappings>>>);

type SentMappings = Vec<(String, Option<String>, Option<String>)>;

impl Intercept for Creates {
    fn name(&self) -> &'static str {
        "Creates"
    }

    fn read_before_execution(
        &self,
        ctx: &BeforeSerializationInterceptorContextRef<'_>,
        _cfg: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        if let Some(i) = ctx.input().downcast_ref::<CreateLoadBalancerInput>() {
            let m = i
                .subnet_mappings()
                .iter()
                .map(|m| {
                    (
                        m.subnet_id().unwrap_or_default().to_string(),
                        m.allocation_id().map(str::to_string),
                        m.private_ipv4_address().map(str::to_string),
                    )
                })
                .collect();
            self.0.lock().unwrap_or_else(|e| e.into_inner()).push(m);
        }
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn target_node_labels_and_fixed_addresses() -> Result<()> {
    let _g = SERIAL.lock().await;
    let (client, ns) = setup().await?;
    let aws = Aws::start("it-placement").await?;
    let class = "test.example.com/placement";
    for (name, pool) in [("pl-a", "edge"), ("pl-b", "edge"), ("pl-c", "batch")] {
        create_node(
            &client,
            NodeSpecBuilder {
                name: name.into(),
                zone: Some("us-east-1a".into()),
                provider_id: Some(format!("aws:///us-east-1a/{}", instance(name))),
                labels: [("pool".to_string(), pool.to_string())].into(),
            },
        )
        .await?;
    }
    let creates = Creates::default();
    let ctrl = Ctrl::start(
        &client,
        aws.config(class, false),
        provider_seen_by(&aws, creates.clone()),
    );
    let subnet = aws.subnets[0].clone();
    let eip = aws
        .ec2
        .allocate_address()
        .domain(cloud_lb::aws::ec2_sdk::types::DomainType::Vpc)
        .send()
        .await?
        .allocation_id()
        .map(str::to_string)
        .ok_or_else(|| anyhow!("no allocation"))?;
    let with = |name: &str, ann: &[(&str, &str)]| {
        let mut s = lb_service(&ns, name, Some(class), &[("http", 80, "TCP", None)]);
        s.metadata.annotations = Some(
            ann.iter()
                .map(|(k, v)| (format!("{A}{k}"), v.to_string()))
                .collect(),
        );
        s
    };

    // Only the edge pool's nodes are targets; the Elastic IP goes with the one subnet.
    create(
        &client,
        &with(
            "edge",
            &[
                ("target-node-labels", "pool=edge"),
                ("eip-allocations", &eip),
            ],
        ),
    )
    .await?;
    let svc = wait_status(&client, &ns, "edge").await?;
    let lb = aws.lb_of(&svc).await.ok_or_else(|| anyhow!("no lb"))?;
    let tg = aws
        .tgs_of(lb.load_balancer_arn().unwrap_or_default())
        .await
        .into_iter()
        .next()
        .and_then(|t| t.target_group_arn().map(str::to_string))
        .ok_or_else(|| anyhow!("no target group"))?;
    let np = node_port(&svc, 80);
    wait_targets(
        &aws,
        &tg,
        [("pl-a", np), ("pl-b", np)]
            .iter()
            .map(|(n, p)| (instance(n), *p))
            .collect(),
    )
    .await?;
    assert_eq!(
        creates.0.lock().unwrap_or_else(|e| e.into_inner()).clone(),
        vec![vec![(subnet.clone(), Some(eip.clone()), None)]]
    );

    // An internal load balancer with a fixed private address in its subnet.
    create(
        &client,
        &with(
            "private",
            &[
                ("internal", "true"),
                ("private-ipv4-addresses", "172.31.0.200"),
            ],
        ),
    )
    .await?;
    wait_status(&client, &ns, "private").await?;
    assert_eq!(
        creates
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .last()
            .cloned(),
        Some(vec![(
            subnet.clone(),
            None,
            Some("172.31.0.200".to_string())
        )])
    );

    // Two addresses for one subnet: refused before anything is made.
    let two = with(
        "two",
        &[("eip-allocations", &format!("{eip},eipalloc-0000"))],
    );
    create(&client, &two).await?;
    wait_event(
        &client,
        &ns,
        "two",
        "SyncLoadBalancerFailed",
        "lists 2 values for 1 subnets",
    )
    .await?;
    let two = get(&client, &ns, "two")
        .await
        .ok_or_else(|| anyhow!("two gone"))?;
    assert!(aws.lb_of(&two).await.is_none());
    assert_eq!(creates.0.lock().unwrap_or_else(|e| e.into_inner()).len(), 2);
    ctrl.stop().await;
    Ok(())
}
