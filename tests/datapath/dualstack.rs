//! Dual-stack: the control plane has an IPv4 and an IPv6 Service range, pods and nodes carry
//! an address of each family, and kube-proxy runs both families (`ip6tables` beside
//! `iptables`, or the `ip6` nftables family). A `RequireDualStack` NodePort Service gets one
//! ClusterIP per family; our slices (one per family) make both ClusterIPs and the IPv6 NodePort
//! answer with both pods.

use std::time::Instant;

use anyhow::{Result, anyhow};
use serde_json::json;

use crate::cluster::{self, web_spec};
use crate::scenarios::{Row, Setup, wait_answers};

/// The `dual-stack` row: both families of a dual-stack Service carry traffic to pods a and b.
pub async fn scenario(s: &Setup, rows: &mut Vec<Row>) -> Result<()> {
    let (c, ns) = (&s.client, s.ns.as_str());
    let both = ["pod-a", "pod-b"];
    let t = Instant::now();
    let svc = cluster::service(
        c,
        ns,
        "web-dual",
        web_spec(
            "NodePort",
            &[("app", "web")],
            json!({"ipFamilyPolicy": "RequireDualStack", "ipFamilies": ["IPv4", "IPv6"]}),
        ),
    )
    .await?;
    let ips = svc
        .spec
        .as_ref()
        .and_then(|s| s.cluster_ips.clone())
        .unwrap_or_default();
    let v6 = ips
        .iter()
        .find(|ip| ip.contains(':'))
        .ok_or_else(|| anyhow!("no IPv6 ClusterIP in {ips:?}"))?;
    let v4 = cluster::cluster_ip(&svc)?;
    let port = cluster::node_port(&svc)?;
    let r = async {
        wait_answers(&s.net, &format!("[{v6}]:80"), &both).await?;
        wait_answers(&s.net, &format!("[fd00::12]:{port}"), &both).await?;
        wait_answers(&s.net, &format!("{v4}:80"), &both).await?;
        eprintln!("datapath\tdual-stack\tweb-dual\t{v4} [{v6}] nodePort {port}");
        Ok(t.elapsed())
    };
    rows.push(Row {
        scenario: "dual-stack",
        result: r.await,
    });
    Ok(())
}
