//! The Services of every kind on pods a (node 1) and b (node 2): ClusterIP, DNS through
//! CoreDNS, NodePort, `externalTrafficPolicy: Local`, LoadBalancer, ClientIP session affinity,
//! `trafficDistribution`, a selector-less Service's mirrored slice and readiness flips.

use std::time::Instant;

use anyhow::{Result, bail};
use serde_json::json;
use test_support::{set_pod_status, wait_for};

use crate::cluster::{self, T, web_spec};
use crate::net;
use crate::scenarios::{Row, Setup, round, wait_answers, wait_silent};

/// The scenarios on pods a and b, in order; the last ones flip pod b's readiness.
pub async fn run(s: &Setup, rows: &mut Vec<Row>) -> Result<()> {
    let (c, ns) = (&s.client, s.ns.as_str());
    let both = ["pod-a", "pod-b"];
    let (n1, n2) = ("10.0.0.11", "10.0.0.12");

    // ClusterIP: both pods answer through node 1's rules.
    let web = cluster::service(
        c,
        ns,
        "web",
        web_spec("ClusterIP", &[("app", "web")], json!({})),
    )
    .await?;
    let vip = format!("{}:80", cluster::cluster_ip(&web)?);
    rows.push(Row {
        scenario: "clusterip",
        result: wait_answers(&s.net, &vip, &both).await,
    });

    // DNS: CoreDNS answers the Service's name with its ClusterIP, and traffic to the name
    // reaches the pods; a headless Service's name gives one address per ready endpoint.
    let t = Instant::now();
    let r = async {
        let name = format!("web.{ns}.svc.cluster.local");
        let want = vec![cluster::cluster_ip(&web)?];
        wait_for(&format!("{name} resolving to {want:?}"), T, || async {
            (s.net.client_resolve(&name).await == want).then_some(())
        })
        .await?;
        wait_answers(&s.net, &format!("{name}:80"), &both).await?;
        // SRV for the named port: port 80 at the Service's name.
        let srv = format!("_http._tcp.{name}");
        let want = vec![format!("80 {name}")];
        wait_for(&format!("{srv} SRV {want:?}"), T, || async {
            (s.net.client_dns("SRV", &srv, "10.0.0.11:53").await == want).then_some(())
        })
        .await?;
        // Dual-stack, for the AAAA records dns.rs asks for.
        let extra = json!({"clusterIP": "None", "ipFamilyPolicy": "RequireDualStack",
            "ipFamilies": ["IPv4", "IPv6"]});
        let spec = web_spec("ClusterIP", &[("app", "web")], extra);
        cluster::service(c, ns, "web-headless", spec).await?;
        let name = format!("web-headless.{ns}.svc.cluster.local");
        // Pods a and b are the `app: web` ones.
        let mut want: Vec<String> = s.pods[..2].iter().map(|p| p.ip.clone()).collect();
        want.sort();
        wait_for(&format!("{name} resolving to {want:?}"), T, || async {
            (s.net.client_resolve(&name).await == want).then_some(())
        })
        .await?;
        eprintln!("datapath\tdns\t{name}\t{want:?}");
        Ok(t.elapsed())
    };
    rows.push(Row {
        scenario: "dns-coredns",
        result: r.await,
    });

    // NodePort: each node forwards to both pods.
    let np = cluster::service(
        c,
        ns,
        "web-np",
        web_spec("NodePort", &[("app", "web")], json!({})),
    )
    .await?;
    let port = cluster::node_port(&np)?;
    let t = Instant::now();
    let r = async {
        wait_answers(&s.net, &format!("{n1}:{port}"), &both).await?;
        wait_answers(&s.net, &format!("{n2}:{port}"), &both).await?;
        Ok(t.elapsed())
    };
    rows.push(Row {
        scenario: "nodeport",
        result: r.await,
    });

    // externalTrafficPolicy Local: a node answers only with its own pod; a node without one
    // drops the traffic.
    let local = cluster::service(
        c,
        ns,
        "web-local",
        web_spec(
            "NodePort",
            &[("app", "web")],
            json!({"externalTrafficPolicy": "Local"}),
        ),
    )
    .await?;
    let port = cluster::node_port(&local)?;
    let only_a = cluster::service(
        c,
        ns,
        "a-local",
        web_spec(
            "NodePort",
            &[("pod", "pod-a")],
            json!({"externalTrafficPolicy": "Local"}),
        ),
    )
    .await?;
    let port_a = cluster::node_port(&only_a)?;
    let t = Instant::now();
    let r = async {
        wait_answers(&s.net, &format!("{n1}:{port}"), &["pod-a"]).await?;
        wait_answers(&s.net, &format!("{n2}:{port}"), &["pod-b"]).await?;
        wait_answers(&s.net, &format!("{n1}:{port_a}"), &["pod-a"]).await?;
        wait_silent(&s.net, &format!("{n2}:{port_a}")).await?;
        Ok(t.elapsed())
    };
    rows.push(Row {
        scenario: "external-traffic-policy-local",
        result: r.await,
    });

    // LoadBalancer: the local pool's address, routed by the client to node 1. Then each hop
    // of the chain on its own (node 2's NodePort, the ClusterIP), printed with the addresses
    // and, in iptables mode, node 1's rules for the Service (the README's chain comes from it).
    let t = Instant::now();
    let lb = cluster::service(
        c,
        ns,
        "web-lb",
        web_spec("LoadBalancer", &[("app", "web")], json!({})),
    )
    .await?;
    let r = async {
        let addr = cluster::lb_address(c, ns, "web-lb").await?;
        wait_answers(&s.net, &format!("{addr}:80"), &both).await?;
        let elapsed = t.elapsed();
        let (port, vip) = (cluster::node_port(&lb)?, cluster::cluster_ip(&lb)?);
        wait_answers(&s.net, &format!("{n2}:{port}"), &both).await?;
        wait_answers(&s.net, &format!("{vip}:80"), &both).await?;
        let pods: Vec<String> = s.pods[..2]
            .iter()
            .map(|p| format!("{} {}:8080", p.name, p.ip))
            .collect();
        eprintln!(
            "datapath\tchain\t{addr}:80 -> {n1}:{port} | {n2}:{port} -> {vip}:80 -> {}",
            pods.join(", ")
        );
        if let Ok(nat) = net::exec(&s.net.ns("node1"), &["iptables-save", "-t", "nat"]) {
            let needle = format!("{ns}/web-lb:http");
            for l in nat.lines().filter(|l| l.contains(&needle)) {
                eprintln!("datapath\tchain-rule\t{l}");
            }
        }
        Ok(elapsed)
    };
    rows.push(Row {
        scenario: "loadbalancer",
        result: r.await,
    });

    // ClientIP session affinity: with both pods ready, one client keeps one pod.
    let sticky = cluster::service(
        c,
        ns,
        "web-sticky",
        web_spec(
            "ClusterIP",
            &[("app", "web")],
            json!({"sessionAffinity": "ClientIP"}),
        ),
    )
    .await?;
    let addr = format!("{}:80", cluster::cluster_ip(&sticky)?);
    let t = Instant::now();
    let r = async {
        let first = wait_for("the sticky Service answering", T, || async {
            round(&s.net, &addr, 1, 1000)
                .await
                .into_iter()
                .find(|g| !g.starts_with("ERR"))
        })
        .await?;
        let got = round(&s.net, &addr, 12, 1000).await;
        if got.iter().any(|g| *g != first) {
            bail!("affinity to {first} not kept: {got:?}");
        }
        Ok(t.elapsed())
    };
    rows.push(Row {
        scenario: "session-affinity-clientip",
        result: r.await,
    });

    // trafficDistribution PreferSameZone: our slices carry zone hints, so node 1 (zone-1,
    // where the client's traffic enters) sends it only to pod a, in the same zone.
    let spec = web_spec(
        "ClusterIP",
        &[("app", "web")],
        json!({"trafficDistribution": "PreferSameZone"}),
    );
    let zonal = cluster::service(c, ns, "web-zonal", spec).await?;
    let addr = format!("{}:80", cluster::cluster_ip(&zonal)?);
    let t = Instant::now();
    rows.push(Row {
        scenario: "prefer-same-zone",
        result: wait_answers(&s.net, &addr, &["pod-a"])
            .await
            .map(|_| t.elapsed()),
    });

    // PreferSameNode: node hints keep node 1's traffic on its own pod.
    let spec = web_spec(
        "ClusterIP",
        &[("app", "web")],
        json!({"trafficDistribution": "PreferSameNode"}),
    );
    let same_node = cluster::service(c, ns, "web-same-node", spec).await?;
    let addr = format!("{}:80", cluster::cluster_ip(&same_node)?);
    let t = Instant::now();
    rows.push(Row {
        scenario: "prefer-same-node",
        result: wait_answers(&s.net, &addr, &["pod-a"])
            .await
            .map(|_| t.elapsed()),
    });

    // A selector-less Service with hand-made Endpoints: traffic follows the mirrored slice.
    let manual = cluster::service(
        c,
        ns,
        "manual",
        json!({"ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}]}),
    )
    .await?;
    let addr = format!("{}:80", cluster::cluster_ip(&manual)?);
    let t = Instant::now();
    cluster::endpoints(c, ns, "manual", &[&s.pods[1].ip]).await?;
    let r = async {
        wait_answers(&s.net, &addr, &["pod-b"]).await?;
        Ok(t.elapsed())
    };
    rows.push(Row {
        scenario: "selectorless-mirrored",
        result: r.await,
    });

    // Readiness: pod b turns unready (traffic to it stops), then ready again (it resumes).
    let t = Instant::now();
    set_pod_status(c, ns, "pod-b", false, &s.pods[1].ips()).await?;
    rows.push(Row {
        scenario: "readiness-unready",
        result: wait_answers(&s.net, &vip, &["pod-a"])
            .await
            .map(|_| t.elapsed()),
    });
    let t = Instant::now();
    set_pod_status(c, ns, "pod-b", true, &s.pods[1].ips()).await?;
    rows.push(Row {
        scenario: "readiness-ready-again",
        result: wait_answers(&s.net, &vip, &both).await.map(|_| t.elapsed()),
    });
    Ok(())
}
