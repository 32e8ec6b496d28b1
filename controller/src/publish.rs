//! The compile loop: configuration, discovered endpoints and certificates in, a new
//! snapshot version out — stored for followers and pushed to the fleet; a follower
//! publishes what the leader stored.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use rampart_config::Config;
use tokio::sync::watch;

use crate::acme;
use crate::compile::Compiler;
use crate::discovery::Found;
use crate::fleet::Published;
use crate::supervisor::State;

use crate::supervisor::FoundRx;

/// Where the current snapshot is kept in a shared store, for followers.
pub(crate) const SNAPSHOT_KEY: &str = "snapshot/current";

/// What the compile loop reacts to.
pub(crate) struct Inputs {
    pub(crate) config: watch::Receiver<Config>,
    pub(crate) found: FoundRx,
    /// The leader's stored snapshot (shared store only).
    pub(crate) follow: Option<watch::Receiver<Option<Vec<u8>>>>,
    /// ACME certificates and challenge answers.
    pub(crate) acme: watch::Receiver<acme::Output>,
    /// The fleet's session ticket keys.
    pub(crate) tickets: watch::Receiver<Option<rampart_config::snapshot::TicketKeys>>,
}

/// As leader: recompiles on every configuration or discovery change and publishes the
/// result (also to the shared store). As follower: publishes what the leader stored.
pub(crate) async fn compile_loop(
    state: Arc<State>,
    mut compiler: Compiler,
    mut inputs: Inputs,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut leader = state.leader.clone();
    let (mut config_open, mut leader_open, mut acme_open, mut tickets_open) =
        (true, true, true, true);
    // Give each provider a moment for its first read, so that the first snapshot
    // already holds the discovered endpoints.
    for (_, rx) in &mut inputs.found {
        let _ = tokio::time::timeout(Duration::from_secs(2), rx.changed()).await;
    }
    loop {
        let current: Vec<(String, Found)> = inputs
            .found
            .iter_mut()
            .map(|(n, rx)| (n.clone(), rx.borrow_and_update().clone()))
            .collect();
        let cfg = inputs.config.borrow_and_update().clone();
        compiler.acme = inputs.acme.borrow_and_update().clone();
        compiler.tickets = inputs.tickets.borrow_and_update().clone();
        if *leader.borrow_and_update() {
            if let Some(body) = publish(&state, &mut compiler, &cfg, &current).await {
                if inputs.follow.is_some() {
                    if let Err(e) = state.fleet.store.put_leading(SNAPSHOT_KEY, &body).await {
                        tracing::error!("storing the snapshot for followers: {e:#}");
                    }
                }
            }
        } else if let Some(follow) = inputs.follow.as_mut() {
            let stored = follow.borrow_and_update().clone();
            if let Some(body) = stored {
                follow_leader(&state, Bytes::from(body));
            }
        }
        state.fleet.registry.discovered(
            current
                .iter()
                .flat_map(|(_, f)| f.proxies.iter().cloned())
                .collect(),
        );
        *state
            .providers
            .lock()
            .expect("providers lock is never poisoned: no panics while held") = current;
        // Wait for a real change: a channel that closes (no file to reload, or a local
        // store whose leadership never changes) is not one.
        loop {
            let any_found = any_found(&mut inputs.found);
            // The leader's own writes come back through the store: only followers listen.
            let leading = *leader.borrow();
            let followed = async {
                match inputs.follow.as_mut() {
                    Some(f) if !leading => f.changed().await.is_ok(),
                    _ => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = shutdown.changed() => return,
                r = inputs.config.changed(), if config_open => match r {
                    Ok(()) => break,
                    Err(_) => config_open = false,
                },
                r = leader.changed(), if leader_open => match r {
                    Ok(()) => break,
                    Err(_) => leader_open = false,
                },
                true = followed => break,
                r = inputs.acme.changed(), if acme_open => match r {
                    Ok(()) => break,
                    Err(_) => acme_open = false,
                },
                r = inputs.tickets.changed(), if tickets_open => match r {
                    Ok(()) => break,
                    Err(_) => tickets_open = false,
                },
                () = any_found => break,
                // A long quiet spell must not let internal certificates expire.
                () = tokio::time::sleep(INTERNAL_RENEWAL_CHECK) => {
                    if compiler.internal_renewal_due() {
                        tracing::info!("renewing internal-CA certificates");
                        break;
                    }
                }
            }
        }
    }
}

/// How often the compile loop checks internal-CA certificates for renewal.
const INTERNAL_RENEWAL_CHECK: Duration = Duration::from_secs(3600);

/// Publishes the leader's snapshot to this follower's watchers.
fn follow_leader(state: &State, body: Bytes) {
    #[derive(serde::Deserialize)]
    struct Version {
        version: u64,
    }
    match serde_json::from_slice::<Version>(&body) {
        Ok(v) if v.version != state.fleet.version() => {
            tracing::info!("following the leader's snapshot version {}", v.version);
            state
                .fleet
                .metrics
                .snapshot_version
                .set(i64::try_from(v.version).unwrap_or(i64::MAX));
            state.fleet.published.send_replace(Published {
                version: v.version,
                body,
            });
        }
        Ok(_) => {}
        Err(e) => tracing::error!("the stored snapshot is unreadable: {e}"),
    }
}

/// Resolves when any provider publishes. A provider that stopped (at shutdown)
/// changes nothing any more.
async fn any_found(found: &mut FoundRx) {
    if found.is_empty() {
        return std::future::pending().await;
    }
    let waits = found.iter_mut().map(|(_, rx)| {
        Box::pin(async move {
            if rx.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        })
    });
    futures_util::future::select_all(waits).await;
}

/// Compiles and publishes the next version; returns its encoding.
async fn publish(
    state: &State,
    compiler: &mut Compiler,
    config: &Config,
    found: &[(String, Found)],
) -> Option<Bytes> {
    let fleet = &state.fleet;
    for (name, f) in found {
        fleet
            .metrics
            .discovery_errors
            .with_label_values(&[name])
            .set(i64::try_from(f.errors.len()).unwrap_or(i64::MAX));
        fleet
            .metrics
            .discovery_endpoints
            .with_label_values(&[name])
            .set(i64::try_from(f.endpoint_count()).unwrap_or(i64::MAX));
    }
    let found: Vec<Found> = found.iter().map(|(_, f)| f.clone()).collect();
    let started = Instant::now();
    // Compiled first at the current version: if that is what proxies serve already
    // (issued certificates are cached, so equal inputs compile equal), nothing is
    // published and no version is spent.
    let mut snapshot = match compiler.compile(config, &found, fleet.version()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(
                "next snapshot not built, proxies keep version {}: {e:#}",
                fleet.version()
            );
            return None;
        }
    };
    if compiler.last.as_ref() == Some(&snapshot) {
        return None;
    }
    // The build time excludes allocating the version (a store round trip with etcd).
    let compiled_in = started.elapsed();
    let version = match fleet.store.next_version().await {
        Ok(v) => v,
        Err(e) => {
            tracing::error!(
                "cannot allocate a snapshot version, keeping version {}: {e:#}",
                fleet.version()
            );
            return None;
        }
    };
    snapshot.version = version;
    let encoding = Instant::now();
    let body = match serde_json::to_vec(&snapshot) {
        Ok(b) => Bytes::from(b),
        Err(e) => {
            tracing::error!("snapshot {version} not encoded: {e}");
            return None;
        }
    };
    fleet
        .metrics
        .snapshot_build
        .observe((compiled_in + encoding.elapsed()).as_secs_f64());
    fleet
        .metrics
        .snapshot_bytes
        .set(i64::try_from(body.len()).unwrap_or(i64::MAX));
    fleet
        .metrics
        .snapshot_version
        .set(i64::try_from(version).unwrap_or(i64::MAX));
    tracing::info!(
        "snapshot version {version} published ({} bytes)",
        body.len()
    );
    fleet.published.send_replace(Published {
        version,
        body: body.clone(),
    });
    compiler.last = Some(snapshot);
    Some(body)
}
