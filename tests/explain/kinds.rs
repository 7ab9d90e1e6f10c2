//! One Service of each kind, explained.

use crate::harness::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn explain_each_kind_of_service() -> Result<()> {
    let cp = ControlPlane::shared().await?;
    let client = cp.client().await?;
    let ns = namespace(&client, "explain").await?;
    let dir = tempfile::tempdir()?;
    let pools = dir.path().join("pools.yaml");
    std::fs::write(&pools, "pools: [192.168.77.0/29]\nipMode: VIP\n")?;
    let http = free_addr();
    let pools_arg = format!("--cloud-config={}", pools.display());
    let mut manager = Manager::start(
        cp,
        &[
            "--leader-elect=false",
            &format!("--http-address={http}"),
            "--cloud-provider=local",
            &pools_arg,
        ],
    )?;

    // Three nodes, the third excluded from load balancers; three pods, one not ready.
    for (i, name) in ["exp-n1", "exp-n2", "exp-n3"].iter().enumerate() {
        let mut b = NodeSpecBuilder {
            name: name.to_string(),
            ..Default::default()
        };
        if i == 2 {
            b.labels = BTreeMap::from([(
                "node.kubernetes.io/exclude-from-external-load-balancers".into(),
                "true".into(),
            )]);
        }
        create_node(&client, b).await?;
        set_node_ip(&client, name, &format!("10.0.0.{}", i + 1)).await?;
    }
    let pods = [
        ("alpha-0", "exp-n1", "10.244.1.10", true),
        ("alpha-1", "exp-n2", "10.244.2.10", true),
        ("alpha-2", "exp-n2", "10.244.2.11", false),
    ];
    for (name, node, ip, ready) in pods {
        let mut b = PodBuilder::new(&ns, name, &[("app", "alpha")]);
        b.node_name = Some(node.into());
        b.ports = vec![(Some("web".into()), 8080, "TCP".into())];
        if name == "alpha-0" {
            b.hostname = Some("alpha-0".into());
            b.subdomain = Some("alpha-headless".into());
        }
        create_pod(&client, &b).await?;
        set_pod_status(&client, &ns, name, ready, &[ip]).await?;
    }
    let svcs: Api<Service> = Api::namespaced(client.clone(), &ns);
    let web = || IntOrString::String("web".into());
    let mut headless = service("alpha-headless", "ClusterIP", "alpha", web());
    if let Some(s) = headless.spec.as_mut() {
        s.cluster_ip = Some("None".into());
    }
    let mut external = service("database", "ExternalName", "alpha", IntOrString::Int(80));
    if let Some(s) = external.spec.as_mut() {
        s.external_name = Some("prod.database.example.com".into());
        s.selector = None;
    }
    for s in [
        service("alpha", "ClusterIP", "alpha", web()),
        service("alpha-np", "NodePort", "alpha", web()),
        service("alpha-lb", "LoadBalancer", "alpha", web()),
        headless,
        external,
        service("nobody", "ClusterIP", "nobody", IntOrString::Int(8080)),
    ] {
        svcs.create(&PostParams::default(), &s).await?;
    }
    for svc in ["alpha", "alpha-np", "alpha-lb", "alpha-headless"] {
        wait_for(&format!("{svc}'s slices: 2 ready of 3"), T, || async {
            let eps = slice_endpoints(&client, &ns, svc).await;
            (eps.len() == 3 && eps.iter().filter(|(_, r)| *r).count() == 2).then_some(())
        })
        .await?;
    }
    let lb = wait_for("alpha-lb's address", T, || async {
        let s = svcs.get("alpha-lb").await.ok()?;
        s.status?.load_balancer?.ingress?.first()?.ip.clone()
    })
    .await?;
    let kc = read_only_kubeconfig(cp, &client, &ns, dir.path()).await?;

    // ClusterIP: two ready endpoints of three; the third says why.
    let x = json(&kc, &ns, "alpha").await?;
    let cip = x["cluster_ips"][0]
        .as_str()
        .context("cluster ip")?
        .to_string();
    let p = &x["ports"][0];
    assert_eq!(p["target_port"], "web");
    assert_eq!(
        p["summary"],
        format!("{cip}:80 -> 10.244.1.10:8080, 10.244.2.10:8080")
    );
    let not_ready: Vec<&Value> = p["endpoints"]
        .as_array()
        .context("endpoints")?
        .iter()
        .filter(|e| e["ready"] == false)
        .collect();
    assert_eq!(not_ready.len(), 1, "{p}");
    assert_eq!(not_ready[0]["pod"], "alpha-2");
    assert!(
        not_ready[0]["why"]
            .as_str()
            .is_some_and(|w| w.starts_with("pod not Ready"))
    );
    assert_eq!(x["problems"], serde_json::json!([]));
    let rs = &x["iptables"][0];
    assert_eq!(rs["every_node"], true);
    let nat = strings(&rs["nat"]);
    let svc_rule = format!(
        "-A KUBE-SERVICES -d {cip}/32 -p tcp -m comment --comment \"{ns}/alpha:http cluster IP\" -m tcp --dport 80 -j KUBE-SVC-"
    );
    assert!(nat.iter().any(|l| l.starts_with(&svc_rule)), "{nat:#?}");
    assert!(nat.iter().any(|l| {
        l.contains("-m statistic --mode random --probability 0.50000000000 -j KUBE-SEP-")
    }));
    assert!(
        nat.iter()
            .any(|l| l.ends_with("-j DNAT --to-destination 10.244.2.10:8080"))
    );
    assert!(
        x["dns"]
            .as_array()
            .context("dns")?
            .iter()
            .any(|r| r["type"] == "A" && r["value"] == cip.as_str())
    );
    assert_eq!(x["env"][0]["name"], "ALPHA_SERVICE_HOST");
    assert_eq!(x["env"][0]["value"], cip.as_str());
    // The text form says the same for people.
    let out = run(&[
        &format!("{ns}/alpha"),
        "--kubeconfig",
        kc.to_str().unwrap_or_default(),
    ])
    .await?;
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!("Service {ns}/alpha (ClusterIP)")),
        "{text}"
    );
    assert!(text.contains(&format!("{cip}:80 -> 10.244.1.10:8080, 10.244.2.10:8080")));
    assert!(text.contains("10.244.2.11:8080 (pod alpha-2 on exp-n2): not ready: pod not Ready"));

    // NodePort: every node's address with the node port.
    let x = json(&kc, &ns, "alpha-np").await?;
    let np = x["ports"][0]["node_port"].as_i64().context("node port")?;
    let hops: Vec<String> = x["ports"][0]["nodes"]
        .as_array()
        .context("nodes")?
        .iter()
        .filter_map(|h| h["address"].as_str().map(str::to_string))
        .collect();
    assert_eq!(
        hops,
        (1..=3)
            .map(|i| format!("10.0.0.{i}:{np}"))
            .collect::<Vec<_>>()
    );
    let nat = strings(&x["iptables"][0]["nat"]);
    assert!(nat.iter().any(|l| l.starts_with(&format!(
        "-A KUBE-NODEPORTS -p tcp -m comment --comment \"{ns}/alpha-np:http\" -m tcp --dport {np} -j KUBE-EXT-"
    ))), "{nat:#?}");

    // LoadBalancer: the pool's address, to the two eligible nodes' NodePorts.
    let x = json(&kc, &ns, "alpha-lb").await?;
    let np = x["ports"][0]["node_port"].as_i64().context("node port")?;
    let cip = x["cluster_ips"][0].as_str().context("cluster ip")?;
    assert!(lb.starts_with("192.168.77."), "{lb}");
    assert_eq!(
        x["ports"][0]["summary"],
        format!(
            "{lb}:80 -> 10.0.0.1:{np}, 10.0.0.2:{np} (each eligible node) -> {cip}:80 -> 10.244.1.10:8080, 10.244.2.10:8080"
        )
    );
    let n3 = &x["ports"][0]["nodes"][2];
    assert_eq!(n3["load_balancer_target"], false);
    assert!(
        n3["note"]
            .as_str()
            .is_some_and(|n| n.contains("exclude-from-external-load-balancers"))
    );
    let nat = strings(&x["iptables"][0]["nat"]);
    assert!(nat.iter().any(|l| l.starts_with(&format!(
        "-A KUBE-SERVICES -d {lb}/32 -p tcp -m comment --comment \"{ns}/alpha-lb:http loadbalancer IP\" -m tcp --dport 80 -j KUBE-EXT-"
    ))), "{nat:#?}");
    let reasons: Vec<&str> = x["events"]
        .as_array()
        .context("events")?
        .iter()
        .filter_map(|e| e["reason"].as_str())
        .collect();
    assert!(reasons.contains(&"EnsuredLoadBalancer"), "{reasons:?}");

    // Headless: no kube-proxy rules; DNS names the ready endpoints, alpha-0 by its hostname.
    let x = json(&kc, &ns, "alpha-headless").await?;
    assert_eq!(x["iptables"], serde_json::json!([]));
    assert_eq!(x["env"], serde_json::json!([]));
    let dns: Vec<(String, String)> = x["dns"]
        .as_array()
        .context("dns")?
        .iter()
        .filter(|r| r["type"] == "A")
        .map(|r| {
            (
                r["name"].as_str().unwrap_or("").to_string(),
                r["value"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect();
    let fqdn = format!("alpha-headless.{ns}.svc.cluster.local");
    assert!(
        dns.contains(&(fqdn.clone(), "10.244.1.10".into())),
        "{dns:?}"
    );
    assert!(dns.contains(&(fqdn.clone(), "10.244.2.10".into())));
    assert!(!dns.iter().any(|(_, ip)| ip == "10.244.2.11"));
    assert!(dns.contains(&(format!("alpha-0.{fqdn}"), "10.244.1.10".into())));
    assert!(dns.contains(&(format!("10-244-2-10.{fqdn}"), "10.244.2.10".into())));

    // ExternalName: a CNAME and nothing else.
    let x = json(&kc, &ns, "database").await?;
    assert_eq!(
        x["dns"],
        serde_json::json!([{"name": format!("database.{ns}.svc.cluster.local"), "type": "CNAME", "value": "prod.database.example.com"}])
    );
    assert_eq!(x["ports"], serde_json::json!([]));
    assert_eq!(x["iptables"], serde_json::json!([]));

    // A selector matching nothing: the reason, and kube-proxy's REJECT.
    let x = json(&kc, &ns, "nobody").await?;
    assert_eq!(x["problems"][0]["reason"], "SelectorMatchesNothing");
    let filter = strings(&x["iptables"][0]["filter"]);
    assert!(
        filter.iter().any(
            |l| l.contains(&format!("\"{ns}/nobody:http has no endpoints\""))
                && l.ends_with("-j REJECT --reject-with icmp-port-unreachable")
        ),
        "{filter:#?}"
    );
    assert_eq!(x["iptables"][0]["nat"], serde_json::json!([]));

    // externalTrafficPolicy Local: each node's rules differ with its local endpoints.
    let mut local = service("alpha-local", "LoadBalancer", "alpha", web());
    if let Some(s) = local.spec.as_mut() {
        s.external_traffic_policy = Some("Local".into());
    }
    svcs.create(&PostParams::default(), &local).await?;
    let (hc, lb) = wait_for("alpha-local's address", T, || async {
        let s = svcs.get("alpha-local").await.ok()?;
        let hc = s.spec.as_ref()?.health_check_node_port?;
        Some((hc, s.status?.load_balancer?.ingress?.first()?.ip.clone()?))
    })
    .await?;
    let x = wait_for("alpha-local's endpoints in explain", T, || async {
        let x = json(&kc, &ns, "alpha-local").await.ok()?;
        (x["iptables"].as_array()?.len() == 3).then_some(x)
    })
    .await?;
    let groups = x["iptables"].as_array().context("rule sets")?;
    let on = |node: &str| {
        groups
            .iter()
            .find(|g| strings(&g["nodes"]).contains(&node.to_string()))
            .cloned()
            .unwrap_or_default()
    };
    let hc_rule = format!(
        "-A KUBE-NODEPORTS -p tcp -m comment --comment \"{ns}/alpha-local:http health check node port\" -m tcp --dport {hc} -j ACCEPT"
    );
    for n in ["exp-n1", "exp-n2", "exp-n3"] {
        assert!(
            strings(&on(n)["filter"]).contains(&hc_rule),
            "{n}: {groups:?}"
        );
    }
    let svl = |n: &str| {
        strings(&on(n)["nat"])
            .into_iter()
            .filter(|l| l.starts_with("-A KUBE-SVL-"))
            .collect::<Vec<_>>()
    };
    assert_eq!(svl("exp-n1").len(), 1);
    assert!(svl("exp-n1")[0].contains("-> 10.244.1.10:8080"));
    assert!(svl("exp-n2")[0].contains("-> 10.244.2.10:8080"));
    assert!(svl("exp-n3").is_empty());
    assert!(strings(&on("exp-n3")["filter"]).iter().any(|l| l.starts_with(&format!(
        "-A KUBE-EXTERNAL-SERVICES -d {lb}/32 -p tcp -m comment --comment \"{ns}/alpha-local:http has no local endpoints\""
    )) && l.ends_with("-j DROP")));

    // Why pods are left out: a named port missing, no IP yet, a node that does not exist.
    let beta = [
        ("beta-0", "exp-n1", Some("10.244.1.20"), false),
        ("beta-1", "exp-n1", None, true),
        ("beta-2", "exp-gone", Some("10.244.9.20"), true),
        ("beta-3", "exp-n2", Some("10.244.2.20"), true),
    ];
    for (name, node, ip, named_port) in beta {
        let mut b = PodBuilder::new(&ns, name, &[("app", "beta")]);
        b.node_name = Some(node.into());
        if named_port {
            b.ports = vec![(Some("web".into()), 8080, "TCP".into())];
        }
        create_pod(&client, &b).await?;
        if let Some(ip) = ip {
            set_pod_status(&client, &ns, name, true, &[ip]).await?;
        }
    }
    svcs.create(
        &PostParams::default(),
        &service("beta", "ClusterIP", "beta", web()),
    )
    .await?;
    let x = wait_for("beta's problems", T, || async {
        let x = json(&kc, &ns, "beta").await.ok()?;
        let ready = x["ports"][0]["summary"]
            .as_str()?
            .ends_with("-> 10.244.2.20:8080");
        let seen = x["problems"].as_array()?.len() == 3;
        (ready && seen).then_some(x)
    })
    .await?;
    let reasons: Vec<&str> = x["problems"]
        .as_array()
        .context("problems")?
        .iter()
        .filter_map(|p| p["reason"].as_str())
        .collect();
    assert_eq!(
        reasons,
        vec!["NamedPortNotFound", "PodsWithoutIP", "NodeNotFound"]
    );
    let why = |pod: &str| -> Vec<String> {
        x["pods"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|p| p["name"] == pod)
            .map(|p| strings(&p["why"]))
            .unwrap_or_default()
    };
    assert_eq!(
        why("beta-0"),
        vec!["port http: named port web (TCP) not found in its containers"]
    );
    assert!(
        why("beta-1").contains(&"port http: no IP yet (not scheduled or not started)".to_string())
    );
    assert_eq!(
        why("beta-2"),
        vec![
            "port http: its node exp-gone does not exist (the EndpointSlice controller leaves it out)"
        ]
    );
    assert!(why("beta-3").is_empty());

    // Not found: exit 1 with one line.
    let out = run(&[
        &format!("{ns}/missing"),
        "--kubeconfig",
        kc.to_str().unwrap_or_default(),
    ])
    .await?;
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim(), format!("error: service {ns}/missing not found"));
    manager.child.start_kill()?;
    let _ = manager.wait_exit(Duration::from_secs(10)).await;
    Ok(())
}
