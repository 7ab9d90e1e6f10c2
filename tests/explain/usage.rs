//! Help, bad usage and an unreachable API server: exit codes and one-line errors.

use crate::harness::*;

#[tokio::test]
async fn help_bad_usage_and_an_unreachable_api_server() -> Result<()> {
    for args in [
        &[][..],
        &["web"],
        &["ns/web", "-o", "yaml"],
        &["ns/web", "--bogus"],
    ] {
        let out = run(args).await?;
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(err.trim().lines().count(), 1, "{args:?}: {err}");
    }
    // Help of both the manager and the subcommand: exit 0, and each mentions explain.
    for args in [&["--help"][..], &["explain", "--help"]] {
        let out = tokio::process::Command::new(manager_binary())
            .args(args)
            .output()
            .await?;
        assert!(out.status.success(), "{args:?}");
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("explain"),
            "{args:?}"
        );
    }
    // The manager's help names the crd subcommand too.
    let out = tokio::process::Command::new(manager_binary())
        .arg("--help")
        .output()
        .await?;
    assert!(String::from_utf8_lossy(&out.stdout).contains("service-controller-manager crd"));
    let dir = tempfile::tempdir()?;
    let kc = dir.path().join("nowhere.kubeconfig");
    let port = free_addr();
    std::fs::write(
        &kc,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: x\n  cluster:\n    server: http://{port}\nusers:\n- name: x\n  user: {{}}\ncontexts:\n- name: x\n  context:\n    cluster: x\n    user: x\ncurrent-context: x\n"
        ),
    )?;
    let out = run(&["ns/web", "--kubeconfig", kc.to_str().unwrap_or_default()]).await?;
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.starts_with("error: getting service ns/web"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    Ok(())
}
