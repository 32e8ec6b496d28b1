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
    assert!(body.starts_with("<section id=\"overview\">"), "{body}");
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
