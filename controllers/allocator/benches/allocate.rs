//! Pure allocation throughput: dynamic picks (`allocate_next`) on a /16 IPv4 range and a /108
//! IPv6 range, from empty to full and in steady state (release one, pick one) at several
//! fill levels. Prints a report; no thresholds.
//!
//! Run: `cargo bench -p scm-allocator --bench allocate`

use std::time::Instant;

use rand::SeedableRng;
use rand::rngs::StdRng;
use scm_allocator::IpRange;

fn fill(cidr: &str) -> (usize, f64) {
    let mut r = IpRange::new(cidr.parse().expect("cidr")).expect("range");
    let mut rng = StdRng::seed_from_u64(1);
    let n = r.size();
    let t = Instant::now();
    for _ in 0..n {
        r.allocate_next(&mut rng).expect("room");
    }
    (n, n as f64 / t.elapsed().as_secs_f64())
}

fn steady(cidr: &str, fill_pct: usize, ops: usize) -> f64 {
    let mut r = IpRange::new(cidr.parse().expect("cidr")).expect("range");
    let mut rng = StdRng::seed_from_u64(2);
    let target = r.size() * fill_pct / 100;
    let mut live = Vec::with_capacity(target);
    for _ in 0..target {
        live.push(r.allocate_next(&mut rng).expect("room"));
    }
    let t = Instant::now();
    for i in 0..ops {
        let victim = live.swap_remove(i * 7919 % live.len().max(1));
        r.release(victim);
        live.push(r.allocate_next(&mut rng).expect("room"));
    }
    ops as f64 / t.elapsed().as_secs_f64()
}

fn main() {
    println!("scm-allocator: dynamic allocations per second (allocate_next)");
    for cidr in ["10.96.0.0/16", "fd00:10::/108"] {
        let (n, rate) = fill(cidr);
        println!("  {cidr:<16} fill empty->full ({n} addresses): {rate:>12.0} allocs/s");
        for pct in [50, 90, 99] {
            let rate = steady(cidr, pct, 200_000);
            println!("  {cidr:<16} steady release+alloc at {pct:>2}% full:   {rate:>12.0} ops/s");
        }
    }
}
