//! `rampart-loadtest compare`: Rampart against nginx, HAProxy and Caddy on the same
//! machine in the same run. Every target gets the same certificate, routes, keep-alive
//! upstreams and worker count; the suite runs interleaved in rounds (each round runs
//! every target once per test) so that machine noise hits all alike, and the report
//! gives medians, CPU seconds per 100k requests (from /proc) and peak RSS.

pub mod peers;
mod report;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde::Serialize;

use crate::backend::BackendProcess;
use crate::client::{Target, Trust};
use crate::procstat;
use crate::run::{run, RunConfig, RunReport};
use peers::{Cert, Kind, Running, Upstreams, HOST};

/// Arguments of `compare`.
#[derive(Debug, clap::Args)]
pub struct CompareArgs {
    /// Peers to compare with (found on PATH), comma-separated; "" for Rampart alone.
    #[arg(long, default_value = "nginx,haproxy,caddy", value_delimiter = ',')]
    pub peers: Vec<String>,
    /// Rounds; each runs every test on every target once.
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// Duration of each measurement.
    #[arg(long, value_parser = crate::parse_duration, default_value = "5s")]
    pub duration: Duration,
    /// Connections of the closed-loop tests.
    #[arg(long, default_value_t = 32)]
    pub connections: usize,
    /// Rate of the open-loop tests (requests/s).
    #[arg(long, default_value_t = 2000.0)]
    pub rate: f64,
    /// Worker processes/threads of every proxy.
    #[arg(long, default_value_t = 1)]
    pub workers: usize,
    /// Tests to run (default: all of them), comma-separated.
    #[arg(long, value_delimiter = ',', default_values_t = Test::ALL)]
    pub tests: Vec<Test>,
    /// Idle keep-alive TLS connections held open to measure memory (0 skips).
    #[arg(long, default_value_t = 10_000)]
    pub idle_conns: usize,
    /// The idle connections speak HTTP/2 (each after one request) instead of HTTP/1.1.
    #[arg(long)]
    pub idle_h2: bool,
    /// The rampart binary (default: next to this one, then PATH).
    #[arg(long)]
    pub rampart: Option<PathBuf>,
    /// Every target writes an access log line per request to a file (nginx: its
    /// combined format; Rampart: `json`, the default, or `combined` like nginx's); only
    /// Rampart and nginx are compared then, and each runs beside itself without its
    /// log (`rampart-unlogged`, `nginx-unlogged`), so that the report gives each log's
    /// cost measured in the same run.
    #[arg(long, num_args = 0..=1, default_missing_value = "json")]
    pub access_log: Option<LogFormat>,
    /// Write the results as JSON.
    #[arg(long)]
    pub json: PathBuf,
    /// Write the markdown table (and an SVG of latency curves beside it).
    #[arg(long)]
    pub markdown: PathBuf,
}

/// Rampart's access log format under `--access-log`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// One JSON object per line (Rampart's default).
    Json,
    /// nginx's combined format, the same lines nginx writes.
    Combined,
}

/// One test of the suite.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Test {
    /// Plain HTTP/1.1 keep-alive.
    Http,
    /// HTTPS keep-alive.
    HttpsKeepalive,
    /// HTTPS, a new connection (full handshake) per request.
    HttpsNewConn,
    /// HTTPS, a new connection per request that resumes its TLS session by ticket
    /// (a returning browser).
    HttpsResumed,
    /// HTTP/2 over TLS, one stream at a time per connection.
    H2,
    /// HTTP/2 over TLS, 10 streams in flight per connection (h2load -m10: what a
    /// browser loading a page does).
    #[value(name = "h2-m10")]
    H2M10,
    /// HTTP/2 over TLS, 100 connections × 100 streams in flight (h2load -c100 -m100).
    #[value(name = "h2-c100-m100")]
    H2C100M100,
    /// HTTP/2 over TLS (-m10) to a backend that speaks HTTP/2 too (h2c): Rampart's
    /// `protocol = "h2c"` pool, nginx's `grpc_pass`, HAProxy's `proto h2`.
    #[value(name = "h2-upstream")]
    H2Upstream,
    /// gRPC unary calls over TLS (-m10, as ghz loads a service) to an h2c backend.
    #[value(name = "grpc-unary")]
    GrpcUnary,
    /// 16 KiB response body over HTTP/1.1.
    #[value(name = "body-16k")]
    Body16k,
    /// A 100 KiB HTML page over HTTP/1.1 to a client that accepts gzip, br and zstd:
    /// compressed with gzip at nginx's default level (1) by every target.
    #[value(name = "gzip-100k")]
    Gzip100k,
    /// Open loop at a fixed rate over HTTPS keep-alive: tail latency.
    OpenLoop,
    /// Open loop at the same fixed rate over plain HTTP/1.1 keep-alive: CPU per
    /// request at equal throughput (what a feature costs, without a closed loop's
    /// effect of a slower server finding its peers asleep more often).
    #[value(name = "open-loop-http")]
    OpenLoopHttp,
}

impl Test {
    /// Every test, in the order a round runs them.
    pub const ALL: [Test; 13] = [
        Test::Http,
        Test::HttpsKeepalive,
        Test::HttpsNewConn,
        Test::HttpsResumed,
        Test::H2,
        Test::H2M10,
        Test::H2C100M100,
        Test::H2Upstream,
        Test::GrpcUnary,
        Test::Body16k,
        Test::Gzip100k,
        Test::OpenLoop,
        Test::OpenLoopHttp,
    ];

    /// Name in reports.
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Test::Http => "http",
            Test::HttpsKeepalive => "https-keepalive",
            Test::HttpsNewConn => "https-new-conn",
            Test::HttpsResumed => "https-resumed",
            Test::H2 => "h2",
            Test::H2M10 => "h2-m10",
            Test::H2C100M100 => "h2-c100-m100",
            Test::H2Upstream => "h2-upstream",
            Test::GrpcUnary => "grpc-unary",
            Test::Body16k => "body-16k",
            Test::Gzip100k => "gzip-100k",
            Test::OpenLoop => "open-loop",
            Test::OpenLoopHttp => "open-loop-http",
        }
    }

    fn needs_tls(self) -> bool {
        matches!(
            self,
            Test::HttpsKeepalive
                | Test::HttpsNewConn
                | Test::HttpsResumed
                | Test::H2
                | Test::H2M10
                | Test::H2C100M100
                | Test::H2Upstream
                | Test::GrpcUnary
                | Test::OpenLoop
        )
    }

    fn is_h2(self) -> bool {
        matches!(
            self,
            Test::H2 | Test::H2M10 | Test::H2C100M100 | Test::H2Upstream | Test::GrpcUnary
        )
    }

    /// Whether the target forwards it to the HTTP/2 (h2c) backend.
    fn h2_upstream(self) -> bool {
        matches!(self, Test::H2Upstream | Test::GrpcUnary)
    }

    /// HTTP/2 streams in flight per connection.
    fn streams(self) -> usize {
        match self {
            Test::H2M10 | Test::H2Upstream | Test::GrpcUnary => 10,
            Test::H2C100M100 => 100,
            _ => 1,
        }
    }
}

impl std::fmt::Display for Test {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// One measurement.
#[derive(Clone, Debug, Serialize)]
pub struct Sample {
    /// Round number.
    pub round: usize,
    /// Target.
    pub target: Kind,
    /// Test.
    pub test: Test,
    /// Load generator report.
    pub report: RunReport,
    /// CPU seconds the target used during the measurement.
    pub cpu_s: f64,
    /// CPU seconds per 100k successful requests.
    pub cpu_per_100k: f64,
    /// The backend's CPU seconds per 100k successful requests (what the target costs
    /// the service behind it: connections, header volume, write sizes).
    pub backend_cpu_per_100k: f64,
    /// TCP connections opened on the machine during the measurement (the client's and
    /// the target's to the backend).
    pub tcp_opens: u64,
}

/// Everything `compare` measured.
#[derive(Debug, Serialize)]
pub struct Results {
    /// When (UTC, RFC 3339-ish from the system clock).
    pub date: String,
    /// CPUs of the machine.
    pub cpus: usize,
    /// The arguments that matter.
    pub command: String,
    /// Version string per target.
    pub versions: BTreeMap<String, String>,
    /// Every measurement.
    pub samples: Vec<Sample>,
    /// Peak RSS (kB) per target over the run.
    pub peak_rss_kb: BTreeMap<String, u64>,
    /// RSS (kB) per target while holding the idle connections, and how many were open.
    pub idle_rss_kb: BTreeMap<String, (u64, usize)>,
    /// Whether the idle connections spoke HTTP/2.
    pub idle_h2: bool,
}

/// Runs `compare`.
///
/// # Errors
/// When a target cannot be started or a file cannot be written.
pub fn main(args: &CompareArgs) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let results = rt.block_on(compare(args))?;
    std::fs::write(&args.json, serde_json::to_vec_pretty(&results)?)
        .with_context(|| format!("writing {}", args.json.display()))?;
    let svg = args.markdown.with_extension("svg");
    report::latency_svg(&results, &svg)?;
    let md = report::markdown(
        &results,
        svg.file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("latency.svg"),
    );
    std::fs::write(&args.markdown, &md)
        .with_context(|| format!("writing {}", args.markdown.display()))?;
    println!("{md}");
    Ok(())
}

async fn compare(args: &CompareArgs) -> anyhow::Result<Results> {
    let dir = tempfile::tempdir()?;
    let cert = Cert::generate(dir.path())?;
    let small_backend = BackendProcess::spawn(13)?;
    let big_backend = BackendProcess::spawn(16 * 1024)?;
    let h2c_backend = BackendProcess::spawn_with(13, true)?;
    let html_backend = BackendProcess::spawn_html(100 * 1024)?;
    let (small, big, h2c) = (small_backend.addr, big_backend.addr, h2c_backend.addr);
    let up = Upstreams {
        small,
        big,
        h2c,
        html: html_backend.addr,
        compress: args.tests.contains(&Test::Gzip100k),
    };
    let rampart = crate::scenario::rampart_binary(args.rampart.clone());

    let mut kinds = vec![Kind::Rampart];
    if args.access_log.is_some() {
        kinds.push(Kind::RampartUnlogged);
    }
    for p in args.peers.iter().filter(|p| !p.is_empty()) {
        let kind = Kind::peer(p)?;
        if args.access_log.is_some() && kind != Kind::Nginx {
            eprintln!("--access-log: {p} left out (its log is not configured to a file here)");
            continue;
        }
        kinds.push(kind);
        if args.access_log.is_some() {
            // nginx's own log cost, measured the same way, for scale.
            kinds.push(Kind::NginxUnlogged);
        }
    }
    let mut targets = Vec::new();
    for kind in kinds {
        let t = peers::start(
            kind,
            dir.path(),
            &up,
            &cert,
            args.workers,
            &rampart,
            args.access_log,
        )?;
        wait_ready(&t).await.with_context(|| {
            format!(
                "{} did not start; see {}",
                kind.name(),
                dir.path().join(kind.name()).join("stderr.log").display()
            )
        })?;
        targets.push(t);
    }
    let mut versions: BTreeMap<String, String> = targets
        .iter()
        .map(|t| (t.kind.name().to_string(), t.version.clone()))
        .collect();
    versions.insert("direct".into(), "rampart-loadtest backend (hyper)".into());

    let mut samples = Vec::new();
    let trust = Trust::CaFile(cert.ca.clone());
    for round in 0..args.rounds {
        for &test in &args.tests {
            // Rotate the order each round so no target always runs first.
            let mut order: Vec<Option<&Running>> = std::iter::once(None)
                .chain(targets.iter().map(Some))
                .collect();
            let n = order.len();
            order.rotate_left(round % n);
            for target in order {
                let backend = if test == Test::Body16k {
                    big_backend.child.id()
                } else if test == Test::Gzip100k {
                    html_backend.child.id()
                } else if test.h2_upstream() {
                    h2c_backend.child.id()
                } else {
                    small_backend.child.id()
                };
                let (kind, pid) = match target {
                    // The direct backend speaks plain HTTP only.
                    None if test.needs_tls() => continue,
                    None => (Kind::Direct, backend),
                    Some(t) => (t.kind, t.child.id()),
                };
                let cfg = run_config(args, test, target, &up, &trust)?;
                let cpu_before = procstat::cpu_seconds(pid);
                let backend_before = procstat::cpu_seconds(backend);
                let opens_before = procstat::tcp_active_opens();
                let started = Instant::now();
                let (stats, elapsed) = run(cfg.clone()).await?;
                let cpu_s = procstat::cpu_seconds(pid) - cpu_before;
                let backend_cpu_s = procstat::cpu_seconds(backend) - backend_before;
                let tcp_opens = procstat::tcp_active_opens().saturating_sub(opens_before);
                let report = RunReport::new(
                    &cfg,
                    &format!("{} {}", kind.name(), test.name()),
                    &stats,
                    elapsed,
                );
                #[allow(clippy::cast_precision_loss)]
                let per_100k = |cpu: f64| {
                    if stats.ok > 0 {
                        cpu / stats.ok as f64 * 100_000.0
                    } else {
                        f64::NAN
                    }
                };
                let (cpu_per_100k, backend_cpu_per_100k) =
                    (per_100k(cpu_s), per_100k(backend_cpu_s));
                eprintln!("round {} {:>16} {:>8}: {:>9.0} req/s  p99 {:>8.3} ms  cpu/100k {:>6.2}s  backend {:>5.2}s  tcp opens {tcp_opens}  errors {}  ({:.1}s)", round + 1, test.name(), kind.name(), report.rps, report.latency_ms.p99, cpu_per_100k, backend_cpu_per_100k, report.errors.total(), started.elapsed().as_secs_f64());
                samples.push(Sample {
                    round,
                    target: kind,
                    test,
                    report,
                    cpu_s,
                    cpu_per_100k,
                    backend_cpu_per_100k,
                    tcp_opens,
                });
            }
        }
    }
    let mut peak_rss_kb: BTreeMap<String, u64> = targets
        .iter()
        .map(|t| {
            (
                t.kind.name().to_string(),
                procstat::peak_rss_kb(t.child.id()),
            )
        })
        .collect();
    peak_rss_kb.insert(
        "direct".into(),
        procstat::peak_rss_kb(small_backend.child.id()),
    );
    let mut idle_rss_kb = BTreeMap::new();
    if args.idle_conns > 0 {
        for t in &targets {
            let (rss, open) = idle_rss(t, args.idle_conns, args.idle_h2, &cert).await;
            eprintln!(
                "{:>8}: {open} idle TLS connections ({}), RSS {:.1} MB",
                t.kind.name(),
                if args.idle_h2 { "h2" } else { "HTTP/1.1" },
                rss as f64 / 1024.0
            );
            idle_rss_kb.insert(t.kind.name().to_string(), (rss, open));
        }
    }
    Ok(Results {
        date: now_utc(),
        cpus: std::thread::available_parallelism().map_or(1, usize::from),
        command: std::env::args().collect::<Vec<_>>().join(" "),
        versions,
        samples,
        peak_rss_kb,
        idle_rss_kb,
        idle_h2: args.idle_h2,
    })
}

/// Waits until `t` answers a plain-HTTP request.
async fn wait_ready(t: &Running) -> anyhow::Result<()> {
    let target = Target {
        addr: t.http,
        host: HOST.into(),
        authority: HOST.into(),
        path: "/".into(),
        tls: false,
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(io) = crate::client::Transport::connect(&target, None).await {
            let mut h1 = crate::client::H1::new(io);
            let req = crate::client::h1_request(&target, &[], false);
            if let Ok(Ok(ex)) =
                tokio::time::timeout(Duration::from_secs(2), h1.exchange(&req)).await
            {
                if ex.status == 200 {
                    return Ok(());
                }
            }
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "no answer on {} within 20 s",
            t.http
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The load of `test` against `target` (`None`: the direct backend).
fn run_config(
    args: &CompareArgs,
    test: Test,
    target: Option<&Running>,
    up: &Upstreams,
    trust: &Trust,
) -> anyhow::Result<RunConfig> {
    let (addr, tls) = match target {
        None if test == Test::Body16k => (up.big, false),
        None if test == Test::Gzip100k => (up.html, false),
        None => (up.small, false),
        Some(t) if test.needs_tls() => (t.https.context("no HTTPS listener")?, true),
        Some(t) => (t.http, false),
    };
    let path = match test {
        Test::Body16k if target.is_some() => "/big",
        Test::Gzip100k => "/html",
        Test::H2Upstream => "/h2up",
        Test::GrpcUnary => "/bench.Echo/Say",
        _ => "/",
    };
    Ok(RunConfig {
        target: Target {
            addr,
            host: HOST.into(),
            authority: HOST.into(),
            path: path.into(),
            tls,
        },
        connections: match test {
            Test::HttpsNewConn | Test::HttpsResumed => args.connections.min(16),
            Test::H2C100M100 => 100,
            _ => args.connections,
        },
        rate: matches!(test, Test::OpenLoop | Test::OpenLoopHttp).then_some(args.rate),
        duration: args.duration,
        h2: test.is_h2(),
        streams: test.streams(),
        new_conn: matches!(test, Test::HttpsNewConn | Test::HttpsResumed),
        resume: test == Test::HttpsResumed,
        // A verifying client spends more per handshake than the server (checking a
        // P-256 signature costs more than making one) and would be the bottleneck of
        // every target alike; the handshake test measures the servers.
        trust: if matches!(test, Test::HttpsNewConn | Test::HttpsResumed) {
            Trust::Unverified
        } else {
            trust.clone()
        },
        headers: match test {
            Test::GrpcUnary => vec![("content-type".into(), "application/grpc".into())],
            // What browsers send (the direct backend ignores it: the uncompressed size).
            Test::Gzip100k => vec![("accept-encoding".into(), "gzip, deflate, br, zstd".into())],
            _ => Vec::new(),
        },
        timeout: Duration::from_secs(10),
        progress: false,
        stop: None,
    })
}

/// Opens up to `n` idle keep-alive TLS connections (each after one request, over
/// HTTP/2 when `h2`) to `t` and reads its RSS while they are open. Returns (RSS kB,
/// connections opened).
async fn idle_rss(t: &Running, n: usize, h2: bool, cert: &Cert) -> (u64, usize) {
    let Some(https) = t.https else { return (0, 0) };
    let Ok(tls) = crate::client::tls_config(&Trust::CaFile(cert.ca.clone()), h2, true) else {
        return (0, 0);
    };
    let target = Target {
        addr: https,
        host: HOST.into(),
        authority: HOST.into(),
        path: "/".into(),
        tls: true,
    };
    let req = crate::client::h1_request(&target, &[], false);
    let mut open = Vec::with_capacity(n);
    let mut batch = tokio::task::JoinSet::new();
    for _ in 0..n {
        let (target, tls, req) = (target.clone(), tls.clone(), req.clone());
        batch.spawn(async move {
            let io = crate::client::Transport::connect(&target, Some(&tls))
                .await
                .ok()?;
            if h2 {
                let mut conn = crate::client::H2::handshake(io, &target, &[]).await.ok()?;
                conn.exchange().await.ok()?;
                return Some(Idle::H2(conn));
            }
            let mut h1 = crate::client::H1::new(io);
            h1.exchange(&req).await.ok()?;
            Some(Idle::H1(h1))
        });
        // Bounded concurrency: at most 256 handshakes in flight.
        if batch.len() >= 256 {
            if let Some(Ok(Some(c))) = batch.join_next().await {
                open.push(c);
            }
        }
    }
    while let Some(r) = batch.join_next().await {
        if let Ok(Some(c)) = r {
            open.push(c);
        }
    }
    let rss = procstat::rss_kb(t.child.id());
    (rss, open.len())
}

/// An idle connection held open while the target's memory is read.
enum Idle {
    H1(#[allow(dead_code)] crate::client::H1),
    H2(#[allow(dead_code)] crate::client::H2),
}

/// The current UTC time as "YYYY-MM-DD HH:MM:SS UTC".
fn now_utc() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let days = i64::try_from(secs / 86_400).unwrap_or(0);
    let rem = secs % 86_400;
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::Test;
    use clap::ValueEnum;

    #[test]
    fn every_test_is_selected_by_its_report_name() {
        for test in Test::ALL {
            assert_eq!(Test::from_str(test.name(), false), Ok(test));
        }
    }
}
