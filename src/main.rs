//! service-controller-manager: flags, the leader gate, controllers, health and metrics, shutdown.

mod controllers;
mod flags;
mod http;
mod plan;
mod serving;

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use k8s_openapi::api::coordination::v1::Lease;
use kube::Api;
use kube::config::{KubeConfigOptions, Kubeconfig};
use scm_runtime::client::{RateLimit, rate_limited_client};
use scm_runtime::leader::{LeaseConfig, run_elector};
use scm_runtime::metrics::LeaseLabel;
use scm_runtime::{LeaderGate, Metrics, Readiness};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::flags::Flags;

/// How long after SIGTERM we wait for controllers and the Lease release before exiting anyway.
const SHUTDOWN_BUDGET: Duration = Duration::from_secs(8);

fn main() -> ExitCode {
    if std::env::args_os().nth(1).is_some_and(|a| a == "explain") {
        return explain_main();
    }
    if std::env::args_os().nth(1).is_some_and(|a| a == "crd") {
        return crd_main();
    }
    // `plan` takes the manager's own flags, after the word.
    let plan = std::env::args_os().nth(1).is_some_and(|a| a == "plan");
    let args = std::env::args_os()
        .enumerate()
        .filter(|(i, _)| !(plan && *i == 1))
        .map(|(_, a)| a);
    let flags = match Flags::try_parse_from(args) {
        Ok(f) => f,
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
                let _ = e.print();
                return ExitCode::SUCCESS;
            }
            // One line naming the flag; clap's own rendering adds usage hints over several.
            let text = e.to_string();
            let first = text.lines().next().unwrap_or("invalid flags");
            eprintln!("{first}");
            return ExitCode::from(2);
        }
    };
    if let Err(msg) = flags.validate() {
        eprintln!("error: {msg}");
        return ExitCode::from(2);
    }
    if let Err(e) = init_logging(&flags) {
        eprintln!("error: --log-level: {e}");
        return ExitCode::from(2);
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: starting the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut flags = flags;
    if plan {
        flags.dry_run = true;
    }
    match rt.block_on(run(flags, plan)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!(error = format!("{e:#}"), "exiting");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(flags: &Flags) -> anyhow::Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_new(&flags.log_level)?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if flags.log_format == "json" {
        builder.json().flatten_event(true).init();
    } else {
        builder.init();
    }
    Ok(())
}

async fn kube_config(flags: &Flags) -> anyhow::Result<kube::Config> {
    kube_config_at(flags.kubeconfig.as_ref()).await
}

async fn kube_config_at(kubeconfig: Option<&std::path::PathBuf>) -> anyhow::Result<kube::Config> {
    match kubeconfig {
        Some(path) => {
            let kc = Kubeconfig::read_from(path)
                .with_context(|| format!("--kubeconfig: reading {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
                .await
                .with_context(|| format!("--kubeconfig: {}", path.display()))
        }
        None => kube::Config::incluster()
            .context("no --kubeconfig or KUBECONFIG, and not running in a cluster"),
    }
}

/// `crd`: prints the `LoadBalancerIPPool` CustomResourceDefinition (as the chart ships it), for
/// `kubectl apply -f -`. Takes no arguments (exit 2 with any).
fn crd_main() -> ExitCode {
    if std::env::args_os().nth(2).is_some() {
        eprintln!("usage: service-controller-manager crd (prints the LoadBalancerIPPool CRD)");
        return ExitCode::from(2);
    }
    print!("{}", cloud_lb::local::crd::manifest_yaml());
    ExitCode::SUCCESS
}

/// `explain <namespace>/<service>`: read-only (GET and LIST only). Exits 0 when the Service
/// was found, 1 with one line when it was not or the API failed, 2 on bad usage.
fn explain_main() -> ExitCode {
    let args = match flags::ExplainArgs::try_parse_from(std::env::args_os().skip(1)) {
        Ok(a) => a,
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
                let _ = e.print();
                return ExitCode::SUCCESS;
            }
            let text = e.to_string();
            eprintln!("{}", text.lines().next().unwrap_or("invalid arguments"));
            return ExitCode::from(2);
        }
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build();
    let out = match rt {
        Ok(rt) => rt.block_on(explain(args)),
        Err(e) => Err(anyhow::Error::from(e).context("starting the async runtime")),
    };
    match out {
        Ok(text) => {
            print!("{text}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {}", format!("{e:#}").replace('\n', " "));
            ExitCode::FAILURE
        }
    }
}

async fn explain(args: flags::ExplainArgs) -> anyhow::Result<String> {
    let client = kube::Client::try_from(kube_config_at(args.kubeconfig.as_ref()).await?)?;
    let (ns, name) = &args.service;
    let mut observed = scm_explain::fetch::observe(&client, ns, name, &args.cluster_domain).await?;
    observed.endpoint_aware_targets = args.endpoint_aware_targets;
    let x = scm_explain::explain(&observed);
    Ok(match args.output.as_str() {
        "json" => serde_json::to_string_pretty(&x)? + "\n",
        _ => scm_explain::render::text(&x),
    })
}

/// client-go's identity: the hostname plus a random suffix, so two replicas on one host differ.
fn identity() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/etc/hostname")
                .ok()
                .map(|s| s.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into());
    format!("{host}_{:016x}", rand::random::<u64>())
}

/// Runs the manager until shutdown; with `plan` (a dry run), only until the plan is complete,
/// then prints it.
async fn run(flags: Flags, plan: bool) -> anyhow::Result<()> {
    let enabled = flags::enabled_controllers(&flags.controllers, !flags.cloud_provider.is_empty())
        .map_err(anyhow::Error::msg)?;
    let config = kube_config(&flags).await?;
    let client = rate_limited_client(
        config.clone(),
        RateLimit {
            qps: flags.kube_api_qps,
            burst: flags.kube_api_burst,
        },
    )?;

    let shutdown = CancellationToken::new();
    spawn_signal_handler(shutdown.clone());

    let metrics = Metrics::new();
    let readiness = Readiness::default();
    let identity = identity();
    let dry_run = flags
        .dry_run
        .then(scm_runtime::client::dry_run::DryRun::new);
    if dry_run.is_some() {
        warn!(
            "dry run: writes are sent as server-side dry runs and cloud calls that mutate are skipped; nothing takes effect"
        );
    }

    let informers = scm_runtime::Informers::new(client.clone(), shutdown.clone());
    let health = http::Health::new(informers.clone());
    health.add_controllers(&enabled);
    let app = http::router(
        metrics.clone(),
        readiness.clone(),
        health.clone(),
        shutdown.clone(),
    );
    let mut servers = Vec::new();
    if plan {
        // A plan serves nothing: it may run beside a live manager on the same host.
    } else if let Some(addr) = flags.http_address {
        let plain = http::serve_plain(addr, app.clone(), shutdown.clone())
            .await
            .with_context(|| format!("--http-address: binding {addr}"))?;
        servers.push(plain);
    }
    if !plan {
        servers
            .extend(serving::serve_secure(&flags.serving, &config, app, shutdown.clone()).await?);
    }

    // Leadership: the elector's own token outlives the controllers' so that the Lease is
    // released only after workers have stopped writing.
    let elector_stop = CancellationToken::new();
    // A dry run never takes the Lease: it must be runnable beside a live manager.
    let (gate, elector) = if flags.leader_elect && dry_run.is_none() {
        let (tx, rx) = tokio::sync::watch::channel(false);
        let api: Api<Lease> =
            Api::namespaced(client.clone(), &flags.leader_elect_resource_namespace);
        let cfg = LeaseConfig {
            name: flags.leader_elect_resource_name.clone(),
            namespace: flags.leader_elect_resource_namespace.clone(),
            identity: identity.clone(),
            lease_duration: flags.leader_elect_lease_duration,
            renew_deadline: flags.leader_elect_renew_deadline,
            retry_period: flags.leader_elect_retry_period,
        };
        let alive = health.add_elector();
        let stop = elector_stop.clone();
        let handle = tokio::spawn(async move {
            run_elector(api, cfg, tx, stop).await;
            // Nobody renews or acquires the Lease any more: /healthz/leaderElection fails.
            alive.store(false, std::sync::atomic::Ordering::Relaxed);
        });
        (LeaderGate::from_receiver(rx), Some(handle))
    } else {
        let (gate, tx) = LeaderGate::fixed(true);
        // Keep the sender alive for the life of the process so the gate stays open.
        std::mem::forget(tx);
        (gate, None)
    };
    spawn_leader_gauge(
        gate.clone(),
        metrics.clone(),
        flags.leader_elect_resource_name.clone(),
    );

    info!(
        identity = %identity,
        controllers = ?enabled,
        leader_elect = flags.leader_elect && dry_run.is_none(),
        dry_run = dry_run.is_some(),
        http = ?flags.http_address,
        secure_port = flags.serving.secure_port,
        "starting service-controller-manager"
    );
    let base = scm_runtime::ContextBase {
        // Writes made outside any controller's context are dry runs too.
        client: match &dry_run {
            Some(d) => d.client(client.clone(), "manager"),
            None => client.clone(),
        },
        leader: gate.clone(),
        metrics: metrics.clone(),
        readiness: readiness.clone(),
        shutdown: shutdown.clone(),
        identity: Some(identity.clone()),
        informers,
        dry_run: dry_run.clone(),
    };
    let mut tasks = controllers::start(&enabled, &flags, &base).await?;

    let failed = match &dry_run {
        Some(dry) if plan => {
            tokio::select! {
                f = supervise(&mut tasks, &shutdown, &health) => {
                    Some(f.unwrap_or_else(|| "plan: interrupted".to_string()))
                }
                r = plan::wait(dry, &readiness, &enabled, flags.plan_timeout) => {
                    shutdown.cancel();
                    match r {
                        Ok(()) => {
                            print!("{}", plan::table(&dry.records(), dry));
                            None
                        }
                        Err(e) => Some(e),
                    }
                }
            }
        }
        _ => supervise(&mut tasks, &shutdown, &health).await,
    };
    info!("shutting down: no new work is taken");
    let deadline = tokio::time::Instant::now() + SHUTDOWN_BUDGET;
    while let Some(res) = tokio::time::timeout_at(deadline, tasks.join_next())
        .await
        .ok()
        .flatten()
    {
        match res {
            Ok((name, Ok(()))) => info!(controller = name, "stopped"),
            Ok((name, Err(e))) => warn!(
                controller = name,
                error = format!("{e:#}"),
                "stopped with error"
            ),
            Err(e) => warn!(error = %e, "controller task failed"),
        }
    }
    tasks.abort_all();
    elector_stop.cancel();
    if let Some(h) = elector {
        let _ = tokio::time::timeout_at(deadline + Duration::from_secs(1), h).await;
    }
    let _ = tokio::time::timeout(
        Duration::from_millis(500),
        futures::future::join_all(servers),
    )
    .await;
    info!("bye");
    match failed {
        Some(what) => anyhow::bail!("{what}"),
        None => Ok(()),
    }
}

/// Waits for shutdown, or for a controller to end on its own (an error, or a panic in a
/// reconcile). A controller that ended must not leave a healthy-looking process that keeps
/// the Lease while nothing reconciles: `/healthz` fails at once, and the whole process shuts
/// down (releasing the Lease, so another replica takes over) and exits non-zero, as
/// kube-controller-manager exits on a controller's crash.
async fn supervise(
    tasks: &mut controllers::Tasks,
    shutdown: &CancellationToken,
    health: &http::Health,
) -> Option<String> {
    tokio::select! {
        // Shutdown first: on SIGTERM the controllers end too, and a random pick of their end
        // would report a clean stop as "stopped on its own" and exit 1.
        biased;
        _ = shutdown.cancelled() => None,
        Some(res) = tasks.join_next() => {
            let what = match res {
                Ok((name, Ok(()))) => {
                    let what = format!("controller {name} stopped on its own");
                    health.controller_ended(name, what.clone());
                    what
                }
                Ok((name, Err(e))) => {
                    let what = format!("controller {name} failed: {e:#}");
                    health.controller_ended(name, what.clone());
                    what
                }
                Err(e) => {
                    // A panic: the task's name is not known here.
                    let what = format!("a controller task ended: {e}");
                    health.fail(what.clone());
                    what
                }
            };
            error!(reason = %what, "a controller is gone: failing /healthz and giving up the Lease");
            shutdown.cancel();
            Some(what)
        }
    }
}

fn spawn_signal_handler(shutdown: CancellationToken) {
    tokio::spawn(async move {
        use tokio::signal::unix::{SignalKind, signal};
        let (Ok(mut term), Ok(mut int)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) else {
            error!("cannot install signal handlers");
            return;
        };
        tokio::select! {
            _ = term.recv() => info!("received SIGTERM"),
            _ = int.recv() => info!("received SIGINT"),
        }
        shutdown.cancel();
        // A second signal: stop waiting for anything.
        tokio::select! {
            _ = term.recv() => {},
            _ = int.recv() => {},
        }
        std::process::exit(1);
    });
}

fn spawn_leader_gauge(mut gate: LeaderGate, metrics: Metrics, lease: String) {
    tokio::spawn(async move {
        let g = metrics
            .leader
            .get_or_create(&LeaseLabel { name: lease })
            .clone();
        loop {
            g.set(0);
            if !gate.wait_leading().await {
                return;
            }
            g.set(1);
            gate.wait_lost().await;
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn health() -> http::Health {
        let cfg = kube::Config::new("http://127.0.0.1:9".parse().expect("uri"));
        let client = kube::Client::try_from(cfg).expect("client");
        http::Health::new(scm_runtime::Informers::new(
            client,
            CancellationToken::new(),
        ))
    }

    #[tokio::test]
    async fn a_panicking_controller_fails_healthz_and_shuts_the_process_down() {
        // Before, a panic in a reconcile ended only that controller's task: /healthz stayed
        // "ok" and the Lease kept being renewed with nothing reconciling.
        let mut tasks = controllers::Tasks::new();
        tasks.spawn(async {
            std::future::pending::<()>().await;
            ("endpointslice", Ok(()))
        });
        tasks.spawn(async {
            tokio::task::yield_now().await;
            panic!("boom in a reconcile");
        });
        let shutdown = CancellationToken::new();
        let h = health();
        assert!(h.problem(http::WATCH_STALL_BOUND).is_none());
        let failed = supervise(&mut tasks, &shutdown, &h).await;
        assert!(failed.is_some_and(|w| w.contains("boom") || w.contains("panicked")));
        assert!(
            shutdown.is_cancelled(),
            "the whole process shuts down, releasing the Lease"
        );
        assert!(
            h.problem(http::WATCH_STALL_BOUND).is_some(),
            "/healthz fails"
        );
    }

    #[tokio::test]
    async fn shutdown_is_not_a_failure() {
        let mut tasks = controllers::Tasks::new();
        tasks.spawn(async {
            std::future::pending::<()>().await;
            ("endpointslice", Ok(()))
        });
        let shutdown = CancellationToken::new();
        shutdown.cancel();
        let h = health();
        assert!(supervise(&mut tasks, &shutdown, &h).await.is_none());
        assert!(h.problem(http::WATCH_STALL_BOUND).is_none());
    }
}
