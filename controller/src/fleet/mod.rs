//! The fleet side of the controller: the current snapshot as proxies receive it, the
//! enrolled instances, and the API proxies talk to ([`api`]) over mutual TLS ([`tls`]).

pub mod api;
pub mod registry;
pub mod tls;
pub mod tokens;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use rampart_pki::Ca;
use tokio::sync::watch;

use crate::metrics::Metrics;
use crate::store::Store;
use registry::Registry;

/// Client certificates of proxies are valid this long.
pub const CLIENT_CERT_LIFETIME: Duration = Duration::from_secs(365 * 24 * 3600);
/// Largest request body the fleet API reads (enrolment and acks are small).
pub const MAX_BODY: usize = 256 * 1024;

/// A snapshot as sent to proxies: its version and its encoded form, shared by every
/// watcher (encoded once, not once per proxy).
#[derive(Clone, Debug, Default)]
pub struct Published {
    /// Snapshot version (0: nothing compiled yet).
    pub version: u64,
    /// The JSON encoding.
    pub body: Bytes,
}

/// Everything the fleet API needs.
#[derive(Debug)]
pub struct Fleet {
    /// Certificates, tokens, instance records.
    pub store: Arc<dyn Store>,
    /// Signs client certificates.
    pub ca: Ca,
    /// Live instance state.
    pub registry: Registry,
    /// Controller metrics.
    pub metrics: Metrics,
    /// The current snapshot.
    pub published: watch::Sender<Published>,
    /// Longest a watch waits before answering "no change".
    pub watch_timeout: Duration,
    /// Whether other controllers share the store (heartbeats are then shared too).
    pub shared: bool,
}

/// Milliseconds since the Unix epoch.
#[must_use]
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Keeps this controller's registry current with heartbeats other controllers received
/// (shared store only), so that any controller's /status lists the whole fleet.
pub async fn sync_heartbeats(fleet: std::sync::Arc<Fleet>, mut shutdown: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = shutdown.changed() => return,
            _ = tick.tick() => {}
        }
        let entries = match fleet.store.list("heartbeats").await {
            Ok(e) => e,
            Err(e) => {
                tracing::debug!("reading shared heartbeats: {e:#}");
                continue;
            }
        };
        let now = unix_ms();
        for (key, value) in entries {
            let Ok(beat) = serde_json::from_slice::<registry::StoredHeartbeat>(&value) else {
                continue;
            };
            let id = key.trim_start_matches("heartbeats/");
            let age = Duration::from_millis(now.saturating_sub(beat.at_unix_ms));
            fleet.registry.remote_heartbeat(id, &beat, age);
        }
    }
}

impl Fleet {
    /// The current snapshot version.
    #[must_use]
    pub fn version(&self) -> u64 {
        self.published.borrow().version
    }
}
