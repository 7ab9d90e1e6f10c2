//! The cloud inventory sweep: every load balancer and target group the provider finds tagged
//! for `--cluster-name` is compared with the live Services, and what no Service accounts for is
//! an orphan, reported (`--cloud-orphans=report`) or deleted (`delete`). This closes the leaks
//! no per-Service reconcile can see: a Service deleted while no leader ran after someone removed
//! our finalizer, and a target group whose deletion failed before a restart (its name is no
//! longer derivable from the Service).
//!
//! This module is the pure part: an [`Inventory`] and the Services' [`Claim`]s in, the orphans
//! out in dependency order (load balancers, whose deletion takes their listeners, before target
//! groups). The [`sweep`] shell lists, decides and executes, only while leading.
//!
//! The race with a create: the shell lists the cloud first and reads the Service informer after,
//! so every resource our workers made for a Service (they act on the same informer) has that
//! Service in the snapshot, unless the Service is gone without our cleanup: exactly an orphan.
//! As a second guard against another writer (a replica that led a moment ago), a load balancer
//! younger than one sweep interval is never an orphan, and neither is a target group while a
//! young load balancer of the same Service exists (target groups have no creation time; ours
//! are made after their load balancer).
//!
//! The other way round, a Service's own cleanup may delete its resources between the listing
//! and the snapshot (the Service is gone by then): they are reported once as orphans, and in
//! `delete` mode deleted again, which the provider answers as already done.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, SystemTime};

use k8s_openapi::api::core::v1::Service;

use crate::core::{self, Action, ClassFilter};

pub(crate) mod sweep;
#[cfg(test)]
mod tests;

/// What `--cloud-orphans` asks the sweep to do with an orphan.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum OrphanMode {
    /// Count it in `service_controller_orphaned_cloud_resources` and log a Warning (default).
    #[default]
    Report,
    /// Report it, then delete it.
    Delete,
}

impl std::str::FromStr for OrphanMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "report" => Ok(OrphanMode::Report),
            "delete" => Ok(OrphanMode::Delete),
            other => Err(format!(
                "unknown mode {other:?} (expected report or delete)"
            )),
        }
    }
}

/// The kinds of cloud resources the sweep accounts for (the gauge's `kind` label).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    /// A load balancer (with its listeners).
    LoadBalancer,
    /// A target group.
    TargetGroup,
    /// A node security-group rule described as a load balancer's.
    SecurityGroupRule,
}

impl Kind {
    /// Every kind, for gauges that must read 0 when nothing is orphaned.
    pub const ALL: [Kind; 3] = [
        Kind::LoadBalancer,
        Kind::TargetGroup,
        Kind::SecurityGroupRule,
    ];

    /// The metric label value.
    pub fn label(self) -> &'static str {
        match self {
            Kind::LoadBalancer => "load_balancer",
            Kind::TargetGroup => "target_group",
            Kind::SecurityGroupRule => "security_group_rule",
        }
    }
}

/// A load balancer tagged as the cluster's, with a name the provider could have given.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TaggedLb {
    /// Its ARN (or the provider's ID).
    pub arn: String,
    /// Its name.
    pub name: String,
    /// The Service its tags name (`namespace/name`); `None` if they name none.
    pub service: Option<String>,
    /// When it was created, if the cloud says.
    pub created: Option<SystemTime>,
    /// Its VPC (where its security-group rules are).
    pub vpc: Option<String>,
    /// How many node security-group rules are described as this load balancer's.
    pub rules: usize,
}

/// A target group tagged as the cluster's.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TaggedTg {
    /// Its ARN.
    pub arn: String,
    /// Its name.
    pub name: String,
    /// The Service its tags name.
    pub service: Option<String>,
    /// The load balancers it is attached to (as the cloud reports; may name deleted ones).
    pub load_balancers: Vec<String>,
}

/// Everything the provider found for the cluster in one listing.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Inventory {
    /// Load balancers tagged as the cluster's.
    pub lbs: Vec<TaggedLb>,
    /// Target groups tagged as the cluster's.
    pub tgs: Vec<TaggedTg>,
    /// The ARN of every load balancer that exists, whoever owns it (a target group attached
    /// to one that is not an orphan is in use and never deleted).
    pub all_lbs: BTreeSet<String>,
}

/// How a live Service accounts for the resources its tags name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Claim {
    /// We serve it (or still clean it up): the names of the resources we would give it.
    Ours(BTreeSet<String>),
    /// A LoadBalancer Service of another implementation (e.g. cloud-provider-aws, which tags
    /// the same way): whatever its tags name is not ours to judge.
    Foreign,
    /// A Service that wants no load balancer from anyone (another type, or being deleted
    /// without our finalizer): what its tags name is left over.
    Nothing,
}

/// Why a resource is an orphan (for the log line).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Why {
    /// No Service of that name exists (or it is being deleted without our finalizer).
    ServiceGone,
    /// The Service exists but is no longer a LoadBalancer Service we serve.
    NotServed,
    /// The Service is ours but would get another name (it was deleted and created again,
    /// with a new UID, while no leader ran).
    Replaced,
    /// A target group of a Service we serve that none of its names and no live load balancer
    /// uses any more (a changed port, or a deletion that failed before a restart).
    Unused,
}

impl Why {
    /// A short phrase for logs.
    pub fn text(self) -> &'static str {
        match self {
            Why::ServiceGone => "its Service no longer exists",
            Why::NotServed => "its Service is no longer a LoadBalancer Service we serve",
            Why::Replaced => "its Service was replaced (another UID gets another name)",
            Why::Unused => "its Service's load balancer no longer uses it",
        }
    }
}

/// A resource no live Service accounts for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Orphan {
    /// Load balancer or target group.
    pub kind: Kind,
    /// Its ARN.
    pub arn: String,
    /// Its name.
    pub name: String,
    /// The Service its tags name.
    pub service: Option<String>,
    /// Its VPC (load balancers; where their rules are revoked before deletion).
    pub vpc: Option<String>,
    /// Security-group rules described as this load balancer's (revoked with it).
    pub rules: usize,
    /// Why it is an orphan.
    pub why: Why,
    /// Load balancers it is attached to (target groups; skipped when one of them could not be
    /// deleted).
    pub load_balancers: Vec<String>,
}

/// How every live Service accounts for resources, by `namespace/name`: ours (with the names the
/// provider gives its resources, from `names`), foreign LoadBalancer Services, and nothing for
/// the rest (a Service that is not a LoadBalancer, or is being deleted without our finalizer).
/// Which Services are ours is the controller's own [`core::action`].
pub fn claims<'a>(
    services: impl IntoIterator<Item = &'a Service>,
    filter: &ClassFilter,
    names: impl Fn(&Service) -> BTreeSet<String>,
) -> BTreeMap<String, Claim> {
    let mut out = BTreeMap::new();
    for s in services {
        let key = format!(
            "{}/{}",
            s.metadata.namespace.as_deref().unwrap_or(""),
            s.metadata.name.as_deref().unwrap_or("")
        );
        let is_lb = s.spec.as_ref().and_then(|sp| sp.type_.as_deref()) == Some("LoadBalancer");
        let claim = if core::action(s, filter) != Action::Ignore {
            Claim::Ours(names(s))
        } else if is_lb && s.metadata.deletion_timestamp.is_none() {
            Claim::Foreign
        } else {
            Claim::Nothing
        };
        out.insert(key, claim);
    }
    out
}

/// Whether something created at `created` is younger than `min_age` at `now` (a time in the
/// future, a clock step, counts as young).
fn young(created: Option<SystemTime>, now: SystemTime, min_age: Duration) -> bool {
    match created {
        None => false,
        Some(t) => now.duration_since(t).map_or(true, |age| age < min_age),
    }
}

/// The orphans in `inv` given the live Services' `claims`, load balancers first (deleting one
/// removes its listeners, which frees its target groups), each kind sorted by ARN.
///
/// A load balancer is an orphan when it is at least `min_age` old, names a Service, and that
/// Service is gone, not served by us, or ours under another name. A target group is an orphan
/// when it is attached to no load balancer that exists and is not itself an orphan, no young
/// load balancer of the same Service exists, and its Service is gone, not served by us, or
/// ours but without this group among the names it may use (every name of its current ports,
/// so a group an ensure is creating is never taken). A foreign LoadBalancer Service's
/// resources are never orphans, nor are resources whose tags name no Service: nothing proves
/// which Service they were for.
pub fn orphans(
    inv: &Inventory,
    claims: &BTreeMap<String, Claim>,
    now: SystemTime,
    min_age: Duration,
) -> Vec<Orphan> {
    let mut out = vec![];
    let mut young_services = BTreeSet::new();
    let mut orphan_lbs = BTreeSet::new();
    let mut lbs: Vec<&TaggedLb> = inv.lbs.iter().collect();
    lbs.sort_by(|a, b| a.arn.cmp(&b.arn));
    for lb in lbs {
        let Some(svc) = &lb.service else { continue };
        if young(lb.created, now, min_age) {
            young_services.insert(svc.clone());
            continue;
        }
        let why = match claims.get(svc) {
            None => Why::ServiceGone,
            Some(Claim::Nothing) => Why::NotServed,
            Some(Claim::Foreign) => continue,
            Some(Claim::Ours(names)) if names.contains(&lb.name) => continue,
            Some(Claim::Ours(_)) => Why::Replaced,
        };
        orphan_lbs.insert(lb.arn.clone());
        out.push(Orphan {
            kind: Kind::LoadBalancer,
            arn: lb.arn.clone(),
            name: lb.name.clone(),
            service: Some(svc.clone()),
            vpc: lb.vpc.clone(),
            rules: lb.rules,
            why,
            load_balancers: vec![],
        });
    }
    let mut tgs: Vec<&TaggedTg> = inv.tgs.iter().collect();
    tgs.sort_by(|a, b| a.arn.cmp(&b.arn));
    for tg in tgs {
        let Some(svc) = &tg.service else { continue };
        let in_use = tg
            .load_balancers
            .iter()
            .any(|l| inv.all_lbs.contains(l) && !orphan_lbs.contains(l));
        if in_use || young_services.contains(svc) {
            continue;
        }
        let why = match claims.get(svc) {
            None => Why::ServiceGone,
            Some(Claim::Nothing) => Why::NotServed,
            Some(Claim::Foreign) => continue,
            Some(Claim::Ours(names)) if names.contains(&tg.name) => continue,
            Some(Claim::Ours(_)) => Why::Unused,
        };
        out.push(Orphan {
            kind: Kind::TargetGroup,
            arn: tg.arn.clone(),
            name: tg.name.clone(),
            service: Some(svc.clone()),
            vpc: None,
            rules: 0,
            why,
            load_balancers: tg.load_balancers.clone(),
        });
    }
    out
}

/// How many orphans of each kind `orphans` holds (every kind present, 0 when none).
pub fn counts<'a>(orphans: impl IntoIterator<Item = &'a Orphan>) -> BTreeMap<Kind, i64> {
    let mut out: BTreeMap<Kind, i64> = Kind::ALL.iter().map(|k| (*k, 0)).collect();
    for o in orphans {
        *out.entry(o.kind).or_default() += 1;
        *out.entry(Kind::SecurityGroupRule).or_default() += o.rules as i64;
    }
    out
}
