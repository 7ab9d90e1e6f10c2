//! Each pool's counts and findings for its status ([`pool_report`]), and the held addresses no
//! pool covers any more ([`uncovered`]): the reporting half of the local pools' pure core.

use std::collections::BTreeMap;
use std::net::IpAddr;

use super::{Book, Holder, Pool, buggy};

/// A pool's counts and findings, for its status (the watcher turns them into conditions).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PoolReport {
    /// Held addresses in the pool, per family (IPv4, IPv6).
    pub allocated: (u128, u128),
    /// Addresses still free to hand out, per family (0 for a pool that serves nothing).
    pub available: (u128, u128),
    /// Addresses taken from this pool that it no longer covers, with their holder.
    pub outside: Vec<(IpAddr, String)>,
}

/// Counts and findings of `pool` given what is held and blocked.
pub fn pool_report(pool: &Pool, book: &Book, blocked: &BTreeMap<IpAddr, String>) -> PoolReport {
    let mut r = PoolReport::default();
    let mut size = (0u128, 0u128);
    let mut usable = (0u128, 0u128);
    for range in &pool.ranges {
        let s = range.size();
        let u = if pool.def.avoid_buggy_ips {
            s - range.buggy_count()
        } else {
            s
        };
        if range.first.is_ipv4() {
            size.0 += s;
            usable.0 += u;
        } else {
            size.1 = size.1.saturating_add(s);
            usable.1 = usable.1.saturating_add(u);
        }
    }
    let mut unusable_taken = (0u128, 0u128);
    let covered = |ip: &IpAddr| pool.covers(*ip);
    for ip in book
        .held
        .keys()
        .chain(blocked.keys().filter(|b| !book.held.contains_key(b)))
        .filter(|ip| covered(ip))
    {
        let held = book.held.contains_key(ip);
        let counts_against = !(pool.def.avoid_buggy_ips && buggy(*ip));
        if ip.is_ipv4() {
            if held {
                r.allocated.0 += 1;
            }
            if counts_against {
                unusable_taken.0 += 1;
            }
        } else {
            if held {
                r.allocated.1 += 1;
            }
            unusable_taken.1 += 1;
        }
    }
    if pool.serves() {
        r.available = (
            usable.0.saturating_sub(unusable_taken.0),
            usable.1.saturating_sub(unusable_taken.1),
        );
    }
    for (ip, hs) in &book.held {
        for h in hs {
            if h.origin.as_deref() == Some(pool.def.name.as_str()) && !pool.covers(*ip) {
                r.outside.push((*ip, h.who.clone()));
            }
        }
    }
    r
}

/// Held addresses no valid pool covers (a pool shrunk or was deleted; a disabled pool still
/// covers what it gave), with their holder: each stays with its Service, which gets a Warning.
pub fn uncovered(pools: &[Pool], book: &Book) -> Vec<(IpAddr, Holder)> {
    book.held
        .iter()
        .filter(|(ip, _)| {
            !pools
                .iter()
                .any(|p| p.invalid.is_empty() && p.overlaps.is_empty() && p.covers(**ip))
        })
        .flat_map(|(ip, hs)| hs.iter().map(|h| (*ip, h.clone())))
        .collect()
}
