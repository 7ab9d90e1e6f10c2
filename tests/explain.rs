//! `service-controller-manager explain` against the real local control plane: the manager
//! (with the local address-pool provider) serves one Service of each kind over the same pods,
//! then `explain` prints each: a ClusterIP, a NodePort, a LoadBalancer, a headless and an
//! ExternalName Service, and one whose selector matches nothing. It runs as a ServiceAccount
//! that may only get and list, and its exit codes are checked.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Output;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{Node, Service, ServiceAccount, ServicePort, ServiceSpec};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, PolicyRule, RoleRef, Subject};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::Api;
use kube::api::{ListParams, ObjectMeta, Patch, PatchParams, PostParams};
use serde_json::Value;
use test_support::{
    ControlPlane, Manager, NodeSpecBuilder, PodBuilder, create_node, create_pod, free_addr,
    manager_binary, namespace, set_pod_status, wait_for,
};

const T: Duration = Duration::from_secs(90);

/// Runs `explain` with `args` (after the subcommand).
async fn run(args: &[&str]) -> Result<Output> {
    Ok(tokio::process::Command::new(manager_binary())
        .arg("explain")
        .args(args)
        .output()
        .await?)
}

/// `explain <ns>/<name> -o json` as `kubeconfig`; the parsed output, or why not.
async fn json(kubeconfig: &Path, ns: &str, name: &str) -> Result<Value> {
    let kc = kubeconfig.to_str().unwrap_or_default();
    let out = run(&[&format!("{ns}/{name}"), "--kubeconfig", kc, "-o", "json"]).await?;
    if !out.status.success() {
        bail!(
            "explain {ns}/{name}: {:?} {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(serde_json::from_slice(&out.stdout)?)
}

fn service(name: &str, type_: &str, app: &str, target: IntOrString) -> Service {
    Service {
        metadata: ObjectMeta {
            name: Some(name.into()),
            ..Default::default()
        },
        spec: Some(ServiceSpec {
            type_: Some(type_.into()),
            selector: Some([("app".to_string(), app.to_string())].into()),
            ports: Some(vec![ServicePort {
                name: Some("http".into()),
                port: 80,
                target_port: Some(target),
                ..Default::default()
            }]),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .into_iter()
        .flatten()
        .filter_map(|s| s.as_str().map(str::to_string))
        .collect()
}

/// The endpoints of `svc`'s slices: (ip, ready).
async fn slice_endpoints(client: &kube::Client, ns: &str, svc: &str) -> Vec<(String, bool)> {
    let lp = ListParams::default().labels(&format!("kubernetes.io/service-name={svc}"));
    let Ok(list) = Api::<EndpointSlice>::namespaced(client.clone(), ns)
        .list(&lp)
        .await
    else {
        return vec![];
    };
    list.items
        .iter()
        .flat_map(|s| s.endpoints.iter().flatten())
        .map(|e| {
            let ready = e.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true);
            (e.addresses.first().cloned().unwrap_or_default(), ready)
        })
        .collect()
}

/// A ServiceAccount that may only get and list what `explain` reads; its kubeconfig.
async fn read_only_kubeconfig(
    cp: &ControlPlane,
    client: &kube::Client,
    ns: &str,
    dir: &Path,
) -> Result<std::path::PathBuf> {
    let sa = ServiceAccount {
        metadata: ObjectMeta {
            name: Some("explainer".into()),
            ..Default::default()
        },
        ..Default::default()
    };
    Api::<ServiceAccount>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &sa)
        .await?;
    let rule = |group: &str, resources: &[&str]| PolicyRule {
        api_groups: Some(vec![group.into()]),
        resources: Some(resources.iter().map(|r| r.to_string()).collect()),
        verbs: vec!["get".into(), "list".into()],
        ..Default::default()
    };
    let role_name = format!("{ns}-explain-read-only");
    let role = ClusterRole {
        metadata: ObjectMeta {
            name: Some(role_name.clone()),
            ..Default::default()
        },
        rules: Some(vec![
            rule("", &["services", "pods", "nodes", "events"]),
            rule("discovery.k8s.io", &["endpointslices"]),
        ]),
        ..Default::default()
    };
    Api::<ClusterRole>::all(client.clone())
        .create(&PostParams::default(), &role)
        .await?;
    let binding = ClusterRoleBinding {
        metadata: ObjectMeta {
            name: Some(role_name.clone()),
            ..Default::default()
        },
        role_ref: RoleRef {
            api_group: Some("rbac.authorization.k8s.io".into()),
            kind: "ClusterRole".into(),
            name: role_name,
        },
        subjects: Some(vec![Subject {
            kind: "ServiceAccount".into(),
            name: "explainer".into(),
            namespace: Some(ns.into()),
            ..Default::default()
        }]),
    };
    Api::<ClusterRoleBinding>::all(client.clone())
        .create(&PostParams::default(), &binding)
        .await?;
    let tr = TokenRequest {
        spec: Some(TokenRequestSpec {
            audiences: Some(vec![]),
            ..Default::default()
        }),
        ..Default::default()
    };
    let token = Api::<ServiceAccount>::namespaced(client.clone(), ns)
        .create_token_request("explainer", &PostParams::default(), &tr)
        .await?
        .status
        .and_then(|s| s.token)
        .ok_or_else(|| anyhow!("no token"))?;
    cp.write_token_kubeconfig(&token, &dir.join("explainer.kubeconfig"))
}

/// Gives a node an InternalIP, as a kubelet reports it.
async fn set_node_ip(client: &kube::Client, name: &str, ip: &str) -> Result<Node> {
    let patch =
        serde_json::json!({"status": {"addresses": [{"type": "InternalIP", "address": ip}]}});
    Ok(Api::<Node>::all(client.clone())
        .patch_status(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn explain_each_kind_of_service() -> Result<()> {
    let cp = ControlPlane::shared().await?;
    let client = cp.client().await?;
    let ns = namespace(&client, "explain").await?;
    let dir = tempfile::tempdir()?;
    let pools = dir.path().join("pools.yaml");
    std::fs::write(&pools, "pools: [192.168.77.0/29]\nipMode: VIP\n")?;
    let http = free_addr();
    let pools_arg = format!("--cloud-config={}", pools.display());
    let mut manager = Manager::start(
        cp,
        &[
            "--leader-elect=false",
            &format!("--http-address={http}"),
            "--cloud-provider=local",
            &pools_arg,
        ],
    )?;

    // Three nodes, the third excluded from load balancers; three pods, one not ready.
    for (i, name) in ["exp-n1", "exp-n2", "exp-n3"].iter().enumerate() {
        let mut b = NodeSpecBuilder {
            name: name.to_string(),
            ..Default::default()
        };
        if i == 2 {
            b.labels = BTreeMap::from([(
                "node.kubernetes.io/exclude-from-external-load-balancers".into(),
                "true".into(),
            )]);
        }
        create_node(&client, b).await?;
        set_node_ip(&client, name, &format!("10.0.0.{}", i + 1)).await?;
    }
    let pods = [
        ("alpha-0", "exp-n1", "10.244.1.10", true),
        ("alpha-1", "exp-n2", "10.244.2.10", true),
        ("alpha-2", "exp-n2", "10.244.2.11", false),
    ];
    for (name, node, ip, ready) in pods {
        let mut b = PodBuilder::new(&ns, name, &[("app", "alpha")]);
        b.node_name = Some(node.into());
        b.ports = vec![(Some("web".into()), 8080, "TCP".into())];
        if name == "alpha-0" {
            b.hostname = Some("alpha-0".into());
            b.subdomain = Some("alpha-headless".into());
        }
        create_pod(&client, &b).await?;
        set_pod_status(&client, &ns, name, ready, &[ip]).await?;
    }
    let svcs: Api<Service> = Api::namespaced(client.clone(), &ns);
    let web = || IntOrString::String("web".into());
    let mut headless = service("alpha-headless", "ClusterIP", "alpha", web());
    if let Some(s) = headless.spec.as_mut() {
        s.cluster_ip = Some("None".into());
    }
    let mut external = service("database", "ExternalName", "alpha", IntOrString::Int(80));
    if let Some(s) = external.spec.as_mut() {
        s.external_name = Some("prod.database.example.com".into());
        s.selector = None;
    }
    for s in [
        service("alpha", "ClusterIP", "alpha", web()),
        service("alpha-np", "NodePort", "alpha", web()),
        service("alpha-lb", "LoadBalancer", "alpha", web()),
        headless,
        external,
        service("nobody", "ClusterIP", "nobody", IntOrString::Int(8080)),
    ] {
        svcs.create(&PostParams::default(), &s).await?;
    }
    for svc in ["alpha", "alpha-np", "alpha-lb", "alpha-headless"] {
        wait_for(&format!("{svc}'s slices: 2 ready of 3"), T, || async {
            let eps = slice_endpoints(&client, &ns, svc).await;
            (eps.len() == 3 && eps.iter().filter(|(_, r)| *r).count() == 2).then_some(())
        })
        .await?;
    }
    let lb = wait_for("alpha-lb's address", T, || async {
        let s = svcs.get("alpha-lb").await.ok()?;
        s.status?.load_balancer?.ingress?.first()?.ip.clone()
    })
    .await?;
    let kc = read_only_kubeconfig(cp, &client, &ns, dir.path()).await?;

    // ClusterIP: two ready endpoints of three; the third says why.
    let x = json(&kc, &ns, "alpha").await?;
    let cip = x["cluster_ips"][0]
        .as_str()
        .context("cluster ip")?
        .to_string();
    let p = &x["ports"][0];
    assert_eq!(p["target_port"], "web");
    assert_eq!(
        p["summary"],
        format!("{cip}:80 -> 10.244.1.10:8080, 10.244.2.10:8080")
    );
    let not_ready: Vec<&Value> = p["endpoints"]
        .as_array()
        .context("endpoints")?
        .iter()
        .filter(|e| e["ready"] == false)
        .collect();
    assert_eq!(not_ready.len(), 1, "{p}");
    assert_eq!(not_ready[0]["pod"], "alpha-2");
    assert!(
        not_ready[0]["why"]
            .as_str()
            .is_some_and(|w| w.starts_with("pod not Ready"))
    );
    assert_eq!(x["problems"], serde_json::json!([]));
    let rs = &x["iptables"][0];
    assert_eq!(rs["every_node"], true);
    let nat = strings(&rs["nat"]);
    let svc_rule = format!(
        "-A KUBE-SERVICES -d {cip}/32 -p tcp -m comment --comment \"{ns}/alpha:http cluster IP\" -m tcp --dport 80 -j KUBE-SVC-"
    );
    assert!(nat.iter().any(|l| l.starts_with(&svc_rule)), "{nat:#?}");
    assert!(nat.iter().any(|l| {
        l.contains("-m statistic --mode random --probability 0.50000000000 -j KUBE-SEP-")
    }));
    assert!(
        nat.iter()
            .any(|l| l.ends_with("-j DNAT --to-destination 10.244.2.10:8080"))
    );
    assert!(
        x["dns"]
            .as_array()
            .context("dns")?
            .iter()
            .any(|r| r["type"] == "A" && r["value"] == cip.as_str())
    );
    assert_eq!(x["env"][0]["name"], "ALPHA_SERVICE_HOST");
    assert_eq!(x["env"][0]["value"], cip.as_str());
    // The text form says the same for people.
    let out = run(&[
        &format!("{ns}/alpha"),
        "--kubeconfig",
        kc.to_str().unwrap_or_default(),
    ])
    .await?;
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!("Service {ns}/alpha (ClusterIP)")),
        "{text}"
    );
    assert!(text.contains(&format!("{cip}:80 -> 10.244.1.10:8080, 10.244.2.10:8080")));
    assert!(text.contains("10.244.2.11:8080 (pod alpha-2 on exp-n2): not ready: pod not Ready"));

    // NodePort: every node's address with the node port.
    let x = json(&kc, &ns, "alpha-np").await?;
    let np = x["ports"][0]["node_port"].as_i64().context("node port")?;
    let hops: Vec<String> = x["ports"][0]["nodes"]
        .as_array()
        .context("nodes")?
        .iter()
        .filter_map(|h| h["address"].as_str().map(str::to_string))
        .collect();
    assert_eq!(
        hops,
        (1..=3)
            .map(|i| format!("10.0.0.{i}:{np}"))
            .collect::<Vec<_>>()
    );
    let nat = strings(&x["iptables"][0]["nat"]);
    assert!(nat.iter().any(|l| l.starts_with(&format!(
        "-A KUBE-NODEPORTS -p tcp -m comment --comment \"{ns}/alpha-np:http\" -m tcp --dport {np} -j KUBE-EXT-"
    ))), "{nat:#?}");

    // LoadBalancer: the pool's address, to the two eligible nodes' NodePorts.
    let x = json(&kc, &ns, "alpha-lb").await?;
    let np = x["ports"][0]["node_port"].as_i64().context("node port")?;
    let cip = x["cluster_ips"][0].as_str().context("cluster ip")?;
    assert!(lb.starts_with("192.168.77."), "{lb}");
    assert_eq!(
        x["ports"][0]["summary"],
        format!(
            "{lb}:80 -> 10.0.0.1:{np}, 10.0.0.2:{np} (each eligible node) -> {cip}:80 -> 10.244.1.10:8080, 10.244.2.10:8080"
        )
    );
    let n3 = &x["ports"][0]["nodes"][2];
    assert_eq!(n3["load_balancer_target"], false);
    assert!(
        n3["note"]
            .as_str()
            .is_some_and(|n| n.contains("exclude-from-external-load-balancers"))
    );
    let nat = strings(&x["iptables"][0]["nat"]);
    assert!(nat.iter().any(|l| l.starts_with(&format!(
        "-A KUBE-SERVICES -d {lb}/32 -p tcp -m comment --comment \"{ns}/alpha-lb:http loadbalancer IP\" -m tcp --dport 80 -j KUBE-EXT-"
    ))), "{nat:#?}");
    let reasons: Vec<&str> = x["events"]
        .as_array()
        .context("events")?
        .iter()
        .filter_map(|e| e["reason"].as_str())
        .collect();
    assert!(reasons.contains(&"EnsuredLoadBalancer"), "{reasons:?}");

    // Headless: no kube-proxy rules; DNS names the ready endpoints, alpha-0 by its hostname.
    let x = json(&kc, &ns, "alpha-headless").await?;
    assert_eq!(x["iptables"], serde_json::json!([]));
    assert_eq!(x["env"], serde_json::json!([]));
    let dns: Vec<(String, String)> = x["dns"]
        .as_array()
        .context("dns")?
        .iter()
        .filter(|r| r["type"] == "A")
        .map(|r| {
            (
                r["name"].as_str().unwrap_or("").to_string(),
                r["value"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect();
    let fqdn = format!("alpha-headless.{ns}.svc.cluster.local");
    assert!(
        dns.contains(&(fqdn.clone(), "10.244.1.10".into())),
        "{dns:?}"
    );
    assert!(dns.contains(&(fqdn.clone(), "10.244.2.10".into())));
    assert!(!dns.iter().any(|(_, ip)| ip == "10.244.2.11"));
    assert!(dns.contains(&(format!("alpha-0.{fqdn}"), "10.244.1.10".into())));
    assert!(dns.contains(&(format!("10-244-2-10.{fqdn}"), "10.244.2.10".into())));

    // ExternalName: a CNAME and nothing else.
    let x = json(&kc, &ns, "database").await?;
    assert_eq!(
        x["dns"],
        serde_json::json!([{"name": format!("database.{ns}.svc.cluster.local"), "type": "CNAME", "value": "prod.database.example.com"}])
    );
    assert_eq!(x["ports"], serde_json::json!([]));
    assert_eq!(x["iptables"], serde_json::json!([]));

    // A selector matching nothing: the reason, and kube-proxy's REJECT.
    let x = json(&kc, &ns, "nobody").await?;
    assert_eq!(x["problems"][0]["reason"], "SelectorMatchesNothing");
    let filter = strings(&x["iptables"][0]["filter"]);
    assert!(
        filter.iter().any(
            |l| l.contains(&format!("\"{ns}/nobody:http has no endpoints\""))
                && l.ends_with("-j REJECT --reject-with icmp-port-unreachable")
        ),
        "{filter:#?}"
    );
    assert_eq!(x["iptables"][0]["nat"], serde_json::json!([]));

    // Not found: exit 1 with one line.
    let out = run(&[
        &format!("{ns}/missing"),
        "--kubeconfig",
        kc.to_str().unwrap_or_default(),
    ])
    .await?;
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim(), format!("error: service {ns}/missing not found"));
    manager.child.start_kill()?;
    let _ = manager.wait_exit(Duration::from_secs(10)).await;
    Ok(())
}

#[tokio::test]
async fn help_bad_usage_and_an_unreachable_api_server() -> Result<()> {
    for args in [
        &[][..],
        &["web"],
        &["ns/web", "-o", "yaml"],
        &["ns/web", "--bogus"],
    ] {
        let out = run(args).await?;
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(err.trim().lines().count(), 1, "{args:?}: {err}");
    }
    // Help of both the manager and the subcommand: exit 0, and each mentions explain.
    for args in [&["--help"][..], &["explain", "--help"]] {
        let out = tokio::process::Command::new(manager_binary())
            .args(args)
            .output()
            .await?;
        assert!(out.status.success(), "{args:?}");
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("explain"),
            "{args:?}"
        );
    }
    let dir = tempfile::tempdir()?;
    let kc = dir.path().join("nowhere.kubeconfig");
    let port = free_addr();
    std::fs::write(
        &kc,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: x\n  cluster:\n    server: http://{port}\nusers:\n- name: x\n  user: {{}}\ncontexts:\n- name: x\n  context:\n    cluster: x\n    user: x\ncurrent-context: x\n"
        ),
    )?;
    let out = run(&["ns/web", "--kubeconfig", kc.to_str().unwrap_or_default()]).await?;
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.starts_with("error: getting service ns/web"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    Ok(())
}
