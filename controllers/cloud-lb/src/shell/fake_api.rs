//! A minimal recording Kubernetes API double for the shell tests: one Service behind a plain
//! HTTP/1.1 server on loopback (a real `kube::Client` talks to it), with resourceVersion
//! preconditions on merge patches (409 on a stale copy), scripted edits by "someone else" just
//! before a write, and every request appended to a log shared with the fake provider, so a test
//! asserts the exact calls in order. Successful writes are handed to the Service informer, as
//! the API server's watch would.
//!
//! Why not `test_support::double`: that double serves Service replaces (PUT) and watches for the
//! allocator shells, while this shell writes conditional merge patches to the Service and to its
//! status subresource; this one knows only those calls, a GET and Events. The shell's informers
//! are fed directly (detached), so no watch is served here.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use k8s_openapi::api::core::v1::Service;
use scm_runtime::{Change, Informer};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;

/// The log shared by the API double and the fake provider.
pub type Log = Arc<Mutex<Vec<String>>>;

/// Appends `line` to `log`.
pub fn record(log: &Log, line: String) {
    log.lock().unwrap_or_else(|e| e.into_inner()).push(line);
}

/// Which write an external edit precedes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Before {
    /// The next PATCH of the Service itself.
    Patch,
    /// The next PATCH of its status.
    StatusPatch,
}

struct State {
    service: Value,
    rv: u64,
    /// Edits by someone else, each applied (and its resourceVersion bumped) just before our
    /// next write of that kind reaches the object.
    edits: VecDeque<(Before, Value)>,
    informer: Option<Informer<Service>>,
}

/// The API double.
pub struct FakeApi {
    /// Where a `kube::Config` points.
    pub url: String,
    state: Arc<Mutex<State>>,
}

fn lock(s: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    s.lock().unwrap_or_else(|e| e.into_inner())
}

/// RFC 7386 merge patch.
fn merge(target: &mut Value, patch: &Value) {
    match patch {
        Value::Object(p) => {
            if !target.is_object() {
                *target = json!({});
            }
            if let Value::Object(t) = target {
                for (k, v) in p {
                    if v.is_null() {
                        t.remove(k);
                    } else {
                        merge(t.entry(k.clone()).or_insert(Value::Null), v);
                    }
                }
            }
        }
        other => *target = other.clone(),
    }
}

fn status(code: u16, reason: &str) -> (u16, Value) {
    (
        code,
        json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
               "reason": reason, "message": reason, "code": code}),
    )
}

impl FakeApi {
    /// Serves `service` (its resourceVersion is set to `rv`), logging into `log`.
    pub async fn start(service: &Service, rv: u64, log: Log) -> FakeApi {
        let mut v = serde_json::to_value(service).expect("service json");
        v["metadata"]["resourceVersion"] = json!(rv.to_string());
        let state = Arc::new(Mutex::new(State {
            service: v,
            rv,
            edits: VecDeque::new(),
            informer: None,
        }));
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let st = state.clone();
        tokio::spawn(async move {
            while let Ok((sock, _)) = listener.accept().await {
                let (st, log) = (st.clone(), log.clone());
                tokio::spawn(async move {
                    let (r, mut w) = sock.into_split();
                    let mut r = BufReader::new(r);
                    while let Some((method, path, body)) = read_request(&mut r).await {
                        let (code, resp) = handle(&st, &log, &method, &path, &body);
                        let text = resp.to_string();
                        let head = format!(
                            "HTTP/1.1 {code} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
                            text.len()
                        );
                        if w.write_all(head.as_bytes()).await.is_err()
                            || w.write_all(text.as_bytes()).await.is_err()
                        {
                            return;
                        }
                    }
                });
            }
        });
        FakeApi { url, state }
    }

    /// A client of this API.
    pub fn client(&self) -> kube::Client {
        let cfg = kube::Config::new(self.url.parse().expect("url"));
        kube::Client::try_from(cfg).expect("client")
    }

    /// Hands every successful write to `informer` (the watch).
    pub fn feed(&self, informer: Informer<Service>) {
        lock(&self.state).informer = Some(informer);
    }

    /// Someone else merges `patch` into the Service just before our next write `before`.
    pub fn edit_before(&self, before: Before, patch: Value) {
        lock(&self.state).edits.push_back((before, patch));
    }

    /// The Service as the API holds it now.
    pub fn service(&self) -> Service {
        serde_json::from_value(lock(&self.state).service.clone()).expect("service")
    }
}

async fn read_request<R: tokio::io::AsyncBufRead + Unpin>(
    r: &mut R,
) -> Option<(String, String, Value)> {
    let mut line = String::new();
    if r.read_line(&mut line).await.ok()? == 0 {
        return None;
    }
    let mut parts = line.split_whitespace();
    let mut method = parts.next()?.to_string();
    let path = parts.next()?.split('?').next()?.to_string();
    let mut len = 0usize;
    loop {
        let mut h = String::new();
        r.read_line(&mut h).await.ok()?;
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':')
            && k.eq_ignore_ascii_case("content-length")
        {
            len = v.trim().parse().ok()?;
        }
        // A server-side apply (the conditions) is logged as APPLY, told apart from a merge patch.
        if let Some((k, v)) = h.split_once(':')
            && k.eq_ignore_ascii_case("content-type")
            && v.contains("apply-patch")
        {
            method = "APPLY".into();
        }
    }
    let mut buf = vec![0; len];
    r.read_exact(&mut buf).await.ok()?;
    let body = serde_json::from_slice(&buf).unwrap_or(Value::Null);
    Some((method, path, body))
}

fn handle(st: &Mutex<State>, log: &Log, method: &str, path: &str, body: &Value) -> (u16, Value) {
    if path.contains("/events") {
        let reason = body["reason"].as_str().unwrap_or("?");
        record(log, format!("api: event {reason}"));
        return (if method == "POST" { 201 } else { 200 }, body.clone());
    }
    let Some(rest) = path.strip_prefix("/api/v1/namespaces/") else {
        return status(404, "NotFound");
    };
    let short = rest.split_once('/').map(|(_, r)| r).unwrap_or(rest);
    let mut s = lock(st);
    match method {
        "GET" => {
            record(log, format!("api: GET {short}"));
            (200, s.service.clone())
        }
        "PATCH" | "APPLY" => {
            let to_status = short.ends_with("/status");
            let kind = if to_status {
                Before::StatusPatch
            } else {
                Before::Patch
            };
            if s.edits.front().is_some_and(|(b, _)| *b == kind)
                && let Some((_, edit)) = s.edits.pop_front()
            {
                merge(&mut s.service, &edit);
                s.rv += 1;
                let rv = s.rv.to_string();
                s.service["metadata"]["resourceVersion"] = json!(rv);
            }
            let sent = body["metadata"]["resourceVersion"]
                .as_str()
                .unwrap_or("")
                .to_string();
            let res = if sent != s.rv.to_string() {
                status(409, "Conflict")
            } else {
                let mut p = body.clone();
                if let Some(m) = p["metadata"].as_object_mut() {
                    m.remove("resourceVersion");
                }
                // The status subresource takes only the status; the object, all but it.
                let p = if to_status {
                    json!({"status": p["status"]})
                } else {
                    if let Some(o) = p.as_object_mut() {
                        o.remove("status");
                    }
                    p
                };
                merge(&mut s.service, &p);
                s.rv += 1;
                let rv = s.rv.to_string();
                s.service["metadata"]["resourceVersion"] = json!(rv);
                if let Some(inf) = &s.informer
                    && let Ok(svc) = serde_json::from_value::<Service>(s.service.clone())
                {
                    inf.deliver(Change::Apply(Arc::new(svc)));
                }
                (200, s.service.clone())
            };
            record(log, format!("api: {method} {short} rv={sent} -> {}", res.0));
            res
        }
        _ => status(405, "MethodNotAllowed"),
    }
}
