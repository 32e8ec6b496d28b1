//! `rampart-loadtest`: load generator (`run`), test upstream (`backend`), scenarios
//! (`scenario swap-under-load`, `scenario backend-churn`) and the side-by-side
//! benchmark against nginx, HAProxy and Caddy (`compare`).

mod backend;
mod client;
mod compare;
mod procstat;
mod run;
mod scenario;
mod schedule;
mod stats;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};

/// Load generator and benchmark harness for Rampart and its peers.
#[derive(Debug, Parser)]
#[command(name = "rampart-loadtest", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Send load to a URL and report throughput, latency percentiles and errors.
    Run(RunArgs),
    /// Serve a fixed response fast (the upstream of benchmarks and scenarios).
    Backend {
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: SocketAddr,
        /// Response body size in bytes.
        #[arg(long, default_value_t = 13)]
        body_bytes: usize,
        /// Delay before each response, in milliseconds.
        #[arg(long, default_value_t = 0)]
        delay: u64,
        /// Fraction of requests answered 500 (0.0-1.0).
        #[arg(long, default_value_t = 0.0)]
        fail_rate: f64,
        /// Worker threads.
        #[arg(long, default_value_t = 1)]
        threads: usize,
        /// Sent back in the x-backend header of every response (default: the host
        /// name, which in a container is its id), so that a client can tell who answered.
        #[arg(long)]
        name: Option<String>,
        /// Serve HTTP/2 in cleartext (prior knowledge), and gRPC calls with a gRPC
        /// answer.
        #[arg(long)]
        h2c: bool,
        /// Serve an HTML page of --body-bytes (compressible text, `text/html`).
        #[arg(long)]
        html: bool,
    },
    /// Scenarios that start Rampart (and peers) themselves.
    #[command(subcommand)]
    Scenario(scenario::ScenarioCommand),
    /// Benchmark Rampart against nginx, HAProxy and Caddy, interleaved in rounds.
    Compare(compare::CompareArgs),
}

/// Arguments of `run`.
#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// URL to request (http:// or https://).
    #[arg(long)]
    url: String,
    /// Concurrent connections.
    #[arg(long, short, default_value_t = 16)]
    connections: usize,
    /// Open loop at this total rate (requests/s), with latencies corrected for
    /// coordinated omission; closed loop when absent.
    #[arg(long, short)]
    rate: Option<f64>,
    /// How long to send, e.g. 10s, 500ms, 1m.
    #[arg(long, short, value_parser = parse_duration)]
    duration: Duration,
    /// Use HTTP/2 (negotiated by ALPN over TLS).
    #[arg(long)]
    h2: bool,
    /// HTTP/2 streams in flight per connection (as h2load's -m): with --h2,
    /// connections × streams requests are outstanding at once.
    #[arg(long, short = 'm', default_value_t = 1)]
    streams: usize,
    /// Open a new connection (full TLS handshake, no resumption) for every request.
    #[arg(long)]
    new_conn: bool,
    /// With --new-conn: resume the TLS session (by ticket) on every new connection.
    #[arg(long, requires = "new_conn")]
    resume: bool,
    /// Trust this CA bundle (PEM) for https:// URLs.
    #[arg(long, conflicts_with = "insecure")]
    cacert: Option<PathBuf>,
    /// Accept any server certificate.
    #[arg(long, short = 'k')]
    insecure: bool,
    /// Check nothing of the server, not even its handshake signature: for measuring a
    /// server's handshakes per second without the client's verification as the
    /// bottleneck (benchmarks only).
    #[arg(long, conflicts_with_all = ["cacert", "insecure"])]
    no_verify: bool,
    /// Extra request header, "Name: value" (repeatable).
    #[arg(long = "header", short = 'H')]
    headers: Vec<String>,
    /// Per-request timeout.
    #[arg(long, value_parser = parse_duration, default_value = "10s")]
    timeout: Duration,
    /// Write the report as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Worker threads of the load generator (default: CPUs).
    #[arg(long)]
    threads: Option<usize>,
    /// Connect to this address instead of resolving the URL's host, which still gives
    /// the TLS server name and Host header (as curl's --connect-to).
    #[arg(long)]
    connect_to: Option<std::net::SocketAddr>,
}

/// Parses "10s", "500ms", "2m", "1h" or plain seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("invalid duration {s:?}: write e.g. 10s, 500ms, 2m"))?;
    let secs = match unit {
        "" | "s" => n,
        "ms" => n / 1000.0,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => return Err(format!("invalid duration unit in {s:?}: use ms, s, m or h")),
    };
    Ok(Duration::from_secs_f64(secs))
}

impl RunArgs {
    fn config(&self) -> anyhow::Result<run::RunConfig> {
        let headers = self
            .headers
            .iter()
            .map(|h| {
                h.split_once(':')
                    .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
                    .with_context(|| format!("header {h:?} is not \"Name: value\""))
            })
            .collect::<anyhow::Result<_>>()?;
        anyhow::ensure!(self.connections > 0, "--connections must be at least 1");
        anyhow::ensure!(self.streams > 0, "--streams must be at least 1");
        anyhow::ensure!(
            self.streams == 1 || self.h2,
            "--streams {} needs --h2: HTTP/1.1 carries one request at a time per connection",
            self.streams
        );
        anyhow::ensure!(self.rate.is_none_or(|r| r > 0.0), "--rate must be positive");
        let target = client::Target::parse(&self.url, self.connect_to)?;
        let trust = match &self.cacert {
            Some(path) => client::Trust::CaFile(path.clone()),
            None if self.no_verify && target.tls => client::Trust::Unverified,
            None if self.insecure || !target.tls => client::Trust::Insecure,
            None => anyhow::bail!(
                "{} is https: pass --cacert FILE to verify the server, or --insecure (or --no-verify)",
                self.url
            ),
        };
        Ok(run::RunConfig {
            target,
            connections: self.connections,
            rate: self.rate,
            duration: self.duration,
            h2: self.h2,
            streams: self.streams,
            new_conn: self.new_conn,
            resume: self.resume,
            trust,
            headers,
            timeout: self.timeout,
            progress: true,
            stop: None,
        })
    }
}

fn runtime(threads: Option<usize>) -> anyhow::Result<tokio::runtime::Runtime> {
    let mut b = tokio::runtime::Builder::new_multi_thread();
    if let Some(t) = threads {
        b.worker_threads(t.max(1));
    }
    Ok(b.enable_all().build()?)
}

fn main() -> anyhow::Result<()> {
    // One crypto provider for the process (rustls cannot pick when two are compiled in).
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let cli = Cli::parse();
    match cli.command {
        Command::Run(args) => {
            let mut cfg = args.config()?;
            // Ctrl-C (SIGINT) ends the run early with a report of what was sent.
            let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
            cfg.stop = Some(stop.clone());
            let (stats, elapsed) = runtime(args.threads)?.block_on(async {
                tokio::spawn(async move {
                    if tokio::signal::ctrl_c().await.is_ok() {
                        stop.store(true, std::sync::atomic::Ordering::Relaxed);
                    }
                });
                run::run(cfg.clone()).await
            })?;
            let report = run::RunReport::new(&cfg, &args.url, &stats, elapsed);
            println!("{}", report.summary());
            if let Some(path) = &args.json {
                std::fs::write(path, serde_json::to_vec_pretty(&report)?)
                    .with_context(|| format!("writing {}", path.display()))?;
            }
            Ok(())
        }
        Command::Backend {
            listen,
            body_bytes,
            delay,
            fail_rate,
            threads,
            name,
            h2c,
            html,
        } => runtime(Some(threads))?.block_on(async {
            let name = name.unwrap_or_else(|| {
                std::fs::read_to_string("/etc/hostname")
                    .map(|h| h.trim().to_string())
                    .ok()
                    .filter(|h| !h.is_empty())
                    .unwrap_or_else(|| "backend".into())
            });
            let config = backend::BackendConfig {
                body_bytes,
                delay: Duration::from_millis(delay),
                fail_rate,
                name,
                h2c,
                html,
            };
            let (addr, task) = backend::spawn(listen, config).await?;
            println!("listening on {addr}");
            task.await?;
            Ok(())
        }),
        Command::Scenario(cmd) => scenario::main(cmd),
        Command::Compare(args) => compare::main(&args),
    }
}
