//! The data path: an unmodified kube-proxy v1.37.2 (iptables and nftables modes), in network
//! namespaces made by the test, turns the Services, EndpointSlices (ours, also mirrored from
//! hand-made Endpoints) and load-balancer addresses our manager writes into traffic from a
//! client to pods: ClusterIP, NodePort, `externalTrafficPolicy: Local`, LoadBalancer, ClientIP
//! session affinity and readiness flips. And `explain`'s iptables rules equal what
//! `iptables-save` shows on a node. Needs root (network namespaces) and `make tools`.

mod basic;
mod cluster;
mod dns;
mod dualstack;
mod helper;
mod net;
mod rules;
mod scenarios;
mod terminating;

/// Not a test: the entry point of the helper processes ([`helper`]) that the tests start in
/// network namespaces (`SCM_DATAPATH_HELPER` names the role). Run without it, it returns.
#[test]
#[ignore = "entry point of the data-path tests' helper processes, not a test"]
fn helper_process() {
    if let Ok(role) = std::env::var(helper::ROLE_ENV) {
        if let Err(e) = helper::run(&role) {
            eprintln!("helper {role:?}: {e}");
            std::process::exit(1);
        }
        std::process::exit(0);
    }
}
