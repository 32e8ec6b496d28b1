//! End-to-end routing, balancing, health and retries through a real `rampart proxy`.
#![allow(missing_docs, clippy::unwrap_used)]

mod common;

use std::collections::HashMap;
use std::sync::atomic::Ordering;

use common::{eventually, pool_toml, single_pool, Backend, Proxy};

async fn get_body(client: &reqwest::Client, url: &str) -> (u16, String) {
    let r = client.get(url).send().await.unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

#[tokio::test]
async fn routes_by_host_path_and_header_across_pools() {
    common::init();
    let (api, web, canary) = (
        Backend::start("api").await,
        Backend::start("web").await,
        Backend::start("canary").await,
    );
    let config = format!(
        r#"
[[routes]]
name = "api"
hosts = ["example.test"]
path_prefix = "/api"
action = {{ forward = "api" }}

[[routes]]
name = "canary"
hosts = ["example.test"]
path_prefix = "/api"
headers = {{ "x-canary" = "yes" }}
action = {{ forward = "canary" }}

[[routes]]
name = "web"
hosts = ["example.test", "*.example.test"]
action = {{ forward = "web" }}

[[routes]]
name = "maintenance"
hosts = ["down.test"]
action = {{ respond = {{ status = 503, body = "back soon", content_type = "text/plain" }} }}

[[routes]]
name = "moved"
hosts = ["old.test"]
action = {{ redirect = {{ location = "https://new.test", status = 301, keep_path = true }} }}

{}
{}
{}
"#,
        pool_toml("api", "round_robin", &[&api], ""),
        pool_toml("web", "round_robin", &[&web], ""),
        pool_toml("canary", "round_robin", &[&canary], "")
    );
    let proxy = Proxy::start(&config).await;
    let c = Proxy::http_client();
    let cases = [
        ("example.test", "/api/users", None, 200, "api"),
        ("example.test", "/api/users", Some("yes"), 200, "canary"),
        ("example.test", "/apiv2", None, 200, "web"),
        ("www.example.test", "/", None, 200, "web"),
        ("EXAMPLE.test.", "/", None, 200, "web"),
        ("down.test", "/", None, 503, "back soon"),
        (
            "nowhere.test",
            "/",
            None,
            404,
            "no route matches this request\nrequest id: ",
        ),
    ];
    for (host, path, canary_header, status, body) in cases {
        let mut req = c.get(proxy.url(path)).header("host", host);
        if let Some(v) = canary_header {
            req = req.header("x-canary", v);
        }
        let r = req.send().await.unwrap();
        assert_eq!(r.status().as_u16(), status, "{host}{path}");
        if status == 503 {
            assert_eq!(r.headers()["retry-after"], "1");
        }
        if status == 404 {
            // The proxy's own answer names the request id it logged.
            let id = r.headers()["x-request-id"].to_str().unwrap().to_string();
            assert_eq!(r.text().await.unwrap(), format!("{body}{id}\n"));
            continue;
        }
        assert_eq!(r.text().await.unwrap(), body, "{host}{path}");
    }
    let r = c
        .get(proxy.url("/a/b?c=d"))
        .header("host", "old.test")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 301);
    assert_eq!(r.headers()["location"], "https://new.test/a/b?c=d");
}

#[tokio::test]
async fn forwarding_headers_and_request_id_reach_the_upstream() {
    common::init();
    let b = Backend::start("b").await;
    let proxy = Proxy::start(&single_pool("round_robin", &[&b], "")).await;
    let r = Proxy::http_client()
        .get(proxy.url("/headers"))
        .header("host", "app.test")
        .header("x-forwarded-for", "6.6.6.6")
        .header("connection", "x-secret")
        .header("x-secret", "hop")
        .send()
        .await
        .unwrap();
    let id = r.headers()["x-request-id"].to_str().unwrap().to_string();
    let seen: HashMap<String, String> = r.json().await.unwrap();
    assert_eq!(
        seen["x-forwarded-for"], "127.0.0.1",
        "an untrusted client cannot spoof its address"
    );
    assert_eq!(seen["x-forwarded-proto"], "http");
    assert_eq!(seen["x-forwarded-host"], "app.test");
    assert_eq!(
        seen["forwarded"],
        "for=127.0.0.1;proto=http;host=\"app.test\""
    );
    assert_eq!(seen["x-request-id"], id);
    assert_eq!(seen["host"], "app.test");
    assert!(
        !seen.contains_key("x-secret"),
        "headers named in Connection are hop-by-hop"
    );
    let r = Proxy::http_client()
        .get(proxy.url("/headers"))
        .header("x-request-id", "client-id-1")
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["x-request-id"], "client-id-1");
}

#[tokio::test]
async fn balancing_policies_spread_load_as_configured() {
    common::init();
    let (a, b, c) = (
        Backend::start("a").await,
        Backend::start("b").await,
        Backend::start("c").await,
    );
    let weighted = format!("[pools.p]\nbalance = \"weighted\"\nendpoints = [{{ address = \"{}\", weight = 3 }}, {{ address = \"{}\", weight = 1 }}]\n", a.addr, b.addr);
    let route = "[[routes]]\nname = \"all\"\naction = { forward = \"p\" }\n";
    let proxy = Proxy::start(&format!("{route}{weighted}")).await;
    let client = Proxy::http_client();
    for _ in 0..40 {
        assert_eq!(get_body(&client, &proxy.url("/")).await.0, 200);
    }
    assert_eq!((a.hits(), b.hits()), (30, 10), "weighted 3:1");

    proxy
        .reload(&format!(
            "{route}{}",
            pool_toml("p", "round_robin", &[&a, &b, &c], "")
        ))
        .await;
    let before = [a.hits(), b.hits(), c.hits()];
    for _ in 0..30 {
        get_body(&client, &proxy.url("/")).await;
    }
    assert_eq!(
        [
            a.hits() - before[0],
            b.hits() - before[1],
            c.hits() - before[2]
        ],
        [10, 10, 10],
        "round robin"
    );

    proxy
        .reload(&format!(
            "{route}{}",
            pool_toml(
                "p",
                "consistent_hash",
                &[&a, &b, &c],
                "hash_key = \"header:x-user\""
            )
        ))
        .await;
    for user in ["alice", "bob", "carol", "dave"] {
        let first = client
            .get(proxy.url("/"))
            .header("x-user", user)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        for _ in 0..5 {
            let again = client
                .get(proxy.url("/"))
                .header("x-user", user)
                .send()
                .await
                .unwrap()
                .text()
                .await
                .unwrap();
            assert_eq!(again, first, "user {user} sticks to one endpoint");
        }
    }

    for policy in ["least_conn", "p2c_ewma"] {
        proxy
            .reload(&format!(
                "{route}{}",
                pool_toml("p", policy, &[&a, &b, &c], "")
            ))
            .await;
        let before = a.hits() + b.hits() + c.hits();
        let mut seen = std::collections::HashSet::new();
        for _ in 0..60 {
            let (status, body) = get_body(&client, &proxy.url("/")).await;
            assert_eq!(status, 200);
            seen.insert(body);
        }
        assert_eq!(a.hits() + b.hits() + c.hits() - before, 60);
        assert!(
            seen.len() >= 2,
            "{policy} uses more than one endpoint: {seen:?}"
        );
    }
}

#[tokio::test]
async fn active_health_checks_eject_and_restore_endpoints() {
    common::init();
    let (a, b) = (Backend::start("a").await, Backend::start("b").await);
    let check = "[pools.p.health_check]\ninterval = \"100ms\"\ntimeout = \"100ms\"\nhealthy_threshold = 2\nunhealthy_threshold = 2\n";
    let proxy = Proxy::start(&format!(
        "[[routes]]\nname = \"all\"\naction = {{ forward = \"p\" }}\n{}{check}",
        pool_toml("p", "round_robin", &[&a, &b], "")
    ))
    .await;
    b.health_status.store(500, Ordering::SeqCst);
    proxy.wait_actively_unhealthy("p", b.addr).await;
    assert!(proxy.metrics().await.contains(&format!(
        "rampart_endpoint_healthy{{endpoint=\"{}\",pool=\"p\"}} 0",
        b.addr
    )));
    let before = b.hits();
    let client = Proxy::http_client();
    for _ in 0..20 {
        assert_eq!(
            get_body(&client, &proxy.url("/")).await,
            (200, "a".to_string())
        );
    }
    assert_eq!(b.hits(), before, "an unhealthy endpoint gets no traffic");
    b.health_status.store(200, Ordering::SeqCst);
    eventually("b to come back", || async {
        let (_, body) = get_body(&client, &proxy.url("/")).await;
        (body == "b").then_some(())
    })
    .await;
}

#[tokio::test]
async fn passive_health_ejects_an_endpoint_that_refuses_connections() {
    common::init();
    let a = Backend::start("a").await;
    // The endpoint that dies answers one request first: an endpoint that never answered
    // is ejected for a second only (a container still starting), this one for eject_for.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dead = listener.local_addr().unwrap();
    tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (mut s, _) = listener.accept().await.unwrap();
        drop(listener);
        let mut buf = [0u8; 4096];
        let _ = s.read(&mut buf).await;
        let ok = b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\nConnection: close\r\n\r\ndead";
        let _ = s.write_all(ok).await;
    });
    let pool = format!(
        "[pools.p]\nendpoints = [{{ address = \"{}\" }}, {{ address = \"{dead}\" }}]\npassive_health = {{ consecutive_failures = 2, eject_for = \"1m\" }}\nretries = {{ attempts = 1 }}\n",
        a.addr
    );
    let proxy = Proxy::start(&format!(
        "[[routes]]\nname = \"all\"\naction = {{ forward = \"p\" }}\n{pool}"
    ))
    .await;
    let client = Proxy::http_client();
    eventually("the endpoint that dies to answer once", || async {
        let (status, body) = get_body(&client, &proxy.url("/")).await;
        assert_eq!(status, 200);
        (body == "dead").then_some(())
    })
    .await;
    for _ in 0..20 {
        assert_eq!(
            get_body(&client, &proxy.url("/")).await,
            (200, "a".to_string()),
            "connect failures are retried on the healthy endpoint"
        );
    }
    let s = proxy.status().await;
    let dead_ep = s["pools"]["p"]["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["address"] == dead.to_string())
        .unwrap()
        .clone();
    assert!(dead_ep["ejected_for_ms"].as_u64().unwrap() > 0, "{dead_ep}");
    assert_eq!(
        dead_ep["failures"], 2,
        "ejected after 2 failures, then skipped: {dead_ep}"
    );
    assert_eq!(
        proxy
            .metric(&format!(
                "rampart_endpoint_ejections_total{{endpoint=\"{dead}\",pool=\"p\"}}"
            ))
            .await,
        1.0
    );
}

#[tokio::test]
async fn retries_only_where_safe() {
    common::init();
    let (bad, good) = (Backend::start("bad").await, Backend::start("good").await);
    bad.fail_status.store(503, Ordering::SeqCst);
    let pool = format!(
        "[pools.p]\nbalance = \"round_robin\"\nendpoints = [{{ address = \"{}\" }}, {{ address = \"{}\" }}]\nretries = {{ attempts = 1, on_status = [503] }}\npassive_health = {{ consecutive_failures = 0 }}\n",
        bad.addr, good.addr
    );
    let proxy = Proxy::start(&format!(
        "[[routes]]\nname = \"all\"\naction = {{ forward = \"p\" }}\n{pool}"
    ))
    .await;
    let client = Proxy::http_client();
    for _ in 0..6 {
        assert_eq!(
            get_body(&client, &proxy.url("/")).await,
            (200, "good".to_string()),
            "GET is retried after a 503"
        );
    }
    assert_eq!(
        bad.hits(),
        3,
        "round robin sends every other first attempt to bad"
    );
    let mut statuses = Vec::new();
    for _ in 0..4 {
        let r = client
            .post(proxy.url("/"))
            .body("payload")
            .send()
            .await
            .unwrap();
        statuses.push(r.status().as_u16());
    }
    statuses.sort_unstable();
    assert_eq!(
        statuses,
        vec![200, 200, 503, 503],
        "a POST with a body is never retried"
    );
    let posts_to_bad = bad
        .methods
        .lock()
        .unwrap()
        .iter()
        .filter(|m| *m == "POST")
        .count();
    assert_eq!(posts_to_bad, 2);
    let posts_to_good = good
        .methods
        .lock()
        .unwrap()
        .iter()
        .filter(|m| *m == "POST")
        .count();
    assert_eq!(
        posts_to_good, 2,
        "no POST was replayed on the good endpoint"
    );
}

#[tokio::test]
async fn empty_pool_answers_503_with_retry_after() {
    common::init();
    let a = Backend::start("a").await;
    let check = "[pools.p.health_check]\ninterval = \"50ms\"\ntimeout = \"50ms\"\nunhealthy_threshold = 1\n";
    let proxy = Proxy::start(&format!(
        "[[routes]]\nname = \"all\"\naction = {{ forward = \"p\" }}\n{}{check}",
        pool_toml("p", "round_robin", &[&a], "")
    ))
    .await;
    a.health_status.store(503, Ordering::SeqCst);
    let client = Proxy::http_client();
    let r = eventually("the pool to empty", || async {
        let r = client.get(proxy.url("/")).send().await.unwrap();
        (r.status() == 503).then_some(r)
    })
    .await;
    assert_eq!(r.headers()["retry-after"], "1");
}

#[tokio::test]
async fn upstream_connections_are_reused() {
    common::init();
    let b = Backend::start("b").await;
    let proxy = Proxy::start(&single_pool("round_robin", &[&b], "")).await;
    let client = Proxy::http_client();
    for _ in 0..50 {
        assert_eq!(get_body(&client, &proxy.url("/")).await.0, 200);
    }
    // Pingora returns the upstream connection to its pool only after the response has been
    // written downstream, so the client's next request can occasionally race ahead of the
    // release and open a fresh connection. Without reuse this would be 50.
    let connections = b.connections.load(Ordering::SeqCst);
    assert!(
        connections <= 10,
        "50 sequential requests used {connections} upstream connections"
    );
}

/// A raw upstream that answers the first request on each connection (keep-alive) and
/// closes the connection on the second without answering: what a backend that crashed
/// or timed out an idle connection looks like to a pooled upstream connection.
async fn one_shot_upstream() -> std::net::SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let mut seen = Vec::new();
                while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
                    let Ok(n) = s.read(&mut buf).await else {
                        return;
                    };
                    if n == 0 {
                        return;
                    }
                    seen.extend_from_slice(&buf[..n]);
                }
                let _ = s
                    .write_all(
                        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: keep-alive\r\n\r\nok",
                    )
                    .await;
                // Wait for the next request, then drop the connection without answering.
                let _ = s.read(&mut buf).await;
            });
        }
    });
    addr
}

#[tokio::test]
async fn a_reused_upstream_connection_that_was_closed_is_retried() {
    common::init();
    let upstream = one_shot_upstream().await;
    let proxy = Proxy::start(&format!("[[routes]]\nname = \"all\"\naction = {{ forward = \"p\" }}\n[pools.p]\nendpoints = [{{ address = \"{upstream}\" }}]\n")).await;
    let client = Proxy::http_client();
    for i in 0..10 {
        let r = client.get(proxy.url("/")).send().await.unwrap();
        assert_eq!(r.status(), 200, "request {i}");
        assert_eq!(r.text().await.unwrap(), "ok");
    }
    assert!(!proxy.log().contains("panicked"), "{}", proxy.log());
}

#[tokio::test]
async fn allow_from_serves_only_listed_client_addresses_behind_trusted_proxies() {
    common::init();
    let b = Backend::start("b").await;
    let config = format!(
        "[forwarding]\ntrusted_proxies = [\"127.0.0.1/32\"]\n\n\
         [[routes]]\nname = \"office\"\nhosts = [\"office.test\"]\nallow_from = [\"10.0.0.0/8\", \"192.0.2.7\"]\naction = {{ forward = \"p\" }}\n\n\
         [[routes]]\nname = \"status\"\nhosts = [\"status.test\"]\nallow_from = [\"10.0.0.0/8\"]\naction = {{ respond = {{ status = 200, body = \"up\" }} }}\n\n\
         {}",
        pool_toml("p", "round_robin", &[&b], "")
    );
    let proxy = Proxy::start(&config).await;
    let client = Proxy::http_client();
    let get = |host: &'static str, xff: Option<&'static str>| {
        let mut req = client.get(proxy.url("/")).header("host", host);
        if let Some(xff) = xff {
            req = req.header("x-forwarded-for", xff);
        }
        async move {
            let r = req.send().await.unwrap();
            (r.status().as_u16(), r.text().await.unwrap())
        }
    };
    // The proxy before us (127.0.0.1, trusted) says who the client is.
    assert_eq!(
        get("office.test", Some("10.1.2.3")).await,
        (200, "b".into())
    );
    assert_eq!(
        get("office.test", Some("192.0.2.7")).await,
        (200, "b".into())
    );
    let (status, body) = get("office.test", Some("192.0.2.8")).await;
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("does not serve your address"), "{body}");
    // Without the header the client is the peer, 127.0.0.1: not in the list.
    assert_eq!(get("office.test", None).await.0, 403);
    // Routes of any action are guarded.
    assert_eq!(
        get("status.test", Some("10.9.9.9")).await,
        (200, "up".into())
    );
    assert_eq!(get("status.test", None).await.0, 403);
    assert_eq!(b.hits(), 2, "refused requests never reach the upstream");
    let status = proxy.status().await;
    assert_eq!(
        status["routes"][0]["allow_from"],
        serde_json::json!(["10.0.0.0/8", "192.0.2.7"])
    );
    let dashboard: serde_json::Value =
        reqwest::get(format!("http://{}/api/v1/dashboard", proxy.admin))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
    assert_eq!(
        dashboard["routes"][0]["rules"],
        serde_json::json!(["only from 10.0.0.0/8, 192.0.2.7"])
    );
}

/// A bcrypt hash of `password` made by `rampart hash-password` (cost 4: tests are
/// debug builds).
fn hashed(password: &str) -> String {
    use std::io::Write as _;
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_rampart"))
        .args(["hash-password", "--cost", "4"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    writeln!(child.stdin.take().unwrap(), "{password}").unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let hash = String::from_utf8(out.stdout).unwrap().trim().to_string();
    assert!(hash.starts_with("$2b$04$") && hash.len() == 60, "{hash}");
    hash
}

#[tokio::test]
async fn basic_auth_admits_only_users_with_their_password() {
    common::init();
    let b = Backend::start("b").await;
    let config = format!(
        "[[routes]]\nname = \"admin\"\nhosts = [\"admin.test\"]\n\
         basic_auth = {{ realm = \"Back office\", users = {{ alice = \"{}\" }} }}\n\
         action = {{ forward = \"p\" }}\n\n{}",
        hashed("s3cret: with colon"),
        pool_toml("p", "round_robin", &[&b], "")
    );
    let proxy = Proxy::start(&config).await;
    let client = Proxy::http_client();
    let get = |auth: Option<(&'static str, &'static str)>| {
        let mut req = client.get(proxy.url("/")).header("host", "admin.test");
        if let Some((user, password)) = auth {
            req = req.basic_auth(user, Some(password));
        }
        async move {
            let r = req.send().await.unwrap();
            let challenge = r
                .headers()
                .get("www-authenticate")
                .map(|v| v.to_str().unwrap().to_string());
            (r.status().as_u16(), challenge, r.text().await.unwrap())
        }
    };
    let (status, challenge, _) = get(None).await;
    assert_eq!(status, 401);
    assert_eq!(
        challenge.as_deref(),
        Some("Basic realm=\"Back office\", charset=\"UTF-8\"")
    );
    assert_eq!(get(Some(("alice", "wrong"))).await.0, 401);
    assert_eq!(get(Some(("mallory", "s3cret: with colon"))).await.0, 401);
    assert_eq!(b.hits(), 0, "refused requests never reach the upstream");
    // The right password, twice (the second is remembered, not checked again).
    for _ in 0..2 {
        let (status, challenge, body) = get(Some(("alice", "s3cret: with colon"))).await;
        assert_eq!((status, challenge, body.as_str()), (200, None, "b"));
    }
    assert_eq!(b.hits(), 2);
}
