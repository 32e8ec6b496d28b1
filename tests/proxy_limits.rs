//! End-to-end limits: header size and count, ambiguous framing, bodies, dot-segments,
//! slow clients; and WebSocket pass-through.
#![allow(missing_docs, clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{pool_toml, Backend, Proxy};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

async fn proxy_to(b: &Arc<Backend>, limits: &str) -> Proxy {
    Proxy::start(&format!(
        "{limits}\n[[routes]]\nname = \"all\"\naction = {{ forward = \"p\" }}\n{}",
        pool_toml("p", "round_robin", &[b], "")
    ))
    .await
}

/// Sends raw bytes and returns the status line of the answer ("" if the connection
/// closed without one).
async fn raw(addr: std::net::SocketAddr, request: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(request).await.unwrap();
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf)).await;
    String::from_utf8_lossy(&buf)
        .lines()
        .next()
        .unwrap_or("")
        .to_string()
}

#[tokio::test]
async fn oversized_or_too_many_headers_get_431() {
    common::init();
    let b = Backend::start("b").await;
    let proxy = proxy_to(
        &b,
        "[limits]\nmax_header_bytes = \"8KiB\"\nmax_header_count = 20",
    )
    .await;
    let client = Proxy::http_client();
    let r = client
        .get(proxy.url("/"))
        .header("x-big", "a".repeat(9000))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 431);
    let mut req = client.get(proxy.url("/"));
    for i in 0..25 {
        req = req.header(format!("x-h{i}"), "1");
    }
    assert_eq!(req.send().await.unwrap().status(), 431);
    assert_eq!(
        client
            .get(proxy.url("/"))
            .header("x-ok", "a".repeat(4000))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(b.hits(), 1, "rejected requests never reach the upstream");
}

#[tokio::test]
async fn ambiguous_framing_and_dot_segments_get_400() {
    common::init();
    let b = Backend::start("b").await;
    let proxy = proxy_to(&b, "").await;
    let cases: [&[u8]; 4] = [
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
        b"GET /static/../admin HTTP/1.1\r\nHost: a\r\n\r\n",
        b"GET /static/%2e%2e/admin HTTP/1.1\r\nHost: a\r\n\r\n",
    ];
    for request in cases {
        let line = raw(proxy.http, request).await;
        assert!(
            line.starts_with("HTTP/1.1 400"),
            "{:?} -> {line:?}",
            String::from_utf8_lossy(request)
        );
    }
    assert_eq!(b.hits(), 0, "nothing ambiguous was forwarded");
    assert!(raw(
        proxy.http,
        b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
    )
    .await
    .starts_with("HTTP/1.1 200"));
}

#[tokio::test]
async fn bodies_over_the_route_limit_get_413() {
    common::init();
    let b = Backend::start("b").await;
    let proxy = Proxy::start(&format!(
        "[[routes]]\nname = \"all\"\nmax_body_bytes = \"1KiB\"\naction = {{ forward = \"p\" }}\n{}",
        pool_toml("p", "round_robin", &[&b], "")
    ))
    .await;
    let client = Proxy::http_client();
    assert_eq!(
        client
            .post(proxy.url("/"))
            .body(vec![b'x'; 2048])
            .send()
            .await
            .unwrap()
            .status(),
        413
    );
    assert_eq!(
        client
            .post(proxy.url("/"))
            .body(vec![b'x'; 512])
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    let chunked = raw(proxy.http, format!("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n800\r\n{}\r\n0\r\n\r\n", "y".repeat(2048)).as_bytes()).await;
    assert!(
        chunked.starts_with("HTTP/1.1 413"),
        "a chunked body is counted as it streams: {chunked:?}"
    );
}

#[tokio::test]
async fn slow_headers_are_cut_at_the_deadline_while_others_are_served() {
    common::init();
    let b = Backend::start("b").await;
    let proxy = proxy_to(&b, "[limits]\nheader_read_timeout = \"1s\"").await;
    // A slowloris client: a valid start, then one header line every 200 ms, bounded to 50.
    let addr = proxy.http;
    let slow = tokio::spawn(async move {
        let started = Instant::now();
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nHost: a\r\n").await.unwrap();
        for i in 0..50 {
            tokio::time::sleep(Duration::from_millis(200)).await;
            if s.write_all(format!("X-Slow-{i}: 1\r\n").as_bytes())
                .await
                .is_err()
            {
                break;
            }
            let mut buf = [0u8; 64];
            if let Ok(Ok(0)) =
                tokio::time::timeout(Duration::from_millis(1), s.read(&mut buf)).await
            {
                break;
            }
        }
        started.elapsed()
    });
    // Meanwhile normal clients are served.
    let client = Proxy::http_client();
    for _ in 0..20 {
        assert_eq!(
            client.get(proxy.url("/")).send().await.unwrap().status(),
            200
        );
    }
    let held = slow.await.unwrap();
    assert!(
        held < Duration::from_secs(5),
        "the slow client was cut after {held:?}, not kept for the whole trickle"
    );
    assert!(proxy.metric("rampart_header_read_timeouts_total").await >= 1.0);
    assert_eq!(b.hits(), 20, "the slow request never reached the upstream");
}

#[tokio::test]
async fn websocket_upgrades_pass_through() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    common::init();
    let b = Backend::start("b").await;
    let proxy = proxy_to(&b, "[limits]\nheader_read_timeout = \"1s\"").await;
    let (mut ws, resp) = tokio_tungstenite::connect_async(format!("ws://{}/ws", proxy.http))
        .await
        .unwrap();
    assert_eq!(resp.status(), 101);
    for i in 0..5 {
        ws.send(Message::text(format!("hello {i}"))).await.unwrap();
        assert_eq!(
            ws.next().await.unwrap().unwrap(),
            Message::text(format!("hello {i}"))
        );
    }
    // Messages keep flowing after the header deadline: it only guards request headers.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    ws.send(Message::text("still open")).await.unwrap();
    assert_eq!(
        ws.next().await.unwrap().unwrap(),
        Message::text("still open")
    );
}

#[tokio::test]
async fn connections_over_the_limit_are_closed_at_once() {
    common::init();
    let b = Backend::start("b").await;
    let proxy = proxy_to(&b, "[limits]\nmax_connections = 2").await;
    // Two clients hold their connections open (keep-alive, after one request each).
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut s = TcpStream::connect(proxy.http).await.unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
            .await
            .unwrap();
        let mut buf = [0u8; 512];
        let n = s.read(&mut buf).await.unwrap();
        assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
        held.push(s);
    }
    // A third is closed without an answer.
    let mut third = TcpStream::connect(proxy.http).await.unwrap();
    let _ = third.write_all(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n").await;
    let mut buf = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), third.read_to_end(&mut buf))
        .await
        .expect("closed promptly");
    assert!(
        read.is_err() || buf.is_empty(),
        "no answer over the limit: {:?}",
        String::from_utf8_lossy(&buf)
    );
    assert_eq!(
        proxy
            .metric("rampart_rejected_connections_total{listener=\"http\"}")
            .await,
        1.0
    );
    // When one leaves, new connections are served again.
    drop(held.pop());
    common::eventually("a slot to free up", || async {
        let r = Proxy::http_client().get(proxy.url("/")).send().await.ok()?;
        (r.status() == 200).then_some(())
    })
    .await;
}

#[tokio::test]
async fn the_total_timeout_answers_504() {
    common::init();
    let b = Backend::start("b").await;
    let proxy = Proxy::start(&common::single_pool(
        "round_robin",
        &[&b],
        "timeouts = { total = \"300ms\" }\nretries = { attempts = 0 }",
    ))
    .await;
    let started = Instant::now();
    let r = Proxy::http_client()
        .get(proxy.url("/slow/3000"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 504);
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "answered at the deadline, not when the upstream finished"
    );
}

/// Reads one HTTP/1.1 response with a Content-Length body from `s`; returns the status
/// line and the body.
async fn read_response(s: &mut TcpStream) -> (String, String) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let header_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut chunk))
            .await
            .expect("a response within 5 s")
            .unwrap();
        assert!(
            n > 0,
            "closed before a response: {:?}",
            String::from_utf8_lossy(&buf)
        );
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..header_end]).to_string();
    let length: usize = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().unwrap())
        })
        .expect("a Content-Length");
    while buf.len() < header_end + length {
        let n = s.read(&mut chunk).await.unwrap();
        assert!(n > 0, "closed inside the body");
        buf.extend_from_slice(&chunk[..n]);
    }
    let body = String::from_utf8_lossy(&buf[header_end..header_end + length]).to_string();
    (head.lines().next().unwrap_or("").to_string(), body)
}

/// A kept-alive connection waits between requests outside Pingora's request reader
/// (see `EdgeApp::next_request`): requests that arrive whole, split across writes
/// after a pause, or larger than the first read still parse, and the idle connection
/// is closed at the keep-alive timeout.
#[tokio::test]
async fn kept_alive_connections_serve_every_request_then_close_when_idle() {
    common::init();
    let b = Backend::start("b").await;
    let proxy = proxy_to(&b, "[limits]\nkeepalive_timeout = \"1s\"").await;
    let mut s = TcpStream::connect(proxy.http).await.unwrap();
    for i in 0..3 {
        s.write_all(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
            .await
            .unwrap();
        assert_eq!(
            read_response(&mut s).await,
            ("HTTP/1.1 200 OK".into(), "b".into()),
            "request {i}"
        );
        // The client thinks for a while, under the keep-alive timeout.
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    // The first bytes wake the connection; the rest arrive later.
    s.write_all(b"GET / HT").await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    s.write_all(b"TP/1.1\r\nHost: a\r\n\r\n").await.unwrap();
    assert_eq!(
        read_response(&mut s).await.1,
        "b",
        "a request split across writes"
    );
    // A header larger than the first read after waking up.
    let big = format!(
        "GET / HTTP/1.1\r\nHost: a\r\nX-Big: {}\r\n\r\n",
        "x".repeat(6000)
    );
    s.write_all(big.as_bytes()).await.unwrap();
    assert_eq!(read_response(&mut s).await.1, "b", "a 6 KB request header");
    assert_eq!(b.hits(), 5);
    // Idle now: closed at the keep-alive timeout (bounded wait for the end of stream).
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut rest)).await;
    assert!(
        matches!(closed, Ok(Ok(0))),
        "idle connection closed: {closed:?} {rest:?}"
    );
}
