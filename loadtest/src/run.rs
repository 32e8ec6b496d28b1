//! `rampart-loadtest run`: closed loop (C connections as fast as they can) or open loop
//! (a fixed arrival rate, latencies corrected for coordinated omission), over HTTP/1.1
//! or HTTP/2, reusing connections or opening a new one per request.

use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde::Serialize;

use crate::client::{classify, h1_request, tls_config, Exchange, Target, Transport, Trust, H1, H2};
use crate::schedule::Schedule;
use crate::stats::{ErrorClass, ErrorCounts, Percentiles, Stats};

/// What to run.
#[derive(Clone, Debug)]
pub struct RunConfig {
    /// The URL's parts.
    pub target: Target,
    /// Concurrent connections (workers).
    pub connections: usize,
    /// Open loop at this total rate (requests/s); closed loop when `None`.
    pub rate: Option<f64>,
    /// How long to send.
    pub duration: Duration,
    /// Negotiate HTTP/2 (TLS only).
    pub h2: bool,
    /// HTTP/2 streams in flight per connection (h2load's `-m`): `connections × streams`
    /// requests are outstanding at once. 1 for HTTP/1.1.
    pub streams: usize,
    /// A new connection (and TLS handshake, without resumption) per request.
    pub new_conn: bool,
    /// With `new_conn`: resume the TLS session (by ticket) on each new connection.
    pub resume: bool,
    /// How to verify TLS servers.
    pub trust: Trust,
    /// Extra request headers.
    pub headers: Vec<(String, String)>,
    /// A request without a complete response after this long is a timeout.
    pub timeout: Duration,
    /// Show progress on stderr.
    pub progress: bool,
    /// Stops the run early when set (scenarios run load until their work is done).
    pub stop: Option<Arc<AtomicBool>>,
}

/// The result of a run, printed and written as JSON.
#[derive(Clone, Debug, Serialize)]
pub struct RunReport {
    /// The URL.
    pub url: String,
    /// "closed" or "open".
    pub mode: &'static str,
    /// "http/1.1" or "h2".
    pub protocol: &'static str,
    /// New connection per request.
    pub new_conn: bool,
    /// Connections.
    pub connections: usize,
    /// HTTP/2 streams in flight per connection.
    pub streams: usize,
    /// Target rate (open loop).
    pub rate: Option<f64>,
    /// Measured time, seconds.
    pub elapsed_s: f64,
    /// Requests completed (ok + errors).
    pub requests: u64,
    /// Successful requests.
    pub ok: u64,
    /// Successful requests per second.
    pub rps: f64,
    /// Latency percentiles of successful requests, ms (corrected in open loop).
    pub latency_ms: Percentiles,
    /// Errors by class.
    pub errors: ErrorCounts,
    /// Response bytes received.
    pub bytes: u64,
    /// TLS handshakes that resumed a session.
    pub resumed: u64,
    /// (percentile, ms) points of the latency distribution.
    pub curve: Vec<(f64, f64)>,
}

impl RunReport {
    /// Builds the report from merged stats.
    #[must_use]
    pub fn new(cfg: &RunConfig, url: &str, stats: &Stats, elapsed: Duration) -> Self {
        #[allow(clippy::cast_precision_loss)]
        let rps = stats.ok as f64 / elapsed.as_secs_f64().max(1e-9);
        Self {
            url: url.to_string(),
            mode: if cfg.rate.is_some() { "open" } else { "closed" },
            protocol: if cfg.h2 { "h2" } else { "http/1.1" },
            new_conn: cfg.new_conn,
            connections: cfg.connections,
            streams: cfg.streams,
            rate: cfg.rate,
            elapsed_s: elapsed.as_secs_f64(),
            requests: stats.requests(),
            ok: stats.ok,
            rps,
            latency_ms: stats.percentiles(),
            errors: stats.errors,
            bytes: stats.bytes,
            resumed: stats.resumed,
            curve: stats.curve(),
        }
    }

    /// The human summary.
    #[must_use]
    pub fn summary(&self) -> String {
        let l = &self.latency_ms;
        let e = &self.errors;
        let nc = if self.new_conn {
            ", new connection per request"
        } else {
            ""
        };
        let rate = self
            .rate
            .map_or(String::new(), |r| format!(", {r:.0} req/s target"));
        #[allow(clippy::cast_precision_loss)]
        let mb = self.bytes as f64 / 1e6;
        let streams = if self.streams > 1 {
            format!(" x {} streams", self.streams)
        } else {
            String::new()
        };
        format!(
            "{}  {} loop, {}{nc}, {} connections{streams}{rate}\n  {} ok in {:.1}s = {:.0} req/s, {mb:.1} MB received\n  latency ms: p50 {:.3}  p90 {:.3}  p99 {:.3}  p99.9 {:.3}  max {:.3}\n  errors: connect {}  timeout {}  reset {}  5xx {}  4xx {}",
            self.url, self.mode, self.protocol, self.connections, self.ok, self.elapsed_s, self.rps,
            l.p50, l.p90, l.p99, l.p999, l.max, e.connect, e.timeout, e.reset, e.status_5xx, e.status_4xx,
        )
    }
}

/// One worker's connection.
enum Conn {
    H1(H1),
    H2(H2),
}

struct Worker {
    cfg: Arc<RunConfig>,
    tls: Option<Arc<rustls::ClientConfig>>,
    request: Bytes,
    done: Arc<AtomicU64>,
    /// TLS handshakes that resumed a session, all workers.
    resumed: Arc<AtomicU64>,
    /// The HTTP/2 connection this worker shares with the other streams of its
    /// connection (`streams > 1`).
    shared: Option<Arc<tokio::sync::Mutex<Option<H2>>>>,
}

impl Worker {
    async fn connect(&self) -> Result<Conn, ErrorClass> {
        let Some(shared) = &self.shared else {
            return self.open().await;
        };
        // The first stream to find the connection gone opens the next one; the others
        // wait for it and share it.
        let mut slot = shared.lock().await;
        if let Some(h2) = slot.as_ref().filter(|h2| !h2.is_closed()) {
            return Ok(Conn::H2(h2.clone()));
        }
        let conn = self.open().await?;
        if let Conn::H2(h2) = &conn {
            *slot = Some(h2.clone());
        }
        Ok(conn)
    }

    async fn open(&self) -> Result<Conn, ErrorClass> {
        let io = tokio::time::timeout(
            self.cfg.timeout,
            Transport::connect(&self.cfg.target, self.tls.as_ref()),
        )
        .await
        .map_err(|_| ErrorClass::Connect)?
        .map_err(|_| ErrorClass::Connect)?;
        if io.resumed() {
            self.resumed.fetch_add(1, Ordering::Relaxed);
        }
        if io.is_h2() {
            H2::handshake(io, &self.cfg.target, &self.cfg.headers)
                .await
                .map(Conn::H2)
                .map_err(|_| ErrorClass::Connect)
        } else {
            Ok(Conn::H1(H1::new(io)))
        }
    }

    async fn exchange(&self, conn: &mut Conn) -> Result<Exchange, ErrorClass> {
        let fut = async {
            match conn {
                Conn::H1(c) => c.exchange(&self.request).await,
                Conn::H2(c) => c.exchange().await,
            }
        };
        match tokio::time::timeout(self.cfg.timeout, fut).await {
            Err(_) => Err(ErrorClass::Timeout),
            Ok(Err(e)) => Err(classify(&e)),
            Ok(Ok(ex)) if ex.status >= 500 => Err(ErrorClass::Status5xx),
            Ok(Ok(ex)) if ex.status >= 400 => Err(ErrorClass::Status4xx),
            Ok(Ok(ex)) => Ok(ex),
        }
    }

    /// Sends requests until `end`; `schedule` makes it open loop.
    async fn run(self, end: Instant, schedule: Option<Schedule>) -> Stats {
        let mut stats = Stats::default();
        let mut conn: Option<Conn> = None;
        let mut pending = 0u64;
        let mut prev_done = Instant::now();
        for k in 0u64.. {
            let intended = schedule.map(|s| s.intended(k));
            if let Some(at) = intended {
                if at >= end {
                    break;
                }
                tokio::time::sleep_until(at.into()).await;
            } else if Instant::now() >= end {
                break;
            }
            if self
                .cfg
                .stop
                .as_ref()
                .is_some_and(|s| s.load(Ordering::Relaxed))
            {
                break;
            }
            let started = Instant::now();
            let result = match conn.take() {
                Some(c) => Ok(c),
                None => self.connect().await,
            };
            let outcome = match result {
                Err(class) => {
                    // Do not spin on a refusing server.
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    Err(class)
                }
                Ok(mut c) => {
                    let r = self.exchange(&mut c).await;
                    let reusable = match &r {
                        Ok(ex) => !ex.closing,
                        Err(class) => {
                            matches!(class, ErrorClass::Status4xx | ErrorClass::Status5xx)
                        }
                    };
                    if reusable && !self.cfg.new_conn {
                        conn = Some(c);
                    }
                    r
                }
            };
            let done = Instant::now();
            let latency = schedule.map_or(done - started, |s| {
                s.corrected_latency(k, prev_done, started, done)
            });
            prev_done = done;
            match outcome {
                Ok(ex) => stats.record(latency, ex.bytes),
                Err(class) => stats.fail(class),
            }
            pending += 1;
            if pending == 32 {
                self.done.fetch_add(pending, Ordering::Relaxed);
                pending = 0;
            }
        }
        self.done.fetch_add(pending, Ordering::Relaxed);
        stats
    }
}

/// Runs the load and returns the merged measurements and the measured time.
///
/// # Errors
/// When the TLS configuration cannot be built.
pub async fn run(cfg: RunConfig) -> anyhow::Result<(Stats, Duration)> {
    let tls = if cfg.target.tls {
        Some(tls_config(&cfg.trust, cfg.h2, !cfg.new_conn || cfg.resume)?)
    } else {
        None
    };
    let cfg = Arc::new(cfg);
    let done = Arc::new(AtomicU64::new(0));
    let resumed = Arc::new(AtomicU64::new(0));
    let request = h1_request(&cfg.target, &cfg.headers, cfg.new_conn);
    let start = Instant::now();
    let end = start + cfg.duration;
    let streams = if cfg.h2 { cfg.streams.max(1) } else { 1 };
    let workers = cfg.connections * streams;
    let mut tasks = Vec::with_capacity(workers);
    for i in 0..cfg.connections {
        let shared = (streams > 1).then(|| Arc::new(tokio::sync::Mutex::new(None)));
        for s in 0..streams {
            let worker = Worker {
                cfg: cfg.clone(),
                tls: tls.clone(),
                request: request.clone(),
                done: done.clone(),
                resumed: resumed.clone(),
                shared: shared.clone(),
            };
            let schedule = cfg
                .rate
                .map(|r| Schedule::new(start, r, workers, i * streams + s));
            tasks.push(tokio::spawn(worker.run(end, schedule)));
        }
    }
    let finished = Arc::new(AtomicBool::new(false));
    let progress = cfg.progress.then(|| {
        tokio::spawn(show_progress(
            done.clone(),
            start,
            cfg.duration,
            finished.clone(),
        ))
    });
    let mut total = Stats::default();
    for t in tasks {
        total.merge(&t.await?);
    }
    total.resumed = resumed.load(Ordering::Relaxed);
    let elapsed = start.elapsed();
    finished.store(true, Ordering::Relaxed);
    if let Some(p) = progress {
        p.await?;
    }
    Ok((total, elapsed))
}

/// A progress bar on a terminal, a plain line per second otherwise.
async fn show_progress(
    done: Arc<AtomicU64>,
    start: Instant,
    duration: Duration,
    finished: Arc<AtomicBool>,
) {
    let bar = std::io::stderr().is_terminal().then(|| {
        let bar = indicatif::ProgressBar::new(duration.as_secs().max(1));
        bar.set_style(
            indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len}s {msg}")
                .expect("static template is valid"),
        );
        bar
    });
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.tick().await;
    let mut last = 0;
    while !finished.load(Ordering::Relaxed) {
        tick.tick().await;
        let now = done.load(Ordering::Relaxed);
        let msg = format!("{} req/s, {now} requests", now - last);
        last = now;
        match &bar {
            Some(b) => {
                b.set_position(start.elapsed().as_secs());
                b.set_message(msg);
            }
            None => eprintln!("[{:>4}s] {msg}", start.elapsed().as_secs()),
        }
    }
    if let Some(b) = bar {
        b.finish_and_clear();
    }
}
