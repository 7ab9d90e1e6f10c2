//! The manager binary against the real local control plane: flags, health and metrics,
//! leader election and failover, clean shutdown, and one watch per resource kind.

use std::collections::BTreeMap;
use std::net::TcpListener;
use std::process::Command as StdCommand;
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Service, ServicePort, ServiceSpec};
use kube::Api;
use test_support::metrics::{apiserver_watches, scrape_manager};
use test_support::{
    ControlPlane, InProcess, Manager, NodeSpecBuilder, create_node, free_addr, http_get,
    leader_status, manager_binary, readyz_ok, wait_for, wait_stable,
};

/// Reconciles a manager's `controller` has started, from its metrics.
async fn reconciles(addr: &str, controller: &str) -> Option<u64> {
    scrape_manager(addr)
        .await?
        .get(
            "service_controller_manager_reconcile_total",
            &[("controller", controller)],
        )
        .map(|v| v as u64)
}

/// A selector Service `name` (selecting `app: name`) with one port, of `type_` if given.
fn service(name: &str, type_: Option<&str>) -> Service {
    Service {
        metadata: kube::api::ObjectMeta {
            name: Some(name.into()),
            ..Default::default()
        },
        spec: Some(ServiceSpec {
            type_: type_.map(Into::into),
            selector: Some([("app".to_string(), name.to_string())].into()),
            ports: Some(vec![ServicePort {
                port: 80,
                ..Default::default()
            }]),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Creates a selector Service in `ns`, for a controller to reconcile.
async fn create_service(client: &kube::Client, ns: &str, name: &str) {
    Api::<Service>::namespaced(client.clone(), ns)
        .create(&Default::default(), &service(name, None))
        .await
        .expect("create service");
}

#[test]
fn invalid_flags_exit_nonzero_with_one_line_naming_the_flag() {
    let cases: &[(&[&str], &str)] = &[
        (
            &["--service-cluster-ip-range=10.0.0.0/33"],
            "--service-cluster-ip-range",
        ),
        (
            &["--service-cluster-ip-range=not-a-cidr"],
            "--service-cluster-ip-range",
        ),
        (
            &["--service-node-port-range=0-100"],
            "--service-node-port-range",
        ),
        (
            &["--service-node-port-range=30000-70000"],
            "--service-node-port-range",
        ),
        (
            &["--service-node-port-range=32767-30000"],
            "--service-node-port-range",
        ),
        (&["--controllers=*,no-such-controller"], "--controllers"),
        (&["--controllers=cloud-lb"], "--controllers"),
    ];
    for (args, flag) in cases {
        let addr = free_addr();
        let out = StdCommand::new(manager_binary())
            .args(*args)
            .arg(format!("--http-address={addr}"))
            .arg("--kubeconfig=/nonexistent")
            .output()
            .expect("run the manager");
        assert!(!out.status.success(), "{args:?} should fail");
        let stderr = String::from_utf8_lossy(&out.stderr);
        let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
        assert_eq!(lines.len(), 1, "{args:?}: expected one line, got {stderr}");
        assert!(lines[0].contains(flag), "{args:?}: {stderr}");
        // Nothing started: the HTTP address was never bound.
        assert!(TcpListener::bind(&addr).is_ok());
    }
}

#[tokio::test]
async fn serves_health_readiness_metrics_and_exits_cleanly_on_sigterm() {
    let cp = ControlPlane::shared().await.expect("control plane");
    let addr = free_addr();
    let ns = test_support::namespace(&cp.client().await.expect("client"), "mgr")
        .await
        .expect("namespace");
    let mut m = Manager::start(
        cp,
        &[
            &format!("--http-address={addr}"),
            &format!("--leader-elect-resource-namespace={ns}"),
            "--leader-elect-lease-duration=4s",
            "--leader-elect-renew-deadline=3s",
            "--leader-elect-retry-period=1s",
        ],
    )
    .expect("start manager");

    wait_for("/healthz ok", Duration::from_secs(30), || async {
        http_get(&format!("http://{addr}/healthz"))
            .await
            .filter(|(c, b)| *c == 200 && b == "ok")
    })
    .await
    .expect("healthz");
    wait_for("/readyz ok", Duration::from_secs(30), || async {
        http_get(&format!("http://{addr}/readyz"))
            .await
            .filter(|(c, b)| *c == 200 && b == "ok")
    })
    .await
    .expect("readyz");
    wait_for("leader status 1", Duration::from_secs(30), || async {
        leader_status(&addr).await.filter(|v| *v == 1)
    })
    .await
    .expect("leads");
    let (_, metrics) = http_get(&format!("http://{addr}/metrics"))
        .await
        .expect("metrics");
    for family in [
        "# TYPE leader_election_master_status gauge",
        "# TYPE service_controller_manager_reconcile counter",
        "# TYPE service_controller_manager_reconcile_duration_seconds histogram",
        "# TYPE workqueue_depth gauge",
        "# TYPE rest_client_request_duration_seconds histogram",
        "# TYPE rest_client_rate_limiter_duration_seconds histogram",
    ] {
        assert!(metrics.contains(family), "missing {family} in\n{metrics}");
    }
    // Its Lease was written and its watches answered: both show in client-go's counter.
    for sample in [
        "rest_client_requests_total{code=\"200\",method=\"GET\"}",
        "rest_client_request_duration_seconds_count{verb=\"POST\"}",
    ] {
        assert!(metrics.contains(sample), "missing {sample} in\n{metrics}");
    }

    let client = cp.client().await.expect("client");
    let leases: Api<Lease> = Api::namespaced(client, &ns);
    let held = leases
        .get("service-controller-manager")
        .await
        .expect("lease exists");
    assert!(
        held.spec
            .and_then(|s| s.holder_identity)
            .is_some_and(|h| !h.is_empty())
    );

    let started = Instant::now();
    m.signal(15).expect("SIGTERM");
    let status = m
        .wait_exit(Duration::from_secs(10))
        .await
        .expect("exits within 10 s");
    assert!(
        status.success(),
        "exit status {status:?}; logs:\n{}",
        m.log_lines().join("\n")
    );
    assert!(started.elapsed() < Duration::from_secs(10));
    // The Lease was released, so a successor need not wait for it to expire.
    let released = leases
        .get("service-controller-manager")
        .await
        .expect("lease");
    assert_eq!(
        released
            .spec
            .and_then(|s| s.holder_identity)
            .unwrap_or_default(),
        "",
        "lease still held after shutdown"
    );
}

#[tokio::test]
async fn exactly_one_of_two_leads_and_the_other_takes_over_after_sigkill() {
    let cp = ControlPlane::shared().await.expect("control plane");
    let ns = test_support::namespace(&cp.client().await.expect("client"), "leader")
        .await
        .expect("namespace");
    let lease_duration = Duration::from_secs(4);
    let retry = Duration::from_secs(1);
    let start = |addr: &str| {
        Manager::start(
            cp,
            &[
                &format!("--http-address={addr}"),
                &format!("--leader-elect-resource-namespace={ns}"),
                "--leader-elect-lease-duration=4s",
                "--leader-elect-renew-deadline=3s",
                "--leader-elect-retry-period=1s",
            ],
        )
        .expect("start manager")
    };
    let (a_addr, b_addr) = (free_addr(), free_addr());
    let mut a = start(&a_addr);
    let mut b = start(&b_addr);

    let (leader_addr, follower_addr) =
        wait_for("exactly one leader", Duration::from_secs(30), || async {
            let la = leader_status(&a_addr).await?;
            let lb = leader_status(&b_addr).await?;
            match (la, lb) {
                (1, 0) => Some((a_addr.clone(), b_addr.clone())),
                (0, 1) => Some((b_addr.clone(), a_addr.clone())),
                _ => None,
            }
        })
        .await
        .expect("one leader");
    // Both become ready, the follower included (its caches sync like the leader's).
    for addr in [&a_addr, &b_addr] {
        wait_for("/readyz ok", Duration::from_secs(30), || async {
            http_get(&format!("http://{addr}/readyz"))
                .await
                .filter(|(c, _)| *c == 200)
        })
        .await
        .expect("ready");
    }
    // Only the leader reconciles: a new Service is handled by it and never by the follower.
    let client = cp.client().await.expect("client");
    create_service(&client, &ns, "before-failover").await;
    wait_for(
        "the leader to reconcile",
        Duration::from_secs(30),
        || async {
            reconciles(&leader_addr, "endpointslice")
                .await
                .filter(|n| *n > 0)
        },
    )
    .await
    .expect("leader reconciled");
    // It stays that way over several renewals.
    for _ in 0..3 {
        tokio::time::sleep(retry).await;
        assert_eq!(leader_status(&leader_addr).await, Some(1));
        assert_eq!(leader_status(&follower_addr).await, Some(0));
        assert_eq!(reconciles(&follower_addr, "endpointslice").await, Some(0));
    }

    let (leader, follower) = if leader_addr == a_addr {
        (&mut a, &mut b)
    } else {
        (&mut b, &mut a)
    };
    let killed = Instant::now();
    leader.signal(9).expect("SIGKILL");
    let _ = leader.child.wait().await;
    let leases: Api<Lease> = Api::namespaced(client.clone(), &ns);
    let lease_times = || async {
        let spec = leases
            .get("service-controller-manager")
            .await
            .expect("lease")
            .spec
            .expect("lease spec");
        let micros = |t: Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime>| {
            t.expect("lease time").0.as_microsecond()
        };
        (
            spec.holder_identity.unwrap_or_default(),
            micros(spec.acquire_time),
            micros(spec.renew_time),
        )
    };
    // The dead leader's last renewal: nothing renews it any more.
    let (dead, _, last_renewal) = lease_times().await;
    // How soon is measured and printed, not asserted: on busy cores the follower's read of
    // the renewal, its acquire and our poll of its metrics can take more than the second
    // a bound of lease + retry + 1 s left them.
    wait_for(
        "the follower to take over",
        Duration::from_secs(30),
        || async { leader_status(&follower_addr).await.filter(|v| *v == 1) },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}; follower logs:\n{}", follower.log_lines().join("\n")));
    let took = killed.elapsed();
    eprintln!("failover took {took:?} (lease {lease_duration:?} + retry {retry:?})");
    // Not before the dead leader's lease expired: acquired at least a lease duration after
    // its last renewal, by the API server's record (one machine, one clock).
    let (holder, acquired, _) = lease_times().await;
    assert_ne!(holder, dead, "the lease changed hands");
    let waited = Duration::from_micros(u64::try_from(acquired - last_renewal).unwrap_or(0));
    assert!(
        waited >= lease_duration,
        "taken over {waited:?} after the last renewal, before the lease ({lease_duration:?}) expired"
    );
    // The new leader reconciles: its caches were warm, so the new Service gets its slice.
    create_service(&client, &ns, "after-failover").await;
    let slices: Api<k8s_openapi::api::discovery::v1::EndpointSlice> =
        Api::namespaced(client.clone(), &ns);
    let made = wait_for(
        "a slice from the new leader",
        Duration::from_secs(30),
        || async {
            let lp = kube::api::ListParams::default()
                .labels("kubernetes.io/service-name=after-failover");
            slices.list(&lp).await.ok().filter(|l| !l.items.is_empty())
        },
    )
    .await
    .expect("new leader reconciles");
    // The other tests of this binary run managers on the same control plane at the same time
    // (each leading in its own Lease namespace, every controller on, cluster-wide): the slice
    // may be theirs, with the same field manager. The new leader's own count, 0 while it
    // followed, says it reconciled.
    wait_for(
        "the new leader's own reconciles",
        Duration::from_secs(30),
        || async {
            reconciles(&follower_addr, "endpointslice")
                .await
                .filter(|n| *n > 0)
        },
    )
    .await
    .expect("new leader reconciles");
    // The API server names the field manager after our User-Agent (it was `unknown`).
    assert_eq!(
        test_support::field_managers(&made.items[0].metadata),
        vec!["service-controller-manager".to_string()]
    );
    follower.signal(15).expect("SIGTERM");
    let _ = follower.child.wait().await;
}

#[tokio::test]
async fn a_leader_whose_lease_is_taken_stops_leading() {
    let cp = ControlPlane::shared().await.expect("control plane");
    let client = cp.client().await.expect("client");
    let ns = test_support::namespace(&client, "steal")
        .await
        .expect("namespace");
    let addr = free_addr();
    let mut m = Manager::start(
        cp,
        &[
            &format!("--http-address={addr}"),
            &format!("--leader-elect-resource-namespace={ns}"),
            "--leader-elect-lease-duration=4s",
            "--leader-elect-renew-deadline=3s",
            "--leader-elect-retry-period=1s",
        ],
    )
    .expect("start manager");
    wait_for("leader", Duration::from_secs(30), || async {
        leader_status(&addr).await.filter(|v| *v == 1)
    })
    .await
    .expect("leads");
    let leases: Api<Lease> = Api::namespaced(client, &ns);
    let patch =
        serde_json::json!({"spec": {"holderIdentity": "intruder", "leaseDurationSeconds": 600}});
    leases
        .patch(
            "service-controller-manager",
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(&patch),
        )
        .await
        .expect("steal the lease");
    // The next renewal attempt (one retry period) sees another holder and steps down. (A
    // leader that kept or took back the lease would never step down: a longer wait loses
    // nothing, and busy cores may need more than 3 s for the attempt and our poll.)
    wait_for("step down", Duration::from_secs(30), || async {
        leader_status(&addr).await.filter(|v| *v == 0)
    })
    .await
    .expect("stepped down");
    // And it does not take the lease back while the intruder's lease is valid.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(leader_status(&addr).await, Some(0));
    m.signal(15).expect("SIGTERM");
    let _ = m.child.wait().await;
}

#[tokio::test]
async fn a_leader_that_cannot_renew_stops_leading_within_the_renew_deadline() {
    // Its own control plane: this test stops it.
    let cp = ControlPlane::start(Default::default())
        .await
        .expect("control plane");
    let addr = free_addr();
    let mut m = Manager::start(
        &cp,
        &[
            &format!("--http-address={addr}"),
            "--leader-elect-resource-namespace=default",
            "--leader-elect-lease-duration=4s",
            "--leader-elect-renew-deadline=3s",
            "--leader-elect-retry-period=1s",
        ],
    )
    .expect("start manager");
    wait_for("leader", Duration::from_secs(30), || async {
        leader_status(&addr).await.filter(|v| *v == 1)
    })
    .await
    .expect("leads");
    cp.stop().await;
    let lost = Instant::now();
    wait_for(
        "step down after the renew deadline",
        Duration::from_secs(3 + 2 + 1),
        || async { leader_status(&addr).await.filter(|v| *v == 0) },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}; logs:\n{}", m.log_lines().join("\n")));
    eprintln!(
        "stepped down {:?} after the API server went away",
        lost.elapsed()
    );
    m.signal(15).expect("SIGTERM");
    let status = m
        .wait_exit(Duration::from_secs(10))
        .await
        .expect("exits within 10 s even without an API server");
    assert!(
        status.success(),
        "exit status {status:?}; logs:\n{}",
        m.log_lines().join("\n")
    );
}

/// The kinds the manager watches with every controller on; each must be watched exactly once.
const WATCHED: &[&str] = &[
    "services",
    "pods",
    "nodes",
    "endpointslices",
    "endpoints",
    "servicecidrs",
    "ipaddresses",
    "namespaces",
    "loadbalancerippools",
];

#[path = "manager/watches.rs"]
mod watches;
