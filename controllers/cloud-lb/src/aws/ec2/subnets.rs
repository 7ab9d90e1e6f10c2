//! Subnets for a new load balancer: named ones resolved in the VPC, or discovered there
//! ([`crate::aws::discovery`] chooses), and subnet ranges (where health checks come from).

use std::collections::{BTreeMap, BTreeSet};

use ec2::types::Filter;
use ipnet::IpNet;
use tracing::info;

use super::{filter, tag_map};
use crate::aws::AwsProvider;
use crate::aws::discovery::{self, RouteTable, Subnet};
use crate::aws::spec::{DesiredLb, tenant};
use crate::provider::ProviderError;
use aws_sdk_ec2 as ec2;

impl AwsProvider {
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
                vpc: s.vpc_id().map(str::to_string),
            });
        }
        Ok(out)
    }

    /// The cluster's VPC, which subnets a Service names must be in: the cloud config's
    /// `vpcID`, else the one most nodes' instances are in, else the VPC of the config's default
    /// subnets (the operator's choice).
    async fn cluster_vpc(&self, nodes: &BTreeSet<String>) -> Result<String, ProviderError> {
        let from_nodes = self.vpc_of_nodes(nodes).await;
        if from_nodes.is_ok() || self.defaults.subnets.is_empty() {
            return from_nodes;
        }
        let ids: Vec<String> = self
            .defaults
            .subnets
            .iter()
            .filter(|s| s.starts_with("subnet-"))
            .cloned()
            .collect();
        let mut filters = vec![];
        if !ids.is_empty() {
            filters.push(filter("subnet-id", ids));
        }
        let names: Vec<String> = self
            .defaults
            .subnets
            .iter()
            .filter(|s| !s.starts_with("subnet-"))
            .cloned()
            .collect();
        if !names.is_empty() && filters.is_empty() {
            filters.push(filter("tag:Name", names));
        }
        let found = self.describe_subnets(filters).await?;
        let vpcs: BTreeSet<&str> = found.iter().filter_map(|s| s.vpc.as_deref()).collect();
        match vpcs.into_iter().collect::<Vec<_>>().as_slice() {
            [one] => Ok(one.to_string()),
            _ => from_nodes,
        }
    }

    /// Subnet IDs for the `subnets` annotation: every entry (ID or `Name` tag) described and
    /// refused unless it is a subnet of the cluster's VPC, so a namespace user cannot place a
    /// load balancer (and the health rules it brings into the nodes' groups) in another VPC.
    async fn service_subnets(
        &self,
        d: &DesiredLb,
        nodes: &BTreeSet<String>,
    ) -> Result<Vec<String>, ProviderError> {
        let vpc = self.cluster_vpc(nodes).await?;
        let (ids, names): (Vec<&String>, Vec<&String>) =
            d.subnets.iter().partition(|s| s.starts_with("subnet-"));
        let mut found = vec![];
        if !ids.is_empty() {
            found.extend(
                self.describe_subnets(vec![filter("subnet-id", ids.iter().map(|s| s.to_string()))])
                    .await?,
            );
        }
        if !names.is_empty() {
            // Any VPC: a name found only elsewhere is refused as foreign, not as unknown.
            found.extend(
                self.describe_subnets(vec![filter(
                    "tag:Name",
                    names.iter().map(|s| s.to_string()),
                )])
                .await?,
            );
        }
        let chosen = tenant::subnets_in_vpc(&d.subnets, &found, &vpc)?;
        info!(lb = %d.name, %vpc, subnets = ?chosen, "subnets from the Service's annotation");
        Ok(chosen)
    }

    /// Subnet IDs for a new load balancer: the Service's annotation (checked against the
    /// cluster's VPC), else the config's with `Name` tags resolved in the VPC, else discovered
    /// there.
    pub(crate) async fn subnets_for(
        &self,
        cluster: &str,
        d: &DesiredLb,
        nodes: &BTreeSet<String>,
    ) -> Result<Vec<String>, ProviderError> {
        if d.subnets_from_service {
            return self.service_subnets(d, nodes).await;
        }
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
            let internal = d.scheme == crate::aws::spec::Scheme::Internal;
            let chosen = discovery::choose(&subnets, &tables, cluster, internal).map_err(|e| {
                ProviderError::retryable(format!("VPC {vpc}: {e}"))
                    .with_code(crate::core::condition::SUBNETS_NOT_FOUND)
            })?;
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
                        crate::aws::spec::ANN
                    ))
                    .with_code(crate::core::condition::SUBNETS_NOT_FOUND));
                }
                _ => {
                    return Err(ProviderError::permanent(format!(
                        "annotation {}subnets: several subnets are named {n:?} in VPC {vpc}; use IDs",
                        crate::aws::spec::ANN
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
    pub(super) async fn subnet_ranges(
        &self,
        subnets: &[String],
    ) -> Result<BTreeSet<IpNet>, ProviderError> {
        let _one_lookup = self.ec2_state.subnet_lookups.lock().await;
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
}
