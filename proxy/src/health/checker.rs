//! Active health checks: one task per (pool, endpoint, check settings), probing on the
//! pool's interval with TCP connects or HTTP GETs, and flipping the endpoint's health
//! after the configured number of consecutive results.
//!
//! After every swap the checker reconciles its tasks with the new generation: tasks of
//! endpoints that remain unchanged keep running (and their state), removed ones stop,
//! new ones start.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use async_trait::async_trait;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use rampart_config::{HealthCheck, Probe};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::task::JoinHandle;

use super::EndpointState;
use crate::live::Live;
use crate::peer::{PeerSettings, ProbeIo};

/// Runs the active health checks of the live generation.
pub struct HealthChecker {
    live: Arc<Live>,
}

impl HealthChecker {
    /// A checker over `live`.
    #[must_use]
    pub fn new(live: Arc<Live>) -> Self {
        Self { live }
    }

    fn desired(&self) -> HashMap<String, Target> {
        let generation = self.live.current.load();
        let mut out = HashMap::new();
        for pool in generation.pools.values() {
            let Some(check) = &pool.health_check else {
                continue;
            };
            // TLS settings come from files: every build is new to the key, so that a
            // changed CA or client certificate is probed with.
            let peer = &pool.peer;
            let connect = match &peer.tls {
                Some(_) => format!("tls@{:p}", Arc::as_ptr(peer)),
                None => format!("{:?}/{:?}", peer.protocol, peer.proxy_protocol),
            };
            for ep in &pool.endpoints {
                // The key includes the settings, so a changed check restarts its task.
                let key = format!("{}|{}|{}|{check:?}|{connect}", pool.name, ep.id, ep.addr);
                out.insert(
                    key,
                    Target {
                        addr: ep.addr,
                        id: ep.id.clone(),
                        check: check.clone(),
                        peer: peer.clone(),
                        state: ep.state.clone(),
                        label: format!("{}/{}", pool.name, ep.id),
                    },
                );
            }
        }
        out
    }
}

#[async_trait]
impl BackgroundService for HealthChecker {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut changes = self.live.subscribe();
        let mut tasks: HashMap<String, JoinHandle<()>> = HashMap::new();
        loop {
            let mut desired = self.desired();
            tasks.retain(|key, task| {
                let keep = desired.remove(key).is_some();
                if !keep {
                    task.abort();
                }
                keep
            });
            for (key, target) in desired {
                tasks.insert(key, tokio::spawn(probe_loop(target)));
            }
            tokio::select! {
                _ = shutdown.changed() => break,
                r = changes.changed() => if r.is_err() { break },
            }
        }
        for task in tasks.values() {
            task.abort();
        }
    }
}

/// One endpoint's checks: where it is, how it is reached, what to probe.
struct Target {
    addr: SocketAddr,
    id: String,
    check: HealthCheck,
    peer: Arc<PeerSettings>,
    state: Arc<EndpointState>,
    label: String,
}

async fn probe_loop(target: Target) {
    let Target {
        addr,
        id,
        check,
        peer,
        state,
        label,
    } = target;
    let mut ticker = tokio::time::interval(check.interval.0);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let result =
            tokio::time::timeout(check.timeout.0, probe(addr, &id, &check.probe, &peer)).await;
        let ok = matches!(result, Ok(Ok(())));
        if let Some(now_healthy) =
            state.record_probe(ok, check.healthy_threshold, check.unhealthy_threshold)
        {
            match (now_healthy, result) {
                (true, _) => {
                    tracing::info!(endpoint = %label, "active health check passing again: endpoint is back")
                }
                (false, Ok(Err(e))) => {
                    tracing::warn!(endpoint = %label, "active health check failing: endpoint taken out ({e})")
                }
                (false, _) => {
                    tracing::warn!(endpoint = %label, "active health check timed out after {:?}: endpoint taken out", check.timeout.0)
                }
            }
        }
    }
}

/// One probe of the endpoint `id` at `addr`, over a connection made as the pool's
/// requests are (PROXY header, TLS, protocol): a connect (and TLS handshake), or a GET
/// in HTTP/1.1 or HTTP/2 whose status must match.
///
/// # Errors
/// What failed, for the log.
pub async fn probe(
    addr: SocketAddr,
    id: &str,
    probe: &Probe,
    peer: &PeerSettings,
) -> anyhow::Result<()> {
    let conn = peer.connect_probe(addr, id).await?;
    let Probe::Http(http) = probe else {
        return Ok(());
    };
    let host = http
        .host
        .as_ref()
        .map_or_else(|| addr.to_string(), ToString::to_string);
    let status = if conn.h2 {
        let scheme = if peer.tls.is_some() { "https" } else { "http" };
        h2_status(conn.io, &format!("{scheme}://{host}{}", http.path)).await?
    } else {
        h1_status(conn.io, &host, &http.path).await?
    };
    anyhow::ensure!(
        status == http.expect_status,
        "status {status}, expected {}",
        http.expect_status
    );
    Ok(())
}

/// The status of a GET over HTTP/2 (prior knowledge or ALPN).
async fn h2_status(io: Box<dyn ProbeIo>, uri: &str) -> anyhow::Result<u16> {
    let (mut client, connection) = h2::client::handshake(io).await?;
    let request = http::Request::get(uri)
        .header("user-agent", "rampart-health-check")
        .body(())?;
    let exchange = async {
        let (response, _) = client.send_request(request, true)?;
        Ok::<_, anyhow::Error>(response.await?.status().as_u16())
    };
    tokio::select! {
        status = exchange => status,
        ended = connection => Err(match ended {
            Ok(()) => anyhow::anyhow!("the endpoint closed the HTTP/2 connection"),
            Err(e) => e.into(),
        }),
    }
}

/// The status of a GET over HTTP/1.1.
async fn h1_status(mut conn: Box<dyn ProbeIo>, host: &str, path: &str) -> anyhow::Result<u16> {
    let request = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: rampart-health-check\r\nConnection: close\r\n\r\n");
    conn.write_all(request.as_bytes()).await?;
    let mut buf = [0u8; 64];
    let mut n = 0;
    while n < 12 {
        let read = conn.read(&mut buf[n..]).await?;
        anyhow::ensure!(read > 0, "connection closed before a status line");
        n += read;
    }
    let line = std::str::from_utf8(&buf[..n]).unwrap_or("");
    let status: u16 = line
        .strip_prefix("HTTP/1.")
        .and_then(|rest| rest.get(2..5))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| {
            anyhow::anyhow!(
                "not an HTTP response: {:?}",
                line.lines().next().unwrap_or("")
            )
        })?;
    Ok(status)
}
