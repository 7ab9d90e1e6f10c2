//! The ELBv2 half of the AWS provider, in three steps: [`observe`] describes what exists for
//! a Service into one [`Observed`] value, [`plan()`] (pure) turns the desired load balancer and
//! that value into an [`ElbPlan`] (the exact ELBv2 calls to make, in dependency order), and
//! [`apply`] executes a plan and nothing else. A test can therefore assert "this observed state
//! and this Service give exactly these calls" without an emulator.

pub mod apply;
pub mod observe;
pub mod plan;

use std::collections::{BTreeMap, BTreeSet};

use super::spec::{HealthCheck, Scheme, Tls};
use crate::provider::ProviderError;

pub use plan::{plan, plan_delete, plan_hosts, target_changes};

/// What we saw of an existing load balancer.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LbObs {
    /// Its ARN.
    pub arn: String,
    /// Its DNS name (what the Service's status shows).
    pub dns: Option<String>,
    /// Its VPC (where its target groups and the nodes' security groups are).
    pub vpc: Option<String>,
    /// `internet-facing` or `internal`.
    pub scheme: Option<String>,
    /// Its subnets (where health checks come from).
    pub subnets: Vec<String>,
}

/// A load balancer with our name, and what ELBv2 told us about it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ObservedLb {
    /// The load balancer.
    pub lb: LbObs,
    /// Its tags.
    pub tags: BTreeMap<String, String>,
    /// Whether its tags prove it is this Service's (cluster and Service tags).
    pub owned: bool,
    /// Its attributes (described only for the load balancer kept, and only when the Service
    /// asks for some).
    pub attributes: BTreeMap<String, String>,
    /// Its listeners (described only for the load balancer kept).
    pub listeners: Vec<ObservedListener>,
}

/// One listener as described.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ObservedListener {
    /// Its ARN.
    pub arn: String,
    /// Front-end port.
    pub port: i32,
    /// TCP, UDP, TCP_UDP or TLS.
    pub protocol: String,
    /// The target group its default action forwards to.
    pub target_group: Option<String>,
    /// Its (default) certificate, for TLS.
    pub certificate: Option<String>,
    /// Its security policy, for TLS.
    pub ssl_policy: Option<String>,
}

/// A target group found through the load balancer or by one of our deterministic names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObservedTg {
    /// Its ARN.
    pub arn: String,
    /// Its name.
    pub name: String,
    /// The port targets are registered on by default (the NodePort).
    pub port: Option<i32>,
    /// Its health check.
    pub health: HealthCheck,
    /// Its tags.
    pub tags: BTreeMap<String, String>,
    /// Whether its tags prove it is this Service's.
    pub owned: bool,
    /// Its attributes (described only for groups we want, when the Service asks for some).
    pub attributes: BTreeMap<String, String>,
    /// Its targets as (instance, port) (described only for groups whose targets we manage).
    pub targets: BTreeSet<(String, i32)>,
}

/// Everything that exists in ELBv2 for one Service, as one value.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Observed {
    /// The load balancer name looked up.
    pub name: String,
    /// The cluster (for the message when the name is taken by someone else).
    pub cluster: String,
    /// Load balancers with that name, oldest first (AWS has at most one; an emulator whose
    /// CreateLoadBalancer is not idempotent may hold several).
    pub lbs: Vec<ObservedLb>,
    /// Target groups attached to the load balancer, plus those found by our names.
    pub target_groups: Vec<ObservedTg>,
    /// Subnet IDs for a load balancer about to be created (resolved only then).
    pub subnets: Option<Vec<String>>,
    /// Groups we own, no longer wanted, whose deletion failed earlier: once detached they are
    /// found neither through the load balancer nor by a wanted name, so they are remembered.
    pub orphans: BTreeSet<String>,
}

impl Observed {
    /// The load balancer we keep: the oldest one we own. `None` when none exists; an error
    /// when load balancers with our name exist but none is ours (never touch those).
    pub fn primary(&self) -> Result<Option<&ObservedLb>, ProviderError> {
        if self.lbs.is_empty() {
            return Ok(None);
        }
        match self.lbs.iter().find(|l| l.owned) {
            Some(l) => Ok(Some(l)),
            None => Err(ProviderError::retryable(format!(
                "a load balancer named {} exists but is not tagged as owned by cluster {} and this Service; not touching it",
                self.name, self.cluster
            ))),
        }
    }

    /// Owned load balancers with our name besides the primary (duplicates to delete).
    pub fn duplicates(&self) -> impl Iterator<Item = &ObservedLb> {
        self.lbs.iter().filter(|l| l.owned).skip(1)
    }

    /// The observed load balancer with this ARN.
    pub fn lb(&self, arn: &str) -> Option<&LbObs> {
        self.lbs.iter().map(|l| &l.lb).find(|l| l.arn == arn)
    }
}

/// Whether an existing load balancer can be kept for `scheme` (the scheme cannot change in
/// place; an unknown scheme is taken as matching). Observe and plan both ask this, so they
/// agree on when a load balancer is created.
pub fn keeps(lb: &LbObs, scheme: Scheme) -> bool {
    lb.scheme.as_deref().is_none_or(|s| s == scheme.as_str())
}

/// A load balancer a plan works on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LbRef {
    /// One that exists, by ARN.
    Existing(String),
    /// The one this plan's `CreateLoadBalancer` makes.
    Created,
}

/// A target group a plan works on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TgRef {
    /// One that exists, by ARN.
    Existing(String),
    /// The one this plan's `CreateTargetGroup` of that name makes.
    Created(String),
}

/// One ELBv2 call of a plan.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ElbCall {
    /// Delete a load balancer (a duplicate, or one whose scheme must change).
    DeleteLoadBalancer {
        /// Its ARN.
        arn: String,
    },
    /// Create the network load balancer.
    CreateLoadBalancer {
        /// Its name.
        name: String,
        /// Its scheme.
        scheme: Scheme,
        /// `ipv4` or `dualstack`.
        ip_address_type: String,
        /// Subnet IDs.
        subnets: Vec<String>,
        /// Elastic IP allocations, paired in order with `subnets` (or none).
        eip_allocations: Vec<String>,
        /// Private IPv4 addresses, paired in order with `subnets` (or none).
        private_ipv4_addresses: Vec<String>,
        /// Tags (ownership first of all).
        tags: BTreeMap<String, String>,
    },
    /// Set load balancer attributes.
    ModifyLoadBalancerAttributes {
        /// Which load balancer.
        lb: LbRef,
        /// The attributes to send.
        attributes: BTreeMap<String, String>,
    },
    /// Add or correct tags on an existing resource (never removes tags).
    AddTags {
        /// The resource's ARN.
        arn: String,
        /// The tags to send.
        tags: BTreeMap<String, String>,
    },
    /// Create a target group with instance targets, in the load balancer's VPC.
    CreateTargetGroup {
        /// Its name.
        name: String,
        /// TCP, UDP or TCP_UDP.
        protocol: String,
        /// The NodePort.
        port: i32,
        /// Its health check.
        health: HealthCheck,
        /// Tags.
        tags: BTreeMap<String, String>,
        /// The load balancer whose VPC it goes in.
        vpc_of: LbRef,
    },
    /// Change a target group's health check.
    ModifyTargetGroup {
        /// Its ARN.
        arn: String,
        /// The health check wanted.
        health: HealthCheck,
    },
    /// Set target group attributes.
    ModifyTargetGroupAttributes {
        /// Which group.
        tg: TgRef,
        /// The attributes to send.
        attributes: BTreeMap<String, String>,
    },
    /// Remove targets (before adding: an emulator keyed by instance alone would otherwise drop
    /// a new registration when an old port of the same instance is removed).
    DeregisterTargets {
        /// Which group.
        tg: TgRef,
        /// (instance, port) pairs.
        targets: BTreeSet<(String, i32)>,
    },
    /// Add targets.
    RegisterTargets {
        /// Which group.
        tg: TgRef,
        /// (instance, port) pairs.
        targets: BTreeSet<(String, i32)>,
    },
    /// Delete a listener (its port is no longer wanted, or its protocol changes).
    DeleteListener {
        /// Its ARN.
        arn: String,
    },
    /// Create a listener forwarding to a target group.
    CreateListener {
        /// On which load balancer.
        lb: LbRef,
        /// Front-end port.
        port: i32,
        /// TCP, UDP, TCP_UDP or TLS.
        protocol: String,
        /// Where it forwards.
        tg: TgRef,
        /// Certificate and policy, for TLS.
        tls: Option<Tls>,
    },
    /// Point an existing listener at another target group.
    ModifyListener {
        /// Its ARN.
        arn: String,
        /// Where it forwards now.
        tg: TgRef,
        /// Certificate and policy to set, for TLS.
        tls: Option<Tls>,
    },
    /// Delete a target group of ours that is no longer wanted.
    DeleteTargetGroup {
        /// Its ARN.
        arn: String,
    },
}

impl ElbCall {
    /// The ELBv2 operation's name.
    pub fn operation(&self) -> &'static str {
        match self {
            ElbCall::DeleteLoadBalancer { .. } => "DeleteLoadBalancer",
            ElbCall::CreateLoadBalancer { .. } => "CreateLoadBalancer",
            ElbCall::ModifyLoadBalancerAttributes { .. } => "ModifyLoadBalancerAttributes",
            ElbCall::AddTags { .. } => "AddTags",
            ElbCall::CreateTargetGroup { .. } => "CreateTargetGroup",
            ElbCall::ModifyTargetGroup { .. } => "ModifyTargetGroup",
            ElbCall::ModifyTargetGroupAttributes { .. } => "ModifyTargetGroupAttributes",
            ElbCall::DeregisterTargets { .. } => "DeregisterTargets",
            ElbCall::RegisterTargets { .. } => "RegisterTargets",
            ElbCall::DeleteListener { .. } => "DeleteListener",
            ElbCall::CreateListener { .. } => "CreateListener",
            ElbCall::ModifyListener { .. } => "ModifyListener",
            ElbCall::DeleteTargetGroup { .. } => "DeleteTargetGroup",
        }
    }
}

/// The ELBv2 calls that bring one Service's load balancer to its desired state, in order, and
/// what the Service's resources are once they are made.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ElbPlan {
    /// The calls, in dependency order.
    pub calls: Vec<ElbCall>,
    /// The load balancer once applied (`None` for deletion, or when there is none).
    pub lb: Option<LbRef>,
    /// The wanted target groups once applied, with the port their targets are on.
    pub target_groups: Vec<(TgRef, i32)>,
}

impl ElbPlan {
    /// The operations' names in order (for logs and tests).
    pub fn operations(&self) -> Vec<&'static str> {
        self.calls.iter().map(ElbCall::operation).collect()
    }
}
