//! The live state of a running proxy: the generation being served (swapped atomically),
//! its metrics, the outcome of the last reload and readiness. Shared by the listeners,
//! the admin API, the reloader and the health checker.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use arc_swap::ArcSwap;
use rampart_config::snapshot::{CertificateBundle, Snapshot};
use rampart_config::Config;
use tokio::sync::watch;

use crate::generation::{Builder, Generation};
use crate::metrics::Metrics;

/// What happened to the last reload attempt (shown in /status).
#[derive(Clone, Debug)]
pub struct ReloadOutcome {
    /// When it was attempted.
    pub at: SystemTime,
    /// `None` when it succeeded, else why it failed.
    pub error: Option<String>,
}

/// Fleet mode as seen by this proxy (shown in /status).
#[derive(Clone, Debug, serde::Serialize)]
pub struct FleetStatus {
    /// The controller's fleet API.
    pub controller: String,
    /// This proxy's identity, once enrolled.
    pub instance: Option<String>,
    /// Whether the last call to the controller succeeded.
    pub connected: bool,
    /// The last problem talking to the controller.
    pub last_error: Option<String>,
}

/// The live state of a proxy process.
pub struct Live {
    /// The generation being served.
    pub current: Arc<ArcSwap<Generation>>,
    /// Metrics of this process.
    pub metrics: Arc<Metrics>,
    /// Builds new generations.
    pub builder: Builder,
    /// Outcome of the last reload, if any happened.
    pub last_reload: ArcSwap<Option<ReloadOutcome>>,
    /// Fleet mode state, when snapshots come from a controller.
    pub fleet: ArcSwap<Option<FleetStatus>>,
    /// Replaced generations that requests may still be using (their removed endpoints
    /// are draining), for the dashboard.
    pub replaced: std::sync::Mutex<Vec<std::sync::Weak<Generation>>>,
    ready: AtomicBool,
    changes: watch::Sender<u64>,
}

impl std::fmt::Debug for Live {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Live")
            .field("version", &self.current.load().version)
            .finish_non_exhaustive()
    }
}

impl Live {
    /// Builds the first generation from `config`.
    ///
    /// # Errors
    /// When the configuration cannot be built (see [`Builder::build`]).
    pub fn start(config: Config) -> anyhow::Result<Arc<Self>> {
        Self::start_at(config, 1)
    }

    /// Starts in fleet mode: the local configuration (listeners, no routes yet) as
    /// version 0, then the cached snapshot if there is a good one. Not ready until a
    /// snapshot serves.
    ///
    /// # Errors
    /// When the local configuration cannot be built.
    pub fn start_fleet(mut local: Config, cached: Option<Snapshot>) -> anyhow::Result<Arc<Self>> {
        // What to serve comes from snapshots only.
        local.routes.clear();
        local.pools.clear();
        local.tls.clear();
        let live = Self::start_at(local, 0)?;
        if let Some(snapshot) = cached {
            let version = snapshot.version;
            match live.apply_snapshot(snapshot) {
                Ok(_) => tracing::info!("serving cached snapshot version {version} until the controller answers"),
                Err(e) => tracing::warn!("the cached snapshot {version} does not build, waiting for the controller: {e:#}"),
            }
        }
        Ok(live)
    }

    fn start_at(config: Config, version: u64) -> anyhow::Result<Arc<Self>> {
        let metrics = Arc::new(Metrics::new());
        let builder = Builder::new(config.server.data_dir.clone(), metrics.clone());
        let first = builder.build(config, version, None)?;
        metrics
            .config_version
            .set(i64::try_from(version).unwrap_or(i64::MAX));
        let (changes, _) = watch::channel(version);
        Ok(Arc::new(Self {
            current: Arc::new(ArcSwap::from_pointee(first)),
            metrics,
            builder,
            last_reload: ArcSwap::from_pointee(None),
            fleet: ArcSwap::from_pointee(None),
            replaced: std::sync::Mutex::new(Vec::new()),
            ready: AtomicBool::new(false),
            changes,
        }))
    }

    /// Builds `config` as the next version and swaps it in. On failure the current
    /// generation keeps serving, and the failure is counted and recorded.
    ///
    /// # Errors
    /// Why the new configuration could not be built.
    pub fn apply(&self, config: Config) -> anyhow::Result<u64> {
        let version = self.current.load().version + 1;
        self.swap_in(config, &[], version, Answers::default())
    }

    /// Applies a snapshot from the controller: this proxy's own `server` and
    /// `listeners` with everything else from the snapshot, served as its version.
    /// A snapshot that breaks a rule or does not build leaves the current generation
    /// serving.
    ///
    /// # Errors
    /// Every rule the snapshot breaks, or why it could not be built.
    pub fn apply_snapshot(&self, mut snapshot: Snapshot) -> anyhow::Result<u64> {
        let version = snapshot.version;
        let tickets = match &snapshot.session_tickets {
            Some(keys) => Some(Arc::new(
                crate::tls::tickets::TicketRing::from_snapshot(keys)
                    .map_err(|e| self.reload_failed(&e.context(format!("snapshot {version}"))))?,
            )),
            None => None,
        };
        let answers = Answers {
            http01: Arc::new(std::mem::take(&mut snapshot.acme_challenges)),
            tls_alpn01: Arc::new(crate::tls::acme_alpn::certificates(&snapshot.acme_tls_alpn)),
            tickets,
            on_demand: snapshot.on_demand.take().map(Arc::new),
        };
        let local = self.current.load().config.clone();
        let (config, bundles) = snapshot.into_config(&local).map_err(|issues| {
            let text: Vec<String> = issues.iter().map(|i| i.render("snapshot")).collect();
            self.reload_failed(&anyhow::anyhow!(
                "snapshot {version} is invalid:\n{}",
                text.join("\n")
            ))
        })?;
        self.swap_in(config, &bundles, version, answers)
    }

    fn swap_in(
        &self,
        config: Config,
        bundles: &[CertificateBundle],
        version: u64,
        answers: Answers,
    ) -> anyhow::Result<u64> {
        let started = Instant::now();
        let prev = self.current.load_full();
        let result = self
            .builder
            .build_with(config, bundles, version, Some(&prev));
        self.metrics
            .swap_duration
            .observe(started.elapsed().as_secs_f64());
        match result {
            Ok(mut generation) => {
                generation.acme_challenges = answers.http01;
                generation.acme_tls_alpn = answers.tls_alpn01;
                generation.fleet_tickets = answers.tickets;
                generation.on_demand = answers.on_demand;
                if generation.config.listeners != prev.config.listeners {
                    tracing::warn!("listener addresses changed; they take effect at the next restart or upgrade");
                }
                let generation = Arc::new(generation);
                self.current.store(generation.clone());
                crate::generation::mark_removed(&prev, &generation);
                {
                    let mut replaced = self
                        .replaced
                        .lock()
                        .expect("never poisoned: no panics while held");
                    replaced.retain(|g| g.strong_count() > 0);
                    replaced.push(Arc::downgrade(&prev));
                    let excess = replaced.len().saturating_sub(8);
                    replaced.drain(..excess);
                }
                self.metrics.config_reloads.inc();
                self.metrics
                    .config_version
                    .set(i64::try_from(version).unwrap_or(i64::MAX));
                self.changes.send_replace(version);
                self.last_reload.store(Arc::new(Some(ReloadOutcome {
                    at: SystemTime::now(),
                    error: None,
                })));
                Ok(version)
            }
            Err(e) => Err(self.reload_failed(&e)),
        }
    }

    /// Records a reload that failed before a configuration could be applied.
    pub fn reload_failed(&self, e: &anyhow::Error) -> anyhow::Error {
        let detail = format!("{e:#}");
        self.metrics.config_reload_failures.inc();
        self.last_reload.store(Arc::new(Some(ReloadOutcome {
            at: SystemTime::now(),
            error: Some(detail.clone()),
        })));
        tracing::error!(
            "configuration reload failed, still serving version {}: {detail}",
            self.current.load().version
        );
        anyhow::anyhow!(detail)
    }

    /// Notified with the new version after every swap, and when readiness changes.
    #[must_use]
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// Whether the proxy is ready to serve (listeners up, not shutting down).
    #[must_use]
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }

    /// Marks readiness.
    pub fn set_ready(&self, ready: bool) {
        let was = self.ready.swap(ready, Ordering::Relaxed);
        if was != ready {
            // Wake subscribers (the fleet heartbeat reports readiness at once).
            self.changes.send_modify(|_| {});
        }
    }

    /// Where the internal CA certificate is, if the configuration uses the internal CA.
    #[must_use]
    pub fn internal_ca_cert(&self) -> Option<PathBuf> {
        let uses_ca = self
            .current
            .load()
            .config
            .tls
            .iter()
            .any(|t| !matches!(t.source, rampart_config::TlsSource::Files { .. }));
        uses_ca
            .then(|| {
                self.builder
                    .internal_ca()
                    .ok()
                    .map(|ca| ca.cert_path().to_path_buf())
            })
            .flatten()
    }
}

/// The ACME challenge answers a snapshot carries, set on the generation it becomes.
#[derive(Default)]
struct Answers {
    /// HTTP-01: token → key authorization.
    http01: Arc<std::collections::BTreeMap<String, String>>,
    /// TLS-ALPN-01: name → the certificate for `acme-tls/1` handshakes.
    tls_alpn01: Arc<std::collections::HashMap<String, Arc<rustls::sign::CertifiedKey>>>,
    /// The fleet's session ticket keys.
    tickets: Option<Arc<crate::tls::tickets::TicketRing>>,
    /// On-demand TLS: which names to ask the controller about.
    on_demand: Option<Arc<rampart_config::snapshot::OnDemandPolicy>>,
}
