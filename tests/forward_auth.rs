//! Forward authentication (issue 27): a small auth service in the test, asked by the
//! policy the same way for every transport — the HTTP/1 and HTTP/2 fast paths and
//! Pingora's path, each over HTTP/1.1 and HTTP/2.
#![allow(missing_docs, clippy::unwrap_used)]

mod common;

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use common::{Backend, Proxy};
use http_body_util::Full;
use hyper_util::rt::{TokioExecutor, TokioIo};

const PINGORA: &str = "http1_fast_path = false\nhttp2_fast_path = false";

/// The auth service: `Authorization: Bearer good` → 200 with the user (and a header
/// not to copy); `Bearer slow` → 200 after 2 s; anything else → 302 to the login page
/// with two cookies and a body. Remembers the forwarded headers of each check.
struct Auth {
    addr: SocketAddr,
    seen: Mutex<Vec<HashMap<String, String>>>,
}

impl Auth {
    async fn start() -> Arc<Auth> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let auth = Arc::new(Auth {
            addr: listener.local_addr().unwrap(),
            seen: Mutex::default(),
        });
        let weak = Arc::downgrade(&auth);
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let Some(auth) = weak.upgrade() else { return };
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| {
                        let auth = auth.clone();
                        async move { Ok::<_, Infallible>(auth.answer(req).await) }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(tcp), svc)
                        .await;
                });
            }
        });
        auth
    }

    async fn answer<B>(&self, req: hyper::Request<B>) -> hyper::Response<Full<Bytes>> {
        let headers: HashMap<String, String> = req
            .headers()
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").to_string()))
            .collect();
        self.seen.lock().unwrap().push(headers.clone());
        let builder = hyper::Response::builder();
        match headers.get("authorization").map(String::as_str) {
            Some("Bearer good") => builder
                .header("x-auth-user", "alice")
                .header("x-not-copied", "1")
                .body(Full::new(Bytes::new())),
            Some("Bearer slow") => {
                tokio::time::sleep(Duration::from_secs(2)).await;
                builder.body(Full::new(Bytes::new()))
            }
            _ => builder
                .status(302)
                .header(
                    "location",
                    format!(
                        "https://login.test/?rd={}",
                        headers.get("x-forwarded-uri").cloned().unwrap_or_default()
                    ),
                )
                .header("set-cookie", "csrf=1; Path=/")
                .header("set-cookie", "next=2; Path=/")
                .header("content-type", "text/plain")
                .body(Full::new(Bytes::from_static(b"please log in\n"))),
        }
        .unwrap()
    }

    fn last(&self) -> HashMap<String, String> {
        self.seen.lock().unwrap().last().cloned().unwrap()
    }
}

fn config(auth: &Auth, backend: &Arc<Backend>, dead: SocketAddr) -> String {
    format!(
        r#"[[tls]]
hosts = ["app.test"]
source = "internal"

[[routes]]
name = "down"
path_prefix = "/down"
forward_auth = {{ url = "http://{dead}/check" }}
action = {{ forward = "app" }}

[[routes]]
name = "app"
forward_auth = {{ url = "http://{}/check", copy_headers = ["X-Auth-User", "X-Auth-Groups"], timeout = "300ms" }}
action = {{ forward = "app" }}

{}"#,
        auth.addr,
        common::pool_toml("app", "round_robin", &[backend], "")
    )
}

fn clients(proxy: &Proxy) -> Vec<(&'static str, reqwest::Client)> {
    let b = || {
        proxy
            .client_builder(&["app.test"])
            .redirect(reqwest::redirect::Policy::none())
    };
    vec![
        ("HTTP/1.1", b().http1_only().build().unwrap()),
        ("HTTP/2", b().http2_prior_knowledge().build().unwrap()),
    ]
}

#[tokio::test]
async fn the_auth_service_decides_on_every_transport() {
    common::init();
    let auth = Auth::start().await;
    let backend = Backend::start("app").await;
    let dead = common::free_addr();
    for (server, name) in [("", "fast paths"), (PINGORA, "Pingora's path")] {
        let proxy = Proxy::start_with(server, &config(&auth, &backend, dead)).await;
        let base = format!("https://app.test:{}", proxy.https.port());
        for (version, client) in clients(&proxy) {
            let what = format!("{name}, {version}");
            // Allowed: the service's user goes upstream; the client's own identity
            // headers never do, not even one the service did not set.
            let seen: HashMap<String, String> = client
                .get(format!("{base}/headers?x=1"))
                .header("authorization", "Bearer good")
                .header("x-auth-user", "mallory")
                .header("x-auth-groups", "admin")
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            assert_eq!(
                seen.get("x-auth-user").map(String::as_str),
                Some("alice"),
                "{what}: {seen:?}"
            );
            assert!(!seen.contains_key("x-auth-groups"), "{what}: {seen:?}");
            assert!(!seen.contains_key("x-not-copied"), "{what}: {seen:?}");
            // The service was told what the request is.
            let asked = auth.last();
            assert_eq!(asked["x-forwarded-method"], "GET", "{what}");
            assert_eq!(asked["x-forwarded-uri"], "/headers?x=1", "{what}");
            assert_eq!(asked["x-forwarded-proto"], "https", "{what}");
            assert!(asked["x-forwarded-host"].starts_with("app.test"), "{what}");
            assert_eq!(asked["x-forwarded-for"], "127.0.0.1", "{what}");

            // Refused: the service's answer goes back as it came; nothing upstream.
            let hits = backend.hits();
            let r = client
                .get(format!("{base}/private"))
                .header("x-auth-user", "mallory")
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 302, "{what}");
            assert_eq!(
                r.headers()["location"],
                "https://login.test/?rd=/private",
                "{what}"
            );
            let cookies: Vec<_> = r.headers().get_all("set-cookie").iter().collect();
            assert_eq!(cookies, ["csrf=1; Path=/", "next=2; Path=/"], "{what}");
            assert!(r.headers().contains_key("x-request-id"), "{what}");
            assert_eq!(r.text().await.unwrap(), "please log in\n", "{what}");
            assert_eq!(backend.hits(), hits, "{what}: the request went upstream");

            // A service too slow or down fails closed.
            let r = client
                .get(format!("{base}/slow"))
                .header("authorization", "Bearer slow")
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 504, "{what}");
            let r = client.get(format!("{base}/down")).send().await.unwrap();
            assert_eq!(r.status(), 502, "{what}");
            assert_eq!(backend.hits(), hits, "{what}: the request went upstream");
        }
    }
}
