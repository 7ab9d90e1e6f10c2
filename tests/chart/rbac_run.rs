//! The chart's RBAC applied for real, and the manager run with the rendered args under that
//! ServiceAccount's token until every enabled controller has done its work with no 403.

use k8s_openapi::api::core::v1::ServiceAccount;
use k8s_openapi::api::rbac::v1::{ClusterRoleBinding, RoleRef, Subject};
use test_support::{https_get, leader_status, readyz_ok};

use super::*;
use cloud_lb::local::crd::LoadBalancerIPPool;

fn token_kubeconfig(cp: &ControlPlane, token: &str, path: &Path) {
    cp.write_token_kubeconfig(token, path)
        .expect("write a token kubeconfig");
}

async fn create_token(cp: &ControlPlane, ns: &str, sa: &str) -> String {
    let o = run(
        Command::new(tool("kubectl").expect("bin/kubectl"))
            .arg("--kubeconfig")
            .arg(&cp.kubeconfig)
            .args(["create", "token", sa, "-n", ns, "--duration=1h"]),
        None,
    )
    .await;
    assert!(o.ok, "kubectl create token: {}", o.stderr);
    o.stdout.trim().to_string()
}

fn forbidden(lines: &[String]) -> Vec<String> {
    lines
        .iter()
        .filter(|l| {
            let l = l.to_ascii_lowercase();
            l.contains("forbidden") || l.contains(" 403") || l.contains("code: 403")
        })
        .cloned()
        .collect()
}

/// Starts the manager as the chart would run it (the rendered Deployment's args), with the
/// local files and ports swapped in (plus a plain `--http-address`, `addr`, for the test's own
/// polling), authenticated by `kubeconfig`.
fn start_as(
    args: &[String],
    kubeconfig: &Path,
    cloud_config: &Path,
    addr: &str,
    secure: &str,
) -> Manager {
    let mut cmd = Command::new(manager_binary());
    cmd.arg(format!("--http-address={addr}"));
    for a in args {
        if a.starts_with("--secure-port=") {
            let port = secure.rsplit(':').next().unwrap_or("0");
            cmd.arg(format!("--secure-port={port}"));
        } else if a.starts_with("--bind-address=") {
            cmd.arg("--bind-address=127.0.0.1");
        } else if a.starts_with("--cloud-config=") {
            cmd.arg(format!("--cloud-config={}", cloud_config.display()));
        } else if a.starts_with("--log-format=") {
            cmd.arg("--log-format=text");
        } else {
            cmd.arg(a);
        }
    }
    cmd.arg("--kubeconfig").arg(kubeconfig);
    cmd.env_remove("KUBECONFIG");
    Manager::spawn(cmd).expect("start the manager")
}

#[tokio::test]
async fn manager_runs_with_only_the_charts_rbac() {
    run_with_chart_rbac("192.168.100", &[], &[], true).await;
}

// Endpoint-aware targets with the EndpointSlice controllers off: cloud-lb still lists and
// watches EndpointSlices itself, so the chart grants that (issue 13; without the grant its
// informer never syncs and web-lb never gets an address).
#[tokio::test]
async fn manager_runs_with_the_reduced_rbac_of_disabled_controllers() {
    let sets = [
        "controllers.endpoints=false",
        "controllers.endpointslice-mirroring=false",
        "controllers.endpointslice=false",
        "cloudProvider.endpointAwareTargets=true",
    ];
    run_with_chart_rbac(
        "192.168.101",
        &sets,
        &["endpoints", "endpointslice-mirroring", "endpointslice"],
        false,
    )
    .await;
}

/// Installs the chart's CRD for real (as `helm install` does from `crds/`) and waits until its
/// objects can be listed.
async fn install_pool_crd(cp: &ControlPlane, client: &Client, ns: &str) {
    let crd = std::fs::read_to_string(chart_dir().join("crds/loadbalancerippools.yaml"))
        .expect("the chart's CRD");
    kubectl_apply(cp, ns, &crd, false).await;
    let pools: Api<LoadBalancerIPPool> = Api::all(client.clone());
    wait_for("pools can be listed", Duration::from_secs(60), || async {
        pools.list(&ListParams::default().limit(1)).await.ok()
    })
    .await
    .expect("the CRD is served");
}

/// Renders the chart with the local provider, its pool an object named after the release over
/// `<net>.0/28` (pools are cluster-wide and these tests run at once, so each has its own
/// range), plus `sets`; applies its RBAC and pool for real, runs the manager with the rendered
/// args as its ServiceAccount, and checks that it leads and that every enabled controller (all
/// but `disabled`) does its work with no 403, the pool's status included.
async fn run_with_chart_rbac(net: &str, sets: &[&str], disabled: &[&str], negative_control: bool) {
    let cp = ControlPlane::shared().await.expect("control plane");
    let client = cp.client().await.expect("client");
    let ns = namespace(&client, "chart-sa").await.expect("namespace");
    let scratch = Scratch::new("sa");
    // A release name unique to this namespace, so cluster-scoped RBAC objects don't collide.
    let release = format!("r-{}", ns.trim_start_matches("chart-sa-"));
    let mut all: Vec<String> = vec![
        "cloudProvider.name=local".into(),
        format!("cloudProvider.local.ipPools[0].name={release}"),
        format!("cloudProvider.local.ipPools[0].cidrs={{{net}.0/28}}"),
    ];
    all.extend(sets.iter().map(|s| s.to_string()));
    let sets: Vec<&str> = all.iter().map(String::as_str).collect();
    install_pool_crd(cp, &client, &ns).await;
    let text = render(&release, &ns, &sets).await;
    let objs = kubectl_apply(cp, &ns, &text, true).await;
    let args = manager_args(&objs);
    for d in disabled {
        assert!(
            !args.iter().any(|a| a.starts_with("--controllers=")
                && a["--controllers=".len()..].split(',').any(|c| c == *d)),
            "{d} still in {args:?}"
        );
    }
    let sa_name = find(&objs, "ServiceAccount")["metadata"]["name"]
        .as_str()
        .expect("sa name")
        .to_string();

    // Apply only the identity and its permissions for real; the Deployment itself cannot run
    // here (no kubelet), so the test runs the binary with the same args instead.
    let rbac: Vec<&Value> = objs
        .iter()
        .filter(|o| {
            matches!(
                o["kind"].as_str(),
                Some(
                    "ServiceAccount"
                        | "ClusterRole"
                        | "ClusterRoleBinding"
                        | "Role"
                        | "RoleBinding"
                )
            )
        })
        .collect();
    // The manager's ClusterRole, Role, their bindings, and the metrics reader's ClusterRole.
    assert_eq!(
        rbac.len(),
        6,
        "{:?}",
        objs.iter()
            .map(|o| format!("{}/{}", o["kind"], o["metadata"]["name"]))
            .collect::<Vec<_>>()
    );
    let list = serde_json::json!({"apiVersion": "v1", "kind": "List", "items": rbac});
    kubectl_apply(cp, &ns, &list.to_string(), false).await;
    // The pool object, as helm would create it; the file has no pools.
    let pool: Vec<&Value> = objs
        .iter()
        .filter(|o| o["kind"] == "LoadBalancerIPPool")
        .collect();
    assert_eq!(pool.len(), 1, "one pool object rendered");
    let list = serde_json::json!({"apiVersion": "v1", "kind": "List", "items": pool});
    kubectl_apply(cp, &ns, &list.to_string(), false).await;
    if sets.contains(&"cloudProvider.endpointAwareTargets=true") {
        assert!(
            args.contains(&"--endpoint-aware-load-balancer-targets".to_string()),
            "{args:?}"
        );
        // Only what cloud-lb's informer needs, with every EndpointSlice writer off.
        let role = rbac
            .iter()
            .find(|o| {
                o["kind"] == "ClusterRole"
                    && !o["metadata"]["name"]
                        .as_str()
                        .unwrap_or("")
                        .ends_with("-metrics-reader")
            })
            .expect("the manager's ClusterRole");
        assert_eq!(
            verbs_of(role, "discovery.k8s.io", "endpointslices"),
            vec!["list", "watch"]
        );
    }

    let cm = find(&objs, "ConfigMap");
    let cloud_config = scratch.path("cloud-config.yaml");
    let cfg = cm["data"]["cloud-config.yaml"]
        .as_str()
        .expect("cloud config");
    assert!(
        !cfg.contains("pools"),
        "pools are objects, not the file: {cfg}"
    );
    std::fs::write(&cloud_config, cfg).expect("write cloud config");

    // Negative control: the same manager with a token of a ServiceAccount that has no
    // bindings is refused (proves the token, not the admin identity, is what the manager uses).
    if negative_control {
        let nobody = serde_json::json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "nobody"}});
        kubectl_apply(cp, &ns, &nobody.to_string(), false).await;
        let nobody_kc = scratch.path("nobody.kubeconfig");
        token_kubeconfig(cp, &create_token(cp, &ns, "nobody").await, &nobody_kc);
        let addr0 = free_addr();
        let m0 = start_as(&args, &nobody_kc, &cloud_config, &addr0, &free_addr());
        wait_for(
            "a 403 for a ServiceAccount without RBAC",
            Duration::from_secs(60),
            || async { (!forbidden(&m0.log_lines()).is_empty()).then_some(()) },
        )
        .await
        .unwrap_or_else(|e| panic!("{e}; logs:\n{}", m0.log_lines().join("\n")));
        drop(m0);
    }

    // The chart's ServiceAccount: starts, becomes ready, leads, no 403.
    let kc = scratch.path("sa.kubeconfig");
    token_kubeconfig(cp, &create_token(cp, &ns, &sa_name).await, &kc);
    let addr = free_addr();
    let secure = free_addr();
    let m = start_as(&args, &kc, &cloud_config, &addr, &secure);
    let logs = || m.log_lines().join("\n");
    wait_for("/readyz ok", Duration::from_secs(60), || async {
        readyz_ok(&addr).await.then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}; logs:\n{}", logs()));
    let leases: Api<Lease> = Api::namespaced(client.clone(), &ns);
    wait_for(
        "the manager to hold its Lease",
        Duration::from_secs(60),
        || async {
            let l = leases.get_opt("service-controller-manager").await.ok()??;
            l.spec?.holder_identity.filter(|h| !h.is_empty())
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}; logs:\n{}", logs()));
    wait_for(
        "leader_election_master_status 1",
        Duration::from_secs(30),
        || async { (leader_status(&addr).await == Some(1)).then_some(()) },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}; logs:\n{}", logs()));

    // The secure port, its reviews made with the chart's ServiceAccount: a Prometheus
    // ServiceAccount bound to the chart's metrics reader role scrapes; the manager's own token
    // (no get on /metrics) is refused; no token is anonymous and refused (403).
    scrape_with_the_readers_role(cp, &client, &ns, &objs, &secure, &kc, &logs).await;

    // Work for every controller: a Node, a ready Pod, and Services of each kind.
    let app_ns = namespace(&client, "chart-app").await.expect("namespace");
    exercise_controllers(&client, &app_ns, &m, disabled, net).await;
    // The pool's status, written with the chart's loadbalancerippools/status grant.
    let pools: Api<LoadBalancerIPPool> = Api::all(client.clone());
    wait_for(
        "the pool's status counts web-lb's address",
        Duration::from_secs(60),
        || async {
            let p = pools.get(&release).await.ok()?;
            p.status.filter(|s| s.allocated.ipv4 == 1)
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}; logs:\n{}", logs()));
    let _ = pools.delete(&release, &Default::default()).await;

    let denied = forbidden(&m.log_lines());
    assert!(
        denied.is_empty(),
        "403s with the chart's RBAC:\n{}",
        denied.join("\n")
    );
}

/// Scrapes `/metrics` on the manager's secure port `secure` as a ServiceAccount bound to the
/// chart's `-metrics-reader` ClusterRole (200), as the manager's own ServiceAccount (403: the
/// chart gives it no get on /metrics) and without a token (403: `system:anonymous`).
async fn scrape_with_the_readers_role(
    cp: &ControlPlane,
    client: &Client,
    ns: &str,
    objs: &[Value],
    secure: &str,
    manager_kc: &Path,
    logs: &dyn Fn() -> String,
) {
    let reader = objs
        .iter()
        .filter(|o| o["kind"] == "ClusterRole")
        .filter_map(|o| o["metadata"]["name"].as_str())
        .find(|n| n.ends_with("-metrics-reader"))
        .expect("the chart's metrics reader ClusterRole")
        .to_string();
    let sa = ServiceAccount {
        metadata: ObjectMeta {
            name: Some("prometheus".into()),
            ..Default::default()
        },
        ..Default::default()
    };
    Api::<ServiceAccount>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &sa)
        .await
        .expect("prometheus service account");
    let binding = ClusterRoleBinding {
        metadata: ObjectMeta {
            name: Some(format!("{reader}-{ns}")),
            ..Default::default()
        },
        role_ref: RoleRef {
            api_group: Some("rbac.authorization.k8s.io".into()),
            kind: "ClusterRole".into(),
            name: reader,
        },
        subjects: Some(vec![Subject {
            kind: "ServiceAccount".into(),
            name: "prometheus".into(),
            namespace: Some(ns.into()),
            ..Default::default()
        }]),
    };
    Api::<ClusterRoleBinding>::all(client.clone())
        .create(&PostParams::default(), &binding)
        .await
        .expect("bind the metrics reader");
    let token = create_token(cp, ns, "prometheus").await;
    let url = format!("https://{secure}/metrics");
    let (_, body) = wait_for(
        "/metrics over HTTPS with the reader's token",
        Duration::from_secs(60),
        || async {
            https_get(&url, Some(&token))
                .await
                .filter(|(c, _)| *c == 200)
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}; logs:\n{}", logs()));
    assert!(body.contains("leader_election_master_status"), "{body}");
    let own = std::fs::read_to_string(manager_kc).expect("kubeconfig");
    let own_token = own
        .lines()
        .find_map(|l| l.trim().strip_prefix("token: "))
        .expect("token in the kubeconfig")
        .to_string();
    let (code, body) = https_get(&url, Some(&own_token)).await.expect("answer");
    assert_eq!(code, 403, "{body}");
    let (code, body) = https_get(&url, None).await.expect("answer");
    assert_eq!(code, 403, "{body}");
    assert!(body.contains("system:anonymous"), "{body}");
    let (code, _) = https_get(&format!("https://{secure}/healthz"), None)
        .await
        .expect("answer");
    assert_eq!(code, 200, "the kubelet's probe needs no token");
}

/// Creates objects every controller acts on and waits for each controller's result.
async fn exercise_controllers(
    client: &Client,
    ns: &str,
    m: &Manager,
    disabled: &[&str],
    net: &str,
) {
    let node = format!("node-{ns}");
    create_node(
        client,
        NodeSpecBuilder {
            name: node.clone(),
            zone: Some("zone-a".into()),
            ..Default::default()
        },
    )
    .await
    .expect("node");
    let mut pod = PodBuilder::new(ns, "web-0", &[("app", "web")]);
    pod.node_name = Some(node.clone());
    pod.ports = vec![(Some("http".into()), 80, "TCP".into())];
    create_pod(client, &pod).await.expect("pod");
    set_pod_status(client, ns, "web-0", true, &["10.244.1.10"])
        .await
        .expect("pod status");

    let svcs: Api<Service> = Api::namespaced(client.clone(), ns);
    for (name, ty) in [("web", "ClusterIP"), ("web-lb", "LoadBalancer")] {
        let svc = Service {
            metadata: ObjectMeta {
                name: Some(name.into()),
                ..Default::default()
            },
            spec: Some(ServiceSpec {
                type_: Some(ty.into()),
                selector: Some([("app".to_string(), "web".to_string())].into()),
                ports: Some(vec![ServicePort {
                    port: 80,
                    target_port: Some(
                        k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::String(
                            "http".into(),
                        ),
                    ),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
            ..Default::default()
        };
        svcs.create(&PostParams::default(), &svc)
            .await
            .expect("service");
    }

    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), ns);
    let logs = || m.log_lines().join("\n");
    // endpointslice
    if !disabled.contains(&"endpointslice") {
        wait_for(
            "an EndpointSlice for web with the ready pod",
            Duration::from_secs(60),
            || async {
                let l = slices
                    .list(&ListParams::default().labels("kubernetes.io/service-name=web"))
                    .await
                    .ok()?;
                l.items
                    .iter()
                    .flat_map(|s| s.endpoints.iter().flatten())
                    .any(|e| e.addresses.iter().any(|a| a == "10.244.1.10"))
                    .then_some(())
            },
        )
        .await
        .unwrap_or_else(|e| panic!("{e}; logs:\n{}", logs()));
        // Its condition, a server-side apply on services/status as the chart's ServiceAccount.
        wait_for(
            "EndpointsReady=True on web",
            Duration::from_secs(60),
            || async {
                let s = svcs.get_opt("web").await.ok()??;
                s.status?
                    .conditions?
                    .iter()
                    .any(|c| c.type_ == "EndpointsReady" && c.status == "True")
                    .then_some(())
            },
        )
        .await
        .unwrap_or_else(|e| panic!("{e}; logs:\n{}", logs()));
    }
    let eps: Api<Endpoints> = Api::namespaced(client.clone(), ns);
    if !disabled.contains(&"endpoints") {
        // endpoints (legacy)
        wait_for(
            "Endpoints web with the ready pod",
            Duration::from_secs(60),
            || async {
                let e = eps.get_opt("web").await.ok()??;
                e.subsets
                    .iter()
                    .flatten()
                    .flat_map(|s| s.addresses.iter().flatten())
                    .any(|a| a.ip == "10.244.1.10")
                    .then_some(())
            },
        )
        .await
        .unwrap_or_else(|e| panic!("{e}; logs:\n{}", logs()));
    }
    if !disabled.contains(&"endpointslice-mirroring") {
        // endpointslice-mirroring: a selector-less Service with hand-made Endpoints.
        let ext = Service {
            metadata: ObjectMeta {
                name: Some("external".into()),
                ..Default::default()
            },
            spec: Some(ServiceSpec {
                ports: Some(vec![ServicePort {
                    port: 5432,
                    ..Default::default()
                }]),
                ..Default::default()
            }),
            ..Default::default()
        };
        svcs.create(&PostParams::default(), &ext)
            .await
            .expect("selector-less service");
        let manual: Endpoints = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "external"},
            "subsets": [{"addresses": [{"ip": "192.0.2.10"}], "ports": [{"port": 5432}]}]
        }))
        .expect("endpoints");
        eps.create(&PostParams::default(), &manual)
            .await
            .expect("hand-made endpoints");
        wait_for(
            "a mirrored EndpointSlice for external",
            Duration::from_secs(60),
            || async {
                let l = slices
                    .list(&ListParams::default().labels("kubernetes.io/service-name=external"))
                    .await
                    .ok()?;
                l.items
                    .iter()
                    .flat_map(|s| s.endpoints.iter().flatten())
                    .any(|e| e.addresses.iter().any(|a| a == "192.0.2.10"))
                    .then_some(())
            },
        )
        .await
        .unwrap_or_else(|e| panic!("{e}; logs:\n{}", logs()));
    }
    // cloud-lb with the local provider
    wait_for(
        "web-lb to get a local pool address",
        Duration::from_secs(60),
        || async {
            let s = svcs.get("web-lb").await.ok()?;
            let ing = s.status?.load_balancer?.ingress?;
            ing.iter()
                .any(|i| {
                    i.ip.as_deref()
                        .is_some_and(|ip| ip.starts_with(&format!("{net}.")))
                })
                .then_some(())
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}; logs:\n{}", m.log_lines().join("\n")));
}
