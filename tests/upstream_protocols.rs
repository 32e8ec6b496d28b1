//! Upstream protocols (issue 25): TLS and mutual TLS to backends, HTTP/2 over TLS and
//! h2c to backends, health checks over the pool's TLS, and the PROXY protocol in (from
//! a trusted load balancer) and out (to a backend that reads it: HAProxy).
//!
//! Every request goes through each transport — HTTP/1 and HTTP/2 fast paths on, and
//! Pingora's path alone — since the fast paths hand requests for these pools, with
//! their decision, to Pingora's path.

#![allow(missing_docs, clippy::unwrap_used)]

mod common;

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU16, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use common::pki::{read_chain, Pki};
use common::{eventually, forward_all, Proxy};
use http_body_util::Full;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::CertificateDer;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const FAST: &str = "";
const PINGORA: &str = "http1_fast_path = false\nhttp2_fast_path = false";
/// The HTTPS listener's certificate for `a.test`, from the internal CA.
const TLS_A: &str = "[[tls]]\nhosts = [\"a.test\"]\nsource = \"internal\"\n";

/// What a backend saw of one request.
fn seen(
    sni: Option<&str>,
    client_cert: Option<&str>,
    serial: u64,
    req: &Request<hyper::body::Incoming>,
) -> String {
    let mut out = BTreeMap::new();
    out.insert("sni", sni.unwrap_or("").to_string());
    out.insert("client", client_cert.unwrap_or("").to_string());
    out.insert("serial", serial.to_string());
    out.insert("version", format!("{:?}", req.version()));
    for name in [
        "x-forwarded-for",
        "x-request-id",
        "x-env",
        "x-drop",
        "te",
        "cookie",
    ] {
        if let Some(v) = req.headers().get(name) {
            out.insert(name, v.to_str().unwrap().to_string());
        }
    }
    serde_json::to_string(&out).unwrap()
}

/// A backend over TLS (HTTP/1.1 and HTTP/2 by ALPN) that can require a client
/// certificate from `client_ca` and swap its own certificate; each answer says what it
/// saw (SNI, client certificate's CN, its certificate's serial, HTTP version).
struct TlsBackend {
    addr: SocketAddr,
    config: Mutex<(Arc<rustls::ServerConfig>, u64)>,
    client_ca: Option<CertificateDer<'static>>,
    alpn: Vec<Vec<u8>>,
    health: AtomicU16,
    connections: AtomicUsize,
    /// Answer with `Connection: close`, so that every request is a new connection.
    close: bool,
    task: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl Drop for TlsBackend {
    fn drop(&mut self) {
        if let Some(t) = self.task.lock().unwrap().take() {
            t.abort();
        }
    }
}

impl TlsBackend {
    async fn start(
        pki: &Pki,
        client_ca: Option<&Pki>,
        alpn: &[&[u8]],
        close: bool,
    ) -> Arc<TlsBackend> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client_ca = client_ca.map(|p| p.ca_der.clone());
        let alpn: Vec<Vec<u8>> = alpn.iter().map(|a| a.to_vec()).collect();
        let (cert, _) = pki.leaf("backend1", &["backend.internal"], 1);
        let config = server_config(&cert, client_ca.as_ref(), &alpn);
        let backend = Arc::new(TlsBackend {
            addr: listener.local_addr().unwrap(),
            config: Mutex::new((config, 1)),
            client_ca,
            alpn,
            health: AtomicU16::new(200),
            connections: AtomicUsize::new(0),
            close,
            task: Mutex::new(None),
        });
        let weak = Arc::downgrade(&backend);
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                let Some(b) = weak.upgrade() else { return };
                tokio::spawn(async move { b.serve(tcp).await });
            }
        });
        *backend.task.lock().unwrap() = Some(task);
        backend
    }

    /// Serves with a new certificate (same CA, serial `serial`) from now on.
    fn swap(&self, pki: &Pki, serial: u64) {
        let (cert, _) = pki.leaf(&format!("backend{serial}"), &["backend.internal"], serial);
        let config = server_config(&cert, self.client_ca.as_ref(), &self.alpn);
        *self.config.lock().unwrap() = (config, serial);
    }

    async fn serve(self: Arc<Self>, tcp: tokio::net::TcpStream) {
        let (config, serial) = self.config.lock().unwrap().clone();
        let Ok(tls) = tokio_rustls::TlsAcceptor::from(config).accept(tcp).await else {
            return;
        };
        self.connections.fetch_add(1, Ordering::SeqCst);
        let conn = tls.get_ref().1;
        let sni = conn.server_name().map(ToString::to_string);
        let client = conn.peer_certificates().and_then(|c| c.first()).map(|der| {
            let (_, cert) = x509_parser::parse_x509_certificate(der).unwrap();
            let cn = cert.subject().iter_common_name().next().unwrap();
            cn.as_str().unwrap().to_string()
        });
        let b = self.clone();
        let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
            let body = seen(sni.as_deref(), client.as_deref(), serial, &req);
            let status = if req.uri().path() == "/healthz" {
                b.health.load(Ordering::SeqCst)
            } else {
                200
            };
            let mut resp = Response::builder().status(status);
            if b.close && req.version() == hyper::Version::HTTP_11 {
                resp = resp.header("connection", "close");
            }
            let resp = resp.body(Full::new(Bytes::from(body))).unwrap();
            async move { Ok::<_, Infallible>(resp) }
        });
        let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
            .serve_connection(TokioIo::new(tls), svc)
            .await;
    }
}

fn server_config(
    cert: &Path,
    client_ca: Option<&CertificateDer<'static>>,
    alpn: &[Vec<u8>],
) -> Arc<rustls::ServerConfig> {
    let (chain, key) = read_chain(cert);
    let builder = rustls::ServerConfig::builder();
    let builder = match client_ca {
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            roots.add(ca.clone()).unwrap();
            let verifier = rustls::server::WebPkiClientVerifier::builder(Arc::new(roots))
                .build()
                .unwrap();
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder.with_single_cert(chain, key).unwrap();
    config.alpn_protocols = alpn.to_vec();
    Arc::new(config)
}

/// An h2c (HTTP/2 prior knowledge) backend counting its connections and the streams
/// in flight at once.
/// The size of an [`H2cBackend`]'s answer to `/big`: several HTTP/2 windows.
const BIG: usize = 1024 * 1024;

struct H2cBackend {
    addr: SocketAddr,
    connections: AtomicUsize,
    /// Connections open now.
    open: AtomicUsize,
    in_flight: AtomicUsize,
    peak: AtomicUsize,
    requests: AtomicU64,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for H2cBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl H2cBackend {
    /// A backend that answers each request after 200 ms (long enough for the requests
    /// sent together to overlap).
    async fn start() -> Arc<H2cBackend> {
        Self::start_with(Duration::from_millis(200), false, None).await
    }

    /// A backend that answers each request after `delay`; with `one_per_connection`
    /// it closes each connection (GOAWAY) as its first request arrives (answering the
    /// requests it took), as a server that recycles connections or restarts does;
    /// `max_streams` is its SETTINGS_MAX_CONCURRENT_STREAMS (hyper's default without).
    async fn start_with(
        delay: Duration,
        one_per_connection: bool,
        max_streams: Option<u32>,
    ) -> Arc<H2cBackend> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<Arc<H2cBackend>>();
        let task = tokio::spawn(async move {
            let weak = Arc::downgrade(&rx.await.unwrap());
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                let Some(b) = weak.upgrade() else { return };
                b.connections.fetch_add(1, Ordering::SeqCst);
                b.open.fetch_add(1, Ordering::SeqCst);
                let open = b.clone();
                let arrived = Arc::new(tokio::sync::Notify::new());
                let arrived_one = arrived.clone();
                tokio::spawn(async move {
                    let svc =
                        hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                            let (b, answered) = (b.clone(), arrived_one.clone());
                            async move {
                                answered.notify_one();
                                let now = b.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
                                b.peak.fetch_max(now, Ordering::SeqCst);
                                b.requests.fetch_add(1, Ordering::SeqCst);
                                tokio::time::sleep(delay).await;
                                b.in_flight.fetch_sub(1, Ordering::SeqCst);
                                let body = if req.uri().path() == "/big" {
                                    Bytes::from(vec![b'x'; BIG])
                                } else {
                                    Bytes::from(seen(None, None, 0, &req))
                                };
                                let mut resp = Response::new(Full::new(body));
                                let h = resp.headers_mut();
                                h.insert("server", "backend".parse().unwrap());
                                h.insert("x-internal", "1".parse().unwrap());
                                Ok::<_, Infallible>(resp)
                            }
                        });
                    let mut builder =
                        hyper::server::conn::http2::Builder::new(TokioExecutor::new());
                    if let Some(n) = max_streams {
                        builder.max_concurrent_streams(n);
                    }
                    let conn = builder.serve_connection(TokioIo::new(tcp), svc);
                    tokio::pin!(conn);
                    let mut ended = false;
                    if one_per_connection {
                        tokio::select! {
                            _ = conn.as_mut() => ended = true,
                            () = arrived.notified() => conn.as_mut().graceful_shutdown(),
                        }
                    }
                    if !ended {
                        let _ = conn.await;
                    }
                    open.open.fetch_sub(1, Ordering::SeqCst);
                });
            }
        });
        let backend = Arc::new(H2cBackend {
            addr,
            connections: AtomicUsize::new(0),
            open: AtomicUsize::new(0),
            in_flight: AtomicUsize::new(0),
            peak: AtomicUsize::new(0),
            requests: AtomicU64::new(0),
            task,
        });
        tx.send(backend.clone()).ok().unwrap();
        backend
    }
}

fn pool(addr: SocketAddr, extra: &str) -> String {
    format!(
        "{TLS_A}{}[pools.p]\nendpoints = [{{ address = \"{addr}\" }}]\n{extra}\n",
        forward_all("p")
    )
}

fn tls_table(pki: &Pki, client: Option<(&Path, &Path)>, extra: &str) -> String {
    let mut t = format!(
        "tls = {{ server_name = \"backend.internal\", ca_file = {:?}",
        pki.ca_file()
    );
    if let Some((cert, key)) = client {
        t.push_str(&format!(", client_cert = {cert:?}, client_key = {key:?}"));
    }
    t.push_str(extra);
    t.push_str(" }");
    t
}

/// The start of a test's configuration body is still in `[listeners]` (the harness
/// writes the listeners' addresses just before it).
///
/// GETs `path` through the proxy over plain HTTP/1.1 and over HTTPS with HTTP/2.
async fn both_ways(proxy: &Proxy, path: &str) -> Vec<(u16, String)> {
    let h2 = h2_client(proxy);
    let mut out = Vec::new();
    for (client, url) in [
        (Proxy::http_client(), proxy.url(path)),
        (h2, format!("https://a.test:{}{path}", proxy.https.port())),
    ] {
        let resp = client.get(&url).send().await.unwrap();
        let status = resp.status().as_u16();
        let id = resp
            .headers()
            .get("x-request-id")
            .map(|v| v.to_str().unwrap().to_string());
        let body = resp.text().await.unwrap();
        if status == 200 {
            // One decision per request: the id the client got is the one sent upstream.
            let seen: BTreeMap<String, String> = serde_json::from_str(&body).unwrap();
            assert_eq!(seen.get("x-request-id"), id.as_ref(), "{body}");
        }
        out.push((status, body));
    }
    out
}

fn field(body: &str, name: &str) -> String {
    let seen: BTreeMap<String, String> = serde_json::from_str(body).unwrap();
    seen.get(name).cloned().unwrap_or_default()
}

#[tokio::test]
async fn mutual_tls_backends_get_the_server_name_and_the_client_certificate() {
    common::init();
    let server_pki = Pki::new("servers");
    let client_pki = Pki::new("clients");
    let (cert, key) = client_pki.leaf("proxy-client", &["rampart-proxy"], 7);
    let backend = TlsBackend::start(&server_pki, Some(&client_pki), &[b"http/1.1"], false).await;
    for server in [FAST, PINGORA] {
        let tls = tls_table(&server_pki, Some((&cert, &key)), "");
        let proxy = Proxy::start_with(server, &pool(backend.addr, &tls)).await;
        for (status, body) in both_ways(&proxy, "/").await {
            assert_eq!(status, 200, "{server:?}: {body}\n{}", proxy.log());
            assert_eq!(field(&body, "sni"), "backend.internal");
            assert_eq!(field(&body, "client"), "rampart-proxy");
            assert_eq!(field(&body, "version"), "HTTP/1.1");
        }
    }
}

#[tokio::test]
async fn a_request_handed_to_pingoras_path_is_decided_once() {
    common::init();
    let pki = Pki::new("servers");
    // HTTP/2 to the backend: the fast paths decide, then hand the request to Pingora's.
    let backend = TlsBackend::start(&pki, None, &[b"h2"], false).await;
    // One request a minute: a second decision of the same request would find the
    // bucket empty and answer 429 to the first request.
    let body = format!(
        "{TLS_A}[[routes]]\nname = \"all\"\naction = {{ forward = \"p\" }}\nrate_limit = {{ requests = 1, per = \"60s\", burst = 1 }}\n[pools.p]\nprotocol = \"h2\"\nendpoints = [{{ address = \"{}\" }}]\n{}\n",
        backend.addr,
        tls_table(&pki, None, "")
    );
    let proxy = Proxy::start(&body).await;
    let client = Proxy::http_client();
    let first = client.get(proxy.url("/")).send().await.unwrap();
    assert_eq!(first.status(), 200, "{}", proxy.log());
    let second = client.get(proxy.url("/")).send().await.unwrap();
    assert_eq!(second.status(), 429);
}

#[tokio::test]
async fn an_endpoint_whose_certificate_the_pool_does_not_trust_is_refused_with_a_reason() {
    common::init();
    let server_pki = Pki::new("servers");
    let other = Pki::new("other");
    let client_pki = Pki::new("clients");
    let (cert, key) = client_pki.leaf("proxy-client", &["rampart-proxy"], 7);
    let backend = TlsBackend::start(&server_pki, Some(&client_pki), &[b"http/1.1"], false).await;
    // The wrong CA: the backend's certificate is refused.
    let tls = tls_table(&other, Some((&cert, &key)), "");
    let proxy = Proxy::start(&pool(backend.addr, &tls)).await;
    for (status, _) in both_ways(&proxy, "/").await {
        assert_eq!(status, 502);
    }
    let log = proxy.log();
    assert!(
        log.contains("UnknownIssuer"),
        "no reason in the log:\n{log}"
    );
    let status = common::fetch(&format!("http://{}/status", proxy.admin)).await;
    let status: serde_json::Value = serde_json::from_str(&status).unwrap();
    let reason = &status["pools"]["p"]["endpoints"][0]["last_error"]["reason"];
    assert!(
        reason.as_str().is_some_and(|r| r.contains("UnknownIssuer")),
        "no reason in /status: {status:#}"
    );
    // No client certificate: the backend refuses the handshake.
    let tls = tls_table(&server_pki, None, "");
    proxy.reload(&pool(backend.addr, &tls)).await;
    for (status, _) in both_ways(&proxy, "/").await {
        assert_eq!(status, 502);
    }
    // A server name the certificate does not carry.
    let tls = format!(
        "tls = {{ server_name = \"elsewhere.internal\", ca_file = {:?}, client_cert = {cert:?}, client_key = {key:?} }}",
        server_pki.ca_file()
    );
    proxy.reload(&pool(backend.addr, &tls)).await;
    for (status, _) in both_ways(&proxy, "/").await {
        assert_eq!(status, 502);
    }
    assert!(
        proxy
            .log()
            .contains("certificate not valid for name \"elsewhere.internal\""),
        "{}",
        proxy.log()
    );
}

#[tokio::test]
async fn a_bad_tls_file_fails_the_reload_and_the_last_good_pool_keeps_serving() {
    common::init();
    let pki = Pki::new("servers");
    let backend = TlsBackend::start(&pki, None, &[b"http/1.1"], false).await;
    let good = pool(backend.addr, &tls_table(&pki, None, ""));
    let proxy = Proxy::start(&good).await;
    let garbage = pki.dir.path().join("garbage.pem");
    std::fs::write(&garbage, "not a certificate").unwrap();
    for tls in [
        format!(
            "tls = {{ ca_file = {:?} }}",
            pki.dir.path().join("missing.pem")
        ),
        format!("tls = {{ ca_file = {garbage:?} }}"),
        format!("tls = {{ client_cert = {garbage:?}, client_key = {garbage:?} }}"),
    ] {
        let failures = reload_failures(&proxy).await;
        proxy.write_config(&pool(backend.addr, &tls));
        eventually("the reload fails", || async {
            (reload_failures(&proxy).await > failures).then_some(())
        })
        .await;
        let resp = Proxy::http_client()
            .get(proxy.url("/"))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200, "the last good generation serves");
    }
    assert!(proxy.log().contains("pools.p.tls"), "{}", proxy.log());
}

async fn reload_failures(proxy: &Proxy) -> f64 {
    let metrics = common::fetch(&format!("http://{}/metrics", proxy.admin)).await;
    common::metric_value(&metrics, "rampart_config_reload_failures_total").unwrap_or(0.0)
}

#[tokio::test]
async fn a_certificate_swapped_on_the_backend_is_picked_up_by_new_connections() {
    common::init();
    let pki = Pki::new("servers");
    let backend = TlsBackend::start(&pki, None, &[b"http/1.1"], true).await;
    let proxy = Proxy::start(&pool(backend.addr, &tls_table(&pki, None, ""))).await;
    let get = || async {
        let resp = Proxy::http_client()
            .get(proxy.url("/"))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        field(&resp.text().await.unwrap(), "serial")
    };
    assert_eq!(get().await, "1");
    backend.swap(&pki, 2);
    assert_eq!(get().await, "2");
    assert!(backend.connections.load(Ordering::SeqCst) >= 2);
}

#[tokio::test]
async fn tls_min_version_refuses_an_endpoint_that_offers_less() {
    common::init();
    let pki = Pki::new("servers");
    let backend = TlsBackend::start(&pki, None, &[b"http/1.1"], false).await;
    // The backend speaks TLS 1.2 only.
    {
        let (cert, _) = pki.leaf("tls12", &["backend.internal"], 3);
        let (chain, key) = read_chain(&cert);
        let config =
            rustls::ServerConfig::builder_with_protocol_versions(&[&rustls::version::TLS12])
                .with_no_client_auth()
                .with_single_cert(chain, key)
                .unwrap();
        *backend.config.lock().unwrap() = (Arc::new(config), 3);
    }
    let proxy = Proxy::start(&pool(backend.addr, &tls_table(&pki, None, ""))).await;
    let resp = Proxy::http_client()
        .get(proxy.url("/"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200, "TLS 1.2 is accepted by default");
    proxy
        .reload(&pool(
            backend.addr,
            &tls_table(&pki, None, ", min_version = \"1.3\""),
        ))
        .await;
    for (status, _) in both_ways(&proxy, "/").await {
        assert_eq!(status, 502);
    }
    assert!(proxy.log().contains("tls.min_version"), "{}", proxy.log());
}

#[tokio::test]
async fn http2_to_backends_over_tls_and_h2c_multiplexes_requests_on_few_connections() {
    common::init();
    // h2 over TLS, and auto choosing by ALPN.
    let pki = Pki::new("servers");
    let h2_backend = TlsBackend::start(&pki, None, &[b"h2", b"http/1.1"], false).await;
    let h1_backend = TlsBackend::start(&pki, None, &[b"http/1.1"], false).await;
    for server in [FAST, PINGORA] {
        for (backend, protocol, version) in [
            (&h2_backend, "h2", "HTTP/2.0"),
            (&h2_backend, "auto", "HTTP/2.0"),
            (&h1_backend, "auto", "HTTP/1.1"),
        ] {
            let extra = format!("protocol = \"{protocol}\"\n{}", tls_table(&pki, None, ""));
            let proxy = Proxy::start_with(server, &pool(backend.addr, &extra)).await;
            for (status, body) in both_ways(&proxy, "/").await {
                assert_eq!(status, 200, "{protocol}: {body}\n{}", proxy.log());
                assert_eq!(field(&body, "version"), version, "{protocol}");
            }
        }
    }
    // h2c: waves of 64 requests at once, from 64 client connections each, share one
    // upstream connection (max_streams 100); with max_streams 16 a wave needs 4.
    for (max_streams, fewest, most) in [(100, 1, 2), (16, 4, 6)] {
        let backend = H2cBackend::start().await;
        let extra = format!("protocol = \"h2c\"\nmax_streams = {max_streams}");
        let proxy = Proxy::start(&pool(backend.addr, &extra)).await;
        let (waves, per_wave) = (3, 64);
        for _ in 0..waves {
            let requests = (0..per_wave).map(|_| {
                let url = proxy.url("/");
                async move {
                    // A client per request: 64 downstream connections.
                    let resp = Proxy::http_client().get(url).send().await.unwrap();
                    (resp.status().as_u16(), resp.text().await.unwrap())
                }
            });
            for (status, body) in futures_util::future::join_all(requests).await {
                assert_eq!(status, 200, "{body}");
                assert_eq!(field(&body, "version"), "HTTP/2.0");
            }
        }
        let connections = backend.connections.load(Ordering::SeqCst);
        let peak = backend.peak.load(Ordering::SeqCst);
        let requests = waves * per_wave;
        eprintln!("h2c, max_streams {max_streams}: {requests} requests in waves of {per_wave} over {connections} upstream connections, {peak} at once");
        assert_eq!(backend.requests.load(Ordering::SeqCst), requests as u64);
        assert!(peak > 8, "the requests did not overlap ({peak} at once)");
        assert!(
            (fewest..=most).contains(&connections),
            "max_streams {max_streams}: {connections} upstream connections for {requests} requests, {peak} at once"
        );
    }
}

/// An HTTP/2 client of the proxy's HTTPS listener for `a.test`.
fn h2_client(proxy: &Proxy) -> reqwest::Client {
    proxy
        .client_builder(&["a.test"])
        .http2_prior_knowledge()
        .build()
        .unwrap()
}

/// `n` GETs of `/` at once over one HTTP/2 connection to the HTTPS listener; each
/// answer's status and body.
async fn h2_wave(client: &reqwest::Client, proxy: &Proxy, n: usize) -> Vec<(u16, String)> {
    let url = format!("https://a.test:{}/", proxy.https.port());
    let requests = (0..n).map(|_| async {
        let resp = client.get(&url).send().await.unwrap();
        (resp.status().as_u16(), resp.text().await.unwrap())
    });
    futures_util::future::join_all(requests).await
}

#[tokio::test]
async fn the_http2_fast_path_sends_its_requests_as_streams_of_few_upstream_connections() {
    common::init();
    // Waves of 64 streams at once on one client connection, carried by the HTTP/2
    // fast path itself (counted by its metric), share one upstream connection of the
    // worker that serves them (max_streams 100); with max_streams 16 a wave needs 4.
    for (max_streams, fewest, most) in [(100, 1, 2), (16, 4, 8)] {
        let backend = H2cBackend::start().await;
        let extra = format!("protocol = \"h2c\"\nmax_streams = {max_streams}");
        let proxy = Proxy::start(&pool(backend.addr, &extra)).await;
        let client = h2_client(&proxy);
        let before = proxy.metric("rampart_http2_fast_path_requests_total").await;
        let (waves, per_wave) = (3, 64);
        for _ in 0..waves {
            for (status, body) in h2_wave(&client, &proxy, per_wave).await {
                assert_eq!(status, 200, "{body}\n{}", proxy.log());
                assert_eq!(field(&body, "version"), "HTTP/2.0");
                assert!(!field(&body, "x-request-id").is_empty(), "{body}");
            }
        }
        let requests = waves * per_wave;
        let fast = proxy.metric("rampart_http2_fast_path_requests_total").await - before;
        assert_eq!(fast, requests as f64, "not all served by the fast path");
        let connections = backend.connections.load(Ordering::SeqCst);
        let peak = backend.peak.load(Ordering::SeqCst);
        eprintln!("h2 → h2c, max_streams {max_streams}: {requests} requests over {connections} upstream connections, {peak} at once");
        assert_eq!(backend.requests.load(Ordering::SeqCst), requests as u64);
        assert!(peak > 8, "the requests did not overlap ({peak} at once)");
        assert!(
            (fewest..=most).contains(&connections),
            "max_streams {max_streams}: {connections} upstream connections for {requests} requests, {peak} at once"
        );
    }
}

#[tokio::test]
async fn an_http2_backend_that_closes_its_connections_costs_no_request() {
    common::init();
    // Every upstream connection gets a GOAWAY as its first request arrives; a second
    // request sent while the first is in flight finds the connection closing: it is
    // sent again on a new one (a POST too: the endpoint refused it unprocessed). On
    // both paths.
    for server in [FAST, PINGORA] {
        let backend = H2cBackend::start_with(Duration::from_millis(300), true, None).await;
        let proxy = Proxy::start_with(server, &pool(backend.addr, "protocol = \"h2c\"")).await;
        let client = h2_client(&proxy);
        let url = format!("https://a.test:{}/", proxy.https.port());
        for i in 0..6 {
            let first = tokio::spawn(client.get(&url).send());
            eventually("the first request in flight", || async {
                (backend.in_flight.load(Ordering::SeqCst) > 0).then_some(())
            })
            .await;
            let second = if i % 2 == 0 {
                client.get(&url)
            } else {
                client.post(&url).body("x")
            };
            for resp in [second.send().await, first.await.unwrap()] {
                let resp = resp.unwrap();
                let status = resp.status().as_u16();
                let body = resp.text().await.unwrap();
                assert_eq!(status, 200, "round {i}: {body}\n{}", proxy.log());
            }
        }
        let connections = backend.connections.load(Ordering::SeqCst);
        assert!(
            connections >= 6,
            "the backend kept its connections ({connections})"
        );
    }
}

#[tokio::test]
async fn clients_that_stop_reading_never_stall_the_streams_sharing_their_upstream_connection() {
    common::init();
    // One worker, max_streams 4: every stream below shares one upstream connection.
    // Three clients ask for 1 MiB and read none of it (HTTP/2's default window of
    // 64 KiB); the fourth stream's answer must still come. With a connection window
    // of one stream's size, the unread data of the first would stall the rest.
    for server in [FAST, PINGORA] {
        let server = format!("threads = 1\n{server}");
        stalled_streams_leave_the_others_alone(&server).await;
    }
}

async fn stalled_streams_leave_the_others_alone(server: &str) {
    let backend = H2cBackend::start_with(Duration::ZERO, false, None).await;
    let extra = "protocol = \"h2c\"\nmax_streams = 4";
    let proxy = Proxy::start_with(server, &pool(backend.addr, extra)).await;
    let mut tls = (*common::resuming_client(&std::fs::read(proxy.ca_path()).unwrap())).clone();
    tls.alpn_protocols = vec![b"h2".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(tls));
    let mut stalled = Vec::new();
    for _ in 0..3 {
        let tcp = tokio::net::TcpStream::connect(proxy.https).await.unwrap();
        let name = rustls::pki_types::ServerName::try_from("a.test").unwrap();
        let io = connector.connect(name, tcp).await.unwrap();
        let (mut send, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .initial_stream_window_size(65_535)
            .initial_connection_window_size(65_535)
            .adaptive_window(false)
            .handshake::<_, http_body_util::Empty<Bytes>>(TokioIo::new(io))
            .await
            .unwrap();
        tokio::spawn(conn);
        let req = Request::get("https://a.test/big")
            .body(http_body_util::Empty::new())
            .unwrap();
        let resp = send.send_request(req).await.unwrap();
        assert_eq!(resp.status(), 200);
        // Held, never read.
        stalled.push((send, resp));
    }
    let client = proxy
        .client_builder(&["a.test"])
        .http2_prior_knowledge()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let resp = client
        .get(format!("https://a.test:{}/", proxy.https.port()))
        .send()
        .await
        .unwrap_or_else(|e| {
            panic!(
                "{server:?}: the fourth stream stalled: {e}\n{}",
                proxy.log()
            )
        });
    assert_eq!(resp.status(), 200);
    assert_eq!(field(&resp.text().await.unwrap(), "version"), "HTTP/2.0");
    let connections = backend.connections.load(Ordering::SeqCst);
    // One for the streams, and perhaps the health check's.
    assert!(
        connections <= 2,
        "the streams did not share a connection ({connections})"
    );
    drop(stalled);
}

#[tokio::test]
async fn header_rules_apply_alike_to_http2_backends_on_both_paths() {
    common::init();
    // The route's request and response header rules, the sticky cookie, the request
    // id and the connection-specific fields, for HTTP/2 clients of an h2c pool: the
    // fast path's streams and Pingora's path give the backend and the client the same.
    let backend = H2cBackend::start_with(Duration::ZERO, false, None).await;
    let rules = "request_headers = { set = { \"x-env\" = \"prod\" }, remove = [\"x-drop\"] }\n\
                 response_headers = { set = { \"server\" = \"rampart\" }, remove = [\"x-internal\"] }\n";
    let body = format!(
        "{TLS_A}[[routes]]\nname = \"all\"\naction = {{ forward = \"p\" }}\n{rules}\
         [pools.p]\nendpoints = [{{ address = \"{}\" }}]\nprotocol = \"h2c\"\nsticky = {{ cookie = \"rp_s\" }}\n",
        backend.addr
    );
    let mut seen_by = Vec::new();
    for server in [FAST, PINGORA] {
        let proxy = Proxy::start_with(server, &body).await;
        let client = h2_client(&proxy);
        let resp = client
            .get(format!("https://a.test:{}/", proxy.https.port()))
            .header("x-env", "dev")
            .header("x-drop", "1")
            .header("te", "trailers")
            .header("cookie", "a=1")
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200, "{server:?}");
        let h = resp.headers();
        let id = h["x-request-id"].to_str().unwrap().to_string();
        assert_eq!(h["server"], "rampart", "{server:?}: {h:?}");
        assert!(h.get("x-internal").is_none(), "{server:?}: {h:?}");
        let cookie = h["set-cookie"].to_str().unwrap();
        assert!(cookie.starts_with("rp_s="), "{server:?}: {cookie}");
        let mut seen: BTreeMap<String, String> =
            serde_json::from_str(&resp.text().await.unwrap()).unwrap();
        assert_eq!(seen.remove("x-request-id"), Some(id), "{server:?}");
        seen_by.push(seen);
    }
    let expected: BTreeMap<String, String> = [
        ("client", ""),
        ("cookie", "a=1"),
        ("serial", "0"),
        ("sni", ""),
        ("te", "trailers"),
        ("version", "HTTP/2.0"),
        ("x-env", "prod"),
        ("x-forwarded-for", "127.0.0.1"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    assert_eq!(seen_by[0], expected, "the fast path");
    assert_eq!(seen_by[1], expected, "Pingora's path");
}

#[tokio::test]
async fn http2_pools_that_fail_get_the_same_answers_on_both_paths() {
    common::init();
    // An endpoint that refuses connections, and one that accepts and never answers
    // (not even HTTP/2's SETTINGS), behind h2c pools without retries: the same status
    // for an HTTP/2 client on the fast path's streams and on Pingora's path.
    let refused = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let silent_addr = silent.local_addr().unwrap();
    let held = tokio::spawn(async move {
        let mut conns = Vec::new();
        while let Ok((c, _)) = silent.accept().await {
            conns.push(c);
        }
    });
    let body = format!(
        "{TLS_A}[[routes]]\nname = \"refused\"\npath_prefix = \"/refused\"\naction = {{ forward = \"refused\" }}\n\
         [[routes]]\nname = \"silent\"\npath_prefix = \"/silent\"\naction = {{ forward = \"silent\" }}\n\
         [pools.refused]\nprotocol = \"h2c\"\nendpoints = [{{ address = \"{refused}\" }}]\nretries = {{ attempts = 0 }}\n\
         [pools.silent]\nprotocol = \"h2c\"\nendpoints = [{{ address = \"{silent_addr}\" }}]\nretries = {{ attempts = 0 }}\n\
         timeouts = {{ connect = \"1s\", first_byte = \"500ms\" }}\n"
    );
    let mut answers = Vec::new();
    for server in [FAST, PINGORA] {
        let proxy = Proxy::start_with(server, &body).await;
        let client = h2_client(&proxy);
        let mut got = Vec::new();
        for path in ["/refused", "/silent"] {
            let url = format!("https://a.test:{}{path}", proxy.https.port());
            let resp = client.get(url).send().await.unwrap();
            got.push((path, resp.status().as_u16()));
        }
        eprintln!("{server:?}: {got:?}");
        answers.push(got);
    }
    held.abort();
    assert_eq!(
        answers[0],
        [("/refused", 502), ("/silent", 504)],
        "the fast path"
    );
    assert_eq!(answers[1], answers[0], "Pingora's path");
}

#[tokio::test]
async fn an_upstream_http2_connection_is_closed_once_idle_for_the_pools_idle_timeout() {
    common::init();
    // After a burst, nothing: the connections the fast path opened for it close after
    // `timeouts.idle` (no later request would sweep them; the backend would be held
    // open for ever). Health checks probe over TCP, which opens and closes its own.
    let backend = H2cBackend::start_with(Duration::from_millis(50), false, None).await;
    let extra = "protocol = \"h2c\"\nmax_streams = 4\ntimeouts = { idle = \"300ms\" }\n\
                 health_check = { probe = \"tcp\" }";
    let proxy = Proxy::start(&pool(backend.addr, extra)).await;
    let client = h2_client(&proxy);
    for (status, body) in h2_wave(&client, &proxy, 16).await {
        assert_eq!(status, 200, "{body}");
    }
    let used = backend.connections.load(Ordering::SeqCst);
    assert!(
        used >= 4,
        "16 streams at 4 per connection used {used} connections"
    );
    eventually("the idle upstream connections closed", || async {
        (backend.open.load(Ordering::SeqCst) == 0).then_some(())
    })
    .await;
    // And the next request opens a new one and is served.
    let (status, body) = h2_wave(&client, &proxy, 1).await.remove(0);
    assert_eq!(status, 200, "{body}\n{}", proxy.log());
}

#[tokio::test]
async fn streams_beyond_what_an_http2_endpoint_allows_go_out_on_another_connection() {
    common::init();
    // The endpoint takes 4 streams per connection, the pool allows 100: a wave of 16
    // goes out on 4 connections at once rather than queueing 4 at a time on one.
    let backend = H2cBackend::start_with(Duration::from_millis(300), false, Some(4)).await;
    let extra = "protocol = \"h2c\"\nhealth_check = { probe = \"tcp\" }";
    let proxy = Proxy::start_with("threads = 1", &pool(backend.addr, extra)).await;
    let client = h2_client(&proxy);
    // One request first, so that the endpoint's SETTINGS have arrived.
    assert_eq!(h2_wave(&client, &proxy, 1).await[0].0, 200);
    for (status, body) in h2_wave(&client, &proxy, 16).await {
        assert_eq!(status, 200, "{body}");
    }
    let peak = backend.peak.load(Ordering::SeqCst);
    assert!(peak > 4, "the 16 streams were served {peak} at a time");
}

#[tokio::test]
async fn health_checks_probe_over_the_pool_tls_and_protocol() {
    common::init();
    let server_pki = Pki::new("servers");
    let client_pki = Pki::new("clients");
    let (cert, key) = client_pki.leaf("proxy-client", &["rampart-proxy"], 7);
    for (alpn, protocol) in [
        (&[&b"http/1.1"[..]][..], "http1"),
        (&[&b"h2"[..]][..], "h2"),
    ] {
        let backend = TlsBackend::start(&server_pki, Some(&client_pki), alpn, false).await;
        let extra = format!(
            "protocol = \"{protocol}\"\n{}\nhealth_check = {{ interval = \"100ms\", timeout = \"100ms\", healthy_threshold = 1, unhealthy_threshold = 1 }}",
            tls_table(&server_pki, Some((&cert, &key)), "")
        );
        let proxy = Proxy::start(&pool(backend.addr, &extra)).await;
        let status = || async {
            let resp = Proxy::http_client()
                .get(proxy.url("/"))
                .send()
                .await
                .unwrap();
            resp.status().as_u16()
        };
        backend.health.store(503, Ordering::SeqCst);
        eventually("the failing endpoint is taken out", || async {
            (status().await == 503).then_some(())
        })
        .await;
        // Back only if the probes reach it over mutual TLS.
        backend.health.store(200, Ordering::SeqCst);
        eventually("the endpoint is back", || async {
            (status().await == 200).then_some(())
        })
        .await;
    }
}

/// A raw HTTP/1.1 exchange on `stream` after `prefix`: the response's head and body.
async fn raw_get<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    mut stream: S,
    prefix: &[u8],
    path: &str,
) -> String {
    stream.write_all(prefix).await.unwrap();
    let req = format!("GET {path} HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n");
    stream.write_all(req.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

fn json_body(response: &str) -> BTreeMap<String, String> {
    let body = response.split("\r\n\r\n").nth(1).unwrap_or("");
    serde_json::from_str(body).unwrap_or_else(|_| panic!("not JSON: {response}"))
}

const V1_HEADER: &[u8] = b"PROXY TCP4 192.0.2.7 127.0.0.1 40000 80\r\n";

#[tokio::test]
async fn the_proxy_protocol_from_a_trusted_balancer_names_the_client() {
    common::init();
    let backend = common::Backend::start("b").await;
    let mut v2 = b"\r\n\r\n\0\r\nQUIT\n\x21\x21\x00\x24".to_vec();
    v2.extend_from_slice(
        &"2001:db8::7"
            .parse::<std::net::Ipv6Addr>()
            .unwrap()
            .octets(),
    );
    v2.extend_from_slice(&std::net::Ipv6Addr::LOCALHOST.octets());
    v2.extend_from_slice(&[0x9c, 0x40, 0x01, 0xbb]);
    for server in [FAST, PINGORA] {
        let body = format!(
            "proxy_protocol_from = [\"127.0.0.0/8\"]\n{TLS_A}[access_log]\npath = \"stdout\"\n{}{}",
            forward_all("p"),
            common::pool_toml("p", "round_robin", &[&backend], "")
        );
        let proxy = Proxy::start_with(server, &body).await;
        // v1 on the plain listener.
        let tcp = tokio::net::TcpStream::connect(proxy.http).await.unwrap();
        let got = json_body(&raw_get(tcp, V1_HEADER, "/headers").await);
        assert_eq!(got["x-forwarded-for"], "192.0.2.7", "{server:?}");
        // v2 before the TLS handshake on the HTTPS listener.
        let mut tcp = tokio::net::TcpStream::connect(proxy.https).await.unwrap();
        tcp.write_all(&v2).await.unwrap();
        let tls = tls_to(&proxy, tcp).await;
        let got = json_body(&raw_get(tls, b"", "/headers").await);
        assert_eq!(got["x-forwarded-for"], "2001:db8::7", "{server:?}");
        // The access log names the clients the balancer named.
        let out = proxy.dir.path().join("rampart.out");
        let clients = eventually("two access log lines", || async {
            let text = std::fs::read_to_string(&out).unwrap_or_default();
            let clients: Vec<String> = text
                .lines()
                .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
                .map(|v| v["client"].as_str().unwrap_or("").to_string())
                .collect();
            (clients.len() >= 2).then_some(clients)
        })
        .await;
        assert_eq!(clients, ["192.0.2.7", "2001:db8::7"], "{server:?}");
        // Without the header, a trusted source gets nothing.
        let tcp = tokio::net::TcpStream::connect(proxy.http).await.unwrap();
        let got = raw_get(tcp, b"", "/headers").await;
        assert_eq!(got, "", "{server:?}");
        let metrics = common::fetch(&format!("http://{}/metrics", proxy.admin)).await;
        assert!(
            common::metric_value(&metrics, "rampart_proxy_protocol_refused_total")
                .is_some_and(|v| v >= 1.0),
            "{metrics}"
        );
    }
}

#[tokio::test]
async fn a_proxy_protocol_header_from_an_untrusted_source_is_refused() {
    common::init();
    let backend = common::Backend::start("b").await;
    for server in [FAST, PINGORA] {
        let body = format!(
            "proxy_protocol_from = [\"10.0.0.0/8\"]\n{}{}",
            forward_all("p"),
            common::pool_toml("p", "round_robin", &[&backend], "")
        );
        let proxy = Proxy::start_with(server, &body).await;
        let hits = backend.hits();
        let tcp = tokio::net::TcpStream::connect(proxy.http).await.unwrap();
        let got = raw_get(tcp, V1_HEADER, "/headers").await;
        assert!(got.starts_with("HTTP/1.1 400"), "{server:?}: {got}");
        assert_eq!(backend.hits(), hits, "{server:?}: {got}");
        // And its own requests are served as they come.
        let tcp = tokio::net::TcpStream::connect(proxy.http).await.unwrap();
        let got = json_body(&raw_get(tcp, b"", "/headers").await);
        assert_eq!(got["x-forwarded-for"], "127.0.0.1");
    }
}

async fn tls_to(
    proxy: &Proxy,
    tcp: tokio::net::TcpStream,
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let pem = std::fs::read(proxy.ca_path()).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut &pem[..]) {
        roots.add(cert.unwrap()).unwrap();
    }
    let config = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect("a.test".try_into().unwrap(), tcp)
        .await
        .unwrap()
}

/// HAProxy (Debian's) with `accept-proxy`, answering each request with the client
/// address it read from the PROXY header.
struct Haproxy {
    child: std::process::Child,
    addr: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Haproxy {
    async fn start() -> Haproxy {
        let dir = tempfile::tempdir().unwrap();
        let addr = common::free_addr();
        let config = format!(
            "defaults\n  mode http\n  timeout connect 5s\n  timeout client 10s\n  timeout server 10s\nfrontend fe\n  bind {addr} accept-proxy\n  http-request return status 200 content-type text/plain lf-string \"%[src] %[src_port]\"\n"
        );
        let path = dir.path().join("haproxy.cfg");
        std::fs::write(&path, config).unwrap();
        let child = std::process::Command::new("haproxy")
            .arg("-db")
            .arg("-f")
            .arg(&path)
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("haproxy (Debian package haproxy; scripts/setup installs it)");
        eventually("haproxy listens", || async {
            tokio::net::TcpStream::connect(addr).await.ok().map(|_| ())
        })
        .await;
        Haproxy {
            child,
            addr,
            _dir: dir,
        }
    }
}

#[tokio::test]
async fn pools_send_the_proxy_protocol_header_that_haproxy_reads() {
    common::init();
    let haproxy = Haproxy::start().await;
    for server in [FAST, PINGORA] {
        for version in ["v1", "v2"] {
            let body = format!(
                "proxy_protocol_from = [\"127.0.0.2\"]\n{}",
                pool(haproxy.addr, &format!("proxy_protocol = \"{version}\""))
            );
            let proxy = Proxy::start_with(server, &body).await;
            // A client from 127.0.0.3: HAProxy sees it, not the proxy's own address.
            let socket = tokio::net::TcpSocket::new_v4().unwrap();
            socket.bind("127.0.0.3:0".parse().unwrap()).unwrap();
            let tcp = socket.connect(proxy.http).await.unwrap();
            let port = tcp.local_addr().unwrap().port();
            let got = raw_get(tcp, b"", "/").await;
            assert!(
                got.ends_with(&format!("\r\n\r\n127.0.0.3 {port}")),
                "{server:?} {version}: {got}\n{}",
                proxy.log()
            );
            // Through a trusted balancer, the client it named travels on.
            let socket = tokio::net::TcpSocket::new_v4().unwrap();
            socket.bind("127.0.0.2:0".parse().unwrap()).unwrap();
            let tcp = socket.connect(proxy.http).await.unwrap();
            let got = raw_get(tcp, V1_HEADER, "/").await;
            assert!(
                got.ends_with("\r\n\r\n192.0.2.7 40000"),
                "{server:?} {version}: {got}"
            );
        }
    }
}

#[tokio::test]
async fn insecure_skip_verify_accepts_any_certificate_when_acknowledged() {
    common::init();
    let pki = Pki::new("unknown");
    let backend = TlsBackend::start(&pki, None, &[b"http/1.1"], false).await;
    let tls = "tls = { insecure_skip_verify = true, i_understand_this_is_insecure = true }";
    for server in [FAST, PINGORA] {
        let proxy = Proxy::start_with(server, &pool(backend.addr, tls)).await;
        for (status, body) in both_ways(&proxy, "/").await {
            assert_eq!(status, 200, "{server:?}: {body}\n{}", proxy.log());
        }
    }
}

#[tokio::test]
async fn a_connection_verified_for_one_pool_is_never_reused_by_a_pool_with_other_trust() {
    common::init();
    let pki = Pki::new("servers");
    let other = Pki::new("other");
    let backend = TlsBackend::start(&pki, None, &[b"http/1.1"], false).await;
    // Two pools, one endpoint: "good" trusts its CA, "bad" does not.
    let body = format!(
        "{TLS_A}[[routes]]\nname = \"bad\"\npath_prefix = \"/bad\"\naction = {{ forward = \"bad\" }}\n\
         [[routes]]\nname = \"good\"\naction = {{ forward = \"good\" }}\n\
         [pools.good]\nendpoints = [{{ address = \"{a}\" }}]\n{}\n\
         [pools.bad]\nendpoints = [{{ address = \"{a}\" }}]\nretries = {{ attempts = 0 }}\n{}\n",
        tls_table(&pki, None, ""),
        tls_table(&other, None, ""),
        a = backend.addr,
    );
    for server in [FAST, PINGORA] {
        let proxy = Proxy::start_with(server, &body).await;
        let client = Proxy::http_client();
        // A verified keep-alive connection to the endpoint is now idle in the pool.
        let good = client.get(proxy.url("/")).send().await.unwrap();
        assert_eq!(good.status(), 200, "{server:?}");
        let bad = client.get(proxy.url("/bad")).send().await.unwrap();
        assert_eq!(
            bad.status(),
            502,
            "{server:?}: reused the other pool's connection"
        );
    }
}

/// An h2c backend that reads each request's body to its end and answers its length
/// (`len=N`), or, for `/early`, answers at once without reading it.
async fn upload_backend() -> (SocketAddr, tokio::task::JoinHandle<()>) {
    use http_body_util::BodyExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let svc =
                    hyper::service::service_fn(|req: Request<hyper::body::Incoming>| async move {
                        let text = if req.uri().path() == "/early" {
                            "early".to_string()
                        } else {
                            match req.into_body().collect().await {
                                Ok(body) => format!("len={}", body.to_bytes().len()),
                                Err(e) => format!("broken: {e}"),
                            }
                        };
                        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(text))))
                    });
                let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });
    (addr, task)
}

/// A request body of `len` bytes sent in 8 KiB pieces, its length not declared.
fn pieces(len: usize) -> reqwest::Body {
    let pieces = (0..len.div_ceil(8192)).map(move |i| {
        let n = 8192.min(len - i * 8192);
        Ok::<_, Infallible>(Bytes::from(vec![b'u'; n]))
    });
    reqwest::Body::wrap_stream(futures_util::stream::iter(pieces))
}

#[tokio::test]
async fn uploads_of_unknown_length_reach_http2_backends_alike_on_both_paths() {
    common::init();
    // Bodies the fast path cannot read whole first (no length, as gRPC clients send
    // them, or a length over 64 KiB) go up as they arrive: on the HTTP/2 fast path
    // itself (counted by its metric) as on Pingora's, with the same answers — and the
    // route's max_body_bytes holds for them both.
    let (backend, _task) = upload_backend().await;
    let config = format!(
        "[limits]\nmax_body_bytes = \"256KiB\"\n{}",
        pool(backend, "protocol = \"h2c\"")
    );
    for (server, counted) in [(FAST, 4.0), (PINGORA, 0.0)] {
        let proxy = Proxy::start_with(server, &config).await;
        let client = h2_client(&proxy);
        let url = |path: &str| format!("https://a.test:{}{path}", proxy.https.port());
        let fast = "rampart_http2_fast_path_requests_total";
        let before = proxy.metric(fast).await;
        let answer = |resp: reqwest::Response| async move {
            (resp.status().as_u16(), resp.text().await.unwrap())
        };
        let streamed = client.post(url("/")).body(pieces(200 * 1024)).send();
        let got = answer(streamed.await.unwrap()).await;
        assert_eq!(got, (200, "len=204800".to_string()), "{server:?}");
        let declared = client.post(url("/")).body(vec![b'd'; 100 * 1024]).send();
        let got = answer(declared.await.unwrap()).await;
        assert_eq!(got, (200, "len=102400".to_string()), "{server:?}");
        // A backend that answers before reading the body: its answer stands.
        let early = client.post(url("/early")).body(pieces(64 * 1024)).send();
        assert_eq!(answer(early.await.unwrap()).await.1, "early", "{server:?}");
        // Over max_body_bytes: 413 while the backend still waits for the end.
        let large = client.post(url("/")).body(pieces(300 * 1024)).send().await;
        let status = large.map(|r| r.status().as_u16());
        assert_eq!(status.ok(), Some(413), "{server:?}: {}", proxy.log());
        let n = proxy.metric(fast).await - before;
        assert_eq!(n, counted, "{server:?}: requests on the HTTP/2 fast path");
    }
}

#[tokio::test]
async fn an_upload_of_unknown_length_that_stalls_is_answered_on_the_http2_fast_path() {
    common::init();
    // The fast path times out a body passed on as it arrives as it does a body read
    // whole (400 after body_read_timeout without a piece). Pingora's path is not
    // asked: its HTTP/2 session reads request bodies without a timeout of its own.
    let (backend, _task) = upload_backend().await;
    let config = format!(
        "[limits]\nbody_read_timeout = \"300ms\"\n{}",
        pool(backend, "protocol = \"h2c\"")
    );
    let proxy = Proxy::start(&config).await;
    let client = h2_client(&proxy);
    // One piece, then nothing until the proxy has answered.
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, Infallible>>(1);
    tx.send(Ok(Bytes::from_static(b"first piece")))
        .await
        .unwrap();
    let body = reqwest::Body::wrap_stream(tokio_stream::wrappers::ReceiverStream::new(rx));
    let url = format!("https://a.test:{}/", proxy.https.port());
    let resp = client.post(url).body(body).send().await;
    let status = resp.map(|r| r.status().as_u16()).ok();
    drop(tx);
    assert_eq!(status, Some(400), "{}", proxy.log());
    let fast = proxy.metric("rampart_http2_fast_path_requests_total").await;
    assert_eq!(fast, 1.0);
}
