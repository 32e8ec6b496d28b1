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
use tokio::net::TcpStream;
use tokio::task::JoinHandle;

use super::EndpointState;
use crate::live::Live;

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

    fn desired(&self) -> HashMap<String, (SocketAddr, HealthCheck, Arc<EndpointState>, String)> {
        let generation = self.live.current.load();
        let mut out = HashMap::new();
        for pool in generation.pools.values() {
            let Some(check) = &pool.health_check else {
                continue;
            };
            for ep in &pool.endpoints {
                // The key includes the settings, so a changed check restarts its task.
                let key = format!("{}|{}|{}|{check:?}", pool.name, ep.id, ep.addr);
                out.insert(
                    key,
                    (
                        ep.addr,
                        check.clone(),
                        ep.state.clone(),
                        format!("{}/{}", pool.name, ep.id),
                    ),
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
            for (key, (addr, check, state, label)) in desired {
                tasks.insert(key, tokio::spawn(probe_loop(addr, check, state, label)));
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

async fn probe_loop(
    addr: SocketAddr,
    check: HealthCheck,
    state: Arc<EndpointState>,
    label: String,
) {
    let mut ticker = tokio::time::interval(check.interval.0);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let result = tokio::time::timeout(check.timeout.0, probe(addr, &check.probe)).await;
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

/// One probe: a TCP connect, or an HTTP/1.1 GET whose status must match.
///
/// # Errors
/// What failed, for the log.
pub async fn probe(addr: SocketAddr, probe: &Probe) -> anyhow::Result<()> {
    let mut conn = TcpStream::connect(addr).await?;
    let Probe::Http(http) = probe else {
        return Ok(());
    };
    let host = http
        .host
        .as_ref()
        .map_or_else(|| addr.to_string(), ToString::to_string);
    let request = format!("GET {} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: rampart-health-check\r\nConnection: close\r\n\r\n", http.path);
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
    anyhow::ensure!(
        status == http.expect_status,
        "status {status}, expected {}",
        http.expect_status
    );
    Ok(())
}
