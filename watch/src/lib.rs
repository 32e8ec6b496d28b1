//! One way to watch a file, or a directory of files, for changes: the proxy's and the
//! controller's configuration files and file discovery all use [`FileWatch`].
//!
//! File-system events (`notify`) on the containing directory, so that an atomic
//! replace (write a temporary file, rename it over) is seen as a change of the file;
//! a burst of events (truncate, write, close, rename) is coalesced into one change once
//! it has been quiet for a moment; and, because event delivery is best effort (network
//! and container file systems drop them), an optional periodic re-check. Callers
//! compare content themselves: a change here means "look again", never "it differs".

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::Duration;

use notify::{RecursiveMode, Watcher};
use tokio::sync::mpsc;

/// How long events must be quiet before a burst counts as one change.
const SETTLE: Duration = Duration::from_millis(100);

/// Why [`FileWatch::changed`] returned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cause {
    /// File-system events named the watched path (and then were quiet).
    Event,
    /// The periodic re-check came due.
    Recheck,
}

/// Watches one file, or every entry of one directory.
#[derive(Debug)]
pub struct FileWatch {
    events: mpsc::UnboundedReceiver<()>,
    /// Kept alive for as long as events are wanted; `None` when the platform refused.
    _watcher: Option<notify::RecommendedWatcher>,
    recheck: Option<tokio::time::Interval>,
}

impl FileWatch {
    /// Watches `path` (a file, or a directory and every file in it), re-checking every
    /// `recheck` as well when given. When events cannot be had, this logs a warning
    /// and relies on `recheck` (and whatever else the caller listens to, e.g. SIGHUP).
    #[must_use]
    pub fn new(path: &Path, recheck: Option<Duration>) -> Self {
        let (tx, events) = mpsc::unbounded_channel();
        let watcher = start(path, tx)
            .map_err(|e| {
                tracing::warn!(
                    "cannot watch {} for changes, re-checking {}: {e}",
                    path.display(),
                    recheck.map_or("only on signal".to_string(), |r| format!("every {r:?}"))
                );
            })
            .ok();
        let recheck = recheck.map(|period| {
            let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick
        });
        Self {
            events,
            _watcher: watcher,
            recheck,
        }
    }

    /// Waits for the next change: a burst of events once quiet for a moment, or the
    /// periodic re-check. Cancel-safe: a burst interrupted by another branch of a
    /// `select!` is reported by the next call.
    pub async fn changed(&mut self) -> Cause {
        let recheck = async {
            match self.recheck.as_mut() {
                Some(tick) => {
                    tick.tick().await;
                }
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            Some(()) = self.events.recv() => {}
            () = recheck => return Cause::Recheck,
        }
        // Coalesce the burst: wait until no event came for SETTLE.
        loop {
            match tokio::time::timeout(SETTLE, self.events.recv()).await {
                Ok(Some(())) => {}
                Ok(None) | Err(_) => return Cause::Event,
            }
        }
    }
}

/// Starts events for `path` into `tx`: for a file, events on its directory that name
/// it; for a directory, every event in it. Access events are ignored.
fn start(path: &Path, tx: mpsc::UnboundedSender<()>) -> notify::Result<notify::RecommendedWatcher> {
    let (dir, only): (PathBuf, Option<OsString>) = if path.is_dir() {
        (path.to_path_buf(), None)
    } else {
        let dir = path
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .map_or_else(|| PathBuf::from("."), Path::to_path_buf);
        (dir, path.file_name().map(OsString::from))
    };
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        let Ok(event) = event else { return };
        if event.kind.is_access() {
            return;
        }
        let named = only.as_ref().is_none_or(|name| {
            event
                .paths
                .iter()
                .any(|p| p.file_name() == Some(name.as_os_str()))
        });
        if named {
            // The receiver only goes away with the FileWatch, which stops the watcher.
            let _ = tx.send(());
        }
    })?;
    watcher.watch(&dir, RecursiveMode::NonRecursive)?;
    Ok(watcher)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_atomic_replace_of_the_file_is_one_change_and_other_files_are_none() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("rampart.toml");
        std::fs::write(&file, "a").unwrap();
        let mut watch = FileWatch::new(&file, None);
        // Another file in the same directory: no change of ours.
        std::fs::write(dir.path().join("other"), "x").unwrap();
        let tmp = dir.path().join("rampart.toml.tmp");
        std::fs::write(&tmp, "b").unwrap();
        std::fs::rename(&tmp, &file).unwrap();
        let cause = tokio::time::timeout(Duration::from_secs(10), watch.changed())
            .await
            .expect("the replace was seen");
        assert_eq!(cause, Cause::Event);
        // The whole burst was one change: nothing more is pending.
        assert!(
            tokio::time::timeout(Duration::from_millis(300), watch.changed())
                .await
                .is_err()
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_recheck_comes_due_without_events() {
        let dir = tempfile::tempdir().unwrap();
        let mut watch = FileWatch::new(dir.path(), Some(Duration::from_secs(30)));
        assert_eq!(watch.changed().await, Cause::Recheck);
    }
}
