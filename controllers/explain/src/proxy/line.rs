//! One rule line as `iptables-save` prints it, and the address forms it uses.

use super::names::save_string;

/// Builds one rule line: iptables-save puts source, destination and protocol first, then the
/// matches in the order they were given, then the target.
pub(super) struct Line<'a> {
    chain: &'a str,
    src: Option<String>,
    dst: Option<String>,
    proto: Option<&'a str>,
    matches: Vec<String>,
}

impl<'a> Line<'a> {
    pub(super) fn new(chain: &'a str) -> Self {
        Line {
            chain,
            src: None,
            dst: None,
            proto: None,
            matches: vec![],
        }
    }
    pub(super) fn src(mut self, s: String) -> Self {
        self.src = Some(s);
        self
    }
    pub(super) fn dst(mut self, d: String) -> Self {
        self.dst = Some(d);
        self
    }
    pub(super) fn proto(mut self, p: &'a str) -> Self {
        self.proto = Some(p);
        self
    }
    pub(super) fn comment(mut self, c: &str) -> Self {
        self.matches
            .push(format!("-m comment --comment {}", save_string(c)));
        self
    }
    pub(super) fn m(mut self, m: String) -> Self {
        self.matches.push(m);
        self
    }
    pub(super) fn dport(self, proto: &'a str, port: i32) -> Self {
        self.m(format!("-m {proto} --dport {port}"))
    }
    pub(super) fn to(self, target: &str) -> String {
        let mut s = format!("-A {}", self.chain);
        for part in [self.src, self.dst].into_iter().flatten() {
            s.push(' ');
            s.push_str(&part);
        }
        if let Some(p) = self.proto {
            s.push_str(" -p ");
            s.push_str(p);
        }
        for m in &self.matches {
            s.push(' ');
            s.push_str(m);
        }
        if !target.is_empty() {
            s.push_str(" -j ");
            s.push_str(target);
        }
        s
    }
}

pub(super) fn host(ip: &str, ipv6: bool) -> String {
    if ipv6 {
        format!("-d {ip}/128")
    } else {
        format!("-d {ip}/32")
    }
}

pub(super) fn src_host(ip: &str, ipv6: bool) -> String {
    if ipv6 {
        format!("-s {ip}/128")
    } else {
        format!("-s {ip}/32")
    }
}

pub(super) fn reject(ipv6: bool) -> &'static str {
    if ipv6 {
        "REJECT --reject-with icmp6-port-unreachable"
    } else {
        "REJECT --reject-with icmp-port-unreachable"
    }
}

pub(super) fn full_mask(ipv6: bool) -> &'static str {
    if ipv6 {
        "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"
    } else {
        "255.255.255.255"
    }
}
