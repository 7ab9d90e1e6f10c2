//! AWS throttling a share of every call during a mass create and a mass delete: every Service
//! gets its load balancer, and after the deletes nothing is left in the cloud (no leak). Each
//! run adds a row to the chaos table.

use std::time::Duration;

use anyhow::Result;
use k8s_openapi::api::core::v1::Service;
use kube::api::{Api, DeleteParams};
use test_support::chaos::{Row, report};
use test_support::invariants::{
    count_panics, dangling_load_balancer_status, double_allocations, leaked_cloud_resources, panics,
};
use test_support::wait_for;

use crate::aws::*;
use crate::harness::*;

async fn mass_create_and_delete_under_throttling(services: usize, percent: u64) -> Result<()> {
    let _g = SERIAL.lock().await;
    count_panics();
    let (client, ns) = setup().await?;
    let cluster = "it-throttle";
    let aws = Aws::start(cluster).await?;
    let class = "test.example.com/throttle";
    node(&client, "throttle-a").await?;
    let ctrl = Ctrl::start(&client, aws.config(class, false), aws.provider());
    aws.proxy.throttle_percent(percent);
    let names: Vec<String> = (0..services).map(|i| format!("web-{i}")).collect();
    let started = std::time::Instant::now();
    for n in &names {
        create(
            &client,
            &lb_service(&ns, n, Some(class), &[("http", 80, "TCP", None)]),
        )
        .await?;
    }
    // Backoff after a throttle starts at 5 s: allow several rounds for every Service.
    let long = Duration::from_secs(120 + 3 * services as u64);
    wait_for("a load balancer for every Service", long, || async {
        for n in &names {
            hostname(&get(&client, &ns, n).await?)?;
        }
        Some(())
    })
    .await?;
    let dangling = dangling_load_balancer_status(&aws.elb, &client, &ns).await?;
    assert!(
        dangling.is_empty(),
        "status of a missing load balancer: {dangling:?}"
    );
    let api: Api<Service> = Api::namespaced(client.clone(), &ns);
    for n in &names {
        api.delete(n, &DeleteParams::default()).await?;
    }
    wait_for("every Service gone (finalizers released)", long, || async {
        for n in &names {
            if get(&client, &ns, n).await.is_some() {
                return None;
            }
        }
        Some(())
    })
    .await?;
    let converged_in = started.elapsed();
    let faults = aws.proxy.injected();
    assert!(faults > 0, "no call was throttled");
    aws.proxy.throttle_percent(0);
    let lbs = aws.elb.describe_load_balancers().send().await?;
    let tgs = aws.elb.describe_target_groups().send().await?;
    let leaked = leaked_cloud_resources(&aws.elb, cluster, &client).await?;
    let doubles = double_allocations(&client).await?;
    report(&Row {
        scenario: &format!(
            "{services} LoadBalancer Services created, then deleted, {percent}% of AWS calls throttled"
        ),
        faults,
        converged_in,
        slices_differ: None,
        doubles: doubles.len(),
        leaked: Some(
            leaked
                .len()
                .max(lbs.load_balancers().len() + tgs.target_groups().len()),
        ),
        panics: panics(),
    });
    assert!(
        lbs.load_balancers().is_empty() && tgs.target_groups().is_empty(),
        "leaked: {} load balancers, {} target groups",
        lbs.load_balancers().len(),
        tgs.target_groups().len()
    );
    assert!(leaked.is_empty(), "leaked: {leaked:?}");
    assert!(doubles.is_empty(), "allocated twice: {doubles:?}");
    assert_eq!(panics(), 0, "a panic in this process");
    ctrl.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ten_services_created_and_deleted_with_25_percent_throttled() -> Result<()> {
    mass_create_and_delete_under_throttling(10, 25).await
}

/// The full size; `make chaos` runs it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "long: run by make chaos"]
async fn a_hundred_services_created_and_deleted_with_30_percent_throttled() -> Result<()> {
    mass_create_and_delete_under_throttling(100, 30).await
}
