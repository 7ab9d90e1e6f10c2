//! The recording API double: a minimal in-process Services API (list, watch, get, replace with
//! resourceVersion preconditions) and an Events sink, enough for the shared informers and the
//! allocator shells' writes. Nothing is allocated, so the assign path can be exercised (no real
//! API server in reach leaves ClusterIPs and NodePorts empty).
//!
//! Every request is recorded in order ([`Call`]: method, path and query, body), so a test can
//! assert the exact API calls a shell makes. [`Double::conflict_next_write`] makes the next
//! replace of a Service meet a concurrent change and answer 409.

use std::collections::{BTreeMap, BTreeSet};
use std::convert::Infallible;
use std::sync::{Arc, Mutex};

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{Method, StatusCode};
use axum::response::Response;
use futures::StreamExt;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use tokio::sync::broadcast;

/// One request as the double received it.
#[derive(Clone, Debug, PartialEq)]
pub struct Call {
    /// `GET`, `PUT`, ...
    pub method: String,
    /// Path, and `?query` when there is one.
    pub uri: String,
    /// The JSON body (`Null` when there is none).
    pub body: serde_json::Value,
}

impl Call {
    /// `METHOD uri`, and ` rv=N` when the body carries `metadata.resourceVersion` (the
    /// precondition of a replace): compact enough to compare whole sequences in assertions.
    pub fn brief(&self) -> String {
        match self.body["metadata"]["resourceVersion"].as_str() {
            Some(rv) => format!("{} {} rv={rv}", self.method, self.uri),
            None => format!("{} {}", self.method, self.uri),
        }
    }
}

/// The double's state.
#[derive(Default)]
pub struct Inner {
    /// The last resourceVersion handed out.
    pub rv: u64,
    /// Services by (namespace, name).
    pub services: BTreeMap<(String, String), Service>,
    history: Vec<(u64, &'static str, Service)>,
    /// Events created.
    pub events: Vec<serde_json::Value>,
    /// Repeats of published Events.
    pub event_patches: u64,
    /// Keys whose next replace is refused after a concurrent change.
    pub conflict_once: BTreeSet<(String, String)>,
    /// 409s answered.
    pub conflicts: u64,
    /// Replaces accepted.
    pub writes: u64,
    /// Every request, in order.
    pub calls: Vec<Call>,
    created: i64,
}

/// The double: its state, and the feed of its watch streams.
pub struct Double {
    /// The state (tests read it through the methods below).
    pub inner: Mutex<Inner>,
    tx: broadcast::Sender<(u64, &'static str, Service)>,
}

impl Double {
    /// An empty double.
    pub fn new() -> Arc<Self> {
        let (tx, _) = broadcast::channel(4096);
        Arc::new(Double {
            inner: Mutex::new(Inner::default()),
            tx,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn commit(&self, g: &mut Inner, kind: &'static str, mut s: Service) -> Service {
        g.rv += 1;
        s.metadata.resource_version = Some(g.rv.to_string());
        let key = (
            s.metadata.namespace.clone().unwrap_or_default(),
            s.metadata.name.clone().unwrap_or_default(),
        );
        g.services.insert(key, s.clone());
        g.history.push((g.rv, kind, s.clone()));
        let _ = self.tx.send((g.rv, kind, s.clone()));
        s
    }

    /// Creates a Service as stored by an API server that allocates nothing.
    pub fn create(&self, mut s: Service) -> Service {
        let mut g = self.lock();
        g.created += 1;
        s.metadata.uid = Some(format!("uid-{}", g.created));
        s.metadata.creation_timestamp = Some(Time(
            k8s_openapi::jiff::Timestamp::from_second(1_700_000_000 + g.created)
                .unwrap_or_default(),
        ));
        self.commit(&mut g, "ADDED", s)
    }

    /// The stored Service.
    pub fn get(&self, ns: &str, name: &str) -> Option<Service> {
        self.lock()
            .services
            .get(&(ns.to_string(), name.to_string()))
            .cloned()
    }

    /// Events created, in order.
    pub fn events(&self) -> Vec<serde_json::Value> {
        self.lock().events.clone()
    }

    /// How many times a published Event was repeated (patched).
    pub fn event_patches(&self) -> u64 {
        self.lock().event_patches
    }

    /// The next replace of `ns/name` meets a concurrent change (a label `touched: yes`
    /// committed first) and is answered 409.
    pub fn conflict_next_write(&self, ns: &str, name: &str) {
        self.lock()
            .conflict_once
            .insert((ns.to_string(), name.to_string()));
    }

    /// (replaces accepted, 409s answered).
    pub fn stats(&self) -> (u64, u64) {
        let g = self.lock();
        (g.writes, g.conflicts)
    }

    /// Every request so far, in order.
    pub fn calls(&self) -> Vec<Call> {
        self.lock().calls.clone()
    }

    /// The requests whose path starts with `prefix`, in order, as [`Call::brief`] lines.
    pub fn calls_to(&self, prefix: &str) -> Vec<String> {
        self.lock()
            .calls
            .iter()
            .filter(|c| c.uri.starts_with(prefix))
            .map(Call::brief)
            .collect()
    }
}

fn json(code: StatusCode, v: &serde_json::Value) -> Response {
    Response::builder()
        .status(code)
        .header("content-type", "application/json")
        .body(Body::from(v.to_string()))
        .unwrap_or_default()
}

fn status(code: u16, reason: &str, message: &str) -> Response {
    json(
        StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        &serde_json::json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "reason": reason, "message": message, "code": code}),
    )
}

/// Answers one request (and records it first).
pub async fn handle(State(d): State<Arc<Double>>, req: Request) -> Response {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let query = req.uri().query().unwrap_or_default().to_string();
    let body = axum::body::to_bytes(req.into_body(), 16 << 20)
        .await
        .unwrap_or_default();
    d.lock().calls.push(Call {
        method: method.to_string(),
        uri: if query.is_empty() {
            path.clone()
        } else {
            format!("{path}?{query}")
        },
        body: serde_json::from_slice(&body).unwrap_or_default(),
    });
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    match (method, parts.as_slice()) {
        (Method::GET, ["api", "v1", "services"])
            if query.contains("watch=true") || query.contains("watch=1") =>
        {
            let from: u64 = query
                .split('&')
                .find_map(|kv| kv.strip_prefix("resourceVersion="))
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            let (backlog, rx) = {
                let g = d.lock();
                let rx = d.tx.subscribe();
                let backlog: Vec<_> = g
                    .history
                    .iter()
                    .filter(|(rv, _, _)| *rv > from)
                    .cloned()
                    .collect();
                (backlog, rx)
            };
            let last = backlog.last().map(|(rv, _, _)| *rv).unwrap_or(from);
            let live =
                tokio_stream_from(rx).filter(move |(rv, _, _)| futures::future::ready(*rv > last));
            let stream = futures::stream::iter(backlog)
                .chain(live)
                .map(|(_, kind, s)| {
                    let line = serde_json::json!({"type": kind, "object": s}).to_string() + "\n";
                    Ok::<_, Infallible>(Bytes::from(line))
                });
            Response::builder()
                .header("content-type", "application/json")
                .body(Body::from_stream(stream))
                .unwrap_or_default()
        }
        (Method::GET, ["api", "v1", "services"]) => {
            let g = d.lock();
            let items: Vec<&Service> = g.services.values().collect();
            json(
                StatusCode::OK,
                &serde_json::json!({"kind": "ServiceList", "apiVersion": "v1",
                    "metadata": {"resourceVersion": g.rv.to_string()}, "items": items}),
            )
        }
        (Method::GET, ["api", "v1", "namespaces", ns, "services", name]) => match d.get(ns, name) {
            Some(s) => json(StatusCode::OK, &serde_json::to_value(s).unwrap_or_default()),
            None => status(404, "NotFound", &format!("services \"{name}\" not found")),
        },
        (Method::PUT, ["api", "v1", "namespaces", ns, "services", name]) => {
            let Ok(new): Result<Service, _> = serde_json::from_slice(&body) else {
                return status(400, "BadRequest", "bad body");
            };
            let key = (ns.to_string(), name.to_string());
            let mut g = d.lock();
            let Some(cur) = g.services.get(&key).cloned() else {
                return status(404, "NotFound", &format!("services \"{name}\" not found"));
            };
            let concurrent = g.conflict_once.remove(&key);
            if concurrent {
                // Someone else writes first.
                let mut other = cur.clone();
                other
                    .metadata
                    .labels
                    .get_or_insert_with(Default::default)
                    .insert("touched".into(), "yes".into());
                d.commit(&mut g, "MODIFIED", other);
            }
            if concurrent || new.metadata.resource_version != cur.metadata.resource_version {
                g.conflicts += 1;
                return status(
                    409,
                    "Conflict",
                    &format!(
                        "Operation cannot be fulfilled on services \"{name}\": the object has been modified; please apply your changes to the latest version and try again"
                    ),
                );
            }
            let mut stored = new;
            stored.metadata.uid = cur.metadata.uid.clone();
            stored.metadata.creation_timestamp = cur.metadata.creation_timestamp.clone();
            g.writes += 1;
            let s = d.commit(&mut g, "MODIFIED", stored);
            json(StatusCode::OK, &serde_json::to_value(s).unwrap_or_default())
        }
        (Method::POST, ["apis", "events.k8s.io", "v1", "namespaces", _ns, "events"]) => {
            let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
            d.lock().events.push(v.clone());
            json(StatusCode::CREATED, &v)
        }
        (
            Method::PATCH,
            [
                "apis",
                "events.k8s.io",
                "v1",
                "namespaces",
                _ns,
                "events",
                _name,
            ],
        ) => {
            // A repeat of a published Event (kube's recorder patches its series).
            d.lock().event_patches += 1;
            json(
                StatusCode::OK,
                &serde_json::from_slice(&body).unwrap_or_default(),
            )
        }
        _ => status(404, "NotFound", &format!("no route {path}")),
    }
}

fn tokio_stream_from<T: Clone + Send + 'static>(
    rx: broadcast::Receiver<T>,
) -> impl futures::Stream<Item = T> {
    futures::stream::unfold(rx, |mut rx| async move {
        loop {
            match rx.recv().await {
                Ok(v) => return Some((v, rx)),
                Err(broadcast::error::RecvError::Lagged(_)) => continue,
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    })
}

/// Serves the double on a free port; returns a client for it.
pub async fn serve(d: Arc<Double>) -> kube::Client {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let app = axum::Router::new().fallback(handle).with_state(d);
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    let url: axum::http::Uri = format!("http://{addr}").parse().expect("url");
    let cfg = kube::Config::new(url);
    kube::Client::try_from(cfg).expect("client")
}
