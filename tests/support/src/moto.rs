//! moto's AWS emulator in server mode on a free loopback port (installed by
//! `tests/moto/install.sh` into a cache outside the repo), plus a thin fault-injecting HTTP
//! layer in front of it that counts calls by operation and can script AWS's documented
//! answers moto cannot show (throttling, 5xx, a response lost after the call took effect).

use std::collections::{BTreeMap, VecDeque};
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::process::{Child, Command};

use crate::{repo_root, wait_for};

/// The region tests use.
pub const REGION: &str = "us-east-1";

/// Path of `moto_server`: `$MOTO_SERVER` if set, else `bin/moto_server` (linked by
/// `make tools`), else whatever `tests/moto/install.sh` prints (it installs on first use and is
/// fast afterwards).
pub fn moto_server_path() -> Result<PathBuf> {
    if let Ok(p) = std::env::var("MOTO_SERVER") {
        return Ok(PathBuf::from(p));
    }
    let linked = repo_root().join("bin/moto_server");
    if linked.exists() {
        return Ok(linked);
    }
    let script = repo_root().join("tests/moto/install.sh");
    let out = std::process::Command::new("bash")
        .arg(&script)
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("running {}", script.display()))?;
    if !out.status.success() {
        bail!("{} failed", script.display());
    }
    let path = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if path.is_empty() {
        bail!("{} printed no path", script.display());
    }
    Ok(PathBuf::from(path))
}

async fn free_port() -> Result<u16> {
    let l = TcpListener::bind("127.0.0.1:0").await?;
    Ok(l.local_addr()?.port())
}

/// A raw HTTP/1.1 exchange (`Connection: close`); returns (status, body).
pub async fn http(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Result<(u16, Vec<u8>)> {
    let mut s = TcpStream::connect(addr).await?;
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).await?;
    s.write_all(body).await?;
    let mut buf = vec![];
    s.read_to_end(&mut buf).await?;
    let split = find(&buf, b"\r\n\r\n").ok_or_else(|| anyhow!("malformed HTTP response"))?;
    let head = String::from_utf8_lossy(&buf[..split]).to_string();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| anyhow!("no status in {head:?}"))?;
    let mut body = buf[split + 4..].to_vec();
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        body = dechunk(&body);
    }
    Ok((status, body))
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = vec![];
    while let Some(i) = find(b, b"\r\n") {
        let n = usize::from_str_radix(String::from_utf8_lossy(&b[..i]).trim(), 16).unwrap_or(0);
        if n == 0 || b.len() < i + 2 + n {
            break;
        }
        out.extend_from_slice(&b[i + 2..i + 2 + n]);
        b = &b[(i + 4 + n).min(b.len())..];
    }
    out
}

/// A running moto server; killed when dropped.
pub struct Moto {
    /// `127.0.0.1:<port>`.
    pub addr: String,
    /// `http://127.0.0.1:<port>`.
    pub endpoint: String,
    _child: Child,
}

impl Moto {
    /// Starts moto on a free loopback port and waits until it answers.
    pub async fn start() -> Result<Moto> {
        let bin = moto_server_path()?;
        let mut last = anyhow!("moto did not start");
        for _ in 0..3 {
            let port = free_port().await?;
            let mut cmd = Command::new(&bin);
            cmd.args(["-H", "127.0.0.1", "-p", &port.to_string()])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .kill_on_drop(true);
            let child = cmd
                .spawn()
                .with_context(|| format!("starting {}", bin.display()))?;
            let addr = format!("127.0.0.1:{port}");
            let a2 = addr.clone();
            let up = wait_for("moto to answer", Duration::from_secs(60), || {
                let a = a2.clone();
                async move {
                    http(&a, "GET", "/moto-api/data.json", &[], b"")
                        .await
                        .ok()
                        .filter(|(s, _)| *s == 200)
                }
            })
            .await;
            match up {
                Ok(_) => {
                    return Ok(Moto {
                        endpoint: format!("http://{addr}"),
                        addr,
                        _child: child,
                    });
                }
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    /// Clears all emulated state.
    pub async fn reset(&self) -> Result<()> {
        let (s, _) = http(&self.addr, "POST", "/moto-api/reset", &[], b"").await?;
        if s != 200 {
            bail!("moto reset answered {s}");
        }
        Ok(())
    }

    /// An EC2 Query API call (moto does not check signatures; the region comes from the
    /// credential scope). Returns the XML body.
    pub async fn ec2(&self, action: &str, params: &[(&str, &str)]) -> Result<String> {
        let mut body = format!("Action={action}&Version=2016-11-15");
        for (k, v) in params {
            body.push_str(&format!("&{k}={v}"));
        }
        let auth = format!(
            "AWS4-HMAC-SHA256 Credential=test/20260101/{REGION}/ec2/aws4_request, SignedHeaders=host, Signature=0"
        );
        let (s, b) = http(
            &self.addr,
            "POST",
            "/",
            &[
                ("Content-Type", "application/x-www-form-urlencoded"),
                ("Authorization", &auth),
            ],
            body.as_bytes(),
        )
        .await?;
        let text = String::from_utf8_lossy(&b).to_string();
        if s != 200 {
            bail!("EC2 {action} answered {s}: {text}");
        }
        Ok(text)
    }

    /// IDs of the region's default subnets (moto creates a default VPC with one per zone).
    pub async fn default_subnets(&self) -> Result<Vec<String>> {
        let xml = self.ec2("DescribeSubnets", &[]).await?;
        let ids = tag_values(&xml, "subnetId");
        if ids.is_empty() {
            bail!("no subnets in moto: {xml}");
        }
        Ok(ids)
    }
}

/// Every `<tag>value</tag>` in `xml`, in order.
pub fn tag_values(xml: &str, tag: &str) -> Vec<String> {
    let open = format!("<{tag}>");
    let close = format!("</{tag}>");
    let mut out = vec![];
    let mut rest = xml;
    while let Some(i) = rest.find(&open) {
        rest = &rest[i + open.len()..];
        let Some(j) = rest.find(&close) else { break };
        out.push(rest[..j].to_string());
        rest = &rest[j + close.len()..];
    }
    out
}

/// What a scripted fault does.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FaultKind {
    /// Answer with this HTTP status and AWS error code without reaching moto.
    Error {
        /// HTTP status (400 for throttling, 5xx for server errors).
        status: u16,
        /// AWS error code, e.g. `Throttling` or `ServiceUnavailable`.
        code: String,
    },
    /// Forward to moto (the call takes effect) and never answer, as a crash or a lost
    /// response would leave it.
    ForwardThenHang,
}

/// A fault applied to the next `times` calls of `action` (any action if `None`).
#[derive(Clone, Debug)]
pub struct Fault {
    /// Operation name (the Query API's `Action`), or every operation.
    pub action: Option<String>,
    /// What to do.
    pub kind: FaultKind,
    /// How many calls it applies to.
    pub times: u32,
}

impl Fault {
    /// AWS's throttling answer (`Throttling: Rate exceeded`, HTTP 400) `times` times.
    pub fn throttle(action: Option<&str>, times: u32) -> Fault {
        Fault {
            action: action.map(str::to_string),
            kind: FaultKind::Error {
                status: 400,
                code: "Throttling".into(),
            },
            times,
        }
    }

    /// An AWS error answer with this status and code `times` times (e.g. 400
    /// `ResourceInUse`, `TooManyTargetGroups`, `OperationNotPermitted`).
    pub fn code(action: Option<&str>, status: u16, code: &str, times: u32) -> Fault {
        Fault {
            action: action.map(str::to_string),
            kind: FaultKind::Error {
                status,
                code: code.into(),
            },
            times,
        }
    }

    /// An HTTP 503 `ServiceUnavailable` `times` times.
    pub fn unavailable(action: Option<&str>, times: u32) -> Fault {
        Fault {
            action: action.map(str::to_string),
            kind: FaultKind::Error {
                status: 503,
                code: "ServiceUnavailable".into(),
            },
            times,
        }
    }
}

#[derive(Default)]
struct ProxyState {
    counts: BTreeMap<String, u64>,
    faults: VecDeque<Fault>,
    injected: u64,
    /// Share of calls (0-100) throttled when no scripted fault answers them.
    throttle_percent: u64,
    /// Calls the share has been taken of.
    throttle_seen: u64,
}

/// The fault-injecting, call-counting layer in front of moto.
pub struct FaultProxy {
    /// `http://127.0.0.1:<port>` to point the SDK at.
    pub endpoint: String,
    state: Arc<Mutex<ProxyState>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Operations that change state (for "no mutating call at steady state" checks).
pub fn is_mutating(action: &str) -> bool {
    !(action.starts_with("Describe") || action.starts_with("Get") || action.starts_with("List"))
}

impl FaultProxy {
    /// Starts the layer in front of `upstream` (`127.0.0.1:<port>`).
    pub async fn start(upstream: &str) -> Result<FaultProxy> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let endpoint = format!("http://{}", listener.local_addr()?);
        let state = Arc::new(Mutex::new(ProxyState::default()));
        let st = state.clone();
        let upstream = upstream.to_string();
        let task = tokio::spawn(async move {
            while let Ok((conn, _)) = listener.accept().await {
                let st = st.clone();
                let up = upstream.clone();
                tokio::spawn(async move {
                    let _ = serve(conn, &up, st).await;
                });
            }
        });
        Ok(FaultProxy {
            endpoint,
            state,
            task,
        })
    }

    /// Queues a fault.
    pub fn inject(&self, f: Fault) {
        self.lock().faults.push_back(f);
    }

    /// Drops every queued fault.
    pub fn clear_faults(&self) {
        self.lock().faults.clear();
    }

    /// Throttles `percent` of the calls (0-100; 0 turns it off) that no scripted fault answers,
    /// spread evenly and deterministically (call n is throttled when the running share of
    /// throttled calls would otherwise fall behind), as a cloud API under load does.
    pub fn throttle_percent(&self, percent: u64) {
        let mut g = self.lock();
        g.throttle_percent = percent.min(100);
        g.throttle_seen = 0;
    }

    /// Calls seen so far by operation (including faulted ones).
    pub fn counts(&self) -> BTreeMap<String, u64> {
        self.lock().counts.clone()
    }

    /// How many calls got a scripted answer.
    pub fn injected(&self) -> u64 {
        self.lock().injected
    }

    /// Forgets the counts.
    pub fn reset_counts(&self) {
        self.lock().counts.clear();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ProxyState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Whether a Query API request is EC2's (its API version), not ELBv2's.
fn is_ec2(body: &[u8]) -> bool {
    String::from_utf8_lossy(body)
        .split('&')
        .any(|kv| kv == "Version=2016-11-15")
}

/// The error body each API really sends: EC2's `<Response><Errors>` (a throttle there is
/// `RequestLimitExceeded`, HTTP 503) or ELBv2's `<ErrorResponse>` (`Throttling`, HTTP 400).
/// An SDK given the other API's shape finds no error code in it, so the fault would reach the
/// controller as an unknown error instead of the one a real cloud sends.
fn error_response(ec2: bool, status: u16, code: &str) -> (u16, String) {
    let throttle = code == "Throttling";
    if ec2 {
        let (status, code, msg) = if throttle {
            (503, "RequestLimitExceeded", "Request limit exceeded.")
        } else {
            (status, code, "Service unavailable (injected)")
        };
        let xml = format!(
            "<Response><Errors><Error><Code>{code}</Code><Message>{msg}</Message></Error></Errors><RequestID>injected</RequestID></Response>"
        );
        return (status, xml);
    }
    let kind = if status >= 500 { "Receiver" } else { "Sender" };
    let msg = if throttle {
        "Rate exceeded"
    } else {
        "Service unavailable (injected)"
    };
    (
        status,
        format!(
            "<ErrorResponse xmlns=\"http://elasticloadbalancing.amazonaws.com/doc/2015-12-01/\"><Error><Type>{kind}</Type><Code>{code}</Code><Message>{msg}</Message></Error><RequestId>injected</RequestId></ErrorResponse>"
        ),
    )
}

fn action_of(body: &[u8]) -> String {
    String::from_utf8_lossy(body)
        .split('&')
        .find_map(|kv| kv.strip_prefix("Action="))
        .unwrap_or("?")
        .to_string()
}

async fn serve(conn: TcpStream, upstream: &str, st: Arc<Mutex<ProxyState>>) -> Result<()> {
    let mut r = BufReader::new(conn);
    // One request per connection: we answer `Connection: close`, the SDK reconnects.
    let mut head = String::new();
    loop {
        let mut line = String::new();
        if r.read_line(&mut line).await? == 0 {
            return Ok(());
        }
        let end = line == "\r\n";
        head.push_str(&line);
        if end {
            break;
        }
    }
    let len: usize = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().ok())?
        })
        .unwrap_or(0);
    let mut body = vec![0u8; len];
    r.read_exact(&mut body).await?;
    let action = action_of(&body);
    let fault = {
        let mut g = st.lock().unwrap_or_else(|e| e.into_inner());
        *g.counts.entry(action.clone()).or_default() += 1;
        let idx = g
            .faults
            .iter()
            .position(|f| f.times > 0 && f.action.as_deref().is_none_or(|a| a == action));
        let kind = idx.and_then(|i| {
            let f = g.faults.get_mut(i)?;
            f.times -= 1;
            Some(f.kind.clone())
        });
        g.faults.retain(|f| f.times > 0);
        let kind = kind.or_else(|| {
            let (p, n) = (g.throttle_percent, g.throttle_seen);
            g.throttle_seen += 1;
            // Throttle call n when floor((n+1)p/100) passes floor(np/100): exactly p%.
            ((n + 1) * p / 100 > n * p / 100).then(|| FaultKind::Error {
                status: 400,
                code: "Throttling".into(),
            })
        });
        if kind.is_some() {
            g.injected += 1;
        }
        kind
    };
    let mut conn = r.into_inner();
    if let Some(FaultKind::Error { status, code }) = &fault {
        let (status, xml) = error_response(is_ec2(&body), *status, code);
        let resp = format!(
            "HTTP/1.1 {status} Injected\r\nContent-Type: text/xml\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{xml}",
            xml.len()
        );
        conn.write_all(resp.as_bytes()).await?;
        return Ok(());
    }
    // Forward with the original headers, except that the upstream connection closes after.
    let mut lines = head.lines();
    let request_line = lines.next().unwrap_or("");
    let mut out = format!("{request_line}\r\n");
    for l in lines {
        if l.is_empty() || l.to_ascii_lowercase().starts_with("connection:") {
            continue;
        }
        out.push_str(l);
        out.push_str("\r\n");
    }
    out.push_str("Connection: close\r\n\r\n");
    let mut up = TcpStream::connect(upstream).await?;
    up.write_all(out.as_bytes()).await?;
    up.write_all(&body).await?;
    let mut resp = vec![];
    up.read_to_end(&mut resp).await?;
    if fault == Some(FaultKind::ForwardThenHang) {
        // Hold the client's connection open and silent until it gives up.
        let mut sink = [0u8; 1];
        let _ = conn.read(&mut sink).await;
        return Ok(());
    }
    // Tell the client this connection ends here, so it never reuses it for a second request.
    if let Some(split) = find(&resp, b"\r\n\r\n") {
        let head = String::from_utf8_lossy(&resp[..split]).to_string();
        let mut h = String::new();
        for l in head.split("\r\n") {
            if l.to_ascii_lowercase().starts_with("connection:") {
                continue;
            }
            h.push_str(l);
            h.push_str("\r\n");
        }
        h.push_str("Connection: close\r\n\r\n");
        conn.write_all(h.as_bytes()).await?;
        conn.write_all(&resp[split + 4..]).await?;
    } else {
        conn.write_all(&resp).await?;
    }
    Ok(())
}
