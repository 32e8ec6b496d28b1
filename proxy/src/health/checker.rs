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

use super::{now_ms, EndpointState};
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
        match &result {
            Ok(Err(e)) => state.note_error(now_ms(), format!("health check: {e:#}")),
            Err(_) => state.note_error(
                now_ms(),
                format!("health check: no answer within {:?}", check.timeout.0),
            ),
            Ok(Ok(())) => {}
        }
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
    let scheme = if peer.tls.is_some() { "https" } else { "http" };
    let http = match probe {
        Probe::Tcp => return Ok(()),
        Probe::Grpc(grpc) => {
            anyhow::ensure!(
                conn.h2,
                "the endpoint did not negotiate HTTP/2 for a gRPC check"
            );
            return grpc_serving(conn.io, &format!("{scheme}://{addr}"), &grpc.service).await;
        }
        Probe::Http(http) => http,
    };
    let host = http
        .host
        .as_ref()
        .map_or_else(|| addr.to_string(), ToString::to_string);
    let status = if conn.h2 {
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

/// Runs `exchange` on an HTTP/2 client connection over `io` (prior knowledge or ALPN),
/// driving the connection beside it.
async fn over_h2<T, F, Fut>(io: Box<dyn ProbeIo>, exchange: F) -> anyhow::Result<T>
where
    F: FnOnce(h2::client::SendRequest<bytes::Bytes>) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<T>>,
{
    let (client, connection) = h2::client::handshake(io).await?;
    tokio::select! {
        done = exchange(client) => done,
        ended = connection => Err(match ended {
            Ok(()) => anyhow::anyhow!("the endpoint closed the HTTP/2 connection"),
            Err(e) => e.into(),
        }),
    }
}

/// The status of a GET over HTTP/2.
async fn h2_status(io: Box<dyn ProbeIo>, uri: &str) -> anyhow::Result<u16> {
    let request = http::Request::get(uri)
        .header("user-agent", "rampart-health-check")
        .body(())?;
    over_h2(io, |mut client| async move {
        let (response, _) = client.send_request(request, true)?;
        Ok(response.await?.status().as_u16())
    })
    .await
}

/// A `grpc.health.v1.Health/Check` call for `service` answers SERVING.
async fn grpc_serving(io: Box<dyn ProbeIo>, base: &str, service: &str) -> anyhow::Result<()> {
    let request = http::Request::post(format!("{base}/grpc.health.v1.Health/Check"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header("user-agent", "rampart-health-check")
        .body(())?;
    over_h2(io, |mut client| async move {
        let (response, mut body) = client.send_request(request, false)?;
        body.send_data(grpc_frame(&health_request(service)), true)?;
        let response = response.await?;
        anyhow::ensure!(
            response.status() == 200,
            "HTTP status {}",
            response.status()
        );
        let trailers_only = response.headers().get("grpc-status").cloned();
        let mut body = response.into_body();
        let mut message = bytes::BytesMut::new();
        while let Some(chunk) = body.data().await {
            let chunk = chunk?;
            let _ = body.flow_control().release_capacity(chunk.len());
            message.extend_from_slice(&chunk);
        }
        let status = match trailers_only {
            Some(s) => Some(s),
            None => body
                .trailers()
                .await?
                .and_then(|t| t.get("grpc-status").cloned()),
        };
        let status = status
            .as_ref()
            .and_then(|s| s.to_str().ok())
            .unwrap_or("none");
        anyhow::ensure!(status == "0", "grpc-status {status}");
        match health_status(&message) {
            Some(1) => Ok(()),
            Some(2) => anyhow::bail!("NOT_SERVING"),
            Some(3) => anyhow::bail!("SERVICE_UNKNOWN"),
            other => anyhow::bail!("health status {other:?}, not SERVING"),
        }
    })
    .await
}

/// `HealthCheckRequest { service = 1 }` in protobuf's wire form.
fn health_request(service: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(service.len() + 3);
    if !service.is_empty() {
        out.push(0x0a); // field 1, length-delimited
        let mut len = service.len();
        while len >= 0x80 {
            out.push(u8::try_from(len & 0x7f).unwrap_or(0) | 0x80);
            len >>= 7;
        }
        out.push(u8::try_from(len).unwrap_or(0));
        out.extend_from_slice(service.as_bytes());
    }
    out
}

/// A gRPC length-prefixed message, uncompressed.
fn grpc_frame(message: &[u8]) -> bytes::Bytes {
    let mut out = Vec::with_capacity(5 + message.len());
    out.push(0);
    out.extend_from_slice(&u32::try_from(message.len()).unwrap_or(0).to_be_bytes());
    out.extend_from_slice(message);
    out.into()
}

/// `HealthCheckResponse.status` (field 1, an enum) from a gRPC frame; absent means 0
/// (UNKNOWN).
fn health_status(frame: &[u8]) -> Option<u64> {
    let message = frame.get(5..)?;
    let mut i = 0;
    let mut status = 0;
    while i < message.len() {
        let (key, n) = varint(message.get(i..)?)?;
        i += n;
        match key & 7 {
            0 => {
                let (value, n) = varint(message.get(i..)?)?;
                i += n;
                if key >> 3 == 1 {
                    status = value;
                }
            }
            2 => {
                let (len, n) = varint(message.get(i..)?)?;
                i += n + usize::try_from(len).ok()?;
            }
            1 => i += 8,
            5 => i += 4,
            _ => return None,
        }
    }
    Some(status)
}

fn varint(bytes: &[u8]) -> Option<(u64, usize)> {
    let mut value = 0u64;
    for (i, b) in bytes.iter().enumerate().take(10) {
        value |= u64::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return Some((value, i + 1));
        }
    }
    None
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn health_messages_follow_protobufs_wire_form() {
        assert_eq!(health_request(""), b"");
        assert_eq!(health_request("api"), b"\x0a\x03api");
        assert_eq!(health_request(&"s".repeat(200))[..3], [0x0a, 0xc8, 0x01]);
        let frame = |m: &[u8]| grpc_frame(m).to_vec();
        assert_eq!(health_status(&frame(b"\x08\x01")), Some(1));
        assert_eq!(health_status(&frame(b"")), Some(0));
        // Unknown fields are skipped.
        assert_eq!(health_status(&frame(b"\x12\x02hi\x08\x02")), Some(2));
        assert_eq!(health_status(&frame(b"\x08")), None);
        assert_eq!(health_status(b"\x00"), None);
    }
}
