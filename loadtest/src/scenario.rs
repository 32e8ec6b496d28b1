//! Scenarios that start Rampart themselves and measure what clients see while the
//! proxy's world changes:
//!
//! - `swap-under-load`: steady load (keep-alive and new-connection clients over HTTPS)
//!   while the configuration is swapped N times through the file and SIGHUP,
//!   alternating routes, pools, endpoint sets and certificates;
//! - `backend-churn`: backend processes are killed and new ones started (and the
//!   configuration updated) under load; reports failures and how long a new endpoint
//!   takes to receive traffic;
//! - `fleet-resumption`: distinct TLS clients each visiting one proxy, then another:
//!   how many resume, in a fleet that shares ticket keys and between standalone
//!   proxies.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde::Serialize;

mod peer_reload;
mod resumption;

use crate::backend::{self, BackendConfig, BackendProcess};
use crate::client::{Target, Trust};
use crate::compare::peers::free_port;
use crate::run::{run, RunConfig, RunReport};

/// The scenarios.
#[derive(Debug, clap::Subcommand)]
pub enum ScenarioCommand {
    /// Swap the configuration N times under load; every failed request is reported.
    SwapUnderLoad {
        /// Number of swaps.
        #[arg(long, default_value_t = 1000)]
        swaps: usize,
        /// Keep-alive client connections.
        #[arg(long, default_value_t = 8)]
        connections: usize,
        /// Also run the same reload loop against these peers (nginx, haproxy), found on PATH.
        #[arg(long, value_delimiter = ',')]
        peers: Vec<String>,
        /// The rampart binary (default: next to this one, then PATH).
        #[arg(long)]
        rampart: Option<PathBuf>,
        /// Write the report as JSON.
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// Distinct TLS clients visit one proxy and then another; the share that resumes,
    /// in a fleet (shared ticket keys) and between two standalone proxies.
    FleetResumption {
        /// Distinct clients.
        #[arg(long, default_value_t = 10_000)]
        clients: usize,
        /// The rampart binary (default: next to this one, then PATH).
        #[arg(long)]
        rampart: Option<PathBuf>,
        /// Write the report as JSON.
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// Kill and start backends under load; measure failures and time to first traffic.
    BackendChurn {
        /// Number of replacements.
        #[arg(long, default_value_t = 10)]
        cycles: usize,
        /// Time under load before each replacement, so every backend carries traffic
        /// when it is killed.
        #[arg(long, value_parser = crate::parse_duration, default_value = "1s")]
        interval: Duration,
        /// Client connections.
        #[arg(long, default_value_t = 8)]
        connections: usize,
        /// The rampart binary (default: next to this one, then PATH).
        #[arg(long)]
        rampart: Option<PathBuf>,
        /// Write the report as JSON.
        #[arg(long)]
        json: Option<PathBuf>,
    },
}

/// Runs a scenario.
///
/// # Errors
/// When Rampart cannot be started or a swap is not applied in time.
pub fn main(cmd: ScenarioCommand) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let (report, json) = match cmd {
        ScenarioCommand::SwapUnderLoad {
            swaps,
            connections,
            peers,
            rampart,
            json,
        } => (
            serde_json::to_value(rt.block_on(swap_under_load(
                swaps,
                &peers,
                connections,
                &rampart_binary(rampart),
            ))?)?,
            json,
        ),
        ScenarioCommand::FleetResumption {
            clients,
            rampart,
            json,
        } => (
            serde_json::to_value(rt.block_on(resumption::fleet_resumption(
                clients,
                &rampart_binary(rampart),
            ))?)?,
            json,
        ),
        ScenarioCommand::BackendChurn {
            cycles,
            interval,
            connections,
            rampart,
            json,
        } => (
            serde_json::to_value(rt.block_on(backend_churn(
                cycles,
                interval,
                connections,
                &rampart_binary(rampart),
            ))?)?,
            json,
        ),
    };
    println!("{}", serde_json::to_string_pretty(&report)?);
    if let Some(path) = json {
        std::fs::write(&path, serde_json::to_vec_pretty(&report)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    let failed = report["failed_requests"].as_u64().unwrap_or(0);
    anyhow::ensure!(failed == 0, "{failed} requests failed");
    Ok(())
}

/// The rampart binary: explicit, next to this executable, or on PATH.
#[must_use]
pub fn rampart_binary(explicit: Option<PathBuf>) -> PathBuf {
    explicit.unwrap_or_else(|| {
        let sibling = std::env::current_exe()
            .ok()
            .map(|p| p.with_file_name("rampart"));
        sibling
            .filter(|p| p.exists())
            .unwrap_or_else(|| PathBuf::from("rampart"))
    })
}

/// What `swap-under-load` reports.
#[derive(Debug, Serialize)]
pub struct SwapReport {
    /// Swaps applied.
    pub swaps: usize,
    /// Requests that failed, all classes.
    pub failed_requests: u64,
    /// The keep-alive load.
    pub keepalive: RunReport,
    /// The new-connection-per-request load (a TLS handshake each, across certificate swaps).
    pub new_conn: RunReport,
    /// Time from SIGHUP to the new version serving, ms: p50, p99, max.
    pub swap_ms: (f64, f64, f64),
    /// The same loop against the peers, for comparison.
    pub peers: Vec<peer_reload::PeerSwapReport>,
}

/// A `rampart proxy` child with its admin address.
struct Proxy {
    child: Child,
    admin: SocketAddr,
    https: SocketAddr,
    http: SocketAddr,
    config: PathBuf,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        // Best effort: it may have exited already.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Proxy {
    fn start(rampart: &Path, dir: &Path, body: &str) -> anyhow::Result<Self> {
        let (http, https, admin) = (free_port()?, free_port()?, free_port()?);
        let config = dir.join("rampart.toml");
        write_config(&config, dir, [http, https, admin], body)?;
        let log = std::fs::File::create(dir.join("rampart.log"))?;
        let child = Command::new(rampart)
            .args(["proxy", "--config"])
            .arg(&config)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", rampart.display()))?;
        Ok(Proxy {
            child,
            admin,
            https,
            http,
            config,
        })
    }

    fn write(&self, dir: &Path, body: &str) -> anyhow::Result<()> {
        write_config(&self.config, dir, [self.http, self.https, self.admin], body)
    }

    fn signal(&self, sig: &str) -> anyhow::Result<()> {
        let ok = Command::new("kill")
            .args([&format!("-{sig}"), &self.child.id().to_string()])
            .status()?
            .success();
        anyhow::ensure!(ok, "kill -{sig} failed");
        Ok(())
    }

    /// GET on the admin listener (tiny responses, connection closed after each).
    async fn admin_get(&self, path: &str) -> anyhow::Result<String> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let exchange = async {
            let mut s = tokio::net::TcpStream::connect(self.admin).await?;
            s.write_all(
                format!("GET {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n")
                    .as_bytes(),
            )
            .await?;
            let mut out = String::new();
            s.read_to_string(&mut out).await?;
            anyhow::Ok(out)
        };
        let out = tokio::time::timeout(Duration::from_secs(5), exchange)
            .await
            .context("admin API did not answer in 5 s")??;
        Ok(out
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default())
    }

    async fn version(&self) -> anyhow::Result<u64> {
        let status: serde_json::Value = serde_json::from_str(&self.admin_get("/status").await?)?;
        status["version"].as_u64().context("no version in /status")
    }

    async fn wait_version_above(&self, v: u64) -> anyhow::Result<u64> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(now) = self.version().await {
                if now > v {
                    return Ok(now);
                }
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "version did not move past {v} within 20 s"
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
}

/// Writes a rampart configuration with the `[http, https, admin]` listeners and `body`,
/// atomically (temp file, then rename), as deployment tools do.
fn write_config(
    path: &Path,
    dir: &Path,
    [http, https, admin]: [SocketAddr; 3],
    body: &str,
) -> anyhow::Result<()> {
    let text = format!(
        "[server]\ndata_dir = {:?}\nthreads = 2\ngrace_period = \"0s\"\nshutdown_timeout = \"2s\"\n\n[listeners]\nhttp = \"{http}\"\nhttps = \"{https}\"\nadmin = \"{admin}\"\n\n{body}",
        dir.join("data"),
    );
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

/// Two certificates for `swap.test` from two CAs, and a bundle trusting both.
fn certificates(dir: &Path) -> anyhow::Result<([(PathBuf, PathBuf); 2], PathBuf)> {
    let mut bundle = String::new();
    let mut out = Vec::new();
    for i in 0..2 {
        let key = rcgen::KeyPair::generate()?;
        let cert =
            rcgen::CertificateParams::new(vec!["swap.test".to_string()])?.self_signed(&key)?;
        let (c, k) = (
            dir.join(format!("cert{i}.pem")),
            dir.join(format!("key{i}.pem")),
        );
        std::fs::write(&c, cert.pem())?;
        std::fs::write(&k, key.serialize_pem())?;
        bundle.push_str(&cert.pem());
        out.push((c, k));
    }
    let ca = dir.join("bundle.pem");
    std::fs::write(&ca, bundle)?;
    let [a, b]: [(PathBuf, PathBuf); 2] = out
        .try_into()
        .map_err(|_| anyhow::anyhow!("two certificates"))?;
    Ok(([a, b], ca))
}

/// Configuration variant `i`: routes, pools, endpoint sets, balancing and the
/// certificate all change between even and odd swaps.
fn variant(i: usize, backends: &[SocketAddr], certs: &[(PathBuf, PathBuf); 2]) -> String {
    let (cert, key) = &certs[i % 2];
    let ep = |idx: &[usize]| {
        idx.iter()
            .map(|&j| format!("{{ address = \"{}\" }}", backends[j]))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let tls = format!("[[tls]]\nhosts = [\"swap.test\"]\nsource = {{ files = {{ cert = {cert:?}, key = {key:?} }} }}\n");
    if i.is_multiple_of(2) {
        format!("{tls}\n[[routes]]\nname = \"main\"\nhosts = [\"swap.test\"]\naction = {{ forward = \"alpha\" }}\n\n[pools.alpha]\nbalance = \"round_robin\"\nendpoints = [{}]\n", ep(&[0, 1]))
    } else {
        format!(
            "{tls}\n[[routes]]\nname = \"v2\"\nhosts = [\"swap.test\"]\npath_prefix = \"/v2\"\naction = {{ forward = \"alpha\" }}\n\n[[routes]]\nname = \"main-b\"\nhosts = [\"swap.test\"]\naction = {{ forward = \"beta\" }}\n\n[pools.alpha]\nendpoints = [{}]\n\n[pools.beta]\nbalance = \"least_conn\"\nendpoints = [{}]\n",
            ep(&[0]),
            ep(&[1, 2, 3])
        )
    }
}

/// Load on `addr` that runs until `stop` is set (bounded at ten minutes): HTTPS to
/// `swap.test` verified with `ca`, or plain HTTP when there is no `ca`.
fn load_config(
    addr: SocketAddr,
    ca: Option<&Path>,
    connections: usize,
    new_conn: bool,
    stop: &Arc<AtomicBool>,
) -> RunConfig {
    let host = if ca.is_some() {
        "swap.test"
    } else {
        "churn.test"
    };
    let target = Target {
        addr,
        host: host.into(),
        authority: host.into(),
        path: "/".into(),
        tls: ca.is_some(),
    };
    RunConfig {
        target,
        connections,
        rate: None,
        duration: Duration::from_secs(600),
        h2: false,
        streams: 1,
        new_conn,
        resume: false,
        trust: ca.map_or(Trust::Insecure, |ca| Trust::CaFile(ca.to_path_buf())),
        headers: Vec::new(),
        timeout: Duration::from_secs(10),
        progress: false,
        stop: Some(stop.clone()),
    }
}

async fn wait_ready(proxy: &Proxy) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    while proxy
        .admin_get("/ready")
        .await
        .map_or(true, |b| !b.starts_with("ready"))
    {
        anyhow::ensure!(Instant::now() < deadline, "rampart did not become ready");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

async fn swap_under_load(
    swaps: usize,
    peers: &[String],
    connections: usize,
    rampart: &Path,
) -> anyhow::Result<SwapReport> {
    let dir = tempfile::tempdir()?;
    let (certs, ca) = certificates(dir.path())?;
    let mut backends = Vec::new();
    let mut tasks = Vec::new();
    for i in 0..4 {
        let (addr, task) = backend::spawn(
            "127.0.0.1:0".parse()?,
            BackendConfig {
                body_bytes: 64,
                delay: Duration::ZERO,
                fail_rate: 0.0,
                name: format!("b{i}"),
                h2c: false,
                html: false,
            },
        )
        .await?;
        backends.push(addr);
        tasks.push(task);
    }
    let proxy = Proxy::start(rampart, dir.path(), &variant(0, &backends, &certs))?;
    wait_ready(&proxy).await?;
    let stop = Arc::new(AtomicBool::new(false));
    let keepalive = tokio::spawn(run(load_config(
        proxy.https,
        Some(&ca),
        connections,
        false,
        &stop,
    )));
    let fresh = tokio::spawn(run(load_config(proxy.https, Some(&ca), 2, true, &stop)));
    let mut swap_ms = Vec::with_capacity(swaps);
    let mut version = proxy.version().await?;
    for i in 1..=swaps {
        proxy.write(dir.path(), &variant(i, &backends, &certs))?;
        let t = Instant::now();
        proxy.signal("HUP")?;
        version = proxy.wait_version_above(version).await?;
        swap_ms.push(t.elapsed().as_secs_f64() * 1000.0);
        if i % 100 == 0 {
            eprintln!("{i} swaps applied");
        }
    }
    stop.store(true, Ordering::Relaxed);
    let (ka, ka_t) = keepalive.await??;
    let (nc, nc_t) = fresh.await??;
    let cfg = load_config(proxy.https, Some(&ca), connections, false, &stop);
    let keepalive = RunReport::new(&cfg, "keep-alive clients", &ka, ka_t);
    let cfg = load_config(proxy.https, Some(&ca), 2, true, &stop);
    let new_conn = RunReport::new(&cfg, "new connection per request", &nc, nc_t);
    drop(proxy);
    let mut peer_reports = Vec::new();
    for name in peers.iter().filter(|p| !p.is_empty()) {
        let kind = crate::compare::peers::Kind::peer(name)?;
        peer_reports.push(
            peer_reload::swap_peer(kind, swaps, connections, &backends, &certs, &ca, dir.path())
                .await?,
        );
    }
    drop(tasks);
    Ok(SwapReport {
        swaps,
        failed_requests: ka.errors.total() + nc.errors.total(),
        keepalive,
        new_conn,
        swap_ms: spread(swap_ms),
        peers: peer_reports,
    })
}

/// (p50, p99, max) of a list of milliseconds.
fn spread(mut v: Vec<f64>) -> (f64, f64, f64) {
    if v.is_empty() {
        return (0.0, 0.0, 0.0);
    }
    v.sort_by(f64::total_cmp);
    let at = |q: f64| {
        #[allow(
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            clippy::cast_precision_loss
        )]
        let i = ((v.len() - 1) as f64 * q).round() as usize;
        v[i]
    };
    (at(0.5), at(0.99), v[v.len() - 1])
}

/// What `backend-churn` reports.
#[derive(Debug, Serialize)]
pub struct ChurnReport {
    /// Backends replaced.
    pub cycles: usize,
    /// Requests that failed, all classes.
    pub failed_requests: u64,
    /// The load.
    pub load: RunReport,
    /// From the configuration naming a new endpoint to its first request, ms: p50, p99, max.
    pub time_to_traffic_ms: (f64, f64, f64),
}

fn churn_config(backends: &[BackendProcess]) -> String {
    let eps = backends
        .iter()
        .map(|b| format!("{{ address = \"{}\" }}", b.addr))
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        "[[routes]]\nname = \"all\"\naction = {{ forward = \"app\" }}\n\n[pools.app]\nbalance = \"round_robin\"\nendpoints = [{eps}]\nretries = {{ attempts = 2 }}\npassive_health = {{ consecutive_failures = 1, eject_for = \"30s\" }}\n\n[pools.app.health_check]\ninterval = \"200ms\"\ntimeout = \"200ms\"\nunhealthy_threshold = 1\nhealthy_threshold = 1\n"
    )
}

async fn backend_churn(
    cycles: usize,
    interval: Duration,
    connections: usize,
    rampart: &Path,
) -> anyhow::Result<ChurnReport> {
    let dir = tempfile::tempdir()?;
    let mut backends = (0..3)
        .map(|_| BackendProcess::spawn(13))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let proxy = Proxy::start(rampart, dir.path(), &churn_config(&backends))?;
    wait_ready(&proxy).await?;
    let stop = Arc::new(AtomicBool::new(false));
    let load = tokio::spawn(run(load_config(
        proxy.http,
        None,
        connections,
        false,
        &stop,
    )));
    let mut version = proxy.version().await?;
    let mut to_traffic = Vec::with_capacity(cycles);
    for i in 0..cycles {
        tokio::time::sleep(interval).await;
        // The oldest backend dies without warning (SIGKILL)...
        let mut dead = backends.remove(0);
        dead.child.kill()?;
        tokio::task::spawn_blocking(move || dead.child.wait()).await??;
        // ...a replacement starts, and the configuration is updated to name it.
        backends.push(tokio::task::spawn_blocking(|| BackendProcess::spawn(13)).await??);
        let new_addr = backends[backends.len() - 1].addr.to_string();
        proxy.write(dir.path(), &churn_config(&backends))?;
        let t = Instant::now();
        proxy.signal("HUP")?;
        version = proxy.wait_version_above(version).await?;
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let status: serde_json::Value =
                serde_json::from_str(&proxy.admin_get("/status").await?)?;
            let served = status["pools"]["app"]["endpoints"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|e| {
                    e["address"] == new_addr.as_str() && e["requests"].as_u64().unwrap_or(0) > 0
                });
            if served {
                break;
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "the new endpoint got no traffic within 20 s"
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        to_traffic.push(t.elapsed().as_secs_f64() * 1000.0);
        eprintln!(
            "cycle {}: new endpoint served after {:.1} ms",
            i + 1,
            to_traffic[i]
        );
    }
    stop.store(true, Ordering::Relaxed);
    let (stats, elapsed) = load.await??;
    let cfg = load_config(proxy.http, None, connections, false, &stop);
    Ok(ChurnReport {
        cycles,
        failed_requests: stats.errors.total(),
        load: RunReport::new(&cfg, "churn load", &stats, elapsed),
        time_to_traffic_ms: spread(to_traffic),
    })
}
