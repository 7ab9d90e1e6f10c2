//! The nodes' security-group rules for each load balancer: observed groups are handed to
//! [`crate::aws::security::plan`], and its grants and revokes applied here.

use std::collections::BTreeSet;

use aws_sdk_ec2 as ec2;
use ec2::types::{IpPermission, IpRange, Ipv6Range};
use ipnet::IpNet;
use tracing::{debug, info, warn};

use super::{Ensured, filter, tag_map, traffic};
use crate::aws::budget::OpClass;
use crate::aws::elb::LbObs;
use crate::aws::security::{self, Group, GroupChange, Rule};
use crate::aws::spec::DesiredLb;
use crate::aws::{AwsProvider, classify, is_code};
use crate::provider::ProviderError;

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

impl AwsProvider {
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

    /// How many ingress rules in `vpc`'s security groups are described as each load balancer's
    /// (client and health rules, by load balancer name): what the inventory sweep reports
    /// beside an orphaned load balancer. One paged DescribeSecurityGroups.
    pub(crate) async fn rules_by_lb(
        &self,
        cluster: &str,
        vpc: &str,
    ) -> Result<std::collections::BTreeMap<String, usize>, ProviderError> {
        let (groups, _) = self.vpc_groups(cluster, vpc).await?;
        let mut out = std::collections::BTreeMap::new();
        for r in groups.iter().flat_map(|g| g.rules.iter()) {
            let lb = [security::CLIENT_RULE, security::HEALTH_RULE]
                .iter()
                .find_map(|p| r.description.strip_prefix(p)?.strip_prefix('='));
            if let Some(lb) = lb {
                *out.entry(lb.to_string()).or_default() += 1;
            }
        }
        Ok(out)
    }

    /// Revokes `rules` from `group`; rules already gone count as revoked.
    async fn revoke(&self, group: &str, rules: &[Rule]) -> Result<(), ProviderError> {
        if rules.is_empty() || self.dry_rules("RevokeSecurityGroupIngress", group, rules) {
            return Ok(());
        }
        self.before(OpClass::Ec2Mutate, "RevokeSecurityGroupIngress")
            .await;
        match self
            .ec2
            .revoke_security_group_ingress()
            .group_id(group)
            .set_ip_permissions(Some(rules.iter().map(permission).collect()))
            .send()
            .await
        {
            Ok(_) => {}
            // Already gone (a concurrent change): the wanted state holds.
            Err(e) if is_code(&e, &["InvalidPermission.NotFound"]) => {}
            Err(e) => return Err(classify("RevokeSecurityGroupIngress", e)),
        }
        Ok(())
    }

    async fn apply_group_change(&self, c: &GroupChange) -> Result<(), ProviderError> {
        let (revoke_first, grant, revoke_last) = c.steps();
        self.revoke(&c.group, &revoke_first).await?;
        if !grant.is_empty() && !self.dry_rules("AuthorizeSecurityGroupIngress", &c.group, &grant) {
            self.before(OpClass::Ec2Mutate, "AuthorizeSecurityGroupIngress")
                .await;
            match self
                .ec2
                .authorize_security_group_ingress()
                .group_id(&c.group)
                .set_ip_permissions(Some(grant.iter().map(permission).collect()))
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
        self.revoke(&c.group, &revoke_last).await?;
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
    pub(crate) async fn ensure_security(
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
            Some(d) => {
                let health_cidrs = self.subnet_ranges(&lb.subnets).await?;
                // Now with the health rules counted: refused before any group changes.
                self.check_rule_cap(d, health_cidrs.clone())?;
                Some(traffic(d, health_cidrs))
            }
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
    pub(crate) async fn security_current(
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
