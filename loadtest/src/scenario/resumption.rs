//! `fleet-resumption`: many distinct TLS clients, each connecting once to one proxy
//! and then to the other, as clients behind DNS round robin or a layer-4 load balancer
//! do. Measured twice: two proxies of one controller's fleet (sharing its session
//! ticket keys) and two standalone proxies (each with keys of its own, which is where
//! nginx and HAProxy are unless an operator distributes key files by hand). Reports
//! the share of second handshakes that resumed, and the proxies' CPU per connection
//! of each phase (full handshakes first, then the cross-proxy ones).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use futures_util::StreamExt as _;
use serde::Serialize;

use crate::compare::peers::free_port;
use crate::procstat::cpu_seconds;

/// The name every proxy serves (internal CA).
const HOST: &str = "resume.test";
/// Clients connecting at once.
const CONCURRENCY: usize = 32;

/// What one pair of proxies measured.
#[derive(Debug, Serialize)]
pub struct PairReport {
    /// "fleet" or "standalone".
    pub setup: &'static str,
    /// Second connections (to the other proxy) that resumed, of all clients.
    pub resumed: u64,
    /// `resumed` / clients.
    pub resumed_share: f64,
    /// Proxy CPU (both processes) per first connection: full handshakes, ms.
    pub cpu_ms_per_first: f64,
    /// Proxy CPU per second connection (resumed where the keys allow), ms.
    pub cpu_ms_per_second: f64,
    /// Connections that failed.
    pub failed: u64,
    /// Wall time of each phase, s.
    pub phase_s: (f64, f64),
}

/// What `fleet-resumption` reports.
#[derive(Debug, Serialize)]
pub struct ResumptionReport {
    /// Distinct clients (each with its own session store).
    pub clients: usize,
    /// Both setups.
    pub pairs: Vec<PairReport>,
    /// Always 0 (the scenario fails on a failed connection instead); for the common
    /// check of scenario reports.
    pub failed_requests: u64,
}

/// A child process stopped when dropped.
struct Process(Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs the scenario with `clients` clients.
///
/// # Errors
/// When a process does not start or a connection fails.
pub async fn fleet_resumption(clients: usize, rampart: &Path) -> anyhow::Result<ResumptionReport> {
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path();
    let mut pairs = Vec::new();
    {
        let (procs, https, roots) = fleet(rampart, dir).await?;
        pairs.push(measure("fleet", clients, &procs, https, &roots).await?);
    }
    {
        let (procs, https, roots) = standalone(rampart, dir).await?;
        pairs.push(measure("standalone", clients, &procs, https, &roots).await?);
    }
    Ok(ResumptionReport {
        clients,
        pairs,
        failed_requests: 0,
    })
}

type Pair = (Vec<Process>, [SocketAddr; 2], rustls::RootCertStore);

/// A controller and two fleet proxies.
async fn fleet(rampart: &Path, dir: &Path) -> anyhow::Result<Pair> {
    let cdir = dir.join("controller");
    std::fs::create_dir_all(&cdir)?;
    let (fleet_addr, admin) = (free_port()?, free_port()?);
    let config = cdir.join("controller.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\ndata_dir = {:?}\n\n[controller]\nlisten = \"{fleet_addr}\"\nadmin = \"{admin}\"\n\n\
             [[tls]]\nhosts = [\"{HOST}\"]\nsource = \"internal\"\n\n\
             [[routes]]\nname = \"ok\"\naction = {{ respond = {{ body = \"ok\" }} }}\n",
            cdir.join("data")
        ),
    )?;
    let controller = spawn(rampart, &["controller", "--config"], &config, &cdir)?;
    wait_http(admin, "/healthz").await?;
    let out = Command::new(rampart)
        .args(["controller", "--config"])
        .arg(&config)
        .args(["token", "create", "--reusable"])
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "token create: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let token = String::from_utf8(out.stdout)?.trim().to_string();
    let mut procs = vec![controller];
    let mut https = Vec::new();
    for i in 0..2 {
        let pdir = dir.join(format!("fleet-proxy{i}"));
        let (addr, admin) = proxy_config(&pdir, "")?;
        let url = format!("https://{fleet_addr}");
        procs.push(spawn(
            rampart,
            &[
                "proxy",
                "--controller",
                &url,
                "--join-token",
                &token,
                "--config",
            ],
            &pdir.join("rampart.toml"),
            &pdir,
        )?);
        wait_http(admin, "/ready").await?;
        https.push(addr);
    }
    let roots = roots(&[cdir.join("data/ca/ca.pem")])?;
    Ok((procs, [https[0], https[1]], roots))
}

/// Two standalone proxies, each with its own internal CA and ticket keys.
async fn standalone(rampart: &Path, dir: &Path) -> anyhow::Result<Pair> {
    let mut procs = Vec::new();
    let mut https = Vec::new();
    let mut cas = Vec::new();
    for i in 0..2 {
        let pdir = dir.join(format!("standalone{i}"));
        let body = format!(
            "[[tls]]\nhosts = [\"{HOST}\"]\nsource = \"internal\"\n\n\
             [[routes]]\nname = \"ok\"\naction = {{ respond = {{ body = \"ok\" }} }}\n"
        );
        let (addr, admin) = proxy_config(&pdir, &body)?;
        procs.push(spawn(
            rampart,
            &["proxy", "--config"],
            &pdir.join("rampart.toml"),
            &pdir,
        )?);
        wait_http(admin, "/ready").await?;
        https.push(addr);
        cas.push(pdir.join("data/ca/ca.pem"));
    }
    Ok((procs, [https[0], https[1]], roots(&cas)?))
}

/// Writes `dir/rampart.toml` (HTTPS and admin listeners, then `body`); returns the two
/// addresses.
fn proxy_config(dir: &Path, body: &str) -> anyhow::Result<(SocketAddr, SocketAddr)> {
    std::fs::create_dir_all(dir)?;
    let (https, admin) = (free_port()?, free_port()?);
    std::fs::write(
        dir.join("rampart.toml"),
        format!(
            "[server]\ndata_dir = {:?}\nthreads = 1\ngrace_period = \"0s\"\n\n\
             [listeners]\nhttps = \"{https}\"\nadmin = \"{admin}\"\n\n{body}",
            dir.join("data")
        ),
    )?;
    Ok((https, admin))
}

fn spawn(rampart: &Path, args: &[&str], config: &Path, dir: &Path) -> anyhow::Result<Process> {
    let log = std::fs::File::create(dir.join("stderr.log"))?;
    let child = Command::new(rampart)
        .args(args)
        .arg(config)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .with_context(|| format!("starting {}", rampart.display()))?;
    Ok(Process(child))
}

/// Waits (20 s at most) until `GET path` on `addr` answers 200.
async fn wait_http(addr: SocketAddr, path: &str) -> anyhow::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let ok = async {
            let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
            s.write_all(
                format!("GET {path} HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n").as_bytes(),
            )
            .await
            .ok()?;
            let mut out = Vec::new();
            s.read_to_end(&mut out).await.ok()?;
            out.starts_with(b"HTTP/1.1 200").then_some(())
        };
        if ok.await.is_some() {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "{addr}{path} did not answer 200 in 20 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn roots(cas: &[PathBuf]) -> anyhow::Result<rustls::RootCertStore> {
    let mut roots = rustls::RootCertStore::empty();
    for ca in cas {
        let pem = std::fs::read(ca).with_context(|| format!("reading {}", ca.display()))?;
        for c in rustls_pemfile::certs(&mut &pem[..]) {
            roots.add(c?)?;
        }
    }
    Ok(roots)
}

/// One connection from `config` to `addr`: a request answered, and whether the
/// handshake resumed.
async fn visit(config: Arc<rustls::ClientConfig>, addr: SocketAddr) -> anyhow::Result<bool> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let mut tls = tokio_rustls::TlsConnector::from(config)
        .connect(rustls::pki_types::ServerName::try_from(HOST)?, tcp)
        .await?;
    let resumed = tls.get_ref().1.handshake_kind() == Some(rustls::HandshakeKind::Resumed);
    tls.write_all(
        format!("GET / HTTP/1.1\r\nhost: {HOST}\r\nconnection: close\r\n\r\n").as_bytes(),
    )
    .await?;
    // tokio-rustls may hold the request until flushed (the proxy would wait for it).
    tls.flush().await?;
    let mut out = Vec::new();
    // The answer, and the session tickets that come before it.
    let read = tls.read_to_end(&mut out).await;
    anyhow::ensure!(!out.is_empty(), "no answer (resumed: {resumed}): {read:?}");
    anyhow::ensure!(
        out.starts_with(b"HTTP/1.1 200"),
        "not answered 200: {:?}",
        String::from_utf8_lossy(&out[..out.len().min(200)])
    );
    Ok(resumed)
}

async fn measure(
    setup: &'static str,
    clients: usize,
    procs: &[Process],
    https: [SocketAddr; 2],
    roots: &rustls::RootCertStore,
) -> anyhow::Result<PairReport> {
    // The two proxies (a fleet's controller, first, is left out).
    let pids: Vec<u32> = procs.iter().rev().take(2).map(|p| p.0.id()).collect();
    let cpu = || pids.iter().map(|&p| cpu_seconds(p)).sum::<f64>();
    let base = rustls::ClientConfig::builder()
        .with_root_certificates(roots.clone())
        .with_no_client_auth();
    // Each client its own session store, as distinct browsers have.
    let configs: Vec<Arc<rustls::ClientConfig>> = (0..clients)
        .map(|_| {
            let mut c = base.clone();
            c.resumption = rustls::client::Resumption::in_memory_sessions(4);
            Arc::new(c)
        })
        .collect();
    let failed = AtomicU64::new(0);
    let resumed = AtomicU64::new(0);
    let mut cpu_ms = [0.0; 2];
    let mut phase_s = [0.0; 2];
    for phase in 0..2 {
        let (cpu0, t0) = (cpu(), Instant::now());
        futures_util::stream::iter(configs.iter().enumerate())
            .for_each_concurrent(CONCURRENCY, |(i, c)| {
                let (failed, resumed) = (&failed, &resumed);
                async move {
                    match visit(c.clone(), https[(i + phase) % 2]).await {
                        Ok(r) => {
                            if phase == 1 && r {
                                resumed.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        Err(e) => {
                            if failed.fetch_add(1, Ordering::Relaxed) == 0 {
                                eprintln!(
                                    "{setup}: phase {phase} client {i}: a connection failed: {e:#}"
                                );
                            }
                        }
                    }
                }
            })
            .await;
        phase_s[phase] = t0.elapsed().as_secs_f64();
        #[allow(clippy::cast_precision_loss)]
        let per = (cpu() - cpu0) * 1000.0 / clients.max(1) as f64;
        cpu_ms[phase] = per;
    }
    let resumed = resumed.into_inner();
    let failed = failed.into_inner();
    anyhow::ensure!(failed == 0, "{setup}: {failed} connections failed");
    #[allow(clippy::cast_precision_loss)]
    let share = resumed as f64 / clients.max(1) as f64;
    Ok(PairReport {
        setup,
        resumed,
        resumed_share: share,
        cpu_ms_per_first: cpu_ms[0],
        cpu_ms_per_second: cpu_ms[1],
        failed,
        phase_s: (phase_s[0], phase_s[1]),
    })
}
