//! The Service's `LoadBalancerReady` condition (pure): `True` once `status.loadBalancer` is
//! published, `False` with the reason of the last failed provider call, gone when this
//! controller stops serving the Service. Reasons come from the error's variant and code (never
//! its text); the message is the error's, the same text its Warning Event carries.

use scm_runtime::conditions::Desired;

use super::Step;
use crate::aws::adopt::ADOPTION_REFUSED;
use crate::aws::spec::tenant::{REFUSED_RULE_CAP, REFUSED_SUBNET};
use crate::provider::{CAPACITY_EXHAUSTED, ProviderError};

/// The condition type this controller owns.
pub const LOAD_BALANCER_READY: &str = "LoadBalancerReady";
/// Every condition type the `cloud-lb` controller owns (for removal).
pub const OWNED: &[&str] = &[LOAD_BALANCER_READY];

/// Provider error code: no subnet to place the load balancer in (none tagged or discovered,
/// or a named one missing).
pub const SUBNETS_NOT_FOUND: &str = "SubnetsNotFound";
/// Provider error code: a node port (or the health-check node port) is not allocated yet.
pub const AWAITING_NODE_PORT: &str = "AwaitingNodePort";
/// Provider error code: the requested address is held by another Service (or cannot be
/// shared with it).
pub const ADDRESS_CONFLICT: &str = "AddressConflict";

/// Cloud error codes that name an exhausted account quota.
const QUOTA_CODES: &[&str] = &[
    "TooManyLoadBalancers",
    "TooManyTargetGroups",
    "TooManyListeners",
    "TooManyTargets",
    "TooManyTags",
    "TooManyRegistrationsForTargetId",
    "RulesPerSecurityGroupLimitExceeded",
    "SecurityGroupLimitExceeded",
    "AddressLimitExceeded",
    REFUSED_RULE_CAP,
];

/// `True`: the load balancer's address is published.
pub fn published() -> Desired {
    Desired::ok(
        LOAD_BALANCER_READY,
        "LoadBalancerProvisioned",
        "the load balancer is provisioned and status.loadBalancer is published",
    )
}

/// The reason a failed provider call gives the condition.
pub fn reason(e: &ProviderError) -> &'static str {
    let code = e.code().unwrap_or_default();
    match e {
        ProviderError::Throttled { .. } => "Throttled",
        _ if code == ADDRESS_CONFLICT || code == ADOPTION_REFUSED => "Conflicting",
        _ if code == CAPACITY_EXHAUSTED => "PoolExhausted",
        _ if code == AWAITING_NODE_PORT => "AwaitingNodePort",
        _ if [
            SUBNETS_NOT_FOUND,
            REFUSED_SUBNET,
            "SubnetNotFound",
            "InvalidSubnet",
        ]
        .contains(&code) =>
        {
            "SubnetsNotFound"
        }
        _ if QUOTA_CODES.contains(&code) => "QuotaExceeded",
        ProviderError::Permanent { .. } => "InvalidAnnotation",
        ProviderError::Retryable { .. } => "EnsureFailed",
    }
}

/// `False`: the provider call failed with `e`.
pub fn failed(e: &ProviderError) -> Desired {
    Desired::failed(
        LOAD_BALANCER_READY,
        reason(e),
        crate::steps::note(e.to_string()),
    )
}

/// What a step that made no provider call (or whose calls succeeded) leaves of our condition:
/// `Some(vec![])` removes it (the Service is not ours to serve), `Some([True])` when the status
/// is published, `None` to leave it as it is (the Service is gone, or nothing was learnt).
pub fn after_success(step: Step, status_published: bool) -> Option<Vec<Desired>> {
    match step {
        Step::Ignore | Step::ServedElsewhere { .. } | Step::Cleanup => Some(vec![]),
        Step::InSync
        | Step::StatusOnly
        | Step::HostsOnly { .. }
        | Step::Ensure
        | Step::Recreate => status_published.then(|| vec![published()]),
        Step::Restore
        | Step::Wait(_)
        | Step::Forget
        | Step::DeleteVanished
        | Step::Park
        | Step::LookUp => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_error_gets_its_reason() {
        let r = |e: ProviderError| reason(&e);
        assert_eq!(
            r(ProviderError::Throttled {
                message: "slow".into(),
                code: Some("Throttling".into()),
                retry_after: None,
                source: None
            }),
            "Throttled"
        );
        assert_eq!(
            r(ProviderError::retryable("full").with_code(CAPACITY_EXHAUSTED)),
            "PoolExhausted"
        );
        assert_eq!(
            r(ProviderError::retryable("held").with_code(ADDRESS_CONFLICT)),
            "Conflicting"
        );
        assert_eq!(
            r(ProviderError::retryable("np").with_code(AWAITING_NODE_PORT)),
            "AwaitingNodePort"
        );
        assert_eq!(
            r(ProviderError::retryable("none").with_code(SUBNETS_NOT_FOUND)),
            "SubnetsNotFound"
        );
        assert_eq!(
            r(ProviderError::permanent("cloud").with_code("SubnetNotFound")),
            "SubnetsNotFound"
        );
        assert_eq!(
            r(ProviderError::retryable("q").with_code("TooManyLoadBalancers")),
            "QuotaExceeded"
        );
        assert_eq!(r(ProviderError::permanent("bad")), "InvalidAnnotation");
        assert_eq!(r(ProviderError::retryable("net")), "EnsureFailed");
    }

    #[test]
    fn only_steps_that_stop_serving_remove_it() {
        assert_eq!(after_success(Step::Ignore, false), Some(vec![]));
        assert_eq!(after_success(Step::Cleanup, false), Some(vec![]));
        assert_eq!(after_success(Step::InSync, true), Some(vec![published()]));
        assert_eq!(after_success(Step::Ensure, false), None);
        assert_eq!(after_success(Step::Forget, false), None);
        assert_eq!(
            after_success(Step::Park, true),
            None,
            "the failure stays shown"
        );
    }
}
