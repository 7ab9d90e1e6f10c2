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

/// CoreDNS's SRV answer from its candidates (target, port): each gets floor(100 / n) of the
/// weight, n counting every candidate, and a repeated (target, port) is then dropped (so a
/// dual-stack ClusterIP Service answers with one record of weight 50).
fn srv_records(owner: &str, candidates: &[(String, i32)]) -> Vec<DnsRecord> {
    let w = 100 / candidates.len().max(1);
    let mut seen: Vec<&(String, i32)> = vec![];
    let mut out = vec![];
    for c in candidates {
        if seen.contains(&c) {
            continue;
        }
        seen.push(c);
        out.push(DnsRecord {
            name: owner.to_string(),
            type_: "SRV".into(),
            value: format!("0 {w} {} {}", c.1, c.0),
        });
    }
    out
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
        for ip in &ips {
            out.push(rec(&fqdn, addr_type(ip), ip.to_string()));
        }
        for p in ports {
            let Some(pn) = p.name.as_deref().filter(|n| !n.is_empty()) else {
                continue;
            };
            let proto = p.protocol.as_deref().unwrap_or("TCP").to_ascii_lowercase();
            // One candidate per cluster IP, all naming the Service.
            let candidates: Vec<(String, i32)> =
                ips.iter().map(|_| (fqdn.clone(), p.port)).collect();
            out.extend(srv_records(&format!("_{pn}._{proto}.{fqdn}"), &candidates));
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
        // Every ready address is a candidate (dual-stack pods twice), before de-duplication.
        let candidates: Vec<(String, i32)> = ready
            .iter()
            .filter_map(|e| {
                e.ports
                    .iter()
                    .find(|(n, pr, _)| n == pn && pr.eq_ignore_ascii_case(proto))
                    .map(|(_, _, port)| (format!("{}.{fqdn}", endpoint_label(e)), *port))
            })
            .collect();
        let owner = format!("_{pn}._{}.{fqdn}", proto.to_ascii_lowercase());
        out.extend(srv_records(&owner, &candidates));
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
    fn dual_stack_srv_weights_count_every_candidate() {
        let mut s = svc("ClusterIP", Some("10.96.3.4"), &[(Some("http"), 80, "TCP")]);
        if let Some(sp) = s.spec.as_mut() {
            sp.cluster_ips = Some(vec!["10.96.3.4".into(), "fd00::4".into()]);
        }
        let got = records(&s, "cluster.local", &[]);
        assert_eq!(
            triples(&got),
            vec![
                ("web.shop.svc.cluster.local", "A", "10.96.3.4"),
                ("web.shop.svc.cluster.local", "AAAA", "fd00::4"),
                (
                    "_http._tcp.web.shop.svc.cluster.local",
                    "SRV",
                    "0 50 80 web.shop.svc.cluster.local"
                ),
            ]
        );
        // Headless: a dual-stack pod with a hostname is one target, counted twice.
        let mut h = svc("ClusterIP", Some("None"), &[(Some("http"), 80, "TCP")]);
        if let Some(sp) = h.spec.as_mut() {
            sp.cluster_ips = None;
        }
        let port = vec![("http".to_string(), "TCP".to_string(), 8080)];
        let ep = |ip: &str, host: Option<&str>| DnsEndpoint {
            ip: ip.into(),
            hostname: host.map(Into::into),
            ports: port.clone(),
        };
        let eps = [
            ep("10.244.1.2", Some("web-0")),
            ep("fd00:10::2", Some("web-0")),
            ep("10.244.1.3", None),
        ];
        let srv: Vec<String> = records(&h, "cluster.local", &eps)
            .into_iter()
            .filter(|r| r.type_ == "SRV")
            .map(|r| r.value)
            .collect();
        assert_eq!(
            srv,
            vec![
                "0 33 8080 web-0.web.shop.svc.cluster.local",
                "0 33 8080 10-244-1-3.web.shop.svc.cluster.local"
            ]
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
