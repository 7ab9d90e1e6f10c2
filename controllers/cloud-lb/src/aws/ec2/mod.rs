//! The EC2 side of the AWS provider: subnet discovery and name lookup for new load balancers,
//! and the nodes' security-group rules that enforce `loadBalancerSourceRanges`
//! ([`super::security`] decides; this applies). Every call goes through the provider's budget
//! and call counter like the ELBv2 ones.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use aws_sdk_ec2 as ec2;
use ec2::types::Filter;
use ipnet::IpNet;
use tokio::time::Instant;

mod groups;
mod subnets;

use super::budget::OpClass;
use super::security::Traffic;
use super::spec::DesiredLb;
use super::{AwsProvider, classify};
use crate::provider::ProviderError;
use aws_sdk_elasticloadbalancingv2::error::{ProvideErrorMetadata, SdkError};

/// How long an instance's VPC and security groups are trusted without asking again. Nodes'
/// groups change rarely; a resync after this picks up a change.
pub const INSTANCE_TTL: Duration = Duration::from_secs(300);
/// How long "EC2 does not know this instance" is trusted: briefly, since a just-started
/// instance can be missing from describes for a moment (EC2 is eventually consistent).
pub const UNKNOWN_INSTANCE_TTL: Duration = Duration::from_secs(30);
/// Instance IDs per DescribeInstances call (filters take up to 200 values).
const INSTANCES_PER_CALL: usize = 200;

/// What we need of an instance.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InstanceInfo {
    /// Its VPC.
    pub vpc: Option<String>,
    /// Its security groups.
    pub groups: Vec<String>,
}

/// What one load balancer's last security-group pass covered.
#[derive(Clone, Debug, Default)]
struct Ensured {
    instances: BTreeSet<String>,
    groups: BTreeSet<String>,
}

/// EC2 state the provider keeps between syncs.
#[derive(Default)]
pub struct Ec2State {
    /// Described instances, with when.
    instances: tokio::sync::Mutex<HashMap<String, (Instant, Option<InstanceInfo>)>>,
    /// Subnet IPv4 ranges (a subnet's range never changes).
    subnet_cidrs: std::sync::Mutex<HashMap<String, IpNet>>,
    /// Serializes lookups of uncached subnet ranges, so concurrent syncs that miss the same
    /// subnets (every load balancer of a cold start) make one call.
    subnet_lookups: tokio::sync::Mutex<()>,
    /// Serializes read-modify-write of security groups within this process, so two load
    /// balancers' changes to one group (and its shared MTU rules) never interleave.
    groups: tokio::sync::Mutex<()>,
    /// The instances and node groups each load balancer's rules were last ensured for, so a
    /// host update whose nodes bring no new group skips the security-group pass.
    done: std::sync::Mutex<HashMap<String, Ensured>>,
}

impl Ec2State {
    /// Drops what says a load balancer's rules are current (a new leadership term).
    pub fn forget_ensured(&self) {
        self.done.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }
}

fn filter(name: &str, values: impl IntoIterator<Item = String>) -> Filter {
    Filter::builder()
        .name(name)
        .set_values(Some(values.into_iter().collect()))
        .build()
}

fn tag_map(tags: &[ec2::types::Tag]) -> BTreeMap<String, String> {
    tags.iter()
        .filter_map(|t| Some((t.key()?.to_string(), t.value().unwrap_or("").to_string())))
        .collect()
}

/// The node ports and health-check ports `d` sends traffic to.
pub fn traffic(d: &DesiredLb, health_cidrs: BTreeSet<IpNet>) -> Traffic {
    let mut client_ports = BTreeSet::new();
    let mut health_ports = BTreeSet::new();
    for tg in &d.target_groups {
        for proto in match tg.protocol.as_str() {
            "TCP_UDP" => &["tcp", "udp"][..],
            "UDP" => &["udp"][..],
            _ => &["tcp"][..],
        } {
            client_ports.insert((proto.to_string(), tg.node_port));
        }
        health_ports.insert(tg.health.port.parse::<i32>().unwrap_or(tg.node_port));
    }
    Traffic {
        lb_name: d.name.clone(),
        client_ports,
        health_ports,
        client_cidrs: d.source_ranges.clone(),
        health_cidrs,
    }
}

impl AwsProvider {
    /// Every page of an EC2 describe: each page passes the budget and the call counter, and
    /// `call` gets the previous page's token. `next` reads an output's token.
    async fn pages<T, E, F, Fut>(
        &self,
        op: &'static str,
        call: F,
        next: fn(&T) -> Option<&str>,
    ) -> Result<Vec<T>, ProviderError>
    where
        F: Fn(Option<String>) -> Fut,
        Fut: std::future::Future<Output = Result<T, SdkError<E>>>,
        E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    {
        let mut out = vec![];
        let mut token = None;
        loop {
            self.before(OpClass::Ec2Describe, op).await;
            let page = call(token).await.map_err(|e| classify(op, e))?;
            token = next(&page).map(str::to_string);
            out.push(page);
            if token.is_none() {
                return Ok(out);
            }
        }
    }

    /// VPC and groups of `ids`, from the cache when fresh. Instances EC2 does not know (or
    /// that are gone) map to `None`. One caller describes at a time, so concurrent syncs that
    /// miss the same new node make one call.
    pub(super) async fn instances(
        &self,
        ids: &BTreeSet<String>,
    ) -> Result<BTreeMap<String, Option<InstanceInfo>>, ProviderError> {
        let mut cache = self.ec2_state.instances.lock().await;
        let now = Instant::now();
        let missing: Vec<String> = ids
            .iter()
            .filter(|id| {
                cache.get(*id).is_none_or(|(at, info)| {
                    let ttl = if info.is_some() {
                        INSTANCE_TTL
                    } else {
                        UNKNOWN_INSTANCE_TTL
                    };
                    now.duration_since(*at) > ttl
                })
            })
            .cloned()
            .collect();
        for chunk in missing.chunks(INSTANCES_PER_CALL) {
            let mut found: HashMap<String, InstanceInfo> = HashMap::new();
            let pages = self
                .pages(
                    "DescribeInstances",
                    |t| {
                        self.ec2
                            .describe_instances()
                            // A filter, unlike InstanceIds, does not fail the whole call when
                            // one instance is unknown.
                            .filters(filter("instance-id", chunk.iter().cloned()))
                            .set_next_token(t)
                            .send()
                    },
                    |o| o.next_token(),
                )
                .await?;
            for out in &pages {
                for i in out.reservations().iter().flat_map(|r| r.instances()) {
                    let Some(id) = i.instance_id() else { continue };
                    found.insert(
                        id.to_string(),
                        InstanceInfo {
                            vpc: i.vpc_id().map(str::to_string),
                            groups: i
                                .security_groups()
                                .iter()
                                .filter_map(|g| g.group_id().map(str::to_string))
                                .collect(),
                        },
                    );
                }
            }
            for id in chunk {
                cache.insert(id.clone(), (now, found.remove(id)));
            }
        }
        if !missing.is_empty() {
            // Nodes come and go: without this, every instance ever seen stays cached.
            prune_instances(&mut cache, now);
        }
        Ok(ids
            .iter()
            .map(|id| (id.clone(), cache.get(id).and_then(|(_, i)| i.clone())))
            .collect())
    }
}

/// Drops cached instances too old to be trusted (they would be described again anyway), so the
/// cache holds only instances asked about within [`INSTANCE_TTL`].
fn prune_instances(cache: &mut HashMap<String, (Instant, Option<InstanceInfo>)>, now: Instant) {
    cache.retain(|_, (at, _)| now.duration_since(*at) <= INSTANCE_TTL);
}

#[cfg(test)]
mod cache_tests {
    use super::*;

    /// Issue 12, defect 8: the instance cache kept every instance ever described.
    #[test]
    fn instances_not_asked_about_within_the_ttl_are_dropped() {
        let t0 = Instant::now();
        let mut cache = HashMap::from([
            ("i-gone".to_string(), (t0, None)),
            (
                "i-live".to_string(),
                (
                    t0 + INSTANCE_TTL,
                    Some(InstanceInfo {
                        vpc: None,
                        groups: vec![],
                    }),
                ),
            ),
        ]);
        prune_instances(&mut cache, t0 + INSTANCE_TTL + Duration::from_secs(1));
        assert_eq!(cache.keys().collect::<Vec<_>>(), vec!["i-live"]);
    }
}
