//! Client certificate authentication (issue 26): `client_auth` per `[[tls]]` entry in
//! `require` and `optional` mode, `require_client_cert` per route, the verified
//! certificate's details forwarded upstream (and never taken from the client), and a
//! connection verified for one host not counting for another (421).
//!
//! Certificates are made by the test (rcgen): good, from another CA, expired, none.
//! Each case runs through the HTTP/1 and HTTP/2 fast paths and Pingora's path alone.

#![allow(missing_docs, clippy::unwrap_used)]

mod common;

use std::collections::HashMap;
use std::sync::Arc;

use common::pki::Pki;
use common::{Backend, Proxy};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const PINGORA: &str = "http1_fast_path = false\nhttp2_fast_path = false";

/// Who the clients are: a CA the proxy trusts and one it does not, with their leaves.
struct Clients {
    trusted: Pki,
    other: Pki,
}

impl Clients {
    fn new() -> Clients {
        let trusted = Pki::new("clients");
        let mut alice =
            rcgen::CertificateParams::new(vec!["alice.clients.test".to_string()]).unwrap();
        alice
            .distinguished_name
            .push(rcgen::DnType::CommonName, "alice");
        alice
            .distinguished_name
            .push(rcgen::DnType::OrganizationName, "Example");
        alice.subject_alt_names.push(rcgen::SanType::Rfc822Name(
            "alice@example.com".try_into().unwrap(),
        ));
        trusted.sign("alice", &alice);
        let mut expired =
            rcgen::CertificateParams::new(vec!["old.clients.test".to_string()]).unwrap();
        expired.not_before = rcgen::date_time_ymd(2020, 1, 1);
        expired.not_after = rcgen::date_time_ymd(2021, 1, 1);
        trusted.sign("expired", &expired);
        let other = Pki::new("stranger");
        other.leaf("mallory", &["mallory.test"], 7);
        Clients { trusted, other }
    }

    /// A reqwest identity from `<file>.pem` and `<file>.key` in `pki`'s directory.
    fn identity(pki: &Pki, file: &str) -> reqwest::Identity {
        let dir = pki.dir.path();
        let mut pem = std::fs::read(dir.join(format!("{file}.pem"))).unwrap();
        pem.extend(std::fs::read(dir.join(format!("{file}.key"))).unwrap());
        reqwest::Identity::from_pem(&pem).unwrap()
    }
}

fn config(clients: &Clients, backend: &Arc<Backend>) -> String {
    let ca = clients.trusted.ca_file();
    format!(
        r#"[[tls]]
hosts = ["mtls.test"]
source = "internal"
client_auth = {{ ca_file = {ca:?}, headers = {{ pem = "x-client-cert" }} }}

[[tls]]
hosts = ["opt.test"]
source = "internal"
client_auth = {{ ca_file = {ca:?}, mode = "optional" }}

[[tls]]
hosts = ["open.test"]
source = "internal"

[[routes]]
name = "secure"
hosts = ["opt.test"]
path_prefix = "/secure"
strip_prefix = true
require_client_cert = true
action = {{ forward = "app" }}

[[routes]]
name = "all"
action = {{ forward = "app" }}

{}"#,
        common::pool_toml("app", "round_robin", &[backend], "")
    )
}

/// An HTTPS client for the three hosts, with `identity` and in `version`.
fn client(proxy: &Proxy, identity: Option<reqwest::Identity>, h2: bool) -> reqwest::Client {
    let mut b = proxy.client_builder(&["mtls.test", "opt.test", "open.test"]);
    if let Some(id) = identity {
        b = b.identity(id);
    }
    b = if h2 {
        b.http2_prior_knowledge()
    } else {
        b.http1_only()
    };
    b.build().unwrap()
}

/// What the backend saw of `GET https://<host>/<path>/headers` (status, headers), the
/// client sending a forged certificate subject.
async fn seen(
    client: &reqwest::Client,
    proxy: &Proxy,
    host: &str,
    path: &str,
) -> Result<(u16, HashMap<String, String>), reqwest::Error> {
    let r = client
        .get(format!(
            "https://{host}:{}{path}/headers",
            proxy.https.port()
        ))
        .header("x-client-cert-subject", "CN=admin")
        .header("x-client-cert", "forged")
        .send()
        .await?;
    let status = r.status().as_u16();
    let text = r.text().await?;
    let headers = if status == 200 {
        serde_json::from_str(&text).unwrap()
    } else {
        HashMap::from([("body".to_string(), text)])
    };
    Ok((status, headers))
}

async fn each_transport(check: impl AsyncFn(&Proxy, &Clients, bool, &str)) {
    let clients = Clients::new();
    let backend = Backend::start("app").await;
    for (server, name) in [("", "fast paths"), (PINGORA, "Pingora's path")] {
        let proxy = Proxy::start_with(server, &config(&clients, &backend)).await;
        for h2 in [false, true] {
            let what = format!("{name}, {}", if h2 { "HTTP/2" } else { "HTTP/1.1" });
            check(&proxy, &clients, h2, &what).await;
        }
    }
}

#[tokio::test]
async fn a_required_certificate_is_verified_and_its_details_go_upstream() {
    common::init();
    each_transport(async |proxy, clients, h2, what| {
        let alice = client(
            proxy,
            Some(Clients::identity(&clients.trusted, "alice")),
            h2,
        );
        let (status, headers) = seen(&alice, proxy, "mtls.test", "").await.unwrap();
        assert_eq!(status, 200, "{what}: {headers:?}");
        let subject = &headers["x-client-cert-subject"];
        assert!(
            subject.contains("CN=alice") && subject.contains("O=Example"),
            "{what}: {subject}"
        );
        assert_eq!(
            headers["x-client-cert-sans"], "DNS:alice.clients.test,email:alice@example.com",
            "{what}"
        );
        let pem = std::fs::read_to_string(clients.trusted.dir.path().join("alice.pem")).unwrap();
        assert_eq!(
            headers["x-client-cert-fingerprint"],
            rampart_pki::fingerprint_pem(&pem).unwrap(),
            "{what}"
        );
        // The PEM, URL-encoded: what the backend decodes is the client's certificate.
        let decoded = percent_decode(&headers["x-client-cert"]);
        assert_eq!(
            rampart_pki::fingerprint_pem(&decoded).unwrap(),
            rampart_pki::fingerprint_pem(&pem).unwrap(),
            "{what}"
        );

        // No certificate, one from another CA, an expired one: no handshake.
        for (identity, case) in [
            (None, "none"),
            (
                Some(Clients::identity(&clients.other, "mallory")),
                "another CA",
            ),
            (
                Some(Clients::identity(&clients.trusted, "expired")),
                "expired",
            ),
        ] {
            let c = client(proxy, identity, h2);
            let r = seen(&c, proxy, "mtls.test", "").await;
            assert!(r.is_err(), "{what}: a client with {case} got {r:?}");
        }
    })
    .await;
}

#[tokio::test]
async fn an_optional_host_serves_without_a_certificate_but_not_its_protected_route() {
    common::init();
    each_transport(async |proxy, clients, h2, what| {
        let anonymous = client(proxy, None, h2);
        let (status, headers) = seen(&anonymous, proxy, "opt.test", "").await.unwrap();
        assert_eq!(status, 200, "{what}");
        // The forged headers never reach the backend, here or on a host without
        // client_auth.
        assert!(
            !headers.contains_key("x-client-cert-subject"),
            "{what}: {headers:?}"
        );
        assert!(
            !headers.contains_key("x-client-cert"),
            "{what}: {headers:?}"
        );
        let (status, headers) = seen(&anonymous, proxy, "open.test", "").await.unwrap();
        assert_eq!(status, 200, "{what}");
        assert!(
            !headers.contains_key("x-client-cert-subject"),
            "{what}: {headers:?}"
        );

        let (status, body) = seen(&anonymous, proxy, "opt.test", "/secure")
            .await
            .unwrap();
        assert_eq!(status, 403, "{what}: {body:?}");
        assert!(
            body["body"].contains("client certificate"),
            "{what}: {body:?}"
        );

        let alice = client(
            proxy,
            Some(Clients::identity(&clients.trusted, "alice")),
            h2,
        );
        let (status, headers) = seen(&alice, proxy, "opt.test", "/secure").await.unwrap();
        assert_eq!(status, 200, "{what}");
        assert!(
            headers["x-client-cert-subject"].contains("CN=alice"),
            "{what}: {headers:?}"
        );
        // Only the headers this host's client_auth names (no PEM here).
        assert!(
            !headers.contains_key("x-client-cert"),
            "{what}: {headers:?}"
        );

        // A certificate the host cannot verify is refused, even where none is needed.
        let mallory = client(
            proxy,
            Some(Clients::identity(&clients.other, "mallory")),
            h2,
        );
        assert!(
            seen(&mallory, proxy, "opt.test", "").await.is_err(),
            "{what}"
        );
    })
    .await;
}

/// Sends one HTTP/1.1 request for `host` over a TLS connection whose SNI is `sni`,
/// with the client certificate `identity` (`<file>` in `pki`), and returns the status.
async fn status_over(proxy: &Proxy, sni: &str, host: &str, identity: Option<(&Pki, &str)>) -> u16 {
    let mut roots = rustls::RootCertStore::empty();
    let ca = std::fs::read(proxy.ca_path()).unwrap();
    for c in rustls_pemfile::certs(&mut &ca[..]) {
        roots.add(c.unwrap()).unwrap();
    }
    let builder = rustls::ClientConfig::builder().with_root_certificates(roots);
    let config = match identity {
        Some((pki, file)) => {
            let (chain, key) = common::pki::read_chain(&pki.dir.path().join(format!("{file}.pem")));
            builder.with_client_auth_cert(chain, key).unwrap()
        }
        None => builder.with_no_client_auth(),
    };
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(proxy.https).await.unwrap();
    let mut tls = connector
        .connect(sni.to_string().try_into().unwrap(), tcp)
        .await
        .unwrap();
    tls.write_all(
        format!("GET /headers HTTP/1.1\r\nhost: {host}\r\nconnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    tls.flush().await.unwrap();
    let mut out = Vec::new();
    let _ = tls.read_to_end(&mut out).await;
    let text = String::from_utf8_lossy(&out);
    text.split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status in {text:?}"))
}

#[tokio::test]
async fn a_connection_verified_for_one_host_does_not_authenticate_another() {
    common::init();
    let clients = Clients::new();
    let backend = Backend::start("app").await;
    for server in ["", PINGORA] {
        let proxy = Proxy::start_with(server, &config(&clients, &backend)).await;
        let alice = Some((&clients.trusted, "alice"));
        // Control: the handshake for the host itself.
        assert_eq!(
            status_over(&proxy, "mtls.test", "mtls.test", alice).await,
            200
        );
        // A handshake for a host without client_auth, then a request for one that
        // requires it (what HTTP/2 connection coalescing does, or an attacker): 421,
        // and a browser retries on a connection of its own.
        assert_eq!(
            status_over(&proxy, "open.test", "mtls.test", None).await,
            421
        );
        assert_eq!(
            status_over(&proxy, "open.test", "opt.test", None).await,
            200
        );
        // Verified under the optional host's policy: still not the required host's.
        assert_eq!(
            status_over(&proxy, "opt.test", "mtls.test", alice).await,
            421
        );
        // Plain HTTP carries no certificate and no other connection would: 403.
        let r = Proxy::http_client()
            .get(proxy.url("/headers"))
            .header("host", "mtls.test")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 403);
    }
}

#[tokio::test]
async fn a_bad_client_ca_fails_the_reload_and_the_last_good_configuration_serves() {
    common::init();
    let clients = Clients::new();
    let backend = Backend::start("app").await;
    let proxy = Proxy::start(&config(&clients, &backend)).await;
    let before = proxy.version().await;
    let bad = clients.trusted.dir.path().join("not-a-ca.pem");
    std::fs::write(&bad, "this is not PEM\n").unwrap();
    let text = config(&clients, &backend).replace(
        &format!("{:?}", clients.trusted.ca_file()),
        &format!("{bad:?}"),
    );
    assert_eq!(proxy.reload(&text).await, before, "the reload was refused");
    assert!(
        proxy.log().contains("holds no certificate"),
        "{}",
        proxy.log()
    );
    let alice = client(
        &proxy,
        Some(Clients::identity(&clients.trusted, "alice")),
        false,
    );
    assert_eq!(seen(&alice, &proxy, "mtls.test", "").await.unwrap().0, 200);
    let metrics = proxy.metrics().await;
    assert!(
        common::metric_value(
            &metrics,
            "rampart_tls_handshake_failures_total{reason=\"client_cert\"}"
        )
        .is_none(),
        "no client was refused yet"
    );
    let none = client(&proxy, None, false);
    assert!(seen(&none, &proxy, "mtls.test", "").await.is_err());
    common::eventually("the refused handshake counted", || async {
        let m = proxy.metrics().await;
        common::metric_value(
            &m,
            "rampart_tls_handshake_failures_total{reason=\"client_cert\"}",
        )
        .filter(|n| *n >= 1.0)
    })
    .await;
}

/// Decodes `%XX` escapes.
fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            out.push(u8::from_str_radix(&s[i + 1..i + 3], 16).unwrap());
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).unwrap()
}
