//! The controller's decision for one Service key, as a value: the shell gathers what it knows
//! into an [`Observed`], [`decide`] answers with a [`Step`], and the shell only executes it.

use std::time::Duration;

use k8s_openapi::api::core::v1::{LoadBalancerStatus, Service};

use super::{
    Action, ClassFilter, NodeFingerprint, action, class_of, has_finalizer, has_ingress,
    is_load_balancer, normalized, spec_fingerprint, status_differs, with_finalizer,
};

/// What the controller last did successfully for a Service (its memory, lost with the
/// leadership term).
#[derive(Clone, Debug, PartialEq)]
pub struct LastSync {
    /// The Service as last handled (to clean up if it vanishes without our finalizer).
    pub service: Service,
    /// [`spec_fingerprint`] at the last ensure.
    pub spec: String,
    /// The node set at the last ensure or host update.
    pub nodes: NodeFingerprint,
    /// The status the provider returned.
    pub status: LoadBalancerStatus,
}

/// Everything [`decide`] looks at for one Service key.
#[derive(Clone, Debug, Default)]
pub struct Observed {
    /// Whether the provider has been restored in this leadership term.
    pub restored: bool,
    /// The Service as cached; `None` once it is gone.
    pub service: Option<Service>,
    /// The provider's `implemented_elsewhere` for the Service (a local predicate).
    pub implemented_elsewhere: bool,
    /// What we last did for it in this term, if anything.
    pub last: Option<LastSync>,
    /// The spec fingerprint whose ensure last failed permanently, if any.
    pub parked: Option<String>,
    /// The stable node set's fingerprint now.
    pub nodes: NodeFingerprint,
    /// How long the cloud still asked us to wait (a throttle's `retry_after`), if at all.
    pub retry_wait: Option<Duration>,
    /// A periodic pass asked to check that the load balancer still exists (it may have been
    /// deleted out of band while spec and nodes stayed the same).
    pub verify: bool,
    /// What the provider's `get` answered in this reconcile (whether our load balancer
    /// exists); `None` until [`Step::LookUp`] asked.
    pub found: Option<bool>,
    /// Whether the provider recognises the Service's published status as one it would write
    /// (a local predicate on names or pools, no network).
    pub recognised: bool,
    /// The [`refusal_key`] under which we last refused the Service as served elsewhere.
    pub refused: Option<String>,
    /// This replica's informer saw the Service stop being a LoadBalancer while it carried our
    /// finalizer ([`leaves_load_balancer`]): proof that it was ours, should it come back as a
    /// LoadBalancer of another class (the only way a class changes) before anyone cleaned up.
    pub left_our_class: bool,
}

/// Whether `svc` has stopped being a LoadBalancer while carrying our finalizer (a type change
/// away, which a class change goes through; the API server also clears its status then).
pub fn leaves_load_balancer(svc: &Service) -> bool {
    has_finalizer(svc) && !is_load_balancer(svc) && svc.metadata.deletion_timestamp.is_none()
}

/// What a refusal as served elsewhere was decided from (the spec and the published status):
/// while it stays the same the refusal stands without asking the provider again.
pub fn refusal_key(svc: &Service) -> String {
    let status = svc.status.as_ref().and_then(|s| s.load_balancer.as_ref());
    format!(
        "{}|{}",
        spec_fingerprint(svc),
        serde_json::Value::Array(normalized(status))
    )
}

/// What a reconcile of one Service key does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// First in a leadership term: let the provider rebuild its state, then decide again.
    Restore,
    /// The cloud throttled us and said when to come back: no provider call before then.
    Wait(Duration),
    /// Not ours: forget what we remember of its last sync (nothing to clean).
    Ignore,
    /// Gone, and nothing remembered: forget it entirely.
    Forget,
    /// Gone without our finalizer (removed by hand): delete its load balancer from the
    /// Service as last handled, then forget it.
    DeleteVanished,
    /// Delete its load balancer, clear the status, drop the finalizer.
    Cleanup,
    /// The last ensure of this very spec failed permanently: nothing until the Service changes.
    Park,
    /// Spec and node set as last synced, status in place: nothing to do.
    InSync,
    /// Spec and node set as last synced, but the status differs: rewrite it, no cloud call.
    StatusOnly,
    /// Only the node set changed: point the load balancer at the new hosts (after rewriting
    /// the status first if it differs).
    HostsOnly {
        /// Whether the status must be rewritten too.
        rewrite_status: bool,
    },
    /// Create or bring the load balancer up to date: finalizer, provider ensure, status.
    Ensure,
    /// Ask the provider whether our load balancer exists (its `get`), then decide again.
    LookUp,
    /// Our load balancer is gone although nothing changed (deleted out of band): say so in an
    /// Event, then ensure (which recreates it and publishes the new status).
    Recreate,
    /// A class-less Service already served by another controller (a status we did not write,
    /// no load balancer of ours): leave it alone, no cloud call, no finalizer; `warn` on the
    /// first refusal of this spec and status.
    ServedElsewhere {
        /// Whether to record the Warning Event (not again while nothing changed).
        warn: bool,
    },
}

impl Step {
    /// Whether executing this step calls the provider (so a throttle hint holds it back).
    pub fn calls_provider(self) -> bool {
        matches!(
            self,
            Step::DeleteVanished
                | Step::Cleanup
                | Step::HostsOnly { .. }
                | Step::Ensure
                | Step::LookUp
                | Step::Recreate
        )
    }
}

/// Decides the step for one Service key (upstream's `syncService` tree with our memory of the
/// last sync): clean up what we no longer serve, park after a permanent error until the spec
/// changes, rewrite only the status or only the hosts when that is all that differs, else
/// ensure. A provider step waits out a throttle hint.
pub fn decide(filter: &ClassFilter, o: &Observed) -> Step {
    if !o.restored {
        return Step::Restore;
    }
    let step = decide_restored(filter, o);
    match o.retry_wait {
        Some(d) if step.calls_provider() && !d.is_zero() => Step::Wait(d),
        _ => step,
    }
}

fn decide_restored(filter: &ClassFilter, o: &Observed) -> Step {
    let Some(svc) = &o.service else {
        // With our finalizer a Service is only gone after we cleaned up; without it (removed
        // by hand) clean up from what we last saw, as upstream's cache does.
        return if o.last.is_some() {
            Step::DeleteVanished
        } else {
            Step::Forget
        };
    };
    let mut act = action(svc, filter);
    if act == Action::Ensure && o.implemented_elsewhere {
        // Ours before the switch (our finalizer is on): release what we made and the finalizer.
        act = if with_finalizer(svc).is_none() {
            Action::Cleanup
        } else {
            Action::Ignore
        };
    }
    match act {
        // Back as a LoadBalancer of another class before we cleaned up (no leader meanwhile):
        // still ours to clean, as upstream would have on seeing the type change.
        Action::Ignore if o.left_our_class && has_finalizer(svc) => Step::Cleanup,
        Action::Ignore => Step::Ignore,
        Action::Cleanup
            if o.last.is_none()
                && class_of(svc).is_none()
                && has_ingress(svc)
                && has_finalizer(svc) =>
        {
            // Deleted or no longer a LoadBalancer: with someone else's status on it, the
            // (same-named) finalizer and the status are theirs to remove, not ours.
            if o.refused.is_some() {
                return Step::ServedElsewhere { warn: false };
            }
            match o.found {
                None => Step::LookUp,
                Some(false) if !o.recognised => Step::ServedElsewhere { warn: true },
                Some(_) => Step::Cleanup,
            }
        }
        Action::Cleanup => Step::Cleanup,
        Action::Ensure => {
            let spec = spec_fingerprint(svc);
            if o.parked.as_deref() == Some(spec.as_str()) {
                return Step::Park;
            }
            if o.last.is_none() && class_of(svc).is_none() && has_ingress(svc) {
                return class_less_with_status(svc, o);
            }
            match &o.last {
                Some(last) if last.spec == spec => {
                    let rewrite_status = status_differs(svc, &last.status);
                    match (last.nodes == o.nodes, rewrite_status) {
                        (true, false) if o.verify => match o.found {
                            None => Step::LookUp,
                            Some(true) => Step::InSync,
                            Some(false) => Step::Recreate,
                        },
                        (true, false) => Step::InSync,
                        (true, true) => Step::StatusOnly,
                        (false, rewrite_status) => Step::HostsOnly { rewrite_status },
                    }
                }
                _ => Step::Ensure,
            }
        }
    }
}

/// A class-less Service we hold no record of already shows a load balancer: ours from before
/// a restart (the provider finds our load balancer; or it is gone but the status is one we
/// would write and our finalizer is on, so it was deleted out of band), else another
/// controller's (the cluster's own cloud-controller-manager serves class-less Services too,
/// with the same finalizer name, so the finalizer alone proves nothing).
fn class_less_with_status(svc: &Service, o: &Observed) -> Step {
    if o.refused.as_deref() == Some(refusal_key(svc).as_str()) {
        return Step::ServedElsewhere { warn: false };
    }
    match o.found {
        None => Step::LookUp,
        Some(true) => Step::Ensure,
        Some(false) if o.recognised && has_finalizer(svc) => Step::Recreate,
        Some(false) => Step::ServedElsewhere {
            warn: o.refused.is_none(),
        },
    }
}

#[cfg(test)]
mod tests;
