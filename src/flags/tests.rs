//! Flag parsing and validation, against kube-controller-manager's names and defaults.

use super::*;

/// Parses and validates `args` as the binary does (the serving flags' tests use it too).
pub(crate) fn flags(args: &[&str]) -> Result<Flags, String> {
    let mut all = vec!["service-controller-manager"];
    all.extend_from_slice(args);
    let f = Flags::try_parse_from(all).map_err(|e| e.to_string())?;
    f.validate()?;
    Ok(f)
}

#[test]
fn defaults_match_kube_controller_manager() {
    let f = flags(&[]).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        f.service_node_port_range,
        PortRange {
            base: 30000,
            last: 32767
        }
    );
    assert_eq!(f.leader_elect_lease_duration, Duration::from_secs(15));
    assert_eq!(f.leader_elect_renew_deadline, Duration::from_secs(10));
    assert_eq!(f.leader_elect_retry_period, Duration::from_secs(2));
    assert!(f.leader_elect);
    assert_eq!(f.kube_api_qps, 20.0);
    assert_eq!(f.kube_api_burst, 30);
    assert_eq!(f.cluster_name, "kubernetes");
    assert_eq!(f.cloud_inventory_interval, Duration::from_secs(600));
    assert_eq!(f.cloud_orphans, cloud_lb::OrphanMode::Report);
    assert!(
        !f.endpoint_aware_load_balancer_targets,
        "upstream's target set"
    );
    let on = flags(&["--endpoint-aware-load-balancer-targets"]).unwrap_or_else(|e| panic!("{e}"));
    assert!(on.endpoint_aware_load_balancer_targets);
    assert!(
        !f.assign,
        "a stock API server allocates: never write Services"
    );
    assert!(flags(&["--assign"]).is_ok_and(|f| f.assign));
    assert!(flags(&["--assign=false"]).is_ok_and(|f| !f.assign));
}

#[test]
fn controllers_star_and_minus() {
    let on = |items: &[&str], cloud| {
        let v: Vec<String> = items.iter().map(|s| s.to_string()).collect();
        enabled_controllers(&v, cloud)
    };
    assert_eq!(
        on(&["*"], false).map(|v| v.len()),
        Ok(CONTROLLERS.len() - 1)
    );
    assert_eq!(on(&["*"], true).map(|v| v.len()), Ok(CONTROLLERS.len()));
    assert_eq!(
        on(&["*", "-endpoints"], false).map(|v| v.contains(&"endpoints")),
        Ok(false)
    );
    assert_eq!(on(&["endpointslice"], false), Ok(vec!["endpointslice"]));
    assert!(on(&["cloud-lb"], false).is_err());
    assert!(on(&["endpoints", "-endpoints"], false).is_err());
}

#[test]
fn rejects_bad_values_naming_the_flag() {
    for (args, flag) in [
        (
            vec!["--service-cluster-ip-range=10.0.0.0/33"],
            "--service-cluster-ip-range",
        ),
        (
            vec!["--service-cluster-ip-range=10.0.0.1/24"],
            "--service-cluster-ip-range",
        ),
        (
            vec!["--service-cluster-ip-range=fd00::/48"],
            "--service-cluster-ip-range",
        ),
        (
            vec!["--service-cluster-ip-range=10.0.0.0/16,10.1.0.0/16"],
            "--service-cluster-ip-range",
        ),
        (
            vec!["--service-node-port-range=0-100"],
            "--service-node-port-range",
        ),
        (
            vec!["--service-node-port-range=30000-70000"],
            "--service-node-port-range",
        ),
        (
            vec!["--service-node-port-range=32767-30000"],
            "--service-node-port-range",
        ),
        (vec!["--controllers=*,bogus"], "--controllers"),
        (
            vec!["--endpoint-updates-batch-period=soon"],
            "--endpoint-updates-batch-period",
        ),
        (
            vec!["--leader-elect-lease-duration=5s"],
            "--leader-elect-renew-deadline",
        ),
        (
            vec!["--max-endpoints-per-slice=1001"],
            "--max-endpoints-per-slice",
        ),
        // These panicked in Duration::from_secs_f64 instead of naming the flag.
        (
            vec!["--leader-elect-lease-duration=99999999999999999999h"],
            "--leader-elect-lease-duration",
        ),
        (vec!["--kube-api-qps=1e-300"], "--kube-api-qps"),
        // Was a controller failing after start-up instead of exit 2.
        (
            vec!["--service-label-selector=app in (a"],
            "--service-label-selector",
        ),
        (
            vec!["--cloud-inventory-interval=0s"],
            "--cloud-inventory-interval",
        ),
        (
            vec!["--cloud-inventory-interval=10"],
            "--cloud-inventory-interval",
        ),
        (
            vec!["--cloud-inventory-interval=99999999999999999999h"],
            "--cloud-inventory-interval",
        ),
        (vec!["--cloud-orphans=purge"], "--cloud-orphans"),
        // client-go refuses a renew deadline within 1.2 retry periods.
        (
            vec![
                "--leader-elect-renew-deadline=4s",
                "--leader-elect-retry-period=4s",
            ],
            "--leader-elect-renew-deadline",
        ),
    ] {
        let e = flags(&args).err().unwrap_or_default();
        assert!(e.contains(flag), "{args:?}: {e}");
    }
}

#[test]
fn durations() {
    assert_eq!(parse_duration("1m30s"), Ok(Duration::from_secs(90)));
    assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
    assert!(parse_duration("5").is_err());
    assert!(parse_duration("5x").is_err());
    assert!(parse_duration("99999999999999999999h").is_err());
}

#[test]
fn the_lease_example_from_the_reliability_issue_is_valid() {
    // Valid for client-go: the elector, not validation, must keep it safe (it bounds each
    // renewal by the renew deadline).
    flags(&[
        "--leader-elect-lease-duration=15s",
        "--leader-elect-renew-deadline=13s",
        "--leader-elect-retry-period=4s",
    ])
    .expect("valid");
}
