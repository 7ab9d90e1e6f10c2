//! The environment variables the kubelet gives a container for a Service that existed when its
//! pod started (kubelet's service links): `<SVC>_SERVICE_HOST`, `<SVC>_SERVICE_PORT`,
//! `<SVC>_SERVICE_PORT_<NAME>` and the Docker-link ones (`<SVC>_PORT`,
//! `<SVC>_PORT_<port>_<PROTO>` with `_PROTO`, `_PORT`, `_ADDR`).

use k8s_openapi::api::core::v1::Service;
use serde::Serialize;

use crate::proxy::join_host_port;

/// One environment variable.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct EnvVar {
    /// Name.
    pub name: String,
    /// Value.
    pub value: String,
}

/// The kubelet's spelling of a name in a variable: upper case, `-` as `_`.
fn env_name(s: &str) -> String {
    s.replace('-', "_").to_ascii_uppercase()
}

/// The variables for `svc`, in the kubelet's order; none for a Service without a cluster IP
/// (headless, ExternalName) or without ports.
pub fn service_env(svc: &Service) -> Vec<EnvVar> {
    let Some(spec) = svc.spec.as_ref() else {
        return vec![];
    };
    let ip = spec.cluster_ip.as_deref().unwrap_or("");
    let ports = spec.ports.as_deref().unwrap_or(&[]);
    if ip.is_empty() || ip == "None" || ports.is_empty() {
        return vec![];
    }
    let prefix = env_name(svc.metadata.name.as_deref().unwrap_or(""));
    let var = |name: String, value: String| EnvVar { name, value };
    let mut out = vec![
        var(format!("{prefix}_SERVICE_HOST"), ip.to_string()),
        var(format!("{prefix}_SERVICE_PORT"), ports[0].port.to_string()),
    ];
    for p in ports {
        if let Some(n) = p.name.as_deref().filter(|n| !n.is_empty()) {
            out.push(var(
                format!("{prefix}_SERVICE_PORT_{}", env_name(n)),
                p.port.to_string(),
            ));
        }
    }
    for (i, p) in ports.iter().enumerate() {
        let proto = p.protocol.as_deref().unwrap_or("TCP");
        let lower = proto.to_ascii_lowercase();
        let url = format!("{lower}://{}", join_host_port(ip, p.port));
        if i == 0 {
            out.push(var(format!("{prefix}_PORT"), url.clone()));
        }
        let pp = format!("{prefix}_PORT_{}_{}", p.port, proto.to_ascii_uppercase());
        out.push(var(pp.clone(), url));
        out.push(var(format!("{pp}_PROTO"), lower));
        out.push(var(format!("{pp}_PORT"), p.port.to_string()));
        out.push(var(format!("{pp}_ADDR"), ip.to_string()));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{ServicePort, ServiceSpec};
    use kube::api::ObjectMeta;

    fn svc(name: &str, ip: &str, ports: &[(Option<&str>, i32, &str)]) -> Service {
        Service {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some("ns".into()),
                ..Default::default()
            },
            spec: Some(ServiceSpec {
                cluster_ip: Some(ip.into()),
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

    fn pairs(v: &[EnvVar]) -> Vec<(&str, &str)> {
        v.iter()
            .map(|e| (e.name.as_str(), e.value.as_str()))
            .collect()
    }

    #[test]
    fn named_ports_and_docker_links() {
        let s = svc(
            "my-db",
            "10.0.0.11",
            &[(Some("sql"), 5432, "TCP"), (Some("stats-udp"), 8125, "UDP")],
        );
        assert_eq!(
            pairs(&service_env(&s)),
            vec![
                ("MY_DB_SERVICE_HOST", "10.0.0.11"),
                ("MY_DB_SERVICE_PORT", "5432"),
                ("MY_DB_SERVICE_PORT_SQL", "5432"),
                ("MY_DB_SERVICE_PORT_STATS_UDP", "8125"),
                ("MY_DB_PORT", "tcp://10.0.0.11:5432"),
                ("MY_DB_PORT_5432_TCP", "tcp://10.0.0.11:5432"),
                ("MY_DB_PORT_5432_TCP_PROTO", "tcp"),
                ("MY_DB_PORT_5432_TCP_PORT", "5432"),
                ("MY_DB_PORT_5432_TCP_ADDR", "10.0.0.11"),
                ("MY_DB_PORT_8125_UDP", "udp://10.0.0.11:8125"),
                ("MY_DB_PORT_8125_UDP_PROTO", "udp"),
                ("MY_DB_PORT_8125_UDP_PORT", "8125"),
                ("MY_DB_PORT_8125_UDP_ADDR", "10.0.0.11"),
            ]
        );
    }

    #[test]
    fn unnamed_port_ipv6_and_no_cluster_ip() {
        let s = svc("web", "fd00::5", &[(None, 80, "TCP")]);
        let env = service_env(&s);
        assert_eq!(
            env[1],
            EnvVar {
                name: "WEB_SERVICE_PORT".into(),
                value: "80".into()
            }
        );
        assert!(!env.iter().any(|e| e.name.starts_with("WEB_SERVICE_PORT_")));
        assert_eq!(env[2].value, "tcp://[fd00::5]:80");
        assert!(service_env(&svc("h", "None", &[(None, 80, "TCP")])).is_empty());
        assert!(service_env(&svc("x", "", &[])).is_empty());
    }
}
