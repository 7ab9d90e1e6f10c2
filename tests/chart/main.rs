//! The Helm chart (charts/service-controller-manager) against helm and the real local control
//! plane: lint, render with every provider, server-side dry-run of what it renders, its RBAC
//! applied for real with the manager running under that ServiceAccount's token, RBAC that
//! follows `controllers`, and a values schema that rejects bad input.
//!
//! Split by what is under test: `render` (lint, schema, rendering, RBAC that follows
//! `controllers`), `rbac_run` (the manager under the chart's ServiceAccount), `demo` (the
//! README's first command) and `values` (every value documented).

mod demo;
mod rbac_run;
mod render;
mod values;

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
    ControlPlane, Manager, NodeSpecBuilder, PodBuilder, create_node, create_pod, free_addr,
    manager_binary, namespace, repo_root, set_pod_status, tool, wait_for,
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
