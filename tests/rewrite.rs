//! Regular-expression redirects and path rewrites per route (issue 27): decided once by
//! the policy, carried out the same by the HTTP/1 and HTTP/2 fast paths and Pingora's
//! path (each case runs through all of them).
#![allow(missing_docs, clippy::unwrap_used)]

mod common;

use std::collections::HashMap;

use common::{Backend, Proxy};

const PINGORA: &str = "http1_fast_path = false\nhttp2_fast_path = false";

fn config(backend: &std::sync::Arc<Backend>) -> String {
    format!(
        r#"[[tls]]
hosts = ["new.test", "old.test"]
source = "internal"

[[routes]]
name = "old-site"
hosts = ["old.test"]
redirect = {{ pattern = '^https?://old\.test(:[0-9]+)?/blog/(?P<post>.*)$', location = "https://new.test$1/articles/${{post}}", status = 301 }}
action = {{ forward = "app" }}

[[routes]]
name = "v1"
hosts = ["new.test"]
path_prefix = "/v1"
rewrite = {{ pattern = '^/v1/(.*)$', replacement = "/$1" }}
action = {{ forward = "app" }}

[[routes]]
name = "rest"
action = {{ forward = "app" }}

{}"#,
        common::pool_toml("app", "round_robin", &[backend], "")
    )
}

/// What the backend's `/headers` saw of `GET url` (its `:path` among them).
async fn headers_seen(client: &reqwest::Client, url: String) -> HashMap<String, String> {
    client.get(url).send().await.unwrap().json().await.unwrap()
}

/// Clients for the three transports of a proxy: HTTP/1.1 and HTTP/2 over TLS.
fn clients(proxy: &Proxy) -> Vec<(&'static str, reqwest::Client)> {
    let b = || proxy.client_builder(&["new.test", "old.test"]);
    vec![
        ("HTTP/1.1", b().http1_only().build().unwrap()),
        ("HTTP/2", b().http2_prior_knowledge().build().unwrap()),
    ]
}

#[tokio::test]
async fn a_matching_url_is_redirected_and_a_path_rewritten_on_every_transport() {
    common::init();
    let backend = Backend::start("app").await;
    for (server, name) in [("", "fast paths"), (PINGORA, "Pingora's path")] {
        let proxy = Proxy::start_with(server, &config(&backend)).await;
        let port = proxy.https.port();
        for (version, client) in clients(&proxy) {
            let what = format!("{name}, {version}");
            // The URL matches: 301 to the new site, groups filled in.
            let r = client
                .get(format!("https://old.test:{port}/blog/2026/a%20b?ref=x"))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 301, "{what}");
            assert_eq!(
                r.headers()["location"],
                // The URL's own escape goes on as it came.
                format!("https://new.test:{port}/articles/2026/a%20b?ref=x").as_str(),
                "{what}"
            );
            // It does not: on to the route's action.
            let r = client
                .get(format!("https://old.test:{port}/headers"))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200, "{what}");

            // The rewrite: /v1/headers?x=1 reaches the backend as /headers?x=1.
            let seen =
                headers_seen(&client, format!("https://new.test:{port}/v1/headers?x=1")).await;
            assert_eq!(seen[":path"], "/headers?x=1", "{what}");
            // Other routes' paths go as they came.
            let seen = headers_seen(&client, format!("https://new.test:{port}/headers?y=2")).await;
            assert_eq!(seen[":path"], "/headers?y=2", "{what}");
        }
    }
}

#[tokio::test]
async fn a_pattern_that_does_not_compile_is_refused_with_its_place_and_the_old_one_serves() {
    common::init();
    let backend = Backend::start("app").await;
    let proxy = Proxy::start(&config(&backend)).await;
    let before = proxy.version().await;
    let bad = config(&backend).replace(r"'^/v1/(.*)$'", r"'^/v1/(.*$'");
    assert_eq!(proxy.reload(&bad).await, before, "the reload was refused");
    let log = proxy.log();
    assert!(
        log.contains("routes[1].rewrite.pattern") && log.contains("is not a regular expression"),
        "{log}"
    );
    let client = &clients(&proxy)[0].1;
    let url = format!("https://new.test:{}/v1/headers", proxy.https.port());
    let seen = headers_seen(client, url).await;
    assert_eq!(seen[":path"], "/headers");
}
