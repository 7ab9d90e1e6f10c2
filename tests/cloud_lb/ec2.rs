//! The EC2 side: node security-group rules for source ranges, subnet discovery, unknown instances.

use std::collections::BTreeSet;

use anyhow::{Result, anyhow};
use cloud_lb::LoadBalancerProvider;
use cloud_lb::aws::{AwsCloudConfig, ec2_sdk as ec2};
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, DeleteParams};
use test_support::wait_for;

use crate::aws::*;
use crate::harness::*;

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

    // Steady state: a resync changes no rule. (Counted from idle: the new node's host update
    // may still be running when its rules show.)
    ctrl.wait_idle().await?;
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
    // The describe comes before any grant or revoke: read the counts once that resync is done.
    ctrl.wait_idle().await?;
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
