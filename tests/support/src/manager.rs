//! The manager binary as a child process of the test, its output captured line by line.

use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result, anyhow, bail};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::{ControlPlane, repo_root};

/// Path of the manager binary Cargo built for this test run, or `$SCM_MANAGER_BINARY` when set
/// (the target directory is shared by every checkout of this machine, and a build of another
/// commit may replace the binary while a test runs).
pub fn manager_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("SCM_MANAGER_BINARY").filter(|p| !p.is_empty()) {
        return PathBuf::from(p);
    }
    if let Some(p) = option_env!("CARGO_BIN_EXE_service-controller-manager") {
        return PathBuf::from(p);
    }
    let target = std::env::var("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| repo_root().join("target"));
    target.join("debug").join("service-controller-manager")
}

/// A running manager process whose output is captured.
pub struct Manager {
    /// The child process.
    pub child: Child,
    /// Everything it has logged (stdout and stderr), line by line.
    pub logs: Arc<Mutex<Vec<String>>>,
    readers: Vec<tokio::task::JoinHandle<()>>,
}

impl Manager {
    /// Starts the manager binary with `args` against `cp`.
    pub fn start(cp: &ControlPlane, args: &[&str]) -> Result<Manager> {
        let mut cmd = Command::new(manager_binary());
        cmd.arg("--kubeconfig").arg(&cp.kubeconfig);
        cmd.args(args);
        Self::spawn(cmd)
    }

    /// Starts a prepared command (for custom environments). Without a `--secure-port` among
    /// its arguments it gets `--secure-port=0`: tests run many managers at once, and the
    /// default port (10257) can be bound only once.
    pub fn spawn(mut cmd: Command) -> Result<Manager> {
        let has_port = cmd
            .as_std()
            .get_args()
            .any(|a| a.to_string_lossy().starts_with("--secure-port"));
        if !has_port {
            cmd.arg("--secure-port=0");
        }
        cmd.stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut child = cmd.spawn().context("starting the manager")?;
        let logs = Arc::new(Mutex::new(Vec::new()));
        let mut readers = Vec::new();
        for out in [
            child
                .stdout
                .take()
                .map(|s| Box::new(s) as Box<dyn tokio::io::AsyncRead + Send + Unpin>),
            child
                .stderr
                .take()
                .map(|s| Box::new(s) as Box<dyn tokio::io::AsyncRead + Send + Unpin>),
        ]
        .into_iter()
        .flatten()
        {
            let logs = logs.clone();
            readers.push(tokio::spawn(async move {
                let mut lines = BufReader::new(out).lines();
                while let Ok(Some(l)) = lines.next_line().await {
                    logs.lock().unwrap_or_else(|e| e.into_inner()).push(l);
                }
            }));
        }
        Ok(Manager {
            child,
            logs,
            readers,
        })
    }

    /// Waits up to `timeout` for the process to exit, then (up to 2 s more) for its last log
    /// lines, so that [`Self::log_lines`] after an exit shows how it ended.
    pub async fn wait_exit(&mut self, timeout: std::time::Duration) -> Result<ExitStatus> {
        let status = tokio::time::timeout(timeout, self.child.wait())
            .await
            .map_err(|_| anyhow!("the manager did not exit within {timeout:?}"))??;
        for r in self.readers.drain(..) {
            let _ = tokio::time::timeout(std::time::Duration::from_secs(2), r).await;
        }
        Ok(status)
    }

    /// A copy of the log lines so far.
    pub fn log_lines(&self) -> Vec<String> {
        self.logs.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Sends a signal (e.g. `libc::SIGTERM` as 15) to the process.
    pub fn signal(&self, sig: i32) -> Result<()> {
        let pid = self
            .child
            .id()
            .ok_or_else(|| anyhow!("manager already exited"))?;
        let status = std::process::Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(pid.to_string())
            .status()?;
        if !status.success() {
            bail!("kill -{sig} {pid} failed");
        }
        Ok(())
    }
}

/// GETs `url` over HTTPS from a manager's secure port (its certificate is self-signed, so it is
/// not verified), with `token` as the bearer token: the status and body, or `None` while
/// nothing answers.
pub async fn https_get(url: &str, token: Option<&str>) -> Option<(u16, String)> {
    let client = reqwest::Client::builder()
        .danger_accept_invalid_certs(true)
        .timeout(std::time::Duration::from_secs(10))
        .build()
        .ok()?;
    let mut req = client.get(url);
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let r = req.send().await.ok()?;
    let code = r.status().as_u16();
    Some((code, r.text().await.ok()?))
}

/// Whether a manager serving on `addr` (its `--http-address`) answers `/readyz` with success.
pub async fn readyz_ok(addr: &str) -> bool {
    crate::http_get(&format!("http://{addr}/readyz"))
        .await
        .is_some_and(|(code, _)| (200..300).contains(&code))
}

/// A manager's `leader_election_master_status` (1 while it leads, else 0), if it serves
/// metrics on `addr`.
pub async fn leader_status(addr: &str) -> Option<i64> {
    crate::metrics::scrape_manager(addr)
        .await?
        .get("leader_election_master_status", &[])
        .map(|v| v as i64)
}
