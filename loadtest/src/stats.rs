//! What a run measures: a latency histogram (HDR, microseconds) and counts of
//! successes, errors by class and bytes. Each worker keeps its own [`Stats`]; they are
//! merged at the end, so the hot loop never shares anything.

use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;

/// Highest latency recorded exactly (60 s); slower requests are clamped to it.
const MAX_LATENCY_US: u64 = 60_000_000;

/// Why a request failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorClass {
    /// TCP connect or TLS handshake failed.
    Connect,
    /// No complete response within the request timeout.
    Timeout,
    /// The connection was reset or closed mid-request, or the response was malformed.
    Reset,
    /// The response status was 5xx.
    Status5xx,
    /// The response status was 4xx.
    Status4xx,
}

/// Failed requests by class.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ErrorCounts {
    /// Connect or handshake failures.
    pub connect: u64,
    /// Timeouts.
    pub timeout: u64,
    /// Resets and malformed responses.
    pub reset: u64,
    /// 5xx responses.
    pub status_5xx: u64,
    /// 4xx responses.
    pub status_4xx: u64,
}

impl ErrorCounts {
    /// Counts one error.
    pub fn add(&mut self, class: ErrorClass) {
        match class {
            ErrorClass::Connect => self.connect += 1,
            ErrorClass::Timeout => self.timeout += 1,
            ErrorClass::Reset => self.reset += 1,
            ErrorClass::Status5xx => self.status_5xx += 1,
            ErrorClass::Status4xx => self.status_4xx += 1,
        }
    }

    /// All errors.
    #[must_use]
    pub fn total(&self) -> u64 {
        self.connect + self.timeout + self.reset + self.status_5xx + self.status_4xx
    }

    fn merge(&mut self, o: &ErrorCounts) {
        self.connect += o.connect;
        self.timeout += o.timeout;
        self.reset += o.reset;
        self.status_5xx += o.status_5xx;
        self.status_4xx += o.status_4xx;
    }
}

/// A worker's (or a whole run's) measurements.
#[derive(Clone, Debug)]
pub struct Stats {
    /// Latencies of successful requests, in microseconds.
    pub latency: Histogram<u64>,
    /// Successful requests.
    pub ok: u64,
    /// Failed requests.
    pub errors: ErrorCounts,
    /// Response bytes received (headers and bodies).
    pub bytes: u64,
    /// TLS handshakes that resumed a session.
    pub resumed: u64,
}

impl Default for Stats {
    fn default() -> Self {
        Self {
            latency: Histogram::new_with_bounds(1, MAX_LATENCY_US, 3)
                .expect("static bounds are valid"),
            ok: 0,
            errors: ErrorCounts::default(),
            bytes: 0,
            resumed: 0,
        }
    }
}

impl Stats {
    /// Records a successful request.
    pub fn record(&mut self, latency: Duration, bytes: usize) {
        let us = u64::try_from(latency.as_micros())
            .unwrap_or(u64::MAX)
            .clamp(1, MAX_LATENCY_US);
        self.latency
            .record(us)
            .expect("value is clamped into the histogram's range");
        self.ok += 1;
        self.bytes += bytes as u64;
    }

    /// Records a failure.
    pub fn fail(&mut self, class: ErrorClass) {
        self.errors.add(class);
    }

    /// Adds another worker's measurements to these.
    pub fn merge(&mut self, other: &Stats) {
        self.latency
            .add(&other.latency)
            .expect("histograms share their bounds");
        self.ok += other.ok;
        self.errors.merge(&other.errors);
        self.bytes += other.bytes;
        self.resumed += other.resumed;
    }

    /// Requests completed, successful or not.
    #[must_use]
    pub fn requests(&self) -> u64 {
        self.ok + self.errors.total()
    }

    /// The latency summary in milliseconds.
    #[must_use]
    pub fn percentiles(&self) -> Percentiles {
        #[allow(clippy::cast_precision_loss)] // microseconds, far below 2^52
        let ms = |us: u64| us as f64 / 1000.0;
        let h = &self.latency;
        Percentiles {
            p50: ms(h.value_at_quantile(0.50)),
            p90: ms(h.value_at_quantile(0.90)),
            p99: ms(h.value_at_quantile(0.99)),
            p999: ms(h.value_at_quantile(0.999)),
            max: ms(h.max()),
            mean: h.mean() / 1000.0,
        }
    }

    /// (percentile, latency ms) points of the distribution, for plots.
    #[must_use]
    pub fn curve(&self) -> Vec<(f64, f64)> {
        [
            0.0, 10.0, 25.0, 50.0, 75.0, 90.0, 95.0, 99.0, 99.5, 99.9, 99.95, 99.99, 100.0,
        ]
        .iter()
        .map(|&p| {
            #[allow(clippy::cast_precision_loss)]
            let v = self.latency.value_at_percentile(p) as f64 / 1000.0;
            (p, v)
        })
        .collect()
    }
}

/// Latency percentiles in milliseconds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct Percentiles {
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
    /// 99.9th percentile.
    pub p999: f64,
    /// Maximum.
    pub max: f64,
    /// Mean.
    pub mean: f64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merging_adds_counts_and_distributions() {
        let mut a = Stats::default();
        let mut b = Stats::default();
        for ms in 1..=50 {
            a.record(Duration::from_millis(ms), 100);
        }
        for ms in 51..=100 {
            b.record(Duration::from_millis(ms), 100);
        }
        b.fail(ErrorClass::Timeout);
        b.fail(ErrorClass::Status5xx);
        a.merge(&b);
        assert_eq!(a.ok, 100);
        assert_eq!(a.requests(), 102);
        assert_eq!(a.bytes, 10_000);
        assert_eq!(
            a.errors,
            ErrorCounts {
                timeout: 1,
                status_5xx: 1,
                ..ErrorCounts::default()
            }
        );
        let p = a.percentiles();
        assert!((p.p50 - 50.0).abs() < 0.1, "{p:?}");
        assert!((p.p99 - 99.0).abs() < 0.1, "{p:?}");
        assert!((p.max - 100.0).abs() < 0.1, "{p:?}");
    }

    #[test]
    fn latencies_outside_the_range_are_clamped() {
        let mut s = Stats::default();
        s.record(Duration::ZERO, 0);
        s.record(Duration::from_secs(3600), 0);
        assert_eq!(s.latency.min(), 1);
        assert!(s.latency.max() >= MAX_LATENCY_US);
    }
}
