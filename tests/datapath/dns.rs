//! DNS records beyond A and SRV, asked of CoreDNS (kubernetes plugin) by the client: AAAA for
//! a dual-stack headless Service (one per ready endpoint), A and AAAA for an endpoint's
//! hostname (pods a and b have `hostname: <name>` and `subdomain: web-headless`, which our
//! slices carry as the endpoint's `hostname`), and the CNAME of an ExternalName Service.

use std::time::Instant;

use anyhow::Result;
use serde_json::json;
use test_support::wait_for;

use crate::cluster::{self, T};
use crate::scenarios::{Row, Setup};

/// CoreDNS, in node 1's namespace.
const SERVER: &str = "10.0.0.11:53";

/// Waits until the client's `qtype` query for `name` gives exactly `want` (sorted).
async fn wait_records(s: &Setup, qtype: &str, name: &str, mut want: Vec<String>) -> Result<()> {
    want.sort();
    wait_for(&format!("{name} {qtype} {want:?}"), T, || async {
        (s.net.client_dns(qtype, name, SERVER).await == want).then_some(())
    })
    .await?;
    eprintln!("datapath\tdns\t{name}\t{qtype}\t{want:?}");
    Ok(())
}

/// The `dns-records` row (after basic.rs made the dual-stack headless `web-headless`).
pub async fn scenario(s: &Setup, rows: &mut Vec<Row>) -> Result<()> {
    let (c, ns) = (&s.client, s.ns.as_str());
    let t = Instant::now();
    cluster::service(
        c,
        ns,
        "ext",
        json!({"type": "ExternalName", "externalName": "backend.example.internal"}),
    )
    .await?;
    let r = async {
        let headless = format!("web-headless.{ns}.svc.cluster.local");
        let v6: Vec<String> = s.pods[..2].iter().map(|p| p.ip6.clone()).collect();
        wait_records(s, "AAAA", &headless, v6).await?;
        let (a, name) = (&s.pods[0], format!("pod-a.{headless}"));
        wait_records(s, "A", &name, vec![a.ip.clone()]).await?;
        wait_records(s, "AAAA", &name, vec![a.ip6.clone()]).await?;
        let ext = format!("ext.{ns}.svc.cluster.local");
        wait_records(s, "CNAME", &ext, vec!["backend.example.internal".into()]).await?;
        Ok(t.elapsed())
    };
    rows.push(Row {
        scenario: "dns-records",
        result: r.await,
    });
    Ok(())
}
