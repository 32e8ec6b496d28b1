//! Hot reload in standalone mode: SIGHUP or a change of the config file runs
//! read → parse → validate → build → swap. A failure at any step keeps the current
//! generation serving and is logged, counted and shown in /status.
//!
//! The file is watched with [`rampart_watch::FileWatch`] (its directory, so that a
//! file renamed over it is seen; bursts of events coalesced), as the controller's
//! configuration and file discovery are.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use tokio::signal::unix::{signal, SignalKind};
use xxhash_rust::xxh3::xxh3_64;

use crate::live::Live;

/// What asked for a reload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Trigger {
    /// SIGHUP (or a caller): always rebuild, since files the config names (certificates)
    /// may have changed even when the config did not.
    Signal,
    /// The config file changed on disk: rebuild only if its content did.
    FileChange,
    /// The periodic check: rebuild only if an internal-CA certificate is due for
    /// renewal (a long-running proxy would otherwise serve it past its expiry).
    Renewal,
}

/// How often internal certificates are checked for renewal.
const RENEWAL_CHECK: Duration = Duration::from_secs(3600);

/// Reloads the configuration from a file on SIGHUP and on change.
pub struct ReloadService {
    live: Arc<Live>,
    path: PathBuf,
    /// Hash of the config text last read, to ignore events that did not change it.
    last_text: Arc<AtomicU64>,
}

impl ReloadService {
    /// A reloader of `path` into `live`.
    #[must_use]
    pub fn new(live: Arc<Live>, path: PathBuf) -> Self {
        let last_text = std::fs::read(&path).map_or(0, |t| xxh3_64(&t));
        Self {
            live,
            path,
            last_text: Arc::new(AtomicU64::new(last_text)),
        }
    }

    /// Reloads once now; `Ok(None)` when a file change left the content as it was.
    ///
    /// # Errors
    /// Why the file could not be loaded or built; the old generation keeps serving.
    pub async fn reload(&self, trigger: Trigger) -> anyhow::Result<Option<u64>> {
        let path = self.path.clone();
        let live = self.live.clone();
        let last_text = self.last_text.clone();
        // Parsing, DNS resolution and certificate loading are blocking work.
        tokio::task::spawn_blocking(move || {
            let text = match std::fs::read_to_string(&path) {
                Ok(t) => t,
                Err(e) => {
                    return Err(live.reload_failed(
                        &anyhow::Error::new(e).context(format!("reading {}", path.display())),
                    ))
                }
            };
            let hash = xxh3_64(text.as_bytes());
            if last_text.swap(hash, Ordering::Relaxed) == hash && trigger == Trigger::FileChange {
                return Ok(None);
            }
            if trigger == Trigger::Renewal && !live.builder.internal_renewal_due() {
                return Ok(None);
            }
            match rampart_config::parse(&text, &path.display().to_string()) {
                Ok(config) => live.apply(config).map(Some),
                Err(e) => Err(live.reload_failed(&anyhow::Error::new(e))),
            }
        })
        .await?
    }
}

#[async_trait]
impl BackgroundService for ReloadService {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut hup = match signal(SignalKind::hangup()) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!("cannot listen for SIGHUP, reload on signal disabled: {e}");
                return;
            }
        };
        // Events only: SIGHUP is the fallback where the file system gives none.
        let mut changes = rampart_watch::FileWatch::new(&self.path, None);
        let mut renewal =
            tokio::time::interval_at(tokio::time::Instant::now() + RENEWAL_CHECK, RENEWAL_CHECK);
        loop {
            let trigger = tokio::select! {
                _ = shutdown.changed() => break,
                _ = hup.recv() => {
                    tracing::info!("SIGHUP: reloading {}", self.path.display());
                    Trigger::Signal
                }
                _ = changes.changed() => Trigger::FileChange,
                _ = renewal.tick() => Trigger::Renewal,
            };
            match self.reload(trigger).await {
                Ok(Some(v)) => tracing::info!("configuration version {v} is serving"),
                Ok(None) => tracing::debug!("{} touched but unchanged", self.path.display()),
                Err(e) => tracing::debug!("reload failed: {e:#}"),
            }
        }
    }
}
