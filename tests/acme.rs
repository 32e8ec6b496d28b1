//! ACME against a real CA: pebble (Debian's package) with its own TLS certificate,
//! pebble-challtestsrv answering its DNS lookups with 127.0.0.1, a real `rampart
//! controller` as the one orderer and a real fleet proxy answering HTTP-01.
#![allow(missing_docs, clippy::unwrap_used)]

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::pebble::{Killed, Options, Pebble};
use common::{eventually, free_addr, Proxy};

/// GET https://<name>/ at the proxy, trusting only `root`.
async fn get_trusting(
    root: &reqwest::Certificate,
    name: &str,
    https: SocketAddr,
) -> Option<String> {
    let client = reqwest::Client::builder()
        .tls_certs_only([root.clone()])
        .resolve(name, https)
        .build()
        .unwrap();
    let r = client
        .get(format!("https://{name}:{}/", https.port()))
        .send()
        .await
        .ok()?;
    r.text().await.ok()
}

/// Waits (60 s at most) until `name` at `https` answers `body` over a certificate that
/// chains to `root`; on timeout, fails with the logs in `dir`.
async fn wait_served(
    root: &reqwest::Certificate,
    name: &str,
    https: SocketAddr,
    body: &str,
    dir: &Path,
) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while get_trusting(root, name, https).await.as_deref() != Some(body) {
        if Instant::now() >= deadline {
            let logs: Vec<String> = std::fs::read_dir(dir)
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
                .collect();
            panic!(
                "{name} is not served with a pebble certificate:\n{}",
                logs.join("\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Waits for the first failed order, then checks for `window` that no second one is
/// sent (the back-off after one failure is 30-60 s; the loop looks every 5 s).
async fn one_failed_order_then_backoff(admin: SocketAddr, window: Duration) {
    eventually("the first order to fail", || async {
        metrics(admin)
            .await
            .contains("rampart_acme_orders_total{result=\"error\"} 1")
            .then_some(())
    })
    .await;
    let watch_until = Instant::now() + window;
    while Instant::now() < watch_until {
        let m = metrics(admin).await;
        assert!(
            !m.contains("rampart_acme_orders_total{result=\"error\"} 2"),
            "ordered again within the back-off:\n{m}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// A controller ordering for two names from `pebble`, and one fleet proxy whose HTTP
/// listener is `proxy_http`.
struct Setup {
    controller: Option<Killed>,
    proxy: Proxy,
    admin: SocketAddr,
    config: PathBuf,
    started: Instant,
}

async fn setup(dir: &Path, pebble: &Pebble, proxy_http: SocketAddr) -> Setup {
    let tls = format!(
        "hosts = [\"a.rampart.test\", \"b.rampart.test\"]\nsource = {{ acme = {{ email = \"ops@rampart.test\", directory = \"{}\", directory_ca = {:?} }} }}\n",
        pebble.directory, pebble.api_ca
    );
    setup_with(
        dir,
        proxy_http,
        &tls,
        &["a.rampart.test", "b.rampart.test"],
        "",
    )
    .await
}

/// A controller with one `[[tls]]` entry `tls`, a route for `hosts`, and `extra`
/// configuration; one fleet proxy.
async fn setup_with(
    dir: &Path,
    proxy_http: SocketAddr,
    tls: &str,
    hosts: &[&str],
    extra: &str,
) -> Setup {
    setup_with_listeners(dir, proxy_http, None, tls, hosts, extra).await
}

/// [`setup_with`], with the proxy's HTTPS listener at `proxy_https` when given.
async fn setup_with_listeners(
    dir: &Path,
    proxy_http: SocketAddr,
    proxy_https: Option<SocketAddr>,
    tls: &str,
    hosts: &[&str],
    extra: &str,
) -> Setup {
    let (admin, fleet) = (free_addr(), free_addr());
    let config = dir.join("controller.toml");
    std::fs::write(
        &config,
        format!(
            r#"[server]
data_dir = {:?}

[controller]
listen = "{fleet}"
admin = "{admin}"
watch_timeout = "2s"

[[tls]]
{tls}
{extra}

[[routes]]
name = "hello"
hosts = {hosts:?}
https_redirect = true
action = {{ respond = {{ body = "hello over acme" }} }}
"#,
            dir.join("data"),
        ),
    )
    .unwrap();
    let controller = start_controller(&config, &dir.join("controller.log"));
    common::wait_controller(admin).await;
    let token = common::join_token(&config);
    let started = Instant::now();
    let (http, https) = (proxy_http.to_string(), proxy_https.map(|a| a.to_string()));
    let mut args = vec!["--http", http.as_str()];
    if let Some(https) = &https {
        args.extend(["--https", https.as_str()]);
    }
    let proxy = Proxy::start_fleet_with(&format!("https://{fleet}"), Some(&token), &args).await;
    Setup {
        controller: Some(controller),
        proxy,
        admin,
        config,
        started,
    }
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

/// The ACME report of the certificate for a.rampart.test and b.rampart.test on the
/// controller's dashboard (JSON).
async fn dashboard_acme(admin: SocketAddr) -> serde_json::Value {
    let view: serde_json::Value = reqwest::get(format!("http://{admin}/api/v1/dashboard"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    view["certificates"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["names"] == serde_json::json!(["a.rampart.test", "b.rampart.test"]))
        .unwrap_or_else(|| panic!("no such certificate: {view}"))["acme"]
        .clone()
}

async fn metrics(admin: SocketAddr) -> String {
    reqwest::get(format!("http://{admin}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_controller_orders_over_http01_through_the_proxies_and_they_serve_it() {
    common::init();
    let dir = tempfile::tempdir().unwrap();
    let proxy_http = free_addr();
    let pebble = Pebble::start(dir.path(), proxy_http.port()).await;
    let mut s = setup(dir.path(), &pebble, proxy_http).await;

    // Both names end up served with pebble's certificate.
    let root = pebble.root().await;
    for name in ["a.rampart.test", "b.rampart.test"] {
        wait_served(&root, name, s.proxy.https, "hello over acme", dir.path()).await;
    }
    eprintln!(
        "certificate served {:.2}s after the proxy started",
        s.started.elapsed().as_secs_f64()
    );
    let m = metrics(s.admin).await;
    assert!(
        m.contains("rampart_acme_orders_total{result=\"ok\"} 1"),
        "{m}"
    );
    assert!(
        m.contains("rampart_certificate_not_after_seconds{name=\"a.rampart.test,b.rampart.test\"}"),
        "{m}"
    );
    assert!(
        m.contains("rampart_acme_rate_limit_headroom{name=\"a.rampart.test,b.rampart.test\"}"),
        "{m}"
    );
    // The dashboard says where the certificate came from and when it renews.
    let acme = dashboard_acme(s.admin).await;
    assert_eq!(acme["last_result"], "ok", "{acme}");
    assert!(acme["renew_at"].as_u64().unwrap() > acme["not_after"].as_u64().unwrap() / 2);

    // A restart of the controller orders nothing: the certificate is in the store.
    s.controller = None;
    s.controller = Some(start_controller(
        &s.config,
        &dir.path().join("controller-2.log"),
    ));
    let admin = s.admin;
    common::wait_controller(admin).await;
    // Let it look at its certificates a few times (its loop runs every 5 s).
    let settle = Instant::now() + Duration::from_secs(7);
    while Instant::now() < settle {
        assert!(get_trusting(&root, "a.rampart.test", s.proxy.https)
            .await
            .is_some());
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let log = std::fs::read_to_string(dir.path().join("controller-2.log")).unwrap();
    assert!(
        !log.contains("ordering"),
        "the restarted controller ordered again:\n{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_validation_backs_off_instead_of_looping() {
    common::init();
    let dir = tempfile::tempdir().unwrap();
    // pebble validates on a port where nothing answers: every validation fails.
    let nobody = free_addr();
    let pebble = Pebble::start(dir.path(), nobody.port()).await;
    let s = setup(dir.path(), &pebble, free_addr()).await;
    let admin = s.admin;
    one_failed_order_then_backoff(admin, Duration::from_secs(12)).await;
    let m = metrics(admin).await;
    assert!(
        m.contains("rampart_acme_consecutive_failures{name=\"a.rampart.test,b.rampart.test\"} 1"),
        "{m}"
    );
    // Unix seconds: exact in an f64.
    let next = common::metric_value(&m, "rampart_acme_next_attempt_seconds{").unwrap_or(0.0) as u64;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert!(
        next > now + 10,
        "the next attempt is in the future: {next} vs {now}\n{m}"
    );
    let acme = dashboard_acme(admin).await;
    assert_eq!(
        (acme["last_result"].as_str(), acme["failures"].as_u64()),
        (Some("error"), Some(1)),
        "{acme}"
    );
    assert!(acme["waiting_until"].as_u64().unwrap() > now + 10, "{acme}");
    assert!(acme["last_error"].as_str().is_some_and(|e| !e.is_empty()));
    // The names keep being served (by the internal certificate until ACME delivers).
    let log = std::fs::read_to_string(dir.path().join("controller.log")).unwrap();
    assert_eq!(log.matches("ordering").count(), 1, "{log}");
    assert!(s.proxy.is_ready().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wildcard_is_validated_over_dns01_through_the_embedded_dns_server() {
    common::init();
    let dir = tempfile::tempdir().unwrap();
    let dns = free_addr();
    let pebble = Pebble::start_with_dns(dir.path(), free_addr().port(), Some(dns)).await;
    let tls = format!(
        "hosts = [\"w.rampart.test\", \"*.w.rampart.test\"]\nsource = {{ acme = {{ email = \"ops@rampart.test\", directory = \"{}\", directory_ca = {:?}, challenge = \"dns-01\" }} }}\n",
        pebble.directory, pebble.api_ca
    );
    let extra = format!(
        "[dns]\nzone = \"rampart.test\"\nprovider = {{ kind = \"embedded\", listen = \"{dns}\" }}\n"
    );
    let s = setup_with(
        dir.path(),
        free_addr(),
        &tls,
        &["w.rampart.test", "*.w.rampart.test"],
        &extra,
    )
    .await;
    let root = pebble.root().await;
    for name in ["w.rampart.test", "any.w.rampart.test"] {
        wait_served(&root, name, s.proxy.https, "hello over acme", dir.path()).await;
    }
    eprintln!(
        "wildcard served {:.2}s after the proxy started",
        s.started.elapsed().as_secs_f64()
    );
    // The challenge records are gone once the order is done.
    let out = Command::new("dig")
        .args(["+short", "-p", &dns.port().to_string(), "@127.0.0.1"])
        .args(["_acme-challenge.w.rampart.test", "TXT"])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejected_nonces_do_not_lose_the_order() {
    common::init();
    let dir = tempfile::tempdir().unwrap();
    let proxy_http = free_addr();
    // One good nonce in five refused: instant-acme retries each request, Rampart the
    // whole order; none of it counts as a failure.
    let pebble = Pebble::start_rejecting_nonces(dir.path(), proxy_http.port(), 20).await;
    let s = setup(dir.path(), &pebble, proxy_http).await;
    let root = pebble.root().await;
    wait_served(
        &root,
        "a.rampart.test",
        s.proxy.https,
        "hello over acme",
        dir.path(),
    )
    .await;
    let m = metrics(s.admin).await;
    assert!(
        m.contains("rampart_acme_orders_total{result=\"ok\"} 1"),
        "{m}"
    );
    assert!(
        !m.contains("rampart_acme_orders_total{result=\"error\"}"),
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_is_renewed_when_a_third_of_its_lifetime_is_left() {
    common::init();
    let dir = tempfile::tempdir().unwrap();
    let proxy_http = free_addr();
    // 30-second certificates: renewal is due 20 s after issuance.
    let pebble = Pebble::start_short_lived(dir.path(), proxy_http.port(), 30).await;
    let s = setup(dir.path(), &pebble, proxy_http).await;
    let admin = s.admin;
    let not_after = |m: &str| -> u64 {
        common::metric_value(m, "rampart_certificate_not_after_seconds{").unwrap_or(0.0) as u64
    };
    let first = eventually("the first certificate", || async {
        let n = not_after(&metrics(admin).await);
        (n > 0).then_some(n)
    })
    .await;
    let issued = Instant::now();
    let deadline = Instant::now() + Duration::from_secs(60);
    let root = pebble.root().await;
    // Served once the proxies have the snapshot with it.
    let proxy_https = s.proxy.https;
    eventually("the first certificate to be served", || async {
        get_trusting(&root, "a.rampart.test", proxy_https)
            .await
            .map(drop)
    })
    .await;
    let second = loop {
        let m = metrics(admin).await;
        let n = not_after(&m);
        if n > first {
            break n;
        }
        // The old certificate keeps serving meanwhile.
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        assert!(
            get_trusting(&root, "a.rampart.test", s.proxy.https)
                .await
                .is_some(),
            "not served at {now}, {:.1}s after issuance:\n{m}\ncontroller log:\n{}",
            issued.elapsed().as_secs_f64(),
            std::fs::read_to_string(dir.path().join("controller.log")).unwrap()
        );
        assert!(Instant::now() < deadline, "no renewal within 60 s:\n{m}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let after = issued.elapsed().as_secs_f64();
    eprintln!("renewed {after:.1}s after the first issuance (not after {first} -> {second})");
    assert!(after >= 10.0, "renewed too early: {after:.1}s");
    let m = metrics(admin).await;
    assert!(
        m.contains("rampart_acme_orders_total{result=\"ok\"} 2"),
        "{m}"
    );
    assert!(get_trusting(&root, "a.rampart.test", s.proxy.https)
        .await
        .is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rampart_up_with_an_acme_name_serves_its_certificate() {
    common::init();
    let dir = tempfile::tempdir().unwrap();
    let started = Instant::now();
    let mut attempt = 0;
    // Fresh ports (and a pebble validating on the new HTTP port) when one was taken.
    let (pebble, https, _up) = loop {
        attempt += 1;
        assert!(attempt <= 3, "rampart up failed to start three times");
        let (http, https, admin) = (free_addr(), free_addr(), free_addr());
        let pebble = Pebble::start(dir.path(), http.port()).await;
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

[[tls]]
hosts = ["up.rampart.test"]
source = {{ acme = {{ email = "ops@rampart.test", directory = "{}", directory_ca = {:?} }} }}

[[routes]]
name = "hello"
action = {{ respond = {{ body = "hello from up" }} }}
"#,
                dir.path().join(format!("data{attempt}")),
                pebble.directory,
                pebble.api_ca
            ),
        )
        .unwrap();
        if let Some(up) = common::spawn_up(&config, &dir.path().join("up.log"), admin).await {
            break (pebble, https, up);
        }
    };
    let root = pebble.root().await;
    wait_served(&root, "up.rampart.test", https, "hello from up", dir.path()).await;
    eprintln!(
        "rampart up served its ACME certificate {:.2}s after start",
        started.elapsed().as_secs_f64()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_controllers_sharing_etcd_send_one_order() {
    common::init();
    let etcd = common::etcd::Etcd::start().await;
    let dir = tempfile::tempdir().unwrap();
    let proxy_http = free_addr();
    let pebble = Pebble::start(dir.path(), proxy_http.port()).await;
    let controller = |name: &str| {
        let (admin, fleet) = (free_addr(), free_addr());
        let config = dir.path().join(format!("{name}.toml"));
        std::fs::write(
            &config,
            format!(
                r#"[server]
data_dir = {:?}

[controller]
listen = "{fleet}"
admin = "{admin}"
watch_timeout = "2s"
store = {{ etcd = {{ endpoints = ["{}"], prefix = "/rampart-acme", lease_ttl = "2s" }} }}

[[tls]]
hosts = ["ha.rampart.test"]
source = {{ acme = {{ email = "ops@rampart.test", directory = "{}", directory_ca = {:?} }} }}

[[routes]]
name = "hello"
action = {{ respond = {{ body = "hello from the fleet" }} }}
"#,
                dir.path().join(name),
                etcd.url,
                pebble.directory,
                pebble.api_ca
            ),
        )
        .unwrap();
        let proc = start_controller(&config, &dir.path().join(format!("{name}.log")));
        (proc, admin, fleet, config)
    };
    let (_a, admin_a, fleet_a, config_a) = controller("a");
    let (_b, admin_b, _, _) = controller("b");
    for admin in [admin_a, admin_b] {
        common::wait_controller(admin).await;
    }
    let token = common::join_token(&config_a);
    // Once (in CI, beside the Docker lane) the proxy found nothing listening on
    // controller a's fleet API; when that happens, show what the controllers said.
    let started = futures_util::FutureExt::catch_unwind(std::panic::AssertUnwindSafe(
        Proxy::start_fleet_with(
            &format!("https://{fleet_a}"),
            Some(&token),
            &["--http", &proxy_http.to_string()],
        ),
    ))
    .await;
    let proxy = match started {
        Ok(proxy) => proxy,
        Err(panic) => {
            for name in ["a.log", "b.log"] {
                let log = std::fs::read_to_string(dir.path().join(name)).unwrap_or_default();
                eprintln!("--- controller {name} ---\n{log}");
            }
            std::panic::resume_unwind(panic);
        }
    };
    let root = pebble.root().await;
    wait_served(
        &root,
        "ha.rampart.test",
        proxy.https,
        "hello from the fleet",
        dir.path(),
    )
    .await;
    // Both keep deciding (every 5 s) for a while: still one order on the CA's side.
    let watch_until = Instant::now() + Duration::from_secs(6);
    loop {
        let log = std::fs::read_to_string(&pebble.log).unwrap();
        let orders = log.lines().filter(|l| l.contains("/order-plz")).count();
        assert_eq!(orders, 1, "pebble saw {orders} orders:\n{log}");
        if Instant::now() >= watch_until {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let ordering = ["a.log", "b.log"]
        .iter()
        .map(|f| {
            std::fs::read_to_string(dir.path().join(f))
                .unwrap()
                .matches("ordering")
                .count()
        })
        .sum::<usize>();
    assert_eq!(ordering, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_validations_still_issue() {
    common::init();
    let dir = tempfile::tempdir().unwrap();
    let proxy_http = free_addr();
    let opts = Options {
        va_sleep: Some(3),
        ..Options::default()
    };
    let pebble = Pebble::start_with(dir.path(), proxy_http.port(), opts).await;
    let s = setup(dir.path(), &pebble, proxy_http).await;
    let root = pebble.root().await;
    wait_served(
        &root,
        "a.rampart.test",
        s.proxy.https,
        "hello over acme",
        dir.path(),
    )
    .await;
    assert!(metrics(s.admin)
        .await
        .contains("rampart_acme_orders_total{result=\"ok\"} 1"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ca_that_is_down_backs_off_and_the_names_keep_being_served() {
    common::init();
    let dir = tempfile::tempdir().unwrap();
    // Nothing listens at this directory.
    let tls = format!(
        "hosts = [\"down.rampart.test\"]\nsource = {{ acme = {{ email = \"ops@rampart.test\", directory = \"https://{}/dir\" }} }}\n",
        free_addr()
    );
    let s = setup_with(dir.path(), free_addr(), &tls, &["down.rampart.test"], "").await;
    let admin = s.admin;
    one_failed_order_then_backoff(admin, Duration::from_secs(8)).await;
    let log = std::fs::read_to_string(dir.path().join("controller.log")).unwrap();
    assert!(
        log.contains("creating an ACME account"),
        "the error says what failed:\n{log}"
    );
    // The name is served meanwhile (internal certificate), the listener works.
    let client = reqwest::Client::builder()
        .danger_accept_invalid_certs(true)
        .resolve("down.rampart.test", s.proxy.https)
        .build()
        .unwrap();
    let body = client
        .get(format!(
            "https://down.rampart.test:{}/",
            s.proxy.https.port()
        ))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(body, "hello over acme");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fallback_ca_issues_when_the_first_one_is_down() {
    common::init();
    let dir = tempfile::tempdir().unwrap();
    let proxy_http = free_addr();
    let pebble = Pebble::start(dir.path(), proxy_http.port()).await;
    let tls = format!(
        "hosts = [\"fb.rampart.test\"]\nsource = {{ acme = {{ email = \"ops@rampart.test\", directory = \"https://{}/dir\", fallback = [{{ directory = \"{}\", directory_ca = {:?} }}] }} }}\n",
        free_addr(),
        pebble.directory,
        pebble.api_ca
    );
    let s = setup_with(dir.path(), proxy_http, &tls, &["fb.rampart.test"], "").await;
    let root = pebble.root().await;
    wait_served(
        &root,
        "fb.rampart.test",
        s.proxy.https,
        "hello over acme",
        dir.path(),
    )
    .await;
    let m = metrics(s.admin).await;
    assert!(
        m.contains("rampart_acme_orders_total{result=\"ok\"} 1"),
        "{m}"
    );
    let log = std::fs::read_to_string(dir.path().join("controller.log")).unwrap();
    assert!(log.contains("issued by the fallback CA"), "{log}");
}

/// The HMAC key pebble is given for the EAB tests (base64url, as CAs show it).
const EAB_KEY: &str = "zWNDZM6eQGHWpSRTPal5eIUYFTu7EajVIoguysqZ9wG44nMEtx3MUAsUDkMTQ12W-_w";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ca_that_requires_external_account_binding_issues_with_it_and_refuses_without() {
    common::init();
    let dir = tempfile::tempdir().unwrap();
    let proxy_http = free_addr();
    let opts = common::pebble::Options {
        eab: Some(("kid-1".into(), EAB_KEY.into())),
        ..Default::default()
    };
    let pebble = Pebble::start_with(dir.path(), proxy_http.port(), opts).await;
    let key_file = dir.path().join("eab.key");
    std::fs::write(&key_file, format!("{EAB_KEY}\n")).unwrap();
    let tls = |eab: &str| {
        format!(
            "hosts = [\"a.rampart.test\"]\nsource = {{ acme = {{ email = \"ops@rampart.test\", directory = \"{}\", directory_ca = {:?}{eab} }} }}\n",
            pebble.directory, pebble.api_ca
        )
    };
    // Without the binding, the CA refuses to create the account: one failed order.
    let without = tempfile::tempdir().unwrap();
    let s = setup_with(
        without.path(),
        proxy_http,
        &tls(""),
        &["a.rampart.test"],
        "",
    )
    .await;
    one_failed_order_then_backoff(s.admin, Duration::from_secs(1)).await;
    let log = std::fs::read_to_string(without.path().join("controller.log")).unwrap();
    assert!(log.contains("externalAccountRequired"), "{log}");
    drop(s);
    // With it, the certificate is issued and served.
    let eab = format!(", eab = {{ kid = \"kid-1\", hmac_key_file = {key_file:?} }}");
    let s = setup_with(dir.path(), proxy_http, &tls(&eab), &["a.rampart.test"], "").await;
    let root = pebble.root().await;
    wait_served(
        &root,
        "a.rampart.test",
        s.proxy.https,
        "hello over acme",
        dir.path(),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_alpn_01_is_answered_by_the_proxies_https_listener() {
    common::init();
    let dir = tempfile::tempdir().unwrap();
    let (proxy_http, proxy_https) = (free_addr(), free_addr());
    let opts = common::pebble::Options {
        tls_port: Some(proxy_https.port()),
        ..Default::default()
    };
    let pebble = Pebble::start_with(dir.path(), proxy_http.port(), opts).await;
    let tls = format!(
        "hosts = [\"a.rampart.test\"]\nsource = {{ acme = {{ email = \"ops@rampart.test\", directory = \"{}\", directory_ca = {:?}, challenge = \"tls-alpn-01\" }} }}\n",
        pebble.directory, pebble.api_ca
    );
    let s = setup_with_listeners(
        dir.path(),
        proxy_http,
        Some(proxy_https),
        &tls,
        &["a.rampart.test"],
        "",
    )
    .await;
    let root = pebble.root().await;
    wait_served(
        &root,
        "a.rampart.test",
        proxy_https,
        "hello over acme",
        dir.path(),
    )
    .await;
    let m = metrics(s.admin).await;
    assert!(
        m.contains("rampart_acme_orders_total{result=\"ok\"} 1"),
        "{m}"
    );
}

/// The leaf certificate (DER) the proxy at `https` shows for `name`, verified
/// against `root_pem`; `None` until it is one `root_pem` issued.
async fn served_leaf(root_pem: &[u8], name: &str, https: SocketAddr) -> Option<Vec<u8>> {
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pemfile::certs(&mut &root_pem[..]) {
        roots.add(c.unwrap()).unwrap();
    }
    let config = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(https).await.ok()?;
    let tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
        .connect(name.to_string().try_into().unwrap(), tcp)
        .await
        .ok()?;
    Some(tls.get_ref().1.peer_certificates()?.first()?.to_vec())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renewal_names_the_certificate_it_replaces() {
    common::init();
    let (orders, id) = renew_through_ari(false).await;
    assert_eq!(orders.len(), 2, "{orders:?}");
    assert!(orders[0].get("replaces").is_none(), "{orders:?}");
    assert_eq!(orders[1]["replaces"], id, "{orders:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_replacement_is_ordered_again_without_replaces() {
    common::init();
    let (orders, id) = renew_through_ari(true).await;
    assert_eq!(orders.len(), 3, "{orders:?}");
    assert_eq!(orders[1]["replaces"], id, "{orders:?}");
    assert!(orders[2].get("replaces").is_none(), "{orders:?}");
}

/// A certificate ordered through a CA with ARI, then renewed when ARI says it is due
/// (the CA refusing orders that name a replaced certificate when `refuse`): the
/// new-order payloads and the ARI id of the first certificate.
async fn renew_through_ari(refuse: bool) -> (Vec<serde_json::Value>, String) {
    let dir = tempfile::tempdir().unwrap();
    let proxy_http = free_addr();
    let pebble = Pebble::start(dir.path(), proxy_http.port()).await;
    // pebble 2.4 has no ARI: the front adds it, due at once for the first certificate.
    let front = common::ari::AriFront::start(dir.path(), &pebble).await;
    front
        .refuse_replacing
        .store(refuse, std::sync::atomic::Ordering::SeqCst);
    let tls = format!(
        "hosts = [\"a.rampart.test\"]\nsource = {{ acme = {{ email = \"ops@rampart.test\", directory = \"{}\", directory_ca = {:?} }} }}\n",
        front.directory, pebble.api_ca
    );
    let s = setup_with(dir.path(), proxy_http, &tls, &["a.rampart.test"], "").await;
    let root = pebble.root_pem().await;
    let https = s.proxy.https;
    let first = eventually("the first certificate to be served", || {
        served_leaf(&root, "a.rampart.test", https)
    })
    .await;
    let id = common::ari::identifier(&first);
    let second = eventually("the renewal to be served", || async {
        served_leaf(&root, "a.rampart.test", https)
            .await
            .filter(|leaf| *leaf != first)
    })
    .await;
    assert_eq!(front.asked.lock().unwrap()[0], id);
    assert_ne!(common::ari::identifier(&second), id);
    let orders = front.orders.lock().unwrap().clone();
    (orders, id)
}
