//! The AWS side of the inventory sweep ([`crate::inventory`]): list every ELBv2 load balancer
//! and target group (paged, 400 a page), keep those named as we name a Service's resources
//! (`k8s-<ns>-<name>-…`), prove them the cluster's by their tags (DescribeTags, 20 ARNs a
//! call, coalesced with concurrent reconciles), count the node security-group rules described
//! as each load balancer's (one paged DescribeSecurityGroups per VPC), and delete an orphan:
//! a load balancer after revoking its rules (its listeners go with it), a target group.
//!
//! Name and tags together: cloud-provider-aws tags its load balancers exactly as we do
//! (`kubernetes.io/cluster/<cluster>=owned`, `kubernetes.io/service-name`), but names them
//! `a<uid>`, so a cluster where it serves class-less Services beside us never has its load
//! balancers taken for ours.

use std::collections::{BTreeMap, BTreeSet};
use std::time::SystemTime;

use aws_sdk_elasticloadbalancingv2 as elbv2;
use tracing::info;

use super::budget::OpClass;
use super::elb::LbObs;
use super::spec::{self, SERVICE_TAG};
use super::{AwsProvider, classify, is_code};
use crate::inventory::{Inventory, Kind, Orphan, TaggedLb, TaggedTg};
use crate::provider::ProviderError;

/// ELBv2's largest page for DescribeLoadBalancers and DescribeTargetGroups.
const PAGE: i32 = 400;

/// The Service (`namespace/name`) that `tags` prove `name` was made for in `cluster`: the
/// cluster tag says `owned`, the Service tag names it, and the name starts as we name that
/// Service's resources.
fn service_of(tags: &BTreeMap<String, String>, cluster: &str, name: &str) -> Option<String> {
    if tags
        .get(&spec::cluster_tag_key(cluster))
        .map(String::as_str)
        != Some("owned")
    {
        return None;
    }
    let key = tags.get(SERVICE_TAG)?;
    let (ns, svc) = key.split_once('/')?;
    name.starts_with(&spec::name_prefix(ns, svc))
        .then(|| key.clone())
}

impl AwsProvider {
    async fn all_load_balancers(&self) -> Result<Vec<elbv2::types::LoadBalancer>, ProviderError> {
        let mut out = vec![];
        let mut marker: Option<String> = None;
        loop {
            self.before(OpClass::Describe, "DescribeLoadBalancers")
                .await;
            let page = self
                .client
                .describe_load_balancers()
                .page_size(PAGE)
                .set_marker(marker.take())
                .send()
                .await
                .map_err(|e| classify("DescribeLoadBalancers", e))?;
            out.extend(page.load_balancers().iter().cloned());
            match page.next_marker() {
                Some(m) if !m.is_empty() => marker = Some(m.to_string()),
                _ => return Ok(out),
            }
        }
    }

    async fn all_target_groups(&self) -> Result<Vec<elbv2::types::TargetGroup>, ProviderError> {
        let mut out = vec![];
        let mut marker: Option<String> = None;
        loop {
            self.before(OpClass::Describe, "DescribeTargetGroups").await;
            let page = match self
                .client
                .describe_target_groups()
                .page_size(PAGE)
                .set_marker(marker.take())
                .send()
                .await
            {
                Ok(p) => p,
                // Some emulators answer "not found" when there is none at all.
                Err(e) if is_code(&e, &["TargetGroupNotFound"]) => return Ok(out),
                Err(e) => return Err(classify("DescribeTargetGroups", e)),
            };
            out.extend(page.target_groups().iter().cloned());
            match page.next_marker() {
                Some(m) if !m.is_empty() => marker = Some(m.to_string()),
                _ => return Ok(out),
            }
        }
    }

    /// Everything tagged for `cluster` under a name we could have given (see the module docs).
    pub(crate) async fn list_inventory(&self, cluster: &str) -> Result<Inventory, ProviderError> {
        let lbs = self.all_load_balancers().await?;
        let tgs = self.all_target_groups().await?;
        let all_lbs: BTreeSet<String> = lbs
            .iter()
            .filter_map(|l| l.load_balancer_arn().map(str::to_string))
            .collect();
        let named = |n: Option<&str>| n.is_some_and(|n| n.starts_with("k8s-"));
        let mut arns: Vec<String> = lbs
            .iter()
            .filter(|l| named(l.load_balancer_name()))
            .filter_map(|l| l.load_balancer_arn().map(str::to_string))
            .collect();
        arns.extend(
            tgs.iter()
                .filter(|t| named(t.target_group_name()))
                .filter_map(|t| t.target_group_arn().map(str::to_string)),
        );
        let tags = self.tags(&arns).await?;
        let mut inv = Inventory {
            all_lbs,
            ..Default::default()
        };
        for l in &lbs {
            let (Some(arn), Some(name)) = (l.load_balancer_arn(), l.load_balancer_name()) else {
                continue;
            };
            let Some(service) = tags.get(arn).and_then(|t| service_of(t, cluster, name)) else {
                continue;
            };
            inv.lbs.push(TaggedLb {
                arn: arn.to_string(),
                name: name.to_string(),
                service: Some(service),
                created: l.created_time().and_then(|t| SystemTime::try_from(*t).ok()),
                vpc: l.vpc_id().map(str::to_string),
                rules: 0,
            });
        }
        for t in &tgs {
            let (Some(arn), Some(name)) = (t.target_group_arn(), t.target_group_name()) else {
                continue;
            };
            let Some(service) = tags.get(arn).and_then(|g| service_of(g, cluster, name)) else {
                continue;
            };
            inv.tgs.push(TaggedTg {
                arn: arn.to_string(),
                name: name.to_string(),
                service: Some(service),
                load_balancers: t.load_balancer_arns().to_vec(),
            });
        }
        if self.manage_security_groups {
            let vpcs: BTreeSet<String> = inv.lbs.iter().filter_map(|l| l.vpc.clone()).collect();
            for vpc in vpcs {
                let counts = self.rules_by_lb(cluster, &vpc).await?;
                for l in inv
                    .lbs
                    .iter_mut()
                    .filter(|l| l.vpc.as_deref() == Some(&vpc))
                {
                    l.rules = counts.get(&l.name).copied().unwrap_or(0);
                }
            }
        }
        Ok(inv)
    }

    /// Deletes one orphan: a load balancer's security-group rules, then the load balancer
    /// (which takes its listeners); or a target group. Already gone counts as deleted.
    pub(crate) async fn delete_orphan_resource(
        &self,
        cluster: &str,
        o: &Orphan,
    ) -> Result<(), ProviderError> {
        match o.kind {
            Kind::LoadBalancer => {
                let lb = LbObs {
                    arn: o.arn.clone(),
                    vpc: o.vpc.clone(),
                    ..Default::default()
                };
                // Rules first: once the load balancer is gone, nothing says which VPC they
                // are in.
                self.ensure_security(cluster, &o.name, &lb, None, &BTreeSet::new())
                    .await?;
                self.forget(&o.name);
                if self.dry_delete("DeleteLoadBalancer", &o.name, &o.arn) {
                    return Ok(());
                }
                self.before(OpClass::Mutate, "DeleteLoadBalancer").await;
                match self
                    .client
                    .delete_load_balancer()
                    .load_balancer_arn(&o.arn)
                    .send()
                    .await
                {
                    Ok(_) => info!(lb = %o.name, arn = %o.arn, "deleted orphaned load balancer"),
                    Err(e) if is_code(&e, &["LoadBalancerNotFound"]) => {}
                    Err(e) => return Err(classify("DeleteLoadBalancer", e)),
                }
            }
            Kind::TargetGroup => {
                if self.dry_delete("DeleteTargetGroup", &o.name, &o.arn) {
                    return Ok(());
                }
                self.before(OpClass::Mutate, "DeleteTargetGroup").await;
                match self
                    .client
                    .delete_target_group()
                    .target_group_arn(&o.arn)
                    .send()
                    .await
                {
                    Ok(_) => info!(tg = %o.name, arn = %o.arn, "deleted orphaned target group"),
                    Err(e) if is_code(&e, &["TargetGroupNotFound"]) => {}
                    Err(e) => return Err(classify("DeleteTargetGroup", e)),
                }
            }
            Kind::SecurityGroupRule => {
                return Err(ProviderError::permanent(
                    "security-group rules are revoked with their load balancer",
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_owned_resources_named_for_their_service_are_ours() {
        let tags = |cluster: &str, value: &str, svc: Option<&str>| {
            let mut t = BTreeMap::from([(
                format!("kubernetes.io/cluster/{cluster}"),
                value.to_string(),
            )]);
            if let Some(s) = svc {
                t.insert(SERVICE_TAG.to_string(), s.to_string());
            }
            t
        };
        let ours = "k8s-shop-web-0123456789";
        assert_eq!(
            service_of(&tags("c", "owned", Some("shop/web")), "c", ours).as_deref(),
            Some("shop/web")
        );
        for (what, t, name) in [
            (
                "another cluster",
                tags("d", "owned", Some("shop/web")),
                ours,
            ),
            (
                "shared, not owned",
                tags("c", "shared", Some("shop/web")),
                ours,
            ),
            ("no Service tag", tags("c", "owned", None), ours),
            (
                "malformed Service tag",
                tags("c", "owned", Some("web")),
                ours,
            ),
            // cloud-provider-aws's own load balancers: same tags, `a<uid>` names.
            (
                "cloud-provider-aws's name",
                tags("c", "owned", Some("shop/web")),
                "a0123456789abcdef0123456789abcde",
            ),
            (
                "another Service's name",
                tags("c", "owned", Some("shop/web")),
                "k8s-shop-api-0123456789",
            ),
        ] {
            assert_eq!(service_of(&t, "c", name), None, "{what}");
        }
    }
}
