//! Fleet mode: the proxy takes its snapshots from a controller instead of a file.
//! Enrol once (join token → client certificate in the data directory), then watch for
//! snapshots and apply each through the same build → swap pipeline as a file reload,
//! ack it, and cache it in `<data_dir>/last-snapshot` so that a restart while the
//! controller is down serves what was served before (static stability). Heartbeats
//! tell the controller this instance is alive and ready.

pub mod client;

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use rampart_config::snapshot::{Ack, AckResult, Heartbeat, Snapshot, NOT_ENROLLED};
use rampart_pki::{write_atomic, Mode};
use rand::Rng;

use crate::live::Live;
use client::{CallError, FleetClient, Identity, WatchResult};

/// How a proxy joins a fleet.
#[derive(Debug, Clone)]
pub struct FleetOptions {
    /// The controller's fleet API, `https://host:port`.
    pub controller: String,
    /// One-time join token, needed only until the proxy has enrolled.
    pub join_token: Option<String>,
    /// A file to read the join token from (written by the controller's
    /// `join_token_file`), re-read until enrolment succeeds.
    pub join_token_file: Option<PathBuf>,
    /// How often to send a heartbeat.
    pub heartbeat_every: Duration,
    /// Public addresses to announce (for DNS).
    pub public_addrs: Vec<IpAddr>,
}

/// The file a proxy caches its last applied snapshot in.
#[must_use]
pub fn cache_path(data_dir: &Path) -> PathBuf {
    data_dir.join("last-snapshot")
}

/// The cached snapshot, if there is a readable one. A corrupt cache is reported and
/// ignored (the controller will send a fresh snapshot).
#[must_use]
pub fn load_cached(data_dir: &Path) -> Option<Snapshot> {
    let path = cache_path(data_dir);
    let bytes = std::fs::read(&path).ok()?;
    match serde_json::from_slice(&bytes) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!("ignoring the cached snapshot {}: {e}", path.display());
            None
        }
    }
}

/// Decodes and applies a snapshot received from the controller; on success the raw
/// body becomes the cache. Returns the ack to send.
pub fn apply_received(live: &Live, data_dir: &Path, version: u64, body: &[u8]) -> Ack {
    let result = serde_json::from_slice::<Snapshot>(body)
        .map_err(|e| {
            live.reload_failed(&anyhow::anyhow!("snapshot {version} does not decode: {e}"))
        })
        .and_then(|snap| live.apply_snapshot(snap));
    match result {
        Ok(v) => {
            if let Err(e) = write_atomic(&cache_path(data_dir), body, Mode::Private) {
                tracing::warn!("snapshot {v} serves but was not cached: {e:#}");
            }
            Ack {
                version: v,
                applied: AckResult::Ok,
                detail: String::new(),
            }
        }
        Err(e) => Ack {
            version,
            applied: AckResult::Error,
            detail: format!("{e:#}"),
        },
    }
}

/// [`apply_received`] on a blocking thread (decoding and building are CPU work), for
/// both sources of snapshots. A refusal is logged where it happens (the reload failure).
async fn apply_in_background(
    live: Arc<Live>,
    data_dir: PathBuf,
    version: u64,
    body: bytes::Bytes,
) -> Ack {
    let ack = tokio::task::spawn_blocking(move || apply_received(&live, &data_dir, version, &body))
        .await
        .unwrap_or_else(|e| {
            tracing::error!("applying snapshot version {version} panicked: {e}");
            Ack {
                version,
                applied: AckResult::Error,
                detail: format!("applying panicked: {e}"),
            }
        });
    if ack.applied == AckResult::Ok {
        tracing::info!("snapshot version {version} is serving");
    }
    ack
}

/// Jittered exponential back-off between failed calls.
#[derive(Debug)]
struct Backoff {
    next: Duration,
}

impl Backoff {
    const FIRST: Duration = Duration::from_millis(250);
    const MAX: Duration = Duration::from_secs(30);

    fn new() -> Self {
        Self { next: Self::FIRST }
    }
    fn reset(&mut self) {
        self.next = Self::FIRST;
    }
    /// The next wait: uniformly in [next/2, next], then doubled up to the cap.
    fn step(&mut self) -> Duration {
        let cur = self.next;
        self.next = (self.next * 2).min(Self::MAX);
        let ms = u64::try_from(cur.as_millis()).unwrap_or(u64::MAX);
        Duration::from_millis(rand::rng().random_range(ms / 2..=ms))
    }
}

/// How often a running proxy checks whether its client certificate needs renewal.
const RENEWAL_CHECK: Duration = Duration::from_secs(6 * 3600);

/// Snapshots handed over in process (`rampart up`): version and encoded snapshot.
pub type LocalFeed = tokio::sync::watch::Receiver<(u64, bytes::Bytes)>;

/// Applies snapshots from a controller running in the same process: no network hop,
/// same decode → build → swap pipeline and cache as over the fleet API.
pub struct LocalFeedService {
    live: Arc<Live>,
    feed: LocalFeed,
    data_dir: PathBuf,
}

impl LocalFeedService {
    /// A service applying what `feed` publishes into `live`.
    #[must_use]
    pub fn new(live: Arc<Live>, feed: LocalFeed, data_dir: PathBuf) -> Self {
        Self {
            live,
            feed,
            data_dir,
        }
    }
}

#[async_trait]
impl BackgroundService for LocalFeedService {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut feed = self.feed.clone();
        loop {
            let (version, body) = feed.borrow_and_update().clone();
            if version != 0 && version != self.live.current.load().version {
                apply_in_background(self.live.clone(), self.data_dir.clone(), version, body).await;
            }
            tokio::select! {
                _ = shutdown.changed() => return,
                r = feed.changed() => if r.is_err() { return },
            }
        }
    }
}

/// The fleet background service of a proxy.
pub struct FleetService {
    live: Arc<Live>,
    options: FleetOptions,
    data_dir: PathBuf,
    /// The handshakes' on-demand requests, taken when the service starts.
    requests: std::sync::Mutex<Option<crate::tls::on_demand::Requests>>,
    /// The client of the enrolled identity, for the on-demand requests.
    client: Arc<arc_swap::ArcSwapOption<FleetClient>>,
}

impl FleetService {
    /// A fleet service applying snapshots into `live` and passing the handshakes'
    /// on-demand `requests` to the controller.
    #[must_use]
    pub fn new(
        live: Arc<Live>,
        options: FleetOptions,
        data_dir: PathBuf,
        requests: Option<crate::tls::on_demand::Requests>,
    ) -> Self {
        Self {
            live,
            options,
            data_dir,
            requests: std::sync::Mutex::new(requests),
            client: Arc::default(),
        }
    }

    /// Passes each on-demand request to the controller, with the current client; a
    /// request while there is none (not enrolled yet) fails its handshake.
    async fn on_demand(
        mut requests: crate::tls::on_demand::Requests,
        client: Arc<arc_swap::ArcSwapOption<FleetClient>>,
    ) {
        while let Some(wanted) = requests.recv().await {
            let Some(client) = client.load_full() else {
                continue;
            };
            tokio::spawn(async move {
                match client.on_demand(&wanted.name).await {
                    Ok(answer) => {
                        // The handshake may have stopped waiting.
                        let _ = wanted.reply.send(answer);
                    }
                    Err(e) => tracing::warn!("on-demand TLS: asking for {}: {e}", wanted.name),
                }
            });
        }
    }

    /// The stored identity, or a new one from enrolment.
    async fn identity(&self) -> Result<Identity, String> {
        match Identity::load(&self.data_dir) {
            Ok(Some(id)) => return Ok(id),
            Ok(None) => {}
            Err(e) => return Err(format!("{e:#}")),
        }
        let token = match (&self.options.join_token, &self.options.join_token_file) {
            (Some(token), _) => token.clone(),
            (None, Some(file)) => std::fs::read_to_string(file)
                .map(|t| t.trim().to_string())
                .map_err(|e| {
                    format!(
                        "waiting for the join token in {} ({e}); the controller writes it there when its controller.join_token_file names that file",
                        file.display()
                    )
                })?,
            (None, None) => {
                return Err(format!(
                    "this proxy is not enrolled ({} has no fleet/identity.json); start it once with --join-token from `rampart controller token create`",
                    self.data_dir.display()
                ))
            }
        };
        let hostname = std::fs::read_to_string("/etc/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_else(|_| "unknown".into());
        let id = client::enroll(&self.options.controller, &token, &hostname)
            .await
            .map_err(|e| format!("enrolment: {e}"))?;
        id.save(&self.data_dir).map_err(|e| format!("{e:#}"))?;
        tracing::info!("enrolled with the controller as {}", id.instance);
        Ok(id)
    }

    fn spawn_heartbeats(&self, client: &FleetClient) -> tokio::task::JoinHandle<()> {
        tokio::spawn(Self::heartbeats(
            self.live.clone(),
            client.clone(),
            self.options.clone(),
        ))
    }

    async fn heartbeats(live: Arc<Live>, client: FleetClient, options: FleetOptions) {
        let mut tick = tokio::time::interval(options.heartbeat_every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut changes = live.subscribe();
        loop {
            let current = live.current.load();
            let hb = Heartbeat {
                public_addrs: options.public_addrs.clone(),
                ready: live.is_ready(),
                version: current.version,
                https_port: current.https_port,
                traffic: Some(live.metrics.rolling.summary(60)),
            };
            if let Err(e) = client.heartbeat(&hb).await {
                tracing::debug!("heartbeat: {e}");
            }
            // Also right after a swap, so the controller sees the new version at once.
            tokio::select! {
                _ = tick.tick() => {}
                r = changes.changed() => if r.is_err() { return },
            }
        }
    }
}

impl FleetService {
    /// Records the fleet state shown in /status.
    fn report(&self, instance: Option<&str>, error: Option<String>) {
        self.live
            .fleet
            .store(Arc::new(Some(crate::live::FleetStatus {
                controller: self.options.controller.clone(),
                instance: instance.map(str::to_string),
                connected: error.is_none(),
                last_error: error,
            })));
    }

    /// Renews the client certificate (a third of its lifetime left); keeps the current
    /// one when the controller cannot renew it now (checked again at the next start).
    async fn renewed(&self, client: FleetClient) -> FleetClient {
        let renewed = match client.renew().await {
            Ok(id) => id,
            Err(e) => {
                tracing::warn!("renewing the fleet client certificate: {e}");
                return client;
            }
        };
        if let Err(e) = renewed.save(&self.data_dir) {
            tracing::warn!("storing the renewed certificate: {e:#}");
            return client;
        }
        match FleetClient::new(&self.options.controller, renewed, Duration::from_secs(60)) {
            Ok(c) => {
                tracing::info!("fleet client certificate renewed");
                c
            }
            Err(e) => {
                tracing::warn!("the renewed certificate is unusable: {e:#}");
                client
            }
        }
    }
}

#[async_trait]
impl BackgroundService for FleetService {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let requests = self.requests.lock().expect("taken once").take();
        let on_demand = requests.map(|r| tokio::spawn(Self::on_demand(r, self.client.clone())));
        let mut backoff = Backoff::new();
        // Again after the controller forgot this instance, when a token can enrol it.
        while self.run_enrolled(&mut shutdown, &mut backoff).await {}
        if let Some(task) = on_demand {
            task.abort();
        }
    }
}

impl FleetService {
    /// Enrols if needed, then follows the controller until shutdown (false), or until
    /// the controller no longer knows this instance and a join token can enrol it
    /// again (true: the stored identity is gone).
    async fn run_enrolled(&self, shutdown: &mut ShutdownWatch, backoff: &mut Backoff) -> bool {
        let identity = loop {
            match self.identity().await {
                Ok(id) => break id,
                Err(e) => {
                    tracing::error!("{e}");
                    self.report(None, Some(e));
                }
            }
            tokio::select! {
                _ = shutdown.changed() => return false,
                () = tokio::time::sleep(backoff.step()) => {}
            }
        };
        // The client waits longer than any controller holds a watch.
        let mut client =
            match FleetClient::new(&self.options.controller, identity, Duration::from_secs(60)) {
                Ok(c) => c,
                Err(e) => {
                    tracing::error!(
                        "fleet identity unusable, remove {}/fleet and enrol again: {e:#}",
                        self.data_dir.display()
                    );
                    return false;
                }
            };
        if client.identity.renewal_due() {
            client = self.renewed(client).await;
        }
        self.client.store(Some(Arc::new(client.clone())));
        let mut beats = self.spawn_heartbeats(&client);
        // The last version seen, applied or not: a refused snapshot is not fetched again.
        let mut seen = self.live.current.load().version;
        let mut renewal_checked = tokio::time::Instant::now();
        backoff.reset();
        loop {
            // Long-running proxies renew too (checked a few times a day; cheap).
            if renewal_checked.elapsed() > RENEWAL_CHECK {
                renewal_checked = tokio::time::Instant::now();
                if client.identity.renewal_due() {
                    client = self.renewed(client).await;
                    self.client.store(Some(Arc::new(client.clone())));
                    beats.abort();
                    beats = self.spawn_heartbeats(&client);
                }
            }
            let result = tokio::select! {
                _ = shutdown.changed() => break,
                r = client.watch(seen) => r,
            };
            let instance = client.identity.instance.clone();
            self.report(
                Some(&instance),
                result.as_ref().err().map(ToString::to_string),
            );
            match result {
                Ok(WatchResult::NoChange) => backoff.reset(),
                Ok(WatchResult::Snapshot { version, body }) => {
                    backoff.reset();
                    seen = version;
                    let ack = apply_in_background(
                        self.live.clone(),
                        self.data_dir.clone(),
                        version,
                        body,
                    )
                    .await;
                    if let Err(e) = client.ack(&ack).await {
                        tracing::warn!("ack of version {version}: {e}");
                    }
                }
                Err(CallError::Refused {
                    code: Some(code),
                    message,
                    ..
                }) if code == NOT_ENROLLED && self.has_token() => {
                    tracing::warn!(
                        "the controller no longer knows instance {instance} ({message}); enrolling again with the join token"
                    );
                    match Identity::remove(&self.data_dir) {
                        Ok(()) => {
                            beats.abort();
                            return true;
                        }
                        Err(e) => tracing::error!("{e:#}"),
                    }
                }
                Err(e) => {
                    let wait = backoff.step();
                    match &e {
                        CallError::Refused { .. } => {
                            tracing::error!("watch: {e}; retrying in {wait:?}")
                        }
                        CallError::Unreachable(_) => tracing::warn!(
                            "watch: {e}; serving version {}, retrying in {wait:?}",
                            self.live.current.load().version
                        ),
                    }
                    tokio::select! {
                        _ = shutdown.changed() => break,
                        () = tokio::time::sleep(wait) => {}
                    }
                }
            }
        }
        beats.abort();
        false
    }

    /// Whether a join token (given, or in a file) is at hand to enrol with.
    fn has_token(&self) -> bool {
        self.options.join_token.is_some() || self.options.join_token_file.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_with_jitter_up_to_the_cap() {
        let mut b = Backoff::new();
        let first = b.step();
        assert!(first >= Backoff::FIRST / 2 && first <= Backoff::FIRST);
        for _ in 0..20 {
            assert!(b.step() <= Backoff::MAX);
        }
        assert!(b.step() >= Backoff::MAX / 2);
        b.reset();
        assert!(b.step() <= Backoff::FIRST);
    }
}
