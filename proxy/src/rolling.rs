//! In-process rolling windows of the last minutes of traffic — requests, 5xx answers and
//! a latency histogram per second — for the dashboard's overview, without a Prometheus
//! server. Lock-free: one ring of per-second buckets of atomic counters.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use crate::clock::unix_secs_at;

/// Seconds kept.
pub const WINDOW: usize = 300;
/// Latency buckets: bucket `i` counts requests that took under 2^i microseconds
/// (the last one catches everything slower, ~34 s and up).
const BUCKETS: usize = 26;

/// One second of traffic.
struct Second {
    /// The Unix second these counts belong to (a bucket from an older lap is stale).
    at: AtomicU64,
    requests: AtomicU64,
    errors: AtomicU64,
    latency: [AtomicU64; BUCKETS],
}

impl Second {
    fn new() -> Self {
        Self {
            at: AtomicU64::new(0),
            requests: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            latency: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }
}

/// The rolling windows of one proxy.
pub struct Rolling {
    ring: Vec<Second>,
}

impl Default for Rolling {
    fn default() -> Self {
        Self {
            ring: (0..WINDOW).map(|_| Second::new()).collect(),
        }
    }
}

impl std::fmt::Debug for Rolling {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rolling").finish_non_exhaustive()
    }
}

/// Traffic of one second, for a chart.
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize)]
pub struct Point {
    /// Unix second.
    pub at: u64,
    /// Requests finished in it.
    pub requests: u64,
    /// Of them, answered 5xx.
    pub errors: u64,
}

/// A summary of the last seconds (also what heartbeats carry to the controller).
pub type Summary = rampart_config::snapshot::TrafficSummary;

fn unix_now() -> u64 {
    unix_secs_at(Instant::now())
}

impl Rolling {
    /// Counts a request that finished at `at` (an instant the caller read anyway).
    pub fn record(&self, at: Instant, status: u16, seconds: f64) {
        self.record_at(unix_secs_at(at), status, seconds);
    }

    fn record_at(&self, now: u64, status: u16, seconds: f64) {
        let slot = &self.ring[usize::try_from(now).unwrap_or(0) % WINDOW];
        let at = slot.at.load(Ordering::Acquire);
        if at != now
            && slot
                .at
                .compare_exchange(at, now, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            // First request of this second: clear the previous lap's counts. A request
            // racing with the reset may be lost; the overview is an estimate.
            slot.requests.store(0, Ordering::Relaxed);
            slot.errors.store(0, Ordering::Relaxed);
            for b in &slot.latency {
                b.store(0, Ordering::Relaxed);
            }
        }
        slot.requests.fetch_add(1, Ordering::Relaxed);
        if (500..600).contains(&status) {
            slot.errors.fetch_add(1, Ordering::Relaxed);
        }
        let micros = (seconds * 1e6).max(1.0);
        // Bucket i: under 2^i µs.
        let bucket = (micros.log2().floor() as usize + 1).min(BUCKETS - 1);
        slot.latency[bucket].fetch_add(1, Ordering::Relaxed);
    }

    /// Per-second points of the last `seconds` (oldest first), the current second out.
    #[must_use]
    pub fn series(&self, seconds: usize) -> Vec<Point> {
        self.series_at(unix_now(), seconds)
    }

    fn series_at(&self, now: u64, seconds: usize) -> Vec<Point> {
        let seconds = seconds.min(WINDOW - 1);
        (1..=seconds as u64)
            .rev()
            .map(|back| {
                let at = now - back.min(now);
                let slot = &self.ring[usize::try_from(at).unwrap_or(0) % WINDOW];
                if slot.at.load(Ordering::Acquire) == at {
                    Point {
                        at,
                        requests: slot.requests.load(Ordering::Relaxed),
                        errors: slot.errors.load(Ordering::Relaxed),
                    }
                } else {
                    Point {
                        at,
                        ..Point::default()
                    }
                }
            })
            .collect()
    }

    /// Rate, error ratio and latency percentiles of the last `seconds` (the current
    /// second out).
    #[must_use]
    pub fn summary(&self, seconds: usize) -> Summary {
        self.summary_at(unix_now(), seconds)
    }

    fn summary_at(&self, now: u64, seconds: usize) -> Summary {
        let seconds = seconds.clamp(1, WINDOW - 1);
        let mut latency = [0u64; BUCKETS];
        let (mut requests, mut errors) = (0, 0);
        for back in 1..=seconds as u64 {
            let at = now - back.min(now);
            let slot = &self.ring[usize::try_from(at).unwrap_or(0) % WINDOW];
            if slot.at.load(Ordering::Acquire) != at {
                continue;
            }
            requests += slot.requests.load(Ordering::Relaxed);
            errors += slot.errors.load(Ordering::Relaxed);
            for (sum, b) in latency.iter_mut().zip(&slot.latency) {
                *sum += b.load(Ordering::Relaxed);
            }
        }
        let total: u64 = latency.iter().sum();
        let percentile = |q: f64| {
            if total == 0 {
                return 0.0;
            }
            let want = (q * total as f64).ceil() as u64;
            let mut seen = 0;
            for (i, n) in latency.iter().enumerate() {
                seen += n;
                if seen >= want {
                    return f64::from(1u32 << i) / 1000.0;
                }
            }
            f64::from(1u32 << (BUCKETS - 1)) / 1000.0
        };
        Summary {
            seconds: seconds as u64,
            rate: requests as f64 / seconds as f64,
            error_ratio: if requests == 0 {
                0.0
            } else {
                errors as f64 / requests as f64
            },
            p50_ms: percentile(0.50),
            p99_ms: percentile(0.99),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_window_sums_its_seconds_and_forgets_older_laps() {
        let r = Rolling::default();
        let t = 1_000_000;
        for _ in 0..90 {
            r.record_at(t, 200, 0.002); // 2 ms: bucket "under 2.048 ms"
        }
        for _ in 0..10 {
            r.record_at(t, 503, 0.100);
        }
        r.record_at(t + 1, 200, 0.001);
        let s = r.summary_at(t + 2, 60);
        assert_eq!(s.seconds, 60);
        assert!((s.rate - 101.0 / 60.0).abs() < 1e-9, "{s:?}");
        assert!((s.error_ratio - 10.0 / 101.0).abs() < 1e-9);
        assert!((s.p50_ms - 2.048).abs() < 1e-9, "{s:?}");
        assert!((s.p99_ms - 131.072).abs() < 1e-9, "{s:?}");
        let series = r.series_at(t + 2, 3);
        assert_eq!(
            series
                .iter()
                .map(|p| (p.requests, p.errors))
                .collect::<Vec<_>>(),
            [(0, 0), (100, 10), (1, 0)]
        );
        // One lap later the same slots hold other seconds: the old counts are gone.
        let later = t + WINDOW as u64;
        r.record_at(later, 200, 0.002);
        assert_eq!(r.summary_at(later + 1, 10).rate, 0.1);
        assert_eq!(r.summary_at(later + 1, WINDOW).seconds, WINDOW as u64 - 1);
    }

    #[test]
    fn an_empty_window_is_all_zero() {
        assert_eq!(Rolling::default().summary(60).rate, 0.0);
        assert_eq!(Rolling::default().summary(60).p99_ms, 0.0);
    }
}
