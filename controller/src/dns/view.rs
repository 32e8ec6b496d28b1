//! Which proxy instances DNS publishes: a fresh heartbeat that says ready, and — unless
//! turned off — an active probe of the instance's public HTTPS listener
//! (`GET <probe.path>`, answered by the proxy itself) passing its thresholds.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Instant;

use futures_util::future::join_all;
use rampart_config::snapshot::DnsInstance;
use rampart_config::DnsProbe;
use tokio::sync::watch;

use crate::fleet::registry::Candidate;
use crate::fleet::Fleet;

/// One instance as DNS sees it.
#[derive(Clone, Debug, PartialEq)]
pub struct Seen {
    /// Instance id.
    pub id: String,
    /// Public addresses.
    pub addrs: Vec<IpAddr>,
    /// Published.
    pub ready: bool,
    /// Since when `ready` has had its value: for an instance that died, its last sign
    /// of life; for one that came up, when it was first seen ready. Convergence is
    /// measured from here.
    pub since: Instant,
    /// For `/status`.
    pub detail: DnsInstance,
}

#[derive(Debug, Default)]
struct ProbeState {
    ok_streak: u32,
    fail_streak: u32,
    healthy: bool,
    probed: bool,
    last_ok: Option<Instant>,
    last_error: Option<String>,
    ready: bool,
    since: Option<Instant>,
}

/// Keeps the view current: every `probe.interval`, reads the registry, probes every
/// candidate, and publishes the view when an instance's readiness or addresses change.
pub async fn run(
    fleet: Arc<Fleet>,
    probe: DnsProbe,
    sni: String,
    tx: watch::Sender<Vec<Seen>>,
    mut shutdown: watch::Receiver<bool>,
) {
    let client = match probe_client() {
        Ok(c) => c,
        Err(e) => {
            tracing::error!("DNS probe client: {e:#}; DNS follows heartbeats only");
            None
        }
    };
    let mut states: BTreeMap<String, ProbeState> = BTreeMap::new();
    let mut tick = tokio::time::interval(probe.interval.0);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = fleet.registry.containers_changed.notified() => {}
            _ = shutdown.wait_for(|s| *s) => return,
        }
        let candidates = fleet.registry.candidates();
        let now = Instant::now();
        let results: Vec<Option<Result<(), String>>> = join_all(candidates.iter().map(|c| {
            let client = client.clone();
            let probe = &probe;
            let sni = sni.as_str();
            async move {
                if !probe.enabled || !c.fresh_ready {
                    return None;
                }
                let client = client?;
                Some(probe_one(&client, c, probe, sni).await)
            }
        }))
        .await;
        states.retain(|id, _| candidates.iter().any(|c| &c.id == id));
        let mut view = Vec::with_capacity(candidates.len());
        for (c, result) in candidates.iter().zip(results) {
            let s = states.entry(c.id.clone()).or_default();
            match result {
                Some(Ok(())) => {
                    s.probed = true;
                    s.ok_streak += 1;
                    s.fail_streak = 0;
                    s.last_ok = Some(now);
                    s.last_error = None;
                    if s.ok_streak >= probe.healthy_threshold {
                        s.healthy = true;
                    }
                }
                Some(Err(e)) => {
                    s.probed = true;
                    s.fail_streak += 1;
                    s.ok_streak = 0;
                    s.last_error = Some(e);
                    if s.fail_streak >= probe.unhealthy_threshold {
                        s.healthy = false;
                    }
                }
                None => {
                    // Not probed (heartbeat not ready, or probing off): the next
                    // probe starts from scratch.
                    s.probed = false;
                    s.ok_streak = 0;
                    s.fail_streak = 0;
                    s.healthy = false;
                }
            }
            let probe_on = probe.enabled && client.is_some();
            let ready = c.fresh_ready && (!probe_on || s.healthy);
            if s.since.is_none() || ready != s.ready {
                // Going down: measured from the last sign of life.
                let last_life = if probe_on {
                    s.last_ok
                } else {
                    c.last_heartbeat
                };
                s.since = Some(if ready {
                    now
                } else {
                    last_life.unwrap_or(now).min(now)
                });
                s.ready = ready;
            }
            view.push(Seen {
                id: c.id.clone(),
                addrs: c.addrs.clone(),
                ready,
                since: s.since.unwrap_or(now),
                detail: DnsInstance {
                    id: c.id.clone(),
                    addrs: c.addrs.clone(),
                    heartbeat_ready: c.fresh_ready,
                    probe_ok: (probe_on && s.probed).then_some(s.healthy),
                    probe_error: s.last_error.clone(),
                    ready,
                },
            });
        }
        tx.send_if_modified(|old| {
            let changed = old.len() != view.len()
                || old
                    .iter()
                    .zip(&view)
                    .any(|(a, b)| a.id != b.id || a.addrs != b.addrs || a.ready != b.ready);
            let details = old.iter().zip(&view).any(|(a, b)| a.detail != b.detail);
            if changed || details {
                *old = view;
            }
            changed
        });
    }
}

/// The TLS client of the probe. It checks that the listener completes a handshake and
/// answers, not who signed its certificate: proxies serve their public names'
/// certificates, and the probe connects by address.
fn probe_client() -> anyhow::Result<Option<Arc<rustls::ClientConfig>>> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(rampart_pki::AcceptAnyServerCert::new()))
        .with_no_client_auth();
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Some(Arc::new(tls)))
}

async fn probe_one(
    tls: &Arc<rustls::ClientConfig>,
    c: &Candidate,
    probe: &DnsProbe,
    sni: &str,
) -> Result<(), String> {
    let port = probe
        .port
        .or(c.https_port)
        .ok_or("the instance reports no HTTPS listener; set dns.probe.port")?;
    let addr = SocketAddr::new(c.addrs[0], port);
    match tokio::time::timeout(probe.timeout.0, get(tls, addr, sni, &probe.path)).await {
        Ok(Ok(status)) if status.is_success() => Ok(()),
        Ok(Ok(status)) => Err(format!("{addr}: {} answered {status}", probe.path)),
        Ok(Err(e)) if e.downcast_ref::<std::io::Error>().is_some_and(|e| e.to_string().contains("alert")) => {
            Err(format!(
                "{addr}: TLS handshake refused ({e}); the probe sends SNI {sni}: give the proxies a certificate for it"
            ))
        }
        Ok(Err(e)) => Err(format!("{addr}: {e:#}")),
        Err(_) => Err(format!(
            "{addr}: no answer within {:?} (dns.probe.timeout)",
            probe.timeout.0
        )),
    }
}

/// One HTTPS GET to `addr`, with `sni` as server name and Host.
async fn get(
    tls: &Arc<rustls::ClientConfig>,
    addr: SocketAddr,
    sni: &str,
    path: &str,
) -> anyhow::Result<http::StatusCode> {
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let name = rustls::pki_types::ServerName::try_from(sni.to_string())?;
    let stream = tokio_rustls::TlsConnector::from(tls.clone())
        .connect(name, tcp)
        .await?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let req = http::Request::get(path)
        .header(http::header::HOST, sni)
        .header(http::header::CONNECTION, "close")
        .header(http::header::USER_AGENT, "rampart-dns-probe")
        .body(http_body_util::Empty::<bytes::Bytes>::new())?;
    Ok(sender.send_request(req).await?.status())
}
