//! Subnet discovery for a load balancer whose Service names no subnets, as cloud-provider-aws
//! does it: the VPC's subnets tagged for the cluster (or carrying no cluster tag at all), public
//! ones only for internet-facing load balancers, one per availability zone, ties broken by the
//! role tag (`kubernetes.io/role/elb` or `kubernetes.io/role/internal-elb`), then by the cluster
//! tag, then by the lowest subnet ID. Pure: described subnets and route tables in, IDs out.
//!
//! Where we differ: upstream falls back to its own instance's subnet when nothing is tagged;
//! we run anywhere (possibly outside the cluster), so there is no such subnet and we report the
//! missing tags instead. Upstream also drops local and wavelength zones after asking EC2 for
//! zone types; we skip subnets whose zone name marks them as such (`-lz-`, `-wl`).

use std::collections::{BTreeMap, BTreeSet};

use super::security::has_cluster_tag;

/// Role tag of subnets for internet-facing load balancers.
pub const PUBLIC_ROLE_TAG: &str = "kubernetes.io/role/elb";
/// Role tag of subnets for internal load balancers.
pub const INTERNAL_ROLE_TAG: &str = "kubernetes.io/role/internal-elb";

/// A subnet as described.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Subnet {
    /// Subnet ID.
    pub id: String,
    /// Availability zone name.
    pub zone: String,
    /// Its tags.
    pub tags: BTreeMap<String, String>,
    /// Its VPC (a subnet named by a Service must be in the cluster's).
    pub vpc: Option<String>,
}

/// A route table as described: which subnets use it and whether it routes to an internet
/// gateway.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RouteTable {
    /// Subnets explicitly associated.
    pub subnets: BTreeSet<String>,
    /// The VPC's main table (used by subnets without an explicit association).
    pub main: bool,
    /// Has a route through an `igw-` gateway.
    pub internet: bool,
}

/// Whether `subnet` routes to the internet: its own table, else the main one.
fn is_public(tables: &[RouteTable], subnet: &str) -> Result<bool, String> {
    tables
        .iter()
        .find(|t| t.subnets.contains(subnet))
        .or_else(|| tables.iter().find(|t| t.main))
        .map(|t| t.internet)
        .ok_or_else(|| format!("no route table for subnet {subnet}"))
}

fn has_cluster_prefix_tag(tags: &BTreeMap<String, String>) -> bool {
    tags.keys().any(|k| k.starts_with("kubernetes.io/cluster/"))
}

fn special_zone(zone: &str) -> bool {
    zone.contains("-lz-") || zone.contains("-wl")
}

/// The subnets for a new load balancer in a VPC whose subnets and route tables are given.
pub fn choose(
    subnets: &[Subnet],
    tables: &[RouteTable],
    cluster: &str,
    internal: bool,
) -> Result<Vec<String>, String> {
    let role = if internal {
        INTERNAL_ROLE_TAG
    } else {
        PUBLIC_ROLE_TAG
    };
    let mut by_zone: BTreeMap<&str, &Subnet> = BTreeMap::new();
    for s in subnets {
        if s.id.is_empty() || s.zone.is_empty() || special_zone(&s.zone) {
            continue;
        }
        // Another cluster's subnet (tagged for it, not for us) is never used.
        if !has_cluster_tag(&s.tags, cluster) && has_cluster_prefix_tag(&s.tags) {
            continue;
        }
        if !internal && !is_public(tables, &s.id)? {
            continue;
        }
        let rank = |x: &Subnet| {
            (
                !x.tags.contains_key(role),
                !has_cluster_tag(&x.tags, cluster),
                x.id.clone(),
            )
        };
        match by_zone.get(s.zone.as_str()) {
            Some(cur) if rank(cur) <= rank(s) => {}
            _ => {
                by_zone.insert(&s.zone, s);
            }
        }
    }
    if by_zone.is_empty() {
        return Err(format!(
            "no subnet found for an {} load balancer: tag the VPC's subnets with kubernetes.io/cluster/{cluster} and {role}{}, or set the aws-load-balancer-subnets annotation",
            if internal {
                "internal"
            } else {
                "internet-facing"
            },
            if internal {
                ""
            } else {
                " (internet-facing needs subnets routed to an internet gateway)"
            },
        ));
    }
    Ok(by_zone.values().map(|s| s.id.clone()).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn subnet(id: &str, zone: &str, tags: &[(&str, &str)]) -> Subnet {
        Subnet {
            id: id.into(),
            zone: zone.into(),
            tags: tags
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            vpc: None,
        }
    }

    fn tables(public: &[&str]) -> Vec<RouteTable> {
        vec![
            RouteTable {
                subnets: BTreeSet::new(),
                main: true,
                internet: false,
            },
            RouteTable {
                subnets: public.iter().map(|s| s.to_string()).collect(),
                main: false,
                internet: true,
            },
        ]
    }

    #[test]
    fn one_public_subnet_per_zone_preferring_role_then_cluster_tag_then_id() {
        let c = "kubernetes.io/cluster/c1";
        let s = vec![
            subnet("subnet-b", "us-east-1a", &[(c, "shared")]),
            subnet("subnet-a", "us-east-1a", &[(c, "shared")]),
            subnet("subnet-c", "us-east-1b", &[]),
            subnet("subnet-d", "us-east-1b", &[(c, "owned")]),
            subnet("subnet-e", "us-east-1c", &[(c, "owned")]),
            subnet("subnet-f", "us-east-1c", &[(PUBLIC_ROLE_TAG, "1")]),
            subnet(
                "subnet-g",
                "us-east-1d",
                &[("kubernetes.io/cluster/other", "owned")],
            ),
            subnet("subnet-h", "us-east-1e", &[(c, "owned")]),
            subnet("subnet-i", "us-east-1-bos-1a-lz-1", &[(c, "owned")]),
        ];
        let public = [
            "subnet-a", "subnet-b", "subnet-c", "subnet-d", "subnet-e", "subnet-f", "subnet-g",
            "subnet-i",
        ];
        // subnet-h is private (main table, no internet gateway); subnet-g is another
        // cluster's; subnet-i is in a local zone.
        assert_eq!(
            choose(&s, &tables(&public), "c1", false),
            Ok(vec![
                "subnet-a".into(),
                "subnet-d".into(),
                "subnet-f".into()
            ])
        );
        // Internal load balancers may use private subnets too.
        assert_eq!(
            choose(&s, &tables(&public), "c1", true),
            Ok(vec![
                "subnet-a".into(),
                "subnet-d".into(),
                "subnet-e".into(),
                "subnet-h".into()
            ])
        );
    }

    #[test]
    fn internal_role_tag_wins_for_internal() {
        let s = vec![
            subnet("subnet-a", "z1", &[]),
            subnet("subnet-b", "z1", &[(INTERNAL_ROLE_TAG, "")]),
        ];
        assert_eq!(
            choose(&s, &tables(&[]), "c1", true),
            Ok(vec!["subnet-b".into()])
        );
    }

    #[test]
    fn nothing_suitable_says_which_tags_to_set() {
        let s = vec![subnet("subnet-a", "z1", &[])];
        let e = choose(&s, &tables(&[]), "c1", false).expect_err("private only");
        assert!(e.contains("kubernetes.io/role/elb"), "{e}");
        assert!(choose(&s, &[], "c1", false).is_err());
    }
}
