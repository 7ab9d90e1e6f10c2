//! Command-line flags, named and defaulted as kube-controller-manager's where it has them.
//! Every value is checked here, before anything starts; a bad value is a one-line error
//! naming its flag.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use ipnet::IpNet;

/// Every controller this binary can run, in start order, as named in `--controllers`.
pub const CONTROLLERS: &[&str] = &[
    "clusterip-alloc",
    "service-cidr",
    "nodeport-alloc",
    "endpointslice",
    "endpointslice-mirroring",
    "endpoints",
    "cloud-lb",
];

/// service-controller-manager: the Kubernetes Service control plane.
#[derive(Parser, Debug, Clone)]
#[command(
    name = "service-controller-manager",
    version,
    about,
    long_about = None,
    after_help = "Also: service-controller-manager plan [flags] runs every enabled controller once in a dry run and prints the writes it would make; service-controller-manager explain <namespace>/<service> [-o text|json] prints how a Service is wired (read-only; explain --help); service-controller-manager crd prints the LoadBalancerIPPool CustomResourceDefinition."
)]
pub struct Flags {
    /// Path to a kubeconfig. Else $KUBECONFIG, else in-cluster configuration.
    #[arg(long, env = "KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,

    /// Controllers to run: '*' is every controller on by default, 'foo' enables foo, '-foo'
    /// disables foo (as kube-controller-manager). Known: clusterip-alloc, service-cidr,
    /// nodeport-alloc, endpointslice, endpointslice-mirroring, endpoints, cloud-lb.
    #[arg(long, value_delimiter = ',', default_value = "*", value_parser = parse_controller_item)]
    pub controllers: Vec<String>,

    /// CIDR range(s) for Service ClusterIPs, one or two of different families (e.g.
    /// 10.96.0.0/16,fd00::/108). If unset, ranges are read from ServiceCIDR objects.
    #[arg(long, value_delimiter = ',', value_parser = parse_cidr)]
    pub service_cluster_ip_range: Vec<IpNet>,

    /// Write ClusterIPs and NodePorts into Services the API server left without them (an API
    /// server that does not allocate). Off by default: a stock kube-apiserver allocates, and
    /// then no Service is ever written (RBAC needs no `services` update).
    #[arg(long, default_value_t = false, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    pub assign: bool,

    /// Port range reserved for Services with NodePort visibility (inclusive, e.g. 30000-32767).
    #[arg(long, default_value = "30000-32767", value_parser = parse_port_range)]
    pub service_node_port_range: PortRange,

    /// Instance prefix for the cluster; tags cloud resources so ownership is provable.
    #[arg(long, default_value = "kubernetes", value_parser = parse_cluster_name)]
    pub cluster_name: String,

    /// Cloud provider for load balancers: 'aws' or 'local'. Empty: the cloud-lb controller is off.
    #[arg(long, default_value = "", value_parser = ["", "aws", "local"])]
    pub cloud_provider: String,

    /// Path to the cloud provider configuration file.
    #[arg(long)]
    pub cloud_config: Option<PathBuf>,

    /// How often the cloud inventory sweep lists load balancers and target groups tagged for
    /// --cluster-name to find orphans (and once at each leadership start); at least 1s.
    #[arg(long, default_value = "10m", value_parser = parse_inventory_interval)]
    pub cloud_inventory_interval: Duration,

    /// What the inventory sweep does with an orphaned cloud resource: 'report' (metric and
    /// Warning log) or 'delete' (report, then delete it).
    #[arg(long, default_value = "report", value_parser = parse_orphans)]
    pub cloud_orphans: cloud_lb::OrphanMode,

    /// Load balancer class this manager implements (spec.loadBalancerClass).
    #[arg(
        long,
        default_value = "service-controller-manager.k8s.io/load-balancer"
    )]
    pub load_balancer_class: String,

    /// Also serve LoadBalancer Services that set no loadBalancerClass (be the cluster's default
    /// implementation, as a cloud-controller-manager is).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub default_load_balancer: bool,

    /// Endpoint-aware load-balancer targets and graceful drain: with externalTrafficPolicy
    /// Local only nodes holding a ready endpoint are targets (a node goes as soon as its last
    /// endpoint starts terminating), and cordoned nodes are no target for any policy.
    /// Default false: upstream's target set (every node of the stable set).
    #[arg(long, default_value_t = false, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    pub endpoint_aware_load_balancer_targets: bool,

    /// QPS to use while talking with the API server.
    #[arg(long, default_value_t = 20.0, value_parser = parse_qps)]
    pub kube_api_qps: f64,

    /// Burst to use while talking with the API server.
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u32).range(1..))]
    pub kube_api_burst: u32,

    /// Services whose ClusterIPs are reconciled at once.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u16).range(1..))]
    pub concurrent_clusterip_syncs: u16,

    /// ServiceCIDRs reconciled at once.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u16).range(1..))]
    pub concurrent_service_cidr_syncs: u16,

    /// Services whose NodePorts are reconciled at once.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u16).range(1..))]
    pub concurrent_nodeport_syncs: u16,

    /// Services whose EndpointSlices are synced at once.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u16).range(1..))]
    pub concurrent_service_endpoint_syncs: u16,

    /// Services whose Endpoints are mirrored into EndpointSlices at once.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u16).range(1..))]
    pub mirroring_concurrent_service_endpoint_syncs: u16,

    /// Services whose legacy Endpoints objects are synced at once.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u16).range(1..))]
    pub concurrent_endpoint_syncs: u16,

    /// LoadBalancer Services synced at once.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..))]
    pub concurrent_service_syncs: u16,

    /// Maximum endpoints per EndpointSlice (1-1000).
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u16).range(1..=1000))]
    pub max_endpoints_per_slice: u16,

    /// Maximum addresses mirrored per Endpoints subset (1-1000).
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u16).range(1..=1000))]
    pub mirroring_max_endpoints_per_subset: u16,

    /// Batch EndpointSlice updates caused by pod changes over this period (e.g. 1s; 0 = off).
    #[arg(long, default_value = "0s", value_parser = parse_duration)]
    pub endpointslice_updates_batch_period: Duration,

    /// Batch mirrored EndpointSlice updates over this period (0 = off).
    #[arg(long, default_value = "0s", value_parser = parse_duration)]
    pub mirroring_endpointslice_updates_batch_period: Duration,

    /// Batch legacy Endpoints updates caused by pod changes over this period (0 = off).
    #[arg(long, default_value = "0s", value_parser = parse_duration)]
    pub endpoint_updates_batch_period: Duration,

    /// Adopt EndpointSlices managed by kube-controller-manager (migration from upstream).
    #[arg(long, default_value_t = false)]
    pub endpointslice_takeover: bool,

    /// Only serve Services matching this label selector (e.g. 'app in (a,b)'); empty: all.
    #[arg(long, default_value = "")]
    pub service_label_selector: String,

    /// Run every enabled controller without writing: API writes are sent as server-side dry
    /// runs, cloud calls that mutate are skipped, and each is logged and counted
    /// (service_controller_manager_dry_run_writes_total). No leader election: it can run
    /// beside a live manager.
    #[arg(long, default_value_t = false)]
    pub dry_run: bool,

    /// `plan` only: how long to wait for caches to sync and every queue to drain.
    #[arg(long, default_value = "5m", value_parser = parse_duration)]
    pub plan_timeout: Duration,

    /// Start a leader election client and gain leadership before reconciling.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub leader_elect: bool,

    /// How long a follower waits after the last observed renewal before taking the lease.
    #[arg(long, default_value = "15s", value_parser = parse_duration)]
    pub leader_elect_lease_duration: Duration,

    /// How long the leader keeps retrying a renewal before it stops leading.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub leader_elect_renew_deadline: Duration,

    /// How long candidates wait between attempts to acquire or renew.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    pub leader_elect_retry_period: Duration,

    /// Name of the Lease object used for leader election.
    #[arg(long, default_value = "service-controller-manager")]
    pub leader_elect_resource_name: String,

    /// Namespace of the Lease object used for leader election.
    #[arg(long, default_value = "kube-system")]
    pub leader_elect_resource_namespace: String,

    /// Address serving /healthz, /readyz and /metrics as plain HTTP, with no authentication
    /// (e.g. 127.0.0.1:10270). Unset: only the secure port serves them.
    #[arg(long)]
    pub http_address: Option<SocketAddr>,

    /// The secure port and its delegated authentication and authorization.
    #[command(flatten)]
    pub serving: crate::serving::flags::ServingFlags,

    /// Log filter (tracing EnvFilter syntax, e.g. 'info' or 'info,endpointslice=debug').
    #[arg(long, default_value = "info", env = "SCM_LOG")]
    pub log_level: String,

    /// Log format: 'text' or 'json'.
    #[arg(long, default_value = "text", value_parser = ["text", "json"])]
    pub log_format: String,
}

/// `service-controller-manager explain <namespace>/<service>`: how a Service is wired, read
/// from the API server without writing anything.
#[derive(Parser, Debug, Clone)]
#[command(name = "service-controller-manager explain", version, about, long_about = None)]
pub struct ExplainArgs {
    /// The Service, as <namespace>/<name>.
    #[arg(value_parser = scm_explain::parse_service_ref)]
    pub service: (String, String),

    /// Path to a kubeconfig. Else $KUBECONFIG, else in-cluster configuration.
    #[arg(long, env = "KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,

    /// Output format: 'text' or 'json'.
    #[arg(short = 'o', long = "output", default_value = "text", value_parser = ["text", "json"])]
    pub output: String,

    /// The cluster's DNS domain, for the DNS records shown.
    #[arg(long, default_value = scm_explain::DEFAULT_CLUSTER_DOMAIN)]
    pub cluster_domain: String,

    /// Say so when the manager runs with --endpoint-aware-load-balancer-targets: the load
    /// balancer's targets are then shown as cloud-lb picks them (explain cannot read the
    /// running manager's flags).
    #[arg(long = "endpoint-aware-load-balancer-targets", default_value_t = false, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    pub endpoint_aware_targets: bool,
}

/// An inclusive port range such as 30000-32767.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortRange {
    /// First port.
    pub base: u16,
    /// Last port (inclusive).
    pub last: u16,
}

fn parse_port_range(s: &str) -> Result<PortRange, String> {
    // Upstream also accepts "base+size"; take both forms.
    let (base, last) = if let Some((a, b)) = s.split_once('-') {
        let a: u32 = a
            .trim()
            .parse()
            .map_err(|_| format!("'{a}' is not a port"))?;
        let b: u32 = b
            .trim()
            .parse()
            .map_err(|_| format!("'{b}' is not a port"))?;
        (a, b)
    } else if let Some((a, n)) = s.split_once('+') {
        let a: u32 = a
            .trim()
            .parse()
            .map_err(|_| format!("'{a}' is not a port"))?;
        let n: u32 = n
            .trim()
            .parse()
            .map_err(|_| format!("'{n}' is not a size"))?;
        (a, a.saturating_add(n))
    } else {
        return Err("expected a range like 30000-32767".into());
    };
    if base == 0 || base > 65535 || last == 0 || last > 65535 {
        return Err("ports must be within 1-65535".into());
    }
    if last < base {
        return Err(format!("range is reversed ({base} > {last})"));
    }
    Ok(PortRange {
        base: base as u16,
        last: last as u16,
    })
}

fn parse_cidr(s: &str) -> Result<IpNet, String> {
    let net: IpNet = s
        .trim()
        .parse()
        .map_err(|_| format!("'{s}' is not a CIDR"))?;
    if net.network() != net.addr() {
        return Err(format!(
            "'{s}' has host bits set (did you mean {})",
            net.trunc()
        ));
    }
    Ok(net)
}

fn parse_controller_item(s: &str) -> Result<String, String> {
    let name = s.trim();
    let bare = name.strip_prefix('-').unwrap_or(name);
    if name == "*" || CONTROLLERS.contains(&bare) {
        Ok(name.to_string())
    } else {
        Err(format!(
            "unknown controller '{bare}' (known: {})",
            CONTROLLERS.join(", ")
        ))
    }
}

fn parse_cluster_name(s: &str) -> Result<String, String> {
    if s.is_empty() || s.len() > 63 {
        return Err("must be 1-63 characters".into());
    }
    Ok(s.to_string())
}

/// The shortest `--cloud-inventory-interval`: each sweep lists every load balancer and target
/// group in the region, and the interval is also the age below which none is an orphan.
const MIN_INVENTORY_INTERVAL: Duration = Duration::from_secs(1);

fn parse_inventory_interval(s: &str) -> Result<Duration, String> {
    let d = parse_duration(s)?;
    if d < MIN_INVENTORY_INTERVAL {
        return Err(format!(
            "must be at least {}s",
            MIN_INVENTORY_INTERVAL.as_secs()
        ));
    }
    Ok(d)
}

fn parse_orphans(s: &str) -> Result<cloud_lb::OrphanMode, String> {
    s.parse()
}

/// The smallest `--kube-api-qps` taken (apart from 0, no limit).
const MIN_QPS: f64 = 0.001;

fn parse_qps(s: &str) -> Result<f64, String> {
    let v: f64 = s.parse().map_err(|_| format!("'{s}' is not a number"))?;
    if !v.is_finite() || v < 0.0 {
        return Err("must be a non-negative number".into());
    }
    // One request in more than 1000 s is no rate a client can keep: it would only starve every
    // controller. 0 turns the limit off.
    if v > 0.0 && v < MIN_QPS {
        return Err(format!("must be 0 (no limit) or at least {MIN_QPS}"));
    }
    Ok(v)
}

/// Parses Go-style durations as kube-controller-manager's flags take them: 15s, 1m30s, 500ms.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if s == "0" {
        return Ok(Duration::ZERO);
    }
    let mut total = 0f64;
    let mut rest = s;
    if rest.is_empty() {
        return Err("empty duration".into());
    }
    while !rest.is_empty() {
        let num_end = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(|| format!("'{s}' lacks a unit (e.g. 15s)"))?;
        let (num, tail) = rest.split_at(num_end);
        let n: f64 = num
            .parse()
            .map_err(|_| format!("'{s}' is not a duration"))?;
        let unit_end = tail
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(tail.len());
        let (unit, tail) = tail.split_at(unit_end);
        let mult = match unit {
            "ns" => 1e-9,
            "us" | "µs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return Err(format!("'{s}' has an unknown unit '{unit}'")),
        };
        total += n * mult;
        rest = tail;
    }
    Duration::try_from_secs_f64(total).map_err(|_| format!("'{s}' is out of range"))
}

/// Which controllers `--controllers` enables, given whether a cloud provider is configured.
pub fn enabled_controllers(items: &[String], cloud: bool) -> Result<Vec<&'static str>, String> {
    let star = items.iter().any(|i| i == "*");
    let mut out = Vec::new();
    for &name in CONTROLLERS {
        let disabled = items.iter().any(|i| i.strip_prefix('-') == Some(name));
        let named = items.iter().any(|i| i == name);
        if disabled && named {
            return Err(format!(
                "--controllers: '{name}' is both enabled and disabled"
            ));
        }
        let on = if name == "cloud-lb" {
            // cloud-lb needs a provider; with '*' it follows --cloud-provider.
            if named && !cloud {
                return Err("--controllers: cloud-lb needs --cloud-provider".into());
            }
            (named || star) && !disabled && cloud
        } else {
            (named || star) && !disabled
        };
        if on {
            out.push(name);
        }
    }
    Ok(out)
}

impl Flags {
    /// Checks relations between flags that no single value parser can see.
    pub fn validate(&self) -> Result<(), String> {
        let ranges = &self.service_cluster_ip_range;
        if ranges.len() > 2 {
            return Err("--service-cluster-ip-range: at most two CIDRs".into());
        }
        if ranges.len() == 2 && ranges[0].addr().is_ipv4() == ranges[1].addr().is_ipv4() {
            return Err(
                "--service-cluster-ip-range: two CIDRs must be of different IP families".into(),
            );
        }
        if !ranges.is_empty() {
            // v1.37's rule, kept in one place: any IPv4 range, IPv6 /64 or longer.
            clusterip_alloc::core::RangeConfig::from_flag(ranges).map_err(|e| e.to_string())?;
        }
        if self.leader_elect {
            if self.leader_elect_renew_deadline >= self.leader_elect_lease_duration {
                return Err(
                    "--leader-elect-renew-deadline must be less than --leader-elect-lease-duration"
                        .into(),
                );
            }
            // client-go's rule: the renew deadline must leave room for a jittered retry.
            if self.leader_elect_retry_period.is_zero()
                || self.leader_elect_renew_deadline.as_secs_f64()
                    <= 1.2 * self.leader_elect_retry_period.as_secs_f64()
            {
                return Err("--leader-elect-retry-period must be positive and --leader-elect-renew-deadline greater than 1.2 times it".into());
            }
            if self.leader_elect_resource_name.is_empty() {
                return Err("--leader-elect-resource-name must not be empty".into());
            }
        }
        endpointslice::shell::ServiceFilter::parse(Some(&self.service_label_selector))
            .map_err(|e| e.to_string())?;
        enabled_controllers(&self.controllers, !self.cloud_provider.is_empty())?;
        self.serving.validate()?;
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod tests;
