//! The ServiceCIDR controller, and ClusterIP ranges that follow ServiceCIDR objects.

use super::*;

/// Creates ServiceCIDR `name` with one range.
async fn create_service_cidr(cidrs: &Api<ServiceCIDR>, name: &str, cidr: &str) {
    cidrs
        .create(
            &PostParams::default(),
            &ServiceCIDR {
                metadata: ObjectMeta {
                    name: Some(name.into()),
                    ..Default::default()
                },
                spec: Some(ServiceCIDRSpec {
                    cidrs: Some(vec![cidr.into()]),
                }),
                status: None,
            },
        )
        .await
        .expect("create servicecidr");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_cidr_finalizer_ready_and_deletion_blocking() {
    let cp = ControlPlane::shared().await.expect("control plane");
    let client = cp.client().await.expect("client");
    let ctl = start_service_cidr(&client);
    let cidrs: Api<ServiceCIDR> = Api::all(client.clone());
    let name = "scm-test-extra";
    create_service_cidr(&cidrs, name, "10.200.0.0/24").await;
    let ready = |want_status: &'static str, want_reason: &'static str| {
        let cidrs = cidrs.clone();
        move || {
            let cidrs = cidrs.clone();
            async move {
                let o = cidrs.get_opt(name).await.ok()??;
                let has_fin = o
                    .metadata
                    .finalizers
                    .iter()
                    .flatten()
                    .any(|f| f == "networking.k8s.io/service-cidr-finalizer");
                let c = o
                    .status?
                    .conditions?
                    .into_iter()
                    .find(|c| c.type_ == "Ready")?;
                (has_fin && c.status == want_status && c.reason == want_reason).then_some(c.message)
            }
        }
    };
    let msg = wait_for("finalizer and Ready=True", DEADLINE, ready("True", ""))
        .await
        .expect("ready");
    assert_eq!(msg, "Kubernetes Service CIDR is ready");
    // A Service whose address only this ServiceCIDR covers.
    let ns = test_support::namespace(&client, "scidr").await.expect("ns");
    let api: Api<Service> = Api::namespaced(client.clone(), &ns);
    api.create(
        &PostParams::default(),
        &svc("pinned", |s| s.cluster_ip = Some("10.200.0.10".into())),
    )
    .await
    .expect("service in the new ServiceCIDR");
    cidrs
        .delete(name, &DeleteParams::default())
        .await
        .expect("delete");
    let msg = wait_for(
        "Ready=False Terminating",
        DEADLINE,
        ready("False", "Terminating"),
    )
    .await
    .expect("blocked");
    assert_eq!(
        msg,
        "There are still IPAddresses referencing the ServiceCIDR, please remove them or create a new ServiceCIDR"
    );
    assert!(
        cidrs.get_opt(name).await.expect("get").is_some(),
        "deleted while an IPAddress depends on it"
    );
    api.delete("pinned", &DeleteParams::default())
        .await
        .expect("delete service");
    // Released after the grace period (10 s from the deletion timestamp).
    wait_for("ServiceCIDR gone", Duration::from_secs(60), || {
        let cidrs = cidrs.clone();
        async move { cidrs.get_opt(name).await.ok()?.is_none().then_some(()) }
    })
    .await
    .expect("released");
    let t = ctl.metrics.encode();
    assert!(
        t.contains("service_controller_manager_reconcile_total{controller=\"service-cidr\"}"),
        "{t}"
    );
    ctl.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_flag_ranges_follow_service_cidr_objects() {
    let cp = ControlPlane::shared().await.expect("control plane");
    let client = cp.client().await.expect("client");
    let ctl = start_service_cidr(&client);
    let cip = start_clusterip(&client, &[]);
    let gauge = |cidr: &'static str, which: &'static str| {
        let m = cip.metrics.clone();
        move || {
            let t = m.encode();
            async move {
                sample(
                    &t,
                    &format!("kube_apiserver_clusterip_allocator_{which}{{cidr=\"{cidr}\"}}"),
                )
            }
        }
    };
    // kube-apiserver's own ServiceCIDR ("kubernetes") from its flag.
    wait_for(
        "default ServiceCIDR tracked",
        DEADLINE,
        gauge("10.96.0.0/16", "allocated_ips"),
    )
    .await
    .expect("default cidr");
    let cidrs: Api<ServiceCIDR> = Api::all(client.clone());
    let name = "scm-test-follow";
    create_service_cidr(&cidrs, name, "10.201.0.0/24").await;
    let free = wait_for(
        "added ServiceCIDR tracked",
        DEADLINE,
        gauge("10.201.0.0/24", "available_ips"),
    )
    .await
    .expect("new cidr");
    assert_eq!(free, 254.0);
    let ns = test_support::namespace(&client, "follow")
        .await
        .expect("ns");
    let api: Api<Service> = Api::namespaced(client.clone(), &ns);
    // kube-apiserver only allocates from a ServiceCIDR once it is Ready.
    let created = wait_for("service in the new ServiceCIDR", DEADLINE, || {
        let api = api.clone();
        async move {
            api.create(
                &PostParams::default(),
                &svc("in-new", |s| s.cluster_ip = Some("10.201.0.5".into())),
            )
            .await
            .ok()
        }
    })
    .await
    .expect("service");
    assert_eq!(
        created.spec.as_ref().and_then(|s| s.cluster_ip.as_deref()),
        Some("10.201.0.5")
    );
    let m = cip.metrics.clone();
    wait_for("address counted in the new ServiceCIDR", DEADLINE, || {
        let t = m.encode();
        async move {
            (sample(
                &t,
                "kube_apiserver_clusterip_allocator_allocated_ips{cidr=\"10.201.0.0/24\"}",
            )? == 1.0)
                .then_some(())
        }
    })
    .await
    .expect("counted");
    assert!(
        events_for(&client, &ns, "in-new", "ClusterIPOutOfRange")
            .await
            .is_empty()
    );
    api.delete("in-new", &DeleteParams::default())
        .await
        .expect("delete service");
    cidrs
        .delete(name, &DeleteParams::default())
        .await
        .expect("delete servicecidr");
    cip.stop().await;
    ctl.stop().await;
}
