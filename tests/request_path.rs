//! One request path: the same corpus of requests — ordinary ones, the security probes
//! and the defects a black-box battery found — sent on the wire to a proxy with the
//! fast paths on and to one with them off, over HTTP/1.1 and HTTP/2. Each case must get
//! the same answer (status and body) and put exactly the same bytes on the wire to the
//! upstream (or nothing), and each case asserts which transport served it.
#![allow(missing_docs, clippy::unwrap_used)]

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

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
        let ok = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
        if stream.write_all(ok).await.is_err() {
            return;
        }
    }
}

fn config(upstream: SocketAddr) -> String {
    format!(
        r#"
[[tls]]
hosts = ["a.test"]
source = "internal"

[[routes]]
name = "app"
hosts = ["a.test"]
action = {{ forward = "app" }}

[pools.app]
endpoints = [{{ address = "{upstream}" }}]
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

/// A response's status and body (without the headers that differ per run).
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
    let body = text
        .split_once("\r\n\r\n")
        .map_or(String::new(), |(_, b)| b.to_string());
    (status, body)
}

/// A recorded head with its fields in a canonical order: the request line, then the
/// fields stably sorted by name. The order of fields of different names carries no
/// meaning (RFC 9110 §5.3) and Pingora's header map does not keep it; the order of
/// fields of one name does, and is kept. Names keep their case, values their bytes.
fn canonical(recorded: &str) -> String {
    if recorded.starts_with("BODY ") {
        return recorded.to_string();
    }
    let mut lines: Vec<&str> = recorded.split("\r\n").filter(|l| !l.is_empty()).collect();
    let fields = &mut lines[1..];
    fields.sort_by_key(|l| l.split(':').next().unwrap_or("").to_ascii_lowercase());
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
        ("dot-segments", req("GET /a/../admin HTTP/1.1", "Host: a.test\r\n"), 400, None, Fast),
        ("body", req("POST /p HTTP/1.1", "Host: a.test\r\nContent-Length: 5\r\n") + "hello", 200, Some("BODY hello"), Fast),
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
        let heads = |seen: &[String]| seen.iter().filter(|s| !s.starts_with("BODY")).count();
        match must_see {
            None => assert!(a.2.is_empty(), "{name}: forwarded {:?}", a.2),
            Some(text) => {
                assert!(a.2.iter().any(|s| s.contains(text)), "{name}: {text:?} not in {:?}", a.2);
                assert_eq!(heads(&a.2), 1, "{name}: one request upstream");
            }
        }
        for seen in &a.2 {
            assert!(!seen.contains("6.6.6.6"), "{name}: spoofed element forwarded: {seen}");
            assert!(!seen.contains('#'), "{name}: fragment forwarded: {seen}");
        }
        let want = if served == Served::Fast { 1.0 } else { 0.0 };
        assert_eq!(carried, want, "{name}: served by {served:?}?");
    }
    assert_eq!(full.metric("rampart_http1_fast_path_requests_total").await, 0.0);
}
