//! The chart as rendered: `helm lint`, the values schema's rejections, rendering with every
//! provider accepted by the API server (server-side dry run), and RBAC that follows `controllers`.

use super::*;

#[tokio::test]
async fn helm_lint_passes_strict() {
    for sets in [&[][..], AWS, LOCAL] {
        let mut cmd = Command::new(tool("helm").expect("bin/helm"));
        cmd.args(["lint", "--strict"]).arg(chart_dir());
        for s in sets {
            cmd.arg("--set").arg(s);
        }
        let o = run(&mut cmd, None).await;
        assert!(o.ok, "helm lint {sets:?}: {}{}", o.stdout, o.stderr);
        assert!(o.stdout.contains("0 chart(s) failed"), "{}", o.stdout);
    }
    // NOTES.txt renders only on install; a client-side dry run renders it without a cluster.
    let o = run(
        Command::new(tool("helm").expect("bin/helm"))
            .args(["install", "scm", "--dry-run=client", "-n", "kube-system"])
            .arg(chart_dir()),
        None,
    )
    .await;
    assert!(o.ok, "helm install --dry-run: {}", o.stderr);
    assert!(
        o.stdout.contains("NOTES:") && o.stdout.contains("cloud-lb is off"),
        "{}",
        o.stdout
    );
}

#[tokio::test]
async fn schema_rejects_wrong_types_unknown_providers_and_unknown_keys() {
    let cases: &[(&[&str], &str)] = &[
        (&["replicaCount=two"], "/replicaCount"),
        (&["cloudProvider.name=gce"], "/cloudProvider/name"),
        (&["controllers.endpoints=maybe"], "/controllers/endpoints"),
        (
            &["endpointSlice.maxEndpointsPerSlice=1001"],
            "/endpointSlice/maxEndpointsPerSlice",
        ),
        (&["logging.format=xml"], "/logging/format"),
        (
            &["leaderElection.leaseDuration=15"],
            "/leaderElection/leaseDuration",
        ),
        (
            &["controllers.no-such-controller=true"],
            "no-such-controller",
        ),
        (&["cloudProvider.name=local"], "/cloudProvider/local/pools"),
        (
            &["serviceClusterIPRanges={not-a-cidr}"],
            "/serviceClusterIPRanges",
        ),
    ];
    for (sets, path) in cases {
        let o = helm_template("scm", "scm-system", sets).await;
        assert!(!o.ok, "{sets:?} was accepted");
        assert!(
            o.stderr.contains("schema") && o.stderr.contains(path),
            "{sets:?}: message should name {path}: {}",
            o.stderr
        );
    }
    // Relations no schema can see are template failures with a message.
    let o = helm_template(
        "scm",
        "scm-system",
        &["leaderElection.enabled=false", "replicaCount=2"],
    )
    .await;
    assert!(
        !o.ok && o.stderr.contains("leaderElection.enabled=false"),
        "{}",
        o.stderr
    );
    let all_off: Vec<String> = [
        "clusterip-alloc",
        "service-cidr",
        "nodeport-alloc",
        "endpointslice",
        "endpointslice-mirroring",
        "endpoints",
        "cloud-lb",
    ]
    .iter()
    .map(|c| format!("controllers.{c}=false"))
    .collect();
    let all_off: Vec<&str> = all_off.iter().map(String::as_str).collect();
    let o = helm_template("scm", "scm-system", &all_off).await;
    assert!(
        !o.ok && o.stderr.contains("every controller is disabled"),
        "{}",
        o.stderr
    );
}

#[tokio::test]
async fn renders_for_every_provider_and_the_api_server_accepts_it() {
    let cp = ControlPlane::shared().await.expect("control plane");
    let client = cp.client().await.expect("client");
    let ns = namespace(&client, "chart-dry").await.expect("namespace");
    let extra = [
        "networkPolicy.enabled=true",
        "networkPolicy.egress.enabled=true",
    ];
    for (name, sets) in [("default", &[][..]), ("aws", AWS), ("local", LOCAL)] {
        let mut all: Vec<&str> = sets.to_vec();
        all.extend_from_slice(&extra);
        let text = render("scm", &ns, &all).await;
        let objs = kubectl_apply(cp, &ns, &text, true).await;
        let kinds: Vec<&str> = objs.iter().filter_map(|o| o["kind"].as_str()).collect();
        for k in [
            "ServiceAccount",
            "ClusterRole",
            "ClusterRoleBinding",
            "Role",
            "RoleBinding",
            "Deployment",
            "PodDisruptionBudget",
            "Service",
            "NetworkPolicy",
        ] {
            assert!(kinds.contains(&k), "{name}: {k} missing from {kinds:?}");
        }
        assert_eq!(kinds.contains(&"ConfigMap"), name != "default", "{name}");

        let dep = find(&objs, "Deployment");
        assert_eq!(dep["spec"]["replicas"], 2, "{name}");
        let pod = &dep["spec"]["template"]["spec"];
        let c = &pod["containers"][0];
        let args = manager_args(&objs);
        for want in [
            "--leader-elect=true".to_string(),
            format!("--leader-elect-resource-namespace={ns}"),
            "--secure-port=10257".to_string(),
            "--bind-address=0.0.0.0".to_string(),
        ] {
            assert!(args.contains(&want), "{name}: {want} not in {args:?}");
        }
        assert!(
            !args.iter().any(|a| a.starts_with("--http-address")),
            "{name}: plain HTTP only when httpAddress is set: {args:?}"
        );
        assert!(
            !args.iter().any(|a| a.starts_with("--assign")),
            "{name}: Services are written only with assign set: {args:?}"
        );
        assert_eq!(
            args.iter().any(|a| a.starts_with("--cloud-provider=")),
            name != "default"
        );
        // The hardened pod.
        assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
        assert_eq!(pod["securityContext"]["runAsUser"], 65532);
        assert_eq!(
            pod["securityContext"]["seccompProfile"]["type"],
            "RuntimeDefault"
        );
        let sc = &c["securityContext"];
        assert_eq!(sc["readOnlyRootFilesystem"], true);
        assert_eq!(sc["allowPrivilegeEscalation"], false);
        assert_eq!(strs(&sc["capabilities"]["drop"]), vec!["ALL"]);
        for (probe, path) in [("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")] {
            let get = &c[probe]["httpGet"];
            assert_eq!(get["path"], path, "{name}: {probe}");
            assert_eq!(get["scheme"], "HTTPS", "{name}: {probe}");
            assert_eq!(get["port"], "https", "{name}: {probe}");
        }
        assert_eq!(c["ports"][0]["containerPort"], 10257);
        assert_eq!(c["ports"][0]["name"], "https");
        let svc = find(&objs, "Service");
        assert_eq!(svc["spec"]["ports"][0]["targetPort"], "https", "{name}");
        assert!(c["resources"]["requests"]["memory"].is_string());

        // No wildcards anywhere; leases only through the namespaced Role.
        let role = find(&objs, "ClusterRole");
        for (g, r, v) in rules(role) {
            assert!(
                g != "*" && r != "*" && !v.iter().any(|x| x == "*"),
                "{name}: wildcard in {g}/{r} {v:?}"
            );
            assert_ne!(r, "leases", "{name}: leases must not be cluster-wide");
        }
        let lease_role = find(&objs, "Role");
        assert_eq!(lease_role["metadata"]["namespace"], ns.as_str());
        assert!(rules(lease_role).iter().all(|(_, r, _)| r == "leases"));

        match name {
            "aws" => {
                let sa = find(&objs, "ServiceAccount");
                assert_eq!(
                    sa["metadata"]["annotations"]["eks.amazonaws.com/role-arn"],
                    "arn:aws:iam::123456789012:role/scm"
                );
                let env = c["env"].to_string();
                assert!(env.contains("aws-credentials") && env.contains("AWS_SECRET_ACCESS_KEY"));
                let cm = find(&objs, "ConfigMap");
                let cfg = cm["data"]["cloud-config.yaml"].as_str().unwrap_or_default();
                // The provider's own type (unknown keys rejected) reads what the chart renders.
                let parsed: cloud_lb::aws::AwsCloudConfig =
                    serde_yaml::from_str(cfg).expect("the provider reads the rendered config");
                assert_eq!(parsed.region.as_deref(), Some("eu-west-1"), "{cfg}");
                assert_eq!(parsed.vpc_id.as_deref(), Some("vpc-0123abcd"), "{cfg}");
                assert_eq!(parsed.subnets, vec!["subnet-0abc", "public-b"], "{cfg}");
                assert!(parsed.disable_security_group_ingress, "{cfg}");
            }
            "local" => {
                let cm = find(&objs, "ConfigMap");
                let cfg = cm["data"]["cloud-config.yaml"].as_str().unwrap_or_default();
                let parsed: cloud_lb::local::LocalCloudConfig =
                    serde_yaml::from_str(cfg).expect("the provider reads the rendered config");
                assert!(
                    cloud_lb::local::LocalProvider::new(parsed.clone()).is_ok(),
                    "{cfg}"
                );
                assert_eq!(
                    parsed.pools,
                    vec!["192.168.100.0/28".parse::<ipnet::IpNet>().expect("CIDR")],
                    "{cfg}"
                );
            }
            _ => {}
        }

        // The binary accepts every rendered flag: with a missing kubeconfig it gets past flag
        // parsing (exit 2 is a flag error) and fails on the kubeconfig (exit 1).
        let mut cmd = Command::new(manager_binary());
        cmd.args(args.iter().filter(|a| !a.starts_with("--http-address")))
            .arg(format!("--http-address={}", free_addr()))
            .arg("--kubeconfig=/nonexistent");
        let o = cmd.output().await.expect("run the manager");
        assert_eq!(
            o.status.code(),
            Some(1),
            "{name}: the manager rejected the chart's flags: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }

    // The optional ServiceMonitor renders (its CRD is not on this API server, so no dry run).
    let text = render("scm", &ns, &["metrics.serviceMonitor.enabled=true"]).await;
    assert!(text.contains("kind: ServiceMonitor") && text.contains("port: https-metrics"));
    assert!(
        text.contains("scheme: https")
            && text
                .contains("bearerTokenFile: /var/run/secrets/kubernetes.io/serviceaccount/token")
            && text.contains("insecureSkipVerify: true"),
        "{text}"
    );

    // httpAddress adds the plain listener and its port, explicitly.
    let text = render("scm", &ns, &["httpAddress=127.0.0.1:10270"]).await;
    assert!(text.contains("--http-address=127.0.0.1:10270"), "{text}");
    assert!(text.contains("containerPort: 10270"), "{text}");
}

#[tokio::test]
async fn disabling_a_controller_removes_its_rules() {
    let cp = ControlPlane::shared().await.expect("control plane");
    let client = cp.client().await.expect("client");
    let ns = namespace(&client, "chart-rbac").await.expect("namespace");
    let role_for = |sets: Vec<&'static str>| {
        let ns = ns.clone();
        async move {
            let objs = kubectl_apply(cp, &ns, &render("scm", &ns, &sets).await, true).await;
            (find(&objs, "ClusterRole").clone(), manager_args(&objs))
        }
    };

    let (all, args) = role_for(AWS.to_vec()).await;
    assert!(!args.iter().any(|a| a.starts_with("--assign")), "{args:?}");
    // Least privilege: only verbs the code uses (issue 16). Services are updated only to
    // assign where the API server did not, so that is opt-in (the assign value: --assign and
    // the grant together).
    assert_eq!(
        verbs_of(&all, "", "services"),
        vec!["get", "list", "watch", "patch"]
    );
    assert_eq!(verbs_of(&all, "", "services/status"), vec!["patch"]);
    assert_eq!(verbs_of(&all, "", "pods"), vec!["list", "watch"]);
    assert_eq!(verbs_of(&all, "", "nodes"), vec!["list", "watch"]);
    assert_eq!(
        verbs_of(&all, "discovery.k8s.io", "endpointslices"),
        vec!["list", "watch", "create", "update", "delete"]
    );
    assert_eq!(
        verbs_of(&all, "networking.k8s.io", "servicecidrs"),
        vec!["get", "list", "watch", "update"]
    );
    // The secure port's delegated checks.
    assert_eq!(
        verbs_of(&all, "authentication.k8s.io", "tokenreviews"),
        vec!["create"]
    );
    assert_eq!(
        verbs_of(&all, "authorization.k8s.io", "subjectaccessreviews"),
        vec!["create"]
    );
    let mut sets = AWS.to_vec();
    sets.push("assign=true");
    let (r, args) = role_for(sets).await;
    assert!(args.contains(&"--assign".to_string()), "{args:?}");
    assert_eq!(
        verbs_of(&r, "", "services"),
        vec!["get", "list", "watch", "update", "patch"]
    );
    assert_eq!(verbs_of(&all, "", "endpoints/restricted"), vec!["create"]);
    assert!(verbs_of(&all, "", "endpoints").contains(&"delete".to_string()));
    assert!(!verbs_of(&all, "", "services/status").is_empty());
    assert!(verbs_of(&all, "", "services").contains(&"patch".to_string()));
    assert!(!verbs_of(&all, "networking.k8s.io", "ipaddresses").is_empty());

    // endpoints off: its writes go; mirroring still reads Endpoints.
    let mut sets = AWS.to_vec();
    sets.push("controllers.endpoints=false");
    let (r, args) = role_for(sets).await;
    assert!(verbs_of(&r, "", "endpoints/restricted").is_empty());
    assert_eq!(verbs_of(&r, "", "endpoints"), vec!["get", "list", "watch"]);
    let c = args
        .iter()
        .find(|a| a.starts_with("--controllers="))
        .cloned();
    assert!(
        c.as_deref()
            .is_some_and(|c| !c.split([',', '=']).any(|x| x == "endpoints")),
        "{c:?}"
    );

    // cloud-lb off: no Service patches; the status patch stays for endpointslice's and
    // clusterip-alloc's conditions.
    let mut sets = AWS.to_vec();
    sets.push("controllers.cloud-lb=false");
    let (r, _) = role_for(sets).await;
    assert_eq!(verbs_of(&r, "", "services/status"), vec!["patch"]);
    assert!(!verbs_of(&r, "", "services").contains(&"patch".to_string()));
    // clusterip-alloc alone keeps it (ClusterIPValid) ...
    let mut sets = AWS.to_vec();
    sets.extend([
        "controllers.cloud-lb=false",
        "controllers.endpointslice=false",
    ]);
    let (r, _) = role_for(sets.clone()).await;
    assert_eq!(verbs_of(&r, "", "services/status"), vec!["patch"]);
    // ... and it goes with the last of them.
    sets.push("controllers.clusterip-alloc=false");
    let (r, _) = role_for(sets).await;
    assert!(verbs_of(&r, "", "services/status").is_empty());

    // No provider: cloud-lb cannot run, so its rules are not granted either.
    let (r, _) = role_for(vec![]).await;
    assert!(!verbs_of(&r, "", "services").contains(&"patch".to_string()));

    // service-cidr off: ServiceCIDR writes go; clusterip-alloc still reads IPAddresses.
    let (r, _) = role_for(vec!["controllers.service-cidr=false"]).await;
    assert_eq!(
        verbs_of(&r, "networking.k8s.io", "ipaddresses"),
        vec!["list", "watch"]
    );
    assert!(verbs_of(&r, "networking.k8s.io", "servicecidrs/status").is_empty());
    assert_eq!(
        verbs_of(&r, "networking.k8s.io", "servicecidrs"),
        vec!["get", "list", "watch"]
    );

    // Only endpointslice: exactly its rules plus Events and the secure port's reviews.
    let only: Vec<&str> = vec![
        "controllers.clusterip-alloc=false",
        "controllers.service-cidr=false",
        "controllers.nodeport-alloc=false",
        "controllers.endpointslice-mirroring=false",
        "controllers.endpoints=false",
    ];
    let (r, _) = role_for(only).await;
    let mut got: Vec<String> = rules(&r)
        .into_iter()
        .map(|(g, res, _)| format!("{g}/{res}"))
        .collect();
    got.sort();
    got.dedup();
    assert_eq!(
        got,
        vec![
            "/events",
            "/nodes",
            "/pods",
            "/services",
            "/services/finalizers",
            "/services/status",
            "authentication.k8s.io/tokenreviews",
            "authorization.k8s.io/subjectaccessreviews",
            "discovery.k8s.io/endpointslices",
            "events.k8s.io/events",
        ]
    );
    assert_eq!(verbs_of(&r, "", "services"), vec!["get", "list", "watch"]);
}
