//! End-to-end TLS: SNI selection, unknown SNI, HTTP/2, certificate swaps at run time.
#![allow(missing_docs, clippy::unwrap_used)]

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use common::{eventually, Backend, Proxy};
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const RESPOND: &str = "[[routes]]\nname = \"hello\"\naction = { respond = { body = \"hello\" } }\n";

/// Opens a TLS connection with `sni` (or none) trusting `roots`; returns the leaf served.
async fn handshake(
    addr: SocketAddr,
    roots: &[CertificateDer<'static>],
    verify_as: &str,
    send_sni: bool,
) -> Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>, std::io::Error> {
    let mut store = rustls::RootCertStore::empty();
    for r in roots {
        store.add(r.clone()).unwrap();
    }
    let mut config = rustls::ClientConfig::builder()
        .with_root_certificates(store)
        .with_no_client_auth();
    config.enable_sni = send_sni;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    connector
        .connect(ServerName::try_from(verify_as.to_string()).unwrap(), tcp)
        .await
}

fn pem_certs(path: &Path) -> Vec<CertificateDer<'static>> {
    let pem = std::fs::read(path).unwrap();
    rustls_pemfile::certs(&mut &pem[..])
        .collect::<Result<_, _>>()
        .unwrap()
}

#[tokio::test]
async fn sni_selects_the_certificate_and_unknown_sni_fails() {
    common::init();
    let tls = "[[tls]]\nhosts = [\"a.test\"]\nsource = \"internal\"\n[[tls]]\nhosts = [\"*.b.test\"]\nsource = \"internal\"\n";
    let proxy = Proxy::start(&format!("{tls}{RESPOND}")).await;
    let client = proxy.client(&["a.test", "x.b.test", "other.test"]);
    for host in ["a.test", "x.b.test"] {
        let r = client
            .get(format!("https://{host}:{}/", proxy.https.port()))
            .send()
            .await
            .unwrap();
        assert_eq!(
            r.text().await.unwrap(),
            "hello",
            "{host} validated against its own certificate"
        );
    }
    let err = client
        .get(format!("https://other.test:{}/", proxy.https.port()))
        .send()
        .await
        .unwrap_err();
    assert!(
        err.is_connect(),
        "unknown SNI without default_sni fails the handshake: {err:?}"
    );
    assert!(
        proxy
            .metric("rampart_tls_handshake_failures_total{reason=\"unknown_sni\"}")
            .await
            >= 1.0
    );
    assert!(proxy.metric("rampart_tls_handshakes_total").await >= 2.0);
    let roots = pem_certs(&proxy.ca_path());
    assert!(
        handshake(proxy.https, &roots, "a.test", false)
            .await
            .is_err(),
        "no SNI, no default: refused"
    );
}

#[tokio::test]
async fn default_sni_serves_clients_without_or_with_unknown_sni() {
    common::init();
    let tls = "[[tls]]\nhosts = [\"a.test\"]\nsource = \"internal\"\n[[tls]]\nhosts = [\"fallback.test\"]\nsource = \"internal\"\n";
    let proxy = Proxy::start_with(
        "default_sni = \"fallback.test\"",
        &format!("{tls}{RESPOND}"),
    )
    .await;
    let roots = pem_certs(&proxy.ca_path());
    handshake(proxy.https, &roots, "fallback.test", false)
        .await
        .expect("no SNI gets the default certificate");
    handshake(proxy.https, &roots, "a.test", true)
        .await
        .expect("a known SNI still gets its own");
    // Unknown SNI: the default certificate is served (it does not match the name asked).
    let err = handshake(proxy.https, &roots, "unknown.test", true)
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("NotValidForName")
            || err.to_string().contains("not valid for name"),
        "{err}"
    );
}

#[tokio::test]
async fn http2_is_negotiated_by_alpn() {
    common::init();
    let b = Backend::start("b").await;
    let tls = "[[tls]]\nhosts = [\"a.test\"]\nsource = \"internal\"\n";
    let proxy = Proxy::start(&format!(
        "{tls}[[routes]]\nname = \"all\"\naction = {{ forward = \"p\" }}\n{}",
        common::pool_toml("p", "round_robin", &[&b], "")
    ))
    .await;
    let client = proxy.client(&["a.test"]);
    let r = client
        .get(format!("https://a.test:{}/headers", proxy.https.port()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.version(), http::Version::HTTP_2);
    let seen: std::collections::HashMap<String, String> = r.json().await.unwrap();
    assert_eq!(
        seen["host"],
        format!("a.test:{}", proxy.https.port()),
        "the :authority becomes the upstream Host"
    );
    assert_eq!(seen["x-forwarded-proto"], "https");
}

/// A test CA and a leaf for `host` signed by it, written as PEM files; returns the CA.
fn write_leaf(dir: &Path, host: &str, serial: u64) -> CertificateDer<'static> {
    let pki = common::pki::Pki::new(&format!("test {serial}"));
    let (cert, key) = pki.leaf("leaf", &[host], serial);
    std::fs::copy(cert, dir.join("cert.pem")).unwrap();
    std::fs::copy(key, dir.join("key.pem")).unwrap();
    pki.ca_der
}

#[tokio::test]
async fn certificates_swap_at_run_time_without_dropping_connections() {
    common::init();
    let certs = tempfile::tempdir().unwrap();
    let ca1 = write_leaf(certs.path(), "swap.test", 1);
    let tls = format!(
        "[[tls]]\nhosts = [\"swap.test\"]\nsource = {{ files = {{ cert = {:?}, key = {:?} }} }}\n",
        certs.path().join("cert.pem"),
        certs.path().join("key.pem")
    );
    let body = format!("{tls}{RESPOND}");
    let proxy = Proxy::start(&body).await;

    let mut old_conn = handshake(proxy.https, std::slice::from_ref(&ca1), "swap.test", true)
        .await
        .expect("first certificate served");
    let ca2 = write_leaf(certs.path(), "swap.test", 2);
    assert!(proxy.reload(&body).await >= 2);

    handshake(proxy.https, &[ca2], "swap.test", true)
        .await
        .expect("new handshakes get the new certificate");
    assert!(
        handshake(proxy.https, &[ca1], "swap.test", true)
            .await
            .is_err(),
        "the old certificate is no longer served"
    );
    // The connection opened before the swap keeps working.
    old_conn
        .write_all(b"GET / HTTP/1.1\r\nHost: swap.test\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut response = String::new();
    old_conn.read_to_string(&mut response).await.unwrap();
    assert!(
        response.starts_with("HTTP/1.1 200") && response.ends_with("hello"),
        "{response}"
    );
}

#[tokio::test]
async fn a_broken_certificate_file_keeps_the_old_one_serving() {
    common::init();
    let certs = tempfile::tempdir().unwrap();
    let ca1 = write_leaf(certs.path(), "keep.test", 1);
    let tls = format!(
        "[[tls]]\nhosts = [\"keep.test\"]\nsource = {{ files = {{ cert = {:?}, key = {:?} }} }}\n",
        certs.path().join("cert.pem"),
        certs.path().join("key.pem")
    );
    let body = format!("{tls}{RESPOND}");
    let proxy = Proxy::start(&body).await;
    std::fs::write(certs.path().join("key.pem"), "not a key").unwrap();
    assert_eq!(proxy.reload(&body).await, 1, "the reload is refused");
    handshake(proxy.https, &[ca1], "keep.test", true)
        .await
        .expect("the previous certificate still serves");
    let status = proxy.status().await;
    let error = status["last_reload"]["error"].as_str().unwrap();
    assert!(
        error.contains("key.pem"),
        "the error names the file: {error}"
    );
    assert_eq!(
        proxy.metric("rampart_config_reload_failures_total").await,
        1.0
    );
}

/// The admin listener of a standalone proxy: liveness, readiness, the `/status` document
/// and every metric family the proxy documents, each with the labels dashboards and
/// alerts select by, after real traffic over both listeners.
#[tokio::test]
async fn the_admin_listener_reports_health_status_and_every_metric_family() {
    common::init();
    let backend = Backend::start("b").await;
    let config = format!(
        "[[tls]]\nhosts = [\"a.test\"]\nsource = \"internal\"\n[[routes]]\nname = \"web\"\nhosts = [\"a.test\"]\naction = {{ forward = \"p\" }}\n[pools.p]\nendpoints = [{{ address = \"{}\" }}]\n",
        backend.addr
    );
    let proxy = Proxy::start(&config).await;
    let admin = |path: &str| format!("http://{}{path}", proxy.admin);
    for path in ["/healthz", "/ready"] {
        assert_eq!(
            reqwest::get(admin(path)).await.unwrap().status(),
            200,
            "{path}"
        );
    }

    let https = proxy.client(&["a.test"]);
    let url = format!("https://a.test:{}/", proxy.https.port());
    assert_eq!(
        https.get(&url).send().await.unwrap().text().await.unwrap(),
        "b"
    );
    let plain = Proxy::http_client()
        .get(proxy.url("/"))
        .header("host", "a.test")
        .send()
        .await
        .unwrap();
    assert_eq!(plain.text().await.unwrap(), "b");
    let roots = pem_certs(&proxy.ca_path());
    assert!(handshake(proxy.https, &roots, "unknown.test", true)
        .await
        .is_err());
    let failures = proxy.metric("rampart_config_reload_failures_total").await;
    proxy.reload("[[routes]\n").await;
    eventually("the failed reload to be counted", || async {
        (proxy.metric("rampart_config_reload_failures_total").await > failures).then_some(())
    })
    .await;

    let status = proxy.status().await;
    assert_eq!(status["version"], 1, "{status}");
    assert_eq!(status["ready"], true);
    assert_eq!(status["routes"][0]["name"], "web");
    assert_eq!(status["routes"][0]["action"]["forward"], "p");
    let endpoint = &status["pools"]["p"]["endpoints"][0];
    assert_eq!(endpoint["address"], backend.addr.to_string());
    assert_eq!(endpoint["available"], true);
    assert_eq!(endpoint["requests"], 2);
    assert_eq!(status["certificates"][0]["name"], "a.test");
    assert!(
        status["certificates"][0]["expires_in_seconds"]
            .as_i64()
            .unwrap()
            > 80 * 86_400
    );

    let metrics = proxy.metrics().await;
    let value = |prefix: &str| -> f64 {
        common::metric_value(&metrics, prefix)
            .unwrap_or_else(|| panic!("no {prefix} in\n{metrics}"))
    };
    let endpoint = format!("endpoint=\"{}\",pool=\"p\"", backend.addr);
    for (series, expected) in [
        (
            "rampart_requests_total{class=\"2xx\",pool=\"p\",route=\"web\"}",
            2.0,
        ),
        ("rampart_request_duration_seconds_count{route=\"web\"}", 2.0),
        ("rampart_upstream_ttfb_seconds_count{pool=\"p\"}", 2.0),
        (&format!("rampart_endpoint_healthy{{{endpoint}}}"), 1.0),
        (
            "rampart_tls_handshake_failures_total{reason=\"unknown_sni\"}",
            1.0,
        ),
        ("rampart_config_version", 1.0),
    ] {
        assert_eq!(value(series), expected, "{series}");
    }
    assert!(value("rampart_tls_handshakes_total") >= 1.0);
    assert!(value("rampart_config_reload_failures_total") >= 1.0);
    assert!(value("rampart_certificate_expiry_seconds{name=\"a.test\"}") > 80.0 * 86_400.0);
    // Connection gauges exist per listener; the HTTP client's keep-alive connection
    // may or may not still be open, so only their presence is checked.
    for listener in ["http", "https"] {
        value(&format!(
            "rampart_active_connections{{listener=\"{listener}\"}}"
        ));
    }
    for histogram in [
        "rampart_request_duration_seconds_bucket{route=\"web\",le=\"0.005\"}",
        "rampart_upstream_ttfb_seconds_bucket{pool=\"p\",le=\"+Inf\"}",
    ] {
        value(histogram);
    }
}

#[tokio::test]
async fn idle_http2_connections_are_closed_at_the_keepalive_timeout() {
    common::init();
    let b = Backend::start("b").await;
    let proxy = Proxy::start(&format!(
        "[limits]\nkeepalive_timeout = \"1s\"\n\n[[tls]]\nhosts = [\"a.test\"]\nsource = \"internal\"\n\n\
         [[routes]]\nname = \"all\"\naction = {{ forward = \"p\" }}\n{}",
        common::pool_toml("p", "round_robin", &[&b], "")
    ))
    .await;
    let mut roots = rustls::RootCertStore::empty();
    for cert in pem_certs(&proxy.ca_path()) {
        roots.add(cert).unwrap();
    }
    let mut config = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = tokio::net::TcpStream::connect(proxy.https).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("a.test").unwrap(), tcp)
        .await
        .unwrap();
    let (mut send, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tls),
    )
    .await
    .unwrap();
    let driver = tokio::spawn(conn);
    // Two requests keep the connection busy; then it is idle.
    for _ in 0..2 {
        let req = http::Request::get(format!("https://a.test:{}/", proxy.https.port()))
            .body(http_body_util::Empty::<bytes::Bytes>::new())
            .unwrap();
        let resp = send.send_request(req).await.unwrap();
        assert_eq!(resp.status(), 200);
        http_body_util::BodyExt::collect(resp.into_body())
            .await
            .unwrap();
    }
    // The proxy ends the idle connection (GOAWAY, then close) after keepalive_timeout;
    // without that it would stay open as long as the client keeps it.
    let closed = tokio::time::timeout(std::time::Duration::from_secs(10), driver).await;
    assert!(
        matches!(closed, Ok(Ok(Ok(())))),
        "the idle HTTP/2 connection was not closed cleanly: {closed:?}"
    );
}

#[tokio::test]
async fn a_proxy_resumes_more_sessions_than_a_cache_holds_and_only_its_own() {
    common::init();
    let tls = "[[tls]]\nhosts = [\"a.test\"]\nsource = \"internal\"\n";
    let one = Proxy::start(&format!("{tls}{RESPOND}")).await;
    let ca = std::fs::read(one.ca_path()).unwrap();
    // 300 clients (more than the 256 sessions rustls' cache holds), each back once:
    // every one resumes, from its ticket.
    let clients: Vec<_> = (0..300).map(|_| common::resuming_client(&ca)).collect();
    for c in &clients {
        assert!(!common::handshake_resumed(c, one.https, "a.test").await);
    }
    let mut resumed = 0;
    for c in &clients {
        resumed += usize::from(common::handshake_resumed(c, one.https, "a.test").await);
    }
    assert_eq!(resumed, 300, "clients resumed, of 300");

    // Another standalone proxy, with keys of its own, resumes none of them.
    let two = Proxy::start(&format!("{tls}{RESPOND}")).await;
    let mut both = ca.clone();
    both.extend(std::fs::read(two.ca_path()).unwrap());
    let c = common::resuming_client(&both);
    assert!(!common::handshake_resumed(&c, one.https, "a.test").await);
    assert!(!common::handshake_resumed(&c, two.https, "a.test").await);

    // With tickets off, only the session cache resumes: the first of 300 clients no
    // longer does.
    let off = Proxy::start(&format!(
        "{tls}{RESPOND}\n[session_tickets]\nenabled = false\n"
    ))
    .await;
    let ca_off = std::fs::read(off.ca_path()).unwrap();
    let clients: Vec<_> = (0..300).map(|_| common::resuming_client(&ca_off)).collect();
    for c in &clients {
        common::handshake_resumed(c, off.https, "a.test").await;
    }
    assert!(!common::handshake_resumed(&clients[0], off.https, "a.test").await);
}
