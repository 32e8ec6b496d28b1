//! The proxy's own error answers in the form the client's `Accept` asks for — plain
//! text, an HTML page, an RFC 9457 problem document — each naming the request id of
//! the response, through every transport: HTTP/1.1 on the fast path and on Pingora's,
//! HTTP/2 over TLS on both, and plain HTTP.
#![allow(missing_docs, clippy::unwrap_used)]

mod common;

use common::Proxy;
use serde_json::Value;

const BROWSER: &str = "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8";

/// Routes: `/dead` forwards to a pool whose one endpoint refuses connections (502, or
/// 503 once it is ejected), `/private` admits nobody on loopback (403), the rest 404.
fn config(dead: std::net::SocketAddr) -> String {
    format!(
        "[[tls]]\nhosts = [\"a.test\"]\nsource = \"internal\"\n\n\
         [[routes]]\nname = \"dead\"\npath_prefix = \"/dead\"\naction = {{ forward = \"dead\" }}\n\n\
         [[routes]]\nname = \"private\"\npath_prefix = \"/private\"\nallow_from = [\"192.0.2.1\"]\naction = {{ forward = \"dead\" }}\n\n\
         [pools.dead]\nendpoints = [{{ address = \"{dead}\" }}]\nretries = {{ attempts = 0 }}\n"
    )
}

/// An address nothing listens on (bound, then closed).
fn closed_port() -> std::net::SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

/// Checks one answer: its status is in `statuses`, its form is the one `accept` asks
/// for, and its body names the response's request id.
async fn check(r: reqwest::Response, accept: Option<&str>, statuses: &[u16], what: &str) {
    let status = r.status().as_u16();
    assert!(statuses.contains(&status), "{what}: status {status}");
    let id = r.headers()["x-request-id"].to_str().unwrap().to_string();
    let content_type = r.headers()["content-type"].to_str().unwrap().to_string();
    let length: usize = r.headers()["content-length"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    let body = r.text().await.unwrap();
    assert_eq!(body.len(), length, "{what}: content-length");
    match accept {
        None | Some("*/*") => {
            assert_eq!(content_type, "text/plain; charset=utf-8", "{what}");
            assert!(
                body.ends_with(&format!("\nrequest id: {id}\n")),
                "{what}: {body:?}"
            );
        }
        Some(BROWSER) => {
            assert_eq!(content_type, "text/html; charset=utf-8", "{what}");
            assert!(body.starts_with("<!DOCTYPE html>"), "{what}: {body}");
            assert!(body.contains(&format!("<h1>{status} ")), "{what}: {body}");
            assert!(
                body.contains(&format!("<code>{id}</code>")),
                "{what}: {body}"
            );
        }
        Some(_) => {
            assert_eq!(content_type, "application/problem+json", "{what}");
            let doc: Value = serde_json::from_str(&body).unwrap();
            assert_eq!(doc["status"], status, "{what}: {doc}");
            assert_eq!(doc["request_id"], id.as_str(), "{what}: {doc}");
            assert!(doc["title"].as_str().is_some_and(|t| !t.is_empty()));
            assert!(doc["detail"].as_str().is_some_and(|t| !t.is_empty()));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_come_as_text_html_or_problem_json_with_the_request_id_on_every_transport() {
    common::init();
    let dead = closed_port();
    let accepts = [None, Some("*/*"), Some(BROWSER), Some("application/json")];
    let cases: [(&str, &[u16]); 3] = [
        ("/nowhere", &[404]),
        ("/private/x", &[403]),
        ("/dead/x", &[502, 503]),
    ];
    for server in ["", "http1_fast_path = false\nhttp2_fast_path = false"] {
        let proxy = Proxy::start_with(server, &config(dead)).await;
        let path_name = if server.is_empty() {
            "fast paths"
        } else {
            "Pingora's path"
        };
        let h2 = proxy
            .client_builder(&["a.test"])
            .http2_prior_knowledge()
            .build()
            .unwrap();
        let h1 = proxy
            .client_builder(&["a.test"])
            .http1_only()
            .build()
            .unwrap();
        let plain = Proxy::http_client();
        let https = format!("https://a.test:{}", proxy.https.port());
        for (path, statuses) in cases {
            for accept in accepts {
                for (transport, client, url) in [
                    ("h2", &h2, format!("{https}{path}")),
                    ("h1 over TLS", &h1, format!("{https}{path}")),
                    ("plain h1", &plain, proxy.url(path)),
                ] {
                    let mut req = client.get(&url);
                    if transport == "plain h1" {
                        req = req.header("host", "a.test");
                    }
                    if let Some(a) = accept {
                        req = req.header("accept", a);
                    }
                    let r = req.send().await.unwrap();
                    if transport == "h2" {
                        assert_eq!(r.version(), reqwest::Version::HTTP_2);
                    }
                    let what = format!("{path_name}, {transport}, GET {path}, Accept {accept:?}");
                    check(r, accept, statuses, &what).await;
                }
            }
        }
        // Which path served the answers: the fast paths count what they serve.
        let fast = proxy.metric("rampart_http1_fast_path_requests_total").await
            + proxy.metric("rampart_http2_fast_path_requests_total").await;
        let total = (cases.len() * accepts.len() * 3) as f64;
        if server.is_empty() {
            assert_eq!(fast, total, "every answer from the fast paths");
        } else {
            assert_eq!(fast, 0.0, "every answer from Pingora's path");
        }
    }
}

/// Global pages for HTML and JSON; the `app` route adds its own plain-text page from a
/// file and replaces its upstream's 502 and 503.
fn pages_config(dir: &std::path::Path, backend: std::net::SocketAddr, text_page: &str) -> String {
    format!(
        "[[tls]]\nhosts = [\"a.test\"]\nsource = \"internal\"\n\n\
         [error_pages]\n\
         html = {{ inline = \"<html><h1>Oops {{status}}</h1><p>{{title}}: {{detail}}</p><p>id {{request_id}}</p></html>\" }}\n\
         json = {{ inline = '{{\"oops\": {{status}}, \"id\": \"{{request_id}}\", \"detail\": \"{{detail}}\"}}' }}\n\n\
         [[routes]]\nname = \"app\"\npath_prefix = \"/status\"\n\
         error_pages = {{ text = {{ file = \"{}\" }}, intercept = [502, 503] }}\n\
         action = {{ forward = \"app\" }}\n\n\
         [pools.app]\nendpoints = [{{ address = \"{backend}\" }}]\nretries = {{ attempts = 0 }}\n\
         passive_health = {{ consecutive_failures = 0 }}\n\n\
         [[routes]]\nname = \"dead\"\npath_prefix = \"/dead\"\naction = {{ forward = \"dead\" }}\n\n\
         [pools.dead]\nendpoints = [{{ address = \"{}\" }}]\nretries = {{ attempts = 0 }}\n\
         error_pages = {{ text = {{ inline = \"pool page {{status}}\\n\" }} }}\n",
        dir.join(text_page).display(),
        closed_port()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operators_pages_replace_the_proxys_own_and_intercept_upstream_errors() {
    common::init();
    let dir = tempfile::tempdir().unwrap();
    common::write_file(
        &dir.path().join("text.txt"),
        "sorry {status} ({request_id})\n",
    );
    let backend = common::Backend::start("app").await;
    for server in ["", "http1_fast_path = false\nhttp2_fast_path = false"] {
        let proxy =
            Proxy::start_with(server, &pages_config(dir.path(), backend.addr, "text.txt")).await;
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
        ];
        for (transport, client, base) in &clients {
            let what = |s: &str| format!("{server:?}, {transport}: {s}");
            let get = |path: &str, accept: Option<&'static str>| {
                let mut req = client.get(format!("{base}{path}"));
                if let Some(a) = accept {
                    req = req.header("accept", a);
                }
                async move {
                    let r = req.send().await.unwrap();
                    let status = r.status().as_u16();
                    let id = r.headers()["x-request-id"].to_str().unwrap().to_string();
                    let ct = r
                        .headers()
                        .get("content-type")
                        .map(|v| v.to_str().unwrap().to_string())
                        .unwrap_or_default();
                    (status, id, ct, r.text().await.unwrap())
                }
            };
            // No route: the global pages, per Accept; no text page → the built-in one.
            let (status, id, ct, body) = get("/nowhere", Some(BROWSER)).await;
            assert_eq!(
                (status, ct.as_str()),
                (404, "text/html; charset=utf-8"),
                "{}",
                what("404 html")
            );
            assert_eq!(
                body,
                format!("<html><h1>Oops 404</h1><p>Not Found: no route matches this request</p><p>id {id}</p></html>"),
                "{}",
                what("404 html")
            );
            let (status, id, ct, body) = get("/nowhere", Some("application/json")).await;
            assert_eq!((status, ct.as_str()), (404, "application/problem+json"));
            let doc: Value = serde_json::from_str(&body).unwrap();
            assert_eq!(
                (doc["oops"].as_u64(), doc["id"].as_str()),
                (Some(404), Some(id.as_str())),
                "{}",
                what("404 json")
            );
            let (_, id, _, body) = get("/nowhere", None).await;
            assert!(
                body.ends_with(&format!("request id: {id}\n")),
                "{}",
                what(&body)
            );
            // A route without pages of its own: its pool's (text), else the global
            // ones (HTML).
            let (status, _, _, body) = get("/dead/x", None).await;
            assert_eq!(
                body,
                format!("pool page {status}\n"),
                "{}",
                what("pool page")
            );
            let (status, _, _, body) = get("/dead/x", Some(BROWSER)).await;
            assert!(
                body.starts_with(&format!("<html><h1>Oops {status}</h1>")),
                "{}",
                what(&body)
            );

            // The upstream's 503 is replaced, status kept; the route's text page from
            // its file, the global HTML page.
            let (status, id, ct, body) = get("/status/503", None).await;
            assert_eq!(
                (status, ct.as_str()),
                (503, "text/plain; charset=utf-8"),
                "{}",
                what("503 text")
            );
            assert_eq!(body, format!("sorry 503 ({id})\n"), "{}", what("503 text"));
            let (status, _, _, body) = get("/status/502", Some(BROWSER)).await;
            assert_eq!(status, 502);
            assert!(
                body.starts_with("<html><h1>Oops 502</h1><p>Bad Gateway: "),
                "{}",
                what(&body)
            );
            assert!(
                !body.contains("app"),
                "{}: the upstream's body leaked: {body}",
                what("502")
            );
            // Statuses not listed pass as the upstream wrote them, on the same
            // connection.
            let (status, _, _, body) = get("/status/500", None).await;
            assert_eq!((status, body.as_str()), (500, "app"), "{}", what("500"));
            let (status, _, _, body) = get("/status/503", None).await;
            assert_eq!(status, 503);
            assert!(body.starts_with("sorry 503"), "{}", what(&body));
        }
        // A page that cannot be read fails the reload; the last good pages stay.
        let failures = proxy.metric("rampart_config_reload_failures_total").await;
        proxy
            .reload(&pages_config(dir.path(), backend.addr, "missing.txt"))
            .await;
        assert_eq!(
            proxy.metric("rampart_config_reload_failures_total").await,
            failures + 1.0
        );
        let client = &clients[1].1;
        let r = client
            .get(format!("{https}/status/503"))
            .send()
            .await
            .unwrap();
        assert!(r.text().await.unwrap().starts_with("sorry 503"));
        let status = proxy.status().await.to_string();
        assert!(
            status.contains("missing.txt"),
            "the reason is not in /status: {status}"
        );
    }
}
