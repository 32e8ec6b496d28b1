//! What the access log costs per request, on the request's own thread: the end of a
//! proxied request ([`rampart_proxy::access::finish`]) with the log on (what the
//! request path takes of the request, the JSON line, the hand-off to the writer) minus
//! the same end with the log off, lines written to `/dev/null`. Run with
//! `cargo bench --bench access_log`.
//!
//! Prints nanoseconds per request; asserts nothing about speed (see loadtest/README.md,
//! "The access log's cost", for what it is against a whole request).
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rampart_proxy::access::{self, Arrival, Outcome};
use rampart_proxy::edge::Scheme;
use rampart_proxy::generation::{Builder, Generation};
use rampart_proxy::metrics::Metrics;
use rampart_proxy::policy::Trace;

/// The allocator of the `rampart` binary, so that figures match what it does.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const REQUESTS: u32 = 300_000;
const ROUNDS: usize = 5;

fn generation(dir: &std::path::Path, log: bool) -> (Generation, Arc<Metrics>) {
    let access_log = if log {
        // To /dev/null: the writer thread's own cost (the page cache copy) is the
        // loadtest's to measure; here it would only add noise to the request's thread.
        "[access_log]\npath = \"/dev/null\"\nbuffer = 1000000\n\n".to_string()
    } else {
        String::new()
    };
    let text = format!(
        "{access_log}[listeners]\nhttp = \"127.0.0.1:1\"\n\n\
         [[routes]]\nname = \"app\"\nhosts = [\"app.example.com\"]\naction = {{ forward = \"p\" }}\n\n\
         [pools.p]\nendpoints = [{{ address = \"127.0.0.1:8080\" }}]\n"
    );
    let config = rampart_config::parse(&text, "bench.toml").expect("config");
    let metrics = Arc::new(Metrics::new());
    let builder = Builder::new(dir.to_path_buf(), metrics.clone());
    (builder.build(config, 1, None).expect("generation"), metrics)
}

/// Nanoseconds per request of `REQUESTS` request ends on `generation`.
fn per_request(generation: &Generation, metrics: &Metrics) -> f64 {
    let request = http::Request::get("/api/orders/12345?page=2&sort=desc")
        .header("host", "app.example.com")
        .header(
            "user-agent",
            "Mozilla/5.0 (X11; Linux x86_64) Firefox/133.0",
        )
        .header("accept", "*/*")
        .body(())
        .unwrap();
    let (parts, ()) = request.into_parts();
    let peer = Some(IpAddr::V4(Ipv4Addr::new(203, 0, 113, 7)));
    let pool = generation.routes[0].pool.clone().unwrap();
    let request_id = b"0b7e6a52-3c5f-4a8e-9d1e-6f1c2b3a4d5e";
    let started = Instant::now();
    for _ in 0..REQUESTS {
        let begun = Instant::now();
        let trace = Trace::of(&parts.headers, false, None);
        let arrival = Arrival::of(generation, black_box(&parts), peer, Some(0), Some(trace));
        let outcome = Outcome {
            status: 200,
            route: Some(0),
            request_id: Some(request_id),
            upstream: Some((&pool, 0)),
            upstream_status: Some(200),
            upstream_connect: Some(Duration::ZERO),
            upstream_ttfb: Some(Duration::from_micros(230)),
            attempts: 1,
            fast_path: true,
            bytes_sent: Some(5),
            trace: Some(trace),
            ..Outcome::default()
        };
        access::finish(
            generation,
            metrics,
            Scheme::Http,
            peer,
            arrival.as_deref(),
            &outcome,
            begun,
        );
    }
    started.elapsed().as_secs_f64() * 1e9 / f64::from(REQUESTS)
}

fn main() {
    let dir = tempfile::tempdir().unwrap();
    let (off, off_metrics) = generation(dir.path(), false);
    let (on, on_metrics) = generation(dir.path(), true);
    let mut costs = Vec::new();
    for round in 1..=ROUNDS {
        let without = per_request(&off, &off_metrics);
        let with = per_request(&on, &on_metrics);
        println!("round {round}: request end {without:.0} ns without the log, {with:.0} ns with it: the log costs {:.0} ns", with - without);
        costs.push(with - without);
    }
    costs.sort_by(f64::total_cmp);
    println!(
        "access log, JSON, every request: median {:.0} ns per request on the request's thread ({} requests x {ROUNDS} rounds)",
        costs[costs.len() / 2],
        REQUESTS
    );
}
