//! How kube-proxy names its chains and writes its probabilities, and how `iptables-save`
//! prints what kube-proxy wrote. Facts from kube-proxy's iptables proxier (v1.37) and from
//! iptables' own extensions; nothing here depends on a cluster.

use sha2::{Digest, Sha256};

/// kube-proxy's name of a service port: `<namespace>/<name>`, with `:<port name>` when the
/// port is named. It is the hash input, and the text of most of its rule comments.
pub fn service_port_name(namespace: &str, name: &str, port_name: &str) -> String {
    if port_name.is_empty() {
        format!("{namespace}/{name}")
    } else {
        format!("{namespace}/{name}:{port_name}")
    }
}

/// RFC 4648 base32 with the standard alphabet, as Go's `base32.StdEncoding` (padding is never
/// reached: kube-proxy keeps the first 16 characters of a 32-byte digest).
fn base32(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let mut out = String::with_capacity(bytes.len().div_ceil(5) * 8);
    let (mut acc, mut bits) = (0u32, 0u32);
    for &b in bytes {
        acc = (acc << 8) | u32::from(b);
        bits += 8;
        while bits >= 5 {
            bits -= 5;
            out.push(char::from(ALPHABET[((acc >> bits) & 31) as usize]));
        }
    }
    if bits > 0 {
        out.push(char::from(ALPHABET[((acc << (5 - bits)) & 31) as usize]));
    }
    out
}

/// The first 16 characters of base32(sha256(`input`)): kube-proxy's chain-name suffix.
fn hash16(input: &str) -> String {
    let digest = Sha256::digest(input.as_bytes());
    let mut s = base32(digest.as_slice());
    s.truncate(16);
    s
}

/// The hash shared by a service port's `KUBE-SVC-`, `KUBE-SVL-`, `KUBE-EXT-` and `KUBE-FW-`
/// chains: of the service port name followed by the lower-case protocol.
pub fn port_proto_hash(service_port_name: &str, protocol: &str) -> String {
    hash16(&format!(
        "{service_port_name}{}",
        protocol.to_ascii_lowercase()
    ))
}

/// The four per-port chains kube-proxy may create for one service port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PortChains {
    /// `KUBE-SVC-…`: every usable endpoint (Cluster traffic policy).
    pub cluster: String,
    /// `KUBE-SVL-…`: this node's endpoints (Local traffic policy).
    pub local: String,
    /// `KUBE-EXT-…`: where NodePort, load-balancer and external-IP traffic goes first.
    pub external: String,
    /// `KUBE-FW-…`: `loadBalancerSourceRanges` filtering.
    pub firewall: String,
}

impl PortChains {
    /// The chains of `service_port_name` with `protocol`.
    pub fn new(service_port_name: &str, protocol: &str) -> Self {
        let h = port_proto_hash(service_port_name, protocol);
        PortChains {
            cluster: format!("KUBE-SVC-{h}"),
            local: format!("KUBE-SVL-{h}"),
            external: format!("KUBE-EXT-{h}"),
            firewall: format!("KUBE-FW-{h}"),
        }
    }
}

/// `KUBE-SEP-…`: one endpoint's chain; the endpoint is `ip:port` (`[ip]:port` for IPv6).
pub fn endpoint_chain(service_port_name: &str, protocol: &str, endpoint: &str) -> String {
    format!(
        "KUBE-SEP-{}",
        hash16(&format!(
            "{service_port_name}{}{endpoint}",
            protocol.to_ascii_lowercase()
        ))
    )
}

/// `ip:port`, bracketing an IPv6 address, as Go's `net.JoinHostPort`.
pub fn join_host_port(ip: &str, port: i32) -> String {
    if ip.contains(':') {
        format!("[{ip}]:{port}")
    } else {
        format!("{ip}:{port}")
    }
}

/// The `--probability` kube-proxy writes for the rule that picks one of the `remaining`
/// endpoints not yet passed over: 1/`remaining`, with ten decimals (Go's `%0.10f`).
pub fn probability_written(remaining: usize) -> String {
    format!("{:.10}", 1.0 / remaining.max(1) as f64)
}

/// The same probability as `iptables-save` prints it: the statistic match keeps it as a
/// fraction of 2^31 (rounded half away from zero), and prints that back with eleven decimals.
pub fn probability_saved(remaining: usize) -> String {
    let written: f64 = probability_written(remaining).parse().unwrap_or(0.0);
    let scale = 2_147_483_648.0_f64;
    let kept = (written * scale).round();
    format!("{:.11}", kept / scale)
}

/// A word as `iptables-save` prints it: bare when only letters, digits, `_` and `-`, else in
/// double quotes with `"` and `\` escaped (every kube-proxy comment names `ns/name`, so it is
/// always quoted).
pub fn save_string(s: &str) -> String {
    let plain = !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if plain {
        return s.to_string();
    }
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        if c == '"' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    // Expected values were computed outside this code (Python's hashlib and base64.b32encode)
    // and agree with chain names published in upstream's tests and in the seed articles
    // (`default/kubernetes:https` is KUBE-SVC-NPX46M4PTMTKRN6Y on every cluster).
    #[test]
    fn chain_names_are_kube_proxys() {
        let cases = [
            (
                ("default", "kubernetes", "https", "TCP"),
                "NPX46M4PTMTKRN6Y",
            ),
            (
                ("kube-system", "kube-dns", "dns", "UDP"),
                "TCOU7JCQXEZGVUNU",
            ),
            (
                ("kube-system", "kube-dns", "dns-tcp", "TCP"),
                "ERIFXISQEP7F7OF4",
            ),
            (
                ("kube-system", "kube-dns", "metrics", "TCP"),
                "JD5MR3NA4I4DYORP",
            ),
            (("default", "nginx", "", "TCP"), "2CMXP7HKUVJN7L6M"),
            (("ns1", "svc1", "p80", "TCP"), "XPGD46QRK7WJZT7O"),
            (("ns2", "svc2", "p80", "tcp"), "GNZBNJ2PO5MGZ6GT"),
        ];
        for ((ns, name, port, proto), want) in cases {
            let spn = service_port_name(ns, name, port);
            let c = PortChains::new(&spn, proto);
            assert_eq!(c.cluster, format!("KUBE-SVC-{want}"), "{spn} {proto}");
            assert_eq!(c.local, format!("KUBE-SVL-{want}"));
            assert_eq!(c.external, format!("KUBE-EXT-{want}"));
            assert_eq!(c.firewall, format!("KUBE-FW-{want}"));
        }
        let fw = PortChains::new(&service_port_name("ns5", "svc5", "p80"), "TCP");
        assert_eq!(fw.firewall, "KUBE-FW-NUKIZ6OKUXPJNT4C");
    }

    #[test]
    fn endpoint_chains_hash_the_endpoint_too() {
        let spn = service_port_name("default", "nginx", "");
        assert_eq!(
            endpoint_chain(&spn, "TCP", "10.0.1.79:80"),
            "KUBE-SEP-XZRG5L6J3WL7H422"
        );
        assert_eq!(
            endpoint_chain(&spn, "tcp", "10.0.0.224:80"),
            "KUBE-SEP-HZXSYA2C4E7MQSH3"
        );
        let spn = service_port_name("ns1", "svc1", "p80");
        assert_eq!(
            endpoint_chain(&spn, "TCP", "10.180.0.1:80"),
            "KUBE-SEP-SXIVWICOYRO3J4NJ"
        );
    }

    #[test]
    fn base32_matches_rfc4648_vectors() {
        assert_eq!(base32(b"f"), "MY");
        assert_eq!(base32(b"fo"), "MZXQ");
        assert_eq!(base32(b"foobar"), "MZXW6YTBOI");
    }

    #[test]
    fn probabilities_as_written_and_as_saved() {
        // Written: 1/n with ten decimals. Saved: lround(p * 2^31) / 2^31 with eleven (computed
        // independently in Python; 0.33333333349 is what a node's iptables-save shows).
        let cases = [
            (2, "0.5000000000", "0.50000000000"),
            (3, "0.3333333333", "0.33333333349"),
            (4, "0.2500000000", "0.25000000000"),
            (5, "0.2000000000", "0.20000000019"),
            (6, "0.1666666667", "0.16666666651"),
            (7, "0.1428571429", "0.14285714272"),
            (10, "0.1000000000", "0.10000000009"),
            (100, "0.0100000000", "0.00999999978"),
        ];
        for (n, written, saved) in cases {
            assert_eq!(probability_written(n), written, "n={n}");
            assert_eq!(probability_saved(n), saved, "n={n}");
        }
    }

    #[test]
    fn quoting_and_host_ports() {
        assert_eq!(save_string("KUBE-SEP-X"), "KUBE-SEP-X");
        assert_eq!(save_string("ns/a cluster IP"), "\"ns/a cluster IP\"");
        assert_eq!(save_string("a\"b"), "\"a\\\"b\"");
        assert_eq!(join_host_port("10.0.0.1", 80), "10.0.0.1:80");
        assert_eq!(join_host_port("fd00::1", 80), "[fd00::1]:80");
    }
}
