//! Controllers running inside the test process, all built from one [`ContextBase`] as the
//! manager builds them: they share one informer per kind, one metrics registry and one leader
//! gate. Stopped (shutdown cancelled, tasks aborted) when dropped.
//!
//! This crate does not depend on the controller crates (their own tests use it), so a test
//! passes each controller's entry point: `c.start("endpointslice", "endpoint-slice-controller",
//! |ctx| endpointslice::run(ctx, cfg))`.

use std::fmt::Display;
use std::future::Future;
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{Result, bail};
use kube::Client;
use scm_runtime::{ContextBase, ControllerContext, LeaderGate};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::metrics::Metrics;

/// How a controller's task ended: its name and its error, if any.
pub type Ended = (String, std::result::Result<(), String>);

/// A set of controllers running in this process from one [`ContextBase`].
pub struct InProcess {
    /// What every controller's context comes from; its `informers`, `metrics` and `shutdown`
    /// are the ones the controllers use.
    pub base: ContextBase,
    leader: watch::Sender<bool>,
    tasks: Mutex<Vec<JoinHandle<Ended>>>,
}

impl InProcess {
    /// Controllers that lead from the start (writes allowed).
    pub fn new(client: Client) -> Self {
        Self::with_leading(client, true)
    }

    /// Controllers that lead only once [`Self::set_leading`] says so.
    pub fn with_leading(client: Client, leading: bool) -> Self {
        let (gate, leader) = LeaderGate::fixed(leading);
        InProcess {
            base: ContextBase::new(client, gate),
            leader,
            tasks: Mutex::new(Vec::new()),
        }
    }

    /// Gives or takes away leadership (and so the right to write).
    pub fn set_leading(&self, leading: bool) {
        self.leader.send_replace(leading);
    }

    /// The context controller `name` would get (for a test that drives a shell by hand).
    pub fn context(&self, name: &str, reporter: &str) -> ControllerContext {
        self.base.context(name, reporter)
    }

    /// Starts controller `name` (as in `--controllers`; its Events reported as `reporter`) by
    /// spawning `run` with its context, e.g. `|ctx| endpointslice::run(ctx, cfg)`.
    pub fn start<F, Fut, E>(&self, name: &str, reporter: &str, run: F)
    where
        F: FnOnce(ControllerContext) -> Fut,
        Fut: Future<Output = std::result::Result<(), E>> + Send + 'static,
        E: Display + Send + 'static,
    {
        let fut = run(self.base.context(name, reporter));
        let name = name.to_string();
        let task = tokio::spawn(async move { (name, fut.await.map_err(|e| e.to_string())) });
        self.tasks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(task);
    }

    /// The controllers' metrics (the shared registry), parsed.
    pub fn metrics(&self) -> Metrics {
        Metrics::parse(&self.base.metrics.encode()).unwrap_or_default()
    }

    /// The controllers' metrics as the manager's `/metrics` would serve them.
    pub fn metrics_text(&self) -> String {
        self.base.metrics.encode()
    }

    /// Waits until every started controller has marked its caches synced.
    pub async fn wait_ready(&self, timeout: Duration) -> Result<()> {
        crate::wait_for("in-process controllers to sync", timeout, || async {
            self.base.readiness.pending().is_empty().then_some(())
        })
        .await
        .map_err(|e| anyhow::anyhow!("{e}; pending: {:?}", self.base.readiness.pending()))
    }

    /// Stops every controller as SIGTERM stops the manager (shutdown cancelled, in-flight work
    /// drained) and says how each ended; fails if one has not ended within `timeout`.
    pub async fn stop(self, timeout: Duration) -> Result<Vec<Ended>> {
        self.base.shutdown.cancel();
        let tasks = std::mem::take(&mut *self.tasks.lock().unwrap_or_else(|e| e.into_inner()));
        let mut ended = Vec::new();
        for t in tasks {
            match tokio::time::timeout(timeout, t).await {
                Ok(Ok(e)) => ended.push(e),
                Ok(Err(e)) => bail!("controller task failed: {e}"),
                Err(_) => bail!("a controller did not stop within {timeout:?}"),
            }
        }
        Ok(ended)
    }
}

impl Drop for InProcess {
    fn drop(&mut self) {
        self.base.shutdown.cancel();
        for t in self
            .tasks
            .get_mut()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
        {
            t.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use k8s_openapi::api::core::v1::Service;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
    use scm_runtime::{Change, ObjectKey};

    use super::*;

    /// A client that is never answered: these tests only need the contexts.
    fn client() -> Client {
        let cfg = kube::Config::new("http://127.0.0.1:9".parse().expect("uri"));
        Client::try_from(cfg).expect("client")
    }

    #[tokio::test]
    async fn controllers_share_informers_and_metrics_and_stop_together() {
        let c = InProcess::new(client());
        let (tx, rx) = tokio::sync::oneshot::channel();
        c.start("a", "a-controller", |ctx| async move {
            ctx.ready.mark_ready();
            let _ = tx.send(ctx.informers.services());
            ctx.shutdown.cancelled().await;
            Ok::<_, String>(())
        });
        c.start("b", "b-controller", |ctx| async move {
            ctx.ready.mark_ready();
            ctx.shutdown.cancelled().await;
            Err("b failed on the way out".to_string())
        });
        c.wait_ready(Duration::from_secs(5)).await.expect("ready");
        // What one controller's informer holds, another's context sees: one informer per kind.
        let a_services = rx.await.expect("a's informer");
        let svc = Service {
            metadata: ObjectMeta {
                namespace: Some("ns".into()),
                name: Some("web".into()),
                ..Default::default()
            },
            ..Default::default()
        };
        a_services.deliver(Change::Relisted(vec![Arc::new(svc)]));
        let b_ctx = c.context("b2", "b-controller");
        assert!(
            b_ctx
                .informers
                .services()
                .get(&ObjectKey::new("ns", "web"))
                .is_some()
        );
        let m = c.metrics();
        for name in ["a", "b", "b2"] {
            assert_eq!(
                m.get(
                    "service_controller_manager_reconcile_total",
                    &[("controller", name)]
                ),
                Some(0.0),
                "{}",
                c.metrics_text()
            );
        }
        let mut ended = c.stop(Duration::from_secs(5)).await.expect("stopped");
        ended.sort();
        assert_eq!(
            ended,
            vec![
                ("a".to_string(), Ok(())),
                ("b".to_string(), Err("b failed on the way out".to_string())),
            ]
        );
    }
}
