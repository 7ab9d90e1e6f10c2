//! Leader election on a `coordination.k8s.io/v1` Lease, with client-go's algorithm and
//! kube-controller-manager's flags (lease duration, renew deadline, retry period).
//!
//! Why not a crate: kube-lease-manager (the maintained one for kube 5) keeps believing it
//! leads while renewals fail, so a partitioned leader would go on writing past its lease.
//! client-go's contract is that a leader that cannot renew within the renew deadline steps
//! down, and that is what the gate here enforces.
//!
//! Followers judge expiry by their own clock from the moment they last saw the record change
//! (as client-go does), never by comparing the holder's timestamps with their clock.

use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::Api;
use kube::api::{PostParams, ResourceExt};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// Lease timing, as kube-controller-manager's `--leader-elect-*` flags.
#[derive(Clone, Debug)]
pub struct LeaseConfig {
    /// Lease object name (`--leader-elect-resource-name`).
    pub name: String,
    /// Lease namespace (`--leader-elect-resource-namespace`).
    pub namespace: String,
    /// This candidate's identity (hostname plus a random suffix, as client-go does).
    pub identity: String,
    /// `--leader-elect-lease-duration` (15 s).
    pub lease_duration: Duration,
    /// `--leader-elect-renew-deadline` (10 s).
    pub renew_deadline: Duration,
    /// `--leader-elect-retry-period` (2 s).
    pub retry_period: Duration,
}

/// A read-only view of whether this process currently leads; what controllers gate writes on.
#[derive(Clone, Debug)]
pub struct LeaderGate {
    rx: watch::Receiver<bool>,
}

impl LeaderGate {
    /// A gate that is always open (leader election disabled) or always closed.
    pub fn fixed(leading: bool) -> (Self, watch::Sender<bool>) {
        let (tx, rx) = watch::channel(leading);
        (LeaderGate { rx }, tx)
    }

    /// A gate that follows `rx`.
    pub fn from_receiver(rx: watch::Receiver<bool>) -> Self {
        LeaderGate { rx }
    }

    /// Whether this process leads right now.
    pub fn is_leader(&self) -> bool {
        *self.rx.borrow()
    }

    /// Waits until this process leads. Returns false if the elector has gone away, even if
    /// its last word was "leading": without an elector nobody renews the Lease.
    pub async fn wait_leading(&mut self) -> bool {
        self.rx.wait_for(|l| *l).await.is_ok() && self.rx.has_changed().is_ok()
    }

    /// Waits until this process stops leading (or the elector goes away).
    pub async fn wait_lost(&mut self) {
        let _ = self.rx.wait_for(|l| !*l).await;
    }
}

/// What one acquire-or-renew attempt concluded.
#[derive(Debug, PartialEq, Eq)]
enum Attempt {
    Held,
    /// Another candidate holds an unexpired lease; it expires (by our clock) after this long.
    HeldByOther(Duration),
}

/// Runs a candidate until `shutdown`; `tx` carries leadership. Releases the Lease on shutdown
/// if held, so a successor does not wait for expiry.
pub async fn run_elector(
    api: Api<Lease>,
    cfg: LeaseConfig,
    tx: watch::Sender<bool>,
    shutdown: CancellationToken,
) {
    let mut observed: Option<(String, Instant)> = None; // (resourceVersion, when we saw it change)
    let mut last_renew: Option<Instant> = None;
    loop {
        let mut wait = cfg.retry_period;
        let leading = *tx.borrow();
        let since_renew = last_renew.map(|t| t.elapsed());
        let Some(limit) = attempt_limit(&cfg, leading, since_renew) else {
            // The renew deadline has passed: stop writing before the lease can expire in
            // another candidate's eyes.
            warn!(lease = %cfg.name, "failed to renew lease within the renew deadline; stepping down");
            let _ = tx.send(false);
            last_renew = None;
            continue;
        };
        // Counted from before the request: the server's renewTime is no earlier than this, so
        // other candidates never see our lease expire before we step down.
        let started = Instant::now();
        let attempt = tokio::select! {
            _ = shutdown.cancelled() => break,
            r = tokio::time::timeout(limit, try_acquire_or_renew(&api, &cfg, &mut observed)) => r,
        };
        match attempt {
            Ok(Ok(Attempt::Held)) => {
                last_renew = Some(started);
                if !leading {
                    info!(lease = %cfg.name, identity = %cfg.identity, "became leader");
                    let _ = tx.send(true);
                }
            }
            Ok(Ok(Attempt::HeldByOther(expires_in))) => {
                // Try again right at expiry rather than up to a retry period after it, so a
                // dead leader is replaced within lease duration plus one retry period of its
                // last renewal being observed.
                if !expires_in.is_zero() {
                    wait = wait.min(expires_in + Duration::from_millis(10));
                }
                if leading {
                    warn!(lease = %cfg.name, "lease taken by another candidate; stepping down");
                    let _ = tx.send(false);
                }
                last_renew = None;
            }
            Ok(Err(e)) => {
                warn!(lease = %cfg.name, error = %e, "leader election attempt failed");
            }
            Err(_) => warn!(lease = %cfg.name, "leader election attempt timed out"),
        }
        if *tx.borrow() {
            // Wake no later than the renew deadline, so a leader that cannot renew steps down
            // on time even while it waits between attempts.
            if let Some(left) = last_renew.and_then(|t| cfg.renew_deadline.checked_sub(t.elapsed()))
            {
                wait = wait.min(left);
            } else {
                wait = Duration::ZERO;
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep(wait) => {}
        }
    }
    if *tx.borrow() {
        let _ = tx.send(false);
        match release(&api, &cfg).await {
            Ok(()) => info!(lease = %cfg.name, "released lease"),
            Err(e) => warn!(lease = %cfg.name, error = %e, "could not release lease"),
        }
    }
}

/// How long the next acquire-or-renew attempt may take, or `None` if a leader has already
/// missed its renew deadline. A follower's attempt is bounded by twice the retry period; a
/// leader's also by the time left until `renew_deadline` after its last successful renewal
/// (as client-go bounds its renew loop by the renew deadline), so it never writes as leader
/// past the point where its lease may have expired for others.
fn attempt_limit(
    cfg: &LeaseConfig,
    leading: bool,
    since_renew: Option<Duration>,
) -> Option<Duration> {
    let normal = cfg.retry_period.max(Duration::from_millis(100)) * 2;
    if !leading {
        return Some(normal);
    }
    let left = cfg.renew_deadline.checked_sub(since_renew?)?;
    (!left.is_zero()).then(|| normal.min(left))
}

fn now_micro() -> MicroTime {
    MicroTime(Timestamp::now())
}

async fn try_acquire_or_renew(
    api: &Api<Lease>,
    cfg: &LeaseConfig,
    observed: &mut Option<(String, Instant)>,
) -> Result<Attempt, kube::Error> {
    let secs = i32::try_from(cfg.lease_duration.as_secs()).unwrap_or(i32::MAX);
    let existing = api.get_opt(&cfg.name).await?;
    let Some(mut lease) = existing else {
        let lease = Lease {
            metadata: ObjectMeta {
                name: Some(cfg.name.clone()),
                namespace: Some(cfg.namespace.clone()),
                ..Default::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some(cfg.identity.clone()),
                lease_duration_seconds: Some(secs),
                acquire_time: Some(now_micro()),
                renew_time: Some(now_micro()),
                lease_transitions: Some(0),
                ..Default::default()
            }),
        };
        return match api.create(&PostParams::default(), &lease).await {
            Ok(l) => {
                *observed = Some((l.resource_version().unwrap_or_default(), Instant::now()));
                Ok(Attempt::Held)
            }
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(Attempt::HeldByOther(Duration::ZERO)),
            Err(e) => Err(e),
        };
    };
    let rv = lease.resource_version().unwrap_or_default();
    let now = Instant::now();
    match observed {
        Some((seen, _)) if *seen == rv => {}
        _ => *observed = Some((rv.clone(), now)),
    }
    let spec = lease.spec.clone().unwrap_or_default();
    let holder = spec.holder_identity.clone().unwrap_or_default();
    let held_by_us = holder == cfg.identity;
    if !held_by_us && !holder.is_empty() {
        let duration = Duration::from_secs(
            u64::try_from(spec.lease_duration_seconds.unwrap_or(secs)).unwrap_or(0),
        );
        let seen_at = observed.as_ref().map(|(_, t)| *t).unwrap_or(now);
        if seen_at + duration > now {
            return Ok(Attempt::HeldByOther(seen_at + duration - now));
        }
    }
    let mut new_spec = spec.clone();
    new_spec.holder_identity = Some(cfg.identity.clone());
    new_spec.lease_duration_seconds = Some(secs);
    new_spec.renew_time = Some(now_micro());
    if !held_by_us {
        new_spec.acquire_time = Some(now_micro());
        new_spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
    }
    lease.spec = Some(new_spec);
    // replace carries the resourceVersion we read: a concurrent writer makes this a 409.
    match api.replace(&cfg.name, &PostParams::default(), &lease).await {
        Ok(l) => {
            *observed = Some((l.resource_version().unwrap_or_default(), Instant::now()));
            Ok(Attempt::Held)
        }
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(Attempt::HeldByOther(Duration::ZERO)),
        Err(e) => Err(e),
    }
}

/// Gives the Lease up the way client-go's ReleaseOnCancel does: empty holder, 1 s duration.
async fn release(api: &Api<Lease>, cfg: &LeaseConfig) -> Result<(), kube::Error> {
    let Some(mut lease) = api.get_opt(&cfg.name).await? else {
        return Ok(());
    };
    let mut spec = lease.spec.clone().unwrap_or_default();
    if spec.holder_identity.as_deref() != Some(cfg.identity.as_str()) {
        return Ok(());
    }
    spec.holder_identity = None;
    spec.lease_duration_seconds = Some(1);
    spec.renew_time = Some(now_micro());
    spec.acquire_time = Some(now_micro());
    lease.spec = Some(spec);
    api.replace(&cfg.name, &PostParams::default(), &lease)
        .await
        .map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(lease: u64, renew: u64, retry: u64) -> LeaseConfig {
        LeaseConfig {
            name: "l".into(),
            namespace: "n".into(),
            identity: "me".into(),
            lease_duration: Duration::from_secs(lease),
            renew_deadline: Duration::from_secs(renew),
            retry_period: Duration::from_secs(retry),
        }
    }

    #[test]
    fn a_leaders_attempts_end_by_the_renew_deadline() {
        // Valid for client-go (15 > 13 > 1.2 * 4); each attempt used to get 2 * 4 s whatever
        // the time left, so a leader could keep writing until about 24 s, past the lease.
        let c = cfg(15, 13, 4);
        let s = Duration::from_secs;
        assert_eq!(attempt_limit(&c, false, None), Some(s(8)));
        assert_eq!(attempt_limit(&c, true, Some(s(0))), Some(s(8)));
        assert_eq!(attempt_limit(&c, true, Some(s(8))), Some(s(5)));
        assert_eq!(attempt_limit(&c, true, Some(s(12))), Some(s(1)));
        assert_eq!(attempt_limit(&c, true, Some(s(13))), None);
        assert_eq!(attempt_limit(&c, true, Some(s(20))), None);
        // A leader that never renewed (it cannot lead) has no budget either.
        assert_eq!(attempt_limit(&c, true, None), None);
    }

    #[tokio::test]
    async fn a_gone_elector_never_counts_as_leading() {
        let (mut gate, tx) = LeaderGate::fixed(true);
        drop(tx);
        gate.wait_lost().await;
        assert!(!gate.wait_leading().await);
    }

    #[tokio::test]
    async fn gate_follows_sender() {
        let (mut gate, tx) = LeaderGate::fixed(false);
        assert!(!gate.is_leader());
        tx.send(true).ok();
        assert!(gate.wait_leading().await);
        assert!(gate.is_leader());
        tx.send(false).ok();
        gate.wait_lost().await;
        assert!(!gate.is_leader());
    }
}
