//! Executing a [`Step`]: the provider calls, the Service writes (through [`crate::status`]) and
//! the Events upstream's controller records, in upstream's order (finalizer before the first
//! cloud call; status after it; status cleared before the finalizer goes).

use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{LoadBalancerStatus, Node, ObjectReference, Service};
use kube::Resource;
use scm_runtime::{ObjectKey, Requeue};
use tracing::{debug, info, warn};

use scm_runtime::conditions::{self, Desired};

use crate::core::{self, LastSync, Observed, Step, condition};
use crate::metrics::ReasonLabel;
use crate::shell::Shell;
use crate::{Error, status};

/// Event notes are limited to 1024 bytes by the API; longer ones are cut at a char boundary.
pub(crate) fn note(s: String) -> String {
    const MAX: usize = 1024;
    if s.len() <= MAX {
        return s;
    }
    let mut end = MAX - 3;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &s[..end])
}

/// The Warning Event's reason for a class-less Service another controller already serves.
pub const SERVED_ELSEWHERE: &str = "LoadBalancerServedElsewhere";
/// The Warning Event's reason for provider annotations the provider does not implement.
pub const UNSUPPORTED_ANNOTATION: &str = "UnsupportedAnnotation";

fn reference(svc: &Service) -> ObjectReference {
    svc.object_ref(&())
}

impl Shell {
    /// Brings our `LoadBalancerReady` on `svc` to `desired` (`None`: leave it): one
    /// server-side apply on a transition, nothing at steady state. A failed write is logged,
    /// not returned: retrying the reconcile would repeat its cloud calls, and the next
    /// reconcile computes the condition again. Returns the Service as written, if it wrote.
    async fn condition(
        &self,
        svc: Option<&Service>,
        desired: Option<Vec<Desired>>,
    ) -> Option<Service> {
        let (svc, desired) = (svc?, desired?);
        match conditions::apply(&self.ctx, svc, condition::OWNED, &desired).await {
            Ok(written) => written,
            Err(e) => {
                warn!(service = %ObjectKey::of(svc), error = %e, "could not write the LoadBalancerReady condition");
                None
            }
        }
    }

    /// Executes `step` for `key`, decided from `o` with the stable node set `nodes`.
    pub(crate) async fn execute(
        &self,
        key: &ObjectKey,
        step: Step,
        o: Observed,
        nodes: Vec<Arc<Node>>,
    ) -> Result<Requeue, Error> {
        let client = &self.ctx.client;
        match step {
            // `Shell::reconcile` restores and decides again before executing; should a
            // Restore ever get here, look at the key again at once.
            Step::Restore => Ok(Requeue::After(Duration::ZERO)),
            Step::Wait(d) => {
                debug!(service = %key, wait = ?d, "throttled: waiting for the cloud's hint");
                Ok(Requeue::After(d))
            }
            Step::Ignore => {
                self.memory().edit(key, |r| r.last = None);
                self.condition(o.service.as_ref(), condition::after_success(step, false))
                    .await;
                Ok(Requeue::Done)
            }
            Step::Forget => {
                self.memory().forget(key);
                Ok(Requeue::Done)
            }
            Step::DeleteVanished => {
                if let Some(last) = o.last {
                    info!(service = %key, "service vanished: deleting its load balancer");
                    // Remembered until the delete succeeds: a retry must still know what to
                    // delete (forgetting first leaked the load balancer on any failure).
                    self.provider
                        .ensure_deleted(&self.config.cluster_name, &last.service)
                        .await?;
                }
                self.memory().forget(key);
                Ok(Requeue::Done)
            }
            Step::Park => {
                debug!(service = %key, "waiting for the Service to change after a permanent error");
                Ok(Requeue::Done)
            }
            Step::InSync => {
                // Also how a Service served before conditions existed gets its True.
                if let Some(svc) = &o.service {
                    let published = core::has_ingress(svc);
                    self.condition(Some(svc), condition::after_success(step, published))
                        .await;
                }
                Ok(Requeue::Done)
            }
            Step::StatusOnly | Step::HostsOnly { .. } => {
                let (Some(svc), Some(last)) = (o.service, o.last) else {
                    return Ok(Requeue::Done);
                };
                let rewrite = matches!(
                    step,
                    Step::StatusOnly
                        | Step::HostsOnly {
                            rewrite_status: true
                        }
                );
                let mut current = svc.clone();
                if rewrite {
                    // Usually our own status write has not reached the cache yet (the
                    // conditional write then conflicts, re-reads and finds it in place);
                    // otherwise someone changed the status and ours is put back. No cloud call.
                    let fresh = status::write_status(client, svc.clone(), &last.status).await?;
                    current = fresh.clone();
                    self.memory().edit(key, |r| {
                        if let Some(l) = r.last.as_mut() {
                            l.service = fresh;
                        }
                    });
                }
                let res = if step == Step::StatusOnly {
                    Ok(Requeue::Done)
                } else {
                    // Only the node set changed: update hosts, as upstream's node sync does.
                    self.update_hosts(key, &svc, &nodes, o.nodes).await
                };
                let desired = match &res {
                    Err(Error::Provider(e)) => Some(vec![condition::failed(e)]),
                    Err(_) => None,
                    Ok(_) => condition::after_success(step, core::has_ingress(&current)),
                };
                self.condition(Some(&current), desired).await;
                res
            }
            Step::Ensure => {
                let Some(svc) = o.service else {
                    return Ok(Requeue::Done);
                };
                self.ensure(key, svc, &nodes, o.nodes).await
            }
            Step::Cleanup => {
                let Some(svc) = o.service else {
                    return Ok(Requeue::Done);
                };
                self.cleanup(key, svc).await
            }
            // `Shell::reconcile` looks up and decides again; never decided twice in a row.
            Step::LookUp => Ok(Requeue::After(Duration::ZERO)),
            Step::Recreate => {
                let Some(svc) = o.service else {
                    return Ok(Requeue::Done);
                };
                let name = self
                    .provider
                    .load_balancer_name(&self.config.cluster_name, &svc);
                info!(service = %key, load_balancer = %name, "load balancer gone: recreating it");
                self.ctx
                    .events
                    .normal(
                        &reference(&svc),
                        "RecreatingLoadBalancer",
                        "Ensure",
                        note(format!(
                            "Load balancer {name} no longer exists (deleted outside this controller): recreating it"
                        )),
                    )
                    .await;
                self.ensure(key, svc, &nodes, o.nodes).await
            }
            Step::ServedElsewhere { warn } => {
                let Some(svc) = o.service else {
                    return Ok(Requeue::Done);
                };
                self.condition(Some(&svc), condition::after_success(step, false))
                    .await;
                if warn {
                    warn!(service = %key, "class-less Service already served by another controller: not serving it");
                    self.ctx
                        .events
                        .warning(
                            &reference(&svc),
                            SERVED_ELSEWHERE,
                            "Ensure",
                            "status.loadBalancer was not written by this controller and no load balancer of ours exists: another controller (e.g. the cluster's cloud-controller-manager) serves class-less Services here, so this one is left alone. Set spec.loadBalancerClass to use this controller, or run it with --default-load-balancer=false".into(),
                        )
                        .await;
                }
                Ok(Requeue::Done)
            }
        }
    }

    async fn ensure(
        &self,
        key: &ObjectKey,
        svc: Service,
        nodes: &[Arc<Node>],
        nodes_fp: core::NodeFingerprint,
    ) -> Result<Requeue, Error> {
        let r = reference(&svc);
        let events = &self.ctx.events;
        events
            .normal(
                &r,
                "EnsuringLoadBalancer",
                "Ensure",
                "Ensuring load balancer".into(),
            )
            .await;
        // The finalizer goes on before the first cloud call, so deletion always waits for us.
        let svc = status::add_finalizer(&self.ctx.client, svc).await?;
        // After a conflict the write went to a newer copy: remember what we actually ensured.
        let spec = core::spec_fingerprint(&svc);
        if nodes.is_empty() {
            events
                .warning(
                    &r,
                    "UnAvailableLoadBalancer",
                    "Ensure",
                    "There are no available nodes for LoadBalancer".into(),
                )
                .await;
        }
        self.warn_unsupported(key, &svc).await;
        self.metrics.sync_total.inc();
        let hosts: Vec<Node> = nodes.iter().map(|n| n.as_ref().clone()).collect();
        let lb = match self
            .provider
            .ensure(&self.config.cluster_name, &svc, &hosts)
            .await
        {
            Ok(s) => s,
            Err(e) => {
                events
                    .warning(
                        &r,
                        "SyncLoadBalancerFailed",
                        "Ensure",
                        note(format!(
                            "Error syncing load balancer: failed to ensure load balancer: {e}"
                        )),
                    )
                    .await;
                self.condition(Some(&svc), Some(vec![condition::failed(&e)]))
                    .await;
                if e.is_permanent() {
                    let reason = e.code().unwrap_or("InvalidService").to_string();
                    warn!(service = %key, %reason, error = %e, "refused: not retrying until the Service changes");
                    self.metrics
                        .refusals
                        .get_or_create(&ReasonLabel { reason })
                        .inc();
                    self.memory().edit(key, |r| r.parked = Some(spec));
                    return Ok(Requeue::Done);
                }
                return Err(e.into());
            }
        };
        self.memory().edit(key, |r| r.parked = None);
        events
            .normal(
                &r,
                "EnsuredLoadBalancer",
                "Ensure",
                "Ensured load balancer".into(),
            )
            .await;
        let mut svc = status::write_status(&self.ctx.client, svc, &lb).await?;
        let published = core::has_ingress(&svc);
        if let Some(s) = self
            .condition(
                Some(&svc),
                condition::after_success(Step::Ensure, published),
            )
            .await
        {
            svc = s;
        }
        let last = LastSync {
            service: svc,
            spec,
            nodes: nodes_fp,
            status: lb,
        };
        self.memory().edit(key, |r| r.last = Some(last));
        Ok(Requeue::Done)
    }

    /// A Warning naming the provider annotations we ignore, once per Service and distinct set
    /// (the note carries the set, and the recorder reports a standing note once).
    async fn warn_unsupported(&self, key: &ObjectKey, svc: &Service) {
        let ignored = self.provider.unsupported_annotations(svc);
        if ignored.is_empty() {
            return;
        }
        let list = ignored.into_iter().collect::<Vec<_>>().join(", ");
        let sent = self
            .ctx
            .events
            .warn_once(
                &reference(svc),
                UNSUPPORTED_ANNOTATION,
                "Ensure",
                note(format!(
                    "Annotations not implemented by the {} load-balancer provider are ignored: {list}",
                    self.provider.provider_name()
                )),
            )
            .await;
        if sent {
            warn!(service = %key, annotations = %list, "unsupported load-balancer annotations ignored");
            self.metrics.unsupported_annotations.inc();
        }
    }

    async fn update_hosts(
        &self,
        key: &ObjectKey,
        svc: &Service,
        nodes: &[Arc<Node>],
        fp: core::NodeFingerprint,
    ) -> Result<Requeue, Error> {
        let r = reference(svc);
        let events = &self.ctx.events;
        let start = Instant::now();
        self.metrics.sync_total.inc();
        let hosts: Vec<Node> = nodes.iter().map(|n| n.as_ref().clone()).collect();
        let res = self
            .provider
            .update_hosts(&self.config.cluster_name, svc, &hosts)
            .await;
        let secs = start.elapsed().as_secs_f64();
        self.metrics.host_update_latency.observe(secs);
        match res {
            Ok(()) => {
                if nodes.is_empty() {
                    events
                        .warning(
                            &r,
                            "UnAvailableLoadBalancer",
                            "Update",
                            "There are no available nodes for LoadBalancer".into(),
                        )
                        .await;
                } else {
                    events
                        .normal(
                            &r,
                            "UpdatedLoadBalancer",
                            "Update",
                            "Updated load balancer with new hosts".into(),
                        )
                        .await;
                }
                self.memory().edit(key, |r| {
                    if let Some(l) = r.last.as_mut() {
                        l.nodes = fp;
                    }
                });
                Ok(Requeue::Done)
            }
            Err(e) => {
                self.metrics.nodesync_errors.inc();
                let names: Vec<&str> = nodes
                    .iter()
                    .take(20)
                    .filter_map(|n| n.metadata.name.as_deref())
                    .collect();
                events
                    .warning(
                        &r,
                        "UpdateLoadBalancerFailed",
                        "Update",
                        note(format!(
                            "Error updating load balancer with new hosts {names:?} [node names limited, total number of nodes: {}], error: {e}",
                            nodes.len()
                        )),
                    )
                    .await;
                Err(e.into())
            }
        }
    }

    async fn cleanup(&self, key: &ObjectKey, svc: Service) -> Result<Requeue, Error> {
        let cluster = &self.config.cluster_name;
        let r = reference(&svc);
        let events = &self.ctx.events;
        let exists = match self.provider.get(cluster, &svc).await {
            Ok(s) => s.is_some(),
            Err(e) => {
                events
                    .warning(
                        &r,
                        "SyncLoadBalancerFailed",
                        "Delete",
                        note(format!(
                            "Error syncing load balancer: failed to check if load balancer exists before cleanup: {e}"
                        )),
                    )
                    .await;
                return Err(e.into());
            }
        };
        if exists {
            events
                .normal(
                    &r,
                    "DeletingLoadBalancer",
                    "Delete",
                    "Deleting load balancer".into(),
                )
                .await;
            if let Err(e) = self.provider.ensure_deleted(cluster, &svc).await {
                events
                    .warning(
                        &r,
                        "DeleteLoadBalancerFailed",
                        "Delete",
                        note(format!("Error deleting load balancer: {e}")),
                    )
                    .await;
                return Err(e.into());
            }
        } else {
            // Still release anything half-made (and the local pool's reservation).
            self.provider.ensure_deleted(cluster, &svc).await?;
        }
        let client = &self.ctx.client;
        let mut svc = match status::write_status(client, svc, &LoadBalancerStatus::default()).await
        {
            Ok(s) => s,
            Err(Error::Kube(e)) if status::is_not_found(&e) => return Ok(Requeue::Done),
            Err(e) => return Err(e),
        };
        // Not served any more (type or class changed): our condition goes too. A Service
        // being deleted keeps it; it is gone with the Service.
        if svc.metadata.deletion_timestamp.is_none()
            && let Some(s) = self
                .condition(Some(&svc), condition::after_success(Step::Cleanup, false))
                .await
        {
            svc = s;
        }
        status::remove_finalizer(client, svc).await?;
        events
            .normal(
                &r,
                "DeletedLoadBalancer",
                "Delete",
                "Deleted load balancer".into(),
            )
            .await;
        self.memory().forget(key);
        Ok(Requeue::Done)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn notes_fit_the_api_limit() {
        assert_eq!(super::note("short".into()), "short");
        let long = "é".repeat(900);
        let n = super::note(long);
        assert!(n.len() <= 1024 && n.ends_with("..."));
    }
}
