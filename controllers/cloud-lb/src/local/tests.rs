//! The local provider's allocation, requests, exhaustion and restore.

use super::*;
use k8s_openapi::api::core::v1::{ServiceSpec, ServiceStatus};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

fn provider(pools: &[&str]) -> LocalProvider {
    LocalProvider::new(LocalCloudConfig {
        pools: pools.iter().filter_map(|p| p.parse().ok()).collect(),
        ip_mode: None,
    })
    .expect("valid config")
}

fn svc(name: &str, fams: &[&str], lb_ip: Option<&str>) -> Service {
    Service {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some("ns".into()),
            uid: Some(format!("uid-{name}")),
            ..Default::default()
        },
        spec: Some(ServiceSpec {
            type_: Some("LoadBalancer".into()),
            ip_families: Some(fams.iter().map(|s| s.to_string()).collect()),
            load_balancer_ip: lb_ip.map(str::to_string),
            ..Default::default()
        }),
        status: None,
    }
}

fn ips(s: &LoadBalancerStatus) -> Vec<String> {
    s.ingress
        .iter()
        .flatten()
        .filter_map(|i| i.ip.clone())
        .collect()
}

#[tokio::test]
async fn stable_dual_stack_allocation_and_release() {
    let p = provider(&["192.168.0.0/29", "fd00::/125"]);
    let s = svc("a", &["IPv4", "IPv6"], None);
    let st = p.ensure("c", &s, &[]).await.expect("allocated");
    let got = ips(&st);
    assert_eq!(got.len(), 2);
    assert!(got[0].starts_with("192.168.0.") && got[1].starts_with("fd00::"));
    assert_eq!(
        st.ingress
            .as_ref()
            .and_then(|i| i[0].ip_mode.clone())
            .as_deref(),
        Some("VIP")
    );
    // Again: the same addresses.
    assert_eq!(ips(&p.ensure("c", &s, &[]).await.expect("same")), got);
    let free = p.free();
    p.ensure_deleted("c", &s).await.expect("deleted");
    assert_eq!(p.free(), free + 2);
    assert!(p.get("c", &s).await.expect("get").is_none());
}

#[tokio::test]
async fn requested_addresses() {
    let p = provider(&["10.0.0.0/29"]);
    let a = svc("a", &["IPv4"], Some("10.0.0.5"));
    assert_eq!(
        ips(&p.ensure("c", &a, &[]).await.expect("ok")),
        vec!["10.0.0.5"]
    );
    // Taken by a: retried when a releases it (issue 14), so coded like a full pool.
    let b = svc("b", &["IPv4"], Some("10.0.0.5"));
    let e = p.ensure("c", &b, &[]).await.expect_err("taken");
    assert!(
        !e.is_permanent() && e.has_code(CAPACITY_EXHAUSTED) && e.to_string().contains("ns/a"),
        "{e}"
    );
    // Outside the pools.
    let c = svc("c", &["IPv4"], Some("10.9.9.9"));
    assert!(
        p.ensure("c", &c, &[])
            .await
            .is_err_and(|e| e.is_permanent())
    );
    // The network address is never handed out.
    let d = svc("d", &["IPv4"], Some("10.0.0.0"));
    assert!(
        p.ensure("c", &d, &[])
            .await
            .is_err_and(|e| e.is_permanent())
    );
    // The annotation wins over spec.loadBalancerIP; a change moves the Service.
    let mut a2 = a.clone();
    a2.metadata.annotations =
        Some([(REQUESTED_IPS_ANNOTATION.to_string(), "10.0.0.6".to_string())].into());
    assert_eq!(
        ips(&p.ensure("c", &a2, &[]).await.expect("moved")),
        vec!["10.0.0.6"]
    );
    // 10.0.0.5 is free again.
    assert_eq!(
        ips(&p.ensure("c", &b, &[]).await.expect("now free")),
        vec!["10.0.0.5"]
    );
    let bad = {
        let mut s = svc("e", &["IPv4"], None);
        s.metadata.annotations = Some(
            [(
                REQUESTED_IPS_ANNOTATION.to_string(),
                "not-an-ip".to_string(),
            )]
            .into(),
        );
        s
    };
    assert!(
        p.ensure("c", &bad, &[])
            .await
            .is_err_and(|e| e.is_permanent())
    );
}

#[tokio::test]
async fn exhaustion_is_retryable_and_recovers() {
    // A /30 has two usable addresses.
    let p = provider(&["10.1.0.0/30"]);
    let a = svc("a", &["IPv4"], None);
    let b = svc("b", &["IPv4"], None);
    let c = svc("c", &["IPv4"], None);
    p.ensure("c", &a, &[]).await.expect("a");
    p.ensure("c", &b, &[]).await.expect("b");
    let e = p.ensure("c", &c, &[]).await.expect_err("full");
    assert!(matches!(e, ProviderError::Retryable { .. }), "{e}");
    assert!(
        e.has_code(CAPACITY_EXHAUSTED),
        "retried on a release: {e:?}"
    );
    p.ensure_deleted("c", &a).await.expect("release");
    assert_eq!(
        ips(&p.ensure("c", &c, &[]).await.expect("c fits now")).len(),
        1
    );
}

#[tokio::test]
async fn no_pool_for_family_waits_for_a_pool() {
    // A pool of that family may be created as an object at any time: coded so that its
    // creation (the provider's capacity signal) retries the Service at once.
    let p = provider(&["10.1.0.0/30"]);
    let v6 = svc("a", &["IPv6"], None);
    assert!(
        p.ensure("c", &v6, &[])
            .await
            .is_err_and(|e| !e.is_permanent() && e.has_code(CAPACITY_EXHAUSTED))
    );
    assert!(p.capacity_signal().is_some());
}

#[tokio::test]
async fn restart_restores_published_addresses() {
    let p = provider(&["10.2.0.0/28"]);
    let mut services = vec![];
    for n in ["a", "b", "c"] {
        let mut s = svc(n, &["IPv4"], None);
        let st = p.ensure("c", &s, &[]).await.expect("allocated");
        s.status = Some(ServiceStatus {
            load_balancer: Some(st),
            ..Default::default()
        });
        services.push(s);
    }
    // A new process: same config, empty state.
    let q = provider(&["10.2.0.0/28"]);
    q.restore("c", &services).await.expect("restored");
    for s in &services {
        let again = q.ensure("c", s, &[]).await.expect("same");
        assert_eq!(
            ips(&again),
            published(s)
                .iter()
                .map(|i| i.to_string())
                .collect::<Vec<_>>()
        );
    }
    // A new Service never gets one of the restored addresses.
    let d = q
        .ensure("c", &svc("d", &["IPv4"], None), &[])
        .await
        .expect("new");
    let taken: Vec<String> = services
        .iter()
        .flat_map(published)
        .map(|i| i.to_string())
        .collect();
    assert!(!taken.contains(&ips(&d)[0]));
}

#[test]
fn config_validation() {
    let y = "pools: [192.168.1.0/24, 'fd00::/120']\nipMode: Proxy\n";
    let cfg: LocalCloudConfig = serde_yaml::from_str(y).expect("parses");
    assert_eq!(cfg.pools.len(), 2);
    assert!(LocalProvider::new(cfg).is_ok());
    // No file pools: they come from LoadBalancerIPPool objects.
    assert!(LocalProvider::new(LocalCloudConfig::default()).is_ok());
    let overlap = LocalCloudConfig {
        pools: vec![
            "10.0.0.0/24".parse().expect("cidr"),
            "10.0.0.128/25".parse().expect("cidr"),
        ],
        ip_mode: None,
    };
    assert!(matches!(
        LocalProvider::new(overlap),
        Err(LocalConfigError::Overlap(..))
    ));
    assert!(serde_yaml::from_str::<LocalCloudConfig>("pools: []\nbogus: 1\n").is_err());
}

#[tokio::test]
async fn a_restart_after_a_pool_shrank_keeps_every_published_address() {
    // Issue 14: the old restore dropped an address its (shrunk) pool no longer covered, and
    // the next ensure renumbered the Service.
    let p = provider(&["10.3.0.0/28"]);
    let mut s = svc("a", &["IPv4"], Some("10.3.0.9"));
    s.spec.as_mut().expect("spec").load_balancer_class = Some("example.com/ours".into());
    let st = p.ensure("c", &s, &[]).await.expect("allocated");
    s.status = Some(ServiceStatus {
        load_balancer: Some(st),
        ..Default::default()
    });
    s.spec.as_mut().expect("spec").load_balancer_ip = None;
    let shrunk = provider(&["10.3.0.0/29"]);
    shrunk
        .restore("c", std::slice::from_ref(&s))
        .await
        .expect("restored");
    assert_eq!(
        ips(&shrunk.ensure("c", &s, &[]).await.expect("kept")),
        vec!["10.3.0.9"]
    );
    // And nobody else gets it either.
    let b = shrunk
        .ensure("c", &svc("b", &["IPv4"], None), &[])
        .await
        .expect("b");
    assert_ne!(ips(&b), vec!["10.3.0.9"]);
}

#[tokio::test]
async fn a_class_less_services_address_outside_every_pool_is_not_taken_over() {
    // Issue 12 defect 7: the cluster's own cloud-controller-manager serves class-less Services
    // too; an address of one outside our pools is its, so restore must not hold it (holding it
    // made `get` find it and the shell take the Service over).
    let p = provider(&["10.3.0.0/29"]);
    let mut theirs = svc("theirs", &["IPv4"], None);
    theirs.status = Some(ServiceStatus {
        load_balancer: Some(LoadBalancerStatus {
            ingress: Some(vec![LoadBalancerIngress {
                ip: Some("203.0.113.7".into()),
                ..Default::default()
            }]),
        }),
        ..Default::default()
    });
    p.restore("c", std::slice::from_ref(&theirs))
        .await
        .expect("restored");
    assert_eq!(p.get("c", &theirs).await.expect("get"), None);
}
