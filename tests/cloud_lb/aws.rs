//! moto behind the fault-injecting layer, and what the tests read from it directly.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use anyhow::{Result, anyhow};
use cloud_lb::aws::elbv2_sdk as elbv2;
use cloud_lb::aws::{
    AwsCloudConfig, AwsProvider, budget::Rate, budget::RateLimits, ec2_sdk as ec2, emulator_client,
    emulator_ec2_client,
};
use cloud_lb::{CloudLbConfig, ProviderKind};
use k8s_openapi::api::core::v1::Service;
use test_support::moto::{FaultProxy, Moto, REGION};
use test_support::wait_for;

use crate::harness::*;

/// moto, the fault layer in front of it, and clients straight to moto for assertions.
pub struct Aws {
    pub moto: Moto,
    pub proxy: FaultProxy,
    /// Straight to moto, for assertions (not counted by the proxy).
    pub elb: elbv2::Client,
    /// EC2 straight to moto, for setup and assertions.
    pub ec2: ec2::Client,
    pub subnets: Vec<String>,
    pub cluster: String,
}

impl Aws {
    pub async fn start(cluster: &str) -> Result<Aws> {
        let moto = Moto::start().await?;
        let proxy = FaultProxy::start(&moto.addr).await?;
        let subnets = moto.default_subnets().await?;
        let elb = emulator_client(&moto.endpoint, REGION, 1);
        let ec2 = emulator_ec2_client(&moto.endpoint, REGION, 1);
        Ok(Aws {
            moto,
            proxy,
            elb,
            ec2,
            subnets,
            cluster: cluster.into(),
        })
    }

    pub fn provider(&self) -> Arc<AwsProvider> {
        self.provider_with(AwsCloudConfig {
            subnets: self.subnets[..1].to_vec(),
            ..Default::default()
        })
    }

    /// A provider with `cfg` and a budget that never slows a test.
    pub fn provider_with(&self, cfg: AwsCloudConfig) -> Arc<AwsProvider> {
        let fast = Rate {
            qps: 1000.0,
            burst: 1000,
        };
        Arc::new(
            // Two SDK attempts: most injected faults surface to the controller's backoff.
            AwsProvider::for_emulator(
                &self.proxy.endpoint,
                REGION,
                2,
                AwsCloudConfig {
                    rate_limits: RateLimits::uniform(fast),
                    ..cfg
                },
            ),
        )
    }

    pub async fn vpc_of_subnet(&self, subnet: &str) -> Result<String> {
        let r = self
            .ec2
            .describe_subnets()
            .subnet_ids(subnet)
            .send()
            .await?;
        r.subnets()
            .first()
            .and_then(|s| s.vpc_id())
            .map(str::to_string)
            .ok_or_else(|| anyhow!("no subnet {subnet}"))
    }

    pub async fn tag(&self, id: &str, tags: &[(&str, &str)]) -> Result<()> {
        let mut req = self.ec2.create_tags().resources(id);
        for (k, v) in tags {
            req = req.tags(ec2::types::Tag::builder().key(*k).value(*v).build());
        }
        req.send().await?;
        Ok(())
    }

    pub async fn security_group(
        &self,
        vpc: &str,
        name: &str,
        tags: &[(&str, &str)],
    ) -> Result<String> {
        let g = self
            .ec2
            .create_security_group()
            .group_name(name)
            .description(name)
            .vpc_id(vpc)
            .send()
            .await?;
        let id = g
            .group_id()
            .ok_or_else(|| anyhow!("no group id"))?
            .to_string();
        if !tags.is_empty() {
            self.tag(&id, tags).await?;
        }
        Ok(id)
    }

    /// Starts an instance in `subnet` with `groups`; its ID.
    pub async fn instance(&self, subnet: &str, groups: &[&str]) -> Result<String> {
        let r = self
            .ec2
            .run_instances()
            .image_id("ami-12c6146b")
            .min_count(1)
            .max_count(1)
            .subnet_id(subnet)
            .set_security_group_ids(Some(groups.iter().map(|g| g.to_string()).collect()))
            .send()
            .await?;
        r.instances()
            .first()
            .and_then(|i| i.instance_id())
            .map(str::to_string)
            .ok_or_else(|| anyhow!("no instance"))
    }

    /// A group's ingress rules as (protocol, from port, range, description).
    pub async fn rules(&self, group: &str) -> BTreeSet<(String, i32, String, String)> {
        let Ok(r) = self
            .ec2
            .describe_security_groups()
            .group_ids(group)
            .send()
            .await
        else {
            return BTreeSet::new();
        };
        let mut out = BTreeSet::new();
        for p in r.security_groups().iter().flat_map(|g| g.ip_permissions()) {
            let proto = p.ip_protocol().unwrap_or("").to_string();
            let from = p.from_port().unwrap_or(-1);
            for x in p.ip_ranges() {
                out.insert((
                    proto.clone(),
                    from,
                    x.cidr_ip().unwrap_or("").to_string(),
                    x.description().unwrap_or("").to_string(),
                ));
            }
            for x in p.ipv6_ranges() {
                out.insert((
                    proto.clone(),
                    from,
                    x.cidr_ipv6().unwrap_or("").to_string(),
                    x.description().unwrap_or("").to_string(),
                ));
            }
        }
        out
    }

    /// Subnets a load balancer was created in.
    pub async fn lb_subnets(&self, svc: &Service) -> BTreeSet<String> {
        self.lb_of(svc)
            .await
            .map(|l| {
                l.availability_zones()
                    .iter()
                    .filter_map(|z| z.subnet_id().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default()
    }

    pub fn config(&self, class: &str, default: bool) -> CloudLbConfig {
        CloudLbConfig {
            cloud_provider: ProviderKind::Aws,
            cloud_config: None,
            cluster_name: self.cluster.clone(),
            concurrent_service_syncs: 4,
            load_balancer_class: Some(class.into()),
            default_load_balancer: default,
            ..CloudLbConfig::default()
        }
    }

    pub async fn lbs_named(&self, name: &str) -> Vec<elbv2::types::LoadBalancer> {
        match self.elb.describe_load_balancers().names(name).send().await {
            Ok(o) => o.load_balancers().to_vec(),
            Err(_) => vec![],
        }
    }

    pub async fn lb_of(&self, svc: &Service) -> Option<elbv2::types::LoadBalancer> {
        let name = cloud_lb::aws::spec::load_balancer_name(&self.cluster, svc);
        self.lbs_named(&name).await.into_iter().next()
    }

    pub async fn tgs_of(&self, lb_arn: &str) -> Vec<elbv2::types::TargetGroup> {
        self.elb
            .describe_target_groups()
            .load_balancer_arn(lb_arn)
            .send()
            .await
            .map(|o| o.target_groups().to_vec())
            .unwrap_or_default()
    }

    pub async fn targets(&self, tg_arn: &str) -> BTreeSet<(String, i32)> {
        self.elb
            .describe_target_health()
            .target_group_arn(tg_arn)
            .send()
            .await
            .map(|o| {
                o.target_health_descriptions()
                    .iter()
                    .filter_map(|d| {
                        let t = d.target()?;
                        Some((t.id()?.to_string(), t.port()?))
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Listeners as port → (protocol, target group ARN).
    pub async fn listeners(&self, lb_arn: &str) -> BTreeMap<i32, (String, String)> {
        self.elb
            .describe_listeners()
            .load_balancer_arn(lb_arn)
            .send()
            .await
            .map(|o| {
                o.listeners()
                    .iter()
                    .filter_map(|l| {
                        Some((
                            l.port()?,
                            (
                                l.protocol()?.as_str().to_string(),
                                l.default_actions().first()?.target_group_arn()?.to_string(),
                            ),
                        ))
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Every load balancer and target group tagged with the Service `ns/name` (a tag scan).
    pub async fn tagged(&self, ns: &str, name: &str) -> Result<Vec<String>> {
        let mut arns: Vec<String> = vec![];
        let lbs = self.elb.describe_load_balancers().send().await?;
        arns.extend(
            lbs.load_balancers()
                .iter()
                .filter_map(|l| l.load_balancer_arn().map(str::to_string)),
        );
        let tgs = self.elb.describe_target_groups().send().await?;
        arns.extend(
            tgs.target_groups()
                .iter()
                .filter_map(|t| t.target_group_arn().map(str::to_string)),
        );
        let mut out = vec![];
        for chunk in arns.chunks(20) {
            let r = self
                .elb
                .describe_tags()
                .set_resource_arns(Some(chunk.to_vec()))
                .send()
                .await?;
            for d in r.tag_descriptions() {
                let ours = d.tags().iter().any(|t| {
                    t.key() == Some("kubernetes.io/service-name")
                        && t.value() == Some(&format!("{ns}/{name}"))
                });
                if ours {
                    out.extend(d.resource_arn().map(str::to_string));
                }
            }
        }
        Ok(out)
    }
}

/// Waits until the target group's targets are exactly `want`.
pub async fn wait_targets(aws: &Aws, tg_arn: &str, want: BTreeSet<(String, i32)>) -> Result<()> {
    wait_for(&format!("targets {want:?}"), T, || {
        let want = want.clone();
        async move { (aws.targets(tg_arn).await == want).then_some(()) }
    })
    .await
}
