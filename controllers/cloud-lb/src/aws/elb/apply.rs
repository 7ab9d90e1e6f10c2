//! Executes an [`ElbPlan`] and nothing else: every decision was made by the plan. Answers that
//! say the wanted state already holds (a listener, load balancer or group already gone, a
//! target already deregistered) count as success. Creates are never retried by the SDK: the
//! controller's next pass observes first and finds what a lost answer created.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use aws_sdk_elasticloadbalancingv2 as elbv2;
use elbv2::types::{
    Action, ActionTypeEnum, Certificate, IpAddressType, LoadBalancerAttribute,
    LoadBalancerSchemeEnum, LoadBalancerTypeEnum, ProtocolEnum, SubnetMapping, Tag,
    TargetDescription, TargetGroupAttribute, TargetTypeEnum,
};
use tracing::{info, warn};

use super::observe::{lb_obs, tg_obs};
use super::{ElbCall, ElbPlan, LbObs, LbRef, Observed, TgRef};
use crate::aws::budget::OpClass;
use crate::aws::spec::{HealthCheck, Scheme, Tls, subnet_mappings};
use crate::aws::{AwsProvider, classify, is_code};
use crate::provider::ProviderError;

/// Creates are never retried by the SDK: a retry after a lost answer would make a second load
/// balancer in emulators whose CreateLoadBalancer is not idempotent. The controller's own retry
/// looks up by name and tags first.
fn no_sdk_retry() -> elbv2::config::Builder {
    elbv2::config::Builder::default().retry_config(elbv2::config::retry::RetryConfig::disabled())
}

fn tags_vec(tags: &BTreeMap<String, String>) -> Vec<Tag> {
    tags.iter()
        .map(|(k, v)| Tag::builder().key(k).value(v).build())
        .collect()
}

fn targets_vec(targets: &BTreeSet<(String, i32)>) -> Vec<TargetDescription> {
    targets
        .iter()
        .map(|(id, p)| TargetDescription::builder().id(id).port(*p).build())
        .collect()
}

/// What applying a plan made: the load balancer and the wanted groups' (ARN, port).
pub struct Applied {
    /// The load balancer (created, or as observed).
    pub lb: Option<LbObs>,
    /// The wanted target groups' ARNs and target ports.
    pub target_groups: Vec<(String, i32)>,
}

/// ARNs of what the plan created so far, for the calls after it.
#[derive(Default)]
struct Made {
    lb: Option<LbObs>,
    tgs: HashMap<String, String>,
}

impl Made {
    fn lb<'a>(&'a self, r: &LbRef, obs: &'a Observed) -> Result<&'a LbObs, ProviderError> {
        let found = match r {
            LbRef::Existing(arn) => obs.lb(arn),
            LbRef::Created => self.lb.as_ref(),
        };
        found.ok_or_else(|| ProviderError::retryable(format!("plan refers to {r:?}, not made")))
    }

    fn tg(&self, r: &TgRef) -> Result<String, ProviderError> {
        match r {
            TgRef::Existing(arn) => Ok(arn.clone()),
            TgRef::Created(name) => self.tgs.get(name).cloned().ok_or_else(|| {
                ProviderError::retryable(format!("target group {name} was not created"))
            }),
        }
    }
}

impl AwsProvider {
    /// Makes the calls of `plan` (computed from `obs`) in order. A failed target-group
    /// deletion does not stop the ones after it (AWS keeps a group "in use" briefly after its
    /// listener is gone): the group is remembered as an orphan for the next pass, and the first
    /// such failure is returned at the end.
    pub(crate) async fn apply(
        &self,
        plan: &ElbPlan,
        obs: &Observed,
    ) -> Result<Applied, ProviderError> {
        if let Some(dry) = self.dry_apply(&obs.name, plan) {
            let target_groups = dry?.unwrap_or_default();
            let lb = match &plan.lb {
                Some(r) => Some(Made::default().lb(r, obs)?.clone()),
                None => None,
            };
            return Ok(Applied { lb, target_groups });
        }
        let mut made = Made::default();
        let mut first_err = None;
        for call in &plan.calls {
            let r = self.call(call, obs, &mut made).await;
            match (call, r) {
                (ElbCall::DeleteTargetGroup { arn }, Ok(())) => self.orphan_deleted(&obs.name, arn),
                (ElbCall::DeleteTargetGroup { arn }, Err(e)) => {
                    warn!(lb = %obs.name, tg = %arn, error = %e, "target group not deleted yet");
                    self.remember_orphan(&obs.name, arn);
                    first_err.get_or_insert(e);
                }
                (_, r) => r?,
            }
        }
        if let Some(e) = first_err {
            return Err(e);
        }
        let lb = match &plan.lb {
            Some(r) => Some(made.lb(r, obs)?.clone()),
            None => None,
        };
        let mut target_groups = vec![];
        for (tg, port) in &plan.target_groups {
            target_groups.push((made.tg(tg)?, *port));
        }
        Ok(Applied { lb, target_groups })
    }

    async fn call(
        &self,
        call: &ElbCall,
        obs: &Observed,
        made: &mut Made,
    ) -> Result<(), ProviderError> {
        let op = call.operation();
        let class = match call {
            ElbCall::RegisterTargets { .. } | ElbCall::DeregisterTargets { .. } => OpClass::Targets,
            _ => OpClass::Mutate,
        };
        self.before(class, op).await;
        let c = &self.client;
        match call {
            ElbCall::DeleteLoadBalancer { arn } => {
                match c.delete_load_balancer().load_balancer_arn(arn).send().await {
                    Ok(_) => info!(lb = %obs.name, %arn, "deleted load balancer"),
                    Err(e) if is_code(&e, &["LoadBalancerNotFound"]) => {}
                    Err(e) => return Err(classify(op, e)),
                }
            }
            ElbCall::CreateLoadBalancer {
                name,
                scheme,
                ip_address_type,
                subnets,
                eip_allocations,
                private_ipv4_addresses,
                tags,
            } => {
                let scheme = match scheme {
                    Scheme::Internal => LoadBalancerSchemeEnum::Internal,
                    Scheme::InternetFacing => LoadBalancerSchemeEnum::InternetFacing,
                };
                let out = c
                    .create_load_balancer()
                    .name(name)
                    .r#type(LoadBalancerTypeEnum::Network)
                    .scheme(scheme)
                    .ip_address_type(IpAddressType::from(ip_address_type.as_str()))
                    .set_subnets(
                        (eip_allocations.is_empty() && private_ipv4_addresses.is_empty())
                            .then(|| subnets.clone()),
                    )
                    .set_subnet_mappings(mappings(
                        subnets,
                        eip_allocations,
                        private_ipv4_addresses,
                    )?)
                    .set_tags(Some(tags_vec(tags)))
                    .customize()
                    .config_override(no_sdk_retry())
                    .send()
                    .await
                    .map_err(|e| classify(op, e))?;
                let lb = out
                    .load_balancers()
                    .first()
                    .and_then(lb_obs)
                    .ok_or_else(|| {
                        ProviderError::retryable("CreateLoadBalancer returned no load balancer")
                    })?;
                info!(lb = %name, arn = %lb.arn, "created load balancer");
                made.lb = Some(lb);
            }
            ElbCall::ModifyLoadBalancerAttributes { lb, attributes } => {
                let arn = made.lb(lb, obs)?.arn.clone();
                let attrs = attributes
                    .iter()
                    .map(|(k, v)| LoadBalancerAttribute::builder().key(k).value(v).build())
                    .collect();
                c.modify_load_balancer_attributes()
                    .load_balancer_arn(arn)
                    .set_attributes(Some(attrs))
                    .send()
                    .await
                    .map_err(|e| classify(op, e))?;
            }
            ElbCall::AddTags { arn, tags } => {
                c.add_tags()
                    .resource_arns(arn)
                    .set_tags(Some(tags_vec(tags)))
                    .send()
                    .await
                    .map_err(|e| classify(op, e))?;
            }
            ElbCall::CreateTargetGroup {
                name,
                protocol,
                port,
                health: hc,
                tags,
                vpc_of,
            } => {
                let vpc = made.lb(vpc_of, obs)?.vpc.clone();
                let out = c
                    .create_target_group()
                    .name(name)
                    .protocol(ProtocolEnum::from(protocol.as_str()))
                    .port(*port)
                    .set_vpc_id(vpc)
                    .target_type(TargetTypeEnum::Instance)
                    .health_check_protocol(ProtocolEnum::from(hc.protocol.as_str()))
                    .health_check_port(&hc.port)
                    .set_health_check_path(hc.path.clone())
                    .health_check_interval_seconds(hc.interval)
                    .health_check_timeout_seconds(hc.timeout)
                    .healthy_threshold_count(hc.healthy)
                    .unhealthy_threshold_count(hc.unhealthy)
                    .set_tags(Some(tags_vec(tags)))
                    .customize()
                    .config_override(no_sdk_retry())
                    .send()
                    .await
                    .map_err(|e| classify(op, e))?;
                let tg = out
                    .target_groups()
                    .first()
                    .and_then(tg_obs)
                    .ok_or_else(|| {
                        ProviderError::retryable("CreateTargetGroup returned no target group")
                    })?;
                info!(lb = %obs.name, tg = %name, arn = %tg.arn, "created target group");
                made.tgs.insert(name.clone(), tg.arn);
            }
            ElbCall::ModifyTargetGroup { arn, health } => self.modify_health(arn, health).await?,
            ElbCall::ModifyTargetGroupAttributes { tg, attributes } => {
                let attrs = attributes
                    .iter()
                    .map(|(k, v)| TargetGroupAttribute::builder().key(k).value(v).build())
                    .collect();
                c.modify_target_group_attributes()
                    .target_group_arn(made.tg(tg)?)
                    .set_attributes(Some(attrs))
                    .send()
                    .await
                    .map_err(|e| classify(op, e))?;
            }
            ElbCall::DeregisterTargets { tg, targets } => {
                match c
                    .deregister_targets()
                    .target_group_arn(made.tg(tg)?)
                    .set_targets(Some(targets_vec(targets)))
                    .send()
                    .await
                {
                    Ok(_) => {}
                    Err(e) if is_code(&e, &["InvalidTarget"]) => {}
                    Err(e) => return Err(classify(op, e)),
                }
            }
            ElbCall::RegisterTargets { tg, targets } => {
                c.register_targets()
                    .target_group_arn(made.tg(tg)?)
                    .set_targets(Some(targets_vec(targets)))
                    .send()
                    .await
                    .map_err(|e| classify(op, e))?;
            }
            ElbCall::DeleteListener { arn } => {
                match c.delete_listener().listener_arn(arn).send().await {
                    Ok(_) => {}
                    Err(e) if is_code(&e, &["ListenerNotFound"]) => {}
                    Err(e) => return Err(classify(op, e)),
                }
            }
            ElbCall::CreateListener {
                lb,
                port,
                protocol,
                tg,
                tls,
            } => {
                c.create_listener()
                    .load_balancer_arn(&made.lb(lb, obs)?.arn)
                    .port(*port)
                    .protocol(ProtocolEnum::from(protocol.as_str()))
                    .default_actions(forward(made.tg(tg)?))
                    .set_certificates(tls.as_ref().map(certificates))
                    .set_ssl_policy(tls.as_ref().and_then(|t| t.policy.clone()))
                    .send()
                    .await
                    .map_err(|e| classify(op, e))?;
            }
            ElbCall::ModifyListener { arn, tg, tls } => {
                c.modify_listener()
                    .listener_arn(arn)
                    .default_actions(forward(made.tg(tg)?))
                    .set_certificates(tls.as_ref().map(certificates))
                    .set_ssl_policy(tls.as_ref().and_then(|t| t.policy.clone()))
                    .send()
                    .await
                    .map_err(|e| classify(op, e))?;
            }
            ElbCall::DeleteTargetGroup { arn } => self.delete_tg_call(arn).await?,
        }
        Ok(())
    }

    async fn modify_health(&self, arn: &str, hc: &HealthCheck) -> Result<(), ProviderError> {
        self.client
            .modify_target_group()
            .target_group_arn(arn)
            .health_check_protocol(ProtocolEnum::from(hc.protocol.as_str()))
            .health_check_port(&hc.port)
            .set_health_check_path(hc.path.clone())
            .health_check_interval_seconds(hc.interval)
            .health_check_timeout_seconds(hc.timeout)
            .healthy_threshold_count(hc.healthy)
            .unhealthy_threshold_count(hc.unhealthy)
            .send()
            .await
            .map_err(|e| classify("ModifyTargetGroup", e))?;
        Ok(())
    }

    async fn delete_tg_call(&self, arn: &str) -> Result<(), ProviderError> {
        match self
            .client
            .delete_target_group()
            .target_group_arn(arn)
            .send()
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if is_code(&e, &["TargetGroupNotFound"]) => Ok(()),
            Err(e) => Err(classify("DeleteTargetGroup", e)),
        }
    }
}

/// Subnet mappings when the load balancer gets fixed addresses (else plain subnets are sent).
fn mappings(
    subnets: &[String],
    eips: &[String],
    private: &[String],
) -> Result<Option<Vec<SubnetMapping>>, ProviderError> {
    if eips.is_empty() && private.is_empty() {
        return Ok(None);
    }
    Ok(Some(
        subnet_mappings(subnets, eips, private)?
            .into_iter()
            .map(|(s, eip, ip)| {
                SubnetMapping::builder()
                    .subnet_id(s)
                    .set_allocation_id(eip)
                    .set_private_ipv4_address(ip)
                    .build()
            })
            .collect(),
    ))
}

fn certificates(t: &Tls) -> Vec<Certificate> {
    vec![
        Certificate::builder()
            .certificate_arn(&t.certificate)
            .build(),
    ]
}

fn forward(tg_arn: String) -> Action {
    Action::builder()
        .r#type(ActionTypeEnum::Forward)
        .target_group_arn(tg_arn)
        .build()
}
