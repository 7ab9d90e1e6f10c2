//! The README's first command, `make demo` (`tests/scripts/demo.sh`), end to end.

use super::*;

/// The fields of the line of `table` whose first column is `name`.
fn row<'a>(table: &'a str, name: &str) -> Vec<&'a str> {
    table
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|f| f.first() == Some(&name))
        .unwrap_or_else(|| panic!("no row {name} in:\n{table}"))
}

fn is_node_port_mapping(s: &str, port: u16) -> bool {
    // e.g. 8081:32255/TCP
    s.strip_prefix(&format!("{port}:"))
        .and_then(|r| r.strip_suffix("/TCP"))
        .and_then(|n| n.parse::<u16>().ok())
        .is_some_and(|n| (30000..=32767).contains(&n))
}

// The README's first command: `make demo` runs tests/scripts/demo.sh. It lives here (beside the
// chart, the other thing users meet first) so that CI runs it; it uses the manager Cargo built
// for this test run instead of building again under Cargo's lock.
#[tokio::test]
async fn demo_script_shows_services_end_to_end_and_cleans_up() {
    let scratch = Scratch::new("demo");
    let state = scratch.path("state");
    let mut cmd = Command::new(repo_root().join("tests/scripts/demo.sh"));
    cmd.env("SCM_DEMO_MANAGER", manager_binary())
        .env("SCM_DEMO_DIR", &state);
    let o = run(&mut cmd, None).await;
    assert!(o.ok, "demo failed:\n{}\n{}", o.stdout, o.stderr);
    let out = &o.stdout;
    for (section, header) in [
        (
            "$ kubectl get svc",
            ["NAME", "TYPE", "CLUSTER-IP", "EXTERNAL-IP", "PORT(S)"],
        ),
        (
            "$ kubectl get endpointslices",
            ["NAME", "ADDRESSTYPE", "PORTS", "ENDPOINTS", "AGE"],
        ),
    ] {
        assert!(out.contains(section), "{section} missing:\n{out}");
        assert!(
            out.lines()
                .any(|l| header.iter().all(|h| l.split_whitespace().any(|w| w == *h))),
            "header {header:?} missing:\n{out}"
        );
    }
    assert!(out.contains("$ kubectl get endpoints\n"), "{out}");

    // kubectl get svc, as in the seed: CLUSTER-IP from the range, EXTERNAL-IP from the pool,
    // PORT(S) with the NodePort.
    let svc = out
        .split("$ kubectl get endpointslices")
        .next()
        .unwrap_or_default();
    let ex = row(svc, "example");
    assert_eq!(ex[1], "LoadBalancer");
    assert!(ex[2].starts_with("10.43."), "{ex:?}");
    assert!(ex[3].starts_with("192.168.0."), "{ex:?}");
    assert!(is_node_port_mapping(ex[4], 8081), "{ex:?}");
    let np = row(svc, "alpha-nodeport");
    assert!(is_node_port_mapping(np[4], 80), "{np:?}");
    let cip = row(svc, "alpha");
    assert_eq!(cip[1], "ClusterIP");
    assert!(cip[2].starts_with("10.43."), "{cip:?}");
    assert_eq!(cip[3..5], ["<none>", "80/TCP"]);
    assert_eq!(row(svc, "alpha-headless")[2], "None");
    assert_eq!(
        row(svc, "database")[1..4],
        ["ExternalName", "<none>", "prod.database.example.com"]
    );

    // Every pod behind each selector Service, in slices and in Endpoints.
    let pods = "10.42.0.10,10.42.1.11,10.42.2.12";
    let slices = out
        .split("$ kubectl get endpointslices")
        .nth(1)
        .and_then(|s| s.split("$ kubectl get endpoints\n").next())
        .unwrap_or_default();
    for s in ["example", "alpha", "alpha-nodeport", "alpha-headless"] {
        let line = slices
            .lines()
            .find(|l| {
                l.split_whitespace().next().is_some_and(|n| {
                    n.strip_prefix(s)
                        .and_then(|r| r.strip_prefix('-'))
                        .is_some_and(|r| r.len() == 5)
                })
            })
            .unwrap_or_else(|| panic!("no EndpointSlice for {s}:\n{slices}"));
        assert!(line.contains(pods), "{line}");
    }
    let eps = out
        .split("$ kubectl get endpoints\n")
        .nth(1)
        .unwrap_or_default();
    assert_eq!(
        row(eps, "example")[1],
        "10.42.0.10:8080,10.42.1.11:8080,10.42.2.12:8080"
    );
    assert!(
        !eps.contains("database"),
        "ExternalName has no Endpoints:\n{eps}"
    );

    // The pool is an object (issue 14), and kubectl shows its counts as printer columns:
    // 14 usable addresses in the /28, example's one allocated.
    let pools = out
        .split("$ kubectl get loadbalancerippools\n")
        .nth(1)
        .unwrap_or_default();
    assert!(
        pools
            .lines()
            .next()
            .is_some_and(|h| h.split_whitespace().collect::<Vec<_>>()
                == [
                    "NAME",
                    "DISABLED",
                    "IPV4",
                    "ALLOCATED",
                    "IPV4",
                    "AVAILABLE",
                    "IPV6",
                    "ALLOCATED",
                    "IPV6",
                    "AVAILABLE",
                    "AGE"
                ]),
        "{pools}"
    );
    assert_eq!(
        row(pools, "demo")[1..6],
        ["false", "1", "13", "0", "0"],
        "{pools}"
    );

    // Progress went to stderr, and everything was cleaned up.
    assert!(
        o.stderr.contains("==> Starting the local control plane"),
        "{}",
        o.stderr
    );
    assert!(
        !state.exists(),
        "demo state left behind at {}",
        state.display()
    );
}
