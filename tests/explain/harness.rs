//! What the explain tests share: running the binary, fixtures, a read-only identity.

pub(crate) use std::collections::BTreeMap;
pub(crate) use std::path::Path;
pub(crate) use std::process::Output;
pub(crate) use std::time::Duration;

pub(crate) use anyhow::{Context, Result, anyhow, bail};
pub(crate) use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
pub(crate) use k8s_openapi::api::core::v1::{
    Node, Service, ServiceAccount, ServicePort, ServiceSpec,
};
pub(crate) use k8s_openapi::api::discovery::v1::EndpointSlice;
pub(crate) use k8s_openapi::api::rbac::v1::{
    ClusterRole, ClusterRoleBinding, PolicyRule, RoleRef, Subject,
};
pub(crate) use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
pub(crate) use kube::Api;
pub(crate) use kube::api::{ListParams, ObjectMeta, Patch, PatchParams, PostParams};
pub(crate) use serde_json::Value;
pub(crate) use test_support::{
    ControlPlane, Manager, NodeSpecBuilder, PodBuilder, create_node, create_pod, free_addr,
    manager_binary, namespace, set_pod_status, wait_for,
};

pub(crate) const T: Duration = Duration::from_secs(90);

/// Runs `explain` with `args` (after the subcommand).
pub(crate) async fn run(args: &[&str]) -> Result<Output> {
    Ok(tokio::process::Command::new(manager_binary())
        .arg("explain")
        .args(args)
        .output()
        .await?)
}

/// `explain <ns>/<name> -o json` as `kubeconfig`; the parsed output, or why not.
pub(crate) async fn json(kubeconfig: &Path, ns: &str, name: &str) -> Result<Value> {
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

pub(crate) fn service(name: &str, type_: &str, app: &str, target: IntOrString) -> Service {
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

pub(crate) fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .into_iter()
        .flatten()
        .filter_map(|s| s.as_str().map(str::to_string))
        .collect()
}

/// The endpoints of `svc`'s slices: (ip, ready).
pub(crate) async fn slice_endpoints(
    client: &kube::Client,
    ns: &str,
    svc: &str,
) -> Vec<(String, bool)> {
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
pub(crate) async fn read_only_kubeconfig(
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
pub(crate) async fn set_node_ip(client: &kube::Client, name: &str, ip: &str) -> Result<Node> {
    let patch =
        serde_json::json!({"status": {"addresses": [{"type": "InternalIP", "address": ip}]}});
    Ok(Api::<Node>::all(client.clone())
        .patch_status(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await?)
}
