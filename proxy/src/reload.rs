//! Hot reload in standalone mode: SIGHUP or a change of the config file runs
//! read → parse → validate → build → swap. A failure at any step keeps the current
//! generation serving and is logged, counted and shown in /status.
//!
//! The directory of the file is watched (not the file), so that editors and
//! deployment tools that replace the file by renaming a new one over it are seen.
//! Bursts of events are coalesced for [`SETTLE`] before reading.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use notify::{RecursiveMode, Watcher};
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc;

use crate::live::Live;

/// How long file events must be quiet before the file is read (editors write in steps).
const SETTLE: Duration = Duration::from_millis(150);

/// Reloads the configuration from a file on SIGHUP and on change.
pub struct ReloadService {
    live: Arc<Live>,
    path: PathBuf,
}

impl ReloadService {
    /// A reloader of `path` into `live`.
    #[must_use]
    pub fn new(live: Arc<Live>, path: PathBuf) -> Self {
        Self { live, path }
    }

    /// Reloads once now.
    ///
    /// # Errors
    /// Why the file could not be loaded or built; the old generation keeps serving.
    pub async fn reload(&self) -> anyhow::Result<u64> {
        let path = self.path.clone();
        let live = self.live.clone();
        // Parsing, DNS resolution and certificate loading are blocking work.
        tokio::task::spawn_blocking(move || match rampart_config::load(&path) {
            Ok(config) => live.apply(config),
            Err(e) => Err(live.reload_failed(&anyhow::Error::new(e))),
        })
        .await?
    }

    fn watch(&self) -> anyhow::Result<(notify::RecommendedWatcher, mpsc::UnboundedReceiver<()>)> {
        let (tx, rx) = mpsc::unbounded_channel();
        let file_name = self.path.file_name().map(std::ffi::OsStr::to_os_string);
        let mut watcher =
            notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
                let Ok(event) = event else { return };
                if event.kind.is_access() {
                    return;
                }
                if event
                    .paths
                    .iter()
                    .any(|p| p.file_name().map(std::ffi::OsStr::to_os_string) == file_name)
                {
                    // The receiver only goes away at shutdown.
                    let _ = tx.send(());
                }
            })?;
        let dir = self
            .path
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(std::path::Path::new("."));
        watcher.watch(dir, RecursiveMode::NonRecursive)?;
        Ok((watcher, rx))
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
        let (_watcher, mut changes) = match self.watch() {
            Ok((w, rx)) => (Some(w), rx),
            Err(e) => {
                tracing::warn!(
                    "cannot watch {} for changes (SIGHUP still reloads): {e}",
                    self.path.display()
                );
                (None, mpsc::unbounded_channel().1)
            }
        };
        loop {
            tokio::select! {
                _ = shutdown.changed() => break,
                _ = hup.recv() => tracing::info!("SIGHUP: reloading {}", self.path.display()),
                Some(()) = changes.recv() => {
                    // Coalesce a burst of events (truncate + write + close, rename).
                    tokio::time::sleep(SETTLE).await;
                    while changes.try_recv().is_ok() {}
                    tracing::info!("{} changed: reloading", self.path.display());
                }
            }
            match self.reload().await {
                Ok(v) => tracing::info!("configuration version {v} is serving"),
                Err(e) => tracing::debug!("reload failed: {e:#}"),
            }
        }
    }
}
