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

/// A private control plane: on the shared one, another test's clusterip-alloc with a fixed
/// range (ipaddress_findings_have_upstream_reasons_messages_and_metric, 10.96.0.0/16, findings
/// reported at once) mirrors every Service in the cluster and may record the very
/// ClusterIPOutOfRange Event on `in-new` that this test asserts nobody recorded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_flag_ranges_follow_service_cidr_objects() {
    let cp = ControlPlane::start(ControlPlaneOptions::default())
        .await
        .expect("control plane");
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

/// Upstream's only ServiceCIDR Event: a Warning `KubernetesServiceCIDRError` when the Ready=True
/// condition cannot be written. A 409 (our replace is preconditioned; upstream's apply never
/// conflicts) is retried without one. A private control plane, so no other test's controller
/// sets the condition first; the faults come from the proxy in front of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_ready_write_is_upstreams_warning_event() {
    use reqwest::Method;
    use test_support::apiproxy::{Action, ApiProxy, Match};
    let cp = ControlPlane::start(ControlPlaneOptions::default())
        .await
        .expect("control plane");
    let admin = cp.client().await.expect("client");
    let proxy = ApiProxy::start(admin.clone()).await.expect("proxy");
    let through = Client::try_from(proxy.config().expect("proxy config")).expect("client");
    let ctl = start_service_cidr(&through);
    let cidrs: Api<ServiceCIDR> = Api::all(admin.clone());
    let ready = |name: &'static str| {
        let cidrs = cidrs.clone();
        move || {
            let cidrs = cidrs.clone();
            async move {
                let o = cidrs.get_opt(name).await.ok()??;
                o.status?
                    .conditions?
                    .into_iter()
                    .any(|c| c.type_ == "Ready" && c.status == "True")
                    .then_some(())
            }
        }
    };
    // Everything that exists settles first, so the faults meet only ours: the API server's own
    // ServiceCIDR, and a sentinel created after it, which our controller must have finalized
    // and made Ready (it queued `kubernetes` at its first list, before the sentinel).
    wait_for(
        "kubernetes ServiceCIDR ready",
        DEADLINE,
        ready("kubernetes"),
    )
    .await
    .expect("default ready");
    create_service_cidr(&cidrs, "scm-test-sentinel", "10.203.0.0/24").await;
    wait_for("sentinel ready", DEADLINE, ready("scm-test-sentinel"))
        .await
        .expect("sentinel ready");
    wait_for("sentinel finalized", DEADLINE, || {
        let cidrs = cidrs.clone();
        async move {
            let o = cidrs.get_opt("scm-test-sentinel").await.ok()??;
            o.metadata
                .finalizers?
                .iter()
                .any(|f| f == "networking.k8s.io/service-cidr-finalizer")
                .then_some(())
        }
    })
    .await
    .expect("sentinel finalized");
    proxy.fail(
        Match::writes(Method::PUT, "servicecidrs"),
        Action::Status {
            code: 409,
            retry_after: None,
        },
        1,
    );
    proxy.fail(
        Match::writes(Method::PUT, "servicecidrs"),
        Action::Status {
            code: 500,
            retry_after: None,
        },
        1,
    );
    // Created with its finalizer, so the first write is the status.
    let name = "scm-test-status-error";
    cidrs
        .create(
            &PostParams::default(),
            &ServiceCIDR {
                metadata: ObjectMeta {
                    name: Some(name.into()),
                    finalizers: Some(vec!["networking.k8s.io/service-cidr-finalizer".into()]),
                    ..Default::default()
                },
                spec: Some(ServiceCIDRSpec {
                    cidrs: Some(vec!["10.202.0.0/24".into()]),
                }),
                status: None,
            },
        )
        .await
        .expect("create servicecidr");
    wait_for("Ready=True after the faults", DEADLINE, ready(name))
        .await
        .expect("ready");
    assert_eq!(proxy.injected(), 2, "{:?}", proxy.seen());
    // Events of cluster-scoped objects go to `default`.
    let events = wait_for("the Warning Event", DEADLINE, || {
        let admin = admin.clone();
        async move {
            let e = events_for(&admin, "default", name, "KubernetesServiceCIDRError").await;
            (!e.is_empty()).then_some(e)
        }
    })
    .await
    .expect("event");
    assert_eq!(events.len(), 1, "{events:?}");
    let e = &events[0];
    assert_eq!(e.type_.as_deref(), Some("Warning"));
    assert_eq!(
        e.note.as_deref(),
        Some("The ServiceCIDR Status can not be set to Ready=True")
    );
    assert_eq!(
        e.regarding.as_ref().and_then(|r| r.kind.as_deref()),
        Some("ServiceCIDR")
    );
    assert_eq!(
        e.reporting_controller.as_deref(),
        Some("service-cidr-controller")
    );
    assert!(e.series.is_none(), "the 409 made an Event too: {e:?}");
    ctl.stop().await;
}
