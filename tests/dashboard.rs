//! The proxy's dashboard and its JSON on a real `rampart proxy`: two pools, one endpoint
//! failing its health check, an internal-CA certificate, traffic in the rolling window,
//! and the admin token required everywhere but the probes and `/metrics`.
#![allow(missing_docs, clippy::unwrap_used)]

mod common;

use common::{Backend, Proxy};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_pools_health_certificates_and_traffic_behind_the_token() {
    common::init();
    let (web1, web2, api) = (
        Backend::start("web1").await,
        Backend::start("web2").await,
        Backend::start("api").await,
    );
    web2.health_status
        .store(500, std::sync::atomic::Ordering::SeqCst);
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("admin-token");
    std::fs::write(&token_file, "s3cret\n").unwrap();
    let check =
        "health_check = { interval = \"100ms\", timeout = \"100ms\", unhealthy_threshold = 1 }";
    let proxy = Proxy::start(&format!(
        "admin_token_file = {token_file:?}\n\n\
         [[tls]]\nhosts = [\"a.test\"]\nsource = \"internal\"\n\n\
         [[routes]]\nname = \"api\"\nhosts = [\"a.test\"]\npath_prefix = \"/api\"\naction = {{ forward = \"api\" }}\n\n\
         [[routes]]\nname = \"web\"\nhosts = [\"a.test\"]\naction = {{ forward = \"web\" }}\n\n\
         {}\n{}",
        common::pool_toml("web", "round_robin", &[&web1, &web2], check),
        common::pool_toml("api", "round_robin", &[&api], "")
    ))
    .await;
    let admin = |path: &str| format!("http://{}{path}", proxy.admin);
    let client = reqwest::Client::new();

    // Without the token: 401 with a Basic challenge; probes and metrics stay open.
    for path in ["/", "/api/v1/dashboard", "/api/v1/status", "/status"] {
        let r = client.get(admin(path)).send().await.unwrap();
        assert_eq!(r.status(), 401, "{path}");
        assert!(r.headers().contains_key("www-authenticate"));
    }
    let wrong = client
        .get(admin("/"))
        .bearer_auth("nope")
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), 401);
    for path in ["/healthz", "/ready", "/metrics"] {
        assert_eq!(
            client.get(admin(path)).send().await.unwrap().status(),
            200,
            "{path}"
        );
    }

    // Traffic for the rolling window (the current second is not counted yet).
    let https = proxy.client(&["a.test"]);
    let url = |path: &str| format!("https://a.test:{}{path}", proxy.https.port());
    for _ in 0..20 {
        assert_eq!(https.get(url("/")).send().await.unwrap().status(), 200);
        assert_eq!(https.get(url("/api/x")).send().await.unwrap().status(), 200);
    }
    let view: serde_json::Value = common::eventually(
        "the dashboard to show the traffic and web2 down",
        || async {
            let v: serde_json::Value = client
                .get(admin("/api/v1/dashboard"))
                .bearer_auth("s3cret")
                .send()
                .await
                .ok()?
                .json()
                .await
                .ok()?;
            // Counted once their second is over (the current one is still filling).
            let counted: u64 = v["overview"]["series"]
                .as_array()?
                .iter()
                .filter_map(|p| p["requests"].as_u64())
                .sum();
            let rate = if counted >= 40 {
                v["overview"]["last_minute"]["rate"].as_f64()?
            } else {
                0.0
            };
            let web = v["routes"]
                .as_array()?
                .iter()
                .find(|r| r["name"] == "web")?;
            let down = web["pool"]["endpoints"]
                .as_array()?
                .iter()
                .any(|e| e["address"] == web2.addr.to_string() && e["available"] == false);
            (rate > 0.0 && down).then_some(v)
        },
    )
    .await;
    let requests: u64 = view["overview"]["series"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["requests"].as_u64().unwrap())
        .sum();
    assert!(requests >= 40, "{requests} requests in the series");
    let cert = &view["certificates"][0];
    assert_eq!(cert["name"], "a.test");
    assert!(
        (88..=90).contains(&cert["days_left"].as_i64().unwrap()),
        "{cert}"
    );
    assert_eq!(cert["expiring"], false);
    let api_route = view["routes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == "api")
        .unwrap();
    assert_eq!(api_route["pool"]["endpoints"][0]["available"], true);

    // The page, with Basic auth (token as the password), shows the same.
    let page = client
        .get(admin("/"))
        .basic_auth("anyone", Some("s3cret"))
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), 200);
    assert!(page
        .headers()
        .get("content-type")
        .unwrap()
        .to_str()
        .unwrap()
        .starts_with("text/html"));
    let html = page.text().await.unwrap();
    assert!(
        html.contains(&format!("data-endpoint=\"{}\"", web2.addr)),
        "{html}"
    );
    assert!(html.contains("unhealthy"));
    assert!(html.contains("data-certificate=\"a.test\""));
    assert!(html.contains("<svg"));
    // The refresh fetches the body alone.
    let body = client
        .get(admin("/?body"))
        .bearer_auth("s3cret")
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    // A fragment (no page around it), numbered, starting with the overview.
    assert!(!body.contains("<html"), "{body}");
    assert!(body.starts_with("<span hidden data-rendering=\""), "{body}");
    assert!(body.contains("<section id=\"overview\">"), "{body}");
    let status: serde_json::Value = client
        .get(admin("/api/v1/status"))
        .bearer_auth("s3cret")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(status["pools"]["web"]["endpoints"].is_array());

    // Rotating the token is replacing the file.
    std::fs::write(&token_file, "n3w\n").unwrap();
    assert_eq!(
        client
            .get(admin("/"))
            .bearer_auth("s3cret")
            .send()
            .await
            .unwrap()
            .status(),
        401
    );
    assert_eq!(
        client
            .get(admin("/"))
            .bearer_auth("n3w")
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
}

/// A real browser (headless Chromium, Debian's package) opens the dashboard of a running
/// `rampart up` with two pools, one endpoint failing its health check and an
/// internal-CA certificate; the rendered DOM shows the unhealthy endpoint and the
/// certificate's days left, and a screenshot is saved to `target/dashboard.png`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_browser_renders_the_dashboard_of_rampart_up() {
    common::init();
    let (web1, web2, api) = (
        Backend::start("web1").await,
        Backend::start("web2").await,
        Backend::start("api").await,
    );
    web2.health_status
        .store(503, std::sync::atomic::Ordering::SeqCst);
    let dir = tempfile::tempdir().unwrap();
    let check =
        "health_check = { interval = \"100ms\", timeout = \"100ms\", unhealthy_threshold = 1 }";
    let config = dir.path().join("rampart.toml");
    // Fresh ports when one was taken before `rampart up` bound it.
    let (https, admin, _up) = 'up: {
        for _ in 0..3 {
            let (https, admin) = (common::free_addr(), common::free_addr());
            std::fs::write(
                &config,
                format!(
                    "[server]\ndata_dir = {:?}\n\n[listeners]\nhttps = \"{https}\"\nadmin = \"{admin}\"\n\n\
                     [[tls]]\nhosts = [\"shop.test\"]\nsource = \"internal\"\n\n\
                     [[routes]]\nname = \"api\"\nhosts = [\"shop.test\"]\npath_prefix = \"/api\"\naction = {{ forward = \"api\" }}\n\n\
                     [[routes]]\nname = \"web\"\nhosts = [\"shop.test\"]\naction = {{ forward = \"web\" }}\n\n{}\n{}",
                    dir.path().join("data"),
                    common::pool_toml("web", "least_conn", &[&web1, &web2], check),
                    common::pool_toml("api", "round_robin", &[&api], "")
                ),
            )
            .unwrap();
            if let Some(up) = common::spawn_up(&config, &dir.path().join("up.log"), admin).await {
                break 'up (https, admin, up);
            }
        }
        panic!("rampart up failed to start three times");
    };
    let client = reqwest::Client::new();
    // Serving, and web2 already out.
    common::eventually("rampart up to serve with web2 unhealthy", || async {
        let v: serde_json::Value = client
            .get(format!("http://{admin}/api/v1/dashboard"))
            .send()
            .await
            .ok()?
            .json()
            .await
            .ok()?;
        let web = v["routes"]
            .as_array()?
            .iter()
            .find(|r| r["name"] == "web")?;
        let down = web["pool"]["endpoints"]
            .as_array()?
            .iter()
            .any(|e| e["address"] == web2.addr.to_string() && e["available"] == false);
        (down && !v["certificates"].as_array()?.is_empty()).then_some(())
    })
    .await;

    // Three seconds of traffic (a tenth of it answered 503 by the upstream) for the chart.
    let ca = std::fs::read(dir.path().join("data/ca/ca.pem")).unwrap();
    let shop = reqwest::Client::builder()
        .tls_certs_only([reqwest::Certificate::from_pem(&ca).unwrap()])
        .resolve("shop.test", https)
        .build()
        .unwrap();
    let start = std::time::Instant::now();
    let mut sent = 0u32;
    let mut last_failed = None;
    while start.elapsed() < std::time::Duration::from_secs(3) && sent < 3000 {
        let path = match sent % 10 {
            0 => "/status/503",
            1..=3 => "/api/items",
            _ => "/",
        };
        let r = shop
            .get(format!("https://shop.test:{}{path}", https.port()))
            .send()
            .await;
        match &r {
            Ok(r) if r.status() == 503 => {
                last_failed = Some(r.headers()["x-request-id"].to_str().unwrap().to_string());
            }
            _ => {}
        }
        sent += 1;
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }

    let chromium = |args: &[String]| {
        let profile = dir.path().join("chromium-profile");
        std::process::Command::new("chromium")
            .args([
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
            ])
            .arg(format!("--user-data-dir={}", profile.display()))
            .args(args)
            .arg(format!("http://{admin}/"))
            .output()
            .expect("chromium (scripts/setup installs it)")
    };
    // The page refreshes its body every 3 s (virtual time): 8 s of it let the script run
    // at least twice. Each rendering is numbered, so the DOM the browser ends with must
    // carry a later one than the page it loaded.
    let rendering = |html: &str| -> u64 {
        html.split("data-rendering=\"")
            .nth(1)
            .and_then(|s| s.split('"').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no rendering number in {html}"))
    };
    let before = rendering(
        &client
            .get(format!("http://{admin}/"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap(),
    );
    let dom = chromium(&["--dump-dom".into(), "--virtual-time-budget=8000".into()]);
    let dom = String::from_utf8_lossy(&dom.stdout).to_string();
    // Loaded as before + 1; refreshed by the page's own script at least once after that.
    assert!(
        rendering(&dom) >= before + 2,
        "the page's refresh never ran: rendering {} after {before}",
        rendering(&dom)
    );
    // The newest failed request among the recent errors, its time shown as "N s ago"
    // with the local time on hover (set by the page's script), and the link to the
    // controller's dashboard beside this one.
    let failed = last_failed.expect("a 503 among the requests");
    let row = dom
        .split("<tr ")
        .find(|tr| tr.contains(&format!("data-request-id=\"{failed}\"")))
        .unwrap_or_else(|| panic!("request {failed} is not among the recent errors:\n{dom}"));
    assert!(
        row.contains("<td>503</td>") && row.contains("<td>web</td>"),
        "{row}"
    );
    assert!(row.contains(" s ago") && row.contains("title=\""), "{row}");
    assert!(
        dom.contains("href=\"/controller\""),
        "no link to the controller's dashboard"
    );
    // The unhealthy endpoint, as the browser rendered it.
    let web2_item = dom
        .split("<li ")
        .find(|li| li.contains(&format!("data-endpoint=\"{}\"", web2.addr)))
        .unwrap_or_else(|| panic!("web2 is not on the page:\n{dom}"));
    assert!(web2_item.contains("class=\"bad\""), "{web2_item}");
    assert!(web2_item.contains("unhealthy"), "{web2_item}");
    // The certificate and its days left.
    let cert_row = dom
        .split("<tr ")
        .find(|tr| tr.contains("data-certificate=\"shop.test\""))
        .unwrap_or_else(|| panic!("the certificate is not on the page:\n{dom}"));
    let days: i64 = cert_row
        .split("class=\"days-left\">")
        .nth(1)
        .and_then(|s| s.split('<').next())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or_else(|| panic!("no days left in {cert_row}"));
    assert!((88..=90).contains(&days), "{days}");

    // `rampart up` also serves its controller's dashboard: the fleet (this proxy),
    // and the certificate with its issuer.
    let controller: serde_json::Value = client
        .get(format!("http://{admin}/controller/api/v1/dashboard"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(controller["proxies"], 1, "{controller}");
    assert_eq!(controller["certificates"][0]["names"][0], "shop.test");
    let controller_html = client
        .get(format!("http://{admin}/controller"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        controller_html.contains("<h2>Fleet</h2>"),
        "{controller_html}"
    );
    assert!(controller_html.contains("Rampart internal CA"));

    let shot = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/dashboard.png");
    let _ = std::fs::remove_file(&shot);
    let out = chromium(&[
        format!("--screenshot={}", shot.display()),
        "--window-size=1100,720".into(),
        "--hide-scrollbars".into(),
        "--virtual-time-budget=2000".into(),
    ]);
    assert!(
        shot.exists(),
        "no screenshot: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("dashboard screenshot: {}", shot.display());
}

/// The controller's dashboard from a real `rampart controller` with an enrolled proxy,
/// a discovery provider reporting a bad file and an internal certificate: the fleet
/// (current version), the provider's error, the certificate's days left, and the token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_controller_dashboard_shows_the_fleet_discovery_and_certificates() {
    common::init();
    let backend = Backend::start("web").await;
    let dir = tempfile::tempdir().unwrap();
    let endpoints = dir.path().join("endpoints");
    std::fs::create_dir_all(&endpoints).unwrap();
    std::fs::write(
        endpoints.join("web.toml"),
        format!(
            "[pools.web]\nendpoints = [{{ address = \"{}\" }}]\n",
            backend.addr
        ),
    )
    .unwrap();
    std::fs::write(endpoints.join("broken.toml"), "[pools.web\n").unwrap();
    let token_file = dir.path().join("admin-token");
    std::fs::write(&token_file, "c0ntr0l\n").unwrap();
    let (fleet, admin) = (common::free_addr(), common::free_addr());
    let config = dir.path().join("controller.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\ndata_dir = {:?}\n[controller]\nlisten = \"{fleet}\"\nadmin = \"{admin}\"\nadmin_token_file = {token_file:?}\n\
             [[discovery.files]]\npath = {endpoints:?}\n\
             [[tls]]\nhosts = [\"a.test\"]\nsource = \"internal\"\n\
             [[routes]]\nname = \"web\"\naction = {{ forward = \"web\" }}\n[pools.web]\nendpoints = []\n",
            dir.path().join("data")
        ),
    )
    .unwrap();
    let log = std::fs::File::create(dir.path().join("controller.log")).unwrap();
    let controller = std::process::Command::new(env!("CARGO_BIN_EXE_rampart"))
        .args(["controller", "--config"])
        .arg(&config)
        .stderr(log)
        .spawn()
        .unwrap();
    let _controller = common::pebble::Killed(controller);
    common::wait_controller(admin).await;
    let token = common::join_token(&config);
    let proxy = Proxy::start_fleet(&format!("https://{fleet}"), Some(&token)).await;
    // Traffic through the proxy, which its heartbeats carry to the controller.
    for _ in 0..30 {
        assert_eq!(reqwest::get(proxy.url("/")).await.unwrap().status(), 200);
    }

    let client = reqwest::Client::new();
    let url = |path: &str| format!("http://{admin}{path}");
    assert_eq!(client.get(url("/")).send().await.unwrap().status(), 401);
    assert_eq!(
        client
            .get(url("/api/v1/dashboard"))
            .send()
            .await
            .unwrap()
            .status(),
        401
    );
    assert_eq!(
        client.get(url("/healthz")).send().await.unwrap().status(),
        200
    );
    assert_eq!(
        client.get(url("/metrics")).send().await.unwrap().status(),
        200
    );

    let view: serde_json::Value =
        common::eventually("the proxy to serve the current version", || async {
            let v: serde_json::Value = client
                .get(url("/api/v1/dashboard"))
                .bearer_auth("c0ntr0l")
                .send()
                .await
                .ok()?
                .json()
                .await
                .ok()?;
            let rate = v["traffic"]["rate"].as_f64()?;
            (v["proxies"] == 1 && v["proxies_current"] == 1 && rate >= 0.5).then_some(v)
        })
        .await;
    assert!(
        view["status"]["instances"][0]["traffic"]["rate"]
            .as_f64()
            .unwrap()
            >= 0.5,
        "{view}"
    );
    let errors = view["status"]["discovery"][0]["errors"].as_array().unwrap();
    assert!(
        errors
            .iter()
            .any(|e| e.as_str().unwrap().contains("broken.toml")),
        "{errors:?}"
    );
    let cert = &view["certificates"][0];
    assert_eq!(cert["names"][0], "a.test");
    assert!(
        (88..=90).contains(&cert["days_left"].as_i64().unwrap()),
        "{cert}"
    );

    let html = client
        .get(url("/"))
        .basic_auth("ops", Some("c0ntr0l"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(html.contains("1 of 1 proxies serve it"), "{html}");
    assert!(html.contains("requests/s"));
    assert!(html.contains("broken.toml"));
    assert!(html.contains("data-certificate=\"a.test\""));
    assert!(html.contains("DNS is not managed"));
}

/// An endpoint removed by a reload while a request to it is still streaming shows as
/// draining, in its pool, until the request finishes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_removed_under_a_request_shows_as_draining() {
    common::init();
    let (old, new) = (Backend::start("old").await, Backend::start("new").await);
    let config = |b: &std::sync::Arc<Backend>| {
        format!(
            "[[routes]]\nname = \"all\"\naction = {{ forward = \"p\" }}\n{}",
            common::pool_toml("p", "round_robin", &[b], "")
        )
    };
    let proxy = Proxy::start(&config(&old)).await;
    let slow = tokio::spawn(reqwest::Client::new().get(proxy.url("/slow/3000")).send());
    common::eventually("the slow request to be in flight", || async {
        (old.hits() == 1).then_some(())
    })
    .await;
    proxy.reload(&config(&new)).await;
    let endpoints = |v: serde_json::Value| v["routes"][0]["pool"]["endpoints"].clone();
    let view = proxy.dashboard().await;
    let eps = endpoints(view);
    let draining: Vec<_> = eps
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["draining"] == true)
        .collect();
    assert_eq!(draining.len(), 1, "{eps}");
    assert_eq!(draining[0]["address"], old.addr.to_string());
    assert_eq!(draining[0]["inflight"], 1);
    // The request completes (the old endpoint drains), then it is gone from the view.
    assert_eq!(slow.await.unwrap().unwrap().status(), 200);
    common::eventually("the drained endpoint to leave the view", || async {
        let v: serde_json::Value = reqwest::get(format!("http://{}/api/v1/dashboard", proxy.admin))
            .await
            .ok()?
            .json()
            .await
            .ok()?;
        let eps = endpoints(v);
        (eps.as_array()?.len() == 1 && eps[0]["address"] == new.addr.to_string()).then_some(())
    })
    .await;
}

/// A route split between pools shows every pool, with its weight and endpoints.
#[tokio::test]
async fn a_split_route_shows_each_pool_with_its_weight() {
    common::init();
    let (v1, v2) = (Backend::start("v1").await, Backend::start("v2").await);
    let proxy = Proxy::start(&format!(
        "[[routes]]\nname = \"all\"\naction = {{ forward = [{{ pool = \"v1\", weight = 90 }}, {{ pool = \"v2\", weight = 10 }}] }}\n{}{}",
        common::pool_toml("v1", "round_robin", &[&v1], ""),
        common::pool_toml("v2", "least_conn", &[&v2], "")
    ))
    .await;
    let view = proxy.dashboard().await;
    let pools = view["routes"][0]["pools"].as_array().unwrap().clone();
    let got: Vec<_> = pools
        .iter()
        .map(|p| {
            (
                p["name"].as_str().unwrap().to_string(),
                p["weight"].as_u64().unwrap(),
                p["endpoints"][0]["address"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(
        got,
        [
            ("v1".to_string(), 90, v1.addr.to_string()),
            ("v2".to_string(), 10, v2.addr.to_string())
        ]
    );
    let html = reqwest::get(format!("http://{}/", proxy.admin))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for want in [
        "pool v1 · weight 90 (round_robin)",
        "pool v2 · weight 10 (least_conn)",
        &format!("data-endpoint=\"{}\"", v2.addr),
    ] {
        assert!(html.contains(want), "{want:?} not in the page");
    }
}
