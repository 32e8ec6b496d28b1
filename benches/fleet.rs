//! Fleet benchmarks (issue 5 targets), run with `cargo bench --bench fleet`:
//!
//! 1. 10,000 routes and 50,000 endpoints: snapshot build + encode on the controller,
//!    decode + validate + build + swap on the proxy, and the proxy memory it takes.
//! 2. 100 proxies (fleet clients in this process, each with its own mTLS connection)
//!    watching a real controller: time from an endpoint file change until each proxy
//!    has the new snapshot, over 20 changes.
//!
//! Prints a report; asserts nothing about speed (see loadtest/README.md for results).
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rampart_config::snapshot::Snapshot;
use rampart_config::Config;
use rampart_controller::compile::Compiler;
use rampart_proxy::fleet::client::{self, FleetClient, WatchResult};

/// The allocator of the `rampart` binary, so that figures match what it does.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const ROUTES: usize = 10_000;
const POOLS: usize = 1_000;
const PER_POOL: usize = 50;
const WATCHERS: usize = 100;
const CHANGES: usize = 20;

fn big_config() -> Config {
    let mut text = String::from("[listeners]\nhttp = \"127.0.0.1:1\"\n");
    for i in 0..ROUTES {
        let _ = write!(
            text,
            "[[routes]]\nname = \"r{i}\"\nhosts = [\"r{i}.example.com\"]\npath_prefix = \"/api/{}\"\naction = {{ forward = \"p{}\" }}\n",
            i % 7,
            i % POOLS
        );
    }
    for p in 0..POOLS {
        let _ = write!(
            text,
            "[pools.p{p}]\nbalance = \"least_conn\"\nendpoints = ["
        );
        for e in 0..PER_POOL {
            let n = p * PER_POOL + e;
            let _ = write!(
                text,
                "{{ address = \"10.{}.{}.{}:8080\" }},",
                n / 65536,
                (n / 256) % 256,
                n % 256
            );
        }
        text.push_str("]\n");
    }
    rampart_config::parse(&text, "bench").unwrap()
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
        .unwrap()
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

fn scale() {
    let config = big_config();
    let dir = tempfile::tempdir().unwrap();
    let ca = rampart_pki::Ca::load_or_create(&dir.path().join("ca"), "bench").unwrap();
    let mut compiler = Compiler::new(ca);
    let mut build = Vec::new();
    let mut body = Vec::new();
    for v in 1..=5 {
        let t = Instant::now();
        let snap = compiler.compile(&config, &[], v).unwrap();
        body = serde_json::to_vec(&snap).unwrap();
        build.push(t.elapsed());
    }
    build.sort();

    let mut local = Config::default();
    local.listeners.http = Some("127.0.0.1:1".parse().unwrap());
    local.server.data_dir = dir.path().join("proxy");
    let live = rampart_proxy::live::Live::start_fleet(local, None).unwrap();
    let before = rss_kib();
    let mut apply = Vec::new();
    let mut order = Vec::new();
    for round in 0..5u64 {
        let t = Instant::now();
        let mut snap: Snapshot = serde_json::from_slice(&body).unwrap();
        snap.version = 10 + round;
        live.apply_snapshot(snap).unwrap();
        apply.push(t.elapsed());
        order.push(format!("{:.0}", t.elapsed().as_secs_f64() * 1e3));
    }
    apply.sort();
    let after = rss_kib();
    // Where the proxy's time goes (one more run, phase by phase).
    let t = Instant::now();
    let mut snap: Snapshot = serde_json::from_slice(&body).unwrap();
    let decode = t.elapsed();
    snap.version = 100;
    let t = Instant::now();
    let (cfg, bundles) = snap.into_config(&live.current.load().config).unwrap();
    let validate = t.elapsed();
    let t = Instant::now();
    let generation = live
        .builder
        .build_with(cfg, &bundles, 100, Some(&live.current.load()))
        .unwrap();
    let build_gen = t.elapsed();
    drop(generation);
    println!(
        "## Snapshot scale: {ROUTES} routes, {} endpoints",
        POOLS * PER_POOL
    );
    println!("- encoded snapshot: {:.1} MB", body.len() as f64 / 1e6);
    println!(
        "- controller build + encode: median {:.1} ms, max {:.1} ms (5 runs)",
        build[2].as_secs_f64() * 1e3,
        build[4].as_secs_f64() * 1e3
    );
    println!(
        "- proxy decode + validate + build + swap: median {:.1} ms, max {:.1} ms (5 runs, in order: {} ms; the first also creates each route's metric handles)",
        apply[2].as_secs_f64() * 1e3,
        apply[4].as_secs_f64() * 1e3,
        order.join(", ")
    );
    println!(
        "  - phases: decode {:.1} ms, validate {:.1} ms, build {:.1} ms",
        decode.as_secs_f64() * 1e3,
        validate.as_secs_f64() * 1e3,
        build_gen.as_secs_f64() * 1e3
    );
    println!(
        "- proxy RSS growth holding that generation: {:.0} MB (mimalloc, after 5 swaps)",
        after.saturating_sub(before) as f64 / 1024.0
    );
}

async fn push() {
    let dir = tempfile::tempdir().unwrap();
    let endpoints = dir.path().join("endpoints");
    std::fs::create_dir_all(&endpoints).unwrap();
    let write = |n: usize| {
        let tmp = endpoints.join("web.tmp");
        std::fs::write(
            &tmp,
            format!(
                "[pools.web]\nendpoints = [{{ address = \"127.0.0.1:{}\" }}]\n",
                1000 + n
            ),
        )
        .unwrap();
        std::fs::rename(&tmp, endpoints.join("web.toml")).unwrap();
    };
    write(0);
    let config_path = dir.path().join("controller.toml");
    std::fs::write(
        &config_path,
        format!(
            "[server]\ndata_dir = {:?}\n[controller]\nlisten = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\n[[discovery.files]]\npath = {endpoints:?}\n[[routes]]\nname = \"all\"\naction = {{ forward = \"web\" }}\n[pools.web]\n",
            dir.path().join("data")
        ),
    )
    .unwrap();
    let config = rampart_config::load(&config_path).unwrap();
    let handle = rampart_controller::start(config.clone(), None)
        .await
        .unwrap();
    let url = format!("https://{}", handle.fleet_addr);
    while handle.state.fleet.version() == 0 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let received: Arc<Vec<AtomicU64>> =
        Arc::new((0..WATCHERS).map(|_| AtomicU64::new(0)).collect());
    let epoch = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..WATCHERS {
        let token = rampart_controller::create_token(&config, Duration::from_secs(600), false)
            .await
            .unwrap();
        let id = client::enroll(&url, &token, "bench").await.unwrap();
        let c = FleetClient::new(&url, id, Duration::from_secs(30)).unwrap();
        let received = received.clone();
        tasks.push(tokio::spawn(async move {
            let mut seen = 0;
            loop {
                if let Ok(WatchResult::Snapshot { version, .. }) = c.watch(seen).await {
                    seen = version;
                    // Store the arrival time (µs since epoch) with the version in the high bits.
                    let at = u64::try_from(epoch.elapsed().as_micros()).unwrap();
                    received[i].store((version << 40) | at, Ordering::Release);
                }
            }
        }));
    }
    let current = || handle.state.fleet.version();
    let all_at = |v: u64| {
        received
            .iter()
            .all(|r| r.load(Ordering::Acquire) >> 40 >= v)
    };
    let v0 = current();
    while !all_at(v0) {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let (mut total, mut push) = (Vec::new(), Vec::new());
    for n in 1..=CHANGES {
        let before = current();
        let t0 = Instant::now();
        write(n);
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut published = None;
        loop {
            let v = current();
            if v > before && published.is_none() {
                published = Some((v, t0.elapsed()));
            }
            if let Some((v, _)) = published {
                if all_at(v) {
                    break;
                }
            }
            assert!(
                Instant::now() < deadline,
                "change {n} did not reach every watcher: controller at {}, published {published:?}, discovery {:?}, slowest watcher at {}",
                current(),
                handle.state.status().discovery,
                received.iter().map(|r| r.load(Ordering::Acquire) >> 40).min().unwrap_or(0)
            );
            tokio::time::sleep(Duration::from_micros(500)).await;
        }
        let (v, publish_after) = published.unwrap();
        let t0_us = u64::try_from((t0 - epoch).as_micros()).unwrap();
        for r in received.iter() {
            let x = r.load(Ordering::Acquire);
            assert!(x >> 40 >= v);
            let at = Duration::from_micros((x & ((1 << 40) - 1)).saturating_sub(t0_us));
            total.push(at);
            push.push(at.saturating_sub(publish_after));
        }
    }
    total.sort();
    push.sort();
    println!(
        "\n## Endpoint change → {WATCHERS} watching proxies ({CHANGES} changes, {} samples)",
        total.len()
    );
    println!(
        "- file written → snapshot received: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms (includes the file provider's event settle)",
        percentile(&total, 0.5).as_secs_f64() * 1e3,
        percentile(&total, 0.99).as_secs_f64() * 1e3,
        percentile(&total, 1.0).as_secs_f64() * 1e3
    );
    println!(
        "- snapshot published → received: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        percentile(&push, 0.5).as_secs_f64() * 1e3,
        percentile(&push, 0.99).as_secs_f64() * 1e3,
        percentile(&push, 1.0).as_secs_f64() * 1e3
    );
    for t in tasks {
        t.abort();
    }
    handle.shutdown().await;
}

fn main() {
    rampart_proxy::install_crypto_provider();
    if std::env::args().all(|a| a != "--push-only") {
        scale();
    }
    if std::env::args().any(|a| a == "--scale-only") {
        return;
    }
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(push());
}
