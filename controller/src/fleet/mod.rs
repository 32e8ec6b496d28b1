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
use crate::store::{get_json, put_json, Store};
use registry::{InstanceRecord, Registry};

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

/// Forgets proxy instances silent for longer than `forget_after`, so that a fleet
/// whose replicas come and go (each enrolling anew) does not keep every replica it
/// ever had in the store, `/status` and the per-instance metrics. The leader deletes
/// the stored records; a follower only drops its own view (it learns of the fleet from
/// the same store).
pub async fn forget_silent(
    fleet: Arc<Fleet>,
    forget_after: Duration,
    leader: watch::Receiver<bool>,
    mut shutdown: watch::Receiver<bool>,
) {
    let period = (forget_after / 4).clamp(Duration::from_millis(100), Duration::from_secs(60));
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.changed() => return,
            _ = tick.tick() => {}
        }
        for (id, hostname) in fleet.registry.silent(forget_after) {
            if !*leader.borrow() {
                fleet.registry.forget_if_silent(&id, forget_after);
                continue;
            }
            match forget_stored(&fleet, &id, forget_after).await {
                Ok(true) => {
                    fleet.metrics.instances_forgotten.inc();
                    tracing::info!(
                        "forgot proxy instance {id} ({hostname}): no heartbeat for over {} (controller.forget_after); it must enrol again to rejoin",
                        rampart_config::Dur(forget_after)
                    );
                }
                Ok(false) => {}
                Err(e) => tracing::warn!("forgetting proxy instance {id}: {e:#}; retrying later"),
            }
        }
    }
}

/// Deletes the stored record (and shared heartbeat) of the silent instance `id`, then
/// drops it from the registry. When a heartbeat came in meanwhile, the record is put
/// back and nothing is forgotten (false). A record revoked since the registry last
/// read it (`rampart controller instance revoke` writes only the store) is kept.
async fn forget_stored(fleet: &Fleet, id: &str, forget_after: Duration) -> anyhow::Result<bool> {
    let key = format!("instances/{id}");
    let record: Option<InstanceRecord> = get_json(fleet.store.as_ref(), &key).await?;
    if let Some(r) = record.as_ref().filter(|r| r.revoked) {
        fleet.registry.known(id, r);
        return Ok(false);
    }
    fleet.store.delete(&key).await?;
    if fleet.registry.forget_if_silent(id, forget_after) {
        if fleet.shared {
            fleet.store.delete(&format!("heartbeats/{id}")).await?;
        }
        return Ok(true);
    }
    if let Some(record) = record {
        put_json(fleet.store.as_ref(), &key, &record).await?;
    }
    Ok(false)
}

impl Fleet {
    /// The current snapshot version.
    #[must_use]
    pub fn version(&self) -> u64 {
        self.published.borrow().version
    }
}
