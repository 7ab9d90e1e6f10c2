//! The EC2 side of the AWS provider: subnet discovery and name lookup for new load balancers,
//! and the nodes' security-group rules that enforce `loadBalancerSourceRanges`
//! ([`super::security`] decides; this applies). Every call goes through the provider's budget
//! and call counter like the ELBv2 ones.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use aws_sdk_ec2 as ec2;
use ec2::types::{Filter, IpPermission, IpRange, Ipv6Range};
use ipnet::IpNet;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::budget::OpClass;
use super::discovery::{self, RouteTable, Subnet};
use super::elb::LbObs;
use super::security::{self, Group, GroupChange, Rule, Traffic};
use super::spec::DesiredLb;
use super::{AwsProvider, classify, is_code};
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

fn protocol_name(p: &str) -> String {
    match p {
        "6" => "tcp".into(),
        "17" => "udp".into(),
        "1" => "icmp".into(),
        "58" => "icmpv6".into(),
        other => other.to_ascii_lowercase(),
    }
}

/// Ungroups EC2's permissions into one rule per range.
fn rules_of(perms: &[IpPermission]) -> BTreeSet<Rule> {
    let mut out = BTreeSet::new();
    for p in perms {
        let protocol = protocol_name(p.ip_protocol().unwrap_or(""));
        let (from, to) = (p.from_port().unwrap_or(-1), p.to_port().unwrap_or(-1));
        let v4 = p
            .ip_ranges()
            .iter()
            .filter_map(|r| Some((r.cidr_ip()?, r.description())));
        let v6 = p
            .ipv6_ranges()
            .iter()
            .filter_map(|r| Some((r.cidr_ipv6()?, r.description())));
        for (cidr, desc) in v4.chain(v6) {
            let Ok(cidr) = cidr.parse::<IpNet>() else {
                continue;
            };
            out.insert(Rule {
                protocol: protocol.clone(),
                from,
                to,
                cidr,
                description: desc.unwrap_or("").to_string(),
            });
        }
    }
    out
}

fn permission(r: &Rule) -> IpPermission {
    let b = IpPermission::builder()
        .ip_protocol(&r.protocol)
        .from_port(r.from)
        .to_port(r.to);
    match r.cidr {
        IpNet::V4(_) => b.ip_ranges(
            IpRange::builder()
                .cidr_ip(r.cidr.to_string())
                .description(&r.description)
                .build(),
        ),
        IpNet::V6(_) => b.ipv6_ranges(
            Ipv6Range::builder()
                .cidr_ipv6(r.cidr.to_string())
                .description(&r.description)
                .build(),
        ),
    }
    .build()
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
        Ok(ids
            .iter()
            .map(|id| (id.clone(), cache.get(id).and_then(|(_, i)| i.clone())))
            .collect())
    }

    /// The VPC new load balancers go in: the cloud config's, else the one most of the nodes'
    /// instances are in.
    async fn vpc_of_nodes(&self, ids: &BTreeSet<String>) -> Result<String, ProviderError> {
        if let Some(v) = &self.vpc {
            return Ok(v.clone());
        }
        let mut count: BTreeMap<String, usize> = BTreeMap::new();
        for info in self.instances(ids).await?.into_values().flatten() {
            if let Some(v) = info.vpc {
                *count.entry(v).or_default() += 1;
            }
        }
        count
            .into_iter()
            .max_by(|a, b| a.1.cmp(&b.1).then(b.0.cmp(&a.0)))
            .map(|(v, _)| v)
            .ok_or_else(|| {
                ProviderError::retryable(
                    "cannot tell the VPC to find subnets in: no node has the providerID of a known EC2 instance; set vpcID or subnets in --cloud-config, or the aws-load-balancer-subnets annotation",
                )
            })
    }

    async fn describe_subnets(&self, filters: Vec<Filter>) -> Result<Vec<Subnet>, ProviderError> {
        let pages = self
            .pages(
                "DescribeSubnets",
                |t| {
                    self.ec2
                        .describe_subnets()
                        .set_filters(Some(filters.clone()))
                        .set_next_token(t)
                        .send()
                },
                |o| o.next_token(),
            )
            .await?;
        let mut out = vec![];
        for s in pages.iter().flat_map(|p| p.subnets()) {
            let (Some(id), Some(zone)) = (s.subnet_id(), s.availability_zone()) else {
                continue;
            };
            if let Some(c) = s.cidr_block().and_then(|c| c.parse::<IpNet>().ok()) {
                self.ec2_state
                    .subnet_cidrs
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(id.to_string(), c);
            }
            out.push(Subnet {
                id: id.to_string(),
                zone: zone.to_string(),
                tags: tag_map(s.tags()),
            });
        }
        Ok(out)
    }

    /// Subnet IDs for a new load balancer: `d.subnets` with `Name` tags resolved in the VPC,
    /// or, when it is empty, discovered there.
    pub(super) async fn subnets_for(
        &self,
        cluster: &str,
        d: &DesiredLb,
        nodes: &BTreeSet<String>,
    ) -> Result<Vec<String>, ProviderError> {
        let (ids, names): (Vec<&String>, Vec<&String>) =
            d.subnets.iter().partition(|s| s.starts_with("subnet-"));
        if !d.subnets.is_empty() && names.is_empty() {
            return Ok(d.subnets.clone());
        }
        let vpc = self.vpc_of_nodes(nodes).await?;
        if d.subnets.is_empty() {
            let subnets = self
                .describe_subnets(vec![filter("vpc-id", [vpc.clone()])])
                .await?;
            let tables = self.route_tables(&vpc).await?;
            let internal = d.scheme == super::spec::Scheme::Internal;
            let chosen = discovery::choose(&subnets, &tables, cluster, internal)
                .map_err(|e| ProviderError::retryable(format!("VPC {vpc}: {e}")))?;
            info!(lb = %d.name, %vpc, subnets = ?chosen, "discovered subnets");
            return Ok(chosen);
        }
        let found = self
            .describe_subnets(vec![
                filter("tag:Name", names.iter().map(|n| n.to_string())),
                filter("vpc-id", [vpc.clone()]),
            ])
            .await?;
        let mut out: Vec<String> = ids.into_iter().cloned().collect();
        for n in names {
            let matches: Vec<&Subnet> = found
                .iter()
                .filter(|s| s.tags.get("Name") == Some(n))
                .collect();
            match matches.as_slice() {
                [one] => out.push(one.id.clone()),
                [] => {
                    return Err(ProviderError::permanent(format!(
                        "annotation {}subnets: no subnet named {n:?} in VPC {vpc}",
                        super::spec::ANN
                    )));
                }
                _ => {
                    return Err(ProviderError::permanent(format!(
                        "annotation {}subnets: several subnets are named {n:?} in VPC {vpc}; use IDs",
                        super::spec::ANN
                    )));
                }
            }
        }
        Ok(out)
    }

    async fn route_tables(&self, vpc: &str) -> Result<Vec<RouteTable>, ProviderError> {
        let pages = self
            .pages(
                "DescribeRouteTables",
                |t| {
                    self.ec2
                        .describe_route_tables()
                        .filters(filter("vpc-id", [vpc.to_string()]))
                        .set_next_token(t)
                        .send()
                },
                |o| o.next_token(),
            )
            .await?;
        let mut out = vec![];
        for t in pages.iter().flat_map(|p| p.route_tables()) {
            out.push(RouteTable {
                subnets: t
                    .associations()
                    .iter()
                    .filter_map(|a| a.subnet_id().map(str::to_string))
                    .collect(),
                main: t.associations().iter().any(|a| a.main() == Some(true)),
                internet: t
                    .routes()
                    .iter()
                    .any(|r| r.gateway_id().is_some_and(|g| g.starts_with("igw"))),
            });
        }
        Ok(out)
    }

    /// IPv4 ranges of `subnets` (where health checks come from), cached forever.
    async fn subnet_ranges(&self, subnets: &[String]) -> Result<BTreeSet<IpNet>, ProviderError> {
        let missing: Vec<String> = {
            let c = self
                .ec2_state
                .subnet_cidrs
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            subnets
                .iter()
                .filter(|s| !c.contains_key(*s))
                .cloned()
                .collect()
        };
        if !missing.is_empty() {
            self.describe_subnets(vec![filter("subnet-id", missing)])
                .await?;
        }
        let c = self
            .ec2_state
            .subnet_cidrs
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        subnets
            .iter()
            .map(|s| {
                c.get(s).copied().ok_or_else(|| {
                    ProviderError::retryable(format!("subnet {s} of the load balancer not found"))
                })
            })
            .collect()
    }

    /// Every security group in `vpc`, and which of them are tagged for the cluster.
    async fn vpc_groups(
        &self,
        cluster: &str,
        vpc: &str,
    ) -> Result<(Vec<Group>, BTreeSet<String>), ProviderError> {
        let pages = self
            .pages(
                "DescribeSecurityGroups",
                |t| {
                    self.ec2
                        .describe_security_groups()
                        .filters(filter("vpc-id", [vpc.to_string()]))
                        .set_next_token(t)
                        .send()
                },
                |o| o.next_token(),
            )
            .await?;
        let mut groups = vec![];
        let mut tagged = BTreeSet::new();
        for g in pages.iter().flat_map(|p| p.security_groups()) {
            let Some(id) = g.group_id() else { continue };
            if security::has_cluster_tag(&tag_map(g.tags()), cluster) {
                tagged.insert(id.to_string());
            }
            groups.push(Group {
                id: id.to_string(),
                rules: rules_of(g.ip_permissions()),
            });
        }
        Ok((groups, tagged))
    }

    async fn apply_group_change(&self, c: &GroupChange) -> Result<(), ProviderError> {
        if !c.revoke.is_empty() {
            self.before(OpClass::Ec2Mutate, "RevokeSecurityGroupIngress")
                .await;
            match self
                .ec2
                .revoke_security_group_ingress()
                .group_id(&c.group)
                .set_ip_permissions(Some(c.revoke.iter().map(permission).collect()))
                .send()
                .await
            {
                Ok(_) => {}
                // Already gone (a concurrent change): the wanted state holds.
                Err(e) if is_code(&e, &["InvalidPermission.NotFound"]) => {}
                Err(e) => return Err(classify("RevokeSecurityGroupIngress", e)),
            }
        }
        if !c.grant.is_empty() {
            self.before(OpClass::Ec2Mutate, "AuthorizeSecurityGroupIngress")
                .await;
            match self
                .ec2
                .authorize_security_group_ingress()
                .group_id(&c.group)
                .set_ip_permissions(Some(c.grant.iter().map(permission).collect()))
                .send()
                .await
            {
                Ok(_) => {}
                Err(e) if is_code(&e, &["InvalidPermission.Duplicate"]) => {}
                // Every load balancer adds at least one rule to the nodes' group, so the
                // default quota (60 inbound rules per group) caps a cluster at a few dozen
                // such Services, as with cloud-provider-aws. Retryable: raising the quota
                // fixes it without touching the Service.
                Err(e) if is_code(&e, &["RulesPerSecurityGroupLimitExceeded"]) => {
                    return Err(ProviderError::retryable(format!(
                        "AuthorizeSecurityGroupIngress: security group {} is full (EC2 quota \"Inbound rules per security group\"): raise the quota, use fewer source ranges, or set disableSecurityGroupIngress in --cloud-config and manage the nodes' groups yourself",
                        c.group
                    )));
                }
                Err(e) => return Err(classify("AuthorizeSecurityGroupIngress", e)),
            }
        }
        info!(group = %c.group, granted = c.grant.len(), revoked = c.revoke.len(), "updated security group rules");
        Ok(())
    }

    /// The nodes' security groups (the group each known instance is opened through), and how
    /// many of the instances EC2 knows.
    async fn node_groups(
        &self,
        nodes: &BTreeSet<String>,
        tagged: &BTreeSet<String>,
    ) -> Result<(BTreeSet<String>, usize), ProviderError> {
        let mut out = BTreeSet::new();
        let mut known = 0;
        for (id, info) in self.instances(nodes).await? {
            let Some(info) = info else {
                debug!(instance = %id, "instance unknown to EC2: no security group to open");
                continue;
            };
            known += 1;
            match security::instance_group(&id, &info.groups, tagged) {
                Ok(Some(g)) => {
                    out.insert(g);
                }
                Ok(None) => warn!(instance = %id, "instance has no security group"),
                Err(e) => return Err(ProviderError::retryable(e)),
            }
        }
        Ok((out, known))
    }

    /// Brings the nodes' security groups in line with `d` (or, with `None`, removes the load
    /// balancer's rules everywhere in its VPC). `lb` is the load balancer as found: its VPC
    /// bounds the groups considered, its subnets are where health checks come from.
    pub(super) async fn ensure_security(
        &self,
        cluster: &str,
        lb_name: &str,
        lb: &LbObs,
        d: Option<&DesiredLb>,
        nodes: &BTreeSet<String>,
    ) -> Result<(), ProviderError> {
        if !self.manage_security_groups {
            return Ok(());
        }
        let Some(vpc) = lb.vpc.as_deref() else {
            warn!(lb = %lb_name, "load balancer has no VPC: security groups left alone");
            return Ok(());
        };
        let traffic = match d {
            Some(d) => Some(traffic(d, self.subnet_ranges(&lb.subnets).await?)),
            None => None,
        };
        let _serial = self.ec2_state.groups.lock().await;
        let (groups, tagged) = self.vpc_groups(cluster, vpc).await?;
        let node_groups = match d {
            Some(_) => {
                let (groups, known) = self.node_groups(nodes, &tagged).await?;
                if known == 0 && !nodes.is_empty() {
                    // Nodes exist but EC2 knows none of their instances (a describe that
                    // lags behind, or nodes outside this account): planning from "no node
                    // groups" would revoke this load balancer's rules everywhere and cut its
                    // traffic. Leave the groups as they are until instances are seen.
                    warn!(lb = %lb_name, nodes = nodes.len(), "no node instance known to EC2: security groups left as they are");
                    return Ok(());
                }
                groups
            }
            None => BTreeSet::new(),
        };
        for c in security::plan(&groups, &node_groups, lb_name, traffic.as_ref()) {
            self.apply_group_change(&c).await?;
        }
        let mut done = self
            .ec2_state
            .done
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        match d {
            Some(_) => done.insert(
                lb_name.to_string(),
                Ensured {
                    instances: nodes.clone(),
                    groups: node_groups,
                },
            ),
            None => done.remove(lb_name),
        };
        Ok(())
    }

    /// Whether a host update to `nodes` may skip the security-group pass: the rules were
    /// ensured by this process and the nodes bring no group beyond those (groups that fall
    /// out of use keep our rules until the next full sync, which is harmless).
    pub(super) async fn security_current(
        &self,
        lb_name: &str,
        nodes: &BTreeSet<String>,
    ) -> Result<bool, ProviderError> {
        if !self.manage_security_groups {
            return Ok(true);
        }
        let Some(done) = self
            .ec2_state
            .done
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(lb_name)
            .cloned()
        else {
            return Ok(false);
        };
        let instances = self.instances(nodes).await?;
        Ok(instances.iter().all(|(id, info)| match info {
            None => true,
            Some(_) if done.instances.contains(id) => true,
            // A new instance whose only group is already open; one with several groups
            // needs the tags to tell which, so the full pass.
            Some(i) => matches!(i.groups.as_slice(), [one] if done.groups.contains(one)),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permissions_round_trip_through_ec2_shapes() {
        let rules: BTreeSet<Rule> = [
            Rule {
                protocol: "tcp".into(),
                from: 30080,
                to: 30080,
                cidr: "10.0.0.0/8".parse().expect("cidr"),
                description: "kubernetes.io/rule/nlb/client=x".into(),
            },
            Rule {
                protocol: "icmpv6".into(),
                from: 2,
                to: 0,
                cidr: "2001:db8::/32".parse().expect("cidr"),
                description: security::MTU_RULE.into(),
            },
        ]
        .into();
        let perms: Vec<IpPermission> = rules.iter().map(permission).collect();
        assert_eq!(rules_of(&perms), rules);
    }

    #[test]
    fn numeric_protocols_are_named() {
        let p = IpPermission::builder()
            .ip_protocol("6")
            .from_port(1)
            .to_port(2)
            .ip_ranges(IpRange::builder().cidr_ip("10.0.0.0/8").build())
            .build();
        let r = rules_of(&[p]);
        assert_eq!(r.iter().next().map(|r| r.protocol.as_str()), Some("tcp"));
    }
}
