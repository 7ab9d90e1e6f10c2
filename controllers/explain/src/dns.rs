//! The records CoreDNS's kubernetes plugin serves for a Service: `<svc>.<ns>.svc.<domain>` as
//! A/AAAA of the cluster IPs (of the ready endpoints when headless) or as a CNAME (ExternalName),
//! SRV `_<port>._<proto>.<svc>.<ns>.svc.<domain>` for named ports, and for headless Services
//! one name per ready endpoint (its hostname, else its address with dashes).

use k8s_openapi::api::core::v1::Service;
use serde::Serialize;

/// One DNS record.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct DnsRecord {
    /// Owner name, without the trailing dot.
    pub name: String,
    /// `A`, `AAAA`, `CNAME` or `SRV`.
    #[serde(rename = "type")]
    pub type_: String,
    /// The data: an address, a target name, or `priority weight port target` for SRV.
    pub value: String,
}

/// A ready endpoint as CoreDNS reads it from an EndpointSlice.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DnsEndpoint {
    /// The endpoint's address.
    pub ip: String,
    /// `hostname` of the endpoint (the pod's `spec.hostname` under a matching subdomain).
    pub hostname: Option<String>,
    /// The slice's ports: (name, protocol, port).
    pub ports: Vec<(String, String, i32)>,
}

/// CoreDNS's label for an endpoint: its hostname, else its address with `.`/`:` as `-` (a
/// trailing `-` of an IPv6 address gets a `0`).
pub fn endpoint_label(e: &DnsEndpoint) -> String {
    if let Some(h) = e.hostname.as_deref().filter(|h| !h.is_empty()) {
        return h.to_string();
    }
    if e.ip.contains('.') {
        return e.ip.replace('.', "-");
    }
    let mut s = e.ip.replace(':', "-");
    if s.ends_with('-') {
        s.push('0');
    }
    s
}

fn addr_type(ip: &str) -> &'static str {
    if ip.contains(':') { "AAAA" } else { "A" }
}

/// CoreDNS's SRV weight: records of one priority share 100, each getting floor(100 / n).
fn srv_weight(n: usize) -> usize {
    100 / n.max(1)
}

/// The records of `svc` in `domain`, given its ready endpoints (only read when headless).
pub fn records(svc: &Service, domain: &str, ready: &[DnsEndpoint]) -> Vec<DnsRecord> {
    let ns = svc.metadata.namespace.as_deref().unwrap_or("");
    let name = svc.metadata.name.as_deref().unwrap_or("");
    let fqdn = format!("{name}.{ns}.svc.{}", domain.trim_end_matches('.'));
    let rec = |n: &str, t: &str, v: String| DnsRecord {
        name: n.to_string(),
        type_: t.to_string(),
        value: v,
    };
    let Some(spec) = svc.spec.as_ref() else {
        return vec![];
    };
    let mut out = vec![];
    if spec.type_.as_deref() == Some("ExternalName") {
        if let Some(target) = spec.external_name.as_deref() {
            out.push(rec(
                &fqdn,
                "CNAME",
                target.trim_end_matches('.').to_string(),
            ));
        }
        return out;
    }
    let ports = spec.ports.as_deref().unwrap_or(&[]);
    let headless = spec.cluster_ip.as_deref() == Some("None");
    if !headless {
        let mut ips: Vec<&str> = spec
            .cluster_ips
            .as_deref()
            .unwrap_or(&[])
            .iter()
            .map(String::as_str)
            .collect();
        if ips.is_empty() {
            ips.extend(spec.cluster_ip.as_deref().filter(|s| !s.is_empty()));
        }
        for ip in ips {
            out.push(rec(&fqdn, addr_type(ip), ip.to_string()));
        }
        for p in ports {
            let Some(pn) = p.name.as_deref().filter(|n| !n.is_empty()) else {
                continue;
            };
            let proto = p.protocol.as_deref().unwrap_or("TCP").to_ascii_lowercase();
            out.push(rec(
                &format!("_{pn}._{proto}.{fqdn}"),
                "SRV",
                format!("0 100 {} {fqdn}", p.port),
            ));
        }
        return out;
    }
    // Headless: the ready endpoints themselves, once per address.
    let mut seen: Vec<&str> = vec![];
    let mut eps: Vec<&DnsEndpoint> = vec![];
    for e in ready {
        if !seen.contains(&e.ip.as_str()) {
            seen.push(&e.ip);
            eps.push(e);
        }
    }
    for e in &eps {
        out.push(rec(&fqdn, addr_type(&e.ip), e.ip.clone()));
    }
    for e in &eps {
        let host = format!("{}.{fqdn}", endpoint_label(e));
        out.push(rec(&host, addr_type(&e.ip), e.ip.clone()));
    }
    for p in ports {
        let Some(pn) = p.name.as_deref().filter(|n| !n.is_empty()) else {
            continue;
        };
        let proto = p.protocol.as_deref().unwrap_or("TCP");
        let targets: Vec<(String, i32)> = eps
            .iter()
            .filter_map(|e| {
                e.ports
                    .iter()
                    .find(|(n, pr, _)| n == pn && pr.eq_ignore_ascii_case(proto))
                    .map(|(_, _, port)| (format!("{}.{fqdn}", endpoint_label(e)), *port))
            })
            .collect();
        let w = srv_weight(targets.len());
        let owner = format!("_{pn}._{}.{fqdn}", proto.to_ascii_lowercase());
        for (t, port) in targets {
            out.push(rec(&owner, "SRV", format!("0 {w} {port} {t}")));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{ServicePort, ServiceSpec};
    use kube::api::ObjectMeta;

    fn svc(type_: &str, ip: Option<&str>, ports: &[(Option<&str>, i32, &str)]) -> Service {
        Service {
            metadata: ObjectMeta {
                name: Some("web".into()),
                namespace: Some("shop".into()),
                ..Default::default()
            },
            spec: Some(ServiceSpec {
                type_: Some(type_.into()),
                cluster_ip: ip.map(Into::into),
                cluster_ips: ip.filter(|i| *i != "None").map(|i| vec![i.to_string()]),
                ports: Some(
                    ports
                        .iter()
                        .map(|(n, p, proto)| ServicePort {
                            name: n.map(Into::into),
                            port: *p,
                            protocol: Some(proto.to_string()),
                            ..Default::default()
                        })
                        .collect(),
                ),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn triples(v: &[DnsRecord]) -> Vec<(&str, &str, &str)> {
        v.iter()
            .map(|r| (r.name.as_str(), r.type_.as_str(), r.value.as_str()))
            .collect()
    }

    #[test]
    fn cluster_ip_gets_a_and_srv_for_named_ports_only() {
        let s = svc(
            "ClusterIP",
            Some("10.96.3.4"),
            &[(Some("http"), 80, "TCP"), (Some("dns"), 53, "UDP")],
        );
        assert_eq!(
            triples(&records(&s, "cluster.local", &[])),
            vec![
                ("web.shop.svc.cluster.local", "A", "10.96.3.4"),
                (
                    "_http._tcp.web.shop.svc.cluster.local",
                    "SRV",
                    "0 100 80 web.shop.svc.cluster.local"
                ),
                (
                    "_dns._udp.web.shop.svc.cluster.local",
                    "SRV",
                    "0 100 53 web.shop.svc.cluster.local"
                ),
            ]
        );
        let unnamed = svc("ClusterIP", Some("fd00::4"), &[(None, 80, "TCP")]);
        assert_eq!(
            triples(&records(&unnamed, "example.org.", &[])),
            vec![("web.shop.svc.example.org", "AAAA", "fd00::4")]
        );
    }

    #[test]
    fn external_name_is_a_cname() {
        let mut s = svc("ExternalName", None, &[]);
        if let Some(sp) = s.spec.as_mut() {
            sp.external_name = Some("db.example.com".into());
        }
        assert_eq!(
            triples(&records(&s, "cluster.local", &[])),
            vec![("web.shop.svc.cluster.local", "CNAME", "db.example.com")]
        );
    }

    #[test]
    fn headless_lists_ready_endpoints_with_hostnames_and_srv_weights() {
        let s = svc("ClusterIP", Some("None"), &[(Some("http"), 80, "TCP")]);
        let port = vec![("http".to_string(), "TCP".to_string(), 8080)];
        let eps = vec![
            DnsEndpoint {
                ip: "10.244.1.2".into(),
                hostname: Some("web-0".into()),
                ports: port.clone(),
            },
            DnsEndpoint {
                ip: "10.244.1.3".into(),
                hostname: None,
                ports: port.clone(),
            },
            DnsEndpoint {
                ip: "fd00:10::".into(),
                hostname: None,
                ports: port,
            },
        ];
        let got = records(&s, "cluster.local", &eps);
        let f = "web.shop.svc.cluster.local";
        assert_eq!(
            triples(&got),
            vec![
                (f, "A", "10.244.1.2"),
                (f, "A", "10.244.1.3"),
                (f, "AAAA", "fd00:10::"),
                ("web-0.web.shop.svc.cluster.local", "A", "10.244.1.2"),
                ("10-244-1-3.web.shop.svc.cluster.local", "A", "10.244.1.3"),
                ("fd00-10--0.web.shop.svc.cluster.local", "AAAA", "fd00:10::"),
                (
                    "_http._tcp.web.shop.svc.cluster.local",
                    "SRV",
                    "0 33 8080 web-0.web.shop.svc.cluster.local"
                ),
                (
                    "_http._tcp.web.shop.svc.cluster.local",
                    "SRV",
                    "0 33 8080 10-244-1-3.web.shop.svc.cluster.local"
                ),
                (
                    "_http._tcp.web.shop.svc.cluster.local",
                    "SRV",
                    "0 33 8080 fd00-10--0.web.shop.svc.cluster.local"
                ),
            ]
        );
        assert!(records(&s, "cluster.local", &[]).is_empty());
    }
}
