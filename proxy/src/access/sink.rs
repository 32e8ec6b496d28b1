//! Where access log lines go: a bounded queue drained by one writer thread, so that a
//! request never waits on the disk. When the queue is full the line is dropped and
//! counted; a slow or stalled file (a full disk, a pipe nobody reads) costs lines, never
//! requests. SIGUSR1 asks every sink to reopen its file (logrotate's `postrotate`).

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::Arc;
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

/// A queue of lines and the thread writing them; the thread ends once every sender
/// (this sink, kept by the generations that log to it) is gone.
#[derive(Debug)]
pub struct Sink {
    target: Target,
    capacity: usize,
    tx: SyncSender<Vec<u8>>,
    dropped: IntCounter,
    written: IntCounter,
}

impl Sink {
    /// Opens `target` (a regular file is opened now, so that a bad path fails the
    /// configuration; a FIFO is opened by the writer, which may wait for a reader) and
    /// starts the writer.
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
        let (tx, rx) = sync_channel(capacity);
        let thread_target = target.clone();
        let thread_written = written.clone();
        std::thread::Builder::new()
            .name("access-log".into())
            .spawn(move || write_lines(&rx, &thread_target, out, &thread_written))
            .context("starting the access log writer")?;
        Ok(Arc::new(Self {
            target,
            capacity,
            tx,
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

    /// Queues one line (ending in `\n`); drops and counts it when the queue is full.
    pub fn send(&self, line: Vec<u8>) {
        match self.tx.try_send(line) {
            Ok(()) => {}
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => self.dropped.inc(),
        }
    }

    /// Lines written so far (for tests and /status).
    #[must_use]
    pub fn written(&self) -> u64 {
        self.written.get()
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

/// The writer: batches what is queued into one write, flushes when the queue is
/// empty, reopens on request. Write errors are reported once per failing streak.
fn write_lines(
    rx: &Receiver<Vec<u8>>,
    target: &Target,
    mut out: Option<Box<dyn Write + Send>>,
    written: &IntCounter,
) {
    let mut batch = Vec::with_capacity(64 * 1024);
    let mut failing = false;
    let mut seen = REOPENS.load(Ordering::Acquire);
    loop {
        let first = match rx.recv_timeout(Duration::from_secs(1)) {
            Ok(line) => Some(line),
            Err(RecvTimeoutError::Timeout) => None,
            Err(RecvTimeoutError::Disconnected) => return,
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
        let Some(first) = first else { continue };
        batch.clear();
        batch.extend_from_slice(&first);
        let mut lines = 1u64;
        while batch.len() < 64 * 1024 {
            match rx.try_recv() {
                Ok(line) => {
                    batch.extend_from_slice(&line);
                    lines += 1;
                }
                Err(_) => break,
            }
        }
        let Some(w) = out.as_mut() else { continue };
        match w.write_all(&batch).and_then(|()| w.flush()) {
            Ok(()) => {
                failing = false;
                written.inc_by(lines);
            }
            Err(e) if !failing => {
                failing = true;
                tracing::error!("access log: writing: {e}; lines are lost until it works again");
            }
            Err(_) => {}
        }
    }
}
