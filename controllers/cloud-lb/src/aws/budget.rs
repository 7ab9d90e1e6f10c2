//! A client-side request budget per ELBv2 operation class (token buckets), so that a large
//! cluster spreads its calls instead of hitting `Throttling: Rate exceeded`. The classes and
//! defaults follow the AWS Load Balancer Controller's throttle configuration
//! (`RegisterTargets|DeregisterTargets` 4/s burst 20, everything else 10/s burst 40). EC2, a
//! separate API with its own account-wide limits, gets its own two buckets.

use std::sync::Mutex;
use std::time::Duration;

use serde::Deserialize;
use tokio::time::Instant;

/// Operation classes with separate budgets.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum OpClass {
    /// Describe* calls.
    Describe,
    /// Create/Modify/Delete/AddTags calls.
    Mutate,
    /// RegisterTargets and DeregisterTargets.
    Targets,
    /// EC2 Describe* calls.
    Ec2Describe,
    /// EC2 security group rule changes.
    Ec2Mutate,
}

/// One bucket's rate.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq)]
pub struct Rate {
    /// Sustained calls per second.
    pub qps: f64,
    /// Calls allowed at once after a quiet period.
    pub burst: u32,
}

/// Budgets per class (the `rateLimits` section of the AWS cloud config).
#[derive(Clone, Copy, Debug, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", default)]
pub struct RateLimits {
    /// Describe* calls.
    pub describe: Rate,
    /// Mutating calls.
    pub mutate: Rate,
    /// Target (de)registration.
    pub targets: Rate,
    /// EC2 Describe* calls.
    pub ec2_describe: Rate,
    /// EC2 security group rule changes.
    pub ec2_mutate: Rate,
}

impl Default for RateLimits {
    fn default() -> Self {
        RateLimits {
            describe: Rate {
                qps: 10.0,
                burst: 40,
            },
            mutate: Rate {
                qps: 10.0,
                burst: 40,
            },
            targets: Rate {
                qps: 4.0,
                burst: 20,
            },
            // Well under EC2's own request-token refill (20/s for describes, 5/s for
            // mutations), which the whole account shares.
            ec2_describe: Rate {
                qps: 10.0,
                burst: 40,
            },
            ec2_mutate: Rate {
                qps: 2.0,
                burst: 20,
            },
        }
    }
}

impl RateLimits {
    /// The same rate for every class (tests and benchmarks that measure calls, not budgets).
    pub fn uniform(rate: Rate) -> Self {
        RateLimits {
            describe: rate,
            mutate: rate,
            targets: rate,
            ec2_describe: rate,
            ec2_mutate: rate,
        }
    }
}

struct Bucket {
    rate: Rate,
    tokens: f64,
    last: Instant,
}

impl Bucket {
    fn new(rate: Rate) -> Self {
        Bucket {
            rate,
            tokens: f64::from(rate.burst.max(1)),
            last: Instant::now(),
        }
    }

    /// Takes a token and returns how long the caller must wait for it. Tokens may go negative:
    /// that reserves future capacity in arrival order, so waiters are served fairly.
    fn reserve(&mut self) -> Duration {
        let now = Instant::now();
        let qps = self.rate.qps.max(0.001);
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * qps).min(f64::from(self.rate.burst.max(1)));
        self.last = now;
        self.tokens -= 1.0;
        if self.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens / qps)
        }
    }
}

/// One bucket per class.
pub struct Budget {
    describe: Mutex<Bucket>,
    mutate: Mutex<Bucket>,
    targets: Mutex<Bucket>,
    ec2_describe: Mutex<Bucket>,
    ec2_mutate: Mutex<Bucket>,
}

impl Budget {
    /// Budgets with the given limits, all full.
    pub fn new(limits: RateLimits) -> Self {
        Budget {
            describe: Mutex::new(Bucket::new(limits.describe)),
            mutate: Mutex::new(Bucket::new(limits.mutate)),
            targets: Mutex::new(Bucket::new(limits.targets)),
            ec2_describe: Mutex::new(Bucket::new(limits.ec2_describe)),
            ec2_mutate: Mutex::new(Bucket::new(limits.ec2_mutate)),
        }
    }

    /// Waits until a call of `class` fits the budget.
    pub async fn acquire(&self, class: OpClass) {
        let bucket = match class {
            OpClass::Describe => &self.describe,
            OpClass::Mutate => &self.mutate,
            OpClass::Targets => &self.targets,
            OpClass::Ec2Describe => &self.ec2_describe,
            OpClass::Ec2Mutate => &self.ec2_mutate,
        };
        let wait = bucket.lock().unwrap_or_else(|e| e.into_inner()).reserve();
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn burst_then_rate() {
        let b = Budget::new(RateLimits {
            targets: Rate { qps: 2.0, burst: 3 },
            ..RateLimits::default()
        });
        let start = Instant::now();
        for _ in 0..3 {
            b.acquire(OpClass::Targets).await;
        }
        assert_eq!(start.elapsed(), Duration::ZERO, "burst is free");
        for _ in 0..4 {
            b.acquire(OpClass::Targets).await;
        }
        // Four more at 2/s take two seconds.
        let e = start.elapsed();
        assert!(
            e >= Duration::from_millis(1990) && e <= Duration::from_millis(2100),
            "{e:?}"
        );
        // Other classes are not affected.
        let t = Instant::now();
        b.acquire(OpClass::Describe).await;
        assert_eq!(t.elapsed(), Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn refills_after_quiet_period() {
        let b = Budget::new(RateLimits {
            mutate: Rate { qps: 1.0, burst: 2 },
            ..RateLimits::default()
        });
        b.acquire(OpClass::Mutate).await;
        b.acquire(OpClass::Mutate).await;
        tokio::time::sleep(Duration::from_secs(10)).await;
        let t = Instant::now();
        b.acquire(OpClass::Mutate).await;
        b.acquire(OpClass::Mutate).await;
        assert_eq!(
            t.elapsed(),
            Duration::ZERO,
            "refilled up to burst, not beyond"
        );
        b.acquire(OpClass::Mutate).await;
        assert!(t.elapsed() >= Duration::from_millis(990));
    }
}
