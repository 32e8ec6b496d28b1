//! Release controls (issue 27): sticky sessions with a cookie the proxy issues, and
//! weighted splits between pools with overrides and a sticky choice per client — each
//! through every transport: the HTTP/1 and HTTP/2 fast paths and Pingora's path, over
//! HTTP/1.1 and HTTP/2 with TLS.
#![allow(missing_docs, clippy::unwrap_used)]

mod common;

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use common::{eventually, pool_toml, Backend, Proxy};

const PINGORA: &str = "http1_fast_path = false\nhttp2_fast_path = false";
const TLS: &str = "[[tls]]\nhosts = [\"app.test\"]\nsource = \"internal\"\n\n";

fn clients(proxy: &Proxy) -> Vec<(&'static str, reqwest::Client)> {
    let b = || proxy.client_builder(&["app.test"]);
    vec![
        ("HTTP/1.1", b().http1_only().build().unwrap()),
        ("HTTP/2", b().http2_prior_knowledge().build().unwrap()),
    ]
}

/// The answer's body (the backend's name) and its `Set-Cookie` values.
async fn get(
    client: &reqwest::Client,
    url: &str,
    headers: &[(&str, &str)],
) -> (String, Vec<String>) {
    let mut req = client.get(url);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let r = req.send().await.unwrap();
    assert_eq!(r.status(), 200, "{url} {headers:?}");
    let cookies = r
        .headers()
        .get_all("set-cookie")
        .iter()
        .map(|v| v.to_str().unwrap().to_string())
        .collect();
    (r.text().await.unwrap(), cookies)
}

/// `name=value` of a `Set-Cookie`.
fn pair(set_cookie: &str) -> String {
    set_cookie.split(';').next().unwrap().to_string()
}

fn sticky_config(backends: &[&Arc<Backend>]) -> String {
    // b leaves within a second of failing; a healthy backend that a loaded machine
    // answers late once (a check timed out) must not be ejected and move its sessions.
    let check = "health_check = { interval = \"500ms\", timeout = \"500ms\", healthy_threshold = 1, unhealthy_threshold = 2 }";
    format!(
        "{TLS}{}{}",
        common::forward_all("p"),
        pool_toml(
            "p",
            "round_robin",
            backends,
            &format!("sticky = {{ ttl = \"1h\" }}\n{check}")
        )
    )
}

#[tokio::test]
async fn a_sticky_client_stays_on_its_endpoint_until_it_leaves() {
    common::init();
    for (server, name) in [("", "fast paths"), (PINGORA, "Pingora's path")] {
        for version in ["HTTP/1.1", "HTTP/2"] {
            let what = format!("{name}, {version}");
            let [a, b, c, d] = [
                Backend::start("a").await,
                Backend::start("b").await,
                Backend::start("c").await,
                Backend::start("d").await,
            ];
            let proxy = Proxy::start_with(server, &sticky_config(&[&a, &b, &c])).await;
            let client = clients(&proxy)
                .into_iter()
                .find(|(v, _)| *v == version)
                .unwrap()
                .1;
            let url = format!("https://app.test:{}/", proxy.https.port());

            // Twelve new sessions, spread by the balancer, each given its cookie.
            let mut sessions = Vec::new();
            for _ in 0..12 {
                let (backend, cookies) = get(&client, &url, &[]).await;
                assert_eq!(cookies.len(), 1, "{what}: {cookies:?}");
                let set = &cookies[0];
                assert!(set.starts_with("rp_s="), "{what}: {set}");
                assert!(
                    set.ends_with("; Path=/; Max-Age=3600; Secure; HttpOnly; SameSite=Lax"),
                    "{what}: {set}"
                );
                assert!(
                    !set.contains("127.0.0.1"),
                    "{what}: the address shows: {set}"
                );
                sessions.push((pair(set), backend));
            }
            let spread: std::collections::BTreeSet<_> =
                sessions.iter().map(|(_, b)| b.clone()).collect();
            assert_eq!(spread.len(), 3, "{what}: {sessions:?}");

            // Each stays where it is, and is not given a cookie again.
            let stays = |sessions: Vec<(String, String)>, when: &'static str| {
                let client = client.clone();
                let url = url.clone();
                let what = what.clone();
                async move {
                    for (cookie, backend) in &sessions {
                        for _ in 0..3 {
                            let (got, set) = get(&client, &url, &[("cookie", cookie)]).await;
                            assert_eq!(&got, backend, "{what} {when}: {cookie} moved");
                            assert!(set.is_empty(), "{what} {when}: {set:?}");
                        }
                    }
                }
            };
            stays(sessions.clone(), "before a new endpoint").await;

            // A new endpoint moves no session; new sessions reach it.
            proxy.reload(&sticky_config(&[&a, &b, &c, &d])).await;
            stays(sessions.clone(), "after a new endpoint").await;
            let hits = d.hits();
            for _ in 0..8 {
                get(&client, &url, &[]).await;
            }
            assert!(d.hits() > hits, "{what}: new sessions never reach d");

            // b leaves (its health check fails): its sessions move, once, and stay.
            b.health_status.store(500, Ordering::SeqCst);
            proxy.wait_actively_unhealthy("p", b.addr).await;
            let mut after = Vec::new();
            for (cookie, backend) in &sessions {
                let (got, set) = get(&client, &url, &[("cookie", cookie)]).await;
                if backend == "b" {
                    assert_ne!(got, "b", "{what}");
                    assert_eq!(set.len(), 1, "{what}: a moved session gets its new cookie");
                    after.push((pair(&set[0]), got));
                } else {
                    assert_eq!(&got, backend, "{what}: {cookie} moved with b");
                    assert!(set.is_empty(), "{what}: {set:?}");
                    after.push((cookie.clone(), got));
                }
            }
            stays(after, "after b left").await;
        }
    }
}

/// Pools v1, v2 and v3 with one backend each, named after its pool, and a pool
/// "down" whose one endpoint never answers, with `weights` in that order.
fn split_config(
    backends: &BTreeMap<&str, Arc<Backend>>,
    weights: [u32; 4],
    down: std::net::SocketAddr,
) -> String {
    let mut out = format!(
        "{TLS}[[routes]]\nname = \"app\"\n\
         split = {{ ttl = \"1d\", override_header = \"X-Canary\", override_cookie = \"canary\" }}\n\
         action = {{ forward = [{{ pool = \"v1\", weight = {} }}, {{ pool = \"v2\", weight = {} }}, {{ pool = \"v3\", weight = {} }}, {{ pool = \"down\", weight = {} }}] }}\n\n",
        weights[0], weights[1], weights[2], weights[3]
    );
    for (name, b) in backends {
        out.push_str(&pool_toml(name, "round_robin", &[b], ""));
    }
    // A pool whose one endpoint fails its health check: no endpoint to try at all.
    out.push_str(&format!(
        "[pools.down]\nendpoints = [{{ address = \"{down}\" }}]\n\
         health_check = {{ interval = \"100ms\", timeout = \"100ms\", unhealthy_threshold = 1 }}\n"
    ));
    out
}

#[tokio::test]
async fn a_split_shares_clients_by_weight_keeps_them_and_obeys_overrides() {
    common::init();
    let mut backends = BTreeMap::new();
    for name in ["v1", "v2", "v3"] {
        backends.insert(name, Backend::start(name).await);
    }
    // Nothing listens there: the "down" pool's health check fails.
    let down = common::free_addr();
    for (server, name) in [("", "fast paths"), (PINGORA, "Pingora's path")] {
        let proxy = Proxy::start_with(server, &split_config(&backends, [80, 20, 0, 0], down)).await;
        let url = format!("https://app.test:{}/", proxy.https.port());
        for (version, client) in clients(&proxy) {
            let what = format!("{name}, {version}");
            // New clients: shared 80/20, each told where it went; v3 (weight 0) never.
            let n = 600;
            let mut counts = BTreeMap::<String, u32>::new();
            for _ in 0..n {
                let (pool, cookies) = get(&client, &url, &[]).await;
                assert_eq!(cookies.len(), 1, "{what}: {cookies:?}");
                assert_eq!(pair(&cookies[0]), format!("rp_split={pool}"), "{what}");
                assert!(
                    cookies[0].ends_with("; Path=/; Max-Age=86400; Secure; HttpOnly; SameSite=Lax"),
                    "{what}: {}",
                    cookies[0]
                );
                *counts.entry(pool).or_default() += 1;
            }
            // 20% of 600 is 120, with a standard deviation of 9.8: six of them either
            // side is a false alarm once in 500 million runs.
            let v2 = counts.get("v2").copied().unwrap_or(0);
            assert!((61..=179).contains(&v2), "{what}: {counts:?}");
            assert_eq!(counts.get("v3"), None, "{what}: {counts:?}");

            // A client keeps its pool, and is not told again.
            for pool in ["v1", "v2"] {
                for _ in 0..10 {
                    let cookie = format!("rp_split={pool}");
                    let (got, set) = get(&client, &url, &[("cookie", &cookie)]).await;
                    assert_eq!(got, pool, "{what}");
                    assert!(set.is_empty(), "{what}: {set:?}");
                }
            }
            // Testers reach the dark pool by header or cookie; the choice is not kept.
            for header in [("x-canary", "v3"), ("cookie", "a=1; canary=v3")] {
                for _ in 0..5 {
                    let (got, set) = get(&client, &url, &[header]).await;
                    assert_eq!(got, "v3", "{what}: {header:?}");
                    assert!(set.is_empty(), "{what}: {set:?}");
                }
            }
            // A cookie for a pool of weight 0, or for no pool, is chosen afresh.
            for cookie in ["rp_split=v3", "rp_split=nope"] {
                let (got, set) = get(&client, &url, &[("cookie", cookie)]).await;
                assert_ne!(got, "v3", "{what}");
                assert_eq!(set.len(), 1, "{what}: {cookie}: {set:?}");
            }
        }
        // Each pool's requests are counted under its own label, failures too.
        proxy.wait_actively_unhealthy("down", down).await;
        let r = clients(&proxy)[0]
            .1
            .get(&url)
            .header("x-canary", "down")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 503, "{name}");
        let metrics = proxy.metrics().await;
        let line = "rampart_requests_total{class=\"5xx\",pool=\"down\",route=\"app\"}";
        assert!(
            common::metric_value(&metrics, line).is_some_and(|v| v > 0.0),
            "{name}: no {line} in\n{metrics}"
        );
        for pool in ["v1", "v2", "v3"] {
            let line =
                format!("rampart_requests_total{{class=\"2xx\",pool=\"{pool}\",route=\"app\"}}");
            assert!(
                common::metric_value(&metrics, &line).is_some_and(|v| v > 0.0),
                "{name}: no {line} in\n{metrics}"
            );
        }

        // A pool that cannot serve gets no new clients and keeps none while another
        // can: its share goes to the others (as a canary whose containers are not up).
        proxy
            .reload(&split_config(&backends, [50, 0, 0, 50], down))
            .await;
        proxy.wait_actively_unhealthy("down", down).await;
        let client = &clients(&proxy)[0].1;
        for _ in 0..20 {
            let (got, set) = get(client, &url, &[]).await;
            assert_eq!(got, "v1", "{name}");
            assert_eq!(set.len(), 1, "{name}: {set:?}");
        }
        let (got, set) = get(client, &url, &[("cookie", "rp_split=down")]).await;
        assert_eq!(got, "v1", "{name}");
        assert_eq!(
            set.iter().map(|s| pair(s)).collect::<Vec<_>>(),
            ["rp_split=v1"]
        );

        // The canary is rolled back: its clients move to v1, once.
        proxy
            .reload(&split_config(&backends, [100, 0, 0, 0], down))
            .await;
        let (got, set) = get(client, &url, &[("cookie", "rp_split=v2")]).await;
        assert_eq!(got, "v1", "{name}");
        assert_eq!(
            set.iter().map(|s| pair(s)).collect::<Vec<_>>(),
            ["rp_split=v1"]
        );
    }
}

#[tokio::test]
async fn a_split_is_checked_with_located_errors() {
    common::init();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("rampart.toml");
    common::write_file(
        &path,
        "[listeners]\nhttp = \"127.0.0.1:0\"\n\n[[routes]]\nname = \"app\"\n\
         split = { cookie = \"bad cookie\" }\n\
         action = { forward = [{ pool = \"v1\", weight = 0 }, { pool = \"v9\", weight = 0 }] }\n\n\
         [pools.v1]\nendpoints = [{ address = \"127.0.0.1:1\" }]\n\n\
         [pools.v2]\nsticky = { cookie = \"\" }\nendpoints = [{ address = \"127.0.0.1:1\" }]\n",
    );
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_rampart"))
        .arg("check")
        .arg(&path)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let text =
        String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout);
    for want in [
        "routes[0].action.forward[1].pool",
        "pool \"v9\" is not defined",
        "every weight is 0",
        "routes[0].split.cookie",
        "\"bad cookie\" is not a cookie name",
        "pools.v2.sticky.cookie",
    ] {
        assert!(text.contains(want), "{want:?} not in\n{text}");
    }
}

/// The status, `Retry-After` and body of `GET url`.
async fn answer(client: &reqwest::Client, url: &str) -> (u16, Option<String>, String) {
    let r = client.get(url).send().await.unwrap();
    let retry_after = r
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap().to_string());
    (r.status().as_u16(), retry_after, r.text().await.unwrap())
}

#[tokio::test]
async fn a_circuit_breaker_refuses_over_max_in_flight_and_while_its_pool_fails() {
    common::init();
    for (server, name) in [("", "fast paths"), (PINGORA, "Pingora's path")] {
        for version in ["HTTP/1.1", "HTTP/2"] {
            let what = format!("{name}, {version}");
            let backend = Backend::start("a").await;
            let config = format!(
                "{TLS}{}{}",
                common::forward_all("p"),
                pool_toml(
                    "p",
                    "round_robin",
                    &[&backend],
                    "circuit_breaker = { max_in_flight = 2, error_ratio = 0.5, min_requests = 4, open_for = \"4s\" }\n\
                     passive_health = { consecutive_failures = 0 }"
                )
            );
            let proxy = Proxy::start_with(server, &config).await;
            let client = clients(&proxy)
                .into_iter()
                .find(|(v, _)| *v == version)
                .unwrap()
                .1;
            let base = format!("https://app.test:{}", proxy.https.port());

            // Two slow requests fill the pool; the third is refused at once.
            let slow: Vec<_> = (0..2)
                .map(|_| {
                    let (client, url) = (client.clone(), format!("{base}/held"));
                    tokio::spawn(async move { answer(&client, &url).await.0 })
                })
                .collect();
            eventually("two requests in flight to the pool", || async {
                let m = proxy.metrics().await;
                (common::metric_value(&m, "rampart_pool_requests_in_flight{pool=\"p\"}")
                    == Some(2.0))
                .then_some(())
            })
            .await;
            let hits = backend.hits();
            let (status, retry_after, body) = answer(&client, &format!("{base}/")).await;
            assert_eq!(status, 503, "{what}: {body}");
            assert_eq!(retry_after.as_deref(), Some("1"), "{what}");
            assert!(body.contains("overloaded"), "{what}: {body}");
            assert_eq!(
                backend.hits(),
                hits,
                "{what}: the refused request went upstream"
            );
            backend.release();
            for s in slow {
                assert_eq!(s.await.unwrap(), 200, "{what}");
            }
            assert_eq!(answer(&client, &format!("{base}/")).await.0, 200, "{what}");

            // With the three good attempts above, three failed ones make half of six
            // (>= 0.5, >= min_requests) and open it: requests are answered 503
            // without reaching the pool.
            for _ in 0..3 {
                assert_eq!(answer(&client, &format!("{base}/status/502")).await.0, 502);
            }
            let hits = backend.hits();
            let (status, retry_after, _) = answer(&client, &format!("{base}/")).await;
            assert_eq!(status, 503, "{what}");
            // The seconds left of open_for, rounded up.
            let left: u64 = retry_after.as_deref().unwrap().parse().unwrap();
            assert!((1..=4).contains(&left), "{what}: Retry-After {left}");
            assert_eq!(
                backend.hits(),
                hits,
                "{what}: an open breaker let a request through"
            );
            let m = proxy.metrics().await;
            assert_eq!(
                common::metric_value(&m, "rampart_circuit_breaker_open{pool=\"p\"}"),
                Some(1.0),
                "{what}"
            );
            // After open_for, a trial request goes through and closes it.
            eventually("the breaker to close after a good trial", || async {
                (answer(&client, &format!("{base}/")).await.0 == 200).then_some(())
            })
            .await;
            for _ in 0..5 {
                assert_eq!(answer(&client, &format!("{base}/")).await.0, 200, "{what}");
            }
            let m = proxy.metrics().await;
            for reason in ["max_in_flight", "circuit_open"] {
                let line = format!("rampart_pool_refused_total{{pool=\"p\",reason=\"{reason}\"}}");
                assert!(
                    common::metric_value(&m, &line).is_some_and(|v| v >= 1.0),
                    "{what}: {line}"
                );
            }
        }
    }
}

#[tokio::test]
async fn a_spent_retry_budget_stops_retries() {
    common::init();
    for (server, name) in [("", "fast paths"), (PINGORA, "Pingora's path")] {
        let (bad, good) = (Backend::start("bad").await, Backend::start("good").await);
        bad.fail_status.store(503, Ordering::SeqCst);
        let config = |budget: &str| {
            format!(
                "{TLS}{}{}",
                common::forward_all("p"),
                pool_toml(
                    "p",
                    "round_robin",
                    &[&bad, &good],
                    &format!("retries = {{ attempts = 1{budget} }}\npassive_health = {{ consecutive_failures = 0 }}")
                )
            )
        };
        // The default budget (20%, at least 3 at once): a 503 is retried on the other.
        let proxy = Proxy::start_with(server, &config("")).await;
        let client = &clients(&proxy)[0].1;
        let url = format!("https://app.test:{}/", proxy.https.port());
        for _ in 0..6 {
            assert_eq!(get(client, &url, &[]).await.0, "good", "{name}");
        }
        // No budget: the 503 goes back to the client, and the refusal is counted.
        proxy
            .reload(&config(", budget_percent = 0, min_retries = 0"))
            .await;
        let mut codes = Vec::new();
        for _ in 0..6 {
            codes.push(answer(client, &url).await.0);
        }
        assert!(codes.contains(&503), "{name}: {codes:?}");
        let m = proxy.metrics().await;
        assert!(
            common::metric_value(&m, "rampart_retry_budget_exhausted_total{pool=\"p\"}")
                .is_some_and(|v| v >= 1.0),
            "{name}"
        );
    }
}

/// What the shadow got: target, headers, body.
type Seen = (String, BTreeMap<String, String>, Vec<u8>);

/// A shadow upstream: remembers the headers and targets of what it gets; while
/// `hang` is set it never answers (a stuck shadow).
struct Shadow {
    addr: std::net::SocketAddr,
    seen: std::sync::Mutex<Vec<Seen>>,
    hang: std::sync::atomic::AtomicBool,
    open: std::sync::atomic::AtomicUsize,
}

impl Shadow {
    async fn start() -> Arc<Shadow> {
        use hyper_util::rt::{TokioExecutor, TokioIo};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let shadow = Arc::new(Shadow {
            addr: listener.local_addr().unwrap(),
            seen: std::sync::Mutex::default(),
            hang: std::sync::atomic::AtomicBool::new(false),
            open: std::sync::atomic::AtomicUsize::new(0),
        });
        let weak = Arc::downgrade(&shadow);
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let Some(s) = weak.upgrade() else { return };
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(
                        move |req: hyper::Request<hyper::body::Incoming>| {
                            let s = s.clone();
                            async move {
                                let headers = req
                                    .headers()
                                    .iter()
                                    .map(|(k, v)| {
                                        (k.to_string(), v.to_str().unwrap_or("").to_string())
                                    })
                                    .collect();
                                let target = req.uri().to_string();
                                let hang = s.hang.load(Ordering::SeqCst);
                                let body = if hang {
                                    Vec::new()
                                } else {
                                    use http_body_util::BodyExt as _;
                                    let b = req.into_body().collect().await;
                                    b.map(|b| b.to_bytes().to_vec()).unwrap_or_default()
                                };
                                s.seen.lock().unwrap().push((target, headers, body));
                                if hang {
                                    s.open.fetch_add(1, Ordering::SeqCst);
                                    std::future::pending::<()>().await;
                                }
                                Ok::<_, std::convert::Infallible>(hyper::Response::new(
                                    http_body_util::Full::new(bytes::Bytes::from_static(b"shadow")),
                                ))
                            }
                        },
                    );
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(tcp), svc)
                        .await;
                });
            }
        });
        shadow
    }

    fn count(&self) -> usize {
        self.seen.lock().unwrap().len()
    }
}

/// `rampart_mirrored_requests_total` of route `app` for `outcome` in `metrics`.
fn mirrored(metrics: &str, outcome: &str) -> Option<f64> {
    let line = format!("rampart_mirrored_requests_total{{outcome=\"{outcome}\",route=\"app\"}}");
    common::metric_value(metrics, &line)
}

fn mirror_config(app: &Arc<Backend>, shadow: std::net::SocketAddr, mirror: &str) -> String {
    format!(
        "{TLS}[[routes]]\nname = \"app\"\nmirror = {{ pool = \"shadow\", {mirror} }}\n\
         request_headers = {{ set = {{ \"X-Env\" = \"prod\" }}, remove = [\"X-Debug\", \"X-Forwarded-Host\"] }}\naction = {{ forward = \"app\" }}\n\n{}\
         [pools.shadow]\nendpoints = [{{ address = \"{shadow}\" }}]\npassive_health = {{ consecutive_failures = 0 }}\n",
        pool_toml("app", "round_robin", &[app], "")
    )
}

#[tokio::test]
async fn a_mirror_copies_requests_and_never_holds_them_up() {
    common::init();
    for (server, name) in [("", "fast paths"), (PINGORA, "Pingora's path")] {
        let app = Backend::start("app").await;
        let shadow = Shadow::start().await;
        let proxy = Proxy::start_with(
            server,
            &mirror_config(&app, shadow.addr, "percent = 100, max_body = \"1KiB\""),
        )
        .await;
        let base = format!("https://app.test:{}", proxy.https.port());
        for (version, client) in clients(&proxy) {
            let what = format!("{name}, {version}");
            // Every request is copied, marked, with the forwarding headers.
            let before = shadow.count();
            let (body, _) = get(
                &client,
                &format!("{base}/orders?id=7"),
                &[("x-user", "alice"), ("x-debug", "1"), ("x-env", "dev")],
            )
            .await;
            assert_eq!(body, "app", "{what}");
            eventually("the copy to reach the shadow", || async {
                (shadow.count() > before).then_some(())
            })
            .await;
            let (target, headers, _) = shadow.seen.lock().unwrap().last().cloned().unwrap();
            assert_eq!(target, "/orders?id=7", "{what}");
            assert_eq!(headers["x-rampart-mirror"], "1", "{what}");
            assert_eq!(headers["x-user"], "alice", "{what}");
            // The route's request_headers edits, as the primary request gets them.
            assert_eq!(headers["x-env"], "prod", "{what}: {headers:?}");
            for gone in ["x-debug", "x-forwarded-host"] {
                assert!(!headers.contains_key(gone), "{what}: {gone} in {headers:?}");
            }
            assert!(
                headers["host"].starts_with("app.test"),
                "{what}: {headers:?}"
            );
            assert_eq!(headers["x-forwarded-for"], "127.0.0.1", "{what}");
            assert!(headers.contains_key("x-request-id"), "{what}");
            // A request with a body is copied with it once the body has been read.
            let before = shadow.count();
            let r = client
                .post(format!("{base}/upload"))
                .body("data")
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200, "{what}");
            eventually(&format!("{what}: the copy with its body"), || async {
                (shadow.count() > before).then_some(())
            })
            .await;
            let (target, headers, body) = shadow.seen.lock().unwrap().last().cloned().unwrap();
            assert_eq!(
                (target.as_str(), body.as_slice()),
                ("/upload", &b"data"[..]),
                "{what}"
            );
            assert_eq!(headers["x-rampart-mirror"], "1", "{what}");
            // A chunked body (HTTP/1.1, plain) is copied whole, framed by the copy's
            // own length.
            if version == "HTTP/1.1" {
                use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
                let before = shadow.count();
                let mut tcp = tokio::net::TcpStream::connect(proxy.http).await.unwrap();
                tcp.write_all(
                    b"POST /chunked HTTP/1.1\r\nHost: app.test\r\nTransfer-Encoding: chunked\r\n\r\n\
                      8\r\nchunked \r\n4\r\ndata\r\n0\r\n\r\n",
                )
                .await
                .unwrap();
                let mut head = [0u8; 12];
                tcp.read_exact(&mut head).await.unwrap();
                assert_eq!(&head, b"HTTP/1.1 200", "{what}");
                eventually(&format!("{what}: the copy of a chunked body"), || async {
                    (shadow.count() > before).then_some(())
                })
                .await;
                let (target, headers, body) = shadow.seen.lock().unwrap().last().cloned().unwrap();
                assert_eq!(
                    (target.as_str(), body.as_slice()),
                    ("/chunked", &b"chunked data"[..]),
                    "{what}: {headers:?}"
                );
            }
            // One over max_body is not copied (counted), and still served in full.
            let before = shadow.count();
            let big = vec![b'b'; 2048];
            let r = client
                .post(format!("{base}/upload"))
                .body(big)
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200, "{what}");
            eventually("the long body to be counted", || async {
                mirrored(&proxy.metrics().await, "too_large")
            })
            .await;
            assert_eq!(
                shadow.count(),
                before,
                "{what}: a body over max_body was copied"
            );
        }

        // A shadow that never answers: every request is still served, the copies in
        // flight stay within max_in_flight, and the rest are skipped.
        proxy
            .reload(&mirror_config(
                &app,
                shadow.addr,
                "percent = 100, max_in_flight = 4, timeout = \"30s\"",
            ))
            .await;
        shadow.hang.store(true, Ordering::SeqCst);
        let client = &clients(&proxy)[1].1;
        for _ in 0..200 {
            assert_eq!(
                get(client, &format!("{base}/"), &[]).await.0,
                "app",
                "{name}"
            );
        }
        eventually("four copies to hang at the shadow", || async {
            (shadow.open.load(Ordering::SeqCst) >= 4).then_some(())
        })
        .await;
        let busy = mirrored(&proxy.metrics().await, "busy");
        assert!(busy.is_some_and(|v| v >= 190.0), "{name}: busy {busy:?}");
        assert_eq!(
            shadow.open.load(Ordering::SeqCst),
            4,
            "{name}: more copies than max_in_flight"
        );
        shadow.hang.store(false, Ordering::SeqCst);

        // A shadow that is down changes nothing for the client.
        drop(shadow);
        let dead = common::free_addr();
        // (The shadow's passive health as by default: five failures eject it.)
        let config = mirror_config(&app, dead, "percent = 50")
            .replace("passive_health = { consecutive_failures = 0 }\n", "");
        proxy.reload(&config).await;
        for _ in 0..100 {
            assert_eq!(
                get(client, &format!("{base}/"), &[]).await.0,
                "app",
                "{name}"
            );
        }
        // The copies that found nobody are counted as failed.
        eventually("failed copies to be counted", || async {
            mirrored(&proxy.metrics().await, "failed").filter(|v| *v > 0.0)
        })
        .await;
        // Then the dead shadow is ejected (five failures), and copies skip it without a
        // connection attempt: a dead shadow costs nothing per request.
        let count = |m: &str, outcome: &str| mirrored(m, outcome).unwrap_or(0.0);
        eventually("copies to skip the ejected shadow", || async {
            get(client, &format!("{base}/"), &[]).await;
            (count(&proxy.metrics().await, "no_endpoint") > 0.0).then_some(())
        })
        .await;
        let m = proxy.metrics().await;
        let (skipped, failed) = (count(&m, "no_endpoint"), count(&m, "failed"));
        for _ in 0..50 {
            get(client, &format!("{base}/"), &[]).await;
        }
        let m = proxy.metrics().await;
        // Half of 50 sampled (sd 3.5): at least 10 skipped; at most the few copies
        // already started when the ejection came may still fail.
        assert!(count(&m, "no_endpoint") - skipped >= 10.0, "{name}");
        assert!(
            count(&m, "failed") - failed <= 5.0,
            "{name}: copies kept trying a dead shadow"
        );
    }
}
