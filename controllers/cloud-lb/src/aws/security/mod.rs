//! `loadBalancerSourceRanges` for network load balancers, as cloud-provider-aws enforces them:
//! an NLB with instance targets keeps the client's address, so the filter lives in the nodes'
//! security groups. For each load balancer we keep ingress rules on each node's security group
//! (the one tagged for the cluster, else its only group) that open the Service's node ports to
//! the source ranges (the *client* rule), the health-check ports to the load balancer's subnets
//! (the *health* rule, skipped when the client rule already covers it) and ICMP
//! "fragmentation needed" from every client range (the *MTU* rule, shared by all load
//! balancers), and we revoke our rules from every other group.
//!
//! This module is the pure part: observed groups in, grants and revokes out. Rules are ours by
//! their description (`kubernetes.io/rule/nlb/client=<load balancer name>`, as upstream), and
//! only rules carrying one of our descriptions are ever revoked.
//!
//! Where we deliberately differ from cloud-provider-aws: a rule's protocol follows its port
//! (upstream uses UDP for every port once any port is UDP, and both for TCP_UDP listeners we
//! open TCP and UDP); IPv6 ranges become IPv6 rules (upstream would send them as IPv4 and
//! fail), with ICMPv6 "packet too big" as their MTU rule; a rule that exists with another
//! description (one a person added) satisfies ours instead of failing as a duplicate on every
//! sync.

use std::collections::{BTreeMap, BTreeSet};

use ipnet::IpNet;

/// Description prefix of client rules (`<prefix>=<load balancer name>`).
pub const CLIENT_RULE: &str = "kubernetes.io/rule/nlb/client";
/// Description prefix of health-check rules.
pub const HEALTH_RULE: &str = "kubernetes.io/rule/nlb/health";
/// Description of MTU-discovery rules (shared by every load balancer, so no name).
pub const MTU_RULE: &str = "kubernetes.io/rule/nlb/mtu";
/// The legacy cluster tag cloud-provider-aws still honours (`KubernetesCluster=<cluster>`).
pub const LEGACY_CLUSTER_TAG: &str = "KubernetesCluster";

/// One ingress rule for one address range, as EC2 stores it once ungrouped.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Rule {
    /// `tcp`, `udp`, `icmp` or `icmpv6` (lower case).
    pub protocol: String,
    /// First port, or the ICMP type.
    pub from: i32,
    /// Last port, or the ICMP code.
    pub to: i32,
    /// Source range.
    pub cidr: IpNet,
    /// The rule's description (how we recognise ours).
    pub description: String,
}

impl Rule {
    /// What EC2 identifies a rule by: everything but the description.
    fn identity(&self) -> (&str, i32, i32, IpNet) {
        (&self.protocol, self.from, self.to, self.cidr)
    }
}

/// A security group as observed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Group {
    /// Group ID.
    pub id: String,
    /// Its ingress rules, one per range.
    pub rules: BTreeSet<Rule>,
}

/// What one load balancer needs opened on the nodes' groups.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Traffic {
    /// The load balancer's name (part of every rule description).
    pub lb_name: String,
    /// Node ports clients reach, with their protocol (`tcp` or `udp`).
    pub client_ports: BTreeSet<(String, i32)>,
    /// Ports the load balancer's health checks reach (TCP).
    pub health_ports: BTreeSet<i32>,
    /// Allowed client ranges (`loadBalancerSourceRanges`, default everything).
    pub client_cidrs: BTreeSet<IpNet>,
    /// The load balancer's subnet ranges, where health checks come from.
    pub health_cidrs: BTreeSet<IpNet>,
}

/// The changes for one group.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GroupChange {
    /// Group ID.
    pub group: String,
    /// Rules to authorize.
    pub grant: Vec<Rule>,
    /// Rules to revoke.
    pub revoke: Vec<Rule>,
}

impl GroupChange {
    /// The order the rules change in, so that a failure part-way (EC2's rule quota, an outage)
    /// never leaves the load balancer with neither its old nor its new rules: revokes that must
    /// make room for a grant of the same rule identity first (EC2 refuses a duplicate), then
    /// every grant, then the other revokes.
    pub fn steps(&self) -> (Vec<Rule>, Vec<Rule>, Vec<Rule>) {
        let granted: BTreeSet<_> = self.grant.iter().map(Rule::identity).collect();
        let (first, last) = self
            .revoke
            .iter()
            .cloned()
            .partition(|r| granted.contains(&r.identity()));
        (first, self.grant.clone(), last)
    }
}

/// The client rule description for `lb_name`.
pub fn client_description(lb_name: &str) -> String {
    format!("{CLIENT_RULE}={lb_name}")
}

/// The health rule description for `lb_name`.
pub fn health_description(lb_name: &str) -> String {
    format!("{HEALTH_RULE}={lb_name}")
}

/// Whether tags mark a resource as the cluster's (`kubernetes.io/cluster/<cluster>` with any
/// value, or the legacy `KubernetesCluster=<cluster>`), as cloud-provider-aws reads them.
pub fn has_cluster_tag(tags: &BTreeMap<String, String>, cluster: &str) -> bool {
    tags.contains_key(&super::spec::cluster_tag_key(cluster))
        || tags.get(LEGACY_CLUSTER_TAG).map(String::as_str) == Some(cluster)
}

/// The group of an instance we open: the one tagged for the cluster if any (more than one
/// tagged is an error), else its only group (more than one untagged is an error); `None` when
/// it has none. cloud-provider-aws's rule, so clusters set up for it work unchanged.
pub fn instance_group(
    instance: &str,
    groups: &[String],
    tagged: &BTreeSet<String>,
) -> Result<Option<String>, String> {
    let (with_tag, without): (Vec<&String>, Vec<&String>) =
        groups.iter().partition(|g| tagged.contains(*g));
    match (with_tag.as_slice(), without.as_slice()) {
        ([one], _) => Ok(Some((*one).clone())),
        ([], [one]) => Ok(Some((*one).clone())),
        ([], []) => Ok(None),
        ([], many) => Err(format!(
            "instance {instance} has several security groups ({}) and none is tagged for the cluster; tag the one to open",
            join(many)
        )),
        (many, _) => Err(format!(
            "instance {instance} has several security groups tagged for the cluster ({}); tag only one",
            join(many)
        )),
    }
}

fn join(ids: &[&String]) -> String {
    ids.iter()
        .map(|s| s.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

fn everything_v4() -> IpNet {
    IpNet::V4(ipnet::Ipv4Net::default())
}

/// The rules `t` wants on each of the nodes' groups.
fn wanted_rules(t: &Traffic) -> BTreeSet<Rule> {
    let client = client_description(&t.lb_name);
    let health = health_description(&t.lb_name);
    let mut out = BTreeSet::new();
    for (proto, port) in &t.client_ports {
        for cidr in &t.client_cidrs {
            out.insert(Rule {
                protocol: proto.clone(),
                from: *port,
                to: *port,
                cidr: *cidr,
                description: client.clone(),
            });
        }
    }
    // Health checks are TCP; when clients from everywhere already reach exactly those ports
    // over TCP, the health rule would be a duplicate (upstream skips it then too).
    let tcp_client_ports: BTreeSet<i32> = t
        .client_ports
        .iter()
        .filter(|(p, _)| p == "tcp")
        .map(|(_, n)| *n)
        .collect();
    let covered = t.client_cidrs.contains(&everything_v4()) && t.health_ports == tcp_client_ports;
    if !covered {
        for port in &t.health_ports {
            for cidr in &t.health_cidrs {
                out.insert(Rule {
                    protocol: "tcp".into(),
                    from: *port,
                    to: *port,
                    cidr: *cidr,
                    description: health.clone(),
                });
            }
        }
    }
    out
}

/// How many ingress rules `t` needs on a node group: its client and health rules, and the MTU
/// rule of each client range (shared with other load balancers, but each range the Service
/// brings is one more rule on the group). What the per-Service cap counts.
pub fn rules_needed(t: &Traffic) -> usize {
    let mtu = if t.client_ports.is_empty() {
        0
    } else {
        t.client_cidrs.len()
    };
    wanted_rules(t).len() + mtu
}

fn mtu_rule(cidr: IpNet) -> Rule {
    // ICMP type 3 code 4 (fragmentation needed) for IPv4, ICMPv6 type 2 code 0 (packet too
    // big) for IPv6; EC2 puts the type in FromPort and the code in ToPort.
    let (protocol, from, to) = match cidr {
        IpNet::V4(_) => ("icmp", 3, 4),
        IpNet::V6(_) => ("icmpv6", 2, 0),
    };
    Rule {
        protocol: protocol.into(),
        from,
        to,
        cidr,
        description: MTU_RULE.into(),
    }
}

/// The grants and revokes that bring every group in line for one load balancer: the nodes'
/// groups (`node_groups`) get `traffic`'s rules, every other group loses the rules described
/// as this load balancer's (all groups lose them when `traffic` is `None`: deletion). MTU
/// rules follow the client rules of every load balancer left on the group. Groups with
/// nothing to change are left out, so a converged state plans nothing.
pub fn plan(
    groups: &[Group],
    node_groups: &BTreeSet<String>,
    lb_name: &str,
    traffic: Option<&Traffic>,
) -> Vec<GroupChange> {
    let ours: BTreeSet<String> = [client_description(lb_name), health_description(lb_name)].into();
    let wanted = traffic.map(wanted_rules).unwrap_or_default();
    let mut out = Vec::new();
    for g in groups {
        let want_here = traffic.is_some() && node_groups.contains(&g.id);
        let mut after: BTreeSet<Rule> = g.rules.clone();
        let mut change = GroupChange {
            group: g.id.clone(),
            ..Default::default()
        };
        for r in &g.rules {
            // An MTU-described rule that is not an MTU rule (edited by hand) could shadow a
            // wanted rule's identity; it goes first.
            let bent_mtu = r.description == MTU_RULE && *r != mtu_rule(r.cidr);
            if bent_mtu || ours.contains(&r.description) && !(want_here && wanted.contains(r)) {
                change.revoke.push(r.clone());
                after.remove(r);
            }
        }
        if want_here {
            for r in &wanted {
                if !after.iter().any(|h| h.identity() == r.identity()) {
                    change.grant.push(r.clone());
                    after.insert(r.clone());
                }
            }
        }
        let mtu_wanted: BTreeSet<Rule> = after
            .iter()
            .filter(|r| r.description.starts_with(CLIENT_RULE))
            .map(|r| mtu_rule(r.cidr))
            .collect();
        for r in &after {
            if r.description == MTU_RULE && !mtu_wanted.contains(r) {
                change.revoke.push(r.clone());
            }
        }
        for r in &mtu_wanted {
            if !after.iter().any(|h| h.identity() == r.identity()) {
                change.grant.push(r.clone());
            }
        }
        if !change.grant.is_empty() || !change.revoke.is_empty() {
            out.push(change);
        }
    }
    // Groups that gain rules before groups that only lose them (a node moving between
    // groups): the load balancer is never closed on every group at once.
    out.sort_by_key(|c| c.grant.is_empty());
    out
}
#[cfg(test)]
mod tests;
