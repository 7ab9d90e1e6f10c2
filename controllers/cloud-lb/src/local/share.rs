//! Address sharing between Services, with MetalLB's rules: Services that all carry
//! [`ALLOW_SHARED_IP_ANNOTATION`] with the same key may hold one address as long as no two of
//! them use the same port and protocol, and, for `externalTrafficPolicy: Local`, only with
//! Services of that policy and the same selector (their traffic must reach the same pods on the
//! nodes that announce the address). Pure: the plan asks [`check`] before an address gets
//! another holder, and [`conflicts`] finds holders whose Service changed since.

use std::collections::BTreeMap;
use std::net::IpAddr;

use k8s_openapi::api::core::v1::Service;

use super::plan::{Book, Holder, Refusal};

/// Annotation whose value is the sharing key (MetalLB's `metallb.io/allow-shared-ip`).
pub const ALLOW_SHARED_IP_ANNOTATION: &str = "service-controller-manager.io/allow-shared-ip";

/// What a Service that allows sharing brings to an address.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Share {
    /// The sharing key (the annotation's value).
    pub key: String,
    /// Empty for `externalTrafficPolicy: Cluster`; for `Local`, the selector (sorted
    /// `k=v,...`), so that only Services sending traffic to the same pods share.
    pub backend: String,
    /// `(protocol, port)` of each of its ports.
    pub ports: Vec<(String, i32)>,
}

/// The Service's sharing terms, if it allows sharing (an empty key does not).
pub fn of(svc: &Service) -> Option<Share> {
    let key = svc
        .metadata
        .annotations
        .as_ref()?
        .get(ALLOW_SHARED_IP_ANNOTATION)?
        .trim();
    if key.is_empty() {
        return None;
    }
    let spec = svc.spec.as_ref();
    let local = spec.and_then(|s| s.external_traffic_policy.as_deref()) == Some("Local");
    let backend = if local {
        let sel: BTreeMap<String, String> = spec
            .and_then(|s| s.selector.clone())
            .unwrap_or_default()
            .into_iter()
            .collect();
        let pairs: Vec<String> = sel.iter().map(|(k, v)| format!("{k}={v}")).collect();
        // Never empty for Local: a selector-less Local Service differs from every Cluster one.
        format!("Local:{}", pairs.join(","))
    } else {
        String::new()
    };
    let ports = spec
        .and_then(|s| s.ports.as_ref())
        .into_iter()
        .flatten()
        .map(|p| (p.protocol.clone().unwrap_or_else(|| "TCP".into()), p.port))
        .collect();
    Some(Share {
        key: key.to_string(),
        backend,
        ports,
    })
}

/// Whether a Service (`uid`, sharing terms `mine`) may hold `ip` beside its other `holders`.
/// A refusal says why: [`Refusal::Held`] when either side does not allow sharing at all,
/// [`Refusal::Unshareable`] when both do but their terms clash.
pub fn check(
    ip: IpAddr,
    holders: &[Holder],
    uid: &str,
    mine: Option<&Share>,
) -> Result<(), Refusal> {
    for h in holders.iter().filter(|h| h.uid != uid) {
        let (Some(mine), Some(theirs)) = (mine, h.share.as_ref()) else {
            return Err(Refusal::Held(ip, h.who.clone()));
        };
        if let Some(why) = clash(mine, theirs) {
            return Err(Refusal::Unshareable(ip, format!("{why} {}", h.who)));
        }
    }
    Ok(())
}

/// Why two Services' terms do not let them share, ending in "by"/"of" for the other's name.
fn clash(mine: &Share, theirs: &Share) -> Option<String> {
    if mine.key != theirs.key {
        return Some(format!(
            "sharing key {:?} differs from key {:?} of",
            mine.key, theirs.key
        ));
    }
    if mine.backend != theirs.backend {
        return Some(
            "externalTrafficPolicy Local Services share only with Local Services of the same selector; not so with"
                .to_string(),
        );
    }
    mine.ports
        .iter()
        .find(|p| theirs.ports.contains(p))
        .map(|(proto, port)| format!("port {proto}/{port} is already used on it by"))
}

/// Held addresses whose holders' terms clash now (a Service changed its ports, policy or key
/// after it joined): `(address, holder, why)` for each holder that clashes with an earlier one.
/// They keep the address (addresses never move); the owner should fix the Service.
pub fn conflicts(book: &Book) -> Vec<(IpAddr, Holder, String)> {
    let mut out = vec![];
    for (ip, holders) in &book.held {
        for (i, h) in holders.iter().enumerate().skip(1) {
            if let Err(r) = check(*ip, &holders[..i], &h.uid, h.share.as_ref()) {
                let why = match r {
                    Refusal::Held(_, who) => {
                        format!("it is shared with {who} but one of them no longer allows sharing")
                    }
                    Refusal::Unshareable(_, why) => why,
                    other => format!("{other:?}"),
                };
                out.push((*ip, h.clone(), why));
            }
        }
    }
    out
}

#[cfg(test)]
#[path = "share_tests.rs"]
mod tests;
