//! Leader failover in the middle of work: two manager processes elect a leader on a Lease; the
//! leader is killed (SIGKILL) while 50 Services are being created, and the other replica must
//! take over and finish the job.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use k8s_openapi::api::core::v1::Service;
use kube::api::{Api, ListParams, PostParams};
use test_support::{
    ControlPlane, Manager, NodeSpecBuilder, PodBuilder, create_node, create_pod, free_addr,
    leader_status, namespace, readyz_ok, set_pod_status, wait_for,
};

use crate::scene::{SCOPE, WAIT, check, pod_ip, service, turn_alone};

const SERVICES: usize = 50;

fn panics_in(m: &Manager) -> u64 {
    m.log_lines()
        .iter()
        .filter(|l| l.contains("panicked"))
        .count() as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_leader_killed_while_50_services_are_created_the_other_replica_converges() -> Result<()>
{
    test_support::invariants::count_panics();
    // Alone: beside other scenarios, upstream's slices of one of these 50 Services went missing
    // (4 of 5 runs; 0 of 3 alone), so the reference this scenario compares with was wrong.
    // Suspected, not proven: every scenario runs its own kube-controller-manager over the whole
    // cluster, without leader election, and they race over the same Services.
    let _turn = turn_alone().await;
    let cp = ControlPlane::shared().await?;
    let admin = cp.client().await?;
    let ns = namespace(&admin, "faults-failover").await?;
    let node = format!("{ns}-node");
    create_node(
        &admin,
        NodeSpecBuilder {
            name: node.clone(),
            ..Default::default()
        },
    )
    .await?;
    let _kcm = test_support::upstream_endpointslice_controller(cp)?;
    let selector = format!("--service-label-selector={SCOPE}={ns}");
    let lease_ns = format!("--leader-elect-resource-namespace={ns}");
    let start = |addr: &str| {
        Manager::start(
            cp,
            &[
                &format!("--http-address={addr}"),
                &lease_ns,
                "--leader-elect-lease-duration=4s",
                "--leader-elect-renew-deadline=3s",
                "--leader-elect-retry-period=1s",
                "--controllers=clusterip-alloc,nodeport-alloc,endpointslice",
                &selector,
            ],
        )
    };
    let (a_addr, b_addr) = (free_addr(), free_addr());
    let mut a = start(&a_addr)?;
    let mut b = start(&b_addr)?;
    let a_leads = wait_for("exactly one leader", WAIT, || async {
        match (leader_status(&a_addr).await?, leader_status(&b_addr).await?) {
            (1, 0) => Some(true),
            (0, 1) => Some(false),
            _ => None,
        }
    })
    .await?;
    for addr in [&a_addr, &b_addr] {
        wait_for("/readyz ok", WAIT, || async {
            readyz_ok(addr).await.then_some(())
        })
        .await?;
    }
    let (leader, follower, follower_addr) = if a_leads {
        (&mut a, &mut b, b_addr.clone())
    } else {
        (&mut b, &mut a, a_addr.clone())
    };

    // Every other Service is a NodePort one; each has one ready pod.
    let created = Arc::new(AtomicUsize::new(0));
    let creator = {
        let (admin, ns, node, created) = (admin.clone(), ns.clone(), node.clone(), created.clone());
        tokio::spawn(async move {
            let svcs: Api<Service> = Api::namespaced(admin.clone(), &ns);
            for i in 0..SERVICES {
                let name = format!("svc-{i}");
                let mut s = service(&ns, &name, Some(("app", &name)));
                if i % 2 == 1
                    && let Some(spec) = s.spec.as_mut()
                {
                    spec.type_ = Some("NodePort".into());
                }
                svcs.create(&PostParams::default(), &s).await?;
                let pod = format!("{name}-0");
                let mut pb = PodBuilder::new(&ns, &pod, &[("app", &name)]);
                pb.node_name = Some(node.clone());
                create_pod(&admin, &pb).await?;
                set_pod_status(&admin, &ns, &pod, true, &[&pod_ip(SERVICES, i, 0)]).await?;
                created.fetch_add(1, Ordering::SeqCst);
            }
            anyhow::Ok(())
        })
    };
    // Killed in the middle of work: a third of the Services are in, and the leader has been
    // reconciling them.
    let leader_addr = if a_leads { &a_addr } else { &b_addr };
    wait_for("a third created, the leader at work", WAIT, || async {
        let reconciled = test_support::metrics::scrape_manager(leader_addr)
            .await?
            .sum(
                "service_controller_manager_reconcile_total",
                &[("controller", "endpointslice")],
            );
        (created.load(Ordering::SeqCst) >= SERVICES / 3 && reconciled > 0.0).then_some(())
    })
    .await?;
    let killed = Instant::now();
    leader.signal(9)?;
    eprintln!(
        "failover: leader killed with {} of {SERVICES} Services created",
        created.load(Ordering::SeqCst)
    );
    let _ = leader.child.wait().await;
    creator.await??;
    let took_over = wait_for("the follower to take over", WAIT, || async {
        (leader_status(&follower_addr).await? == 1).then(|| killed.elapsed())
    })
    .await?;
    eprintln!("failover: the follower led {took_over:?} after the kill");

    let names: Vec<String> = (0..SERVICES).map(|i| format!("svc-{i}")).collect();
    let other_panics = panics_in(leader) + panics_in(follower);
    let converged = check(
        &admin,
        &ns,
        &names,
        "leader killed while 50 Services are created",
        1,
        killed,
        other_panics,
    )
    .await?;
    eprintln!("failover: converged {converged:?} after the kill");
    let svcs: Api<Service> = Api::namespaced(admin.clone(), &ns);
    let list = svcs.list(&ListParams::default()).await?.items;
    assert_eq!(list.len(), SERVICES);
    for s in &list {
        let spec = s.spec.clone().unwrap_or_default();
        if spec
            .cluster_ip
            .as_deref()
            .is_none_or(|ip| ip.is_empty() || ip == "None")
        {
            bail!("{:?} has no ClusterIP", s.metadata.name);
        }
        let wants_port = spec.type_.as_deref() == Some("NodePort");
        let has_port = spec.ports.iter().flatten().all(|p| p.node_port.is_some());
        assert_eq!(wants_port, has_port, "{:?}: node ports", s.metadata.name);
    }
    follower.signal(15)?;
    let _ = follower.wait_exit(Duration::from_secs(20)).await;
    assert_eq!(panics_in(follower), 0, "a panic in the new leader's log");
    Ok(())
}
