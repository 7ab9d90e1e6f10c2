//! `service-controller-manager plan` against the real control plane where kube-controller-
//! manager's EndpointSlice controller has already written the slices (the migration check the
//! README describes): the plan lists exactly the takeover writes, and nothing it does reaches
//! etcd. Every request `plan` makes goes through test_support's API proxy, which sees each one
//! with its query: a write without `dryRun=All` would be a real write.

use std::collections::BTreeSet;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use k8s_openapi::api::core::v1::{Service, ServicePort, ServiceSpec};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::Api;
use kube::api::{ListParams, ObjectMeta, PostParams};
use test_support::apiproxy::ApiProxy;
use test_support::metrics::scrape_manager;
use test_support::{
    ControlPlane, ControlPlaneOptions, Manager, NodeSpecBuilder, PodBuilder, create_node,
    create_pod, free_addr, manager_binary, namespace, set_pod_status,
    upstream_endpointslice_controller, wait_for, wait_stable,
};

const UPSTREAM: &str = "endpointslice-controller.k8s.io";
const OURS: &str = "endpointslice.service-controller-manager.k8s.io";
const MANAGED_BY: &str = "endpointslice.kubernetes.io/managed-by";

fn service(name: &str, app: &str) -> Service {
    Service {
        metadata: ObjectMeta {
            name: Some(name.into()),
            ..Default::default()
        },
        spec: Some(ServiceSpec {
            selector: Some([("app".to_string(), app.to_string())].into()),
            ports: Some(vec![ServicePort {
                name: Some("http".into()),
                port: 80,
                target_port: Some(
                    k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(8080),
                ),
                ..Default::default()
            }]),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// A kubeconfig that reaches the API server only through `proxy` (plain HTTP, no credentials).
fn proxy_kubeconfig(proxy: &ApiProxy, dir: &std::path::Path) -> Result<std::path::PathBuf> {
    let path = dir.join("proxy.kubeconfig");
    std::fs::write(
        &path,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: p\n  cluster:\n    server: {}\nusers:\n- name: u\n  user: {{}}\ncontexts:\n- name: c\n  context:\n    cluster: p\n    user: u\ncurrent-context: c\n",
            proxy.url
        ),
    )?;
    Ok(path)
}

/// User plus system CPU time of the manager process so far, in clock ticks.
fn cpu_ticks(m: &Manager) -> u64 {
    let Some(pid) = m.child.id() else { return 0 };
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which ends with ')'): utime is the 12th, stime the 13th.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let n = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    n(11) + n(12)
}

/// The table's rows (split on runs of 3+ spaces), header excluded, up to the blank line.
fn rows(stdout: &str) -> Vec<Vec<String>> {
    stdout
        .lines()
        .skip_while(|l| !l.starts_with("CONTROLLER"))
        .skip(1)
        .take_while(|l| !l.trim().is_empty())
        .map(|l| {
            l.split("   ")
                .map(str::trim)
                .filter(|c| !c.is_empty())
                .map(str::to_string)
                .collect()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plan_after_kube_controller_manager_lists_only_the_takeover_and_writes_nothing()
-> Result<()> {
    // Its own control plane: upstream's controller serves every namespace.
    let cp = ControlPlane::start(ControlPlaneOptions::default()).await?;
    let client = cp.client().await?;
    let ns = namespace(&client, "plan").await?;
    create_node(
        &client,
        NodeSpecBuilder {
            name: "plan-n1".into(),
            zone: Some("zone-a".into()),
            ..Default::default()
        },
    )
    .await?;
    let svcs: Api<Service> = Api::namespaced(client.clone(), &ns);
    for (name, app) in [("web", "web"), ("api", "api"), ("empty", "nobody")] {
        svcs.create(&PostParams::default(), &service(name, app))
            .await?;
    }
    // web: two ready pods; api: one ready, one not; empty: selects nothing.
    for (i, (app, ready)) in [("web", true), ("web", true), ("api", true), ("api", false)]
        .into_iter()
        .enumerate()
    {
        let mut b = PodBuilder::new(&ns, &format!("{app}-{i}"), &[("app", app)]);
        b.node_name = Some("plan-n1".into());
        create_pod(&client, &b).await?;
        let ip = format!("10.244.0.{}", 10 + i);
        set_pod_status(&client, &ns, &b.name, ready, &[ip.as_str()]).await?;
    }
    let mut kcm = upstream_endpointslice_controller(&cp)?;
    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), &ns);
    let upstream = wait_for(
        "kube-controller-manager's slices",
        Duration::from_secs(120),
        || {
            let slices = slices.clone();
            async move {
                let l = slices
                    .list(&ListParams::default().labels(&format!("{MANAGED_BY}={UPSTREAM}")))
                    .await
                    .ok()?;
                let n = |svc: &str| {
                    l.items
                        .iter()
                        .filter(|s| {
                            s.metadata
                                .labels
                                .as_ref()
                                .and_then(|m| m.get("kubernetes.io/service-name"))
                                == Some(&svc.to_string())
                        })
                        .map(|s| s.endpoints.as_ref().map_or(0, Vec::len))
                        .collect::<Vec<_>>()
                };
                (n("web") == [2] && n("api") == [2] && n("empty") == [0]).then_some(l.items)
            }
        },
    )
    .await?;
    let before: Vec<(String, String)> = upstream
        .iter()
        .map(|s| {
            (
                s.metadata.name.clone().unwrap_or_default(),
                s.metadata.resource_version.clone().unwrap_or_default(),
            )
        })
        .collect();

    // Upstream keeps running, as it would during the check before switching.
    let proxy = ApiProxy::start(client.clone()).await?;
    let dir = tempfile::tempdir()?;
    let kubeconfig = proxy_kubeconfig(&proxy, dir.path())?;
    let out = tokio::time::timeout(
        Duration::from_secs(180),
        tokio::process::Command::new(manager_binary())
            .arg("plan")
            .arg("--kubeconfig")
            .arg(&kubeconfig)
            .args(["--controllers=endpointslice", "--endpointslice-takeover"])
            .kill_on_drop(true)
            .output(),
    )
    .await
    .context("plan did not finish")??;
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    eprintln!("plan output:\n{stdout}");
    if !out.status.success() {
        bail!("plan failed ({}):\n{stdout}\n{stderr}", out.status);
    }

    // What our takeover does, and nothing else: one in-place relabel per upstream slice (the
    // placeholder of the Service selecting nothing is recycled as ours, which also drops its
    // generateName), and each Service's EndpointsReady condition, which upstream does not
    // write.
    let rows = rows(&stdout);
    let relabel = format!("metadata.labels[{MANAGED_BY}]: {UPSTREAM} -> {OURS}");
    let recycled = format!("metadata.generateName: empty- -> (none); {relabel}");
    let (mut objects, mut conditions) = (BTreeSet::new(), BTreeSet::new());
    for r in &rows {
        let cols: Vec<&str> = r.iter().map(String::as_str).collect();
        match cols.as_slice() {
            ["endpointslice", "update", "endpointslices", obj, change]
                if *change == relabel || (obj.contains("/empty-") && *change == recycled) =>
            {
                assert!(
                    objects.insert(obj.to_string()),
                    "slice planned twice: {r:?}"
                );
            }
            ["endpointslice", "patch", "services/status", obj, change]
                if change.starts_with("status.conditions: (none) -> [EndpointsReady=") =>
            {
                assert!(conditions.insert(obj.to_string()), "twice: {r:?}");
            }
            _ => panic!("unexpected write {r:?}\n{stdout}"),
        }
    }
    let want: BTreeSet<String> = before.iter().map(|(n, _)| format!("{ns}/{n}")).collect();
    assert_eq!(objects, want, "{stdout}");
    assert!(conditions.len() <= 3, "{stdout}");
    assert!(stdout.contains(&format!("{} write(s) planned, none made", rows.len())));

    // Nothing reached etcd: every write plan sent was a server-side dry run ...
    let seen = proxy.seen();
    let writes: Vec<_> = seen
        .iter()
        .filter(|s| s.method != axum::http::Method::GET)
        .collect();
    assert!(!writes.is_empty(), "plan sent its writes as dry runs");
    let real: Vec<_> = writes
        .iter()
        .filter(|s| !s.uri.contains("dryRun=All"))
        .collect();
    assert!(real.is_empty(), "writes without dryRun: {real:?}");
    assert!(
        !seen.iter().any(|s| s.resource == "leases"),
        "a plan takes no Lease"
    );
    // ... and the slices are as upstream left them.
    let after = slices.list(&ListParams::default()).await?;
    let now: Vec<(String, String)> = after
        .items
        .iter()
        .map(|s| {
            (
                s.metadata.name.clone().unwrap_or_default(),
                s.metadata.resource_version.clone().unwrap_or_default(),
            )
        })
        .collect();
    assert_eq!(now, before, "slices changed");

    // The long-running --dry-run: the same writes, counted once each; then nothing more (no
    // retry loop on writes that never take effect), and no Lease.
    let addr = free_addr();
    let m = Manager::start(
        &cp,
        &[
            "--dry-run",
            "--controllers=endpointslice",
            "--endpointslice-takeover",
            &format!("--http-address={addr}"),
        ],
    )?;
    let planned = want.len() as f64;
    let count = || async {
        scrape_manager(&addr).await.map(|x| {
            x.sum(
                "service_controller_manager_dry_run_writes_total",
                &[("controller", "endpointslice"), ("verb", "update")],
            )
        })
    };
    wait_for("the dry run's writes", Duration::from_secs(60), || async {
        count().await.filter(|n| *n >= planned)
    })
    .await
    .map_err(|e| anyhow::anyhow!("{e}\n{}", m.log_lines().join("\n")))?;
    let cpu_before = cpu_ticks(&m);
    let settled = wait_stable(
        "the dry run's write count",
        Duration::from_secs(30),
        Duration::from_millis(500),
        10,
        count,
    )
    .await?;
    let cpu_after = cpu_ticks(&m);
    assert_eq!(settled, planned, "each write planned once");
    // Reported, not asserted (no timed assertions): CPU over the ~5 s of idling.
    eprintln!(
        "dry-run manager CPU while idle: {} ticks (1/100 s) over the settle window",
        cpu_after.saturating_sub(cpu_before)
    );
    let leases: Api<k8s_openapi::api::coordination::v1::Lease> =
        Api::namespaced(client.clone(), "kube-system");
    assert!(
        leases
            .get_opt("service-controller-manager")
            .await?
            .is_none(),
        "--dry-run takes no Lease"
    );
    drop(m);
    let _ = kcm.kill().await;
    cp.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plan_with_nothing_to_do_says_so() -> Result<()> {
    let cp = ControlPlane::shared().await?;
    let out = tokio::process::Command::new(manager_binary())
        .arg("plan")
        .arg("--kubeconfig")
        .arg(&cp.kubeconfig)
        // Only Services with this label: there are none.
        .args([
            "--controllers=endpointslice",
            "--service-label-selector=plan-test=nothing",
        ])
        .kill_on_drop(true)
        .output()
        .await?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.starts_with("No writes"), "{stdout}");
    Ok(())
}
