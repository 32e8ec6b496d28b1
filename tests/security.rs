//! The attack battery (issue 10, SECURITY.md): raw-socket request-smuggling and parsing
//! probes against a running `rampart proxy` in front of a recording upstream that parses
//! strictly and logs every request it is sent. Each probe must be refused (400, 414,
//! 431, 501, 505 or a closed connection) with nothing forwarded, or — where the RFC
//! allows a lenient reading — forwarded as exactly one unambiguous request. Never two
//! requests upstream, never the smuggled one. The battery's table is written to
//! `target/security-battery.md` (copied into SECURITY.md).
#![allow(missing_docs, clippy::unwrap_used)]

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::h2::{
    frame, next_frame, CONTINUATION, DATA, END_HEADERS, END_STREAM, GOAWAY, HEADERS, PING,
    RST_STREAM, SETTINGS,
};
use common::Proxy;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// One request as the upstream read it.
#[derive(Debug, Clone)]
struct Seen {
    path: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

/// An upstream that parses what it is sent strictly (httparse, then Content-Length or
/// chunked framing) and records every request; what it cannot parse is recorded too.
struct Recorder {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    /// The path of every request head, recorded as soon as the head is complete (a head
    /// forwarded with a pending or cut body shows here, not in `seen`).
    heads: Arc<Mutex<Vec<String>>>,
    garbage: Arc<Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Recorder {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Recorder {
    async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let heads = Arc::new(Mutex::new(Vec::new()));
        let garbage = Arc::new(Mutex::new(Vec::new()));
        let (s, h, g) = (seen.clone(), heads.clone(), garbage.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((conn, _)) = listener.accept().await else {
                    return;
                };
                let (s, h, g) = (s.clone(), h.clone(), g.clone());
                tokio::spawn(async move {
                    if let Err(e) = serve(conn, &s, &h).await {
                        g.lock().unwrap().push(e);
                    }
                });
            }
        });
        Self {
            addr,
            seen,
            heads,
            garbage,
            task,
        }
    }

    /// The heads whose path starts with `prefix`, complete bodies or not.
    fn heads(&self, prefix: &str) -> usize {
        self.heads
            .lock()
            .unwrap()
            .iter()
            .filter(|p| p.starts_with(prefix))
            .count()
    }

    /// The requests whose path starts with `prefix`.
    fn requests(&self, prefix: &str) -> Vec<Seen> {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .filter(|s| s.path.starts_with(prefix))
            .cloned()
            .collect()
    }
}

/// Serves one upstream connection; `Err` names what could not be parsed.
async fn serve(
    mut conn: TcpStream,
    seen: &Mutex<Vec<Seen>>,
    heads: &Mutex<Vec<String>>,
) -> Result<(), String> {
    let mut buf = Vec::new();
    loop {
        // Headers.
        let (head_len, path, headers) = loop {
            let mut slots = [httparse::EMPTY_HEADER; 128];
            let mut req = httparse::Request::new(&mut slots);
            match req.parse(&buf) {
                Ok(httparse::Status::Complete(n)) => {
                    let headers: Vec<(String, String)> = req
                        .headers
                        .iter()
                        .map(|h| {
                            (
                                h.name.to_ascii_lowercase(),
                                String::from_utf8_lossy(h.value).to_string(),
                            )
                        })
                        .collect();
                    break (n, req.path.unwrap_or_default().to_string(), headers);
                }
                Ok(httparse::Status::Partial) => {}
                Err(e) => return Err(format!("unparseable request head: {e}")),
            }
            if read_more(&mut conn, &mut buf).await == 0 {
                return Ok(());
            }
        };
        buf.drain(..head_len);
        heads.lock().unwrap().push(path.clone());
        let get = |name: &str| {
            headers
                .iter()
                .filter(|(n, _)| n == name)
                .map(|(_, v)| v.clone())
                .collect::<Vec<_>>()
        };
        let (te, cl) = (get("transfer-encoding"), get("content-length"));
        if !te.is_empty() && !cl.is_empty() {
            return Err(format!("{path}: both Transfer-Encoding and Content-Length"));
        }
        if cl.len() > 1 || te.len() > 1 {
            return Err(format!("{path}: repeated framing headers {cl:?} {te:?}"));
        }
        let body = if let Some(te) = te.first() {
            if te != "chunked" {
                return Err(format!("{path}: Transfer-Encoding {te:?}"));
            }
            let mut body = Vec::new();
            loop {
                let line_end = loop {
                    if let Some(i) = buf.windows(2).position(|w| w == b"\r\n") {
                        break i;
                    }
                    if read_more(&mut conn, &mut buf).await == 0 {
                        return Err(format!("{path}: chunked body cut"));
                    }
                };
                let line = String::from_utf8_lossy(&buf[..line_end]).to_string();
                let size = usize::from_str_radix(line.split(';').next().unwrap().trim(), 16)
                    .map_err(|_| format!("{path}: chunk size {line:?}"))?;
                buf.drain(..line_end + 2);
                while buf.len() < size + 2 {
                    if read_more(&mut conn, &mut buf).await == 0 {
                        return Err(format!("{path}: chunk cut"));
                    }
                }
                if &buf[size..size + 2] != b"\r\n" {
                    return Err(format!("{path}: chunk not followed by CRLF"));
                }
                body.extend_from_slice(&buf[..size]);
                buf.drain(..size + 2);
                if size == 0 {
                    break body;
                }
            }
        } else if let Some(cl) = cl.first() {
            let n: usize = cl
                .parse()
                .map_err(|_| format!("{path}: Content-Length {cl:?}"))?;
            while buf.len() < n {
                if read_more(&mut conn, &mut buf).await == 0 {
                    return Err(format!("{path}: body cut"));
                }
            }
            buf.drain(..n).collect()
        } else {
            Vec::new()
        };
        seen.lock().unwrap().push(Seen {
            path,
            headers,
            body,
        });
        conn.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            .await
            .map_err(|e| e.to_string())?;
    }
}

async fn read_more(conn: &mut TcpStream, buf: &mut Vec<u8>) -> usize {
    let mut chunk = [0u8; 16384];
    let n = conn.read(&mut chunk).await.unwrap_or(0);
    buf.extend_from_slice(&chunk[..n]);
    n
}

/// What a probe may get; a refusal is asserted with its exact status.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Want {
    /// This error status; nothing upstream.
    Refused(u16),
    /// Exactly one request upstream, answered 200 (a control, or a lenient reading
    /// the RFC allows).
    One,
    /// Either of the above.
    RefusedOrOne(u16),
    /// Refused with this status after the head went upstream with a body that is then
    /// cut (the proxy streams a chunked body and finds it malformed part-way): the
    /// upstream never gets a complete request, let alone a second one. Or refused.
    RefusedOrCut(u16),
}

/// What a probe got.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Got {
    /// Answered this error status, nothing upstream.
    Refused(u16),
    /// Answered this error status after a head went upstream whose body was cut.
    Cut(u16),
    /// One clean request upstream, answered 200.
    One,
}

impl Want {
    fn admits(self, got: Option<Got>) -> bool {
        match (self, got) {
            (Want::One | Want::RefusedOrOne(_), Some(Got::One)) => true,
            (
                Want::Refused(w) | Want::RefusedOrOne(w) | Want::RefusedOrCut(w),
                Some(Got::Refused(s)),
            )
            | (Want::RefusedOrCut(w), Some(Got::Cut(s))) => s == w,
            _ => false,
        }
    }
}

/// What a probe got: the status codes of every response read, and whether the proxy
/// hung (no answer at all and the connection still open after 3 s of silence).
struct Sent {
    statuses: Vec<u16>,
    hung: bool,
}

/// Sends `request` on a fresh connection and reads until the proxy closes or goes quiet
/// for 3 s (`statuses` empty and not `hung`: closed with no answer).
async fn send(addr: SocketAddr, request: &[u8]) -> Sent {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let _ = s.write_all(request).await;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    let mut closed = false;
    loop {
        match tokio::time::timeout(Duration::from_secs(3), s.read(&mut chunk)).await {
            Ok(Ok(n)) if n > 0 => buf.extend_from_slice(&chunk[..n]),
            Ok(_) => {
                closed = true;
                break;
            }
            Err(_) => break,
        }
    }
    let statuses = statuses(&buf);
    Sent {
        hung: statuses.is_empty() && !closed,
        statuses,
    }
}

/// The status codes of the HTTP/1 responses in `buf`.
fn statuses(buf: &[u8]) -> Vec<u16> {
    let text = String::from_utf8_lossy(buf);
    text.match_indices("HTTP/1.")
        .filter_map(|(i, _)| {
            let rest = &text[i..];
            let status = rest.split(' ').nth(1)?;
            // A status line, not "HTTP/1.1" in a body.
            (i == 0 || text[..i].ends_with('\n'))
                .then(|| status.parse().ok())
                .flatten()
        })
        .collect()
}

/// The probes: (name, request, what it may get). `{P}` is replaced by the probe's own
/// path prefix, so the recorder attributes what reaches it; a smuggled request asks for
/// `{P}-smuggled`.
fn probes() -> Vec<(&'static str, String, Want)> {
    use Want::{One, Refused, RefusedOrCut, RefusedOrOne};
    // Every refusal is a 400, except header limits (431).
    let big = "a".repeat(70_000);
    let many: String = (0..200).map(|i| format!("X-H{i}: v\r\n")).collect();
    vec![
        ("control: one GET", "GET {P} HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n".into(), One),
        ("control: chunked POST", "POST {P} HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n5\r\nhello\r\n0\r\n\r\n".into(), One),
        ("CL.TE: Content-Length and Transfer-Encoding", "POST {P} HTTP/1.1\r\nHost: a\r\nContent-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET {P}-smuggled HTTP/1.1\r\nHost: a\r\n\r\n".into(), Refused(400)),
        ("TE.CL: Transfer-Encoding then Content-Length", "POST {P} HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n5c\r\nGET {P}-smuggled HTTP/1.1\r\nHost: a\r\n\r\n0\r\n\r\n".into(), Refused(400)),
        ("conflicting Content-Length", "POST {P} HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 40\r\n\r\nhelloGET {P}-smuggled HTTP/1.1\r\nHost: a\r\n\r\n".into(), Refused(400)),
        ("Content-Length list \"5, 40\"", "POST {P} HTTP/1.1\r\nHost: a\r\nContent-Length: 5, 40\r\n\r\nhello".into(), Refused(400)),
        ("duplicate identical Content-Length", "POST {P} HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello".into(), RefusedOrOne(400)),
        ("Content-Length list \"5, 5\"", "POST {P} HTTP/1.1\r\nHost: a\r\nContent-Length: 5, 5\r\nConnection: close\r\n\r\nhello".into(), RefusedOrOne(400)),
        ("Content-Length \"+5\"", "POST {P} HTTP/1.1\r\nHost: a\r\nContent-Length: +5\r\n\r\nhello".into(), Refused(400)),
        ("Content-Length \"-1\"", "POST {P} HTTP/1.1\r\nHost: a\r\nContent-Length: -1\r\n\r\n".into(), Refused(400)),
        ("Content-Length overflow", "POST {P} HTTP/1.1\r\nHost: a\r\nContent-Length: 99999999999999999999999\r\n\r\n".into(), Refused(400)),
        ("Transfer-Encoding: xchunked", "POST {P} HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: xchunked\r\n\r\n0\r\n\r\nGET {P}-smuggled HTTP/1.1\r\nHost: a\r\n\r\n".into(), Refused(400)),
        ("Transfer-Encoding: chunked, identity", "POST {P} HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n".into(), Refused(400)),
        ("Transfer-Encoding: identity, chunked", "POST {P} HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: identity, chunked\r\nConnection: close\r\n\r\n0\r\n\r\n".into(), RefusedOrOne(400)),
        ("two Transfer-Encoding headers", "POST {P} HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n\r\n0\r\n\r\n".into(), Refused(400)),
        ("space before the colon", "POST {P} HTTP/1.1\r\nHost: a\r\nTransfer-Encoding : chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n".into(), Refused(400)),
        ("Transfer-Encoding with a tab (valid OWS)", "POST {P} HTTP/1.1\r\nHost: a\r\nTransfer-Encoding:\tchunked\r\nConnection: close\r\n\r\n0\r\n\r\n".into(), RefusedOrOne(400)),
        ("Transfer-Encoding: CHUNKED (case)", "POST {P} HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: CHUNKED\r\nConnection: close\r\n\r\n0\r\n\r\n".into(), RefusedOrOne(400)),
        ("Transfer-Encoding: \\x0bchunked (vertical tab)", "POST {P} HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: \x0bchunked\r\n\r\n0\r\n\r\n".into(), Refused(400)),
        ("obsolete line folding of Transfer-Encoding", "POST {P} HTTP/1.1\r\nHost: a\r\nX-Fold: a\r\n Transfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n0\r\n\r\n".into(), Refused(400)),
        ("invalid chunk size", "POST {P} HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\nGET {P}-smuggled HTTP/1.1\r\nHost: a\r\n\r\n".into(), RefusedOrCut(400)),
        ("chunk size overflow", "POST {P} HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nffffffffffffffffff1\r\nhello\r\n0\r\n\r\n".into(), RefusedOrCut(400)),
        ("chunk size with a NUL", "POST {P} HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5\x00\r\nhello\r\n0\r\n\r\n".into(), RefusedOrCut(400)),
        ("chunk extension (valid)", "POST {P} HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n5;name=value\r\nhello\r\n0\r\n\r\n".into(), RefusedOrOne(400)),
        ("chunk data longer than its size", "POST {P} HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nhelloGET {P}-smuggled HTTP/1.1\r\nHost: a\r\n\r\n0\r\n\r\n".into(), RefusedOrCut(400)),
        ("bare LF line endings", "GET {P} HTTP/1.1\nHost: a\nConnection: close\n\n".into(), RefusedOrOne(400)),
        ("bare CR in a header", "GET {P} HTTP/1.1\r\nHost: a\r\nX-A: b\rX-B: c\r\n\r\n".into(), Refused(400)),
        ("NUL in a header value", "GET {P} HTTP/1.1\r\nHost: a\r\nX-A: b\x00c\r\n\r\n".into(), Refused(400)),
        ("control byte in a header name", "GET {P} HTTP/1.1\r\nHost: a\r\nX\x01A: b\r\n\r\n".into(), Refused(400)),
        ("space in a header name", "GET {P} HTTP/1.1\r\nHost: a\r\nX A: b\r\n\r\n".into(), Refused(400)),
        ("obsolete line folding", "GET {P} HTTP/1.1\r\nHost: a\r\nX-A: b\r\n c\r\nConnection: close\r\n\r\n".into(), RefusedOrOne(400)),
        ("absolute-form URI, another Host", "GET http://other.test{P} HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n".into(), RefusedOrOne(400)),
        ("HTTP/1.1 without Host", "GET {P} HTTP/1.1\r\nConnection: close\r\n\r\n".into(), Refused(400)),
        ("two Host headers", "GET {P} HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n".into(), Refused(400)),
        ("HTTP/1.0 without Host", "GET {P} HTTP/1.0\r\n\r\n".into(), RefusedOrOne(400)),
        ("HTTP/1.0 with Transfer-Encoding", "POST {P} HTTP/1.0\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n".into(), RefusedOrOne(400)),
        ("HTTP/2.0 on an HTTP/1 connection", "GET {P} HTTP/2.0\r\nHost: a\r\n\r\n".into(), Refused(400)),
        ("HTTP/1.1 with a junk version", "GET {P} HTTP/1.x\r\nHost: a\r\n\r\n".into(), Refused(400)),
        // Pingora percent-encodes what httparse refuses in the target (as Cloudflare
        // does): the upstream gets one request for `/pNN%20x`, never two parts.
        ("space in the request target", "GET {P} x HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n".into(), RefusedOrOne(400)),
        ("overlong request line (70 kB)", format!("GET {{P}}?{big} HTTP/1.1\r\nHost: a\r\n\r\n"), Refused(400)),
        ("oversized header (70 kB)", format!("GET {{P}} HTTP/1.1\r\nHost: a\r\nX-Big: {big}\r\n\r\n"), Refused(431)),
        ("too many headers (200)", format!("GET {{P}} HTTP/1.1\r\nHost: a\r\n{many}\r\n"), Refused(431)),
        ("Connection: close, keep-alive then a second request", "GET {P} HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\nGET {P}-smuggled HTTP/1.1\r\nHost: a\r\n\r\n".into(), One),
        ("hop-by-hop via Connection: Transfer-Encoding", "POST {P} HTTP/1.1\r\nHost: a\r\nConnection: Transfer-Encoding, close\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n".into(), RefusedOrOne(400)),
    ]
}

/// The body a probe's one forwarded request must carry: "hello" when the probe sends
/// it, else nothing.
fn expected_body(request: &str) -> &'static [u8] {
    let body = request.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    if body.contains("hello") {
        b"hello"
    } else {
        b""
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smuggling_and_parsing_probes_are_refused_or_forwarded_as_one_clean_request() {
    common::init();
    let recorder = Recorder::start().await;
    let body = format!(
        "[[routes]]\nname = \"all\"\naction = {{ forward = \"p\" }}\n\n[pools.p]\nendpoints = [{{ address = \"{}\" }}]\n",
        recorder.addr
    );
    // Every probe through the fast paths and through Pingora's path.
    let fast = Proxy::start(&body).await;
    let full = Proxy::start_with("http1_fast_path = false", &body).await;
    let probes = probes();
    let mut table = String::from(
        "| probe | path | Rampart answered | requests upstream | verdict |\n|---|---|---|---|---|\n",
    );
    let mut failures = Vec::new();
    let mut verdicts: BTreeMap<&str, usize> = BTreeMap::new();
    for (path_name, proxy) in [("fast", &fast), ("full", &full)] {
        let results = futures_util::future::join_all(probes.iter().enumerate().map(
            |(i, (_, request, _))| {
                let request = request.replace("{P}", &format!("/{path_name}{i:02}"));
                async move { send(proxy.http, request.as_bytes()).await }
            },
        ))
        .await;
        for (i, ((name, request, want), sent)) in probes.iter().zip(&results).enumerate() {
            let prefix = format!("/{path_name}{i:02}");
            let upstream = recorder.requests(&prefix);
            // Heads as they arrived: one forwarded with a pending or cut body counts.
            let heads = recorder.heads(&prefix);
            let smuggled = upstream.iter().any(|s| s.path.contains("-smuggled"));
            let statuses = &sent.statuses;
            // A hang or a connection closed without an answer is never a refusal.
            let refused = statuses
                .first()
                .copied()
                .filter(|s| *s >= 400 && !sent.hung);
            let clean_body = upstream
                .first()
                .is_some_and(|s| s.body == expected_body(request));
            let got = match (refused, heads, statuses.first()) {
                (Some(s), 0, _) => Some(Got::Refused(s)),
                (Some(s), 1, _) if upstream.is_empty() => Some(Got::Cut(s)),
                (None, 1, Some(200)) if !smuggled && upstream.len() == 1 && clean_body => {
                    Some(Got::One)
                }
                _ => None,
            };
            let ok = want.admits(got);
            if !ok {
                failures.push(format!(
                    "{name} ({path_name} path): wanted {want:?}, answered {statuses:?}{}, {heads} head(s) upstream, complete: {:?}",
                    if sent.hung { " (hung)" } else { "" },
                    upstream
                        .iter()
                        .map(|s| (&s.path, &s.headers, String::from_utf8_lossy(&s.body)))
                        .collect::<Vec<_>>()
                ));
            }
            let answer = match (statuses.as_slice(), sent.hung) {
                (_, true) => "hung".to_string(),
                ([], false) => "connection closed".to_string(),
                (s, false) => s.iter().map(u16::to_string).collect::<Vec<_>>().join(", "),
            };
            let verdict = match got {
                _ if !ok => "**FAIL**",
                Some(Got::Refused(_)) => "refused",
                Some(Got::Cut(_)) => "refused, upstream request cut",
                _ => "one clean request",
            };
            *verdicts.entry(verdict).or_default() += 1;
            table.push_str(&format!(
                "| {} | {path_name} | {answer} | {heads} |  {verdict} |\n",
                name.replace('|', "\\|"),
            ));
        }
    }
    // A body the proxy streams and then finds malformed is cut short upstream: the
    // upstream sees an aborted request, never a second one. Anything else it could not
    // parse was forwarded ambiguously.
    let garbage: Vec<String> = recorder
        .garbage
        .lock()
        .unwrap()
        .iter()
        .filter(|e| !e.ends_with("body cut") && !e.ends_with("chunk cut"))
        .cloned()
        .collect();
    eprintln!("{table}\n{verdicts:?}");
    let out = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/security-battery.md");
    let _ = std::fs::write(&out, &table);
    assert!(
        failures.is_empty() && garbage.is_empty(),
        "{}\nthe upstream was sent what it could not parse: {garbage:?}",
        failures.join("\n")
    );
}

/// A route's rate limit answers 429 with Retry-After per client address; other clients
/// and other routes are not affected; a reload with the same limit keeps the buckets.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limits_answer_429_per_client_and_survive_reloads() {
    common::init();
    let backend = common::Backend::start("b").await;
    let body = format!(
        "[[routes]]\nname = \"api\"\npath_prefix = \"/api\"\nrate_limit = {{ requests = 5, per = \"1m\" }}\naction = {{ forward = \"p\" }}\n\n[[routes]]\nname = \"free\"\naction = {{ forward = \"p\" }}\n\n{}",
        common::pool_toml("p", "round_robin", &[&backend], "")
    );
    let proxy = Proxy::start(&body).await;
    let from = |ip: [u8; 4]| {
        reqwest::Client::builder()
            .local_address(std::net::IpAddr::from(ip))
            .build()
            .unwrap()
    };
    let (one, two) = (from([127, 0, 0, 1]), from([127, 0, 0, 2]));
    let mut statuses = Vec::new();
    let mut retry_after = None;
    for _ in 0..8 {
        let r = one.get(proxy.url("/api/x")).send().await.unwrap();
        statuses.push(r.status().as_u16());
        if r.status() == 429 {
            retry_after = r
                .headers()
                .get("retry-after")
                .map(|v| v.to_str().unwrap().to_string());
        }
    }
    assert_eq!(statuses, [200, 200, 200, 200, 200, 429, 429, 429]);
    // One token per 12 s.
    let retry: u64 = retry_after.unwrap().parse().unwrap();
    assert!((1..=12).contains(&retry), "{retry}");
    assert_eq!(
        two.get(proxy.url("/api/x")).send().await.unwrap().status(),
        200
    );
    assert_eq!(
        one.get(proxy.url("/other")).send().await.unwrap().status(),
        200
    );
    assert_eq!(
        proxy
            .metric("rampart_rate_limited_requests_total{route=\"api\"}")
            .await,
        3.0
    );
    // The same limit after a reload: the bucket is still empty.
    proxy.reload(&format!("{body}\n# reloaded\n")).await;
    assert_eq!(
        one.get(proxy.url("/api/x")).send().await.unwrap().status(),
        429
    );
    // A new limit starts new buckets.
    proxy
        .reload(&body.replace("requests = 5,", "requests = 6,"))
        .await;
    assert_eq!(
        one.get(proxy.url("/api/x")).send().await.unwrap().status(),
        200
    );
}

/// `limits.max_connections_per_ip`: one address's extra connections are closed at once
/// while other addresses are served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_over_the_per_client_limit_are_closed_while_others_are_served() {
    common::init();
    let backend = common::Backend::start("b").await;
    let proxy = Proxy::start(&format!(
        "[limits]\nmax_connections_per_ip = 3\n\n[[routes]]\nname = \"all\"\naction = {{ forward = \"p\" }}\n{}",
        common::pool_toml("p", "round_robin", &[&backend], "")
    ))
    .await;
    let connect_from = |ip: [u8; 4]| async move {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind(SocketAddr::from((ip, 0))).unwrap();
        socket.connect(proxy.http).await.unwrap()
    };
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(connect_from([127, 0, 0, 1]).await);
    }
    // Accepted by the kernel is not yet counted by the proxy: wait until it has them.
    common::eventually("the proxy to count the 3 connections", || async {
        (active(&proxy).await >= 3.0).then_some(())
    })
    .await;
    // The 4th from the same address is closed without an answer.
    let mut fourth = connect_from([127, 0, 0, 1]).await;
    let _ = fourth.write_all(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n").await;
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(5), fourth.read(&mut buf))
        .await
        .expect("closed at once, not left waiting")
        .unwrap_or(0);
    assert_eq!(n, 0, "{:?}", String::from_utf8_lossy(&buf[..n]));
    // Another address is served meanwhile.
    let mut other = connect_from([127, 0, 0, 2]).await;
    other
        .write_all(b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut answer = String::new();
    other.read_to_string(&mut answer).await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert_eq!(
        proxy
            .metric("rampart_rejected_client_connections_total{listener=\"http\"}")
            .await,
        1.0
    );
    // One closed: the address may open another.
    drop(held.pop());
    common::eventually("a freed slot to admit the address again", || async {
        let mut s = connect_from([127, 0, 0, 1]).await;
        s.write_all(b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
            .await
            .ok()?;
        let mut answer = String::new();
        s.read_to_string(&mut answer).await.ok()?;
        answer.starts_with("HTTP/1.1 200").then_some(())
    })
    .await;
}

/// How a faulty upstream treats each connection.
#[derive(Clone, Copy, Debug)]
enum Fault {
    /// Nothing listens: connection refused.
    Refuse,
    /// Accepts, reads the request, never answers.
    Silent,
    /// Answers something that is not HTTP.
    Garbage,
    /// Accepts and closes without a byte.
    Empty,
    /// Starts a 1000-byte response, sends 100 bytes, then resets the connection.
    ResetMidBody,
    /// Starts a 1000-byte response and sends a byte every 2 s.
    SlowBody,
}

/// Held for the test: a port bound but never listened on refuses connections, and no
/// other test can take it meanwhile (a closed listener's port could be).
static REFUSING: std::sync::OnceLock<std::sync::Mutex<Vec<tokio::net::TcpSocket>>> =
    std::sync::OnceLock::new();

/// Starts an upstream with `fault`; returns its address.
async fn faulty(fault: Fault) -> SocketAddr {
    if matches!(fault, Fault::Refuse) {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind(SocketAddr::from(([127, 0, 0, 1], 0))).unwrap();
        let addr = socket.local_addr().unwrap();
        REFUSING
            .get_or_init(Default::default)
            .lock()
            .unwrap()
            .push(socket);
        return addr;
    }
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 8192];
                if !matches!(fault, Fault::Empty) {
                    let _ = conn.read(&mut buf).await;
                }
                let head = b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n";
                match fault {
                    Fault::Refuse | Fault::Empty => {}
                    Fault::Silent => {
                        let _ = conn.read(&mut buf).await; // until the proxy gives up
                    }
                    Fault::Garbage => {
                        let _ = conn.write_all(b"SSH-2.0-OpenSSH_9.2\r\n\r\n").await;
                    }
                    Fault::ResetMidBody => {
                        let _ = conn.write_all(head).await;
                        let _ = conn.write_all(&[b'x'; 100]).await;
                        let _ = conn.set_zero_linger();
                    }
                    Fault::SlowBody => {
                        let _ = conn.write_all(head).await;
                        for _ in 0..1000 {
                            if conn.write_all(b"x").await.is_err() {
                                break;
                            }
                            tokio::time::sleep(Duration::from_secs(2)).await;
                        }
                    }
                }
            });
        }
    });
    addr
}

/// Open file descriptors of process `pid`.
fn fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, Iterator::count)
}

/// Resident memory of process `pid`, in KiB.
fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// Upstreams that refuse, stay silent, answer garbage, close at once, reset mid-body or
/// trickle: each gives the documented status within the configured timeout (or a cut
/// body once the response started), and after rounds of all of them the proxy holds no
/// more file descriptors than before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_faults_give_502_or_504_in_time_and_leak_nothing() {
    common::init();
    let faults = [
        (Fault::Refuse, Some(502)),
        (Fault::Silent, Some(504)),
        (Fault::Garbage, Some(502)),
        (Fault::Empty, Some(502)),
        (Fault::ResetMidBody, None),
        (Fault::SlowBody, None),
    ];
    let mut body = String::new();
    for (i, (fault, _)) in faults.iter().enumerate() {
        let addr = faulty(*fault).await;
        body.push_str(&format!(
            "[[routes]]\nname = \"f{i}\"\npath_prefix = \"/f{i}\"\naction = {{ forward = \"f{i}\" }}\n\n\
             [pools.f{i}]\nendpoints = [{{ address = \"{addr}\" }}]\n\
             timeouts = {{ connect = \"1s\", first_byte = \"1s\" }}\n\
             retries = {{ attempts = 0 }}\npassive_health = {{ consecutive_failures = 0 }}\n\n"
        ));
    }
    let proxy = Proxy::start(&body).await;
    let pid = proxy.child.id();
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    let one = |i: usize| {
        let client = client.clone();
        let url = proxy.url(&format!("/f{i}/x"));
        async move {
            let start = std::time::Instant::now();
            let r = client.get(url).send().await;
            let (status, body_ok) = match r {
                Ok(r) => {
                    let status = r.status().as_u16();
                    (Some(status), r.bytes().await.is_ok())
                }
                Err(_) => (None, false),
            };
            (status, body_ok, start.elapsed())
        }
    };
    // Once each, checked in detail.
    let mut table = String::from("| upstream fault | client got | within |\n|---|---|---|\n");
    for (i, (fault, want)) in faults.iter().enumerate() {
        let (status, body_ok, took) = one(i).await;
        match want {
            Some(code) => assert_eq!(status, Some(*code), "{fault:?}"),
            // The response had started: the client sees it cut short, not a whole body.
            None => assert!(
                status == Some(200) && !body_ok,
                "{fault:?}: {status:?} {body_ok}"
            ),
        }
        assert!(took < Duration::from_secs(6), "{fault:?} took {took:?}");
        let got = match (status, body_ok) {
            (Some(s), true) => s.to_string(),
            (Some(s), false) => format!("{s}, body cut"),
            (None, _) => "connection error".into(),
        };
        table.push_str(&format!(
            "| {fault:?} | {got} | {:.1} s |\n",
            took.as_secs_f64()
        ));
    }
    eprintln!("{table}");
    let out = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/security-faults.md");
    let _ = std::fs::write(&out, &table);

    // Rounds of all of them at once; then the descriptors come back down.
    let (fds_before, rss_before) = (fds(pid), rss_kib(pid));
    for _ in 0..5 {
        futures_util::future::join_all(
            (0..faults.len()).flat_map(|i| [one(i), one(i), one(i), one(i)]),
        )
        .await;
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let mut fds_after = fds(pid);
    while fds_after > fds_before + 2 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
        fds_after = fds(pid);
    }
    let rss_after = rss_kib(pid);
    eprintln!(
        "upstream faults: 120 faulty requests; proxy fds {fds_before} -> {fds_after}, RSS {} -> {} MiB",
        rss_before / 1024,
        rss_after / 1024
    );
    assert!(
        fds_after <= fds_before + 2,
        "file descriptors leaked: {fds_before} -> {fds_after}"
    );
    assert!(proxy.is_ready().await, "the proxy is still serving");
}

/// Held by the tests that load the machine (slow-client attacks, HTTP/2 floods, the TLS
/// scan) or whose assertions need it unloaded, so that they run one at a time: on two
/// cores, a scan running beside the slow-client attacks slowed them enough to fail
/// the "attack got going" check.
static HEAVY: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The proxy's `rampart_active_connections` on the http listener.
async fn active(proxy: &Proxy) -> f64 {
    proxy
        .metric("rampart_active_connections{listener=\"http\"}")
        .await
}

/// Slow clients, driven by slowhttptest (Debian): slowloris (headers trickled), slow
/// body (R-U-Dead-Yet) and slow read (a tiny receive window). Each attack's connections
/// are cut at the deadlines (2 s here) while it goes on, and a normal client keeps being
/// served throughout with no error; its p99 before and during is printed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_clients_are_cut_at_the_deadlines_while_others_are_served() {
    let _heavy = HEAVY.lock().await;
    common::init();
    let backend = common::Backend::start("b").await;
    let proxy = Proxy::start(&format!(
        "[limits]\nheader_read_timeout = \"2s\"\nbody_read_timeout = \"2s\"\nsend_timeout = \"2s\"\n\n\
         [[routes]]\nname = \"all\"\naction = {{ forward = \"p\" }}\n{}",
        common::pool_toml("p", "round_robin", &[&backend], "")
    ))
    .await;
    let client = reqwest::Client::new();
    // A normal client's latencies over `n` requests: (p99, errors).
    let normal = |n: usize| {
        let client = client.clone();
        let url = proxy.url("/");
        async move {
            let mut took = Vec::with_capacity(n);
            let mut errors = 0;
            for _ in 0..n {
                let start = std::time::Instant::now();
                let ok = match client.get(&url).send().await {
                    Ok(r) => {
                        let status = r.status();
                        let body = r.bytes().await;
                        if status != 200 || body.is_err() {
                            eprintln!(
                                "normal client: {status} {:?}",
                                body.as_ref().map(bytes::Bytes::len)
                            );
                        }
                        status == 200 && body.is_ok()
                    }
                    Err(e) => {
                        eprintln!("normal client: {e:?}");
                        false
                    }
                };
                if ok {
                    took.push(start.elapsed());
                } else {
                    errors += 1;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            took.sort();
            let p99 = took.get(took.len() * 99 / 100).copied().unwrap_or_default();
            (p99, errors)
        }
    };
    let (p99_before, errors) = normal(200).await;
    assert_eq!(errors, 0);

    let big = proxy.url("/bytes/16777216");
    let attacks: [(&str, Vec<&str>, &str); 3] = [
        ("slowloris (-H)", vec!["-H", "-i", "1"], "/"),
        ("slow body (-B)", vec!["-B", "-i", "1", "-s", "100000"], "/"),
        (
            "slow read (-X)",
            vec!["-X", "-w", "10", "-y", "20", "-n", "2", "-z", "32"],
            &big,
        ),
    ];
    let mut report = String::from(
        "| attack (slowhttptest, 200 connections) | open at the peak (first 3 s at most) | open after the 2 s deadline | normal client p99 before → during | normal client errors |\n|---|---|---|---|---|\n",
    );
    for (name, args, target) in attacks {
        let url = if target.starts_with("http") {
            target.to_string()
        } else {
            proxy.url(target)
        };
        let mut attack = std::process::Command::new("slowhttptest")
            // The attack lasts 30 s (it is killed once measured): longer than the
            // window below, so that connections closed by the attack's own end can
            // never pass for connections the proxy cut.
            .args(["-c", "200", "-r", "200", "-l", "30", "-p", "3"])
            .args(&args)
            .args(["-u", &url])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("slowhttptest (scripts/setup installs it)");
        let during = tokio::spawn(normal(400));
        // The attack's connections open (the first are cut 2 s after they open)...
        // On a loaded machine slowhttptest opens them at a third of the rate it is
        // asked (86 of 200 in the first 1.5 s once in CI), so the peak is watched for
        // up to 3 s, and no longer once most of them are open.
        let start = std::time::Instant::now();
        let mut peak = 0.0f64;
        while start.elapsed() < Duration::from_secs(3) && peak < 150.0 {
            peak = peak.max(active(&proxy).await);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // ...and are cut at the deadline, while the attack still runs. On a loaded
        // machine slowhttptest opens its last connections seconds late (145 of 200
        // open at the peak once in CI, with the Docker suites beside it), and each is
        // cut 2 s after it opened: up to 12 s for all of them.
        let mut now = active(&proxy).await;
        while now > 10.0 && start.elapsed() < Duration::from_secs(12) {
            tokio::time::sleep(Duration::from_millis(100)).await;
            now = active(&proxy).await;
        }
        let cut_after = start.elapsed();
        let (p99_during, errors) = during.await.unwrap();
        let _ = attack.kill();
        let _ = attack.wait();
        eprintln!(
            "{name}: {peak} open at the peak, {now} left {:.1}s in; normal p99 {p99_before:?} -> {p99_during:?}, {errors} errors",
            cut_after.as_secs_f64()
        );
        assert!(
            peak >= 100.0,
            "{name}: the attack never got going ({peak} open)"
        );
        assert!(
            now <= 10.0,
            "{name}: {now} connections still open past the deadline"
        );
        assert_eq!(errors, 0, "{name}: the normal client failed");
        report.push_str(&format!(
            "| {name} | {peak} | {now} after {:.1} s | {:.1} ms → {:.1} ms | {errors} |\n",
            cut_after.as_secs_f64(),
            p99_before.as_secs_f64() * 1000.0,
            p99_during.as_secs_f64() * 1000.0
        ));
        // The next attack starts from a quiet proxy.
        common::eventually("the attack's connections to close", || async {
            (active(&proxy).await <= 2.0).then_some(())
        })
        .await;
    }
    let out = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/security-slow.md");
    let _ = std::fs::write(&out, &report);
    eprintln!("{report}");
}

/// An HTTP/2 connection spoken frame by frame (TLS, ALPN h2), to send what no
/// well-behaved client library would.
struct RawH2 {
    tls: tokio_rustls::client::TlsStream<TcpStream>,
}

/// An HPACK block for `GET https://a.test/` (static-table indices and one literal).
fn get_block() -> Vec<u8> {
    let mut b = vec![0x82, 0x87, 0x84, 0x01, 6];
    b.extend_from_slice(b"a.test");
    b
}

impl RawH2 {
    async fn connect(proxy: &Proxy) -> Self {
        Self {
            tls: common::h2::connect(proxy).await,
        }
    }

    /// Writes `frames`; `false` once the proxy closed the connection.
    async fn send(&mut self, frames: &[u8]) -> bool {
        self.tls.write_all(frames).await.is_ok() && self.tls.flush().await.is_ok()
    }

    /// Reads frames until the connection closes or goes quiet for `quiet`: the types
    /// seen, and the GOAWAY error code if one came.
    async fn drain(&mut self, quiet: Duration) -> (BTreeMap<u8, usize>, Option<u32>) {
        let mut kinds = BTreeMap::new();
        let mut goaway = None;
        let mut buf = Vec::new();
        while let Ok(Some(f)) =
            tokio::time::timeout(quiet, next_frame(&mut self.tls, &mut buf)).await
        {
            *kinds.entry(f.kind).or_default() += 1;
            if f.kind == GOAWAY && f.payload.len() >= 8 {
                goaway = Some(u32::from_be_bytes(f.payload[4..8].try_into().unwrap()));
            }
        }
        (kinds, goaway)
    }
}

/// HTTP/2 attacks on one connection each — rapid reset (CVE-2023-44487), a
/// CONTINUATION flood, an oversized header list, more concurrent streams than allowed,
/// SETTINGS and PING floods — while h2load measures a normal HTTP/2 client: the proxy
/// stays up, its memory stays bounded, and the normal client is served throughout. The
/// rapid reset, CONTINUATION and oversized-header attacks get a GOAWAY and put no
/// request upstream (at most the stream limit, 100, for rapid reset); streams over the
/// limit are reset and only the allowed 100 reach the upstream; SETTINGS and PING
/// floods are answered frame for frame (the attacker pays for reading the answers) with
/// no request upstream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_floods_are_contained_while_others_are_served() {
    let _heavy = HEAVY.lock().await;
    common::init();
    let backend = common::Backend::start("b").await;
    let proxy = Proxy::start(&format!(
        "[[tls]]\nhosts = [\"a.test\"]\nsource = \"internal\"\n\n[[routes]]\nname = \"all\"\naction = {{ forward = \"p\" }}\n{}",
        common::pool_toml("p", "round_robin", &[&backend], "")
    ))
    .await;
    let pid = proxy.child.id();
    let h2load = |n: u32| {
        let port = proxy.https.port();
        async move {
            // h2load does not verify certificates; it sends SNI a.test.
            let out = tokio::process::Command::new("h2load")
                .args(["-n", &n.to_string(), "-c", "2", "-m", "8"])
                .arg(format!("--connect-to=127.0.0.1:{port}"))
                .arg(format!("https://a.test:{port}/"))
                .output()
                .await
                .expect("h2load (scripts/setup installs nghttp2-client)");
            let text = String::from_utf8_lossy(&out.stdout).to_string();
            // "requests: 2000 total, 2000 started, 2000 done, 2000 succeeded, 0 failed, ..."
            let field = |name: &str| -> u64 {
                text.lines()
                    .find(|l| l.starts_with("requests:"))
                    .and_then(|l| {
                        l.split(',')
                            .find(|p| p.trim().ends_with(name))
                            .and_then(|p| p.split_whitespace().next().and_then(|n| n.parse().ok()))
                    })
                    .unwrap_or(0)
            };
            let rate = text
                .lines()
                .find(|l| l.starts_with("finished in"))
                .and_then(|l| l.split(", ").nth(1))
                .and_then(|r| r.split_whitespace().next())
                .and_then(|r| r.parse::<f64>().ok())
                .unwrap_or(0.0);
            (field("succeeded"), rate, text)
        }
    };
    let (ok, baseline, text) = h2load(2000).await;
    assert_eq!(ok, 2000, "h2load baseline: {text}");
    let rss_before = rss_kib(pid);

    let block = get_block();
    let attacks: Vec<(&str, Vec<u8>)> = vec![
        ("rapid reset: 20000 streams opened and cancelled", {
            let mut f = Vec::new();
            for i in 0..20_000u32 {
                let id = 2 * i + 1;
                f.extend(frame(HEADERS, END_HEADERS | END_STREAM, id, &block));
                f.extend(frame(RST_STREAM, 0, id, &8u32.to_be_bytes()));
            }
            f
        }),
        (
            "CONTINUATION flood: 1 HEADERS + 20000 CONTINUATION frames of 1 KiB",
            {
                let mut f = frame(HEADERS, 0, 1, &block);
                // Literal header without indexing, new name: 0x00, name, value, repeated.
                let mut junk = Vec::new();
                while junk.len() < 1000 {
                    junk.extend_from_slice(&[0x00, 3, b'x', b'-', b'a', 20]);
                    junk.extend_from_slice(&[b'v'; 20]);
                }
                for _ in 0..20_000 {
                    f.extend(frame(CONTINUATION, 0, 1, &junk));
                }
                f
            },
        ),
        ("oversized header list: one 1 MiB header", {
            let mut value = vec![0x00, 5];
            value.extend_from_slice(b"x-big");
            value.extend_from_slice(&[0x7f, 0x81, 0xff, 0x3f]); // length 1048576 (7-bit prefix + varint)
            value.extend(std::iter::repeat_n(b'v', 1 << 20));
            let mut hb = block.clone();
            hb.extend(value);
            let mut f = Vec::new();
            let chunks: Vec<&[u8]> = hb.chunks(16384).collect();
            for (i, c) in chunks.iter().enumerate() {
                let (kind, flags) = match (i, i + 1 == chunks.len()) {
                    (0, last) => (
                        HEADERS,
                        if last {
                            END_HEADERS | END_STREAM
                        } else {
                            END_STREAM
                        },
                    ),
                    (_, true) => (CONTINUATION, END_HEADERS),
                    _ => (CONTINUATION, 0),
                };
                f.extend(frame(kind, flags, 1, c));
            }
            f
        }),
        ("1000 concurrent streams (the limit is 100)", {
            let mut f = Vec::new();
            for i in 0..1000u32 {
                // Open with no END_STREAM: each waits for a body that never comes.
                f.extend(frame(HEADERS, END_HEADERS, 2 * i + 1, &block));
            }
            f
        }),
        ("SETTINGS flood: 100000 frames", {
            let one = frame(SETTINGS, 0, 0, &[0, 3, 0, 0, 0, 100]);
            one.repeat(100_000)
        }),
        ("PING flood: 100000 frames", {
            frame(PING, 0, 0, &[1, 2, 3, 4, 5, 6, 7, 8]).repeat(100_000)
        }),
    ];
    let mut table = String::from(
        "| HTTP/2 attack (one connection) | proxy's answer | upstream requests | normal h2load client |\n|---|---|---|---|\n",
    );
    for (name, frames) in attacks {
        let hits_before = backend.hits();
        let normal = tokio::spawn(h2load(1000));
        let mut conn = RawH2::connect(&proxy).await;
        let accepted = conn.send(&frames).await;
        let (kinds, goaway) = conn.drain(Duration::from_secs(2)).await;
        let (ok, rate, text) = normal.await.unwrap();
        let upstream = backend.hits() - hits_before - usize::try_from(ok).unwrap();
        let answer = match goaway {
            Some(code) => format!("GOAWAY (error {code:#x})"),
            None if !accepted => "connection closed".to_string(),
            None => [
                (RST_STREAM, "RST_STREAM"),
                (HEADERS, "HEADERS"),
                (DATA, "DATA"),
                (SETTINGS, "SETTINGS"),
                (PING, "PING"),
            ]
            .iter()
            .filter_map(|(k, n)| kinds.get(k).map(|c| format!("{c} {n}")))
            .collect::<Vec<_>>()
            .join(", "),
        };
        // Let what the attack left in flight settle before the next one is counted.
        drop(conn);
        let mut last = backend.hits();
        loop {
            tokio::time::sleep(Duration::from_millis(500)).await;
            let now = backend.hits();
            if now == last {
                break;
            }
            last = now;
        }
        eprintln!(
            "{name}: {answer}; {upstream} upstream; normal client {ok}/1000 at {rate:.0} req/s"
        );
        assert_eq!(ok, 1000, "{name}: the normal client failed: {text}");
        // Containment, per attack: how the attacking connection was answered, and how
        // many of its requests reached the upstream.
        let resets = kinds.get(&RST_STREAM).copied().unwrap_or(0);
        if name.starts_with("rapid reset") {
            assert!(goaway.is_some(), "{name}: no GOAWAY ({answer})");
            assert!(
                upstream <= 100,
                "{name}: {upstream} requests reached the upstream"
            );
        } else if name.starts_with("CONTINUATION") || name.starts_with("oversized") {
            assert!(
                goaway.is_some() || !accepted,
                "{name}: not refused ({answer})"
            );
            assert_eq!(upstream, 0, "{name}: requests reached the upstream");
        } else if name.starts_with("1000 concurrent") {
            assert!(resets >= 900, "{name}: {resets} streams reset ({answer})");
            assert!(
                upstream <= 100,
                "{name}: {upstream} requests reached the upstream"
            );
        } else {
            assert_eq!(upstream, 0, "{name}: requests reached the upstream");
        }
        table.push_str(&format!(
            "| {name} | {answer} | {upstream} | {ok}/1000 ok, {rate:.0} req/s (alone: {baseline:.0}) |\n"
        ));
    }
    let rss_after = rss_kib(pid);
    eprintln!(
        "{table}\nproxy RSS {} -> {} MiB",
        rss_before / 1024,
        rss_after / 1024
    );
    assert!(proxy.is_ready().await, "the proxy is still serving");
    assert!(
        rss_after < rss_before + 200 * 1024,
        "memory grew from {rss_before} to {rss_after} KiB"
    );
    let out = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/security-h2.md");
    let _ = std::fs::write(&out, &table);
}

/// testssl.sh (Debian) against the HTTPS listener, trusting the internal CA: only TLS 1.2
/// and 1.3, forward-secret suites, the server's cipher order, session resumption, and
/// no finding of severity HIGH or CRITICAL but the one a private CA always has (no
/// CRL or OCSP URL: its certificates are revoked by rotating the CA). Unknown SNI gets
/// the configured default certificate (tests/proxy_tls.rs covers the handshake-failure
/// choice).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn testssl_finds_no_high_or_critical_issue() {
    let _heavy = HEAVY.lock().await;
    common::init();
    let proxy = Proxy::start(
        "[[tls]]\nhosts = [\"a.test\"]\nsource = \"internal\"\n\n[[routes]]\nname = \"all\"\naction = { respond = { status = 200, body = \"ok\" } }\n",
    )
    .await;
    // The leaf is issued on first use; make sure it exists before the scan.
    assert_eq!(
        proxy
            .client(&["a.test"])
            .get(format!("https://a.test:{}/", proxy.https.port()))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    let json = proxy.dir.path().join("testssl.json");
    let out = tokio::process::Command::new("testssl")
        .args([
            "--quiet",
            "--color",
            "0",
            "--warnings",
            "off",
            "--ip",
            "127.0.0.1",
        ])
        .arg("--add-ca")
        .arg(proxy.ca_path())
        .arg("--jsonfile")
        .arg(&json)
        .arg(format!("https://a.test:{}/", proxy.https.port()))
        .output()
        .await
        .expect("testssl (scripts/setup installs testssl.sh)");
    let findings: Vec<serde_json::Value> =
        serde_json::from_slice(&std::fs::read(&json).unwrap_or_else(|e| {
            panic!(
                "testssl wrote no JSON ({e}): {}",
                String::from_utf8_lossy(&out.stdout)
            )
        }))
        .unwrap();
    let get = |id: &str| {
        findings
            .iter()
            .find(|f| f["id"] == id)
            .map(|f| f["finding"].as_str().unwrap_or_default().to_string())
            .unwrap_or_default()
    };
    let mut table = String::from("| testssl.sh check | finding |\n|---|---|\n");
    for id in [
        "SSLv2",
        "SSLv3",
        "TLS1",
        "TLS1_1",
        "TLS1_2",
        "TLS1_3",
        "PFS",
        "PFS_ciphers",
        "cipher_order",
        "sessionresumption_ticket",
        "sessionresumption_ID",
        "cert_chain_of_trust",
        "cert_expirationStatus",
        "heartbleed",
        "CCS",
        "ticketbleed",
        "ROBOT",
        "secure_renego",
        "secure_client_renego",
        "CRIME_TLS",
        "POODLE_SSL",
        "fallback_SCSV",
        "SWEET32",
        "FREAK",
        "DROWN",
        "LOGJAM",
        "BEAST",
        "LUCKY13",
        "RC4",
    ] {
        table.push_str(&format!("| {id} | {} |\n", get(id).replace('|', "/")));
    }
    let serious: Vec<String> = findings
        .iter()
        .filter(|f| matches!(f["severity"].as_str(), Some("HIGH" | "CRITICAL")))
        .filter(|f| f["id"] != "cert_revocation")
        .map(|f| format!("{} {}: {}", f["id"], f["severity"], f["finding"]))
        .collect();
    let counts = findings
        .iter()
        .fold(BTreeMap::<String, usize>::new(), |mut m, f| {
            *m.entry(f["severity"].as_str().unwrap_or("?").to_string())
                .or_default() += 1;
            m
        });
    eprintln!("{table}\nseverities: {counts:?}");
    let report = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/security-tls.md");
    let _ = std::fs::write(&report, &table);
    assert!(serious.is_empty(), "testssl: {serious:#?}");
    assert!(get("SSLv3").starts_with("not offered"));
    assert!(get("TLS1").starts_with("not offered"));
    assert!(get("TLS1_1").starts_with("not offered"));
    assert!(get("TLS1_3").starts_with("offered"));
    assert_eq!(get("PFS"), "offered");
    assert_eq!(get("cipher_order"), "server");
    assert!(
        get("sessionresumption_ID").contains("supported"),
        "{}",
        get("sessionresumption_ID")
    );
}
