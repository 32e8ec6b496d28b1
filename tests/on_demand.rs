//! On-demand TLS against real components: pebble as the CA, a real `rampart
//! controller` with two fleet proxies (and `rampart up`, where the proxy asks the
//! controller in its own process), and an `ask` endpoint played by the test that
//! approves some names and counts every call.
#![allow(missing_docs, clippy::unwrap_used)]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::pebble::{Killed, Options, Pebble};
use common::{eventually, free_addr, Proxy};
use http_body_util::Full;
use hyper_util::rt::{TokioExecutor, TokioIo};

/// The application's ask endpoint: 200 for the names in `approve`, 403 for others;
/// every call is counted by name.
struct Ask {
    addr: SocketAddr,
    approve: Mutex<BTreeSet<String>>,
    calls: Mutex<BTreeMap<String, usize>>,
}

impl Ask {
    async fn start(approve: &[&str]) -> Arc<Ask> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let ask = Arc::new(Ask {
            addr: listener.local_addr().unwrap(),
            approve: Mutex::new(approve.iter().map(ToString::to_string).collect()),
            calls: Mutex::default(),
        });
        let weak = Arc::downgrade(&ask);
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let Some(ask) = weak.upgrade() else { return };
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| {
                        let ask = ask.clone();
                        async move { Ok::<_, Infallible>(ask.answer(&req)) }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(tcp), svc)
                        .await;
                });
            }
        });
        ask
    }

    fn answer<B>(&self, req: &hyper::Request<B>) -> hyper::Response<Full<Bytes>> {
        let domain = req
            .uri()
            .query()
            .unwrap_or("")
            .split('&')
            .find_map(|kv| kv.strip_prefix("domain="))
            .unwrap_or("")
            .to_string();
        *self
            .calls
            .lock()
            .unwrap()
            .entry(domain.clone())
            .or_default() += 1;
        let status = if self.approve.lock().unwrap().contains(&domain) {
            200
        } else {
            403
        };
        hyper::Response::builder()
            .status(status)
            .body(Full::new(Bytes::new()))
            .unwrap()
    }

    fn calls(&self, name: &str) -> usize {
        self.calls.lock().unwrap().get(name).copied().unwrap_or(0)
    }

    fn total_calls(&self) -> usize {
        self.calls.lock().unwrap().values().sum()
    }
}

/// A handshake with `name` as SNI at `https`, trusting `root` (pebble's): the
/// response body of `GET /`, or `None` when the handshake or request failed.
async fn get_trusting(
    root: &reqwest::Certificate,
    name: &str,
    https: SocketAddr,
) -> Option<String> {
    let client = reqwest::Client::builder()
        .tls_certs_only([root.clone()])
        .resolve(name, https)
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap();
    let r = client
        .get(format!("https://{name}:{}/", https.port()))
        .send()
        .await
        .ok()?;
    r.text().await.ok()
}

/// Whether a handshake with `name` as SNI at `https` completes, whatever the
/// certificate (the client does not verify it).
async fn handshake(name: &str, https: SocketAddr) -> bool {
    let client = reqwest::Client::builder()
        .tls_danger_accept_invalid_certs(true)
        .resolve(name, https)
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap();
    client
        .get(format!("https://{name}:{}/", https.port()))
        .send()
        .await
        .is_ok()
}

async fn metrics(admin: SocketAddr) -> String {
    reqwest::get(format!("http://{admin}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

fn orders(m: &str) -> u64 {
    common::metric_value(m, "rampart_acme_orders_total{result=\"ok\"}").unwrap_or(0.0) as u64
}

fn on_demand_section(ask: &Ask, pebble: &Pebble, extra: &str) -> String {
    format!(
        r#"[tls_on_demand]
ask = "http://{}/tls-ask"
allow = ["*.customer.test"]
{extra}
acme = {{ email = "ops@rampart.test", directory = "{}", directory_ca = {:?} }}
"#,
        ask.addr, pebble.directory, pebble.api_ca
    )
}

fn start_controller(config: &Path, log: &Path) -> Killed {
    Killed(
        Command::new(env!("CARGO_BIN_EXE_rampart"))
            .args(["controller", "--config"])
            .arg(config)
            .stderr(std::fs::File::create(log).unwrap())
            .spawn()
            .unwrap(),
    )
}

fn logs(dir: &Path) -> String {
    std::fs::read_dir(dir)
        .unwrap()
        .filter_map(Result::ok)
        .filter(|e| e.path().extension().is_some_and(|x| x == "log"))
        .map(|e| {
            format!(
                "--- {}\n{}",
                e.path().display(),
                std::fs::read_to_string(e.path()).unwrap_or_default()
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_the_application_approves_are_ordered_once_for_the_fleet_and_others_cost_bounded_asks(
) {
    common::init();
    let dir = tempfile::tempdir().unwrap();
    let proxy_http = free_addr();
    let pebble = Pebble::start(dir.path(), proxy_http.port()).await;
    let ask = Ask::start(&["shop.customer.test", "second.customer.test"]).await;
    let (admin, fleet) = (free_addr(), free_addr());
    let config = dir.path().join("controller.toml");
    std::fs::write(
        &config,
        format!(
            r#"[server]
data_dir = {:?}

[controller]
listen = "{fleet}"
admin = "{admin}"
watch_timeout = "2s"

{}
[[routes]]
name = "app"
action = {{ respond = {{ body = "hello on demand" }} }}
"#,
            dir.path().join("data"),
            on_demand_section(
                &ask,
                &pebble,
                "asks_per_second = 5\nmax_total = 1\nhold = \"30s\""
            )
        ),
    )
    .unwrap();
    let _controller = start_controller(&config, &dir.path().join("controller.log"));
    common::wait_controller(admin).await;
    let url = format!("https://{fleet}");
    let http = proxy_http.to_string();
    let a =
        Proxy::start_fleet_with(&url, Some(&common::join_token(&config)), &["--http", &http]).await;
    let b = Proxy::start_fleet_with(&url, Some(&common::join_token(&config)), &[]).await;
    eventually("both proxies on the first snapshot", || async {
        let ready = |m: &str| common::metric_value(m, "rampart_config_version").unwrap_or(0.0);
        (ready(&metrics(a.admin).await) > 0.0 && ready(&metrics(b.admin).await) > 0.0).then_some(())
    })
    .await;

    // A name the application denies: asked once, however often it comes, never ordered.
    for _ in 0..3 {
        assert!(!handshake("evil.customer.test", a.https).await);
        assert!(!handshake("evil.customer.test", b.https).await);
    }
    assert_eq!(ask.calls("evil.customer.test"), 1);
    // A name outside tls_on_demand.allow: never asked about.
    assert!(!handshake("shop.elsewhere.test", a.https).await);
    assert_eq!(ask.calls("shop.elsewhere.test"), 0);

    // A scanner sending 1,000 random names: the asks stay within the budget (5 a
    // second, a burst of 5), and nothing is ordered.
    let before = ask.total_calls();
    let started = Instant::now();
    let mut flood = tokio::task::JoinSet::new();
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    for _ in 0..50 {
        let next = next.clone();
        let https = a.https;
        flood.spawn(async move {
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                if i >= 1000 {
                    return;
                }
                let name = format!("scan-{i}.customer.test");
                assert!(!handshake(&name, https).await, "{name} was served");
            }
        });
    }
    while let Some(r) = flood.join_next().await {
        r.unwrap();
    }
    let elapsed = started.elapsed().as_secs_f64();
    let asked = ask.total_calls() - before;
    let budget = 5 + (5.0 * elapsed).ceil() as usize;
    eprintln!("1,000 random names in {elapsed:.1}s: {asked} asks (budget {budget})");
    assert!(asked <= budget, "{asked} asks in {elapsed:.1}s");
    let m = metrics(admin).await;
    assert_eq!(orders(&m), 0, "{m}");
    assert!(
        common::metric_value(
            &m,
            "rampart_on_demand_requests_total{answer=\"ask_budget\"}"
        )
        .unwrap_or(0.0)
            > 0.0,
        "{m}"
    );

    // An approved name: the handshake that asked waits and gets pebble's certificate.
    // (Right after the scan the ask budget may still be spent: that handshake fails
    // at once, and the proxy asks again a second later.)
    let root = pebble.root().await;
    let asked_at = Instant::now();
    let mut attempts = 0;
    loop {
        attempts += 1;
        let body = get_trusting(&root, "shop.customer.test", a.https).await;
        if body.as_deref() == Some("hello on demand") {
            break;
        }
        assert!(
            asked_at.elapsed() < Duration::from_secs(60),
            "not served within 60 s:\n{}",
            logs(dir.path())
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    eprintln!(
        "a new name served {:.2}s after its first handshake ({attempts} handshakes)",
        asked_at.elapsed().as_secs_f64()
    );
    let m = metrics(a.admin).await;
    assert_eq!(
        common::metric_value(
            &m,
            "rampart_tls_on_demand_handshakes_total{outcome=\"served\"}"
        ),
        Some(1.0),
        "the handshake that waited was not served:\n{m}"
    );
    // Served by the other proxy too, without another ask or order.
    assert_eq!(
        get_trusting(&root, "shop.customer.test", b.https)
            .await
            .as_deref(),
        Some("hello on demand")
    );
    assert_eq!(ask.calls("shop.customer.test"), 1);
    let m = metrics(admin).await;
    assert_eq!(orders(&m), 1, "{m}");

    // max_total = 1: another approved name is refused without asking the application.
    assert!(!handshake("second.customer.test", b.https).await);
    assert_eq!(ask.calls("second.customer.test"), 0);
    let m = metrics(admin).await;
    assert!(
        common::metric_value(&m, "rampart_on_demand_requests_total{answer=\"cap\"}").unwrap_or(0.0)
            > 0.0,
        "{m}"
    );
    assert_eq!(orders(&m), 1, "{m}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_rampart_up_a_name_no_longer_approved_is_not_renewed_and_goes_when_it_expires() {
    common::init();
    let dir = tempfile::tempdir().unwrap();
    let ask = Ask::start(&["shop.customer.test"]).await;
    let mut attempt = 0;
    // 30-second certificates: renewal is due 20 s after issuance.
    let (pebble, https, _up) = loop {
        attempt += 1;
        assert!(attempt <= 3, "rampart up failed to start three times");
        let (http, https, admin) = (free_addr(), free_addr(), free_addr());
        let pebble = Pebble::start_with(
            dir.path(),
            http.port(),
            Options {
                validity: Some(30),
                ..Options::default()
            },
        )
        .await;
        let config = dir.path().join("up.toml");
        std::fs::write(
            &config,
            format!(
                r#"[server]
data_dir = {:?}

[listeners]
http = "{http}"
https = "{https}"
admin = "{admin}"

{}
[[routes]]
name = "app"
action = {{ respond = {{ body = "hello from up" }} }}
"#,
                dir.path().join(format!("data{attempt}")),
                on_demand_section(&ask, &pebble, "hold = \"30s\"")
            ),
        )
        .unwrap();
        if let Some(up) = common::spawn_up(&config, &dir.path().join("up.log"), admin).await {
            break (pebble, https, up);
        }
    };
    let root = pebble.root().await;
    // The first handshake for the name waits for its certificate (hold = 30s).
    let asked_at = Instant::now();
    assert_eq!(
        get_trusting(&root, "shop.customer.test", https)
            .await
            .as_deref(),
        Some("hello from up"),
        "{}",
        logs(dir.path())
    );
    eprintln!(
        "the first handshake for a new name was served after {:.2}s",
        asked_at.elapsed().as_secs_f64()
    );
    let issued = Instant::now();
    // The customer leaves: the renewal asks again and is refused.
    ask.approve.lock().unwrap().clear();
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        if get_trusting(&root, "shop.customer.test", https)
            .await
            .is_none()
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "still served 90 s after issuance:\n{}",
            logs(dir.path())
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let gone = issued.elapsed().as_secs_f64();
    eprintln!("no longer served {gone:.1}s after issuance (30-second certificate)");
    // Served until it expired, and not renewed.
    assert!(gone >= 25.0, "dropped before it expired: {gone:.1}s");
    // Forgotten once expired (the controller looks every 5 s), and never renewed.
    let up_log = dir.path().join("up.log");
    eventually("the expired name to be dropped", || async {
        std::fs::read_to_string(&up_log)
            .unwrap()
            .contains("shop.customer.test dropped")
            .then_some(())
    })
    .await;
    let log = std::fs::read_to_string(&up_log).unwrap();
    assert!(log.contains("no longer approves"), "{log}");
    assert_eq!(log.matches("ordering (").count(), 1, "{log}");
    assert!(ask.calls("shop.customer.test") >= 2);
}
