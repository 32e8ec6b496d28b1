//! Where access log lines go: a bounded buffer drained by one writer thread, so that a
//! request never waits on the disk. When the buffer is full the line is dropped and
//! counted; a slow or stalled file (a full disk, a pipe nobody reads) costs lines, never
//! requests. SIGUSR1 asks every sink to reopen its file (logrotate's `postrotate`).

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError, Weak};
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
/// Each worker thread formats its lines straight into a buffer of its own (a stripe,
/// under a lock that only the writer's visits contend for); the writer takes every
/// stripe's lines every [`FLUSH_EVERY`], or as soon as one holds [`FLUSH_BYTES`], and
/// writes them in one call. Waking the writer for every line doubled the CPU per
/// request (a futex wake and a write per request); one buffer shared by all threads
/// cost a contended lock and a copy per line.
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
/// ... or as soon as this many bytes wait in one stripe.
const FLUSH_BYTES: usize = 64 * 1024;

#[derive(Debug, Default)]
struct Shared {
    /// One per thread that has logged to this sink.
    stripes: Mutex<Vec<Arc<Stripe>>>,
    /// Set (with a notification) when a stripe is full or the sink closes.
    flush: Mutex<Flush>,
    wake: Condvar,
}

#[derive(Debug, Default)]
struct Flush {
    asked: bool,
    closed: bool,
}

/// One thread's lines waiting for the writer.
#[derive(Debug, Default)]
struct Stripe(Mutex<Pending>);

#[derive(Debug, Default)]
struct Pending {
    buf: String,
    lines: usize,
}

/// Nothing panics while holding these locks; a poisoned buffer is still a buffer.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

thread_local! {
    /// This thread's stripe of every sink it has logged to.
    static STRIPES: std::cell::RefCell<Vec<(Weak<Shared>, Arc<Stripe>)>> =
        const { std::cell::RefCell::new(Vec::new()) };
}

impl Shared {
    /// Calls `f` with this thread's stripe, made on its first line.
    fn with_stripe<R>(self: &Arc<Self>, f: impl FnOnce(&Stripe) -> R) -> R {
        STRIPES.with_borrow_mut(|mine| {
            let at = mine
                .iter()
                .position(|(sink, _)| std::ptr::eq(sink.as_ptr(), Arc::as_ptr(self)));
            let at = at.unwrap_or_else(|| {
                // Sinks that are gone leave their stripes here until this thread
                // needs a new one.
                mine.retain(|(sink, _)| sink.strong_count() > 0);
                let stripe = Arc::new(Stripe::default());
                lock(&self.stripes).push(stripe.clone());
                mine.push((Arc::downgrade(self), stripe));
                mine.len() - 1
            });
            f(&mine[at].1)
        })
    }
}

impl Sink {
    /// Opens `target` (a regular file is opened now, so that a bad path fails the
    /// configuration; a FIFO is opened by the writer, which may wait for a reader) and
    /// starts the writer; at most `capacity` lines per worker thread wait for it.
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

    /// Queues one line that `write` appends (ending in `\n`) to this thread's buffer;
    /// drops and counts it when `capacity` lines of this thread already wait (the writer
    /// is stuck: a full disk, a pipe nobody reads).
    pub fn append(&self, write: impl FnOnce(&mut String)) {
        let full = self.shared.with_stripe(|stripe| {
            let mut p = lock(&stripe.0);
            if p.lines >= self.capacity {
                drop(p);
                self.dropped.inc();
                return false;
            }
            let before = p.buf.len();
            write(&mut p.buf);
            p.lines += 1;
            // Only the line that fills the buffer wakes the writer: while it writes,
            // the lines after it add no lock and no wake-up each.
            before < FLUSH_BYTES && p.buf.len() >= FLUSH_BYTES
        });
        if full {
            lock(&self.shared.flush).asked = true;
            self.shared.wake.notify_one();
        }
    }

    /// Whether this sink writes to `target` with a queue of `capacity` (a reload
    /// keeps it, and its queue, when both are unchanged).
    #[must_use]
    pub fn serves(&self, target: &Target, capacity: usize) -> bool {
        self.target == *target && self.capacity == capacity
    }

    /// Lines written so far (for tests and /status).
    #[must_use]
    pub fn written(&self) -> u64 {
        self.written.get()
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        lock(&self.shared.flush).closed = true;
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
    let mut spares: Vec<String> = Vec::new();
    let mut batches: Vec<String> = Vec::new();
    let mut failing = false;
    let mut seen = REOPENS.load(Ordering::Acquire);
    loop {
        let closed = {
            let mut f = lock(&shared.flush);
            if !f.asked && !f.closed {
                f = shared
                    .wake
                    .wait_timeout(f, FLUSH_EVERY)
                    .unwrap_or_else(PoisonError::into_inner)
                    .0;
            }
            f.asked = false;
            f.closed
        };
        // Every stripe's lines: its buffer is swapped for an empty one of the same
        // size, so that a thread never waits for a copy and never grows a buffer anew.
        let stripes = lock(&shared.stripes).clone();
        let mut lines = 0;
        for stripe in &stripes {
            let spare = spares
                .pop()
                .unwrap_or_else(|| String::with_capacity(FLUSH_BYTES));
            let mut p = lock(&stripe.0);
            if p.lines == 0 {
                drop(p);
                spares.push(spare);
                continue;
            }
            lines += std::mem::take(&mut p.lines);
            batches.push(std::mem::replace(&mut p.buf, spare));
        }
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
        if !batches.is_empty() {
            if let Some(w) = out.as_mut() {
                let all = batches.iter().try_for_each(|b| w.write_all(b.as_bytes()));
                match all.and_then(|()| w.flush()) {
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
        for mut b in batches.drain(..) {
            b.clear();
            spares.push(b);
        }
    }
}
