//! `explain`'s iptables rules against `iptables-save` on a node running kube-proxy in iptables
//! mode, for one Service of each kind. A rule belongs to a Service when its comment names the
//! Service's port (`<ns>/<name>:<port>`) or it sits in a chain such a rule jumps to; chains of
//! their own (KUBE-SVC/SVL/EXT/FW/SEP) are compared in order, shared chains as sets. Nothing is
//! left out of the comparison: kube-proxy runs without the flags whose rules explain documents
//! it does not show (no `--cluster-cidr`, `--iptables-localhost-nodeports=false`).

use std::collections::BTreeSet;

use anyhow::{Result, anyhow, bail};
use serde_json::{Value, json};
use test_support::{ControlPlane, manager_binary, wait_for};

use crate::cluster::{self, T, web_spec};
use crate::net;
use crate::scenarios::{SERIAL, Slices, setup, wait_answers};

const OWN_CHAINS: &[&str] = &[
    "KUBE-SVC-",
    "KUBE-SVL-",
    "KUBE-EXT-",
    "KUBE-FW-",
    "KUBE-SEP-",
];

/// The chain a `-A CHAIN ...` line appends to.
fn chain(line: &str) -> &str {
    line.strip_prefix("-A ")
        .and_then(|l| l.split_whitespace().next())
        .unwrap_or_default()
}

fn own_chain(c: &str) -> bool {
    OWN_CHAINS.iter().any(|p| c.starts_with(p))
}

/// The Service's rules in one `iptables-save -t <table>` output, in the order printed.
fn service_rules(save: &str, ns: &str, name: &str) -> Vec<String> {
    let needle = format!("{ns}/{name}:");
    let lines: Vec<&str> = save.lines().filter(|l| l.starts_with("-A ")).collect();
    let mut chains: BTreeSet<String> = BTreeSet::new();
    let mut picked: BTreeSet<usize> = BTreeSet::new();
    loop {
        let before = picked.len();
        for (i, l) in lines.iter().enumerate() {
            let named = l.contains(&format!("--comment \"{needle}"))
                || l.contains(&format!(" {needle}"))
                || l.contains(&format!("\"{needle}"));
            if named || chains.contains(chain(l)) {
                picked.insert(i);
                if own_chain(chain(l)) {
                    chains.insert(chain(l).to_string());
                }
                if let Some(target) = l
                    .split(" -j ")
                    .nth(1)
                    .and_then(|t| t.split_whitespace().next())
                    && own_chain(target)
                {
                    chains.insert(target.to_string());
                }
            }
        }
        if picked.len() == before {
            break;
        }
    }
    picked.into_iter().map(|i| lines[i].to_string()).collect()
}

/// Differences between `want` (explain) and `got` (iptables-save) for one table; empty when
/// equal.
fn diff(table: &str, want: &[String], got: &[String]) -> Vec<String> {
    let mut out = vec![];
    let split = |v: &[String]| -> (Vec<String>, BTreeSet<String>) {
        let own = v.iter().filter(|l| own_chain(chain(l))).cloned().collect();
        let shared = v.iter().filter(|l| !own_chain(chain(l))).cloned().collect();
        (own, shared)
    };
    let (want_own, want_shared) = split(want);
    let (got_own, got_shared) = split(got);
    for l in want_shared.difference(&got_shared) {
        out.push(format!("{table}: only in explain: {l}"));
    }
    for l in got_shared.difference(&want_shared) {
        out.push(format!("{table}: only in iptables-save: {l}"));
    }
    let chains: BTreeSet<&str> = want_own.iter().chain(&got_own).map(|l| chain(l)).collect();
    for c in chains {
        let w: Vec<&String> = want_own.iter().filter(|l| chain(l) == c).collect();
        let g: Vec<&String> = got_own.iter().filter(|l| chain(l) == c).collect();
        if w != g {
            out.push(format!(
                "{table}: chain {c} differs:\n  explain:\n    {}\n  iptables-save:\n    {}",
                w.iter()
                    .map(|s| s.as_str())
                    .collect::<Vec<_>>()
                    .join("\n    "),
                g.iter()
                    .map(|s| s.as_str())
                    .collect::<Vec<_>>()
                    .join("\n    ")
            ));
        }
    }
    out
}

/// `explain ns/name -o json`'s IPv4 rule set for `node`: (filter, nat).
async fn explained(
    cp: &ControlPlane,
    ns: &str,
    name: &str,
    node: &str,
) -> Result<(Vec<String>, Vec<String>)> {
    let out = tokio::process::Command::new(manager_binary())
        .args([
            "explain",
            &format!("{ns}/{name}"),
            "-o",
            "json",
            "--kubeconfig",
        ])
        .arg(&cp.kubeconfig)
        .output()
        .await?;
    if !out.status.success() {
        bail!(
            "explain {ns}/{name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let v: Value = serde_json::from_slice(&out.stdout)?;
    let set = v["iptables"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|s| {
            s["family"] == "IPv4"
                && (s["every_node"] == true
                    || s["nodes"]
                        .as_array()
                        .is_some_and(|n| n.iter().any(|x| x == node)))
        })
        .ok_or_else(|| {
            anyhow!(
                "explain {ns}/{name}: no IPv4 rule set for {node}: {}",
                v["iptables"]
            )
        })?;
    let lines = |k: &str| -> Vec<String> {
        set[k]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|l| l.as_str().map(str::to_string))
            .collect()
    };
    Ok((lines("filter"), lines("nat")))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn explain_rules_equal_iptables_save() -> Result<()> {
    let _serial = SERIAL.lock().await;
    let cp = cluster::control_plane().await?;
    // No cluster CIDR (explain leaves out its masquerade and pod short-circuit rules) and no
    // localhost NodePorts: the flags explain assumes. Load-balancer traffic is masqueraded
    // all the same, which is what the test sends to see kube-proxy synced.
    let s = setup(
        cp,
        "rules",
        ("iptables", Slices::Ours),
        &["--iptables-localhost-nodeports=false"],
    )
    .await?;
    let (c, ns) = (&s.client, s.ns.as_str());
    let both = ["pod-a", "pod-b"];
    let cases = [
        ("web", web_spec("ClusterIP", &[("app", "web")], json!({}))),
        ("web-np", web_spec("NodePort", &[("app", "web")], json!({}))),
        (
            "web-local",
            web_spec(
                "NodePort",
                &[("app", "web")],
                json!({"externalTrafficPolicy": "Local"}),
            ),
        ),
        (
            "a-local",
            web_spec(
                "LoadBalancer",
                &[("pod", "pod-a")],
                json!({"externalTrafficPolicy": "Local"}),
            ),
        ),
        (
            "web-lb",
            web_spec("LoadBalancer", &[("app", "web")], json!({})),
        ),
        (
            "web-sticky",
            web_spec(
                "ClusterIP",
                &[("app", "web")],
                json!({"sessionAffinity": "ClientIP"}),
            ),
        ),
        (
            "nothing",
            web_spec("ClusterIP", &[("app", "none")], json!({})),
        ),
    ];
    for (name, spec) in &cases {
        cluster::service(c, ns, name, spec.clone()).await?;
    }
    // kube-proxy has synced once the last Services carry traffic.
    let lb = cluster::lb_address(c, ns, "web-lb").await?;
    wait_answers(&s.net, &format!("{lb}:80"), &both).await?;
    cluster::lb_address(c, ns, "a-local").await?;
    let node_ns = s.net.ns("node1");
    let mut mismatches = vec![];
    for (name, _) in &cases {
        let last = std::sync::Mutex::new(vec![]);
        let r = wait_for(
            &format!("explain's rules for {name} to equal iptables-save"),
            T,
            || async {
                let (filter, nat) = explained(cp, ns, name, &s.nodes[0]).await.ok()?;
                let f = net::exec(&node_ns, &["iptables-save", "-t", "filter"]).ok()?;
                let n = net::exec(&node_ns, &["iptables-save", "-t", "nat"]).ok()?;
                let mut d = diff("filter", &filter, &service_rules(&f, ns, name));
                d.extend(diff("nat", &nat, &service_rules(&n, ns, name)));
                let done = d.is_empty();
                *last.lock().unwrap_or_else(|e| e.into_inner()) = d;
                done.then_some(())
            },
        )
        .await;
        if r.is_err() {
            let d = last.lock().unwrap_or_else(|e| e.into_inner()).clone();
            mismatches.push(format!("{ns}/{name} on {}:\n{}", s.nodes[0], d.join("\n")));
        } else {
            eprintln!("datapath\texplain-rules\t{name}\tequal");
        }
    }
    if !mismatches.is_empty() {
        bail!(
            "explain's rules differ from iptables-save:\n{}",
            mismatches.join("\n\n")
        );
    }
    Ok(())
}
