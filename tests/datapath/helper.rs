//! The helper processes the data-path tests start inside network namespaces: this test binary
//! run again as `ip netns exec NS <binary> helper_process --exact --ignored` with
//! `SCM_DATAPATH_HELPER` naming the role. A socket belongs to the namespace of the process that
//! opens it, so whatever must listen or connect inside a namespace runs as such a process.
//!
//! Roles (space-separated words):
//! - `http NAME PORT`: an HTTP server on every address (both families) of the namespace
//!   answering `NAME`;
//! - `relay PORT SOCKET`: accepts TCP on `127.0.0.1:PORT` and pipes each connection to the unix
//!   socket `SOCKET` (the test process relays that to the API server on the host's loopback);
//! - `resolve NAME`: the IPv4 addresses the namespace's resolver gives for `NAME`, one
//!   `DP <ip>` line each, or `DP ERR <why>`;
//! - `dns TYPE NAME SERVER`: one query of TYPE (`SRV`, `AAAA`, `CNAME`, `A`) for `NAME` over
//!   UDP to `SERVER` (`ip:port`), a `DP` line per answer of that type (SRV: `<port> <target>`),
//!   or `DP ERR <why>`;
//! - `get ADDR:PORT COUNT TIMEOUT_MS`: COUNT sequential GETs, one output line each:
//!   `DP <body>` or `DP ERR <why>`;
//! - `scrape ADDR:PORT PREFIX`: GET `/metrics`, a `DP <line>` per line starting with PREFIX,
//!   or `DP ERR <why>`.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::os::unix::net::UnixStream;
use std::time::Duration;

/// The environment variable that turns this binary into a helper.
pub const ROLE_ENV: &str = "SCM_DATAPATH_HELPER";

/// Runs the role named by `role`; `Err` says why it could not.
pub fn run(role: &str) -> Result<(), String> {
    let words: Vec<&str> = role.split_whitespace().collect();
    match words.as_slice() {
        ["http", name, port] => http(name, port),
        ["relay", port, socket] => relay(port, socket),
        ["resolve", name] => {
            match (*name, 0).to_socket_addrs() {
                Ok(addrs) => {
                    let mut ips: Vec<String> = addrs
                        .filter(|a| a.is_ipv4())
                        .map(|a| a.ip().to_string())
                        .collect();
                    ips.sort();
                    ips.dedup();
                    for ip in ips {
                        println!("DP {ip}");
                    }
                }
                Err(e) => println!("DP ERR {e}"),
            }
            Ok(())
        }
        ["dns", qtype, name, server] => {
            match query(qtype, name, server) {
                Ok(answers) => answers.iter().for_each(|a| println!("DP {a}")),
                Err(e) => println!("DP ERR {e}"),
            }
            Ok(())
        }
        ["get", addr, count, timeout_ms] => {
            let count: usize = count.parse().map_err(|e| format!("count {count}: {e}"))?;
            let ms: u64 = timeout_ms
                .parse()
                .map_err(|e| format!("timeout {timeout_ms}: {e}"))?;
            for _ in 0..count {
                match get(addr, Duration::from_millis(ms)) {
                    Ok(body) => println!("DP {body}"),
                    Err(e) => println!("DP ERR {e}"),
                }
            }
            Ok(())
        }
        ["scrape", addr, prefix] => {
            match scrape(addr, prefix) {
                Ok(lines) => lines.iter().for_each(|l| println!("DP {l}")),
                Err(e) => println!("DP ERR {e}"),
            }
            Ok(())
        }
        _ => Err(format!("unknown helper role {role:?}")),
    }
}

fn http(name: &str, port: &str) -> Result<(), String> {
    // `[::]` takes IPv4 too (net.ipv6.bindv6only is 0 in a new namespace).
    let l = TcpListener::bind(format!("[::]:{port}")).map_err(|e| format!("bind: {e}"))?;
    for conn in l.incoming() {
        let Ok(mut c) = conn else { continue };
        let name = name.to_string();
        std::thread::spawn(move || {
            let _ = c.set_read_timeout(Some(Duration::from_secs(5)));
            // Read the request head; the body (there is none for GET) is not needed.
            let mut buf = Vec::new();
            let mut chunk = [0u8; 1024];
            while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                match c.read(&mut chunk) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
            }
            let resp = format!(
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{name}",
                name.len()
            );
            let _ = c.write_all(resp.as_bytes());
        });
    }
    Ok(())
}

fn relay(port: &str, socket: &str) -> Result<(), String> {
    let l = TcpListener::bind(format!("127.0.0.1:{port}")).map_err(|e| format!("bind: {e}"))?;
    for conn in l.incoming() {
        let Ok(c) = conn else { continue };
        let Ok(u) = UnixStream::connect(socket) else {
            continue;
        };
        let (Ok(c2), Ok(u2)) = (c.try_clone(), u.try_clone()) else {
            continue;
        };
        std::thread::spawn(move || pipe(c, u));
        std::thread::spawn(move || pipe(u2, c2));
    }
    Ok(())
}

/// Copies `from` to `to` until `from` ends, then closes `to`'s write side.
fn pipe<R: Read, W: Write + ShutdownWrite>(mut from: R, mut to: W) {
    let _ = std::io::copy(&mut from, &mut to);
    to.shutdown_write();
}

trait ShutdownWrite {
    fn shutdown_write(&self);
}
impl ShutdownWrite for TcpStream {
    fn shutdown_write(&self) {
        let _ = self.shutdown(std::net::Shutdown::Write);
    }
}
impl ShutdownWrite for UnixStream {
    fn shutdown_write(&self) {
        let _ = self.shutdown(std::net::Shutdown::Write);
    }
}

fn get(addr: &str, timeout: Duration) -> Result<String, String> {
    let sa = addr
        .to_socket_addrs()
        .map_err(|e| e.to_string())?
        .next()
        .ok_or("no address")?;
    let mut s = TcpStream::connect_timeout(&sa, timeout).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    s.write_all(format!("GET / HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes())
        .map_err(|e| e.to_string())?;
    let mut out = String::new();
    s.read_to_string(&mut out).map_err(|e| e.to_string())?;
    let body = out.split("\r\n\r\n").nth(1).ok_or("no HTTP body")?;
    if body.is_empty() || body.contains(char::is_whitespace) {
        return Err(format!("unexpected body {body:?}"));
    }
    Ok(body.to_string())
}

/// The lines of `http://ADDR/metrics` that start with `prefix`.
fn scrape(addr: &str, prefix: &str) -> Result<Vec<String>, String> {
    let mut s = TcpStream::connect(addr).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    s.write_all(
        format!("GET /metrics HTTP/1.0\r\nHost: {addr}\r\nAccept: text/plain\r\n\r\n").as_bytes(),
    )
    .map_err(|e| e.to_string())?;
    let mut out = String::new();
    s.read_to_string(&mut out).map_err(|e| e.to_string())?;
    let (head, body) = out.split_once("\r\n\r\n").ok_or("no HTTP body")?;
    if !head.starts_with("HTTP/1.1 200") && !head.starts_with("HTTP/1.0 200") {
        return Err(head.lines().next().unwrap_or_default().to_string());
    }
    Ok(body
        .lines()
        .filter(|l| l.starts_with(prefix))
        .map(str::to_string)
        .collect())
}

/// One query of `qtype` (RFC 1035 wire format, recursion desired): the answers of that type,
/// SRV as `port target`, AAAA and A as addresses, CNAME as the target name.
fn query(qtype: &str, name: &str, server: &str) -> Result<Vec<String>, String> {
    let want: u16 = match qtype {
        "A" => 1,
        "CNAME" => 5,
        "AAAA" => 28,
        "SRV" => 33,
        _ => return Err(format!("query type {qtype} not supported")),
    };
    let mut q = vec![0x13, 0x37, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
    for label in name.trim_end_matches('.').split('.') {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    // The root label, then QTYPE and QCLASS IN.
    q.push(0);
    q.extend_from_slice(&want.to_be_bytes());
    q.extend_from_slice(&[0, 1]);
    let sock = std::net::UdpSocket::bind("0.0.0.0:0").map_err(|e| e.to_string())?;
    sock.set_read_timeout(Some(Duration::from_secs(2)))
        .map_err(|e| e.to_string())?;
    sock.send_to(&q, server).map_err(|e| e.to_string())?;
    let mut buf = [0u8; 1500];
    let n = sock.recv(&mut buf).map_err(|e| e.to_string())?;
    let m = &buf[..n];
    let u16_at = |i: usize| -> Result<usize, String> {
        m.get(i..i + 2)
            .map(|b| usize::from(u16::from_be_bytes([b[0], b[1]])))
            .ok_or_else(|| "short answer".to_string())
    };
    if u16_at(2)? & 0x000f != 0 {
        return Err(format!("rcode {}", u16_at(2)? & 0x000f));
    }
    let answers = u16_at(6)?;
    let mut i = q.len();
    let mut out = vec![];
    for _ in 0..answers {
        let (_, next) = read_name(m, i)?;
        let (rtype, rdlen) = (u16_at(next)?, u16_at(next + 8)?);
        let rdata = next + 10;
        let data = m.get(rdata..rdata + rdlen).ok_or("record past the end")?;
        match rtype {
            _ if usize::from(want) != rtype => {}
            33 => {
                let (target, _) = read_name(m, rdata + 6)?;
                out.push(format!("{} {target}", u16_at(rdata + 4)?));
            }
            5 => out.push(read_name(m, rdata)?.0),
            28 if rdlen == 16 => {
                let b: [u8; 16] = data.try_into().map_err(|_| "short AAAA")?;
                out.push(std::net::Ipv6Addr::from(b).to_string());
            }
            1 if rdlen == 4 => {
                out.push(std::net::Ipv4Addr::new(data[0], data[1], data[2], data[3]).to_string())
            }
            _ => {}
        }
        i = rdata + rdlen;
    }
    Ok(out)
}

/// The (possibly compressed) name at `i` and the offset after it.
fn read_name(m: &[u8], mut i: usize) -> Result<(String, usize), String> {
    let (mut labels, mut end, mut hops) = (vec![], None, 0);
    loop {
        let len = usize::from(*m.get(i).ok_or("name past the end")?);
        if len == 0 {
            return Ok((labels.join("."), end.unwrap_or(i + 1)));
        }
        if len & 0xc0 == 0xc0 {
            let lo = usize::from(*m.get(i + 1).ok_or("pointer past the end")?);
            end.get_or_insert(i + 2);
            i = ((len & 0x3f) << 8) | lo;
            hops += 1;
            if hops > 32 {
                return Err("name pointer loop".into());
            }
            continue;
        }
        let label = m.get(i + 1..i + 1 + len).ok_or("label past the end")?;
        labels.push(String::from_utf8_lossy(label).into_owned());
        i += 1 + len;
    }
}
