//! Security-group rule quota: a source-range change that does not fit must leave the load
//! balancer's old rules in place (issue 12 defect 6: rules were revoked before the new ones
//! were granted, so hitting the quota left the load balancer with neither).

use anyhow::Result;
use cloud_lb::aws::ec2_sdk as ec2;
use test_support::chaos::{Row, report};
use test_support::invariants::{count_panics, double_allocations, leaked_cloud_resources, panics};
use test_support::wait_for;

use crate::aws::*;
use crate::backoff::RETRYABLE;
use crate::harness::*;

/// moto's quota of inbound rules for a VPC security group (EC2's default).
const QUOTA: usize = 60;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_range_change_over_the_rule_quota_keeps_the_old_rules() -> Result<()> {
    let _g = SERIAL.lock().await;
    count_panics();
    let (client, ns) = setup().await?;
    let cluster = "it-quota";
    let aws = Aws::start(cluster).await?;
    let class = "test.example.com/quota";
    let subnet = aws.subnets[0].clone();
    let vpc = aws.vpc_of_subnet(&subnet).await?;
    let cluster_tag = format!("kubernetes.io/cluster/{cluster}");
    let nodes_sg = aws
        .security_group(&vpc, "nodes", &[(&cluster_tag, "owned")])
        .await?;
    let i_a = aws.instance(&subnet, &[&nodes_sg]).await?;
    node_on(&client, "quota-a", &i_a).await?;
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
    let client_rules = |rules: &std::collections::BTreeSet<(String, i32, String, String)>| {
        rules
            .iter()
            .filter(|r| r.3 == client_desc && r.1 == np)
            .map(|r| r.2.clone())
            .collect::<Vec<_>>()
    };
    wait_for("the client rule for the first range", T, || async {
        (client_rules(&aws.rules(&nodes_sg).await) == vec!["203.0.113.0/24".to_string()])
            .then_some(())
    })
    .await?;

    // Fill the group by hand so that exactly two more rules fit.
    let have = aws.rules(&nodes_sg).await.len();
    for i in 0..QUOTA.saturating_sub(have + 2) {
        aws.ec2
            .authorize_security_group_ingress()
            .group_id(&nodes_sg)
            .ip_permissions(
                ec2::types::IpPermission::builder()
                    .ip_protocol("tcp")
                    .from_port(1000 + i as i32)
                    .to_port(1000 + i as i32)
                    .ip_ranges(
                        ec2::types::IpRange::builder()
                            .cidr_ip("192.0.2.0/24")
                            .description("filler by hand")
                            .build(),
                    )
                    .build(),
            )
            .send()
            .await?;
    }
    // Three ranges instead of one: six new client and MTU rules, two old ones to go. Neither
    // order fits, but granting first fails before anything is revoked.
    let errors_before = ctrl.count(RETRYABLE);
    patch(
        &client,
        &ns,
        "web",
        serde_json::json!({"spec": {"loadBalancerSourceRanges": [
            "198.51.100.0/24", "198.51.101.0/24", "198.51.102.0/24"]}}),
    )
    .await?;
    let started = std::time::Instant::now();
    // Waiting for two more finished reconciles could be met by the tail of the first sync
    // (the finalizer's own event queues the Service once more) before the new ranges were
    // tried. A retryable provider error is the refused grant itself (the full group).
    wait_for("a failed sync of the new ranges", T, || async {
        (ctrl.count(RETRYABLE) > errors_before).then_some(())
    })
    .await?;
    // (moto applies the permissions of one call one by one, so some new ones may be in.)
    let now = client_rules(&aws.rules(&nodes_sg).await);
    assert!(
        now.contains(&"203.0.113.0/24".to_string()),
        "the old range's rule stays while the new ones cannot all be granted: {now:?}"
    );
    let leaked = leaked_cloud_resources(&aws.elb, cluster, &client).await?;
    let doubles = double_allocations(&client).await?;
    report(&Row {
        scenario: "source ranges changed past the security-group rule quota",
        // The refused syncs (moto enforces the quota itself; nothing is injected).
        faults: ctrl.count(RETRYABLE),
        converged_in: started.elapsed(),
        slices_differ: None,
        doubles: doubles.len(),
        leaked: Some(leaked.len()),
        panics: panics(),
    });
    assert!(leaked.is_empty(), "leaked: {leaked:?}");
    assert!(doubles.is_empty(), "allocated twice: {doubles:?}");
    assert_eq!(panics(), 0, "a panic in this process");
    ctrl.stop().await;
    Ok(())
}
