//! The secure port (`--secure-port`, 10257 as kube-controller-manager's): HTTPS with delegated
//! authentication and authorization in front of the routes of [`crate::http`].

pub mod auth;
pub mod cert;
pub mod flags;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use axum::Router;
use kube::config::{KubeConfigOptions, Kubeconfig};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use self::auth::{Delegated, Ttls};
use self::flags::ServingFlags;

/// A client that does not finish its TLS handshake within this long is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Connections handshaken but not yet taken by the server.
const ACCEPT_BACKLOG: usize = 64;

/// Serves `app` on the secure port until `shutdown`; `None` with `--secure-port=0`. Binds and
/// loads the certificate before returning, so a bad address or file fails start-up.
/// `main` is the main client's configuration, used for the reviews unless
/// `--authentication-kubeconfig`/`--authorization-kubeconfig` name others.
pub async fn serve_secure(
    flags: &ServingFlags,
    main: &kube::Config,
    app: Router,
    shutdown: CancellationToken,
) -> Result<Option<tokio::task::JoinHandle<()>>> {
    if flags.secure_port == 0 {
        return Ok(None);
    }
    let (tls, serving_cert) = cert::server_config(flags)?;
    if serving_cert.reloadable() {
        tokio::spawn(reload_certificate(serving_cert, shutdown.clone()));
    }
    // Clients of their own, not the controllers' rate-limited one: scrapes must not spend the
    // controllers' --kube-api-qps budget (and reviews are bounded and cached instead).
    let authn = client_for(
        "--authentication-kubeconfig",
        flags.authentication_kubeconfig.as_deref(),
        main,
    )
    .await?;
    let authz = client_for(
        "--authorization-kubeconfig",
        flags.authorization_kubeconfig.as_deref(),
        main,
    )
    .await?;
    let delegated = Arc::new(Delegated::new(
        authn,
        authz,
        flags.authorization_always_allow_paths.clone(),
        Ttls {
            token: flags.authentication_token_webhook_cache_ttl,
            allowed: flags.authorization_webhook_cache_authorized_ttl,
            denied: flags.authorization_webhook_cache_unauthorized_ttl,
        },
    ));
    let app = app.layer(axum::middleware::from_fn_with_state(
        delegated,
        auth::middleware,
    ));
    let addr = SocketAddr::new(flags.bind_address, flags.secure_port);
    let tcp = TcpListener::bind(addr)
        .await
        .with_context(|| format!("--secure-port: binding {addr}"))?;
    info!(address = %addr, "serving securely");
    let listener = TlsListener::start(tcp, TlsAcceptor::from(Arc::new(tls)), shutdown.clone());
    Ok(Some(tokio::spawn(async move {
        let _ = axum::serve(listener, app)
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await;
    })))
}

/// How often the given certificate files are looked at. Upstream watches them with inotify
/// (and re-reads each minute); a poll of two small files is as prompt and needs no watcher.
const CERT_POLL: Duration = Duration::from_secs(1);

/// Serves a changed `--tls-cert-file`/`--tls-private-key-file` pair from the next handshake on,
/// until `shutdown`.
async fn reload_certificate(cert: Arc<cert::ServingCert>, shutdown: CancellationToken) {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(CERT_POLL) => {}
        }
        let c = cert.clone();
        match tokio::task::spawn_blocking(move || c.reload()).await {
            Ok(Ok(true)) => info!("secure port: loaded a new serving certificate"),
            Ok(Ok(false)) => {}
            Ok(Err(e)) => {
                warn!(error = %format!("{e:#}"), "secure port: the changed serving certificate was not loaded; serving the previous one")
            }
            Err(e) => warn!(error = %e, "secure port: certificate reload task failed"),
        }
    }
}

async fn client_for(
    flag: &str,
    path: Option<&std::path::Path>,
    main: &kube::Config,
) -> Result<kube::Client> {
    let config = match path {
        None => main.clone(),
        Some(p) => {
            let kc = Kubeconfig::read_from(p)
                .with_context(|| format!("{flag}: reading {}", p.display()))?;
            kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
                .await
                .with_context(|| format!("{flag}: {}", p.display()))?
        }
    };
    kube::Client::try_from(config).with_context(|| format!("{flag}: building a client"))
}

/// Accepted TLS connections for `axum::serve`. Handshakes run in tasks of their own, so one
/// slow or silent client never holds up the others.
struct TlsListener {
    rx: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    local: SocketAddr,
}

impl TlsListener {
    fn start(tcp: TcpListener, acceptor: TlsAcceptor, shutdown: CancellationToken) -> Self {
        let local = tcp
            .local_addr()
            .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
        let (tx, rx) = mpsc::channel(ACCEPT_BACKLOG);
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    _ = shutdown.cancelled() => return,
                    a = tcp.accept() => a,
                };
                let (stream, peer) = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // Out of file descriptors and the like: back off a little, as axum does.
                        warn!(error = %e, "secure port: accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let acceptor = acceptor.clone();
                let tx = tx.clone();
                tokio::spawn(async move {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                        Ok(Ok(tls)) => {
                            let _ = tx.send((tls, peer)).await;
                        }
                        Ok(Err(e)) => {
                            debug!(%peer, error = %e, "secure port: TLS handshake failed")
                        }
                        Err(_) => debug!(%peer, "secure port: TLS handshake timed out"),
                    }
                });
            }
        });
        TlsListener { rx, local }
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.rx.recv().await {
            Some(conn) => conn,
            // The accept loop has stopped (shutdown): nothing more will come.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local)
    }
}
