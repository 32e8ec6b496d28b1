//! On-demand TLS at the handshake: a ClientHello for a name that no certificate
//! covers, and that the controller's policy allows, asks the controller for one; the
//! handshake then waits (at most `tls_on_demand.hold`) for the snapshot that brings
//! it. Denials are remembered for as long as the controller says, so that a scanner
//! sending random names costs one request per name, and requests beyond a small queue
//! are refused at once instead of waiting.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use rampart_config::snapshot::OnDemandAnswer;
use tokio::sync::{mpsc, oneshot, watch};

use crate::generation::Generation;
use crate::metrics::Metrics;

/// Requests waiting for the controller at most; beyond, handshakes fail at once.
const QUEUE: usize = 256;
/// Denials remembered at most; beyond, the expired ones go, then all.
const MAX_DENIED: usize = 100_000;

/// A name a handshake wants a certificate for, and where the answer goes.
#[derive(Debug)]
pub struct Wanted {
    /// The server name of the handshake (lowercase).
    pub name: String,
    /// The controller's answer.
    pub reply: oneshot::Sender<OnDemandAnswer>,
}

/// The requests of this process's handshakes: consumed by the fleet client (over the
/// fleet API) or, under `rampart up`, by the controller in this process.
pub type Requests = mpsc::Receiver<Wanted>;

/// The handshake side of on-demand TLS.
#[derive(Debug)]
pub struct OnDemand {
    tx: mpsc::Sender<Wanted>,
    changes: watch::Receiver<u64>,
    denied: Mutex<HashMap<String, Instant>>,
    metrics: Arc<Metrics>,
}

impl OnDemand {
    /// The handshake side, and the requests it sends; `changes` says when a new
    /// generation is served.
    #[must_use]
    pub fn new(changes: watch::Receiver<u64>, metrics: Arc<Metrics>) -> (Self, Requests) {
        let (tx, rx) = mpsc::channel(QUEUE);
        (
            Self {
                tx,
                changes,
                denied: Mutex::new(HashMap::new()),
                metrics,
            },
            rx,
        )
    }

    fn count(&self, outcome: &str) {
        self.metrics
            .tls_on_demand
            .with_label_values(&[outcome])
            .inc();
    }

    /// Asks for `sni`'s certificate if the live generation has none for it and the
    /// policy allows the name, and waits for it at most the policy's hold. Returns
    /// whether the certificate is there now.
    pub async fn obtain(&self, current: &ArcSwap<Generation>, sni: &str) -> bool {
        let generation = current.load();
        let Some(policy) = generation.on_demand.clone() else {
            return false;
        };
        let name = sni.trim_end_matches('.').to_ascii_lowercase();
        if generation.certs.lookup(&name).is_some() {
            return true;
        }
        drop(generation);
        if !policy.allows(&name) || name.parse::<std::net::IpAddr>().is_ok() {
            self.count("not_allowed");
            return false;
        }
        if self.recently_denied(&name) {
            self.count("cached_denial");
            return false;
        }
        let deadline = tokio::time::Instant::now() + Duration::from_millis(policy.hold_ms);
        let (reply, answer) = oneshot::channel();
        if self
            .tx
            .try_send(Wanted {
                name: name.clone(),
                reply,
            })
            .is_err()
        {
            // No controller to ask, or too many handshakes asking at once.
            self.count("unavailable");
            return false;
        }
        let mut changes = self.changes.clone();
        changes.borrow_and_update();
        let answer = match tokio::time::timeout_at(deadline, answer).await {
            Ok(Ok(a)) => a,
            Ok(Err(_)) => {
                self.count("unavailable");
                return false;
            }
            Err(_) => {
                self.count("late");
                return false;
            }
        };
        if !answer.approved {
            tracing::debug!("on-demand TLS: {name}: {}", answer.detail);
            self.remember_denial(&name, Duration::from_secs(answer.retry_after_secs.max(1)));
            self.count("denied");
            return false;
        }
        loop {
            if current.load().certs.lookup(&name).is_some() {
                self.count("served");
                return true;
            }
            match tokio::time::timeout_at(deadline, changes.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) | Err(_) => {
                    self.count("late");
                    return false;
                }
            }
        }
    }

    fn recently_denied(&self, name: &str) -> bool {
        let denied = self.denied.lock().expect("denied lock");
        denied
            .get(name)
            .is_some_and(|until| *until > Instant::now())
    }

    fn remember_denial(&self, name: &str, retry_after: Duration) {
        let mut denied = self.denied.lock().expect("denied lock");
        if denied.len() >= MAX_DENIED {
            let now = Instant::now();
            denied.retain(|_, until| *until > now);
            if denied.len() >= MAX_DENIED {
                denied.clear();
            }
        }
        denied.insert(name.to_string(), Instant::now() + retry_after);
    }
}
