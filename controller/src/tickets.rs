//! The fleet's TLS session ticket keys: made and rotated by the leader, kept in the
//! store (so a new leader or a restarted controller continues them), and carried to
//! every proxy in the snapshot, so that a client resumes its session on any proxy.
//!
//! Three keys are kept: the next, the current and the previous. The current seals new
//! tickets; all three open. At each rotation the next becomes current — every proxy
//! has had it for a whole period by then, so a ticket it seals opens everywhere even
//! while the new snapshot is still travelling — and the previous is dropped.

use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use rampart_config::snapshot::TicketKeys;
use rampart_config::Config;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::store::Store;

/// Where the keys are kept.
const KEY: &str = "tls/ticket-keys";

/// The keys as stored: newest first (next, current, previous), and when the current
/// one started sealing.
#[derive(Clone, Deserialize, Serialize, PartialEq, Eq)]
pub(crate) struct Stored {
    rotated_at: u64,
    keys: Vec<String>,
}

/// A random 32-byte key, base64url.
fn fresh_key() -> anyhow::Result<String> {
    let mut key = [0u8; 32];
    rustls::crypto::aws_lc_rs::default_provider()
        .secure_random
        .fill(&mut key)
        .map_err(|_| anyhow::anyhow!("the system's random source failed"))?;
    Ok(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(key))
}

/// The keys at `now` with a rotation every `period` seconds: `stored` as it is while
/// its current key is younger than a period, else rotated (after a long pause, such as
/// a controller stopped for days, every key is new).
pub(crate) fn rotated(stored: Option<Stored>, now: u64, period: u64) -> anyhow::Result<Stored> {
    let period = period.max(1);
    let mut s = match stored {
        Some(s) if s.keys.len() >= 2 && now < s.rotated_at.saturating_add(2 * period) => s,
        // First start, or every key expired: a fresh set (its previous key is new too,
        // so it opens nothing: harmless).
        _ => Stored {
            rotated_at: now,
            keys: vec![fresh_key()?, fresh_key()?, fresh_key()?],
        },
    };
    if now >= s.rotated_at.saturating_add(period) {
        s.keys.insert(0, fresh_key()?);
        s.keys.truncate(3);
        s.rotated_at = now;
    }
    Ok(s)
}

impl Stored {
    /// What the snapshot carries: the current key first (it seals), then the next and
    /// the previous (they open).
    pub(crate) fn snapshot(&self, period: u64) -> TicketKeys {
        let mut keys = Vec::with_capacity(3);
        if let Some(current) = self.keys.get(1) {
            keys.push(current.clone());
        }
        keys.push(self.keys[0].clone());
        keys.extend(self.keys.get(2).cloned());
        TicketKeys {
            lifetime: u32::try_from(period).unwrap_or(u32::MAX),
            keys,
        }
    }
}

/// As leader: keeps the stored keys rotated and publishes them for the compile loop
/// (`None` while `session_tickets.enabled` is false). A follower publishes nothing
/// (it publishes the leader's snapshot as it is).
pub(crate) async fn run(
    store: Arc<dyn Store>,
    mut config: watch::Receiver<Config>,
    mut leader: watch::Receiver<bool>,
    out: watch::Sender<Option<TicketKeys>>,
    mut shutdown: watch::Receiver<bool>,
) {
    let (mut config_open, mut leader_open) = (true, true);
    loop {
        let settings = config.borrow_and_update().session_tickets.clone();
        let leading = *leader.borrow_and_update();
        let period = settings.rotate.0.as_secs().max(1);
        let mut wait = Duration::from_secs(3600);
        if leading && settings.enabled {
            match pass(store.as_ref(), period).await {
                Ok(keys) => {
                    let now = Some(keys.snapshot(period));
                    out.send_if_modified(|held| {
                        let changed = *held != now;
                        *held = now;
                        changed
                    });
                    let due = keys.rotated_at.saturating_add(period);
                    wait =
                        Duration::from_secs(due.saturating_sub(rampart_config::unix_now()).max(1));
                }
                Err(e) => {
                    tracing::error!("session ticket keys: {e:#}");
                    wait = Duration::from_secs(10);
                }
            }
        } else if !settings.enabled {
            out.send_if_modified(|held| held.take().is_some());
        }
        // A channel that closes (no file to watch; a leadership that never changes)
        // is not a change: its branch goes quiet.
        tokio::select! {
            _ = shutdown.changed() => return,
            r = config.changed(), if config_open => config_open = r.is_ok(),
            r = leader.changed(), if leader_open => leader_open = r.is_ok(),
            () = tokio::time::sleep(wait) => {}
        }
    }
}

/// Reads the stored keys, rotates them when due and stores the result.
async fn pass(store: &dyn Store, period: u64) -> anyhow::Result<Stored> {
    let stored: Option<Stored> = crate::store::get_json(store, KEY).await?;
    let keys = rotated(stored.clone(), rampart_config::unix_now(), period)?;
    if stored.as_ref() != Some(&keys) {
        store.put_leading(KEY, &serde_json::to_vec(&keys)?).await?;
        tracing::info!("session ticket keys rotated (every {period} s)");
    }
    Ok(keys)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_next_key_seals_after_a_period_and_the_previous_one_is_dropped() {
        let hour = 3600;
        let first = rotated(None, 1000, hour).unwrap();
        assert_eq!(first.keys.len(), 3);
        let snap = first.snapshot(hour);
        assert_eq!(snap.lifetime, 3600);
        // Current seals; next and previous open.
        assert_eq!(
            snap.keys,
            vec![
                first.keys[1].clone(),
                first.keys[0].clone(),
                first.keys[2].clone()
            ]
        );
        // Within the period nothing changes.
        assert!(rotated(Some(first.clone()), 1000 + hour - 1, hour).unwrap() == first);
        // A period later the next key seals, the current one still opens.
        let second = rotated(Some(first.clone()), 1000 + hour, hour).unwrap();
        assert_eq!(second.keys[1], first.keys[0]);
        assert_eq!(second.keys[2], first.keys[1]);
        assert!(!second.keys.contains(&first.keys[2]));
        let snap2 = second.snapshot(hour);
        // What the first snapshot sealed with opens under the second; what the second
        // seals with was already in the first.
        assert!(snap2.keys.contains(&snap.keys[0]));
        assert!(snap.keys.contains(&snap2.keys[0]));
        // After two periods without a rotation, every key is new.
        let late = rotated(Some(first.clone()), 1000 + 2 * hour, hour).unwrap();
        assert!(late.keys.iter().all(|k| !first.keys.contains(k)));
    }
}
