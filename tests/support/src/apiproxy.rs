//! A fault-injecting proxy in front of the real kube-apiserver: what the tests use to produce
//! 409s, 429s with `Retry-After`, 5xx, slow answers, cut connections, silent (half-open) or ended
//! watches and `410 Gone` in a watch stream, from a real server rather than a mock.
//!
//! The code under test talks plain HTTP to the proxy on loopback (no credentials); the proxy
//! forwards each request through an admin [`kube::Client`] (TLS and authentication), streaming
//! the answer back, so watches pass through as they are. Faults are scripted per request
//! class (method, resource, watch or not) and used up `times` times.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Result;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{Method, StatusCode};
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use tokio_util::sync::CancellationToken;

/// Which requests a fault applies to; `None` matches anything.
#[derive(Clone, Debug, Default)]
pub struct Match {
    /// HTTP method (GET, POST, PUT, PATCH, DELETE).
    pub method: Option<Method>,
    /// Resource (plural, e.g. `endpointslices`), as in the path.
    pub resource: Option<String>,
    /// Watches only (`Some(true)`) or everything but watches (`Some(false)`).
    pub watch: Option<bool>,
}

impl Match {
    /// Every request for `resource`.
    pub fn resource(resource: &str) -> Match {
        Match {
            resource: Some(resource.into()),
            ..Default::default()
        }
    }

    /// Watches of `resource`.
    pub fn watches(resource: &str) -> Match {
        Match {
            resource: Some(resource.into()),
            watch: Some(true),
            ..Default::default()
        }
    }

    /// Requests of `resource` with `method` (never watches).
    pub fn writes(method: Method, resource: &str) -> Match {
        Match {
            method: Some(method),
            resource: Some(resource.into()),
            watch: Some(false),
        }
    }

    fn matches(&self, r: &Seen) -> bool {
        self.method.as_ref().is_none_or(|m| *m == r.method)
            && self.resource.as_ref().is_none_or(|x| *x == r.resource)
            && self.watch.is_none_or(|w| w == r.watch)
    }
}

/// What a fault does to a matching request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Answer with this status (a Kubernetes `Status` body) without reaching the API server;
    /// with `Retry-After` if given (429s and 5xx).
    Status {
        /// HTTP status: 409, 429, 500, 503, …
        code: u16,
        /// `Retry-After` seconds.
        retry_after: Option<u32>,
    },
    /// Forward after this delay.
    Delay(Duration),
    /// Answer 200 and then break the connection (the body ends in an error).
    Cut,
    /// Answer 200 and never send anything more (a half-open watch), until the proxy stops.
    Silent,
    /// A watch that ends at once (the server closed it; the client watches again).
    EndWatch,
    /// A watch whose only event is `ERROR` with a `410 Gone` Status: the client must relist.
    Gone,
}

/// A scripted fault.
#[derive(Clone, Debug)]
pub struct ApiFault {
    /// Which requests.
    pub when: Match,
    /// What happens to them.
    pub action: Action,
    /// How many matching requests it applies to.
    pub times: u32,
}

/// One request as the proxy saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Seen {
    /// Method.
    pub method: Method,
    /// Resource (plural), or the path's last segment for non-resource paths.
    pub resource: String,
    /// Whether it was a watch.
    pub watch: bool,
    /// Path and query.
    pub uri: String,
}

#[derive(Default)]
struct ProxyState {
    faults: Vec<ApiFault>,
    seen: Vec<Seen>,
    injected: u64,
    /// Cancelled to end every open watch of a resource.
    watch_ends: BTreeMap<String, CancellationToken>,
}

/// The proxy; stops when dropped.
pub struct ApiProxy {
    /// `http://127.0.0.1:<port>`.
    pub url: String,
    state: Arc<Mutex<ProxyState>>,
    stop: CancellationToken,
}

impl Drop for ApiProxy {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

#[derive(Clone)]
struct AppState {
    upstream: kube::Client,
    state: Arc<Mutex<ProxyState>>,
    stop: CancellationToken,
}

impl ApiProxy {
    /// Starts a proxy that forwards through `upstream` (an admin client of the control plane).
    pub async fn start(upstream: kube::Client) -> Result<ApiProxy> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}", listener.local_addr()?);
        let state = Arc::new(Mutex::new(ProxyState::default()));
        let stop = CancellationToken::new();
        let app = axum::Router::new().fallback(handle).with_state(AppState {
            upstream,
            state: state.clone(),
            stop: stop.clone(),
        });
        let s = stop.clone();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async move { s.cancelled().await })
                .await;
        });
        Ok(ApiProxy { url, state, stop })
    }

    /// A client configuration for code under test: plain HTTP to the proxy, no credentials.
    pub fn config(&self) -> Result<kube::Config> {
        let mut c = kube::Config::new(self.url.parse()?);
        c.default_namespace = "default".into();
        Ok(c)
    }

    /// Queues a fault (faults are tried in the order queued).
    pub fn inject(&self, f: ApiFault) {
        self.lock().faults.push(f);
    }

    /// Shorthand: `action` on the next `times` requests matching `when`.
    pub fn fail(&self, when: Match, action: Action, times: u32) {
        self.inject(ApiFault {
            when,
            action,
            times,
        });
    }

    /// Drops every queued fault.
    pub fn clear_faults(&self) {
        self.lock().faults.clear();
    }

    /// Ends every watch of `resource` open now (the client will watch again).
    pub fn end_watches(&self, resource: &str) {
        if let Some(t) = self.lock().watch_ends.remove(resource) {
            t.cancel();
        }
    }

    /// Every request seen so far, in order (faulted ones included).
    pub fn seen(&self) -> Vec<Seen> {
        self.lock().seen.clone()
    }

    /// How many requests got a scripted answer.
    pub fn injected(&self) -> u64 {
        self.lock().injected
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ProxyState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The resource a request is about: the segment after `/api/v1` or `/apis/<group>/<version>`
/// (and after `namespaces/<ns>` when there is one).
pub fn resource_of(path: &str) -> String {
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    let rest: &[&str] = match segs.as_slice() {
        ["api", _v, rest @ ..] => rest,
        ["apis", _g, _v, rest @ ..] => rest,
        _ => return segs.last().copied().unwrap_or("").to_string(),
    };
    match rest {
        ["namespaces", _ns, r, ..] => r.to_string(),
        [r, ..] => r.to_string(),
        [] => String::new(),
    }
}

fn is_watch(query: &str) -> bool {
    query
        .split('&')
        .any(|kv| kv == "watch=true" || kv == "watch=1")
}

fn status_body(code: u16, reason: &str) -> String {
    format!(
        r#"{{"kind":"Status","apiVersion":"v1","metadata":{{}},"status":"Failure","message":"injected by the test proxy","reason":"{reason}","code":{code}}}"#
    )
}

fn reason_of(code: u16) -> &'static str {
    match code {
        409 => "Conflict",
        410 => "Expired",
        429 => "TooManyRequests",
        404 => "NotFound",
        403 => "Forbidden",
        500 => "InternalError",
        503 => "ServiceUnavailable",
        504 => "Timeout",
        _ => "Unknown",
    }
}

async fn handle(State(app): State<AppState>, req: Request) -> Response {
    let uri = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_default();
    let seen = Seen {
        method: req.method().clone(),
        resource: resource_of(req.uri().path()),
        watch: is_watch(req.uri().query().unwrap_or("")),
        uri: uri.clone(),
    };
    let (action, watch_end) = {
        let mut st = app.state.lock().unwrap_or_else(|e| e.into_inner());
        st.seen.push(seen.clone());
        let action = st
            .faults
            .iter_mut()
            .find(|f| f.times > 0 && f.when.matches(&seen))
            .map(|f| {
                f.times -= 1;
                f.action.clone()
            });
        st.faults.retain(|f| f.times > 0);
        if action.is_some() {
            st.injected += 1;
        }
        let end = seen.watch.then(|| {
            st.watch_ends
                .entry(seen.resource.clone())
                .or_default()
                .clone()
        });
        (action, end)
    };
    match action {
        Some(Action::Status { code, retry_after }) => {
            let mut r = Response::builder()
                .status(code)
                .header("content-type", "application/json");
            if let Some(s) = retry_after {
                r = r.header("retry-after", s.to_string());
            }
            return r
                .body(Body::from(status_body(code, reason_of(code))))
                .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response());
        }
        Some(Action::Delay(d)) => tokio::time::sleep(d).await,
        Some(Action::Cut) => {
            let s = futures::stream::once(async {
                Err::<axum::body::Bytes, _>(std::io::Error::other("cut by the test proxy"))
            });
            return Response::new(Body::from_stream(s));
        }
        Some(Action::Silent) => {
            let stop = app.stop.clone();
            let s = futures::stream::once(async move {
                stop.cancelled().await;
                Ok::<_, std::io::Error>(axum::body::Bytes::new())
            });
            return Response::new(Body::from_stream(s));
        }
        Some(Action::EndWatch) => return Response::new(Body::empty()),
        Some(Action::Gone) => {
            let ev = format!(
                "{{\"type\":\"ERROR\",\"object\":{}}}\n",
                status_body(410, "Expired")
            );
            return Response::builder()
                .header("content-type", "application/json")
                .body(Body::from(ev))
                .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response());
        }
        None => {}
    }
    forward(&app, req, &uri, watch_end).await
}

async fn forward(
    app: &AppState,
    req: Request,
    uri: &str,
    watch_end: Option<CancellationToken>,
) -> Response {
    let (parts, body) = req.into_parts();
    let Ok(bytes) = axum::body::to_bytes(body, 64 << 20).await else {
        return StatusCode::BAD_REQUEST.into_response();
    };
    let mut out = http::Request::builder().method(parts.method).uri(uri);
    for (k, v) in parts.headers.iter() {
        // The proxy's own connection and authority are not the API server's.
        if k == "host" || k == "connection" || k == "authorization" {
            continue;
        }
        out = out.header(k, v);
    }
    let Ok(out) = out.body(kube::client::Body::from(bytes.to_vec())) else {
        return StatusCode::BAD_REQUEST.into_response();
    };
    let resp = match app.upstream.send(out).await {
        Ok(r) => r,
        Err(e) => {
            return (StatusCode::BAD_GATEWAY, format!("proxy: {e}")).into_response();
        }
    };
    let (parts, body) = resp.into_parts();
    let stream = http_body_util::BodyDataStream::new(body);
    let body = match watch_end {
        // A watch ends when the test says so, or when the proxy stops.
        Some(end) => {
            let stop = app.stop.clone();
            Body::from_stream(stream.take_until(async move {
                tokio::select! {
                    _ = end.cancelled() => {},
                    _ = stop.cancelled() => {},
                }
            }))
        }
        None => Body::from_stream(stream),
    };
    Response::from_parts(parts, body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resources_from_paths() {
        assert_eq!(resource_of("/api/v1/services"), "services");
        assert_eq!(
            resource_of("/api/v1/namespaces/a/services/b/status"),
            "services"
        );
        assert_eq!(
            resource_of("/apis/discovery.k8s.io/v1/namespaces/a/endpointslices"),
            "endpointslices"
        );
        assert_eq!(
            resource_of("/apis/networking.k8s.io/v1/servicecidrs"),
            "servicecidrs"
        );
        assert_eq!(resource_of("/api/v1/namespaces"), "namespaces");
        assert_eq!(resource_of("/api/v1/namespaces/a"), "namespaces");
        assert_eq!(resource_of("/version"), "version");
        assert!(is_watch("watch=true&resourceVersion=5"));
        assert!(!is_watch("limit=500"));
    }
}
