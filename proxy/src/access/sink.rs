//! Where access log lines go: a bounded buffer drained by one writer thread, so that a
//! request never waits on the disk. When the buffer is full the line is dropped and
//! counted; a slow or stalled file (a full disk, a pipe nobody reads) costs lines, never
//! requests. SIGUSR1 asks every sink to reopen its file (logrotate's `postrotate`).

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use anyhow::Context;
use prometheus::IntCounter;

/// Counts SIGUSR1s; a writer that has seen fewer reopens its file (within a second).
static REOPENS: AtomicU64 = AtomicU64::new(0);

/// Asks every access log writer to reopen its file (after logrotate moved it).
pub fn request_reopen() {
    REOPENS.fetch_add(1, Ordering::AcqRel);
}

/// Where the lines are written.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// The process's standard output.
    Stdout,
    /// A file, appended to and created when missing.
    File(PathBuf),
}

impl Target {
    /// `"stdout"` or a file path.
    #[must_use]
    pub fn parse(path: &str) -> Self {
        if path == "stdout" {
            Target::Stdout
        } else {
            Target::File(PathBuf::from(path))
        }
    }
}

/// Lines waiting for the writer, and the writer thread; the thread writes what is left
/// and ends when the sink is dropped (with the last generation that logs to it).
///
/// A request formats its line straight into a shared buffer under a mutex (no copy, no
/// system call and no wake-up); the writer swaps the whole buffer for an empty one
/// every [`FLUSH_EVERY`], or as soon as it holds [`FLUSH_BYTES`], and writes it in one
/// call. Waking the writer for every line doubled the CPU per request (a futex wake and
/// a write per request). One buffer for all threads keeps the lines in the order the
/// requests ended (a buffer per thread measured no faster and reordered them).
#[derive(Debug)]
pub struct Sink {
    target: Target,
    capacity: usize,
    shared: Arc<Shared>,
    dropped: IntCounter,
    written: IntCounter,
}

/// The writer takes the lines at least this often.
const FLUSH_EVERY: Duration = Duration::from_millis(200);
/// ... or as soon as this many bytes wait.
const FLUSH_BYTES: usize = 64 * 1024;

#[derive(Debug, Default)]
struct Shared {
    pending: Mutex<Pending>,
    wake: Condvar,
}

#[derive(Debug, Default)]
struct Pending {
    buf: String,
    lines: usize,
    closed: bool,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Pending> {
        // Nothing panics while holding it; a poisoned buffer is still a buffer.
        self.pending.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Sink {
    /// Opens `target` (a regular file is opened now, so that a bad path fails the
    /// configuration; a FIFO is opened by the writer, which may wait for a reader) and
    /// starts the writer; at most `capacity` lines wait for it.
    ///
    /// # Errors
    /// When the file cannot be opened or its directory does not exist.
    pub fn open(
        target: Target,
        capacity: usize,
        dropped: IntCounter,
        written: IntCounter,
    ) -> anyhow::Result<Arc<Self>> {
        let out: Option<Box<dyn Write + Send>> = match &target {
            Target::Stdout => Some(Box::new(std::io::stdout())),
            Target::File(path) if is_fifo(path) => None,
            Target::File(path) => Some(Box::new(append(path)?)),
        };
        let shared = Arc::new(Shared::default());
        let (thread_shared, thread_target, thread_written) =
            (shared.clone(), target.clone(), written.clone());
        std::thread::Builder::new()
            .name("access-log".into())
            .spawn(move || write_lines(&thread_shared, &thread_target, out, &thread_written))
            .context("starting the access log writer")?;
        Ok(Arc::new(Self {
            target,
            capacity,
            shared,
            dropped,
            written,
        }))
    }

    /// Whether this sink writes to `target` with a queue of `capacity` (a reload
    /// keeps it, and its queue, when both are unchanged).
    #[must_use]
    pub fn serves(&self, target: &Target, capacity: usize) -> bool {
        self.target == *target && self.capacity == capacity
    }

    /// Queues one line that `write` appends (ending in `\n`); drops and counts it when
    /// `capacity` lines already wait (the writer is stuck: a full disk, a pipe nobody
    /// reads).
    pub fn append(&self, write: impl FnOnce(&mut String)) {
        let mut p = self.shared.lock();
        if p.lines >= self.capacity {
            drop(p);
            self.dropped.inc();
            return;
        }
        let before = p.buf.len();
        write(&mut p.buf);
        p.lines += 1;
        // Only the line that fills the buffer wakes the writer: while it writes, the
        // lines after it add no wake-up each.
        let full = before < FLUSH_BYTES && p.buf.len() >= FLUSH_BYTES;
        drop(p);
        if full {
            self.shared.wake.notify_one();
        }
    }

    /// Lines written so far (for tests and /status).
    #[must_use]
    pub fn written(&self) -> u64 {
        self.written.get()
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        self.shared.lock().closed = true;
        self.shared.wake.notify_one();
    }
}

fn is_fifo(path: &Path) -> bool {
    use std::os::unix::fs::FileTypeExt;
    std::fs::metadata(path).is_ok_and(|m| m.file_type().is_fifo())
}

fn append(path: &Path) -> anyhow::Result<File> {
    OpenOptions::new()
        .append(true)
        .create(true)
        .open(path)
        .with_context(|| {
            format!(
                "access_log.path: cannot open {} for appending (does its directory exist, and may rampart write there?)",
                path.display()
            )
        })
}

/// The writer: takes what waits, writes it in one call, reopens on request. Write
/// errors are reported once per failing streak.
fn write_lines(
    shared: &Shared,
    target: &Target,
    mut out: Option<Box<dyn Write + Send>>,
    written: &IntCounter,
) {
    let mut spare = String::with_capacity(FLUSH_BYTES);
    let mut failing = false;
    let mut seen = REOPENS.load(Ordering::Acquire);
    loop {
        let (mut batch, lines, closed) = {
            let mut p = shared.lock();
            if p.buf.len() < FLUSH_BYTES && !p.closed {
                p = shared
                    .wake
                    .wait_timeout(p, FLUSH_EVERY)
                    .unwrap_or_else(PoisonError::into_inner)
                    .0;
            }
            let lines = std::mem::take(&mut p.lines);
            (std::mem::replace(&mut p.buf, spare), lines, p.closed)
        };
        let reopens = REOPENS.load(Ordering::Acquire);
        if let (Target::File(path), true) = (target, reopens != seen || out.is_none()) {
            seen = reopens;
            match append(path) {
                Ok(f) => {
                    out = Some(Box::new(f));
                    failing = false;
                }
                Err(e) if !failing => {
                    failing = true;
                    tracing::error!("access log: {e:#}; lines are lost until it works again");
                }
                Err(_) => {}
            }
        }
        if !batch.is_empty() {
            if let Some(w) = out.as_mut() {
                match w.write_all(batch.as_bytes()).and_then(|()| w.flush()) {
                    Ok(()) => {
                        failing = false;
                        written.inc_by(lines as u64);
                    }
                    Err(e) if !failing => {
                        failing = true;
                        tracing::error!(
                            "access log: writing: {e}; lines are lost until it works again"
                        );
                    }
                    Err(_) => {}
                }
            }
        }
        if closed {
            return;
        }
        batch.clear();
        spare = batch;
    }
}
