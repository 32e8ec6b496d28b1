//! What the controller knows about each enrolled proxy instance: the stored record
//! (host name, revoked) and the live state from its heartbeats and acks.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use rampart_config::snapshot::{Ack, AckResult, Heartbeat, InstanceStatus};
use serde::{Deserialize, Serialize};

use crate::discovery::ProxyContainer;
use crate::metrics::Metrics;

/// The stored record of an enrolled instance (`instances/<id>`).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct InstanceRecord {
    /// Host name given at enrolment.
    pub hostname: String,
    /// Unix time of enrolment.
    pub enrolled_at: u64,
    /// Refused from now on.
    pub revoked: bool,
}

/// A proxy instance DNS may publish, from its heartbeats.
#[derive(Clone, Debug)]
pub struct Candidate {
    /// Instance id.
    pub id: String,
    /// Public addresses it reported.
    pub addrs: Vec<IpAddr>,
    /// Its HTTPS listener's port.
    pub https_port: Option<u16>,
    /// Its last heartbeat is recent and says ready.
    pub fresh_ready: bool,
    /// When its last heartbeat arrived.
    pub last_heartbeat: Option<Instant>,
}

/// A heartbeat as shared between controllers (`heartbeats/<id>` in a shared store).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StoredHeartbeat {
    /// Address the proxy connected from.
    pub peer: String,
    /// What it said.
    pub heartbeat: Heartbeat,
    /// Unix time (milliseconds) the controller received it.
    pub at_unix_ms: u64,
}

#[derive(Debug, Default)]
struct LiveState {
    hostname: String,
    peer: Option<String>,
    public_addrs: Vec<IpAddr>,
    https_port: Option<u16>,
    version: u64,
    ready: bool,
    traffic: Option<rampart_config::snapshot::TrafficSummary>,
    last_heartbeat: Option<Instant>,
    last_error: Option<String>,
    revoked: bool,
    /// Matched to a proxy container once: from then on, no container means gone.
    in_container: bool,
    /// When this controller first learnt of the instance (its age when never heard).
    known_since: Option<Instant>,
}

impl LiveState {
    /// Unrevoked, and no heartbeat (or, never heard, no news) for longer than `limit`.
    fn silent(&self, now: Instant, limit: Duration) -> bool {
        !self.revoked
            && self
                .last_heartbeat
                .or(self.known_since)
                .is_some_and(|t| now.saturating_duration_since(t) > limit)
    }
}

/// The state of `id`, created (known from now) if new.
fn entry<'a>(m: &'a mut BTreeMap<String, LiveState>, id: &str) -> &'a mut LiveState {
    m.entry(id.to_string()).or_insert_with(|| LiveState {
        known_since: Some(Instant::now()),
        ..LiveState::default()
    })
}

/// Live state of every instance seen by this controller.
#[derive(Debug)]
pub struct Registry {
    instances: Mutex<BTreeMap<String, LiveState>>,
    stale_after: Duration,
    /// Proxy containers discovery sees (all providers).
    containers: Mutex<Vec<ProxyContainer>>,
    /// Woken when `containers` changes (the DNS view re-reads at once).
    pub containers_changed: tokio::sync::Notify,
}

impl Registry {
    /// An empty registry; instances without a heartbeat for `stale_after` are stale.
    #[must_use]
    pub fn new(stale_after: Duration) -> Self {
        Self {
            instances: Mutex::new(BTreeMap::new()),
            stale_after,
            containers: Mutex::new(Vec::new()),
            containers_changed: tokio::sync::Notify::new(),
        }
    }

    /// How long after its last heartbeat an instance counts as stale.
    #[must_use]
    pub fn stale_after(&self) -> Duration {
        self.stale_after
    }

    /// Whether every enrolled, unrevoked instance has been heard from since this
    /// controller started.
    #[must_use]
    pub fn all_heard(&self) -> bool {
        self.with(|m| m.values().all(|s| s.revoked || s.last_heartbeat.is_some()))
    }

    /// Records the proxy containers discovery sees now.
    pub fn discovered(&self, proxies: Vec<ProxyContainer>) {
        let mut current = self
            .containers
            .lock()
            .expect("containers lock is never poisoned: no panics while held");
        if *current != proxies {
            *current = proxies;
            self.containers_changed.notify_one();
        }
    }

    fn with<T>(&self, f: impl FnOnce(&mut BTreeMap<String, LiveState>) -> T) -> T {
        let mut guard = self
            .instances
            .lock()
            .expect("registry lock is never poisoned: no panics while held");
        f(&mut guard)
    }

    /// Records what the store says about `id`.
    pub fn known(&self, id: &str, record: &InstanceRecord) {
        self.with(|m| {
            let s = entry(m, id);
            s.hostname.clone_from(&record.hostname);
            s.revoked = record.revoked;
        });
    }

    /// Records a heartbeat from `id` connecting from `peer`.
    pub fn heartbeat(&self, id: &str, peer: String, hb: &Heartbeat) {
        self.with(|m| {
            let s = entry(m, id);
            s.peer = Some(peer);
            s.public_addrs.clone_from(&hb.public_addrs);
            s.https_port = hb.https_port;
            s.version = hb.version;
            s.ready = hb.ready;
            s.traffic = hb.traffic;
            s.last_heartbeat = Some(Instant::now());
        });
    }

    /// Records a heartbeat another controller received `age` ago (shared store), unless
    /// this controller heard from the instance more recently.
    pub fn remote_heartbeat(&self, id: &str, beat: &StoredHeartbeat, age: Duration) {
        let at = Instant::now().checked_sub(age).unwrap_or_else(Instant::now);
        self.with(|m| {
            let s = entry(m, id);
            if s.last_heartbeat.is_some_and(|t| t >= at) {
                return;
            }
            s.peer = Some(beat.peer.clone());
            s.public_addrs.clone_from(&beat.heartbeat.public_addrs);
            s.https_port = beat.heartbeat.https_port;
            s.version = beat.heartbeat.version;
            s.ready = beat.heartbeat.ready;
            s.traffic = beat.heartbeat.traffic;
            s.last_heartbeat = Some(at);
        });
    }

    /// Records an ack from `id`.
    pub fn ack(&self, id: &str, ack: &Ack) {
        self.with(|m| {
            let s = entry(m, id);
            match ack.applied {
                AckResult::Ok => {
                    s.version = ack.version;
                    s.last_error = None;
                }
                AckResult::Error => {
                    s.last_error = Some(format!("version {}: {}", ack.version, ack.detail));
                }
            }
        });
    }

    /// The instances DNS may publish: not revoked, with public addresses; `fresh_ready`
    /// when the last heartbeat is recent and says ready.
    #[must_use]
    pub fn candidates(&self) -> Vec<Candidate> {
        let now = Instant::now();
        let containers = self
            .containers
            .lock()
            .expect("containers lock is never poisoned: no panics while held")
            .clone();
        self.with(|m| {
            m.iter_mut()
                .filter(|(_, s)| !s.revoked)
                .filter_map(|(id, s)| {
                    let container = containers.iter().find(|c| c.is_host(&s.hostname));
                    s.in_container |= container.is_some();
                    // An instance whose container is gone is not running, whatever its
                    // last heartbeat said.
                    let running = container.is_some() || !s.in_container;
                    let addrs = if s.public_addrs.is_empty() {
                        container.map(|c| c.addrs.clone()).unwrap_or_default()
                    } else {
                        s.public_addrs.clone()
                    };
                    (!addrs.is_empty()).then(|| Candidate {
                        id: id.clone(),
                        addrs,
                        https_port: s.https_port,
                        fresh_ready: running
                            && s.ready
                            && s.last_heartbeat
                                .is_some_and(|t| now.duration_since(t) <= self.stale_after),
                        last_heartbeat: s.last_heartbeat,
                    })
                })
                .collect()
        })
    }

    /// The unrevoked instances (id, host name) silent for longer than `forget_after`:
    /// no heartbeat for that long, or none at all since this controller learnt of them
    /// that long ago.
    #[must_use]
    pub fn silent(&self, forget_after: Duration) -> Vec<(String, String)> {
        let now = Instant::now();
        self.with(|m| {
            m.iter()
                .filter(|(_, s)| s.silent(now, forget_after))
                .map(|(id, s)| (id.clone(), s.hostname.clone()))
                .collect()
        })
    }

    /// Drops `id` from the live state if it is still silent (a heartbeat may have come
    /// since [`Registry::silent`]); true when it did. Its stored record is the caller's
    /// to delete.
    pub fn forget_if_silent(&self, id: &str, forget_after: Duration) -> bool {
        let now = Instant::now();
        self.with(|m| {
            let silent = m.get(id).is_some_and(|s| s.silent(now, forget_after));
            if silent {
                m.remove(id);
            }
            silent
        })
    }

    /// Every instance, for `/status`.
    #[must_use]
    pub fn status(&self) -> Vec<InstanceStatus> {
        let now = Instant::now();
        self.with(|m| {
            m.iter()
                .map(|(id, s)| {
                    let age = s.last_heartbeat.map(|t| now.duration_since(t));
                    let state = if s.revoked {
                        "revoked"
                    } else if age.is_none_or(|a| a > self.stale_after) {
                        "stale"
                    } else if s.ready {
                        "ready"
                    } else {
                        "not_ready"
                    };
                    InstanceStatus {
                        id: id.clone(),
                        hostname: s.hostname.clone(),
                        peer: s.peer.clone(),
                        public_addrs: s.public_addrs.clone(),
                        version: s.version,
                        ready: s.ready,
                        last_heartbeat_secs: age.map(|a| a.as_secs_f64()),
                        last_error: s.last_error.clone(),
                        state: state.to_string(),
                        traffic: s.traffic,
                    }
                })
                .collect()
        })
    }

    /// Refreshes the per-instance and per-state gauges against `current` version.
    pub fn export(&self, metrics: &Metrics, current: u64) {
        let status = self.status();
        metrics.instance_version.reset();
        metrics.instance_lag.reset();
        metrics.instances.reset();
        for state in ["ready", "not_ready", "stale", "revoked"] {
            metrics.instances.with_label_values(&[state]).set(0);
        }
        for i in &status {
            metrics.instances.with_label_values(&[&i.state]).inc();
            if i.state == "revoked" {
                continue;
            }
            let v = i64::try_from(i.version).unwrap_or(i64::MAX);
            metrics.instance_version.with_label_values(&[&i.id]).set(v);
            metrics
                .instance_lag
                .with_label_values(&[&i.id])
                .set(i64::try_from(current.saturating_sub(i.version)).unwrap_or(i64::MAX));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn beat() -> StoredHeartbeat {
        StoredHeartbeat {
            peer: "10.0.0.1:5000".into(),
            heartbeat: Heartbeat {
                public_addrs: vec![],
                ready: true,
                version: 1,
                https_port: None,
                traffic: None,
            },
            at_unix_ms: 0,
        }
    }

    fn record(revoked: bool) -> InstanceRecord {
        InstanceRecord {
            hostname: "h".into(),
            enrolled_at: 0,
            revoked,
        }
    }

    #[test]
    fn only_unrevoked_instances_silent_past_the_limit_are_forgotten() {
        let hour = Duration::from_secs(3600);
        let r = Registry::new(Duration::from_secs(30));
        // Last heard two hours ago (through another controller).
        r.known("old", &record(false));
        r.remote_heartbeat("old", &beat(), 2 * hour);
        // Heard two hours ago, but revoked: kept, it is what refuses the certificate.
        r.known("revoked", &record(true));
        r.remote_heartbeat("revoked", &beat(), 2 * hour);
        // Heard just now; and one never heard, learnt of just now.
        r.known("fresh", &record(false));
        r.heartbeat("fresh", "10.0.0.2:5000".into(), &beat().heartbeat);
        r.known("new", &record(false));

        let silent = r.silent(hour);
        assert_eq!(silent, vec![("old".to_string(), "h".to_string())]);
        assert!(r.forget_if_silent("old", hour));
        assert!(!r.forget_if_silent("fresh", hour), "heard from: kept");
        assert!(!r.forget_if_silent("gone", hour), "unknown: nothing to do");
        let ids: Vec<String> = r.status().into_iter().map(|s| s.id).collect();
        assert_eq!(ids, ["fresh", "new", "revoked"]);

        // A heartbeat between `silent` and `forget_if_silent` saves the instance.
        r.remote_heartbeat("late", &beat(), 2 * hour);
        assert_eq!(r.silent(hour).len(), 1);
        r.heartbeat("late", "10.0.0.3:5000".into(), &beat().heartbeat);
        assert!(!r.forget_if_silent("late", hour));
        assert!(r.silent(hour).is_empty());
    }
}
