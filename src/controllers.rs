//! Starting the enabled controllers, each with its own context, behind the shared leader gate.

use anyhow::Result;
use scm_runtime::ContextBase;
use tokio::task::JoinSet;

use crate::flags::Flags;

/// A running controller's task: its name and how it ended.
pub type Tasks = JoinSet<(&'static str, Result<()>)>;

/// Upstream's reporting component names, so `kubectl describe` shows familiar sources.
fn reporter(name: &str) -> &'static str {
    match name {
        "clusterip-alloc" => "ipallocator-repair-controller",
        "service-cidr" => "service-cidr-controller",
        "nodeport-alloc" => "portallocator-repair-controller",
        "endpointslice" => "endpoint-slice-controller",
        "endpointslice-mirroring" => "endpoint-slice-mirroring-controller",
        "endpoints" => "endpoint-controller",
        "cloud-lb" => "service-controller",
        _ => "service-controller-manager",
    }
}

fn selector(flags: &Flags) -> Option<String> {
    let s = flags.service_label_selector.trim();
    (!s.is_empty()).then(|| s.to_string())
}

/// Starts every enabled controller and returns their tasks. Configuration the controllers
/// load themselves (the cloud provider's) is loaded here first, so a bad file stops start-up.
pub async fn start(enabled: &[&'static str], flags: &Flags, base: &ContextBase) -> Result<Tasks> {
    let mut tasks = Tasks::new();
    let cloud = if enabled.contains(&"cloud-lb") {
        let kind = flags
            .cloud_provider
            .parse::<cloud_lb::ProviderKind>()
            .map_err(|e| anyhow::anyhow!("--cloud-provider: {e}"))?;
        let config = cloud_lb::CloudLbConfig {
            cloud_provider: kind,
            cloud_config: flags.cloud_config.clone(),
            cluster_name: flags.cluster_name.clone(),
            concurrent_service_syncs: usize::from(flags.concurrent_service_syncs),
            load_balancer_class: Some(flags.load_balancer_class.clone()).filter(|c| !c.is_empty()),
            default_load_balancer: flags.default_load_balancer,
            inventory_interval: flags.cloud_inventory_interval,
            orphans: flags.cloud_orphans,
            endpoint_aware_targets: flags.endpoint_aware_load_balancer_targets,
        };
        let provider = cloud_lb::build_provider(&config)
            .await
            .map_err(|e| anyhow::anyhow!("--cloud-config: {e}"))?;
        if let Some(dry) = &base.dry_run {
            provider.set_dry_run(dry.clone());
        }
        Some((config, provider))
    } else {
        None
    };
    let ranges = flags.service_cluster_ip_range.clone();
    let port_span = scm_allocator::PortSpan {
        base: flags.service_node_port_range.base,
        size: u32::from(flags.service_node_port_range.last)
            - u32::from(flags.service_node_port_range.base)
            + 1,
    };
    for &name in enabled {
        let ctx = base.context(name, reporter(name));
        match name {
            "clusterip-alloc" => {
                let cfg = clusterip_alloc::ClusterIpAllocConfig {
                    service_cluster_ip_range: ranges.clone(),
                    concurrent_syncs: usize::from(flags.concurrent_clusterip_syncs),
                    assign: flags.assign,
                    ..Default::default()
                };
                tasks.spawn(async move {
                    (
                        name,
                        clusterip_alloc::run(ctx, cfg).await.map_err(Into::into),
                    )
                });
            }
            "service-cidr" => {
                let cfg = clusterip_alloc::ServiceCidrConfig {
                    concurrent_syncs: usize::from(flags.concurrent_service_cidr_syncs),
                };
                tasks.spawn(async move {
                    (
                        name,
                        clusterip_alloc::run_service_cidr(ctx, cfg)
                            .await
                            .map_err(Into::into),
                    )
                });
            }
            "nodeport-alloc" => {
                let cfg = nodeport_alloc::NodePortAllocConfig {
                    service_node_port_range: port_span,
                    concurrent_syncs: usize::from(flags.concurrent_nodeport_syncs),
                    assign: flags.assign,
                };
                tasks.spawn(async move {
                    (
                        name,
                        nodeport_alloc::run(ctx, cfg).await.map_err(Into::into),
                    )
                });
            }
            "endpointslice" => {
                let cfg = endpointslice::EndpointSliceConfig {
                    max_endpoints_per_slice: usize::from(flags.max_endpoints_per_slice),
                    takeover: flags.endpointslice_takeover,
                    shell: endpointslice::ShellConfig {
                        concurrent_syncs: usize::from(flags.concurrent_service_endpoint_syncs),
                        batch_period: flags.endpointslice_updates_batch_period,
                        service_label_selector: selector(flags),
                    },
                };
                tasks.spawn(async move {
                    (name, endpointslice::run(ctx, cfg).await.map_err(Into::into))
                });
            }
            "endpointslice-mirroring" => {
                let cfg = endpointslice::MirroringConfig {
                    max_endpoints_per_subset: usize::from(flags.mirroring_max_endpoints_per_subset),
                    shell: endpointslice::ShellConfig {
                        concurrent_syncs: usize::from(
                            flags.mirroring_concurrent_service_endpoint_syncs,
                        ),
                        batch_period: flags.mirroring_endpointslice_updates_batch_period,
                        service_label_selector: selector(flags),
                    },
                };
                tasks.spawn(async move {
                    (
                        name,
                        endpointslice::run_mirroring(ctx, cfg)
                            .await
                            .map_err(Into::into),
                    )
                });
            }
            "endpoints" => {
                let cfg = endpointslice::EndpointsConfig {
                    concurrent_syncs: usize::from(flags.concurrent_endpoint_syncs),
                    batch_period: flags.endpoint_updates_batch_period,
                    service_label_selector: selector(flags),
                };
                tasks.spawn(async move {
                    (
                        name,
                        endpointslice::run_endpoints(ctx, cfg)
                            .await
                            .map_err(Into::into),
                    )
                });
            }
            "cloud-lb" => {
                if let Some((cfg, provider)) = cloud.clone() {
                    tasks.spawn(async move {
                        (
                            name,
                            cloud_lb::run_with_provider(ctx, cfg, provider)
                                .await
                                .map_err(Into::into),
                        )
                    });
                }
            }
            other => anyhow::bail!("--controllers: unknown controller {other}"),
        }
    }
    Ok(tasks)
}
