//! One request path: the same corpus of requests — ordinary ones, the security probes
//! and the defects a black-box battery found — sent on the wire to a proxy with the
//! fast paths on and to one with them off, over HTTP/1.1 and HTTP/2. Each case must get
//! the same answer (status and body) and put exactly the same bytes on the wire to the
//! upstream (or nothing), and each case asserts which transport served it.
#![allow(missing_docs, clippy::unwrap_used)]

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::h2::{frame, next_frame, DATA, END_HEADERS, END_STREAM, GOAWAY, HEADERS, RST_STREAM};
use common::{Proxy, DEADLINE};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// An upstream that records every request head the moment it is complete, and each
/// body separately once its declared length arrived; answers `200 ok`.
struct Recorder {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<Vec<u8>>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Recorder {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Recorder {
    async fn start() -> Recorder {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(record(stream, log.clone()));
            }
        });
        Recorder { addr, seen, task }
    }

    /// Everything recorded since the last call.
    fn take(&self) -> Vec<String> {
        std::mem::take(&mut *self.seen.lock().unwrap())
            .into_iter()
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .collect()
    }
}

async fn record(mut stream: TcpStream, seen: Arc<Mutex<Vec<Vec<u8>>>>) {
    let mut buf = Vec::new();
    loop {
        let head_end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            let mut chunk = [0u8; 4096];
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        };
        let head: Vec<u8> = buf.drain(..head_end).collect();
        let text = String::from_utf8_lossy(&head).to_ascii_lowercase();
        seen.lock().unwrap().push(head);
        let length: usize = text
            .lines()
            .filter_map(|l| l.split_once(':'))
            .find(|(n, _)| n.trim() == "content-length")
            .map_or(0, |(_, v)| v.trim().parse().unwrap_or(0));
        while buf.len() < length {
            let mut chunk = [0u8; 4096];
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        if length > 0 {
            let body: Vec<u8> = buf.drain(..length).collect();
            let mut entry = b"BODY ".to_vec();
            entry.extend_from_slice(&body);
            seen.lock().unwrap().push(entry);
        }
        // `/status/502` answers 502 (for intercepted upstream errors).
        let ok: &[u8] = if text.starts_with("get /status/502 ") {
            b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 8\r\n\r\nupstream"
        } else {
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
        };
        if stream.write_all(ok).await.is_err() {
            return;
        }
    }
}

/// A CA file for the client_auth of `cert.test` (no client here sends a certificate).
fn client_ca() -> &'static std::path::Path {
    static CA: std::sync::OnceLock<common::pki::Pki> = std::sync::OnceLock::new();
    CA.get_or_init(|| common::pki::Pki::new("clients"))
        .dir
        .path()
}

fn config(upstream: SocketAddr) -> String {
    let ca = client_ca().join("ca.pem");
    format!(
        r#"
[[tls]]
hosts = ["a.test"]
source = "internal"

[[tls]]
hosts = ["cert.test"]
source = "internal"
client_auth = {{ ca_file = {ca:?}, mode = "optional" }}

[[routes]]
name = "cert"
hosts = ["cert.test"]
require_client_cert = true
action = {{ forward = "app" }}

[[routes]]
name = "app"
hosts = ["a.test"]
action = {{ forward = "app" }}

[[routes]]
name = "static"
hosts = ["static.test"]
action = {{ respond = {{ status = 200, body = "static" }} }}

[[routes]]
name = "moved"
hosts = ["moved.test"]
action = {{ redirect = {{ location = "https://new.test", status = 301, keep_path = true }} }}

[[routes]]
name = "secure"
hosts = ["secure.test"]
https_redirect = true
action = {{ forward = "app" }}

[[routes]]
name = "login"
hosts = ["login.test"]
basic_auth = {{ realm = "Back office", users = {{ alice = "$2b$04$tStMkjshOfe3K5/ioFaQs.3XQgfwfj.AEwfRSnqkLW2mRzVkYRBH6" }} }}
action = {{ forward = "app" }}

[[routes]]
name = "limited"
hosts = ["limited.test"]
rate_limit = {{ requests = 1, per = "1m" }}
action = {{ forward = "app" }}

[[routes]]
name = "small"
hosts = ["small.test"]
max_body_bytes = "4B"
action = {{ forward = "app" }}

[[routes]]
name = "private"
hosts = ["private.test"]
allow_from = ["192.0.2.7"]
action = {{ forward = "app" }}

[[routes]]
name = "old"
hosts = ["old.test"]
redirect = {{ pattern = '^http://old\.test/blog/(.*)$', location = "https://new.test/$1", status = 301 }}
action = {{ forward = "app" }}

[[routes]]
name = "v1"
hosts = ["v1.test"]
rewrite = {{ pattern = '^/v1/(.*)$', replacement = "/$1" }}
action = {{ forward = "app" }}

[[routes]]
name = "canary"
hosts = ["split.test"]
split = {{ override_header = "X-Canary" }}
action = {{ forward = [{{ pool = "app", weight = 1 }}, {{ pool = "sticky", weight = 0 }}] }}

[[routes]]
name = "paged"
hosts = ["paged.test"]
allow_from = ["192.0.2.7"]
error_pages = {{ text = {{ inline = "custom {{status}} {{request_id}}\n" }} }}
action = {{ forward = "app" }}

[[routes]]
name = "intercepting"
hosts = ["intercept.test"]
error_pages = {{ text = {{ inline = "replaced {{status}} {{request_id}}\n" }}, intercept = [502] }}
action = {{ forward = "app" }}

[[routes]]
name = "edited"
hosts = ["edited.test"]
request_headers = {{ set = {{ "X-Env" = "prod" }}, remove = ["X-Debug", "X-Forwarded-Host"] }}
action = {{ forward = "app" }}

[[routes]]
name = "gz"
hosts = ["gz.test"]
compress = {{}}
action = {{ forward = "app" }}

[pools.app]
endpoints = [{{ address = "{upstream}" }}]

[pools.sticky]
endpoints = [{{ address = "{upstream}" }}]
sticky = {{}}
"#
    )
}

/// Which transport must serve a case on the proxy with the fast paths on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Served {
    /// The fast path (it answered or forwarded).
    Fast,
    /// Pingora's path (the fast path declined it for a transport reason).
    Pingora,
}

/// A response's status and body (without the headers that differ per run; the request
/// id the proxy names in its own answers is replaced by `<id>`).
async fn read_response(stream: &mut TcpStream) -> (u16, String) {
    let mut got = Vec::new();
    let read = async {
        let mut chunk = [0u8; 4096];
        loop {
            if let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&got[..end]).to_ascii_lowercase();
                let length = head
                    .lines()
                    .filter_map(|l| l.split_once(':'))
                    .find(|(n, _)| n.trim() == "content-length")
                    .map_or(0, |(_, v)| v.trim().parse().unwrap_or(0));
                if got.len() >= end + 4 + length {
                    return;
                }
            }
            match stream.read(&mut chunk).await {
                Ok(n) if n > 0 => got.extend_from_slice(&chunk[..n]),
                _ => return,
            }
        }
    };
    // A hang is a failure, never a refusal.
    tokio::time::timeout(DEADLINE, read)
        .await
        .expect("the proxy answered or closed within the deadline");
    let text = String::from_utf8_lossy(&got).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let id = head
        .lines()
        .filter_map(|l| l.split_once(':'))
        .find(|(n, _)| n.trim().eq_ignore_ascii_case("x-request-id"))
        .map(|(_, v)| v.trim());
    let body = match id {
        Some(id) if !id.is_empty() => body.replace(id, "<id>"),
        _ => body.to_string(),
    };
    (status, body)
}

/// A recorded head in a canonical form: the request line, then the fields stably
/// sorted by name, names in lower case. Neither the order of fields of different names
/// (RFC 9110 §5.3) nor the case of a name (§5.1) carries meaning, and Pingora's header
/// map keeps neither when it adds a field; the order of fields of one name does carry
/// meaning, and is kept, as are the request line and every value byte for byte.
fn canonical(recorded: &str) -> String {
    if recorded.starts_with("BODY ") {
        return recorded.to_string();
    }
    let mut lines: Vec<String> = recorded
        .split("\r\n")
        .filter(|l| !l.is_empty())
        .enumerate()
        .map(|(i, l)| match l.split_once(':') {
            // A trace the proxy started is random: its shape is compared, not its ids.
            Some((name, value)) if i > 0 && name.eq_ignore_ascii_case("traceparent") => {
                let v = value.trim();
                let shape = v.len() == 55
                    && v.starts_with("00-")
                    && v.ends_with("-01")
                    && v[3..52].bytes().all(|b| b == b'-' || b.is_ascii_hexdigit());
                format!("traceparent: {}", if shape { "<trace>" } else { v })
            }
            Some((name, value)) if i > 0 => format!("{}:{value}", name.to_ascii_lowercase()),
            _ => l.to_string(),
        })
        .collect();
    lines[1..].sort_by(|a, b| a.split(':').next().cmp(&b.split(':').next()));
    lines.join("\r\n")
}

/// Sends `raw` on a new connection to `proxy`; the answer and what the upstream got.
async fn exchange(proxy: &Proxy, upstream: &Recorder, raw: &str) -> (u16, String, Vec<String>) {
    let mut stream = TcpStream::connect(proxy.http).await.unwrap();
    stream.write_all(raw.as_bytes()).await.unwrap();
    let (status, body) = read_response(&mut stream).await;
    (status, body, upstream.take())
}

/// The HTTP/1.1 corpus: (request, status, what the upstream must see, which path).
fn http1_corpus() -> Vec<(&'static str, String, u16, Option<&'static str>, Served)> {
    use Served::{Fast, Pingora};
    let req = |line: &str, headers: &str| format!("{line}\r\nX-Request-Id: t-1\r\n{headers}\r\n");
    vec![
        ("plain GET", req("GET /x?y=1 HTTP/1.1", "Host: a.test\r\n"), 200, Some("GET /x?y=1 HTTP/1.1"), Fast),
        ("Host in upper case and with a port", req("GET / HTTP/1.1", "Host: A.Test:80\r\n"), 200, Some("Host: A.Test:80"), Fast),
        // Defect 1: a crafted Host must not reach Forwarded or X-Forwarded-Host.
        ("crafted Host", req("GET / HTTP/1.1", "Host: [a.test]\", for=6.6.6.6;host=\"a.test\r\n"), 400, None, Fast),
        ("Host with userinfo", req("GET / HTTP/1.1", "Host: evil@a.test\r\n"), 400, None, Fast),
        ("two Host fields", req("GET / HTTP/1.1", "Host: a.test\r\nHost: b.test\r\n"), 400, None, Fast),
        ("no Host", req("GET / HTTP/1.1", ""), 400, None, Fast),
        // Defect 2: Connection cannot remove Host or the framing fields: refused, as
        // Pingora refuses Host (and would re-frame a body whose length it removed).
        ("Connection: host", req("GET / HTTP/1.1", "Host: a.test\r\nConnection: host, x-a\r\nX-A: 1\r\n"), 400, None, Fast),
        ("Connection: content-length", req("POST / HTTP/1.1", "Host: a.test\r\nConnection: content-length, x-a\r\nX-A: 1\r\nContent-Length: 2\r\n") + "hi", 400, None, Fast),
        ("Connection: x-a", req("GET / HTTP/1.1", "Host: a.test\r\nConnection: x-a\r\nX-A: 1\r\n"), 200, Some("x-request-id: t-1"), Fast),
        // Defect 3: no tunnels.
        ("CONNECT in origin-form", req("CONNECT /x HTTP/1.1", "Host: a.test\r\n"), 405, None, Fast),
        // Defect 4: a fragment is refused, never forwarded.
        ("fragment", req("GET /public#/../admin HTTP/1.1", "Host: a.test\r\n"), 400, None, Fast),
        // Defect 5: absolute-form routes and forwards on its own authority.
        ("absolute-form, other Host", req("GET http://a.test/x HTTP/1.1", "Host: b.test\r\n"), 400, None, Fast),
        ("absolute-form, same Host", req("GET http://a.test/x HTTP/1.1", "Host: a.test\r\n"), 200, Some("GET /x HTTP/1.1"), Fast),
        ("absolute-form, no Host", req("GET http://a.test/x HTTP/1.1", ""), 200, Some("Host: a.test"), Fast),
        ("no route", req("GET / HTTP/1.1", "Host: nowhere.test\r\n"), 404, None, Fast),
        // The form of an error follows Accept, byte for byte alike on both paths.
        ("no route, a browser", req("GET / HTTP/1.1", "Host: nowhere.test\r\nAccept: text/html,*/*;q=0.8\r\n"), 404, None, Fast),
        ("no route, an API client", req("GET / HTTP/1.1", "Host: nowhere.test\r\nAccept: application/json\r\n"), 404, None, Fast),
        // A gRPC call gets a trailers-only gRPC status (UNIMPLEMENTED), on an HTTP 200.
        ("no route, a gRPC client", req("POST /pkg.Svc/Call HTTP/1.1", "Host: nowhere.test\r\nContent-Type: application/grpc\r\nContent-Length: 0\r\n"), 200, None, Fast),
        ("dot-segments", req("GET /a/../admin HTTP/1.1", "Host: a.test\r\n"), 400, None, Fast),
        ("body", req("POST /p HTTP/1.1", "Host: a.test\r\nContent-Length: 5\r\n") + "hello", 200, Some("BODY hello"), Fast),
        // Every other rule of the policy, once each: the controller's probe, a static
        // answer, a redirect, HTTPS only, a login, a rate limit (its second request), a
        // body over the route's limit, an address not allowed.
        ("controller probe", req("GET /.well-known/rampart/healthz HTTP/1.1", "Host: a.test\r\n"), 200, None, Fast),
        ("static answer", req("GET / HTTP/1.1", "Host: static.test\r\n"), 200, None, Fast),
        ("redirect", req("GET /a?b HTTP/1.1", "Host: moved.test\r\n"), 301, None, Fast),
        ("HTTPS redirect", req("GET / HTTP/1.1", "Host: secure.test\r\n"), 308, None, Fast),
        ("login required", req("GET / HTTP/1.1", "Host: login.test\r\n"), 401, None, Fast),
        ("rate limit, first", req("GET / HTTP/1.1", "Host: limited.test\r\n"), 200, Some("Host: limited.test"), Fast),
        ("rate limit, second", req("GET / HTTP/1.1", "Host: limited.test\r\n"), 429, None, Fast),
        ("body over the route's limit", req("POST / HTTP/1.1", "Host: small.test\r\nContent-Length: 5\r\n") + "hello", 413, None, Fast),
        ("address not allowed", req("GET / HTTP/1.1", "Host: private.test\r\n"), 403, None, Fast),
        ("regex redirect", req("GET /blog/a%20b?c HTTP/1.1", "Host: old.test\r\n"), 301, None, Fast),
        ("regex redirect, no match", req("GET /about HTTP/1.1", "Host: old.test\r\n"), 200, Some("GET /about HTTP/1.1"), Fast),
        // A split (the override into a weight-0 sticky pool; the cookies go on as they
        // came), and a route that compresses, which the fast paths hand to Pingora's.
        ("split, overridden", req("GET /s HTTP/1.1", "Host: split.test\r\nX-Canary: sticky\r\nCookie: rp_s=0123456789abcdef; rp_split=app\r\n"), 200, Some("Cookie: rp_s=0123456789abcdef; rp_split=app"), Fast),
        ("split, by weight", req("GET /s HTTP/1.1", "Host: split.test\r\n"), 200, Some("GET /s HTTP/1.1"), Fast),
        ("an error page of the operator's", req("GET / HTTP/1.1", "Host: paged.test\r\n"), 403, None, Fast),
        // An upstream 502 replaced by the route's page (`intercept`), and a 200 not.
        ("an intercepted upstream error", req("GET /status/502 HTTP/1.1", "Host: intercept.test\r\n"), 502, Some("GET /status/502 HTTP/1.1"), Fast),
        ("not intercepted", req("GET /ok HTTP/1.1", "Host: intercept.test\r\n"), 200, Some("GET /ok HTTP/1.1"), Fast),
        ("compressing route", req("GET /c HTTP/1.1", "Host: gz.test\r\nAccept-Encoding: gzip\r\n"), 200, Some("Accept-Encoding: gzip"), Pingora),
        ("client certificate required, plain HTTP", req("GET / HTTP/1.1", "Host: cert.test\r\n"), 403, None, Fast),
        // The certificate headers are the proxy's alone: both paths drop a client's.
        ("forged client certificate header", req("GET / HTTP/1.1", "Host: a.test\r\nX-Client-Cert-Subject: CN=admin\r\n"), 200, Some("GET / HTTP/1.1"), Fast),
        ("path rewrite", req("GET /v1/a%20b?c=1 HTTP/1.1", "Host: v1.test\r\n"), 200, Some("GET /a%20b?c=1 HTTP/1.1"), Fast),
        // The route's request_headers: a client's X-Env replaced, X-Debug and a
        // forwarding header removed, alike on both paths.
        ("request header edits", req("GET /e HTTP/1.1", "Host: edited.test\r\nX-Env: dev\r\nX-Debug: 1\r\nX-Keep: 1\r\n"), 200, Some("x-env: prod"), Fast),
        // Smuggling probes: the fast path declines them, Pingora's path refuses them.
        ("CL and TE", req("POST / HTTP/1.1", "Host: a.test\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n") + "0\r\n\r\n", 400, None, Pingora),
        ("two lengths", req("POST / HTTP/1.1", "Host: a.test\r\nContent-Length: 4\r\nContent-Length: 5\r\n") + "hello", 400, None, Pingora),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_transport_answers_and_forwards_the_same_bytes() {
    common::init();
    let upstream = Recorder::start().await;
    let fast = Proxy::start(&config(upstream.addr)).await;
    let full = Proxy::start_with(
        "http1_fast_path = false\nhttp2_fast_path = false",
        &config(upstream.addr),
    )
    .await;
    for (name, raw, status, must_see, served) in http1_corpus() {
        let before = fast.metric("rampart_http1_fast_path_requests_total").await;
        let a = exchange(&fast, &upstream, &raw).await;
        let carried = fast.metric("rampart_http1_fast_path_requests_total").await - before;
        let b = exchange(&full, &upstream, &raw).await;
        assert_eq!(a.0, status, "{name}: fast path answered {a:?}");
        // The same status and body (Pingora refuses a few heads itself, before any
        // policy runs, with an empty body), and the same upstream request.
        assert_eq!(a.0, b.0, "{name}: fast path {a:?} vs Pingora's {b:?}");
        if !b.1.is_empty() {
            assert_eq!(a.1, b.1, "{name}: fast path (left) vs Pingora's");
        }
        assert_eq!(
            a.2.iter().map(|s| canonical(s)).collect::<Vec<_>>(),
            b.2.iter().map(|s| canonical(s)).collect::<Vec<_>>(),
            "{name}: upstream bytes, fast (left) vs Pingora's"
        );
        if name == "an intercepted upstream error" {
            assert!(a.1.starts_with("replaced 502 "), "{name}: {:?}", a.1);
        }
        let heads = |seen: &[String]| seen.iter().filter(|s| !s.starts_with("BODY")).count();
        match must_see {
            None => assert!(a.2.is_empty(), "{name}: forwarded {:?}", a.2),
            Some(text) => {
                assert!(
                    a.2.iter().any(|s| s.contains(text)),
                    "{name}: {text:?} not in {:?}",
                    a.2
                );
                assert_eq!(heads(&a.2), 1, "{name}: one request upstream");
            }
        }
        for seen in &a.2 {
            assert!(
                !seen.contains("6.6.6.6"),
                "{name}: spoofed element forwarded: {seen}"
            );
            assert!(!seen.contains('#'), "{name}: fragment forwarded: {seen}");
        }
        let want = if served == Served::Fast { 1.0 } else { 0.0 };
        assert_eq!(carried, want, "{name}: served by {served:?}?");
    }
    assert_eq!(
        full.metric("rampart_http1_fast_path_requests_total").await,
        0.0
    );
}

/// A raw HTTP/2 connection over TLS to a proxy's HTTPS listener, for requests no
/// client library sends (a `host` that differs from `:authority`, a Content-Length
/// the DATA frames do not match).
struct RawH2 {
    tls: tokio_rustls::client::TlsStream<TcpStream>,
}

/// An HPACK literal field without indexing (new name, no Huffman coding).
fn literal(name: &str, value: &str) -> Vec<u8> {
    let mut b = vec![0, u8::try_from(name.len()).unwrap()];
    b.extend_from_slice(name.as_bytes());
    b.push(u8::try_from(value.len()).unwrap());
    b.extend_from_slice(value.as_bytes());
    b
}

/// A header block: `:method` (GET 0x82 / POST 0x83), `:scheme https`, `:path /`,
/// `:authority` and the other fields.
fn block(post: bool, authority: &str, fields: &[(&str, &str)]) -> Vec<u8> {
    let mut b = vec![if post { 0x83 } else { 0x82 }, 0x87, 0x84, 0x01];
    b.push(u8::try_from(authority.len()).unwrap());
    b.extend_from_slice(authority.as_bytes());
    for (n, v) in fields {
        b.extend_from_slice(&literal(n, v));
    }
    b
}

/// What came back on stream 1: the response's first header byte (0x88 is `:status
/// 200`, 0x8c 400) or a reset.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum StreamEnd {
    Answered(u8),
    Reset,
    ConnectionClosed,
}

impl RawH2 {
    async fn connect(proxy: &Proxy) -> Self {
        Self {
            tls: common::h2::connect(proxy).await,
        }
    }

    /// Sends `frames` (stream 1) and reads until stream 1 is answered or reset. When the
    /// client resets stream 1 itself (`resets`), the proxy sends nothing for it: then a
    /// plain GET follows on stream 3, and its answer shows that the proxy has read
    /// stream 1's frames (`None`: nothing came for stream 1).
    async fn exchange(mut self, name: &str, frames: &[u8], resets: bool) -> Option<StreamEnd> {
        let follow = if resets {
            frame(
                HEADERS,
                END_HEADERS | END_STREAM,
                3,
                &block(false, "a.test", &[("x-request-id", "t-3")]),
            )
        } else {
            Vec::new()
        };
        if self
            .tls
            .write_all(&[frames, &follow[..]].concat())
            .await
            .is_err()
        {
            return Some(StreamEnd::ConnectionClosed);
        }
        let mut buf = Vec::new();
        let mut first = None;
        let read = async {
            while let Some(f) = next_frame(&mut self.tls, &mut buf).await {
                // A response's first header byte (a HEADERS frame always has one).
                let end = || StreamEnd::Answered(f.payload[0]);
                match (f.kind, f.stream) {
                    (HEADERS, 1) if !resets => return Some(end()),
                    (RST_STREAM, 1) if !resets => return Some(StreamEnd::Reset),
                    (HEADERS, 1) => first = first.or(Some(end())),
                    (RST_STREAM, 1) => first = first.or(Some(StreamEnd::Reset)),
                    (HEADERS, 3) => return first,
                    (GOAWAY, _) => return first.or(Some(StreamEnd::ConnectionClosed)),
                    _ => {}
                }
            }
            first.or(Some(StreamEnd::ConnectionClosed))
        };
        tokio::time::timeout(DEADLINE, read)
            .await
            .unwrap_or_else(|_| panic!("{name}: no answer in time"))
    }
}

/// The HTTP/2 corpus: (case, frames of stream 1, must the upstream see a request).
fn http2_corpus() -> Vec<(&'static str, Vec<u8>, bool)> {
    let id = [("x-request-id", "t-2")];
    let headers = |post: bool, authority: &str, fields: &[(&str, &str)], end: bool| {
        let mut all = id.to_vec();
        all.extend_from_slice(fields);
        let flags = END_HEADERS | if end { END_STREAM } else { 0 };
        frame(HEADERS, flags, 1, &block(post, authority, &all))
    };
    vec![
        ("plain GET", headers(false, "a.test", &[], true), true),
        (
            "request header edits",
            headers(
                false,
                "edited.test",
                &[("x-env", "dev"), ("x-debug", "1"), ("x-keep", "1")],
                true,
            ),
            true,
        ),
        // Defect 5: :authority and host must agree.
        (
            "host differs from :authority",
            headers(false, "a.test", &[("host", "b.test")], true),
            false,
        ),
        (
            "crafted :authority",
            headers(false, "a.test\", for=6.6.6.6", &[], true),
            false,
        ),
        // Defect 6: a Content-Length the DATA frames do not match.
        (
            "length declared, stream ended with the head",
            headers(true, "a.test", &[("content-length", "23")], true),
            false,
        ),
        (
            "length declared, empty DATA ends the stream",
            [
                headers(true, "a.test", &[("content-length", "23")], false),
                frame(DATA, END_STREAM, 1, b""),
            ]
            .concat(),
            false,
        ),
        (
            "length declared, stream reset",
            [
                headers(true, "a.test", &[("content-length", "23")], false),
                frame(DATA, 0, 1, b"short"),
                frame(RST_STREAM, 0, 1, &8u32.to_be_bytes()),
            ]
            .concat(),
            false,
        ),
        // Defect 2: HTTP/2 has no connection-specific fields at all (RFC 9113 §8.2.2).
        (
            "connection field",
            headers(false, "a.test", &[("connection", "host")], true),
            false,
        ),
        // Defect 3: CONNECT (no :scheme, no :path) is refused, never tunnelled.
        (
            "CONNECT",
            frame(HEADERS, END_HEADERS | END_STREAM, 1, &{
                let mut b = vec![0x02, 7];
                b.extend_from_slice(b"CONNECT");
                b.extend_from_slice(&[0x01, 10]);
                b.extend_from_slice(b"a.test:443");
                b
            }),
            false,
        ),
        // Defect 4: a fragment in :path goes upstream as the path that was routed.
        (
            "fragment in :path",
            frame(HEADERS, END_HEADERS | END_STREAM, 1, &{
                let mut b = vec![0x82, 0x87, 0x04, 17];
                b.extend_from_slice(b"/public#/../admin");
                b.extend_from_slice(&[0x01, 6]);
                b.extend_from_slice(b"a.test");
                b.extend_from_slice(&literal("x-request-id", "t-2"));
                b
            }),
            true,
        ),
        (
            "body as declared",
            [
                headers(true, "a.test", &[("content-length", "5")], false),
                frame(DATA, END_STREAM, 1, b"hello"),
            ]
            .concat(),
            true,
        ),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_requests_are_refused_or_forwarded_alike_on_both_paths() {
    common::init();
    let upstream = Recorder::start().await;
    let fast = Proxy::start(&config(upstream.addr)).await;
    let full = Proxy::start_with(
        "http1_fast_path = false\nhttp2_fast_path = false",
        &config(upstream.addr),
    )
    .await;
    for (name, frames, forwarded) in http2_corpus() {
        let mut ends = Vec::new();
        let mut seen = Vec::new();
        for proxy in [&fast, &full] {
            let end = RawH2::connect(proxy)
                .await
                .exchange(name, &frames, name.contains("reset"))
                .await;
            // What reached the upstream, once the proxy is done with the stream (a
            // forwarded request is answered only after the upstream saw it).
            ends.push(end);
            let mut got = upstream.take();
            got.retain(|s| !s.contains("t-3"));
            seen.push(got);
        }
        if forwarded {
            assert_eq!(ends, [Some(StreamEnd::Answered(0x88)); 2], "{name}");
            for head in seen.iter().flatten() {
                assert!(
                    !head.contains('#'),
                    "{name}: a fragment went upstream: {head}"
                );
            }
            assert_eq!(
                seen[0].iter().map(|s| canonical(s)).collect::<Vec<_>>(),
                seen[1].iter().map(|s| canonical(s)).collect::<Vec<_>>(),
                "{name}: upstream bytes, fast (left) vs Pingora's"
            );
        } else {
            for (end, seen) in ends.iter().zip(&seen) {
                // Refused (any status but 200, whose first header byte is 0x88), reset,
                // or (a stream the client reset) left alone.
                let refused = match end {
                    None | Some(StreamEnd::Reset | StreamEnd::ConnectionClosed) => true,
                    Some(StreamEnd::Answered(first)) => *first != 0x88,
                };
                assert!(refused, "{name}: {end:?}");
                assert!(seen.is_empty(), "{name}: the upstream got {seen:?}");
            }
        }
    }
}

/// Ten requests that time out on one path, with 60 ordinary GETs meanwhile and 20
/// after: the statuses of the ordinary ones and of the hanging ones.
async fn hang_and_serve(client: &reqwest::Client, base: &str) -> (Vec<u16>, Vec<u16>) {
    let hanging: Vec<_> = (0..10)
        .map(|_| {
            let c = client.clone();
            let url = format!("{base}/slow/60000");
            tokio::spawn(async move { c.get(url).send().await.map(|r| r.status().as_u16()) })
        })
        .collect();
    let mut ordinary = Vec::new();
    for _ in 0..60 {
        let r = client.get(format!("{base}/")).send().await.unwrap();
        ordinary.push(r.status().as_u16());
    }
    let mut timed_out = Vec::new();
    for h in hanging {
        timed_out.push(h.await.unwrap().unwrap());
    }
    // After all ten timed out (and the endpoint was ejected), the pool still serves.
    for _ in 0..20 {
        let r = client.get(format!("{base}/")).send().await.unwrap();
        ordinary.push(r.status().as_u16());
    }
    (ordinary, timed_out)
}

/// Defect 7 of the black-box battery: requests that time out on one path of a
/// single-endpoint pool must not take the pool offline for every other path, a
/// timed-out GET is not retried on the endpoint that timed out, and a pool whose only
/// endpoint was down serves again with the first request after it is back. Both paths,
/// HTTP/1 and HTTP/2.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeouts_on_one_path_never_take_the_pool_offline() {
    common::init();
    let backend = common::Backend::start("b").await;
    // Default passive health and retries; only the first-byte timeout is short, so
    // that the hanging requests end in a second rather than thirty.
    let body = format!(
        "[[tls]]\nhosts = [\"a.test\"]\nsource = \"internal\"\n\n\
         [[routes]]\nname = \"all\"\naction = {{ forward = \"p\" }}\n\n[pools.p]\nendpoints = [{{ address = \"{}\" }}]\ntimeouts = {{ first_byte = \"1s\" }}\n",
        backend.addr
    );
    let fast = Proxy::start(&body).await;
    let full = Proxy::start_with("http1_fast_path = false\nhttp2_fast_path = false", &body).await;
    for proxy in [&fast, &full] {
        let h2 = proxy.client(&["a.test"]);
        let h2_base = format!("https://a.test:{}", proxy.https.port());
        let transports = [
            ("HTTP/1", Proxy::http_client(), proxy.url("")),
            ("HTTP/2", h2, h2_base),
        ];
        for (name, client, base) in transports {
            let hits = backend.hits();
            let (ordinary, timed_out) = hang_and_serve(&client, &base).await;
            assert!(
                ordinary.iter().all(|&s| s == 200),
                "{name}: ordinary GETs: {ordinary:?}"
            );
            assert_eq!(timed_out, vec![504; 10], "{name}");
            // Each request reached the one endpoint once: no retry went back to it.
            assert_eq!(
                backend.hits() - hits,
                10 + 80,
                "{name}: requests the backend saw"
            );
            let status = proxy.status().await;
            let endpoint = &status["pools"]["p"]["endpoints"][0];
            assert!(
                endpoint["ejected_for_ms"].is_u64(),
                "{name}: ejected after ten timeouts: {endpoint}"
            );
            assert_eq!(status["pools"]["p"]["panic"], true, "{name}: {status}");
            assert!(proxy.metric("rampart_pool_panic{pool=\"p\"}").await >= 1.0);
        }
    }
}

/// A pool whose only endpoint refused connections (and was ejected for it) answers
/// 200 again with the first request after the endpoint is back, not when the ejection
/// ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_recovers_with_the_first_request_after_its_endpoint_returns() {
    common::init();
    let addr = common::free_addr();
    let body = format!(
        "[[tls]]\nhosts = [\"a.test\"]\nsource = \"internal\"\n\n\
         [[routes]]\nname = \"all\"\naction = {{ forward = \"p\" }}\n\n[pools.p]\nendpoints = [{{ address = \"{addr}\" }}]\n"
    );
    let fast = Proxy::start(&body).await;
    let full = Proxy::start_with("http1_fast_path = false\nhttp2_fast_path = false", &body).await;
    let h1 = Proxy::http_client();
    // One round per transport: the endpoint is down (502s eject it), comes back, and
    // the first request over that transport gets 200, on both paths.
    for transport in ["HTTP/1", "HTTP/2"] {
        let get = |proxy: &Proxy| {
            let (client, url) = if transport == "HTTP/1" {
                (h1.clone(), proxy.url("/"))
            } else {
                let url = format!("https://a.test:{}/", proxy.https.port());
                (proxy.client(&["a.test"]), url)
            };
            async move { client.get(url).send().await.unwrap().status().as_u16() }
        };
        for proxy in [&fast, &full] {
            for _ in 0..20 {
                assert_eq!(get(proxy).await, 502, "{transport}: nothing listens yet");
            }
        }
        // Both ejected when the endpoint comes back, so that a 200 proves the recovery
        // does not wait for the ejection to end. An endpoint that has never answered is
        // ejected for a second at first: more failures eject it again once that ends.
        for proxy in [&fast, &full] {
            common::eventually(
                &format!("{transport}: the endpoint to be ejected"),
                || async {
                    let status = proxy.status().await;
                    let left = status["pools"]["p"]["endpoints"][0]["ejected_for_ms"].as_u64();
                    if left.is_some_and(|ms| ms >= 500) {
                        return Some(());
                    }
                    assert_eq!(get(proxy).await, 502, "{transport}: nothing listens yet");
                    None
                },
            )
            .await;
        }
        // The endpoint comes back on its address. Its connections live in a JoinSet
        // owned by the accept task, so aborting that task closes them all.
        let listener = TcpListener::bind(addr).await.unwrap();
        let server = tokio::spawn(async move {
            let mut connections = tokio::task::JoinSet::new();
            while let Ok((mut s, _)) = listener.accept().await {
                connections.spawn(async move {
                    let mut buf = [0u8; 4096];
                    while let Ok(n) = s.read(&mut buf).await {
                        let ok = b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nback";
                        if n == 0 || s.write_all(ok).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        for proxy in [&fast, &full] {
            assert_eq!(
                get(proxy).await,
                200,
                "{transport}: the first request after the return"
            );
        }
        // Down again for the next round: the listener and its connections go.
        server.abort();
        let _ = server.await;
    }
}

/// Sends a body of `len` declared bytes one byte every 2 s; how long until the proxy
/// cut the request (answered or closed), or `None` if it had not after 20 s.
async fn trickle(proxy: &Proxy) -> Option<Duration> {
    let started = Instant::now();
    let mut s = TcpStream::connect(proxy.http).await.unwrap();
    let head = "POST /up HTTP/1.1\r\nHost: up.test\r\nContent-Length: 1000\r\n\r\n";
    s.write_all(head.as_bytes()).await.unwrap();
    let mut buf = [0u8; 1024];
    while started.elapsed() < Duration::from_secs(20) {
        if s.write_all(b"x").await.is_err() {
            return Some(started.elapsed());
        }
        // Waiting for the proxy's answer is the pacing of the trickle.
        if let Ok(r) = tokio::time::timeout(Duration::from_secs(2), s.read(&mut buf)).await {
            let _ = r;
            return Some(started.elapsed());
        }
    }
    None
}

/// Asks for 16 MiB (with a small receive buffer, so that the kernel cannot hold it
/// all) and reads nothing for 15 s: the bytes it gets after that.
async fn stalled_reader(proxy: &Proxy) -> usize {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(64 * 1024).unwrap();
    let mut s = socket.connect(proxy.http).await.unwrap();
    s.write_all(b"GET /bytes/16777216 HTTP/1.1\r\nHost: a.test\r\n\r\n")
        .await
        .unwrap();
    // The stall is the stimulus, not a synchronisation.
    tokio::time::sleep(Duration::from_secs(15)).await;
    let mut got = 0;
    let mut buf = vec![0u8; 1 << 16];
    let read_all = async {
        while let Ok(n) = s.read(&mut buf).await {
            if n == 0 {
                break;
            }
            got += n;
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(20), read_all).await;
    got
}

/// Uploads 200 KiB at about 50 KB/s; the status.
async fn slow_upload(proxy: &Proxy) -> u16 {
    let mut s = TcpStream::connect(proxy.http).await.unwrap();
    let len = 200 * 1024;
    let head = format!("POST /up HTTP/1.1\r\nHost: up.test\r\nContent-Length: {len}\r\n\r\n");
    s.write_all(head.as_bytes()).await.unwrap();
    let mut ticker = tokio::time::interval(Duration::from_millis(100));
    for _ in 0..len / 5120 {
        ticker.tick().await;
        s.write_all(&[b'u'; 5120]).await.unwrap();
    }
    read_response(&mut s).await.0
}

/// Reads a 1 MiB response at about 64 KB/s; the bytes received.
async fn slow_reader(proxy: &Proxy) -> usize {
    let mut s = TcpStream::connect(proxy.http).await.unwrap();
    s.write_all(b"GET /bytes/1048576 HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut got = 0;
    let mut buf = vec![0u8; 8192];
    let mut ticker = tokio::time::interval(Duration::from_millis(125));
    let read_all = async {
        loop {
            ticker.tick().await;
            match s.read(&mut buf).await {
                Ok(n) if n > 0 => got += n,
                _ => break,
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(40), read_all).await;
    got
}

/// Over HTTP/2: a body of 1000 declared bytes sent one byte in a DATA frame every
/// 2 s; how long until the proxy cut the stream (an answer, a reset, the connection
/// closed), or `None` if it had not after 20 s.
async fn trickle_h2(proxy: &Proxy) -> Option<Duration> {
    let started = Instant::now();
    let tls = common::h2::connect(proxy).await;
    let (mut rx, mut tx) = tokio::io::split(tls);
    let head = block(true, "up.test", &[("content-length", "1000")]);
    tx.write_all(&frame(HEADERS, END_HEADERS, 1, &head))
        .await
        .unwrap();
    let cut = async {
        let mut buf = Vec::new();
        while let Some(f) = next_frame(&mut rx, &mut buf).await {
            if f.stream == 1 && (f.kind == HEADERS || f.kind == RST_STREAM) || f.kind == GOAWAY {
                return;
            }
        }
    };
    let send = async {
        let mut tick = tokio::time::interval(Duration::from_secs(2));
        while started.elapsed() < Duration::from_secs(20) {
            tick.tick().await;
            if tx.write_all(&frame(DATA, 0, 1, b"x")).await.is_err() {
                return;
            }
        }
        // Not cut: wait for nothing more.
        std::future::pending::<()>().await;
    };
    tokio::select! {
        () = cut => Some(started.elapsed()),
        () = send => None,
        () = tokio::time::sleep(Duration::from_secs(21)) => None,
    }
}

/// Over HTTP/2: asks for 16 MiB and never opens the flow-control window past the
/// initial 64 KiB; how long until the proxy gave the stream up (a reset, the connection
/// closed), or `None` if it had not after 25 s.
async fn stalled_reader_h2(proxy: &Proxy) -> Option<Duration> {
    let started = Instant::now();
    let mut tls = common::h2::connect(proxy).await;
    let mut head = vec![0x82, 0x87, 0x04, 15];
    head.extend_from_slice(b"/bytes/16777216");
    head.extend_from_slice(&[0x01, 6]);
    head.extend_from_slice(b"a.test");
    tls.write_all(&frame(HEADERS, END_HEADERS | END_STREAM, 1, &head))
        .await
        .unwrap();
    let given_up = async {
        let mut buf = Vec::new();
        while let Some(f) = next_frame(&mut tls, &mut buf).await {
            if f.stream == 1 && f.kind == RST_STREAM || f.kind == GOAWAY {
                return;
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(25), given_up)
        .await
        .ok()
        .map(|()| started.elapsed())
}

/// What [`slow_clients`] saw.
struct SlowClients {
    /// How long each trickled body lasted (HTTP/1, HTTP/1, HTTP/2).
    trickles: Vec<Option<Duration>>,
    /// Bytes an HTTP/1 reader got after stalling 15 s.
    stalled: usize,
    /// When the proxy gave up on an HTTP/2 reader that opened no window.
    stalled_h2: Option<Duration>,
    /// The 50 KB/s upload's status.
    upload: u16,
    /// Bytes the 64 KB/s reader got.
    read: usize,
}

/// Two trickled bodies (HTTP/1), one over HTTP/2, a stalled reader, a slow upload and
/// a slow reader, at once.
async fn slow_clients(proxy: &Proxy) -> SlowClients {
    let (t1, t2, t3, stalled, stalled_h2, upload, read) = tokio::join!(
        trickle(proxy),
        trickle(proxy),
        trickle_h2(proxy),
        stalled_reader(proxy),
        stalled_reader_h2(proxy),
        slow_upload(proxy),
        slow_reader(proxy)
    );
    SlowClients {
        trickles: vec![t1, t2, t3],
        stalled,
        stalled_h2,
        upload,
        read,
    }
}

/// Defect 8: under the default limits a trickled request body and a reader that
/// stopped reading are cut within 20 s, while a 50 KB/s upload and a reader on a
/// 64 KB/s link complete. Both paths, at once; the trickle and the stalled reader over
/// HTTP/1 and HTTP/2.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn default_limits_cut_slow_attacks_and_serve_slow_clients() {
    common::init();
    let backend = common::Backend::start("b").await;
    let upstream = Recorder::start().await;
    let body = format!(
        "[[tls]]\nhosts = [\"a.test\", \"up.test\"]\nsource = \"internal\"\n\n\
         [[routes]]\nname = \"up\"\nhosts = [\"up.test\"]\naction = {{ forward = \"up\" }}\n\n\
         [[routes]]\nname = \"all\"\naction = {{ forward = \"p\" }}\n\n\
         [pools.up]\nendpoints = [{{ address = \"{}\" }}]\n\n\
         [pools.p]\nendpoints = [{{ address = \"{}\" }}]\n",
        upstream.addr, backend.addr
    );
    let fast = Proxy::start(&body).await;
    let full = Proxy::start_with("http1_fast_path = false\nhttp2_fast_path = false", &body).await;
    let (a, b) = tokio::join!(slow_clients(&fast), slow_clients(&full));
    for (name, seen) in [("fast", a), ("full", b)] {
        let SlowClients {
            trickles,
            stalled,
            stalled_h2,
            upload,
            read,
        } = seen;
        assert!(
            stalled_h2.is_some_and(|t| t < Duration::from_secs(20)),
            "{name}: an HTTP/2 reader that opened no window held its stream {stalled_h2:?}"
        );
        for t in trickles {
            // Cut by the body-rate rule once its grace (body_read_timeout, 10 s) is
            // over, not at once for some other reason, and within 20 s.
            assert!(
                t.is_some_and(|t| t > Duration::from_secs(9) && t < Duration::from_secs(20)),
                "{name}: a trickled body lasted {t:?}"
            );
        }
        assert!(
            stalled < 16 << 20,
            "{name}: a reader stalled for 15 s still got all 16 MiB"
        );
        assert_eq!(upload, 200, "{name}: the 50 KB/s upload");
        assert!(
            read >= 1 << 20,
            "{name}: the 64 KB/s reader got {read} bytes"
        );
    }
}
