//! Reloading the controller's configuration file on change ([`rampart_watch`]) or
//! SIGHUP; a file that does not load keeps the last good configuration.

use std::path::PathBuf;
use std::time::Duration;

use rampart_config::Config;
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::metrics::Metrics;

/// Reloads the configuration on SIGHUP or when its file changes; an invalid file is
/// reported and the last good configuration stays in use.
pub(crate) fn spawn_config_watch(
    path: PathBuf,
    initial: Config,
    metrics: &Metrics,
    tasks: &mut JoinSet<()>,
    shutdown: &watch::Receiver<bool>,
) -> watch::Receiver<Config> {
    let (tx, rx) = watch::channel(initial);
    let failures = metrics.config_reload_failures.clone();
    let mut shutdown = shutdown.clone();
    tasks.spawn(async move {
        let mut hup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!("cannot listen for SIGHUP: {e}");
                None
            }
        };
        let mut last = std::fs::read(&path).unwrap_or_default();
        // Events, and a re-check every 5 s where the file system drops them.
        let mut changes = rampart_watch::FileWatch::new(&path, Some(Duration::from_secs(5)));
        loop {
            let signalled = async {
                match hup.as_mut() {
                    Some(h) => {
                        h.recv().await;
                    }
                    None => std::future::pending().await,
                }
            };
            let forced = tokio::select! {
                _ = shutdown.changed() => return,
                () = signalled => true,
                _ = changes.changed() => false,
            };
            let text = std::fs::read(&path).unwrap_or_default();
            if text == last && !forced {
                continue;
            }
            last.clone_from(&text);
            match rampart_config::load(&path) {
                Ok(cfg) => {
                    tracing::info!("configuration {} reloaded", path.display());
                    tx.send_replace(cfg);
                }
                Err(e) => {
                    failures.inc();
                    tracing::error!("configuration reload failed, keeping the last good one:\n{e}");
                }
            }
        }
    });
    rx
}
