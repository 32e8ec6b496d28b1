//! The HTTP/1 fast path (`rampart_proxy::h1`) through a real `rampart proxy`: it answers
//! what the full Pingora path answers, frames chunked, close-delimited and interim
//! responses right, keeps client and upstream connections alive, and recovers from
//! pooled upstream connections that the upstream closed.
#![allow(missing_docs, clippy::unwrap_used)]

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{free_addr, pool_toml, Backend, Proxy};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// An upstream that writes exact bytes, for framing the hyper backend never produces.
struct RawUpstream {
    addr: SocketAddr,
    connections: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for RawUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl RawUpstream {
    async fn start() -> RawUpstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let connections = Arc::new(AtomicUsize::new(0));
        let count = connections.clone();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(serve_raw(stream));
            }
        });
        RawUpstream {
            addr,
            connections,
            task,
        }
    }
}

/// Answers each request by its path; `close` paths end the connection after answering.
async fn serve_raw(mut stream: TcpStream) {
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
        let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
        buf.drain(..head_end);
        let path = head.split(' ').nth(1).unwrap_or("/").to_string();
        // A Content-Length body is read whole; /echo answers it back.
        let length: usize = head
            .lines()
            .filter_map(|l| l.split_once(':'))
            .find(|(n, _)| n.eq_ignore_ascii_case("content-length"))
            .map_or(0, |(_, v)| v.trim().parse().unwrap());
        while buf.len() < length {
            let mut chunk = [0u8; 4096];
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        let body: Vec<u8> = buf.drain(..length).collect();
        if path == "/echo" {
            let mut response = format!(
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nX-Method: {}\r\n\r\n",
                body.len(),
                head.split(' ').next().unwrap_or("")
            )
            .into_bytes();
            response.extend_from_slice(&body);
            if stream.write_all(&response).await.is_err() {
                return;
            }
            continue;
        }
        let (response, close): (&[u8], bool) = match path.as_str() {
            "/chunked" => (
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-Kind: chunked\r\n\r\n\
                  5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\nx-t: 1\r\n\r\n",
                false,
            ),
            "/close" => (
                b"HTTP/1.1 200 OK\r\nX-Kind: close\r\n\r\nuntil the upstream closes",
                true,
            ),
            "/early" => (
                b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>\r\n\r\n\
                  HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nafter",
                false,
            ),
            "/hop" => (
                b"HTTP/1.1 200 OK\r\nConnection: x-internal\r\nX-Internal: secret\r\n\
                  Keep-Alive: timeout=5\r\nX-Kept: yes\r\nContent-Length: 2\r\n\r\nok",
                false,
            ),
            // Closes after answering without saying so, as an upstream whose idle
            // timeout fires right after a response does.
            "/oneshot" => (b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\none", true),
            _ => (b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nraw", false),
        };
        if stream.write_all(response).await.is_err() || close {
            return;
        }
    }
}

fn config(backend: &Arc<Backend>, raw: &RawUpstream) -> String {
    format!(
        r#"
[[routes]]
name = "hyper"
hosts = ["a.test"]
action = {{ forward = "hyper" }}

[[routes]]
name = "raw"
hosts = ["raw.test"]
action = {{ forward = "raw" }}

[[routes]]
name = "dead"
hosts = ["dead.test"]
action = {{ forward = "dead" }}

[[routes]]
name = "strip"
hosts = ["strip.test"]
path_prefix = "/api"
strip_prefix = true
action = {{ forward = "hyper" }}

[[routes]]
name = "private"
hosts = ["private.test"]
allow_from = ["10.0.0.0/8", "192.0.2.7"]
action = {{ forward = "hyper" }}

[[routes]]
name = "edit"
hosts = ["edit.test"]
action = {{ forward = "hyper" }}
request_headers = {{ set = {{ "X-Env" = "prod", "Host" = "up.internal" }}, remove = ["X-Debug", "X-Forwarded-Host"] }}
response_headers = {{ set = {{ "Strict-Transport-Security" = "max-age=60" }}, remove = ["X-Backend"] }}

{}

[pools.raw]
endpoints = [{{ address = "{}" }}]

[pools.dead]
endpoints = [{{ address = "{}" }}]
"#,
        pool_toml("hyper", "round_robin", &[backend], ""),
        raw.addr,
        free_addr()
    )
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .http1_only()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

/// Extra request headers.
type Headers<'a> = &'a [(&'a str, &'a str)];

/// Status, the headers that framing and time do not change, and the body.
async fn answer(
    proxy: &Proxy,
    method: &str,
    host: &str,
    path: &str,
    headers: Headers<'_>,
) -> (u16, BTreeMap<String, String>, String) {
    let mut req = client()
        .request(method.parse().unwrap(), proxy.url(path))
        .header("host", host);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    let mut kept = BTreeMap::new();
    for (name, value) in resp.headers() {
        let name = name.as_str();
        assert_ne!(
            name, "x-internal",
            "a header named by Connection was forwarded"
        );
        if matches!(
            name,
            "date" | "content-length" | "transfer-encoding" | "connection" | "x-request-id"
        ) {
            continue;
        }
        kept.insert(name.to_string(), value.to_str().unwrap().to_string());
    }
    let id = resp.headers()["x-request-id"].to_str().unwrap().to_string();
    let mut body = resp.text().await.unwrap();
    // /headers answers a JSON object in no particular order.
    if let Ok(mut map) = serde_json::from_str::<BTreeMap<String, String>>(&body) {
        common::started_trace(&mut map);
        body = format!("{map:?}");
    } else if status >= 400 {
        // The proxy's own answers name the request id, which differs between proxies.
        body = body.replace(&id, "<id>");
    }
    (status, kept, body)
}

#[tokio::test]
async fn the_fast_path_answers_what_the_full_path_answers() {
    common::init();
    let backend = Backend::start("hyper").await;
    let raw = RawUpstream::start().await;
    let fast = Proxy::start(&config(&backend, &raw)).await;
    let full = Proxy::start_with("http1_fast_path = false", &config(&backend, &raw)).await;
    let spoofing: Headers = &[
        ("x-forwarded-for", "203.0.113.9"),
        ("forwarded", "for=203.0.113.9"),
        ("connection", "x-secret"),
        ("x-secret", "do not forward"),
        ("keep-alive", "timeout=1"),
        ("x-custom", "kept"),
        ("x-request-id", "abc-123"),
    ];
    let cases: &[(&str, &str, &str, Headers)] = &[
        ("GET", "a.test", "/", &[]),
        ("HEAD", "a.test", "/", &[]),
        ("GET", "a.test", "/headers", spoofing),
        ("GET", "a.test", "/status/503", &[]),
        ("GET", "a.test", "/status/404", &[]),
        ("GET", "a.test", "/bytes/200000", &[]),
        ("GET", "a.test", "/bytes/40000", &[]),
        ("DELETE", "a.test", "/", &[]),
        ("GET", "a.test", "/", &[("connection", "close")]),
        ("GET", "raw.test", "/chunked", &[]),
        ("GET", "raw.test", "/close", &[]),
        ("GET", "raw.test", "/early", &[]),
        ("GET", "raw.test", "/hop", &[]),
        ("GET", "dead.test", "/", &[]),
        ("GET", "nowhere.test", "/", &[]),
        ("GET", "a.test", "/a/../b", &[]),
        (
            "GET",
            "strip.test",
            "/api/headers?x=1",
            &[("x-request-id", "s-1")],
        ),
        ("GET", "strip.test", "/api", &[]),
        ("GET", "strip.test", "/apix/headers", &[]),
        ("GET", "edit.test", "/headers", EDITED),
        ("GET", "edit.test", "/status/404", &[]),
        (
            "GET",
            "private.test",
            "/",
            &[("x-forwarded-for", "10.0.0.1")],
        ),
    ];
    for (method, host, path, headers) in cases {
        let before = fast.metric("rampart_http1_fast_path_requests_total").await;
        let a = answer(&fast, method, host, path, headers).await;
        // Every case is one the fast path carries (it answers what the policy answers,
        // 404s and 403s included): the comparison is never the full path with itself.
        let carried = fast.metric("rampart_http1_fast_path_requests_total").await - before;
        assert_eq!(
            carried, 1.0,
            "{method} {host}{path} was not served by the fast path"
        );
        let b = answer(&full, method, host, path, headers).await;
        assert_eq!(a, b, "{method} {host}{path}: fast path (left) vs full path");
    }
    // The upstream saw the forwarding headers set, not the client's, and no hop-by-hop.
    let (_, _, seen) = answer(&fast, "GET", "a.test", "/headers", spoofing).await;
    for expected in [
        r#""x-forwarded-for": "127.0.0.1""#,
        r#""x-forwarded-proto": "http""#,
        r#""x-request-id": "abc-123""#,
        r#""x-custom": "kept""#,
    ] {
        assert!(seen.contains(expected), "{expected} not in {seen}");
    }
    for gone in ["x-secret", "keep-alive", "connection"] {
        assert!(
            !seen.contains(&format!("\"{gone}\"")),
            "{gone} reached the upstream: {seen}"
        );
    }
    // Header rules: the upstream and the client got the edited headers, on either path.
    for proxy in [&fast, &full] {
        let (_, kept, seen) = answer(proxy, "GET", "edit.test", "/headers", EDITED).await;
        assert_edited(&kept, &seen);
        // allow_from: 127.0.0.1 is not in the list, and an untrusted client's
        // X-Forwarded-For does not change who it is.
        let spoof: Headers = &[("x-forwarded-for", "10.0.0.1")];
        let (status, _, _) = answer(proxy, "GET", "private.test", "/", spoof).await;
        assert_eq!(status, 403);
    }
    // strip_prefix: the upstream got the path without the prefix, and the prefix in
    // X-Forwarded-Prefix (a client's own value replaced), on either path.
    for proxy in [&fast, &full] {
        let spoof: Headers = &[("x-forwarded-prefix", "/evil")];
        let (status, _, seen) = answer(proxy, "GET", "strip.test", "/api/headers?x=1", spoof).await;
        assert_eq!(status, 200);
        assert!(seen.contains(r#"":path": "/headers?x=1""#), "{seen}");
        assert!(seen.contains(r#""x-forwarded-prefix": "/api""#), "{seen}");
    }
    // The full path served everything on the proxy that has the fast path off.
    assert_eq!(
        full.metric("rampart_http1_fast_path_requests_total").await,
        0.0
    );
}

/// Sends `request` on `stream` and reads one response whose end is `end` (or EOF).
async fn exchange(stream: &mut TcpStream, request: &str, end: &[u8]) -> String {
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut got = Vec::new();
    let read = async {
        let mut chunk = [0u8; 4096];
        while !got.ends_with(end) {
            match stream.read(&mut chunk).await.unwrap() {
                0 => break,
                n => got.extend_from_slice(&chunk[..n]),
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), read)
        .await
        .expect("a response within 10 s");
    String::from_utf8(got).unwrap()
}

#[tokio::test]
async fn responses_are_framed_as_the_upstream_framed_them() {
    common::init();
    let backend = Backend::start("hyper").await;
    let raw = RawUpstream::start().await;
    let proxy = Proxy::start(&config(&backend, &raw)).await;
    let mut conn = TcpStream::connect(proxy.http).await.unwrap();

    // Chunked with an extension and a trailer: passed through as sent, and the
    // connection carries the next request.
    let chunked = exchange(
        &mut conn,
        "GET /chunked HTTP/1.1\r\nHost: raw.test\r\n\r\n",
        b"x-t: 1\r\n\r\n",
    )
    .await;
    assert!(chunked.starts_with("HTTP/1.1 200 OK\r\n"), "{chunked}");
    assert!(
        chunked.ends_with("\r\n\r\n5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\nx-t: 1\r\n\r\n"),
        "{chunked}"
    );
    // The 103 is not forwarded (the client did not ask for hints); the 200 is.
    let early = exchange(
        &mut conn,
        "GET /early HTTP/1.1\r\nHost: raw.test\r\n\r\n",
        b"after",
    )
    .await;
    assert!(early.starts_with("HTTP/1.1 200 OK\r\n"), "{early}");
    let hop = exchange(
        &mut conn,
        "GET /hop HTTP/1.1\r\nHost: raw.test\r\n\r\n",
        b"ok",
    )
    .await;
    let lower = hop.to_ascii_lowercase();
    assert!(
        lower.contains("x-kept: yes") && !lower.contains("x-internal"),
        "{hop}"
    );
    assert!(!lower.contains("keep-alive"), "{hop}");

    // Delimited by the upstream closing: the client is told, and its connection ends.
    let close = exchange(
        &mut conn,
        "GET /close HTTP/1.1\r\nHost: raw.test\r\n\r\n",
        b"\0",
    )
    .await;
    assert!(
        close.to_ascii_lowercase().contains("connection: close\r\n"),
        "{close}"
    );
    assert!(
        close.ends_with("\r\n\r\nuntil the upstream closes"),
        "{close}"
    );
    let mut rest = [0u8; 16];
    assert_eq!(
        conn.read(&mut rest).await.unwrap(),
        0,
        "the connection stays open"
    );

    // A client's Connection: close is honoured.
    let mut conn = TcpStream::connect(proxy.http).await.unwrap();
    let bye = exchange(
        &mut conn,
        "GET / HTTP/1.1\r\nHost: raw.test\r\nConnection: close\r\n\r\n",
        b"raw",
    )
    .await;
    assert!(
        bye.to_ascii_lowercase().contains("connection: close\r\n"),
        "{bye}"
    );
    assert_eq!(conn.read(&mut rest).await.unwrap(), 0);
    assert!(proxy.metric("rampart_http1_fast_path_requests_total").await >= 5.0);
}

#[tokio::test]
async fn upstream_connections_are_reused_and_stale_ones_replaced() {
    common::init();
    let backend = Backend::start("hyper").await;
    let raw = RawUpstream::start().await;
    let proxy = Proxy::start(&config(&backend, &raw)).await;
    let c = client();
    for _ in 0..50 {
        let r = c
            .get(proxy.url("/"))
            .header("host", "a.test")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.text().await.unwrap(), "hyper");
    }
    // One client connection lives on one worker, whose pool keeps one upstream
    // connection warm.
    let upstream = backend.connections.load(Ordering::SeqCst);
    assert!(
        upstream <= 2,
        "{upstream} upstream connections for 50 requests"
    );

    // The upstream closes each connection after answering: every pooled connection is
    // stale by the next request, which must still succeed and not count as a failure.
    for i in 0..30 {
        let r = c
            .get(proxy.url("/oneshot"))
            .header("host", "raw.test")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "request {i}");
        assert_eq!(r.text().await.unwrap(), "one");
    }
    assert_eq!(raw.connections.load(Ordering::SeqCst), 30);
    let metrics = proxy.metrics().await;
    assert!(
        !metrics.contains("rampart_upstream_failures_total{"),
        "stale pooled connections counted as upstream failures:\n{metrics}"
    );
}

/// The routes of [`config`] served over HTTPS with certificates of the internal CA.
/// Request headers that `edit.test`'s rules change.
const EDITED: Headers = &[("x-debug", "1"), ("x-keep", "yes"), ("x-request-id", "e-1")];

/// What `edit.test`'s rules make of a `/headers` exchange: `kept` the response
/// headers, `seen` the request headers the upstream reports.
fn assert_edited(kept: &BTreeMap<String, String>, seen: &str) {
    assert_eq!(
        kept.get("strict-transport-security").map(String::as_str),
        Some("max-age=60"),
        "{kept:?}"
    );
    assert!(!kept.contains_key("x-backend"), "removed: {kept:?}");
    for expected in [
        r#""x-env": "prod""#,
        r#""host": "up.internal""#,
        r#""x-keep": "yes""#,
        r#""x-forwarded-for": "127.0.0.1""#,
    ] {
        assert!(seen.contains(expected), "{expected} not in {seen}");
    }
    for gone in ["x-debug", "x-forwarded-host"] {
        assert!(!seen.contains(&format!("\"{gone}\"")), "{gone} in {seen}");
    }
}

fn tls_config(backend: &Arc<Backend>, raw: &RawUpstream) -> String {
    format!(
        "[[tls]]\nhosts = [{}]\nsource = \"internal\"\n{}",
        H2_HOSTS.map(|h| format!("{h:?}")).join(", "),
        config(backend, raw)
    )
}

const H2_HOSTS: [&str; 7] = [
    "a.test",
    "raw.test",
    "dead.test",
    "nowhere.test",
    "strip.test",
    "edit.test",
    "private.test",
];

/// Like [`answer`], over HTTP/2 (checked) to the HTTPS listener.
async fn answer_h2(
    proxy: &Proxy,
    client: &reqwest::Client,
    method: &str,
    host: &str,
    path: &str,
    headers: Headers<'_>,
) -> (u16, BTreeMap<String, String>, String) {
    let url = format!("https://{host}:{}{path}", proxy.https.port());
    let mut req = client.request(method.parse().unwrap(), url);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = req.send().await.unwrap();
    assert_eq!(resp.version(), reqwest::Version::HTTP_2, "{host}{path}");
    let status = resp.status().as_u16();
    let mut kept = BTreeMap::new();
    for (name, value) in resp.headers() {
        let name = name.as_str();
        assert_ne!(
            name, "x-internal",
            "a header named by Connection was forwarded"
        );
        if matches!(name, "date" | "x-request-id") {
            continue;
        }
        kept.insert(name.to_string(), value.to_str().unwrap().to_string());
    }
    let id = resp.headers()["x-request-id"].to_str().unwrap().to_string();
    let mut body = resp.text().await.unwrap();
    if let Ok(mut map) = serde_json::from_str::<BTreeMap<String, String>>(&body) {
        common::started_trace(&mut map);
        // The two proxies listen on different ports, which the Host carries.
        body = format!("{map:?}").replace(&proxy.https.port().to_string(), "PORT");
    } else if status >= 400 {
        body = body.replace(&id, "<id>");
    }
    (status, kept, body)
}

#[tokio::test]
async fn the_http2_fast_path_answers_what_the_full_path_answers() {
    common::init();
    let backend = Backend::start("hyper").await;
    let raw = RawUpstream::start().await;
    let fast = Proxy::start(&tls_config(&backend, &raw)).await;
    let full = Proxy::start_with("http2_fast_path = false", &tls_config(&backend, &raw)).await;
    let (fast_client, full_client) = (fast.client(&H2_HOSTS), full.client(&H2_HOSTS));
    let forwarded: Headers = &[
        ("x-forwarded-for", "203.0.113.9"),
        ("forwarded", "for=203.0.113.9"),
        ("x-custom", "kept"),
        ("x-request-id", "abc-123"),
        ("cookie", "a=1"),
        ("cookie", "b=2"),
    ];
    let cases: &[(&str, &str, &str, Headers)] = &[
        ("GET", "a.test", "/", &[]),
        ("HEAD", "a.test", "/", &[]),
        ("GET", "a.test", "/headers", forwarded),
        ("GET", "a.test", "/status/503", &[]),
        ("GET", "a.test", "/status/404", &[]),
        ("GET", "a.test", "/bytes/200000", &[]),
        ("GET", "a.test", "/bytes/40000", &[]),
        ("DELETE", "a.test", "/", &[]),
        ("GET", "raw.test", "/chunked", &[]),
        ("GET", "raw.test", "/close", &[]),
        ("GET", "raw.test", "/early", &[]),
        ("GET", "raw.test", "/hop", &[]),
        ("GET", "dead.test", "/", &[]),
        ("GET", "nowhere.test", "/", &[]),
        ("GET", "a.test", "/a/../b", &[]),
        (
            "GET",
            "strip.test",
            "/api/headers?x=1",
            &[("x-forwarded-prefix", "/evil"), ("x-request-id", "s-1")],
        ),
        ("GET", "strip.test", "/api", &[]),
        ("GET", "edit.test", "/headers", EDITED),
        ("GET", "edit.test", "/status/404", &[]),
        ("GET", "private.test", "/", &[]),
    ];
    for (method, host, path, headers) in cases {
        let before = fast.metric("rampart_http2_fast_path_requests_total").await;
        let a = answer_h2(&fast, &fast_client, method, host, path, headers).await;
        let carried = fast.metric("rampart_http2_fast_path_requests_total").await - before;
        assert_eq!(
            carried, 1.0,
            "{method} {host}{path} was not served by the fast path"
        );
        let b = answer_h2(&full, &full_client, method, host, path, headers).await;
        assert_eq!(a, b, "{method} {host}{path}: fast path (left) vs full path");
    }
    // What the upstream saw: the forwarding headers set by the proxy, the :authority
    // as Host, and the cookies as one field.
    let (_, _, seen) = answer_h2(&fast, &fast_client, "GET", "a.test", "/headers", forwarded).await;
    for expected in [
        r#""x-forwarded-for": "127.0.0.1""#,
        r#""x-forwarded-proto": "https""#,
        r#""x-request-id": "abc-123""#,
        r#""x-custom": "kept""#,
        r#""cookie": "a=1; b=2""#,
        r#""host": "a.test:PORT""#,
    ] {
        assert!(seen.contains(expected), "{expected} not in {seen}");
    }
    let (_, _, seen) = answer_h2(
        &fast,
        &fast_client,
        "GET",
        "strip.test",
        "/api/headers",
        &[],
    )
    .await;
    assert!(seen.contains(r#"":path": "/headers""#), "{seen}");
    assert!(seen.contains(r#""x-forwarded-prefix": "/api""#), "{seen}");
    for (proxy, client) in [(&fast, &fast_client), (&full, &full_client)] {
        let (_, kept, seen) =
            answer_h2(proxy, client, "GET", "edit.test", "/headers", EDITED).await;
        assert_edited(&kept, &seen);
    }
    // A chunked upstream body reaches an HTTP/2 client as its data alone.
    let (_, _, chunked) = answer_h2(&fast, &fast_client, "GET", "raw.test", "/chunked", &[]).await;
    assert_eq!(chunked, "hello world");
    // Request bodies: up to 64 KiB read whole by the fast path, larger streamed by
    // Pingora; the upstream gets the same bytes either way.
    let before = fast.metric("rampart_http2_fast_path_requests_total").await;
    for size in [1usize, 20_000, 65_536, 200_000] {
        let body: Vec<u8> = (0..size).map(|i| b'a' + (i % 26) as u8).collect();
        let mut answers = Vec::new();
        for (proxy, client) in [(&fast, &fast_client), (&full, &full_client)] {
            let resp = client
                .post(format!("https://raw.test:{}/echo", proxy.https.port()))
                .body(body.clone())
                .send()
                .await
                .unwrap();
            assert_eq!(resp.version(), reqwest::Version::HTTP_2);
            answers.push((resp.status().as_u16(), resp.bytes().await.unwrap()));
        }
        assert_eq!(answers[0], answers[1], "POST {size} bytes: fast vs full");
        assert!(answers[0].1 == body, "POST {size} bytes: the body changed");
    }
    let bodies = fast.metric("rampart_http2_fast_path_requests_total").await - before;
    assert_eq!(
        bodies, 3.0,
        "the bodies up to 64 KiB went through the fast path"
    );
    assert_eq!(
        full.metric("rampart_http2_fast_path_requests_total").await,
        0.0
    );

    // Many streams at once on one connection, large bodies among them: each gets its
    // own complete answer.
    let requests = (0..40).map(|i| {
        let client = fast_client.clone();
        let url = if i % 4 == 0 {
            format!("https://a.test:{}/bytes/100000", fast.https.port())
        } else {
            format!("https://a.test:{}/status/200", fast.https.port())
        };
        async move {
            let resp = client.get(url).send().await.unwrap();
            (resp.status().as_u16(), resp.bytes().await.unwrap().len())
        }
    });
    let answers = futures_util::future::join_all(requests).await;
    for (i, (status, len)) in answers.into_iter().enumerate() {
        assert_eq!(status, 200, "stream {i}");
        assert_eq!(len, if i % 4 == 0 { 100_000 } else { 5 }, "stream {i}");
    }
}

#[tokio::test]
async fn request_bodies_reach_the_upstream_whole_on_either_path() {
    common::init();
    let backend = Backend::start("hyper").await;
    let raw = RawUpstream::start().await;
    let slow_body = format!(
        "{}\n[limits]\nbody_read_timeout = \"1s\"\n",
        config(&backend, &raw)
    );
    let fast = Proxy::start(&slow_body).await;
    let full = Proxy::start_with("http1_fast_path = false", &slow_body).await;
    // Up to 64 KiB the fast path reads the body itself; the largest goes to Pingora.
    let sizes = [1usize, 1000, 20_000, 65_536, 200_000];
    for method in ["POST", "PUT"] {
        for &size in &sizes {
            let body: Vec<u8> = (0..size).map(|i| b'a' + (i % 26) as u8).collect();
            let mut answers = Vec::new();
            for proxy in [&fast, &full] {
                let resp = client()
                    .request(method.parse().unwrap(), proxy.url("/echo"))
                    .header("host", "raw.test")
                    .body(body.clone())
                    .send()
                    .await
                    .unwrap();
                let status = resp.status().as_u16();
                let seen_method = resp.headers()["x-method"].to_str().unwrap().to_string();
                answers.push((status, seen_method, resp.bytes().await.unwrap()));
            }
            assert_eq!(
                answers[0], answers[1],
                "{method} {size} bytes: fast vs full"
            );
            assert_eq!(answers[0].0, 200);
            assert_eq!(answers[0].1, method);
            assert!(
                answers[0].2 == body,
                "{method} {size} bytes: the body changed"
            );
        }
    }
    let served = fast.metric("rampart_http1_fast_path_requests_total").await;
    assert_eq!(
        served, 8.0,
        "the bodies up to 64 KiB went through the fast path"
    );

    // A body that arrives after its head, in pieces, on a kept-alive connection; then
    // a bodiless request on the same connection.
    let mut conn = TcpStream::connect(fast.http).await.unwrap();
    conn.write_all(b"POST /echo HTTP/1.1\r\nHost: raw.test\r\nContent-Length: 11\r\n\r\n")
        .await
        .unwrap();
    conn.flush().await.unwrap();
    tokio::task::yield_now().await;
    conn.write_all(b"hello").await.unwrap();
    conn.flush().await.unwrap();
    let echoed = exchange(&mut conn, " world", b"hello world").await;
    assert!(echoed.starts_with("HTTP/1.1 200 OK\r\n"), "{echoed}");
    let next = exchange(
        &mut conn,
        "GET / HTTP/1.1\r\nHost: raw.test\r\n\r\n",
        b"raw",
    )
    .await;
    assert!(next.starts_with("HTTP/1.1 200 OK\r\n"), "{next}");

    // A body that stops coming: both paths answer 400 at limits.body_read_timeout and
    // close the connection.
    let mut answers = Vec::new();
    for proxy in [&fast, &full] {
        let mut conn = TcpStream::connect(proxy.http).await.unwrap();
        let got = exchange(
            &mut conn,
            "POST /echo HTTP/1.1\r\nHost: raw.test\r\nContent-Length: 10\r\n\r\nab",
            b"\0",
        )
        .await;
        answers.push(got.lines().next().unwrap_or("").to_string());
    }
    assert_eq!(answers[0], answers[1], "a stalled body: fast vs full");
    assert!(answers[0].starts_with("HTTP/1.1 400"), "{answers:?}");

    // Over the route's max_body_bytes: the full path's 413, from either path.
    let limited = format!(
        "{}\n[limits]\nmax_body_bytes = \"1KiB\"\n",
        config(&backend, &raw)
    );
    let small = Proxy::start(&limited).await;
    let resp = client()
        .post(small.url("/echo"))
        .header("host", "raw.test")
        .body(vec![b'x'; 2000])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 413);
}
