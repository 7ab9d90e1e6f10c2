//! The manager binary's cloud-lb controller end to end: flags to config, provider from
//! `--cloud-config`, the AWS SDK's default credential chain and `AWS_ENDPOINT_URL` (pointed at
//! moto on loopback), against the real local control plane. The controller's behaviour in
//! depth is tested by the other modules of this binary; this checks the wiring. These tests
//! hold the same serial lock: their Nodes would otherwise be targets of the others.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Result, anyhow};
use k8s_openapi::api::core::v1::{Service, ServicePort, ServiceSpec};
use kube::Api;
use kube::api::{DeleteParams, ObjectMeta, PostParams};
use test_support::moto::Moto;
use test_support::{
    ControlPlane, Manager, NodeSpecBuilder, create_node, manager_binary, namespace, wait_for,
};

use crate::harness::SERIAL;

const T: Duration = Duration::from_secs(90);

fn lb_service(name: &str, class: &str) -> Service {
    Service {
        metadata: ObjectMeta {
            name: Some(name.into()),
            ..Default::default()
        },
        spec: Some(ServiceSpec {
            type_: Some("LoadBalancer".into()),
            load_balancer_class: Some(class.into()),
            selector: Some([("app".to_string(), name.to_string())].into()),
            ports: Some(vec![ServicePort {
                port: 80,
                ..Default::default()
            }]),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The manager binary with `--cloud-provider=aws`, configured only through the SDK's default
/// chain: environment credentials, region and the endpoint (moto, or the layer in front of it).
fn aws_manager(
    cp: &ControlPlane,
    ns: &str,
    class: &str,
    config: &std::path::Path,
    endpoint: &str,
) -> Result<Manager> {
    let mut cmd = tokio::process::Command::new(manager_binary());
    cmd.arg("--kubeconfig").arg(&cp.kubeconfig);
    cmd.args(args(ns, class, "aws", config.to_str().unwrap_or_default()));
    cmd.env("AWS_ENDPOINT_URL", endpoint)
        .env("AWS_ACCESS_KEY_ID", "test")
        .env("AWS_SECRET_ACCESS_KEY", "test")
        .env("AWS_REGION", "us-east-1")
        .env("AWS_EC2_METADATA_DISABLED", "true");
    Manager::spawn(cmd)
}

fn ingress(s: &Service) -> Option<(Option<String>, Option<String>, Option<String>)> {
    let i = s
        .status
        .as_ref()?
        .load_balancer
        .as_ref()?
        .ingress
        .as_ref()?
        .first()?
        .clone();
    Some((i.ip, i.hostname, i.ip_mode))
}

fn args<'a>(ns: &'a str, class: &'a str, provider: &'a str, config: &'a str) -> Vec<String> {
    vec![
        "--controllers=cloud-lb".into(),
        format!("--cloud-provider={provider}"),
        format!("--cloud-config={config}"),
        format!("--load-balancer-class={class}"),
        "--default-load-balancer=false".into(),
        "--cluster-name=it-binary".into(),
        "--leader-elect=false".into(),
        format!("--leader-elect-resource-namespace={ns}"),
        "--http-address=127.0.0.1:0".into(),
    ]
}

async fn round_trip(client: &kube::Client, ns: &str, class: &str) -> Result<Service> {
    let api: Api<Service> = Api::namespaced(client.clone(), ns);
    api.create(&PostParams::default(), &lb_service("web", class))
        .await?;
    let svc = wait_for("load balancer status", T, || async {
        api.get_opt("web")
            .await
            .ok()
            .flatten()
            .filter(|s| ingress(s).is_some())
    })
    .await?;
    api.delete("web", &DeleteParams::default()).await?;
    wait_for("service deleted through the finalizer", T, || async {
        api.get_opt("web")
            .await
            .ok()
            .and_then(|s| s.is_none().then_some(()))
    })
    .await?;
    Ok(svc)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_serves_load_balancers_from_local_pools() -> Result<()> {
    let _g = SERIAL.lock().await;
    let cp = ControlPlane::shared().await?;
    let client = cp.client().await?;
    let ns = namespace(&client, "cloudlb-bin-local").await?;
    let config = std::env::temp_dir().join(format!("{ns}-cloud.yaml"));
    std::fs::write(&config, "pools: [10.123.0.0/29]\nipMode: Proxy\n")?;
    let class = format!("test.example.com/{ns}");
    let a = args(&ns, &class, "local", config.to_str().unwrap_or_default());
    let a: Vec<&str> = a.iter().map(String::as_str).collect();
    let m = Manager::start(cp, &a)?;
    let svc = round_trip(&client, &ns, &class)
        .await
        .map_err(|e| anyhow!("{e}\nmanager log:\n{}", m.log_lines().join("\n")))?;
    let (ip, _, mode) = ingress(&svc).ok_or_else(|| anyhow!("no ingress"))?;
    assert!(ip.is_some_and(|ip| ip.starts_with("10.123.0.")));
    assert_eq!(mode.as_deref(), Some("Proxy"));
    let _ = std::fs::remove_file(&config);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_serves_nlbs_through_the_sdk_default_chain() -> Result<()> {
    let _g = SERIAL.lock().await;
    let cp = ControlPlane::shared().await?;
    let client = cp.client().await?;
    let ns = namespace(&client, "cloudlb-bin-aws").await?;
    let moto = Moto::start().await?;
    let config = cloud_config(&moto, &ns).await?;
    // A node with an AWS provider ID, so the load balancer has a target.
    let node = format!("bin-{ns}");
    create_node(
        &client,
        NodeSpecBuilder {
            name: node.clone(),
            provider_id: Some("aws:///us-east-1a/i-0123456789abcdef0".into()),
            labels: BTreeMap::new(),
            ..Default::default()
        },
    )
    .await?;
    let class = format!("test.example.com/{ns}");
    let m = aws_manager(cp, &ns, &class, &config, &moto.endpoint)?;
    let svc = round_trip(&client, &ns, &class)
        .await
        .map_err(|e| anyhow!("{e}\nmanager log:\n{}", m.log_lines().join("\n")))?;
    let (_, hostname, _) = ingress(&svc).ok_or_else(|| anyhow!("no ingress"))?;
    assert!(
        hostname.is_some_and(|h| h.starts_with("k8s-") && h.contains(".elb.")),
        "an NLB DNS name"
    );
    let _ = Api::<k8s_openapi::api::core::v1::Node>::all(client.clone())
        .delete(&node, &DeleteParams::default())
        .await;
    let _ = std::fs::remove_file(&config);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_killed_mid_create_then_restarted_adopts_the_load_balancer() -> Result<()> {
    use test_support::moto::{Fault, FaultKind, FaultProxy};
    let _g = SERIAL.lock().await;
    let cp = ControlPlane::shared().await?;
    let client = cp.client().await?;
    let ns = namespace(&client, "cloudlb-bin-kill").await?;
    let moto = Moto::start().await?;
    let proxy = FaultProxy::start(&moto.addr).await?;
    let config = cloud_config(&moto, &ns).await?;
    let class = format!("test.example.com/{ns}");
    let manager = || aws_manager(cp, &ns, &class, &config, &proxy.endpoint);
    // CreateLoadBalancer takes effect in moto, but its answer never reaches the manager.
    proxy.inject(Fault {
        action: Some("CreateLoadBalancer".into()),
        kind: FaultKind::ForwardThenHang,
        times: 1,
    });
    let first = manager()?;
    let api: Api<Service> = Api::namespaced(client.clone(), &ns);
    api.create(&PostParams::default(), &lb_service("web", &class))
        .await?;
    // The fault layer counts the call before it forwards it: wait for moto to hold the load
    // balancer too, else the restarted manager may look it up before it exists and rightly
    // create it again.
    let elb = cloud_lb::aws::emulator_client(&moto.endpoint, test_support::moto::REGION, 1);
    wait_for("CreateLoadBalancer taken effect in moto", T, || async {
        let sent = proxy.counts().contains_key("CreateLoadBalancer");
        let lbs = elb.describe_load_balancers().send().await.ok()?;
        (sent && !lbs.load_balancers().is_empty()).then_some(())
    })
    .await?;
    first.signal(9)?;
    drop(first);

    let second = manager()?;
    let svc = wait_for("load balancer status after restart", T, || async {
        api.get_opt("web")
            .await
            .ok()
            .flatten()
            .filter(|s| ingress(s).is_some())
    })
    .await
    .map_err(|e| anyhow!("{e}\nmanager log:\n{}", second.log_lines().join("\n")))?;
    assert_eq!(
        proxy.counts().get("CreateLoadBalancer"),
        Some(&1),
        "adopted, not created again (moto would have made a duplicate)"
    );
    let (_, hostname, _) = ingress(&svc).ok_or_else(|| anyhow!("no ingress"))?;
    assert!(hostname.is_some());
    api.delete("web", &DeleteParams::default()).await?;
    wait_for("deleted", T, || async {
        api.get_opt("web")
            .await
            .ok()
            .and_then(|s| s.is_none().then_some(()))
    })
    .await?;
    let _ = std::fs::remove_file(&config);
    Ok(())
}

/// `plan` with the AWS provider against moto: the plan lists the ELBv2 calls a new Service's
/// load balancer needs and the log has one structured line per call, but moto gets no
/// mutating call (its security groups are as before) and the Service no finalizer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plan_with_aws_lists_the_calls_and_makes_none() -> Result<()> {
    use test_support::moto::{FaultProxy, is_mutating};
    let _g = SERIAL.lock().await;
    let cp = ControlPlane::shared().await?;
    let client = cp.client().await?;
    let ns = namespace(&client, "cloudlb-bin-plan").await?;
    let moto = Moto::start().await?;
    let proxy = FaultProxy::start(&moto.addr).await?;
    let config = cloud_config(&moto, &ns).await?;
    let node = format!("bin-{ns}");
    create_node(
        &client,
        NodeSpecBuilder {
            name: node.clone(),
            provider_id: Some("aws:///us-east-1a/i-0fedcba987654321f".into()),
            ..Default::default()
        },
    )
    .await?;
    let class = format!("test.example.com/{ns}");
    let api: Api<Service> = Api::namespaced(client.clone(), &ns);
    api.create(&PostParams::default(), &lb_service("web", &class))
        .await?;
    let groups_before = moto.ec2("DescribeSecurityGroups", &[]).await?;
    proxy.reset_counts();

    let mut cmd = tokio::process::Command::new(manager_binary());
    cmd.arg("plan").arg("--kubeconfig").arg(&cp.kubeconfig);
    cmd.args(args(
        &ns,
        &class,
        "aws",
        config.to_str().unwrap_or_default(),
    ));
    cmd.env("AWS_ENDPOINT_URL", &proxy.endpoint)
        .env("AWS_ACCESS_KEY_ID", "test")
        .env("AWS_SECRET_ACCESS_KEY", "test")
        .env("AWS_REGION", "us-east-1")
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env("SCM_LOG", "info")
        .kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(180), cmd.output()).await??;
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    eprintln!("plan output:\n{stdout}");
    assert!(out.status.success(), "{stdout}\n{stderr}");
    for op in [
        "CreateLoadBalancer",
        "CreateTargetGroup",
        "RegisterTargets",
        "CreateListener",
    ] {
        assert!(
            stdout
                .lines()
                .any(|l| l.starts_with("cloud-lb") && l.contains(op) && l.contains("elbv2")),
            "{op} planned:\n{stdout}"
        );
        assert!(
            stderr
                .lines()
                .any(|l| l.contains("dry run: would write") && l.contains(op)),
            "{op} logged:\n{stderr}"
        );
    }
    assert!(
        stdout.lines().any(|l| l.contains("i-0fedcba987654321f")),
        "the node is a planned target:\n{stdout}"
    );
    let mutating: Vec<_> = proxy
        .counts()
        .into_iter()
        .filter(|(op, n)| is_mutating(op) && *n > 0)
        .collect();
    assert!(
        mutating.is_empty(),
        "mutating calls reached moto: {mutating:?}"
    );
    assert!(
        proxy.counts().keys().any(|op| op.starts_with("Describe")),
        "the plan did observe AWS"
    );
    assert_eq!(
        moto.ec2("DescribeSecurityGroups", &[]).await?,
        groups_before
    );
    let svc = api.get("web").await?;
    assert!(svc.metadata.finalizers.as_ref().is_none_or(Vec::is_empty));
    assert!(ingress(&svc).is_none());

    let _ = api.delete("web", &DeleteParams::default()).await;
    let _ = Api::<k8s_openapi::api::core::v1::Node>::all(client.clone())
        .delete(&node, &DeleteParams::default())
        .await;
    let _ = std::fs::remove_file(&config);
    Ok(())
}

/// A `--cloud-config` file naming moto's first default subnet, in the temp dir.
async fn cloud_config(moto: &Moto, ns: &str) -> Result<std::path::PathBuf> {
    let subnets = moto.default_subnets().await?;
    let config = std::env::temp_dir().join(format!("{ns}-cloud.yaml"));
    std::fs::write(&config, format!("subnets: [{}]\n", subnets[0]))?;
    Ok(config)
}
