//! The AWS provider's configuration: the `--cloud-config` file, the SDK clients' timeouts, and
//! clients for an emulator (tests and benchmarks).

use aws_sdk_elasticloadbalancingv2 as elbv2;
use serde::Deserialize;

use super::budget::RateLimits;
/// One attempt of an ELBv2 call may take this long; a hung connection must not stall a worker
/// (with `--concurrent-service-syncs=1` it would stall every Service).
pub const ATTEMPT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);
/// A whole ELBv2 call, retries included.
pub const OPERATION_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(90);

pub(crate) fn timeouts() -> elbv2::config::timeout::TimeoutConfig {
    elbv2::config::timeout::TimeoutConfig::builder()
        .operation_attempt_timeout(ATTEMPT_TIMEOUT)
        .operation_timeout(OPERATION_TIMEOUT)
        .build()
}

/// An EC2 client for an emulator at `endpoint`, like [`emulator_client`].
pub fn emulator_ec2_client(endpoint: &str, region: &str, max_attempts: u32) -> aws_sdk_ec2::Client {
    let conf = aws_sdk_ec2::Config::builder()
        .behavior_version(aws_sdk_ec2::config::BehaviorVersion::latest())
        .region(aws_sdk_ec2::config::Region::new(region.to_string()))
        .endpoint_url(endpoint)
        .credentials_provider(aws_sdk_ec2::config::Credentials::new(
            "test", "test", None, None, "static",
        ))
        .retry_config(
            aws_sdk_ec2::config::retry::RetryConfig::standard()
                .with_max_attempts(max_attempts.max(1)),
        )
        .timeout_config(timeouts())
        .build();
    aws_sdk_ec2::Client::from_conf(conf)
}

/// An ELBv2 client with static dummy credentials for an emulator at `endpoint` (tests and
/// benchmarks; production uses [`crate::aws::AwsProvider::new`] and the SDK's default chain).
pub fn emulator_client(endpoint: &str, region: &str, max_attempts: u32) -> elbv2::Client {
    let conf = elbv2::Config::builder()
        .behavior_version(elbv2::config::BehaviorVersion::latest())
        .region(elbv2::config::Region::new(region.to_string()))
        .endpoint_url(endpoint)
        .credentials_provider(elbv2::config::Credentials::new(
            "test", "test", None, None, "static",
        ))
        .retry_config(
            elbv2::config::retry::RetryConfig::standard().with_max_attempts(max_attempts.max(1)),
        )
        .timeout_config(timeouts())
        .build();
    elbv2::Client::from_conf(conf)
}

/// The AWS provider's `--cloud-config` file (YAML or JSON).
///
/// ```yaml
/// region: us-east-1            # else the SDK's default chain (AWS_REGION, profile, IMDS)
/// endpointURL: http://127.0.0.1:5000   # else AWS_ENDPOINT_URL / the SDK default
/// subnets: [subnet-0abc, subnet-0def]  # for Services without the subnets annotation
///                              # (else discovered by tag in the VPC)
/// vpcID: vpc-0123              # where to discover subnets (else the nodes' instances' VPC)
/// disableSecurityGroupIngress: false  # true: leave the nodes' security groups alone
/// maxAttempts: 3               # SDK attempts per call (adaptive retry of throttling and 5xx)
/// maxRulesPerService: 20       # security-group rules one Service may hold (0: no cap)
/// rateLimits:                  # client-side budget per operation class
///   describe: {qps: 10, burst: 40}
///   mutate:   {qps: 10, burst: 40}
///   targets:  {qps: 4,  burst: 20}
/// ```
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AwsCloudConfig {
    /// Region override.
    #[serde(default)]
    pub region: Option<String>,
    /// ELBv2 endpoint override.
    #[serde(default, rename = "endpointURL")]
    pub endpoint_url: Option<String>,
    /// Default subnet IDs or names.
    #[serde(default)]
    pub subnets: Vec<String>,
    /// VPC to discover subnets in.
    #[serde(default, rename = "vpcID")]
    pub vpc_id: Option<String>,
    /// Do not manage the nodes' security groups (cloud-provider-aws's
    /// `DisableSecurityGroupIngress`); `loadBalancerSourceRanges` is then not enforced.
    #[serde(default)]
    pub disable_security_group_ingress: bool,
    /// SDK attempts per call.
    #[serde(default)]
    pub max_attempts: Option<u32>,
    /// Client-side budgets.
    #[serde(default)]
    pub rate_limits: RateLimits,
    /// Ingress rules one Service may hold on the nodes' shared security groups (default
    /// [`crate::aws::spec::tenant::DEFAULT_MAX_RULES_PER_SERVICE`]; 0 turns the cap off).
    #[serde(default)]
    pub max_rules_per_service: Option<usize>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::aws::budget;

    #[test]
    fn cloud_config_reads_every_documented_key() {
        let cfg: AwsCloudConfig = serde_yaml::from_str(
            r#"
region: us-east-1
endpointURL: http://127.0.0.1:5000
subnets: [subnet-0abc, public-b]
vpcID: vpc-0123
disableSecurityGroupIngress: true
maxAttempts: 3
maxRulesPerService: 12
rateLimits:
  describe: {qps: 10, burst: 40}
  ec2Describe: {qps: 5, burst: 10}
  ec2Mutate: {qps: 1, burst: 2}
"#,
        )
        .expect("documented keys parse");
        assert_eq!(cfg.vpc_id.as_deref(), Some("vpc-0123"));
        assert!(cfg.disable_security_group_ingress);
        assert_eq!(cfg.max_rules_per_service, Some(12));
        assert_eq!(cfg.subnets, vec!["subnet-0abc", "public-b"]);
        assert_eq!(cfg.rate_limits.ec2_mutate.burst, 2);
        // Unset classes keep their defaults.
        assert_eq!(
            cfg.rate_limits.targets,
            budget::RateLimits::default().targets
        );
        assert!(serde_yaml::from_str::<AwsCloudConfig>("vpcId: vpc-1").is_err());
    }
}
