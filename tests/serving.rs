//! The secure port against the real local control plane: delegated authentication
//! (TokenReview) and authorization (SubjectAccessReview) in front of `/metrics`, health paths
//! always allowed (but a bad token is 401 there too, as upstream's), `/healthz` with a subpath
//! per check as kube-controller-manager has, and the serving certificate reloaded from its files.

use std::time::Duration;

use k8s_openapi::api::core::v1::ServiceAccount;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, PolicyRule, RoleRef, Subject};
use kube::Api;
use kube::api::{ObjectMeta, PostParams};
use test_support::{ControlPlane, Manager, free_addr, https_get, namespace, tool, wait_for};

const WAIT: Duration = Duration::from_secs(60);

/// A ServiceAccount in `ns`, and a token for it.
async fn service_account(cp: &ControlPlane, client: &kube::Client, ns: &str, name: &str) -> String {
    let sa = ServiceAccount {
        metadata: ObjectMeta {
            name: Some(name.into()),
            ..Default::default()
        },
        ..Default::default()
    };
    Api::<ServiceAccount>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &sa)
        .await
        .expect("create service account");
    let out = tokio::process::Command::new(tool("kubectl").expect("bin/kubectl"))
        .arg("--kubeconfig")
        .arg(&cp.kubeconfig)
        .args(["create", "token", name, "-n", ns, "--duration=1h"])
        .output()
        .await
        .expect("kubectl create token");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// A ClusterRole allowing `get` on `urls`, bound to ServiceAccount `ns/sa`.
async fn grant(client: &kube::Client, ns: &str, sa: &str, role: &str, urls: &[&str]) {
    let name = format!("{ns}-{role}");
    let cr = ClusterRole {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            ..Default::default()
        },
        rules: Some(vec![PolicyRule {
            non_resource_urls: Some(urls.iter().map(|u| u.to_string()).collect()),
            verbs: vec!["get".into()],
            ..Default::default()
        }]),
        ..Default::default()
    };
    Api::<ClusterRole>::all(client.clone())
        .create(&PostParams::default(), &cr)
        .await
        .expect("create cluster role");
    let crb = ClusterRoleBinding {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            ..Default::default()
        },
        role_ref: RoleRef {
            api_group: Some("rbac.authorization.k8s.io".into()),
            kind: "ClusterRole".into(),
            name,
        },
        subjects: Some(vec![Subject {
            kind: "ServiceAccount".into(),
            name: sa.into(),
            namespace: Some(ns.into()),
            ..Default::default()
        }]),
    };
    Api::<ClusterRoleBinding>::all(client.clone())
        .create(&PostParams::default(), &crb)
        .await
        .expect("create cluster role binding");
}

#[tokio::test]
async fn metrics_need_a_token_with_rbac_and_health_paths_do_not() {
    let cp = ControlPlane::shared().await.expect("control plane");
    let client = cp.client().await.expect("client");
    let ns = namespace(&client, "serving").await.expect("namespace");
    let scraper = service_account(cp, &client, &ns, "scraper").await;
    let nobody = service_account(cp, &client, &ns, "nobody").await;
    // As the chart's Prometheus role: get on the non-resource URL /metrics.
    grant(&client, &ns, "scraper", "metrics", &["/metrics"]).await;
    grant(&client, &ns, "scraper", "health", &["/healthz/*"]).await;

    let addr = free_addr();
    let port = addr.rsplit(':').next().expect("port").to_string();
    let m = Manager::start(
        cp,
        &[
            &format!("--secure-port={port}"),
            "--bind-address=127.0.0.1",
            &format!("--leader-elect-resource-namespace={ns}"),
            "--controllers=endpointslice",
        ],
    )
    .expect("manager");
    let base = format!("https://{addr}");

    // Always allowed: no token needed.
    let (code, body) = wait_for("/healthz over HTTPS", WAIT, || async {
        https_get(&format!("{base}/healthz"), None)
            .await
            .filter(|(c, _)| *c == 200)
    })
    .await
    .unwrap_or_else(|e| panic!("{e}; logs: {:?}", m.log_lines()));
    assert_eq!((code, body.as_str()), (200, "ok"));
    wait_for("/readyz over HTTPS", WAIT, || async {
        https_get(&format!("{base}/readyz"), None)
            .await
            .filter(|(c, _)| *c == 200)
    })
    .await
    .expect("readyz");

    // As k8s.io/apiserver's delegating authentication: a token the API server does not know
    // is 401 on every path, the always-allowed ones included (authentication runs before the
    // always-allow authorizer); no token at all is `system:anonymous`, which RBAC refuses
    // /metrics (403).
    for path in ["/metrics", "/healthz", "/readyz", "/healthz/ping"] {
        let (code, body) = https_get(&format!("{base}{path}"), Some("not-a-token"))
            .await
            .expect("answer");
        assert_eq!(code, 401, "{path} with a bad token: {body}");
        assert!(body.contains("Unauthorized"), "{body}");
    }
    let (code, body) = https_get(&format!("{base}/metrics"), None)
        .await
        .expect("answer");
    assert_eq!(code, 403, "{body}");
    let status: serde_json::Value = serde_json::from_str(&body).expect("a Status body");
    assert_eq!(
        status["message"],
        "forbidden: User \"system:anonymous\" cannot get path \"/metrics\""
    );

    // 403 for a valid token without RBAC, naming the user and the path.
    let (code, body) = https_get(&format!("{base}/metrics"), Some(&nobody))
        .await
        .expect("answer");
    assert_eq!(code, 403, "{body}");
    assert!(
        body.contains(&format!("system:serviceaccount:{ns}:nobody")) && body.contains("/metrics"),
        "{body}"
    );

    // 200 with get on /metrics. RBAC bindings reach the authorizer's cache within a moment.
    let (code, body) = wait_for("/metrics with the scraper's token", WAIT, || async {
        https_get(&format!("{base}/metrics"), Some(&scraper))
            .await
            .filter(|(c, _)| *c == 200)
    })
    .await
    .expect("metrics");
    assert_eq!(code, 200);
    assert!(body.contains("leader_election_master_status"), "{body}");

    // Per-check subpaths, behind authentication as upstream's.
    let (code, _) = https_get(&format!("{base}/healthz/leaderElection"), None)
        .await
        .expect("answer");
    assert_eq!(
        code, 403,
        "/healthz/<check> is not in the always-allowed list: anonymous is refused"
    );
    for check in ["leaderElection", "informers", "endpointslice", "ping"] {
        let (code, body) = https_get(&format!("{base}/healthz/{check}"), Some(&scraper))
            .await
            .expect("answer");
        assert_eq!((code, body.as_str()), (200, "ok"), "/healthz/{check}");
    }
    let (code, _) = https_get(&format!("{base}/healthz/no-such-check"), Some(&scraper))
        .await
        .expect("answer");
    assert_eq!(code, 404);
    let (code, body) = https_get(&format!("{base}/healthz?verbose"), None)
        .await
        .expect("answer");
    assert_eq!(code, 200, "{body}");
    for line in [
        "[+]ping ok",
        "[+]informers ok",
        "[+]leaderElection ok",
        "[+]endpointslice ok",
        "healthz check passed",
    ] {
        assert!(body.lines().any(|l| l == line), "{line} in {body}");
    }
}

/// The certificate a fresh connection to `url` is served (a client per call: no pooled
/// connection keeps the old one).
async fn served_certificate(url: &str) -> Option<Vec<u8>> {
    let client = reqwest::Client::builder()
        .danger_accept_invalid_certs(true)
        .tls_info(true)
        .timeout(Duration::from_secs(10))
        .build()
        .ok()?;
    let r = client.get(url).send().await.ok()?;
    r.extensions()
        .get::<reqwest::tls::TlsInfo>()?
        .peer_certificate()
        .map(<[u8]>::to_vec)
}

/// Writes a fresh self-signed pair to `cert`/`key`; returns the certificate's DER.
fn write_pair(cert: &std::path::Path, key: &std::path::Path) -> Vec<u8> {
    let g = rcgen::generate_simple_self_signed(vec!["localhost".to_string(), "127.0.0.1".into()])
        .expect("pair");
    // The key first, then the certificate: between the two writes the pair does not match and
    // must not be served.
    std::fs::write(key, g.signing_key.serialize_pem()).expect("key");
    std::fs::write(cert, g.cert.pem()).expect("cert");
    g.cert.der().to_vec()
}

/// As kube-controller-manager's dynamic serving certificate: new files are served from the
/// next connection on, without a restart.
#[tokio::test]
async fn a_changed_certificate_is_served_without_a_restart() {
    let cp = ControlPlane::shared().await.expect("control plane");
    let client = cp.client().await.expect("client");
    let ns = namespace(&client, "serving-cert").await.expect("namespace");
    let dir = std::env::temp_dir().join(format!("scm-serving-cert-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let (crt, key) = (dir.join("tls.crt"), dir.join("tls.key"));
    let first = write_pair(&crt, &key);
    let addr = free_addr();
    let port = addr.rsplit(':').next().expect("port").to_string();
    let m = Manager::start(
        cp,
        &[
            &format!("--secure-port={port}"),
            "--bind-address=127.0.0.1",
            &format!("--tls-cert-file={}", crt.display()),
            &format!("--tls-private-key-file={}", key.display()),
            &format!("--leader-elect-resource-namespace={ns}"),
            "--controllers=endpointslice",
        ],
    )
    .expect("manager");
    let url = format!("https://{addr}/healthz");
    let served = wait_for("the first certificate", WAIT, || async {
        served_certificate(&url).await
    })
    .await
    .unwrap_or_else(|e| panic!("{e}; logs: {:?}", m.log_lines()));
    assert_eq!(served, first);
    let second = write_pair(&crt, &key);
    assert_ne!(first, second);
    wait_for("the new certificate served", WAIT, || async {
        served_certificate(&url).await.filter(|c| *c == second)
    })
    .await
    .unwrap_or_else(|e| panic!("{e}; logs: {:?}", m.log_lines()));
    let (code, body) = https_get(&url, None).await.expect("answer");
    assert_eq!((code, body.as_str()), (200, "ok"));
    let _ = std::fs::remove_dir_all(&dir);
}
