//! Load balancers, listeners, target groups and targets in ELBv2 as the Service and nodes change.

use std::collections::{BTreeMap, BTreeSet};

use anyhow::{Result, anyhow};
use k8s_openapi::api::core::v1::{Node, Service};
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use test_support::moto::{Fault, is_mutating};
use test_support::{NodeSpecBuilder, create_node, wait_for};

use crate::aws::*;
use crate::harness::*;

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

    // Additions: a batch of nodes arrives; every one becomes a target. (The term's inventory
    // sweep lists every load balancer: let it finish before counting.)
    wait_for("the term's inventory sweep", T, || async {
        (ctrl.inventory_sweeps() >= 1).then_some(())
    })
    .await?;
    ctrl.wait_idle().await?;
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

    // A label unrelated to load balancing triggers nothing. (Counted from idle: the
    // deletions' passes may still be finishing when the targets show.)
    ctrl.wait_idle().await?;
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
    // The new interval shows once ModifyTargetGroup is done, not the reconcile that made it:
    // read the calls once it has finished, so a needless call after it would be seen.
    ctrl.wait_idle().await?;
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
