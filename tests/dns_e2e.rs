//! The whole DNS loop: a real `rampart controller` with Route53 (moto) and two real
//! fleet proxies it probes through their HTTPS listeners, default probe settings. One
//! proxy is killed; its record set must go within 15 s, and `rampart dns plan` then
//! shows nothing left to do.
#![allow(missing_docs, clippy::unwrap_used)]

mod common;
#[path = "../controller/tests/support/moto.rs"]
mod moto;

use std::time::{Duration, Instant};

use common::{free_addr, Proxy};

const ZONE: &str = "example.test";
const WWW: &str = "www.example.test";

/// Set identifiers of the A record sets of `www`.
async fn www_sets(client: &aws_sdk_route53::Client, zone_id: &str) -> Vec<String> {
    let out = client
        .list_resource_record_sets()
        .hosted_zone_id(zone_id)
        .send()
        .await
        .unwrap();
    let mut ids: Vec<String> = out
        .resource_record_sets()
        .iter()
        .filter(|r| {
            r.r#type() == &aws_sdk_route53::types::RrType::A
                && r.name().trim_end_matches('.') == WWW
        })
        .filter_map(|r| r.set_identifier().map(str::to_string))
        .collect();
    ids.sort();
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_proxy_leaves_dns_within_fifteen_seconds() {
    common::init();
    let moto = moto::Moto::start().await;
    let zone_id = moto.create_zone(ZONE).await;
    let aws = moto.client().await;

    let dir = tempfile::tempdir().unwrap();
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

[dns]
zone = "{ZONE}"
owner_id = "e2e"
provider = {{ kind = "route53", endpoint_url = "{}" }}

[[dns.names]]
name = "{WWW}"

[[tls]]
hosts = ["{WWW}"]
source = "internal"

[[routes]]
name = "hello"
action = {{ respond = {{ body = "hi" }} }}
"#,
            dir.path().join("data"),
            moto.url
        ),
    )
    .unwrap();
    let rampart = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_rampart"))
            .args(args)
            .arg("--config")
            .arg(&config)
            .envs(aws_env())
            .output()
            .unwrap()
    };
    let token = || common::join_token(&config);
    let log = std::fs::File::create(dir.path().join("controller.log")).unwrap();
    let mut controller = std::process::Command::new(env!("CARGO_BIN_EXE_rampart"))
        .args(["controller", "--config"])
        .arg(&config)
        .envs(aws_env())
        .stderr(log)
        .spawn()
        .unwrap();
    common::wait_controller(admin).await;
    let url = format!("https://{fleet}");
    let public = ["--public-addr", "127.0.0.1"];
    let p1 = Proxy::start_fleet_with(&url, Some(&token()), &public).await;
    let mut p2 = Proxy::start_fleet_with(&url, Some(&token()), &public).await;

    let up = Instant::now();
    while www_sets(&aws, &zone_id).await.len() != 2 {
        assert!(
            up.elapsed() < Duration::from_secs(30),
            "both proxies not in DNS after 30s; status:\n{}\ncontroller log:\n{}",
            reqwest::get(format!("http://{admin}/status"))
                .await
                .unwrap()
                .text()
                .await
                .unwrap(),
            std::fs::read_to_string(dir.path().join("controller.log")).unwrap()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!(
        "2 proxies published {:.2}s after the second was ready",
        up.elapsed().as_secs_f64()
    );
    // The controller's dashboard shows the name owned, in sync, with the proxies' address.
    common::eventually("the dashboard to show the name in sync", || async {
        let v: serde_json::Value = reqwest::get(format!("http://{admin}/api/v1/dashboard"))
            .await
            .ok()?
            .json()
            .await
            .ok()?;
        let name = v["status"]["dns"]["names"].as_array()?.first()?.clone();
        (name["drift"] == false
            && name["actual"] == serde_json::json!(["127.0.0.1"])
            && name["owners"].as_array().is_some_and(|o| o.len() == 1))
        .then_some(())
    })
    .await;

    // Each proxy's record set is named by its instance id.
    let instance =
        |status: serde_json::Value| status["fleet"]["instance"].as_str().unwrap().to_string();
    let (id1, id2) = (instance(p1.status().await), instance(p2.status().await));
    let mut both = vec![id1.clone(), id2.clone()];
    both.sort();
    assert_eq!(www_sets(&aws, &zone_id).await, both);

    // Kill one proxy: no more heartbeats, no more answers to the probe.
    let killed = Instant::now();
    p2.kill();
    let deadline = Duration::from_secs(15);
    loop {
        if www_sets(&aws, &zone_id).await.len() == 1 {
            break;
        }
        assert!(
            killed.elapsed() < deadline,
            "the killed proxy is still in DNS after {deadline:?}; controller log:\n{}",
            std::fs::read_to_string(dir.path().join("controller.log")).unwrap()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!(
        "killed proxy left DNS after {:.2}s (default probe: 2s x 3)",
        killed.elapsed().as_secs_f64()
    );
    // The set that remains is the surviving proxy's, not the killed one's.
    assert_eq!(
        www_sets(&aws, &zone_id).await,
        vec![id1.clone()],
        "killed: {id2}"
    );

    // Nothing left to do, and the plan says which instance is published.
    let out = rampart(&["dns", "plan"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("No changes"), "{text}");
    assert!(
        text.contains("1 of 2 instances ready") || text.contains("1 of 1 instances ready"),
        "{text}"
    );
    // The metrics carry the convergence time.
    let metrics = common::fetch(&format!("http://{admin}/metrics")).await;
    assert!(
        metrics.contains("rampart_dns_convergence_seconds_count"),
        "{metrics}"
    );
    assert!(
        metrics.contains("rampart_dns_records{name=\"www.example.test\"} 1"),
        "{metrics}"
    );
    drop(p1);
    let _ = controller.kill();
    let _ = controller.wait();
}

/// Test credentials for moto, and no instance metadata lookups (they would leave the
/// machine).
fn aws_env() -> Vec<(&'static str, &'static str)> {
    vec![
        ("AWS_ACCESS_KEY_ID", "testing"),
        ("AWS_SECRET_ACCESS_KEY", "testing"),
        ("AWS_REGION", "us-east-1"),
        ("AWS_EC2_METADATA_DISABLED", "true"),
    ]
}
