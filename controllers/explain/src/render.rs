//! The text form of an [`Explanation`], for people; `-o json` prints the value itself.

use std::fmt::Write;

use crate::Explanation;
use crate::chain::{EndpointState, PortChain};

fn endpoint_line(e: &EndpointState) -> String {
    let mut s = e.address.clone();
    let mut who = vec![];
    if let Some(p) = &e.pod {
        who.push(format!("pod {p}"));
    }
    if let Some(n) = &e.node {
        who.push(format!("on {n}"));
    }
    if !who.is_empty() {
        s.push_str(&format!(" ({})", who.join(" ")));
    }
    let state = if e.ready {
        "ready"
    } else if e.serving && e.terminating {
        "terminating, still serving"
    } else if e.terminating {
        "terminating"
    } else {
        "not ready"
    };
    s.push_str(": ");
    s.push_str(state);
    if e.routed && !e.ready {
        s.push_str(", still routed (no ready endpoint left)");
    }
    if let Some(w) = &e.why {
        s.push_str(&format!(": {w}"));
    }
    s
}

fn port_block(out: &mut String, p: &PortChain) {
    let name = if p.name.is_empty() {
        String::new()
    } else {
        format!("{} ", p.name)
    };
    let _ = writeln!(
        out,
        "  {name}{}/{} -> targetPort {}{}",
        p.port,
        p.protocol,
        p.target_port,
        p.node_port
            .map(|n| format!(", nodePort {n}"))
            .unwrap_or_default()
    );
    let _ = writeln!(out, "    {}", p.summary);
    if !p.load_balancer.is_empty() {
        let _ = writeln!(out, "    load balancer: {}", p.load_balancer.join(", "));
    }
    if !p.nodes.is_empty() {
        let _ = writeln!(out, "    nodes:");
        for n in &p.nodes {
            let addr = n.address.clone().unwrap_or_else(|| "(no address)".into());
            let mut line = format!("      {addr} ({})", n.node);
            if let Some(note) = &n.note {
                line.push_str(&format!(": {note}"));
            }
            let _ = writeln!(out, "{line}");
        }
    }
    if !p.cluster_ips.is_empty() {
        let _ = writeln!(out, "    cluster IP: {}", p.cluster_ips.join(", "));
    }
    if p.endpoints.is_empty() {
        let _ = writeln!(out, "    endpoints: none");
    } else {
        let _ = writeln!(out, "    endpoints:");
        for e in &p.endpoints {
            let _ = writeln!(out, "      {}", endpoint_line(e));
        }
    }
}

/// How many rule sets the text shows: with Local traffic policies every node can differ, and
/// a cluster has thousands.
pub const MAX_TEXT_RULE_SETS: usize = 10;

/// Renders `x` as text.
pub fn text(x: &Explanation) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "Service {}/{} ({})", x.namespace, x.name, x.type_);
    if let Some(n) = &x.external_name {
        let _ = writeln!(out, "  externalName: {n}");
    }
    if !x.cluster_ips.is_empty() {
        let _ = writeln!(out, "  cluster IPs: {}", x.cluster_ips.join(", "));
    }
    match &x.selector {
        Some(s) => {
            let sel: Vec<String> = s.iter().map(|(k, v)| format!("{k}={v}")).collect();
            let _ = writeln!(out, "  selector: {}", sel.join(","));
        }
        None if x.type_ != "ExternalName" => {
            let _ = writeln!(out, "  selector: (none: endpoints are managed by hand)");
        }
        None => {}
    }
    for (label, v) in [
        ("externalTrafficPolicy", &x.external_traffic_policy),
        ("internalTrafficPolicy", &x.internal_traffic_policy),
        ("loadBalancerClass", &x.load_balancer_class),
    ] {
        if let Some(v) = v {
            let _ = writeln!(out, "  {label}: {v}");
        }
    }
    for i in &x.load_balancer {
        let addr =
            i.ip.clone()
                .or_else(|| i.hostname.clone())
                .unwrap_or_default();
        let mode = i
            .ip_mode
            .as_deref()
            .map(|m| format!(" (ipMode {m})"))
            .unwrap_or_default();
        let _ = writeln!(out, "  load balancer: {addr}{mode}");
    }
    if let Some(s) = x.session_affinity_seconds {
        let _ = writeln!(out, "  sessionAffinity: ClientIP ({s}s)");
    }

    let _ = writeln!(out, "\nProblems:");
    if x.problems.is_empty() {
        let _ = writeln!(out, "  none found");
    }
    for p in &x.problems {
        let _ = writeln!(out, "  {}: {}", p.reason, p.message);
    }

    if !x.ports.is_empty() {
        let _ = writeln!(out, "\nChain per port:");
        for p in &x.ports {
            port_block(&mut out, p);
        }
    }

    let troubled: Vec<_> = x.pods.iter().filter(|p| !p.why.is_empty()).collect();
    if !x.pods.is_empty() {
        let _ = writeln!(
            out,
            "\nPods: {} ({} ready)",
            x.pods.len(),
            x.pods.iter().filter(|p| p.ready).count()
        );
        for p in troubled {
            let _ = writeln!(out, "  {}: {}", p.name, p.why.join("; "));
        }
    }

    if !x.iptables.is_empty() {
        let _ = writeln!(
            out,
            "\nkube-proxy rules (iptables mode, as iptables-save prints them):"
        );
        for rs in x.iptables.iter().take(MAX_TEXT_RULE_SETS) {
            let tool = if rs.family == "IPv6" {
                "ip6tables"
            } else {
                "iptables"
            };
            let whom = if rs.every_node {
                "every node".to_string()
            } else if rs.nodes.len() == 1 {
                format!("node {}", rs.nodes[0])
            } else {
                format!("nodes {}", rs.nodes.join(", "))
            };
            let _ = writeln!(out, "  # {tool}-save, on {whom}");
            for (table, lines) in [("filter", &rs.filter), ("nat", &rs.nat)] {
                if lines.is_empty() {
                    continue;
                }
                let _ = writeln!(out, "  *{table}");
                for l in lines {
                    let _ = writeln!(out, "  {l}");
                }
            }
        }
    }

    if x.iptables.len() > MAX_TEXT_RULE_SETS {
        let _ = writeln!(
            out,
            "  # ... {} more sets of nodes with other rules (-o json has them all)",
            x.iptables.len() - MAX_TEXT_RULE_SETS
        );
    }

    let _ = writeln!(out, "\nDNS:");
    if x.dns.is_empty() {
        let _ = writeln!(out, "  no records");
    }
    for r in &x.dns {
        let _ = writeln!(out, "  {} {} {}", r.name, r.type_, r.value);
    }

    if !x.env.is_empty() {
        let _ = writeln!(
            out,
            "\nEnvironment of pods in {} started after the Service (enableServiceLinks):",
            x.namespace
        );
        for e in &x.env {
            let _ = writeln!(out, "  {}={}", e.name, e.value);
        }
    }

    let _ = writeln!(out, "\nConditions:");
    if x.conditions.is_empty() {
        let _ = writeln!(out, "  none");
    }
    for c in &x.conditions {
        let _ = writeln!(
            out,
            "  {} {} {} (since {}): {}",
            c.type_, c.status, c.reason, c.last_transition_time, c.message
        );
    }

    let _ = writeln!(out, "\nEvents:");
    if x.events.is_empty() {
        let _ = writeln!(out, "  none (Events expire after an hour)");
    }
    for e in &x.events {
        let when = e.last_seen.clone().unwrap_or_else(|| "-".into());
        let count = if e.count > 1 {
            format!(" (x{})", e.count)
        } else {
            String::new()
        };
        let _ = writeln!(
            out,
            "  {when} {} {}{count}: {}",
            e.type_, e.reason, e.message
        );
    }

    if !x.notes.is_empty() {
        let _ = writeln!(out, "\nNotes:");
        for n in &x.notes {
            let _ = writeln!(out, "  {n}");
        }
    }
    out
}
