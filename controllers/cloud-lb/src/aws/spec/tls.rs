//! TLS listeners, as cloud-provider-aws reads them for NLBs: with
//! `aws-load-balancer-ssl-cert` set, each TCP port named by `aws-load-balancer-ssl-ports`
//! (numbers or port names, comma-separated; absent, empty or `*` means every port) gets a TLS
//! listener with that certificate and `aws-load-balancer-ssl-negotiation-policy` (else ELBv2's
//! default policy). Targets stay TCP (the load balancer terminates TLS). Without a certificate
//! the other two annotations change nothing, as upstream.

use std::collections::BTreeSet;

use k8s_openapi::api::core::v1::Service;

use super::annotations::{ann, bad};
use crate::provider::ProviderError;

/// A listener's TLS settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tls {
    /// The certificate's ARN (ACM or IAM).
    pub certificate: String,
    /// The security policy, when the Service names one (else the load balancer's default, which
    /// is then never compared).
    pub policy: Option<String>,
}

/// Which ports get TLS.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(super) struct TlsPorts {
    all: bool,
    numbers: BTreeSet<i32>,
    names: BTreeSet<String>,
}

impl TlsPorts {
    /// Whether the Service port `port` (named `name`) is a TLS port.
    pub(super) fn covers(&self, port: i32, name: Option<&str>) -> bool {
        self.all || self.numbers.contains(&port) || name.is_some_and(|n| self.names.contains(n))
    }
}

/// The Service's TLS settings and ports, or `None` without a certificate.
pub(super) fn tls(svc: &Service) -> Result<Option<(Tls, TlsPorts)>, ProviderError> {
    let Some(cert) = ann(svc, "ssl-cert").filter(|c| !c.is_empty()) else {
        return Ok(None);
    };
    if !cert.starts_with("arn:") {
        return Err(bad(
            "ssl-cert",
            cert,
            "expected a certificate ARN (arn:aws:acm:... or arn:aws:iam:...)",
        ));
    }
    let policy = ann(svc, "ssl-negotiation-policy")
        .filter(|p| !p.is_empty())
        .map(str::to_string);
    let mut ports = TlsPorts::default();
    match ann(svc, "ssl-ports") {
        None | Some("") | Some("*") => ports.all = true,
        Some(v) => {
            for item in v.split(',').map(str::trim).filter(|s| !s.is_empty()) {
                match item.parse::<i32>() {
                    Ok(n) => {
                        ports.numbers.insert(n);
                    }
                    Err(_) => {
                        ports.names.insert(item.to_string());
                    }
                }
            }
        }
    }
    Ok(Some((
        Tls {
            certificate: cert.to_string(),
            policy,
        },
        ports,
    )))
}
