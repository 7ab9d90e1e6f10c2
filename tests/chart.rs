//! The Helm chart (charts/service-controller-manager) against helm and the real local control
//! plane: lint, render with every provider, server-side dry-run of what it renders, its RBAC
//! applied for real with the manager running under that ServiceAccount's token, RBAC that
//! follows `controllers`, and a values schema that rejects bad input.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Endpoints, Service, ServicePort, ServiceSpec};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{ListParams, PostParams};
use kube::{Api, Client};
use serde_json::Value;
use test_support::{
    ControlPlane, Manager, NodeSpecBuilder, PodBuilder, create_node, create_pod, manager_binary,
    namespace, repo_root, set_pod_status, tool, wait_for,
};
use tokio::io::AsyncWriteExt;
use tokio::process::Command;

const AWS: &[&str] = &[
    "cloudProvider.name=aws",
    "cloudProvider.aws.region=eu-west-1",
    "cloudProvider.aws.roleArn=arn:aws:iam::123456789012:role/scm",
    "cloudProvider.aws.credentialsSecret=aws-credentials",
    "cloudProvider.aws.subnets={subnet-0abc,public-b}",
    "cloudProvider.aws.vpcID=vpc-0123abcd",
    "cloudProvider.aws.disableSecurityGroupIngress=true",
];
const LOCAL: &[&str] = &[
    "cloudProvider.name=local",
    "cloudProvider.local.pools={192.168.100.0/28}",
];

fn chart_dir() -> PathBuf {
    repo_root().join("charts/service-controller-manager")
}

/// A scratch directory for one test, removed when dropped.
struct Scratch(tempfile::TempDir);

impl Scratch {
    fn new(name: &str) -> Scratch {
        Scratch(
            tempfile::Builder::new()
                .prefix(&format!("scm-chart-{name}-"))
                .tempdir()
                .expect("create scratch dir"),
        )
    }
    fn path(&self, f: &str) -> PathBuf {
        self.0.path().join(f)
    }
}

struct Out {
    ok: bool,
    stdout: String,
    stderr: String,
}

async fn run(cmd: &mut Command, stdin: Option<&str>) -> Out {
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawn");
    if let (Some(input), Some(mut w)) = (stdin, child.stdin.take()) {
        w.write_all(input.as_bytes()).await.expect("write stdin");
        drop(w);
    }
    let o = child.wait_with_output().await.expect("wait");
    Out {
        ok: o.status.success(),
        stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
    }
}

/// `helm template <release> <chart> -n <ns> --set ...`.
async fn helm_template(release: &str, ns: &str, sets: &[&str]) -> Out {
    let mut cmd = Command::new(tool("helm").expect("bin/helm"));
    cmd.arg("template")
        .arg(release)
        .arg(chart_dir())
        .arg("--namespace")
        .arg(ns);
    for s in sets {
        cmd.arg("--set").arg(s);
    }
    run(&mut cmd, None).await
}

async fn render(release: &str, ns: &str, sets: &[&str]) -> String {
    let o = helm_template(release, ns, sets).await;
    assert!(o.ok, "helm template {sets:?} failed: {}", o.stderr);
    o.stdout
}

/// `kubectl apply` of `manifests` as admin; `dry_run` = server-side dry run. Returns the objects
/// as the API server answered them (defaulted and validated).
async fn kubectl_apply(cp: &ControlPlane, ns: &str, manifests: &str, dry_run: bool) -> Vec<Value> {
    let mut cmd = Command::new(tool("kubectl").expect("bin/kubectl"));
    cmd.arg("--kubeconfig")
        .arg(&cp.kubeconfig)
        .args(["apply", "-n", ns, "-o", "json", "-f", "-"]);
    if dry_run {
        cmd.arg("--dry-run=server");
    }
    let o = run(&mut cmd, Some(manifests)).await;
    assert!(
        o.ok,
        "kubectl apply (dry_run={dry_run}) failed: {}",
        o.stderr
    );
    let v: Value = serde_json::from_str(&o.stdout).expect("kubectl -o json");
    match v.get("items").and_then(Value::as_array) {
        Some(items) if v["kind"] == "List" => items.clone(),
        _ => vec![v],
    }
}

fn find<'a>(objs: &'a [Value], kind: &str) -> &'a Value {
    objs.iter()
        .find(|o| o["kind"] == kind)
        .unwrap_or_else(|| panic!("no {kind} rendered"))
}

fn strs(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|s| s.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

/// (apiGroup, resource) → verbs of a ClusterRole.
fn rules(role: &Value) -> Vec<(String, String, Vec<String>)> {
    let mut out = vec![];
    for r in role["rules"].as_array().into_iter().flatten() {
        for g in strs(&r["apiGroups"]) {
            for res in strs(&r["resources"]) {
                out.push((g.clone(), res, strs(&r["verbs"])));
            }
        }
    }
    out
}

fn verbs_of(role: &Value, group: &str, resource: &str) -> Vec<String> {
    rules(role)
        .into_iter()
        .filter(|(g, r, _)| g == group && r == resource)
        .flat_map(|(_, _, v)| v)
        .collect()
}

fn manager_args(objs: &[Value]) -> Vec<String> {
    strs(&find(objs, "Deployment")["spec"]["template"]["spec"]["containers"][0]["args"])
}

fn free_addr() -> String {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    l.local_addr().expect("local addr").to_string()
}

#[tokio::test]
async fn helm_lint_passes_strict() {
    for sets in [&[][..], AWS, LOCAL] {
        let mut cmd = Command::new(tool("helm").expect("bin/helm"));
        cmd.args(["lint", "--strict"]).arg(chart_dir());
        for s in sets {
            cmd.arg("--set").arg(s);
        }
        let o = run(&mut cmd, None).await;
        assert!(o.ok, "helm lint {sets:?}: {}{}", o.stdout, o.stderr);
        assert!(o.stdout.contains("0 chart(s) failed"), "{}", o.stdout);
    }
    // NOTES.txt renders only on install; a client-side dry run renders it without a cluster.
    let o = run(
        Command::new(tool("helm").expect("bin/helm"))
            .args(["install", "scm", "--dry-run=client", "-n", "kube-system"])
            .arg(chart_dir()),
        None,
    )
    .await;
    assert!(o.ok, "helm install --dry-run: {}", o.stderr);
    assert!(
        o.stdout.contains("NOTES:") && o.stdout.contains("cloud-lb is off"),
        "{}",
        o.stdout
    );
}

#[tokio::test]
async fn schema_rejects_wrong_types_unknown_providers_and_unknown_keys() {
    let cases: &[(&[&str], &str)] = &[
        (&["replicaCount=two"], "/replicaCount"),
        (&["cloudProvider.name=gce"], "/cloudProvider/name"),
        (&["controllers.endpoints=maybe"], "/controllers/endpoints"),
        (
            &["endpointSlice.maxEndpointsPerSlice=1001"],
            "/endpointSlice/maxEndpointsPerSlice",
        ),
        (&["logging.format=xml"], "/logging/format"),
        (
            &["leaderElection.leaseDuration=15"],
            "/leaderElection/leaseDuration",
        ),
        (
            &["controllers.no-such-controller=true"],
            "no-such-controller",
        ),
        (&["cloudProvider.name=local"], "/cloudProvider/local/pools"),
        (
            &["serviceClusterIPRanges={not-a-cidr}"],
            "/serviceClusterIPRanges",
        ),
    ];
    for (sets, path) in cases {
        let o = helm_template("scm", "scm-system", sets).await;
        assert!(!o.ok, "{sets:?} was accepted");
        assert!(
            o.stderr.contains("schema") && o.stderr.contains(path),
            "{sets:?}: message should name {path}: {}",
            o.stderr
        );
    }
    // Relations no schema can see are template failures with a message.
    let o = helm_template(
        "scm",
        "scm-system",
        &["leaderElection.enabled=false", "replicaCount=2"],
    )
    .await;
    assert!(
        !o.ok && o.stderr.contains("leaderElection.enabled=false"),
        "{}",
        o.stderr
    );
    let all_off: Vec<String> = [
        "clusterip-alloc",
        "service-cidr",
        "nodeport-alloc",
        "endpointslice",
        "endpointslice-mirroring",
        "endpoints",
        "cloud-lb",
    ]
    .iter()
    .map(|c| format!("controllers.{c}=false"))
    .collect();
    let all_off: Vec<&str> = all_off.iter().map(String::as_str).collect();
    let o = helm_template("scm", "scm-system", &all_off).await;
    assert!(
        !o.ok && o.stderr.contains("every controller is disabled"),
        "{}",
        o.stderr
    );
}

#[tokio::test]
async fn renders_for_every_provider_and_the_api_server_accepts_it() {
    let cp = ControlPlane::shared().await.expect("control plane");
    let client = cp.client().await.expect("client");
    let ns = namespace(&client, "chart-dry").await.expect("namespace");
    let extra = [
        "networkPolicy.enabled=true",
        "networkPolicy.egress.enabled=true",
    ];
    for (name, sets) in [("default", &[][..]), ("aws", AWS), ("local", LOCAL)] {
        let mut all: Vec<&str> = sets.to_vec();
        all.extend_from_slice(&extra);
        let text = render("scm", &ns, &all).await;
        let objs = kubectl_apply(cp, &ns, &text, true).await;
        let kinds: Vec<&str> = objs.iter().filter_map(|o| o["kind"].as_str()).collect();
        for k in [
            "ServiceAccount",
            "ClusterRole",
            "ClusterRoleBinding",
            "Role",
            "RoleBinding",
            "Deployment",
            "PodDisruptionBudget",
            "Service",
            "NetworkPolicy",
        ] {
            assert!(kinds.contains(&k), "{name}: {k} missing from {kinds:?}");
        }
        assert_eq!(kinds.contains(&"ConfigMap"), name != "default", "{name}");

        let dep = find(&objs, "Deployment");
        assert_eq!(dep["spec"]["replicas"], 2, "{name}");
        let pod = &dep["spec"]["template"]["spec"];
        let c = &pod["containers"][0];
        let args = manager_args(&objs);
        for want in [
            "--leader-elect=true".to_string(),
            format!("--leader-elect-resource-namespace={ns}"),
            "--http-address=0.0.0.0:10270".to_string(),
        ] {
            assert!(args.contains(&want), "{name}: {want} not in {args:?}");
        }
        assert_eq!(
            args.iter().any(|a| a.starts_with("--cloud-provider=")),
            name != "default"
        );
        // The hardened pod.
        assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
        assert_eq!(pod["securityContext"]["runAsUser"], 65532);
        assert_eq!(
            pod["securityContext"]["seccompProfile"]["type"],
            "RuntimeDefault"
        );
        let sc = &c["securityContext"];
        assert_eq!(sc["readOnlyRootFilesystem"], true);
        assert_eq!(sc["allowPrivilegeEscalation"], false);
        assert_eq!(strs(&sc["capabilities"]["drop"]), vec!["ALL"]);
        assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/healthz");
        assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz");
        assert_eq!(c["ports"][0]["containerPort"], 10270);
        assert!(c["resources"]["requests"]["memory"].is_string());

        // No wildcards anywhere; leases only through the namespaced Role.
        let role = find(&objs, "ClusterRole");
        for (g, r, v) in rules(role) {
            assert!(
                g != "*" && r != "*" && !v.iter().any(|x| x == "*"),
                "{name}: wildcard in {g}/{r} {v:?}"
            );
            assert_ne!(r, "leases", "{name}: leases must not be cluster-wide");
        }
        let lease_role = find(&objs, "Role");
        assert_eq!(lease_role["metadata"]["namespace"], ns.as_str());
        assert!(rules(lease_role).iter().all(|(_, r, _)| r == "leases"));

        match name {
            "aws" => {
                let sa = find(&objs, "ServiceAccount");
                assert_eq!(
                    sa["metadata"]["annotations"]["eks.amazonaws.com/role-arn"],
                    "arn:aws:iam::123456789012:role/scm"
                );
                let env = c["env"].to_string();
                assert!(env.contains("aws-credentials") && env.contains("AWS_SECRET_ACCESS_KEY"));
                let cm = find(&objs, "ConfigMap");
                let cfg = cm["data"]["cloud-config.yaml"].as_str().unwrap_or_default();
                // The provider's own type (unknown keys rejected) reads what the chart renders.
                let parsed: cloud_lb::aws::AwsCloudConfig =
                    serde_yaml::from_str(cfg).expect("the provider reads the rendered config");
                assert_eq!(parsed.region.as_deref(), Some("eu-west-1"), "{cfg}");
                assert_eq!(parsed.vpc_id.as_deref(), Some("vpc-0123abcd"), "{cfg}");
                assert_eq!(parsed.subnets, vec!["subnet-0abc", "public-b"], "{cfg}");
                assert!(parsed.disable_security_group_ingress, "{cfg}");
            }
            "local" => {
                let cm = find(&objs, "ConfigMap");
                let cfg = cm["data"]["cloud-config.yaml"].as_str().unwrap_or_default();
                let parsed: cloud_lb::local::LocalCloudConfig =
                    serde_yaml::from_str(cfg).expect("the provider reads the rendered config");
                assert!(
                    cloud_lb::local::LocalProvider::new(parsed.clone()).is_ok(),
                    "{cfg}"
                );
                assert_eq!(
                    parsed.pools,
                    vec!["192.168.100.0/28".parse::<ipnet::IpNet>().expect("CIDR")],
                    "{cfg}"
                );
            }
            _ => {}
        }

        // The binary accepts every rendered flag: with a missing kubeconfig it gets past flag
        // parsing (exit 2 is a flag error) and fails on the kubeconfig (exit 1).
        let mut cmd = Command::new(manager_binary());
        cmd.args(args.iter().filter(|a| !a.starts_with("--http-address")))
            .arg(format!("--http-address={}", free_addr()))
            .arg("--kubeconfig=/nonexistent");
        let o = cmd.output().await.expect("run the manager");
        assert_eq!(
            o.status.code(),
            Some(1),
            "{name}: the manager rejected the chart's flags: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }

    // The optional ServiceMonitor renders (its CRD is not on this API server, so no dry run).
    let text = render("scm", &ns, &["metrics.serviceMonitor.enabled=true"]).await;
    assert!(text.contains("kind: ServiceMonitor") && text.contains("port: http-metrics"));
}

#[tokio::test]
async fn disabling_a_controller_removes_its_rules() {
    let cp = ControlPlane::shared().await.expect("control plane");
    let client = cp.client().await.expect("client");
    let ns = namespace(&client, "chart-rbac").await.expect("namespace");
    let role_for = |sets: Vec<&'static str>| {
        let ns = ns.clone();
        async move {
            let objs = kubectl_apply(cp, &ns, &render("scm", &ns, &sets).await, true).await;
            (find(&objs, "ClusterRole").clone(), manager_args(&objs))
        }
    };

    let (all, _) = role_for(AWS.to_vec()).await;
    assert_eq!(verbs_of(&all, "", "endpoints/restricted"), vec!["create"]);
    assert!(verbs_of(&all, "", "endpoints").contains(&"delete".to_string()));
    assert!(!verbs_of(&all, "", "services/status").is_empty());
    assert!(verbs_of(&all, "", "services").contains(&"patch".to_string()));
    assert!(!verbs_of(&all, "networking.k8s.io", "ipaddresses").is_empty());

    // endpoints off: its writes go; mirroring still reads Endpoints.
    let mut sets = AWS.to_vec();
    sets.push("controllers.endpoints=false");
    let (r, args) = role_for(sets).await;
    assert!(verbs_of(&r, "", "endpoints/restricted").is_empty());
    assert_eq!(verbs_of(&r, "", "endpoints"), vec!["get", "list", "watch"]);
    let c = args
        .iter()
        .find(|a| a.starts_with("--controllers="))
        .cloned();
    assert!(
        c.as_deref()
            .is_some_and(|c| !c.split([',', '=']).any(|x| x == "endpoints")),
        "{c:?}"
    );

    // cloud-lb off: no status writes, no Service patches.
    let mut sets = AWS.to_vec();
    sets.push("controllers.cloud-lb=false");
    let (r, _) = role_for(sets).await;
    assert!(verbs_of(&r, "", "services/status").is_empty());
    assert!(!verbs_of(&r, "", "services").contains(&"patch".to_string()));

    // No provider: cloud-lb cannot run, so its rules are not granted either.
    let (r, _) = role_for(vec![]).await;
    assert!(verbs_of(&r, "", "services/status").is_empty());

    // service-cidr off: IPAddresses and ServiceCIDR writes go.
    let (r, _) = role_for(vec!["controllers.service-cidr=false"]).await;
    assert!(verbs_of(&r, "networking.k8s.io", "ipaddresses").is_empty());
    assert!(verbs_of(&r, "networking.k8s.io", "servicecidrs/status").is_empty());
    assert_eq!(
        verbs_of(&r, "networking.k8s.io", "servicecidrs"),
        vec!["get", "list", "watch"]
    );

    // Only endpointslice: exactly its rules plus Events.
    let only: Vec<&str> = vec![
        "controllers.clusterip-alloc=false",
        "controllers.service-cidr=false",
        "controllers.nodeport-alloc=false",
        "controllers.endpointslice-mirroring=false",
        "controllers.endpoints=false",
    ];
    let (r, _) = role_for(only).await;
    let mut got: Vec<String> = rules(&r)
        .into_iter()
        .map(|(g, res, _)| format!("{g}/{res}"))
        .collect();
    got.sort();
    got.dedup();
    assert_eq!(
        got,
        vec![
            "/events",
            "/nodes",
            "/pods",
            "/services",
            "/services/finalizers",
            "discovery.k8s.io/endpointslices",
            "events.k8s.io/events",
        ]
    );
    assert_eq!(verbs_of(&r, "", "services"), vec!["get", "list", "watch"]);
}

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

async fn ready(addr: &str) -> bool {
    match reqwest::get(format!("http://{addr}/readyz")).await {
        Ok(r) => r.status().is_success(),
        Err(_) => false,
    }
}

async fn leader_metric(addr: &str) -> Option<i64> {
    let body = reqwest::get(format!("http://{addr}/metrics"))
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    body.lines()
        .find(|l| l.starts_with("leader_election_master_status{"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// Starts the manager as the chart would run it (the rendered Deployment's args), with the
/// local files and address swapped in, authenticated by `kubeconfig`.
fn start_as(args: &[String], kubeconfig: &Path, cloud_config: &Path, addr: &str) -> Manager {
    let mut cmd = Command::new(manager_binary());
    for a in args {
        if a.starts_with("--http-address=") {
            cmd.arg(format!("--http-address={addr}"));
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
    run_with_chart_rbac(LOCAL, &[], true).await;
}

#[tokio::test]
async fn manager_runs_with_the_reduced_rbac_of_disabled_controllers() {
    let mut sets = LOCAL.to_vec();
    sets.extend([
        "controllers.endpoints=false",
        "controllers.endpointslice-mirroring=false",
    ]);
    run_with_chart_rbac(&sets, &["endpoints", "endpointslice-mirroring"], false).await;
}

/// Renders the chart with `sets`, applies its RBAC for real, runs the manager with the rendered
/// args as its ServiceAccount, and checks that it leads and that every enabled controller
/// (all but `disabled`) does its work with no 403.
async fn run_with_chart_rbac(sets: &[&str], disabled: &[&str], negative_control: bool) {
    let cp = ControlPlane::shared().await.expect("control plane");
    let client = cp.client().await.expect("client");
    let ns = namespace(&client, "chart-sa").await.expect("namespace");
    let scratch = Scratch::new("sa");
    // A release name unique to this namespace, so cluster-scoped RBAC objects don't collide.
    let release = format!("r-{}", ns.trim_start_matches("chart-sa-"));
    let text = render(&release, &ns, sets).await;
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
    assert_eq!(rbac.len(), 5);
    let list = serde_json::json!({"apiVersion": "v1", "kind": "List", "items": rbac});
    kubectl_apply(cp, &ns, &list.to_string(), false).await;

    let cm = find(&objs, "ConfigMap");
    let cloud_config = scratch.path("cloud-config.yaml");
    std::fs::write(
        &cloud_config,
        cm["data"]["cloud-config.yaml"]
            .as_str()
            .expect("cloud config"),
    )
    .expect("write cloud config");

    // Negative control: the same manager with a token of a ServiceAccount that has no
    // bindings is refused (proves the token, not the admin identity, is what the manager uses).
    if negative_control {
        let nobody = serde_json::json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "nobody"}});
        kubectl_apply(cp, &ns, &nobody.to_string(), false).await;
        let nobody_kc = scratch.path("nobody.kubeconfig");
        token_kubeconfig(cp, &create_token(cp, &ns, "nobody").await, &nobody_kc);
        let addr0 = free_addr();
        let m0 = start_as(&args, &nobody_kc, &cloud_config, &addr0);
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
    let m = start_as(&args, &kc, &cloud_config, &addr);
    let logs = || m.log_lines().join("\n");
    wait_for("/readyz ok", Duration::from_secs(60), || async {
        ready(&addr).await.then_some(())
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
        || async { (leader_metric(&addr).await == Some(1)).then_some(()) },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}; logs:\n{}", logs()));

    // Work for every controller: a Node, a ready Pod, and Services of each kind.
    let app_ns = namespace(&client, "chart-app").await.expect("namespace");
    exercise_controllers(&client, &app_ns, &m, disabled).await;

    let denied = forbidden(&m.log_lines());
    assert!(
        denied.is_empty(),
        "403s with the chart's RBAC:\n{}",
        denied.join("\n")
    );
}

/// Creates objects every controller acts on and waits for each controller's result.
async fn exercise_controllers(client: &Client, ns: &str, m: &Manager, disabled: &[&str]) {
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
                        .is_some_and(|ip| ip.starts_with("192.168.100."))
                })
                .then_some(())
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}; logs:\n{}", m.log_lines().join("\n")));
}

/// The fields of the line of `table` whose first column is `name`.
fn row<'a>(table: &'a str, name: &str) -> Vec<&'a str> {
    table
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|f| f.first() == Some(&name))
        .unwrap_or_else(|| panic!("no row {name} in:\n{table}"))
}

fn is_node_port_mapping(s: &str, port: u16) -> bool {
    // e.g. 8081:32255/TCP
    s.strip_prefix(&format!("{port}:"))
        .and_then(|r| r.strip_suffix("/TCP"))
        .and_then(|n| n.parse::<u16>().ok())
        .is_some_and(|n| (30000..=32767).contains(&n))
}

// The README's first command: `make demo` runs tests/scripts/demo.sh. It lives here (beside the
// chart, the other thing users meet first) so that CI runs it; it uses the manager Cargo built
// for this test run instead of building again under Cargo's lock.
#[tokio::test]
async fn demo_script_shows_services_end_to_end_and_cleans_up() {
    let scratch = Scratch::new("demo");
    let state = scratch.path("state");
    let mut cmd = Command::new(repo_root().join("tests/scripts/demo.sh"));
    cmd.env("SCM_DEMO_MANAGER", manager_binary())
        .env("SCM_DEMO_DIR", &state);
    let o = run(&mut cmd, None).await;
    assert!(o.ok, "demo failed:\n{}\n{}", o.stdout, o.stderr);
    let out = &o.stdout;
    for (section, header) in [
        (
            "$ kubectl get svc",
            ["NAME", "TYPE", "CLUSTER-IP", "EXTERNAL-IP", "PORT(S)"],
        ),
        (
            "$ kubectl get endpointslices",
            ["NAME", "ADDRESSTYPE", "PORTS", "ENDPOINTS", "AGE"],
        ),
    ] {
        assert!(out.contains(section), "{section} missing:\n{out}");
        assert!(
            out.lines()
                .any(|l| header.iter().all(|h| l.split_whitespace().any(|w| w == *h))),
            "header {header:?} missing:\n{out}"
        );
    }
    assert!(out.contains("$ kubectl get endpoints\n"), "{out}");

    // kubectl get svc, as in the seed: CLUSTER-IP from the range, EXTERNAL-IP from the pool,
    // PORT(S) with the NodePort.
    let svc = out
        .split("$ kubectl get endpointslices")
        .next()
        .unwrap_or_default();
    let ex = row(svc, "example");
    assert_eq!(ex[1], "LoadBalancer");
    assert!(ex[2].starts_with("10.43."), "{ex:?}");
    assert!(ex[3].starts_with("192.168.0."), "{ex:?}");
    assert!(is_node_port_mapping(ex[4], 8081), "{ex:?}");
    let np = row(svc, "alpha-nodeport");
    assert!(is_node_port_mapping(np[4], 80), "{np:?}");
    let cip = row(svc, "alpha");
    assert_eq!(cip[1], "ClusterIP");
    assert!(cip[2].starts_with("10.43."), "{cip:?}");
    assert_eq!(cip[3..5], ["<none>", "80/TCP"]);
    assert_eq!(row(svc, "alpha-headless")[2], "None");
    assert_eq!(
        row(svc, "database")[1..4],
        ["ExternalName", "<none>", "prod.database.example.com"]
    );

    // Every pod behind each selector Service, in slices and in Endpoints.
    let pods = "10.42.0.10,10.42.1.11,10.42.2.12";
    let slices = out
        .split("$ kubectl get endpointslices")
        .nth(1)
        .and_then(|s| s.split("$ kubectl get endpoints\n").next())
        .unwrap_or_default();
    for s in ["example", "alpha", "alpha-nodeport", "alpha-headless"] {
        let line = slices
            .lines()
            .find(|l| {
                l.split_whitespace().next().is_some_and(|n| {
                    n.strip_prefix(s)
                        .and_then(|r| r.strip_prefix('-'))
                        .is_some_and(|r| r.len() == 5)
                })
            })
            .unwrap_or_else(|| panic!("no EndpointSlice for {s}:\n{slices}"));
        assert!(line.contains(pods), "{line}");
    }
    let eps = out
        .split("$ kubectl get endpoints\n")
        .nth(1)
        .unwrap_or_default();
    assert_eq!(
        row(eps, "example")[1],
        "10.42.0.10:8080,10.42.1.11:8080,10.42.2.12:8080"
    );
    assert!(
        !eps.contains("database"),
        "ExternalName has no Endpoints:\n{eps}"
    );

    // Progress went to stderr, and everything was cleaned up.
    assert!(
        o.stderr.contains("==> Starting the local control plane"),
        "{}",
        o.stderr
    );
    assert!(
        !state.exists(),
        "demo state left behind at {}",
        state.display()
    );
}

/// Leaf paths of the values schema (objects without declared properties count as leaves).
fn schema_leaves(v: &Value, prefix: &str, out: &mut Vec<String>) {
    match v.get("properties").and_then(Value::as_object) {
        Some(props) => {
            for (k, sub) in props {
                let path = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                schema_leaves(sub, &path, out);
            }
        }
        None => out.push(prefix.to_string()),
    }
}

/// The line of `path` (a.b.c) in a block-style YAML text, following indentation.
fn yaml_line(lines: &[&str], path: &str) -> Option<usize> {
    let indent = |l: &str| l.len() - l.trim_start().len();
    let (mut from, mut to, mut parent_indent) = (0, lines.len(), None::<usize>);
    let mut found = None;
    for key in path.split('.') {
        let i = (from..to).find(|&i| {
            let l = lines[i];
            l.trim_start().starts_with(&format!("{key}:"))
                && parent_indent.is_none_or(|p| indent(l) > p)
                && !l.trim_start().starts_with('#')
        })?;
        let ind = indent(lines[i]);
        // The block of this key ends at the next line indented no deeper than the key.
        let end = (i + 1..to)
            .find(|&j| !lines[j].trim().is_empty() && indent(lines[j]) <= ind)
            .unwrap_or(to);
        (from, to, parent_indent, found) = (i + 1, end, Some(ind), Some(i));
    }
    found
}

#[test]
fn every_value_is_documented_in_values_yaml_and_the_readme() {
    let dir = chart_dir();
    let schema: Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join("values.schema.json")).expect("schema"),
    )
    .expect("schema is JSON");
    let values = std::fs::read_to_string(dir.join("values.yaml")).expect("values.yaml");
    let readme = std::fs::read_to_string(repo_root().join("README.md")).expect("README");
    let helm = readme
        .split("## Helm")
        .nth(1)
        .and_then(|s| s.split("\n## ").next())
        .expect("a Helm section in the README");
    let mut leaves = vec![];
    schema_leaves(&schema, "", &mut leaves);
    assert!(leaves.len() > 50, "{leaves:?}");
    let lines: Vec<&str> = values.lines().collect();
    for leaf in leaves.iter().filter(|l| *l != "global") {
        let key = leaf.rsplit('.').next().unwrap_or(leaf);
        // values.yaml: the key exists and a comment sits right above it (or above its parent's
        // block for the per-controller switches, which share one).
        let at =
            yaml_line(&lines, leaf).unwrap_or_else(|| panic!("{leaf} missing from values.yaml"));
        assert!(
            at > 0 && lines[at - 1].trim_start().starts_with('#'),
            "{leaf} has no comment in values.yaml"
        );
        assert!(
            helm.contains(key),
            "{leaf} is not documented in the README's Helm section"
        );
    }
}
