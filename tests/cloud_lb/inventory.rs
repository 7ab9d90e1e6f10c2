//! The cloud inventory sweep (issue 13's first bullet; issue 12 defect 5): a Service deleted
//! while no leader ran, after someone removed our finalizer, leaves its NLB, target group and
//! security-group rules behind; the sweep reports them (`--cloud-orphans=report`) or deletes
//! them (`delete`), never touching a live Service's. A target group whose deletion failed
//! before a restart is removed too. Each test ends with the cloud-leak invariant.

use std::time::Duration;

use anyhow::{Result, anyhow};
use cloud_lb::{CloudLbConfig, NODE_SYNC_PERIOD, OrphanMode};
use k8s_openapi::api::core::v1::Service;
use kube::api::{Api, DeleteParams};
use test_support::invariants::leaked_cloud_resources;
use test_support::moto::Fault;
use test_support::wait_for;

use crate::aws::Aws;
use crate::harness::*;

/// Short, so a test sees several sweeps; also the age below which a load balancer is never an
/// orphan, so the orphan must have lived this long (it has, by the time the test restarts).
const INTERVAL: Duration = Duration::from_secs(2);

const ORPHANED: &str = "service_controller_orphaned_cloud_resources";
const DELETED: &str = "service_controller_orphaned_cloud_resources_deleted_total";

fn gauge(ctrl: &Ctrl, family: &str, kind: &str) -> u64 {
    ctrl.count(&format!("{family}{{kind=\"{kind}\"}}"))
}

fn config(aws: &Aws, class: &str, mode: OrphanMode) -> CloudLbConfig {
    CloudLbConfig {
        inventory_interval: INTERVAL,
        orphans: mode,
        ..aws.config(class, false)
    }
}

/// The load balancer's ARN and its target groups' ARNs.
async fn resources(aws: &Aws, svc: &Service) -> Result<(String, Vec<String>)> {
    let lb = aws
        .lb_of(svc)
        .await
        .ok_or_else(|| anyhow!("no load balancer"))?;
    let arn = lb.load_balancer_arn().unwrap_or_default().to_string();
    let tgs: Vec<String> = aws
        .tgs_of(&arn)
        .await
        .iter()
        .filter_map(|t| t.target_group_arn().map(str::to_string))
        .collect();
    if tgs.is_empty() {
        return Err(anyhow!("no target group"));
    }
    Ok((arn, tgs))
}

async fn lb_exists(aws: &Aws, arn: &str) -> bool {
    aws.elb
        .describe_load_balancers()
        .load_balancer_arns(arn)
        .send()
        .await
        .is_ok_and(|o| !o.load_balancers().is_empty())
}

async fn tg_exists(aws: &Aws, arn: &str) -> bool {
    aws.elb
        .describe_target_groups()
        .target_group_arns(arn)
        .send()
        .await
        .is_ok_and(|o| !o.target_groups().is_empty())
}

/// What happens to a Service while no leader runs: someone removes our finalizer (a stuck
/// deletion "fixed" by hand) and deletes it, so no controller ever sees it go.
async fn delete_behind_our_back(client: &kube::Client, ns: &str, name: &str) -> Result<()> {
    patch(
        client,
        ns,
        name,
        serde_json::json!({"metadata": {"finalizers": null}}),
    )
    .await?;
    Api::<Service>::namespaced(client.clone(), ns)
        .delete(name, &DeleteParams::default())
        .await?;
    wait_for(&format!("{ns}/{name} gone"), T, || async {
        get(client, ns, name).await.is_none().then_some(())
    })
    .await
}

/// Waits until the controller has completed `n` more sweeps than now.
async fn more_sweeps(ctrl: &Ctrl, n: u64) -> Result<()> {
    let start = ctrl.inventory_sweeps();
    wait_for(&format!("{n} more inventory sweeps"), T, || async {
        (ctrl.inventory_sweeps() >= start + n).then_some(())
    })
    .await
}

/// A node backed by a moto instance in a security group tagged for the cluster, so load
/// balancers get client rules there; the group's ID.
async fn real_node(aws: &Aws, client: &kube::Client, name: &str) -> Result<String> {
    let subnet = aws.subnets[0].clone();
    let vpc = aws.vpc_of_subnet(&subnet).await?;
    let tag = format!("kubernetes.io/cluster/{}", aws.cluster);
    let sg = aws.security_group(&vpc, name, &[(&tag, "owned")]).await?;
    let i = aws.instance(&subnet, &[&sg]).await?;
    node_on(client, name, &i).await?;
    Ok(sg)
}

/// Rules on `sg` described as the load balancer `lb_name`'s.
async fn rules_of(aws: &Aws, sg: &str, lb_name: &str) -> usize {
    let suffix = format!("={lb_name}");
    aws.rules(sg)
        .await
        .iter()
        .filter(|r| r.3.starts_with("kubernetes.io/rule/nlb/") && r.3.ends_with(&suffix))
        .count()
}

/// Two served Services, `web` and `keep`, with `web` then deleted while no controller ran
/// (its finalizer removed behind our back): what both orphan-mode tests start from.
struct Orphaned {
    client: kube::Client,
    ns: String,
    aws: Aws,
    class: &'static str,
    sg: String,
    web_name: String,
    keep: Service,
    keep_name: String,
    keep_rules: usize,
    lb: String,
    tgs: Vec<String>,
    keep_lb: String,
    keep_tgs: Vec<String>,
}

impl Orphaned {
    /// `class` is the test's own: a Service another test left behind (`keep` keeps its
    /// finalizer) must not be served by this test's controllers.
    async fn make(cluster: &str, class: &'static str, node_name: &str) -> Result<Orphaned> {
        let (client, ns) = setup().await?;
        let aws = Aws::start(cluster).await?;
        let sg = real_node(&aws, &client, node_name).await?;
        let ctrl = Ctrl::start(&client, aws.config(class, false), aws.provider());
        for name in ["web", "keep"] {
            create(
                &client,
                &lb_service(&ns, name, Some(class), &[("http", 80, "TCP", None)]),
            )
            .await?;
        }
        let web = wait_status(&client, &ns, "web").await?;
        let keep = wait_status(&client, &ns, "keep").await?;
        let web_name = cloud_lb::aws::spec::load_balancer_name(&aws.cluster, &web);
        let keep_name = cloud_lb::aws::spec::load_balancer_name(&aws.cluster, &keep);
        wait_for("both Services' security-group rules", T, || async {
            (rules_of(&aws, &sg, &web_name).await > 0 && rules_of(&aws, &sg, &keep_name).await > 0)
                .then_some(())
        })
        .await?;
        let keep_rules = rules_of(&aws, &sg, &keep_name).await;
        let (lb, tgs) = resources(&aws, &web).await?;
        let (keep_lb, keep_tgs) = resources(&aws, &keep).await?;
        ctrl.stop().await;
        delete_behind_our_back(&client, &ns, "web").await?;
        Ok(Orphaned {
            client,
            ns,
            aws,
            class,
            sg,
            web_name,
            keep,
            keep_name,
            keep_rules,
            lb,
            tgs,
            keep_lb,
            keep_tgs,
        })
    }

    /// A controller with the sweep in `mode`.
    fn controller(&self, mode: OrphanMode) -> Ctrl {
        Ctrl::start_every(
            &self.client,
            config(&self.aws, self.class, mode),
            self.aws.provider(),
            NODE_SYNC_PERIOD,
        )
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn report_mode_counts_the_orphans_of_a_service_deleted_while_no_leader_ran() -> Result<()> {
    let _g = SERIAL.lock().await;
    let o = Orphaned::make(
        "it-inv-report",
        "test.example.com/inventory-report",
        "inv-report-a",
    )
    .await?;
    let ctrl = o.controller(OrphanMode::Report);
    let Orphaned {
        client,
        ns,
        aws,
        sg,
        web_name,
        lb,
        tgs,
        keep_lb,
        ..
    } = o;
    wait_for("the orphans counted", T, || async {
        (gauge(&ctrl, ORPHANED, "load_balancer") == 1
            && gauge(&ctrl, ORPHANED, "target_group") == tgs.len() as u64)
            .then_some(())
    })
    .await?;
    let rules = rules_of(&aws, &sg, &web_name).await;
    assert!(rules > 0);
    assert_eq!(
        gauge(&ctrl, ORPHANED, "security_group_rule"),
        rules as u64,
        "the orphan's rules are counted"
    );
    // Report only: later sweeps delete nothing and keep counting the same orphans.
    more_sweeps(&ctrl, 2).await?;
    assert!(lb_exists(&aws, &lb).await, "orphaned load balancer kept");
    for t in &tgs {
        assert!(tg_exists(&aws, t).await, "orphaned target group kept");
    }
    assert_eq!(rules_of(&aws, &sg, &web_name).await, rules, "rules kept");
    assert_eq!(gauge(&ctrl, ORPHANED, "load_balancer"), 1);
    assert_eq!(gauge(&ctrl, DELETED, "load_balancer"), 0);
    assert!(lb_exists(&aws, &keep_lb).await);

    // The cloud-leak invariant sees exactly the orphans.
    let mut leaked = leaked_cloud_resources(&aws.elb, &aws.cluster, &client).await?;
    leaked.sort();
    let mut want: Vec<String> = std::iter::once(&lb).chain(&tgs).cloned().collect();
    want.sort();
    assert_eq!(leaked.len(), want.len(), "{leaked:?}");
    for (l, w) in leaked.iter().zip(&want) {
        assert!(
            l.starts_with(w.as_str()) && l.contains(&format!("{ns}/web")),
            "{l}"
        );
    }
    ctrl.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn delete_mode_removes_the_orphans_and_leaves_live_services_alone() -> Result<()> {
    let _g = SERIAL.lock().await;
    let o = Orphaned::make(
        "it-inv-delete",
        "test.example.com/inventory-delete",
        "inv-delete-a",
    )
    .await?;
    let ctrl = o.controller(OrphanMode::Delete);
    let Orphaned {
        client,
        ns,
        aws,
        sg,
        web_name,
        keep,
        keep_name,
        keep_rules,
        lb,
        tgs,
        keep_lb,
        keep_tgs,
        ..
    } = o;
    wait_for("the orphaned load balancer deleted", T, || async {
        (!lb_exists(&aws, &lb).await).then_some(())
    })
    .await?;
    wait_for("its target groups deleted", T, || async {
        let mut gone = true;
        for t in &tgs {
            gone &= !tg_exists(&aws, t).await;
        }
        gone.then_some(())
    })
    .await?;
    assert_eq!(rules_of(&aws, &sg, &web_name).await, 0, "its rules revoked");
    wait_for("the deletions counted", T, || async {
        (gauge(&ctrl, DELETED, "load_balancer") == 1
            && gauge(&ctrl, DELETED, "target_group") == tgs.len() as u64
            && gauge(&ctrl, DELETED, "security_group_rule") > 0)
            .then_some(())
    })
    .await?;
    // Later sweeps find nothing more, and the live Service keeps everything.
    more_sweeps(&ctrl, 2).await?;
    for k in ["load_balancer", "target_group", "security_group_rule"] {
        assert_eq!(gauge(&ctrl, ORPHANED, k), 0, "{k}");
    }
    assert_eq!(gauge(&ctrl, DELETED, "load_balancer"), 1);
    assert!(
        lb_exists(&aws, &keep_lb).await,
        "live load balancer untouched"
    );
    for t in &keep_tgs {
        assert!(tg_exists(&aws, t).await, "live target group untouched");
    }
    assert_eq!(rules_of(&aws, &sg, &keep_name).await, keep_rules);
    let keep_now = get(&client, &ns, "keep")
        .await
        .ok_or_else(|| anyhow!("keep gone"))?;
    assert_eq!(hostname(&keep_now), hostname(&keep), "status untouched");

    let leaked = leaked_cloud_resources(&aws.elb, &aws.cluster, &client).await?;
    assert!(leaked.is_empty(), "{leaked:?}");
    ctrl.stop().await;
    Ok(())
}

/// Issue 12 defect 5: a target group whose deletion failed was remembered only in memory;
/// after a type change and a restart its name is no longer derivable (the Service has no node
/// ports), the restarted controller finishes the cleanup without it, and it leaked.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_target_group_whose_deletion_failed_before_a_restart_is_deleted() -> Result<()> {
    let _g = SERIAL.lock().await;
    let (client, ns) = setup().await?;
    let aws = Aws::start("it-inv-defect5").await?;
    let class = "test.example.com/inventory-defect5";
    node(&client, "inv-d5-a").await?;
    let ctrl = Ctrl::start(&client, aws.config(class, false), aws.provider());
    create(
        &client,
        &lb_service(&ns, "web", Some(class), &[("http", 80, "TCP", None)]),
    )
    .await?;
    let web = wait_status(&client, &ns, "web").await?;
    let (lb, tgs) = resources(&aws, &web).await?;

    // AWS keeps a group "in use" for a while after its listener is gone.
    aws.proxy.inject(Fault::code(
        Some("DeleteTargetGroup"),
        400,
        "ResourceInUse",
        10_000,
    ));
    patch(
        &client,
        &ns,
        "web",
        serde_json::json!({"spec": {"type": "ClusterIP"}}),
    )
    .await?;
    wait_for("the load balancer deleted", T, || async {
        (!lb_exists(&aws, &lb).await).then_some(())
    })
    .await?;
    wait_for("a target group deletion refused", T, || async {
        (aws.proxy.injected() > 0).then_some(())
    })
    .await?;
    let svc = get(&client, &ns, "web")
        .await
        .ok_or_else(|| anyhow!("web gone"))?;
    assert!(
        has_finalizer(&svc),
        "cleanup not finished while the group stays"
    );
    assert!(
        node_port(&svc, 80) == 0,
        "no node port: the group's name is not derivable"
    );
    ctrl.crash();

    aws.proxy.clear_faults();
    let ctrl = Ctrl::start_every(
        &client,
        config(&aws, class, OrphanMode::Delete),
        aws.provider(),
        NODE_SYNC_PERIOD,
    );
    wait_for(
        "the restarted controller finishes the cleanup",
        T,
        || async { get(&client, &ns, "web").await.filter(|s| !has_finalizer(s)) },
    )
    .await?;
    wait_for("the leftover target group deleted", T, || async {
        let mut gone = true;
        for t in &tgs {
            gone &= !tg_exists(&aws, t).await;
        }
        gone.then_some(())
    })
    .await?;
    let leaked = leaked_cloud_resources(&aws.elb, &aws.cluster, &client).await?;
    assert!(leaked.is_empty(), "{leaked:?}");
    ctrl.stop().await;
    Ok(())
}
