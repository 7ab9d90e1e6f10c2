//! The `EndpointsReady` condition on the real API server: each reason appears and clears,
//! selector removal takes it off, two field managers' conditions coexist in the list-map, and a
//! healthy Service that scales writes no condition at all.

use super::*;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use scm_runtime::conditions::field_manager;

const TYPE: &str = "EndpointsReady";

fn condition(svc: &Service, t: &str) -> Option<Condition> {
    svc.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == t)
        .cloned()
}

impl Env {
    async fn get_service(&self, name: &str) -> Result<Service> {
        let api: Api<Service> = Api::namespaced(self.client.clone(), &self.ns);
        Ok(api.get(name).await?)
    }

    /// Polls until the Service's condition `t` satisfies `check` (`None`: absent).
    async fn wait_condition<F>(&self, name: &str, t: &str, what: &str, check: F) -> Result<Service>
    where
        F: Fn(Option<&Condition>) -> bool,
    {
        let mut last = None;
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            if let Ok(s) = self.get_service(name).await {
                if check(condition(&s, t).as_ref()) {
                    return Ok(s);
                }
                last = condition(&s, t);
            }
            if tokio::time::Instant::now() >= deadline {
                bail!("timed out waiting for {what}; last {t}: {last:?}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn wait_reason(&self, name: &str, status: &str, reason: &str) -> Result<Condition> {
        let s = self
            .wait_condition(name, TYPE, reason, |c| {
                c.is_some_and(|c| c.status == status && c.reason == reason)
            })
            .await?;
        condition(&s, TYPE).ok_or_else(|| anyhow::anyhow!("condition vanished"))
    }
}

fn web_spec(target: &str) -> serde_json::Value {
    serde_json::json!({
        "selector": {"app": "web"},
        "ports": [{"name": "http", "port": 80, "targetPort": target}],
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoints_ready_each_reason_appears_and_clears() -> Result<()> {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let e = env("es-cond").await?;
    let c = start_slices(&e.client, &e.ns, EndpointSliceConfig::default());
    let created = e.service("web", web_spec("http")).await?;
    let first = e
        .wait_reason("web", "False", "SelectorMatchesNothing")
        .await?;
    assert_eq!(first.observed_generation, created.metadata.generation);

    // A pod that has no IP yet.
    let mut b = PodBuilder::new(&e.ns, "web-0", &[("app", "web")]);
    b.node_name = Some(e.node(0));
    b.ports = vec![(Some("http".into()), 8080, "TCP".into())];
    create_pod(&e.client, &b).await?;
    let no_ip = e.wait_reason("web", "False", "PodsWithoutIP").await?;
    assert_eq!(
        no_ip.last_transition_time, first.last_transition_time,
        "False to False keeps the transition time"
    );

    let ip = pod_ip(0);
    e.set_ready("web-0", &ip, false).await?;
    e.wait_reason("web", "False", "NoReadyPods").await?;

    e.set_ready("web-0", &ip, true).await?;
    let ok = e.wait_reason("web", "True", "EndpointsReady").await?;
    assert!(ok.last_transition_time.0 >= first.last_transition_time.0);

    // A named targetPort no ready pod has.
    let api: Api<Service> = Api::namespaced(e.client.clone(), &e.ns);
    let patched = api
        .patch(
            "web",
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"spec": {"ports": [{"name": "http", "port": 80, "targetPort": "metrics"}]}})),
        )
        .await?;
    let missing = e.wait_reason("web", "False", "NamedPortNotFound").await?;
    assert!(missing.message.contains("metrics"), "{}", missing.message);
    assert_eq!(missing.observed_generation, patched.metadata.generation);
    api.patch(
        "web",
        &PatchParams::default(),
        &Patch::Merge(serde_json::json!({"spec": {"ports": [{"name": "http", "port": 80, "targetPort": "http"}]}})),
    )
    .await?;
    e.wait_reason("web", "True", "EndpointsReady").await?;

    // Selector removed: not ours to fill any more, the condition goes.
    api.patch(
        "web",
        &PatchParams::default(),
        &Patch::Merge(serde_json::json!({"spec": {"selector": null}})),
    )
    .await?;
    e.wait_condition("web", TYPE, "EndpointsReady removed", |c| c.is_none())
        .await?;
    c.stop().await;
    Ok(())
}

/// Server-side apply merges `status.conditions` per type: another manager's condition stays
/// through our transitions, and ours through its removal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_managers_conditions_coexist() -> Result<()> {
    let e = env("es-cond2").await?;
    let c = start_slices(&e.client, &e.ns, EndpointSliceConfig::default());
    e.service("web", web_spec("http")).await?;
    e.pod(0, "web", true, 8080).await?;
    e.wait_reason("web", "True", "EndpointsReady").await?;
    let api: Api<Service> = Api::namespaced(e.client.clone(), &e.ns);
    let other = |conditions: serde_json::Value| {
        serde_json::json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "web", "namespace": e.ns},
            "status": {"conditions": conditions},
        })
    };
    let lb_manager = field_manager("cloud-lb");
    let pp = PatchParams::apply(&lb_manager).force();
    api.patch_status(
        "web",
        &pp,
        &Patch::Apply(other(serde_json::json!([{
            "type": "LoadBalancerReady", "status": "False", "reason": "PoolExhausted",
            "message": "no free address", "lastTransitionTime": "2026-01-01T00:00:00Z",
        }]))),
    )
    .await?;
    // Our transition keeps theirs.
    e.set_ready("web-0", &pod_ip(0), false).await?;
    e.wait_reason("web", "False", "NoReadyPods").await?;
    let s = e.get_service("web").await?;
    let lb = condition(&s, "LoadBalancerReady").expect("the other manager's condition stays");
    assert_eq!(lb.reason, "PoolExhausted");
    let managers: Vec<String> = s
        .metadata
        .managed_fields
        .iter()
        .flatten()
        .filter(|m| m.subresource.as_deref() == Some("status"))
        .filter_map(|m| m.manager.clone())
        .collect();
    assert!(
        managers.contains(&field_manager("endpointslice")) && managers.contains(&lb_manager),
        "{managers:?}"
    );
    // Theirs removed by applying none: ours stays.
    api.patch_status("web", &pp, &Patch::Apply(other(serde_json::json!([]))))
        .await?;
    let s = e
        .wait_condition("web", "LoadBalancerReady", "theirs removed", |c| {
            c.is_none()
        })
        .await?;
    assert_eq!(
        condition(&s, TYPE).map(|c| c.reason),
        Some("NoReadyPods".to_string())
    );
    c.stop().await;
    Ok(())
}

/// A healthy Service that scales (slices rewritten, the condition's inputs unchanged) gets no
/// condition write: counted by the controller's write metric and by the Service's
/// resourceVersion.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn steady_state_writes_no_condition() -> Result<()> {
    let e = env("es-cond3").await?;
    let c = start_slices(&e.client, &e.ns, EndpointSliceConfig::default());
    e.service("web", web_spec("http")).await?;
    e.pod(0, "web", true, 8080).await?;
    let s0 = e
        .wait_condition("web", TYPE, "True", |c| {
            c.is_some_and(|c| c.status == "True")
        })
        .await?;
    let writes0 = c.metrics.condition_writes("endpointslice");
    assert!(writes0 >= 1);
    for i in 1..4 {
        e.pod(i, "web", true, 8080).await?;
    }
    e.wait_slices("web", "four ready endpoints", |s| ready_count(s) == 4)
        .await?;
    // Every reconcile those pods caused has finished, and so has any condition write one of
    // them wished for: the conditions writer applies wishes after the reconcile, on its own
    // task (scm_runtime::conditions::Writer), so the write count must settle too.
    test_support::wait_stable(
        "reconciles and condition writes settled",
        WAIT,
        Duration::from_millis(200),
        5,
        || async {
            let reconciles = c
                .metrics
                .encode()
                .lines()
                .find(|l| {
                    l.starts_with("service_controller_manager_reconcile_total{")
                        && l.contains("controller=\"endpointslice\"")
                })
                .map(String::from)?;
            Some((reconciles, c.metrics.condition_writes("endpointslice")))
        },
    )
    .await?;
    let s1 = e.get_service("web").await?;
    assert_eq!(
        c.metrics.condition_writes("endpointslice"),
        writes0,
        "no condition write while the Service stays ready"
    );
    assert_eq!(
        s1.metadata.resource_version, s0.metadata.resource_version,
        "the Service was not written"
    );
    c.stop().await;
    Ok(())
}
