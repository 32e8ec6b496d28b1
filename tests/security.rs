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
        let garbage = Arc::new(Mutex::new(Vec::new()));
        let (s, g) = (seen.clone(), garbage.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((conn, _)) = listener.accept().await else {
                    return;
                };
                let (s, g) = (s.clone(), g.clone());
                tokio::spawn(async move {
                    if let Err(e) = serve(conn, &s).await {
                        g.lock().unwrap().push(e);
                    }
                });
            }
        });
        Self {
            addr,
            seen,
            garbage,
            task,
        }
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
async fn serve(mut conn: TcpStream, seen: &Mutex<Vec<Seen>>) -> Result<(), String> {
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

/// What a probe may get.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Want {
    /// An error status or a closed connection; nothing upstream.
    Refused,
    /// Exactly one request upstream, answered 200 (a control, or a lenient reading
    /// the RFC allows).
    One,
    /// Either of the above.
    RefusedOrOne,
}

/// Sends `request` on a fresh connection and returns the status codes of every response
/// read before the proxy closed or went quiet for a second (`[]`: closed with none).
async fn send(addr: SocketAddr, request: &[u8]) -> Vec<u16> {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let _ = s.write_all(request).await;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    while let Ok(Ok(n)) = tokio::time::timeout(Duration::from_secs(1), s.read(&mut chunk)).await {
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let text = String::from_utf8_lossy(&buf);
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
    use Want::{One, Refused, RefusedOrOne};
    let big = "a".repeat(70_000);
    let many: String = (0..200).map(|i| format!("X-H{i}: v\r\n")).collect();
    vec![
        ("control: one GET", "GET {P} HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n".into(), One),
        ("control: chunked POST", "POST {P} HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n5\r\nhello\r\n0\r\n\r\n".into(), One),
        ("CL.TE: Content-Length and Transfer-Encoding", "POST {P} HTTP/1.1\r\nHost: a\r\nContent-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET {P}-smuggled HTTP/1.1\r\nHost: a\r\n\r\n".into(), Refused),
        ("TE.CL: Transfer-Encoding then Content-Length", "POST {P} HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n5c\r\nGET {P}-smuggled HTTP/1.1\r\nHost: a\r\n\r\n0\r\n\r\n".into(), Refused),
        ("conflicting Content-Length", "POST {P} HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 40\r\n\r\nhelloGET {P}-smuggled HTTP/1.1\r\nHost: a\r\n\r\n".into(), Refused),
        ("Content-Length list \"5, 40\"", "POST {P} HTTP/1.1\r\nHost: a\r\nContent-Length: 5, 40\r\n\r\nhello".into(), Refused),
        ("duplicate identical Content-Length", "POST {P} HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello".into(), RefusedOrOne),
        ("Content-Length list \"5, 5\"", "POST {P} HTTP/1.1\r\nHost: a\r\nContent-Length: 5, 5\r\nConnection: close\r\n\r\nhello".into(), RefusedOrOne),
        ("Content-Length \"+5\"", "POST {P} HTTP/1.1\r\nHost: a\r\nContent-Length: +5\r\n\r\nhello".into(), Refused),
        ("Content-Length \"-1\"", "POST {P} HTTP/1.1\r\nHost: a\r\nContent-Length: -1\r\n\r\n".into(), Refused),
        ("Content-Length overflow", "POST {P} HTTP/1.1\r\nHost: a\r\nContent-Length: 99999999999999999999999\r\n\r\n".into(), Refused),
        ("Transfer-Encoding: xchunked", "POST {P} HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: xchunked\r\n\r\n0\r\n\r\nGET {P}-smuggled HTTP/1.1\r\nHost: a\r\n\r\n".into(), Refused),
        ("Transfer-Encoding: chunked, identity", "POST {P} HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n".into(), Refused),
        ("Transfer-Encoding: identity, chunked", "POST {P} HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: identity, chunked\r\nConnection: close\r\n\r\n0\r\n\r\n".into(), RefusedOrOne),
        ("two Transfer-Encoding headers", "POST {P} HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n\r\n0\r\n\r\n".into(), Refused),
        ("space before the colon", "POST {P} HTTP/1.1\r\nHost: a\r\nTransfer-Encoding : chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n".into(), Refused),
        ("Transfer-Encoding with a tab (valid OWS)", "POST {P} HTTP/1.1\r\nHost: a\r\nTransfer-Encoding:\tchunked\r\nConnection: close\r\n\r\n0\r\n\r\n".into(), RefusedOrOne),
        ("Transfer-Encoding: CHUNKED (case)", "POST {P} HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: CHUNKED\r\nConnection: close\r\n\r\n0\r\n\r\n".into(), RefusedOrOne),
        ("Transfer-Encoding: \\x0bchunked (vertical tab)", "POST {P} HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: \x0bchunked\r\n\r\n0\r\n\r\n".into(), Refused),
        ("obsolete line folding of Transfer-Encoding", "POST {P} HTTP/1.1\r\nHost: a\r\nX-Fold: a\r\n Transfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n0\r\n\r\n".into(), Refused),
        ("invalid chunk size", "POST {P} HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\nGET {P}-smuggled HTTP/1.1\r\nHost: a\r\n\r\n".into(), Refused),
        ("chunk size overflow", "POST {P} HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nffffffffffffffffff1\r\nhello\r\n0\r\n\r\n".into(), Refused),
        ("chunk size with a NUL", "POST {P} HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5\x00\r\nhello\r\n0\r\n\r\n".into(), Refused),
        ("chunk extension (valid)", "POST {P} HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n5;name=value\r\nhello\r\n0\r\n\r\n".into(), RefusedOrOne),
        ("chunk data longer than its size", "POST {P} HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nhelloGET {P}-smuggled HTTP/1.1\r\nHost: a\r\n\r\n0\r\n\r\n".into(), Refused),
        ("bare LF line endings", "GET {P} HTTP/1.1\nHost: a\nConnection: close\n\n".into(), RefusedOrOne),
        ("bare CR in a header", "GET {P} HTTP/1.1\r\nHost: a\r\nX-A: b\rX-B: c\r\n\r\n".into(), Refused),
        ("NUL in a header value", "GET {P} HTTP/1.1\r\nHost: a\r\nX-A: b\x00c\r\n\r\n".into(), Refused),
        ("control byte in a header name", "GET {P} HTTP/1.1\r\nHost: a\r\nX\x01A: b\r\n\r\n".into(), Refused),
        ("space in a header name", "GET {P} HTTP/1.1\r\nHost: a\r\nX A: b\r\n\r\n".into(), Refused),
        ("obsolete line folding", "GET {P} HTTP/1.1\r\nHost: a\r\nX-A: b\r\n c\r\nConnection: close\r\n\r\n".into(), RefusedOrOne),
        ("absolute-form URI, another Host", "GET http://other.test{P} HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n".into(), RefusedOrOne),
        ("HTTP/1.1 without Host", "GET {P} HTTP/1.1\r\nConnection: close\r\n\r\n".into(), Refused),
        ("two Host headers", "GET {P} HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n".into(), Refused),
        ("HTTP/1.0 without Host", "GET {P} HTTP/1.0\r\n\r\n".into(), RefusedOrOne),
        ("HTTP/1.0 with Transfer-Encoding", "POST {P} HTTP/1.0\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n".into(), RefusedOrOne),
        ("HTTP/2.0 on an HTTP/1 connection", "GET {P} HTTP/2.0\r\nHost: a\r\n\r\n".into(), Refused),
        ("HTTP/1.1 with a junk version", "GET {P} HTTP/1.x\r\nHost: a\r\n\r\n".into(), Refused),
        // Pingora percent-encodes what httparse refuses in the target (as Cloudflare
        // does): the upstream gets one request for `/pNN%20x`, never two parts.
        ("space in the request target", "GET {P} x HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n".into(), RefusedOrOne),
        ("overlong request line (70 kB)", format!("GET {{P}}?{big} HTTP/1.1\r\nHost: a\r\n\r\n"), Refused),
        ("oversized header (70 kB)", format!("GET {{P}} HTTP/1.1\r\nHost: a\r\nX-Big: {big}\r\n\r\n"), Refused),
        ("too many headers (200)", format!("GET {{P}} HTTP/1.1\r\nHost: a\r\n{many}\r\n"), Refused),
        ("Connection: close, keep-alive then a second request", "GET {P} HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\nGET {P}-smuggled HTTP/1.1\r\nHost: a\r\n\r\n".into(), One),
        ("hop-by-hop via Connection: Transfer-Encoding", "POST {P} HTTP/1.1\r\nHost: a\r\nConnection: Transfer-Encoding, close\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n".into(), RefusedOrOne),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smuggling_and_parsing_probes_are_refused_or_forwarded_as_one_clean_request() {
    common::init();
    let recorder = Recorder::start().await;
    let proxy = Proxy::start(&format!(
        "[[routes]]\nname = \"all\"\naction = {{ forward = \"p\" }}\n\n[pools.p]\nendpoints = [{{ address = \"{}\" }}]\n",
        recorder.addr
    ))
    .await;
    let probes = probes();
    let results =
        futures_util::future::join_all(probes.iter().enumerate().map(|(i, (_, request, _))| {
            let request = request.replace("{P}", &format!("/p{i:02}"));
            async move { send(proxy.http, request.as_bytes()).await }
        }))
        .await;
    // Let anything the proxy forwarded late arrive before counting.
    tokio::time::sleep(Duration::from_millis(200)).await;

    let mut table = String::from(
        "| probe | Rampart answered | requests upstream | verdict |\n|---|---|---|---|\n",
    );
    let mut failures = Vec::new();
    let mut verdicts: BTreeMap<&str, usize> = BTreeMap::new();
    for (i, ((name, _, want), statuses)) in probes.iter().zip(&results).enumerate() {
        let prefix = format!("/p{i:02}");
        let upstream = recorder.requests(&prefix);
        let smuggled = upstream.iter().any(|s| s.path.contains("-smuggled"));
        let refused = statuses
            .first()
            .is_none_or(|s| matches!(s, 400 | 413 | 414 | 431 | 501 | 505));
        let got = match (refused, upstream.len(), statuses.first()) {
            (true, 0, _) => Some(Want::Refused),
            (false, 1, Some(200)) if !smuggled => Some(Want::One),
            _ => None,
        };
        let ok = match want {
            Want::RefusedOrOne => got.is_some(),
            w => got == Some(*w),
        };
        if !ok {
            failures.push(format!(
                "{name}: wanted {want:?}, answered {statuses:?}, upstream saw {:?}",
                upstream
                    .iter()
                    .map(|s| (&s.path, &s.headers, String::from_utf8_lossy(&s.body)))
                    .collect::<Vec<_>>()
            ));
        }
        let answer = match statuses.as_slice() {
            [] => "connection closed".to_string(),
            s => s.iter().map(u16::to_string).collect::<Vec<_>>().join(", "),
        };
        let verdict = if !ok {
            "**FAIL**"
        } else if got == Some(Want::Refused) {
            "refused"
        } else {
            "one clean request"
        };
        *verdicts.entry(verdict).or_default() += 1;
        table.push_str(&format!(
            "| {} | {answer} | {} | {verdict} |\n",
            name.replace('|', "\\|"),
            upstream.len()
        ));
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

/// Starts an upstream with `fault`; returns its address.
async fn faulty(fault: Fault) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    if matches!(fault, Fault::Refuse) {
        return addr; // dropped: nothing listens there any more
    }
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
        "| attack (slowhttptest, 200 connections) | open after 1 s | open after the 2 s deadline | normal client p99 before → during | normal client errors |\n|---|---|---|---|---|\n",
    );
    for (name, args, target) in attacks {
        let url = if target.starts_with("http") {
            target.to_string()
        } else {
            proxy.url(target)
        };
        let mut attack = std::process::Command::new("slowhttptest")
            .args(["-c", "200", "-r", "200", "-l", "8", "-p", "3"])
            .args(&args)
            .args(["-u", &url])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("slowhttptest (scripts/setup installs it)");
        let during = tokio::spawn(normal(400));
        // The attack's connections open...
        let start = std::time::Instant::now();
        let mut peak = 0.0f64;
        while start.elapsed() < Duration::from_secs(1) {
            peak = peak.max(active(&proxy).await);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // ...and are cut at the deadline, while the attack still runs.
        let mut now = active(&proxy).await;
        while now > 10.0 && start.elapsed() < Duration::from_secs(7) {
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
