//! The swap-under-load loop against nginx (`nginx -s reload`) and HAProxy
//! (master-worker mode, reload by SIGUSR2 to the master), for the comparison table:
//! the same load, the same alternating upstream sets and certificates, the same number
//! of reloads. A reload counts as applied when a new connection sees the new variant
//! on `/variant`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde::Serialize;

use crate::compare::peers::{free_port, terminate, Kind};
use crate::run::run;
use crate::stats::ErrorCounts;

/// What one peer's reload loop measured.
#[derive(Debug, Serialize)]
pub struct PeerSwapReport {
    /// nginx or haproxy.
    pub target: &'static str,
    /// Reloads applied.
    pub swaps: usize,
    /// Failed requests, all classes.
    pub failed_requests: u64,
    /// Failures of the keep-alive clients by class.
    pub keepalive_errors: ErrorCounts,
    /// Failures of the new-connection clients by class.
    pub new_conn_errors: ErrorCounts,
    /// Successful requests (keep-alive, new connection).
    pub ok: (u64, u64),
    /// Reload command → new variant answering, ms: p50, p99, max.
    pub swap_ms: (f64, f64, f64),
}

/// Where a peer lives: its directory and addresses (known before it starts).
struct Layout {
    kind: Kind,
    dir: PathBuf,
    https: SocketAddr,
    probe: SocketAddr,
}

/// A running peer.
struct Peer {
    layout: Layout,
    child: Child,
}

impl Drop for Peer {
    fn drop(&mut self) {
        // Through the master, which takes its workers (old and new generations) along.
        terminate(&mut self.child);
    }
}

fn config(
    kind: Kind,
    i: usize,
    p: &Layout,
    backends: &[SocketAddr],
    certs: &[(PathBuf, PathBuf); 2],
) -> String {
    let (cert, key) = &certs[i % 2];
    let set: Vec<SocketAddr> = if i.is_multiple_of(2) {
        vec![backends[0], backends[1]]
    } else {
        vec![backends[1], backends[2], backends[3]]
    };
    match kind {
        Kind::Nginx => {
            let d = p.dir.display();
            let servers: String = set.iter().map(|a| format!("server {a}; ")).collect();
            format!(
                "daemon off;\nmaster_process on;\nworker_processes 1;\npid {d}/nginx.pid;\nerror_log {d}/error.log crit;\nevents {{ worker_connections 4096; }}\nhttp {{\n  access_log off;\n  client_body_temp_path {d}/b; proxy_temp_path {d}/p; fastcgi_temp_path {d}/f; uwsgi_temp_path {d}/u; scgi_temp_path {d}/s;\n  upstream pool {{ {servers} keepalive 32; }}\n  server {{\n    listen {https} ssl;\n    ssl_certificate {cert};\n    ssl_certificate_key {key};\n    location = /variant {{ return 200 \"{i}\"; }}\n    location / {{ proxy_pass http://pool; proxy_http_version 1.1; proxy_set_header Connection \"\"; }}\n  }}\n  server {{ listen {probe}; location = /variant {{ return 200 \"{i}\"; }} }}\n}}\n",
                https = p.https,
                probe = p.probe,
                cert = cert.display(),
                key = key.display(),
            )
        }
        _ => {
            let combined = p.dir.join(format!("combined{}.pem", i % 2));
            let servers: String = set
                .iter()
                .enumerate()
                .map(|(n, a)| format!("  server s{n} {a}\n"))
                .collect();
            format!(
                "global\n  nbthread 1\n  maxconn 4000\ndefaults\n  mode http\n  timeout connect 5s\n  timeout client 60s\n  timeout server 60s\n  option http-keep-alive\nfrontend fe\n  bind {https} ssl crt {combined} alpn http/1.1\n  http-request return status 200 content-type text/plain string \"{i}\" if {{ path /variant }}\n  default_backend pool\nfrontend probe\n  bind {probe}\n  http-request return status 200 content-type text/plain string \"{i}\" if {{ path /variant }}\nbackend pool\n  http-reuse always\n{servers}",
                https = p.https,
                probe = p.probe,
                combined = combined.display(),
            )
        }
    }
}

fn config_path(p: &Layout) -> PathBuf {
    p.dir.join(if p.kind == Kind::Nginx {
        "nginx.conf"
    } else {
        "haproxy.cfg"
    })
}

fn start(
    kind: Kind,
    dir: &Path,
    backends: &[SocketAddr],
    certs: &[(PathBuf, PathBuf); 2],
) -> anyhow::Result<Peer> {
    let dir = dir.join(kind.name());
    std::fs::create_dir_all(&dir)?;
    for (n, (c, k)) in certs.iter().enumerate() {
        std::fs::write(
            dir.join(format!("combined{n}.pem")),
            format!(
                "{}{}",
                std::fs::read_to_string(c)?,
                std::fs::read_to_string(k)?
            ),
        )?;
    }
    let p = Layout {
        kind,
        dir,
        https: free_port()?,
        probe: free_port()?,
    };
    std::fs::write(config_path(&p), config(kind, 0, &p, backends, certs))?;
    let log = std::fs::File::create(p.dir.join("stderr.log"))?;
    let mut cmd = match kind {
        Kind::Nginx => {
            let mut c = Command::new("nginx");
            c.arg("-p").arg(&p.dir).arg("-c").arg(config_path(&p));
            c
        }
        _ => {
            let mut c = Command::new("haproxy");
            c.args(["-W", "-db", "-f"]).arg(config_path(&p));
            c
        }
    };
    let child = cmd
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .with_context(|| format!("starting {}", kind.binary()))?;
    Ok(Peer { layout: p, child })
}

async fn variant(probe: SocketAddr) -> Option<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(probe).await.ok()?;
    s.write_all(b"GET /variant HTTP/1.1\r\nHost: probe\r\nConnection: close\r\n\r\n")
        .await
        .ok()?;
    let mut out = String::new();
    tokio::time::timeout(Duration::from_secs(2), s.read_to_string(&mut out))
        .await
        .ok()?
        .ok()?;
    out.split_once("\r\n\r\n").map(|(_, b)| b.to_string())
}

async fn wait_variant(probe: SocketAddr, want: usize) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    let want = want.to_string();
    while variant(probe).await.as_deref() != Some(want.as_str()) {
        anyhow::ensure!(
            Instant::now() < deadline,
            "variant {want} not serving within 20 s"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    Ok(())
}

/// Waits until HAProxy's master has logged `n` successful loads.
async fn wait_loaded(dir: &Path, n: usize) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let log = std::fs::read_to_string(dir.join("stderr.log")).unwrap_or_default();
        if log.matches("Loading success.").count() >= n {
            // Measured here: a SIGUSR2 sent right after "Loading success." is dropped by
            // the master; 100 ms later it is honoured. Not counted in the swap time.
            tokio::time::sleep(Duration::from_millis(200)).await;
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "haproxy did not finish loading ({n} loads) within 20 s:\n{log}"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

fn reload(p: &Peer) -> anyhow::Result<()> {
    let ok = match p.layout.kind {
        Kind::Nginx => Command::new("nginx")
            .arg("-p")
            .arg(&p.layout.dir)
            .arg("-c")
            .arg(config_path(&p.layout))
            .args(["-s", "reload"])
            .stderr(Stdio::null())
            .status()?
            .success(),
        _ => Command::new("kill")
            .args(["-USR2", &p.child.id().to_string()])
            .status()?
            .success(),
    };
    anyhow::ensure!(ok, "reloading {} failed", p.layout.kind.name());
    Ok(())
}

/// Runs the reload loop `swaps` times against `kind` under the same load as Rampart's.
///
/// # Errors
/// When the peer cannot be started or a reload does not take effect.
#[allow(clippy::too_many_arguments)]
pub async fn swap_peer(
    kind: Kind,
    swaps: usize,
    connections: usize,
    backends: &[SocketAddr],
    certs: &[(PathBuf, PathBuf); 2],
    ca: &Path,
    dir: &Path,
) -> anyhow::Result<PeerSwapReport> {
    let mut p = start(kind, dir, backends, certs)?;
    wait_variant(p.layout.probe, 0).await.with_context(|| {
        format!(
            "{} did not start: {}",
            kind.name(),
            std::fs::read_to_string(p.layout.dir.join("stderr.log")).unwrap_or_default()
        )
    })?;
    let stop = Arc::new(AtomicBool::new(false));
    let keepalive = tokio::spawn(run(super::load_config(
        p.layout.https,
        Some(ca),
        connections,
        false,
        &stop,
    )));
    let fresh = tokio::spawn(run(super::load_config(
        p.layout.https,
        Some(ca),
        2,
        true,
        &stop,
    )));
    let mut swap_ms = Vec::with_capacity(swaps);
    for i in 1..=swaps {
        std::fs::write(
            config_path(&p.layout),
            config(kind, i, &p.layout, backends, certs),
        )?;
        let t = Instant::now();
        if kind == Kind::Haproxy {
            // The master ignores a reload signal until it has finished loading the
            // previous configuration, which can be after the new worker answers.
            wait_loaded(&p.layout.dir, i).await?;
        }
        reload(&p)?;
        if let Err(e) = wait_variant(p.layout.probe, i).await {
            let log = std::fs::read_to_string(p.layout.dir.join("stderr.log")).unwrap_or_default();
            anyhow::bail!("{}: {e:#}\n{log}", kind.name());
        }
        swap_ms.push(t.elapsed().as_secs_f64() * 1000.0);
        if i % 100 == 0 {
            eprintln!("{}: {i} reloads applied", kind.name());
        }
    }
    stop.store(true, Ordering::Relaxed);
    let (ka, _) = keepalive.await??;
    let (nc, _) = fresh.await??;
    // Stop the master and its workers now, before the next peer runs.
    terminate(&mut p.child);
    Ok(PeerSwapReport {
        target: kind.name(),
        swaps,
        failed_requests: ka.errors.total() + nc.errors.total(),
        keepalive_errors: ka.errors,
        new_conn_errors: nc.errors,
        ok: (ka.ok, nc.ok),
        swap_ms: super::spread(swap_ms),
    })
}
