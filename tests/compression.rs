//! Response compression (issue 27): gzip, brotli and zstd chosen by `Accept-Encoding`
//! q-values, checked with a real decoder per algorithm, on every transport (a route
//! that compresses is served by Pingora's path, so the fast paths hand it over); and
//! every response that must not be compressed is not.
#![allow(missing_docs, clippy::unwrap_used)]

mod common;

use std::convert::Infallible;
use std::io::Read as _;
use std::net::SocketAddr;

use bytes::Bytes;
use common::Proxy;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use hyper_util::rt::{TokioExecutor, TokioIo};

/// A 100 KiB HTML page of varied but compressible text.
fn page() -> String {
    let mut s = String::from("<!DOCTYPE html><html><body>\n");
    let mut i = 0u64;
    while s.len() < 100 * 1024 {
        s.push_str(&format!(
            "<p class=\"row-{}\">Order {} shipped to customer {} on day {}</p>\n",
            i % 7,
            i,
            i * 7919 % 10007,
            i % 365
        ));
        i += 1;
    }
    s.push_str("</body></html>\n");
    s
}

type Body = http_body_util::combinators::BoxBody<Bytes, Infallible>;

/// The upstream: `/page` (100 KiB HTML with an ETag), `/small`, `/png`, `/encoded`
/// (already gzip), `/no-transform`, `/stream` (chunked text in three writes).
async fn upstream() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(
                    |req: hyper::Request<hyper::body::Incoming>| async move {
                        let full = |ct: &str, body: Vec<u8>| {
                            hyper::Response::builder()
                                .header("content-type", ct)
                                .body(Full::new(Bytes::from(body)).boxed())
                        };
                        let r = match req.uri().path() {
                            "/page" => hyper::Response::builder()
                                .header("content-type", "text/html; charset=utf-8")
                                .header("etag", "\"v1\"")
                                .header("accept-ranges", "bytes")
                                .body(Full::new(Bytes::from(page())).boxed()),
                            "/small" => full("text/html", b"<p>tiny</p>".repeat(10)),
                            "/png" => full("image/png", vec![7u8; 10_000]),
                            "/encoded" => hyper::Response::builder()
                                .header("content-type", "text/html")
                                .header("content-encoding", "gzip")
                                .body(Full::new(Bytes::from(vec![1u8; 5_000])).boxed()),
                            "/no-transform" => hyper::Response::builder()
                                .header("content-type", "text/html")
                                .header("cache-control", "public, no-transform")
                                .body(Full::new(Bytes::from(page())).boxed()),
                            _ => {
                                let chunks = (0..3).map(|i| {
                                    Ok::<_, Infallible>(Frame::data(Bytes::from(
                                        format!("part {i} ").repeat(500),
                                    )))
                                });
                                hyper::Response::builder()
                                    .header("content-type", "text/plain")
                                    .body(BodyExt::boxed(StreamBody::new(
                                        futures_util::stream::iter(chunks),
                                    )))
                            }
                        };
                        Ok::<hyper::Response<Body>, Infallible>(r.unwrap())
                    },
                );
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });
    addr
}

fn decode(coding: &str, body: &[u8]) -> String {
    let mut out = String::new();
    match coding {
        "gzip" => {
            flate2::read::GzDecoder::new(body)
                .read_to_string(&mut out)
                .unwrap();
        }
        "br" => {
            brotli::Decompressor::new(body, 4096)
                .read_to_string(&mut out)
                .unwrap();
        }
        "zstd" => {
            out = String::from_utf8(zstd::decode_all(body).unwrap()).unwrap();
        }
        other => panic!("{other}"),
    }
    out
}

struct Got {
    status: u16,
    headers: reqwest::header::HeaderMap,
    body: Vec<u8>,
}

impl Got {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(|v| v.to_str().unwrap())
    }
}

#[tokio::test]
async fn responses_are_compressed_as_the_client_prefers_and_only_when_they_may_be() {
    common::init();
    let addr = upstream().await;
    let config = format!(
        "[[tls]]\nhosts = [\"a.test\"]\nsource = \"internal\"\n\n\
         [[routes]]\nname = \"site\"\ncompress = {{}}\naction = {{ forward = \"site\" }}\n\n\
         [pools.site]\nendpoints = [{{ address = \"{addr}\" }}]\n"
    );
    let original = page();
    for (server, name) in [
        ("", "fast paths on"),
        (
            "http1_fast_path = false\nhttp2_fast_path = false",
            "Pingora's path",
        ),
    ] {
        let proxy = Proxy::start_with(server, &config).await;
        let https = format!("https://a.test:{}", proxy.https.port());
        let b = || proxy.client_builder(&["a.test"]);
        let clients = [
            (
                "h2",
                b().http2_prior_knowledge().build().unwrap(),
                https.clone(),
            ),
            (
                "h1 over TLS",
                b().http1_only().build().unwrap(),
                https.clone(),
            ),
            ("plain h1", Proxy::http_client(), proxy.url("")),
        ];
        for (transport, client, base) in &clients {
            let what = |s: &str| format!("{name}, {transport}: {s}");
            let get = |path: &str, method: reqwest::Method, headers: &[(&str, &str)]| {
                let mut req = client.request(method, format!("{base}{path}"));
                if *transport == "plain h1" {
                    req = req.header("host", "a.test");
                }
                for (k, v) in headers {
                    req = req.header(*k, *v);
                }
                async move {
                    let r = req.send().await.unwrap();
                    Got {
                        status: r.status().as_u16(),
                        headers: r.headers().clone(),
                        body: r.bytes().await.unwrap().to_vec(),
                    }
                }
            };
            // Each coding, decoded by its own decoder, gives the page back.
            for (accept, coding) in [
                ("gzip", "gzip"),
                ("br", "br"),
                ("zstd", "zstd"),
                ("gzip, deflate, br, zstd", "zstd"),
                ("gzip;q=1.0, br;q=0.5, zstd;q=0.2", "gzip"),
                ("br;q=0.9, *;q=0.1", "br"),
            ] {
                let g = get(
                    "/page",
                    reqwest::Method::GET,
                    &[("accept-encoding", accept)],
                )
                .await;
                assert_eq!(g.status, 200, "{}", what(accept));
                assert_eq!(
                    g.header("content-encoding"),
                    Some(coding),
                    "{}",
                    what(accept)
                );
                assert_eq!(g.header("etag"), Some("W/\"v1\""), "{}", what(accept));
                assert_eq!(g.header("accept-ranges"), None, "{}", what(accept));
                assert_eq!(
                    g.header("vary"),
                    Some("Accept-Encoding"),
                    "{}",
                    what(accept)
                );
                assert!(
                    g.body.len() < original.len() / 3,
                    "{}: {} bytes",
                    what(accept),
                    g.body.len()
                );
                assert!(
                    decode(coding, &g.body) == original,
                    "{}: the page differs",
                    what(accept)
                );
            }
            // A streamed body of unknown length is compressed as it comes.
            let g = get(
                "/stream",
                reqwest::Method::GET,
                &[("accept-encoding", "gzip")],
            )
            .await;
            assert_eq!(
                g.header("content-encoding"),
                Some("gzip"),
                "{}",
                what("stream")
            );
            let want: String = (0..3).map(|i| format!("part {i} ").repeat(500)).collect();
            assert_eq!(decode("gzip", &g.body), want, "{}", what("stream"));

            // No Accept-Encoding: as it came, but it varies.
            let g = get("/page", reqwest::Method::GET, &[]).await;
            assert_eq!(g.header("content-encoding"), None, "{}", what("identity"));
            assert_eq!(
                g.header("vary"),
                Some("Accept-Encoding"),
                "{}",
                what("identity")
            );
            assert_eq!(g.header("etag"), Some("\"v1\""), "{}", what("identity"));
            assert_eq!(g.body, original.as_bytes(), "{}", what("identity"));
            for (path, method, headers, why) in [
                (
                    "/page",
                    reqwest::Method::HEAD,
                    &[("accept-encoding", "gzip")][..],
                    "HEAD",
                ),
                (
                    "/page",
                    reqwest::Method::GET,
                    &[("accept-encoding", "gzip"), ("range", "bytes=0-9")],
                    "a range",
                ),
                (
                    "/page",
                    reqwest::Method::GET,
                    &[("accept-encoding", "gzip;q=0, identity")],
                    "gzip;q=0",
                ),
                (
                    "/small",
                    reqwest::Method::GET,
                    &[("accept-encoding", "gzip")],
                    "under min_size",
                ),
                (
                    "/png",
                    reqwest::Method::GET,
                    &[("accept-encoding", "gzip")],
                    "an image",
                ),
                (
                    "/no-transform",
                    reqwest::Method::GET,
                    &[("accept-encoding", "gzip")],
                    "no-transform",
                ),
            ] {
                let g = get(path, method, headers).await;
                assert_eq!(g.status, 200, "{}", what(why));
                assert_eq!(g.header("content-encoding"), None, "{}", what(why));
            }
            // Already encoded: passed as it came, not encoded twice.
            let g = get(
                "/encoded",
                reqwest::Method::GET,
                &[("accept-encoding", "gzip, br")],
            )
            .await;
            assert_eq!(
                g.header("content-encoding"),
                Some("gzip"),
                "{}",
                what("encoded")
            );
            assert_eq!(g.body, vec![1u8; 5_000], "{}", what("encoded"));
        }
        let m = proxy.metrics().await;
        for coding in ["gzip", "br", "zstd"] {
            let line =
                format!("rampart_compression_bytes_total{{algorithm=\"{coding}\",side=\"in\"}}");
            assert!(
                common::metric_value(&m, &line).is_some_and(|v| v >= 100.0 * 1024.0),
                "{name}: {line}"
            );
        }
    }
}
