//! The controller's configuration (from the binary's flags) and the provider it selects.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::inventory::OrphanMode;
use crate::provider::{LoadBalancerProvider, ProviderKind};
use crate::{Error, aws, local};

/// What the binary passes to [`crate::run`] (from its flags).
#[derive(Clone, Debug)]
pub struct CloudLbConfig {
    /// `--cloud-provider`: `aws` or `local`.
    pub cloud_provider: ProviderKind,
    /// `--cloud-config`: the provider's config file (YAML or JSON); optional (the local
    /// provider's pools are `LoadBalancerIPPool` objects; its file's `pools` are deprecated).
    pub cloud_config: Option<PathBuf>,
    /// `--cluster-name` (default `kubernetes`): names and ownership tags.
    pub cluster_name: String,
    /// `--concurrent-service-syncs` (default 1, as upstream).
    pub concurrent_service_syncs: usize,
    /// `--load-balancer-class`: the `spec.loadBalancerClass` we implement, if any.
    pub load_balancer_class: Option<String>,
    /// `--default-load-balancer` (default true): also serve Services without a
    /// class.
    pub default_load_balancer: bool,
    /// `--cloud-inventory-interval` (default 10 min): how often the inventory sweep lists the
    /// cloud for orphans (and once at each leadership start); also the minimum age of a load
    /// balancer it may call an orphan.
    pub inventory_interval: Duration,
    /// `--cloud-orphans` (default `report`): what the sweep does with an orphan.
    pub orphans: OrphanMode,
    /// `--endpoint-aware-load-balancer-targets` (default false, upstream's target set): with
    /// `externalTrafficPolicy: Local` only nodes holding a ready endpoint are targets, and
    /// cordoned nodes are drained for every policy ([`crate::core::targets`]).
    pub endpoint_aware_targets: bool,
}

/// `--cloud-inventory-interval`'s default.
pub const DEFAULT_INVENTORY_INTERVAL: Duration = Duration::from_secs(600);

impl Default for CloudLbConfig {
    fn default() -> Self {
        CloudLbConfig {
            cloud_provider: ProviderKind::Local,
            cloud_config: None,
            cluster_name: "kubernetes".into(),
            concurrent_service_syncs: 1,
            load_balancer_class: None,
            default_load_balancer: true,
            inventory_interval: DEFAULT_INVENTORY_INTERVAL,
            orphans: OrphanMode::Report,
            endpoint_aware_targets: false,
        }
    }
}

/// Builds the provider `config` selects.
pub async fn build_provider(
    config: &CloudLbConfig,
) -> Result<Arc<dyn LoadBalancerProvider>, Error> {
    let text = match &config.cloud_config {
        Some(p) => Some(
            std::fs::read_to_string(p)
                .map_err(|e| Error::Config(format!("{}: {e}", p.display())))?,
        ),
        None => None,
    };
    match config.cloud_provider {
        ProviderKind::Aws => {
            let cfg: aws::AwsCloudConfig = match &text {
                Some(t) => serde_yaml::from_str(t).map_err(|e| Error::Config(e.to_string()))?,
                None => aws::AwsCloudConfig::default(),
            };
            Ok(Arc::new(aws::AwsProvider::new(cfg).await))
        }
        ProviderKind::Local => {
            // Pools come from LoadBalancerIPPool objects; the file (ipMode, deprecated pools)
            // is optional.
            let cfg: local::LocalCloudConfig = match &text {
                Some(t) => serde_yaml::from_str(t).map_err(|e| Error::Config(e.to_string()))?,
                None => local::LocalCloudConfig::default(),
            };
            Ok(Arc::new(
                local::LocalProvider::new(cfg).map_err(|e| Error::Config(e.to_string()))?,
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_temp(name: &str, body: &str) -> PathBuf {
        let p = std::env::temp_dir().join(format!("cloud-lb-{}-{name}", std::process::id()));
        std::fs::write(&p, body).expect("temp file");
        p
    }

    #[tokio::test]
    async fn build_provider_reads_the_cloud_config() {
        let ok = write_temp("ok.yaml", "pools: [10.0.0.0/29]\nipMode: Proxy\n");
        let json = write_temp("ok.json", r#"{"pools": ["fd00::/120"]}"#);
        let bad = write_temp("bad.yaml", "pools: [not-a-cidr]\n");
        let unknown = write_temp("unknown.yaml", "pools: [10.0.0.0/29]\nmystery: 1\n");
        let cfg = |p: Option<PathBuf>| CloudLbConfig {
            cloud_provider: ProviderKind::Local,
            cloud_config: p,
            ..CloudLbConfig::default()
        };
        let p = build_provider(&cfg(Some(ok.clone()))).await.expect("valid");
        assert_eq!(p.provider_name(), "local");
        assert!(build_provider(&cfg(Some(json.clone()))).await.is_ok());
        // Without a file, pools come from objects.
        assert!(build_provider(&cfg(None)).await.is_ok());
        for (what, path) in [
            ("bad", Some(bad.clone())),
            ("unknown key", Some(unknown.clone())),
            (
                "absent file",
                Some(PathBuf::from("/nonexistent/cloud.yaml")),
            ),
        ] {
            assert!(
                matches!(build_provider(&cfg(path)).await, Err(Error::Config(_))),
                "{what}"
            );
        }
        for f in [ok, json, bad, unknown] {
            let _ = std::fs::remove_file(f);
        }
    }

    #[test]
    fn provider_kind_parses_flag_values() {
        assert_eq!("aws".parse::<ProviderKind>(), Ok(ProviderKind::Aws));
        assert_eq!("local".parse::<ProviderKind>(), Ok(ProviderKind::Local));
        assert!("gce".parse::<ProviderKind>().is_err());
    }
}
