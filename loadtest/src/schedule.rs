//! Open-loop scheduling with coordinated-omission correction (as wrk2 does).
//!
//! A closed-loop client waits for each response before sending the next request, so
//! when the server stalls the client stops sending, and the stall shows up as one slow
//! request instead of as every request that should have been sent meanwhile
//! ("coordinated omission"). In open loop each request has an *intended* send time on a
//! fixed schedule; its latency is measured from that intended time, so time spent
//! waiting behind a stalled request counts.

use std::time::{Duration, Instant};

/// The send schedule of one connection: request `k` is due at `start + offset + k × interval`.
#[derive(Clone, Copy, Debug)]
pub struct Schedule {
    start: Instant,
    offset: Duration,
    interval: Duration,
}

impl Schedule {
    /// The schedule of connection `index` of `connections` sharing a total `rate`
    /// (requests per second): each sends at `rate / connections`, and connections are
    /// staggered evenly so that the total arrival stream is smooth.
    #[must_use]
    pub fn new(start: Instant, rate: f64, connections: usize, index: usize) -> Self {
        #[allow(clippy::cast_precision_loss)]
        let per_conn = rate / connections as f64;
        let interval = Duration::from_secs_f64(1.0 / per_conn);
        #[allow(clippy::cast_precision_loss)]
        let offset = interval.mul_f64(index as f64 / connections as f64);
        Self {
            start,
            offset,
            interval,
        }
    }

    /// When request `k` is due.
    #[must_use]
    pub fn intended(&self, k: u64) -> Instant {
        #[allow(clippy::cast_precision_loss)]
        let k = k as f64;
        self.start + self.offset + self.interval.mul_f64(k)
    }

    /// The corrected latency of request `k` sent at `sent` and completed at `done`, when
    /// the connection's previous response arrived at `prev_done`.
    ///
    /// If the previous response held the connection past `k`'s intended time, `k` was
    /// late because of the server, and its latency counts from when it should have been
    /// sent. Otherwise the connection was idle, `k` went out on schedule (any gap is the
    /// client's own timer granularity, not the server's doing), and its latency counts
    /// from when it was sent.
    #[must_use]
    pub fn corrected_latency(
        &self,
        k: u64,
        prev_done: Instant,
        sent: Instant,
        done: Instant,
    ) -> Duration {
        let intended = self.intended(k);
        let from = if prev_done > intended {
            intended
        } else {
            sent.max(intended)
        };
        done.saturating_duration_since(from)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connections_interleave_to_the_total_rate() {
        let start = Instant::now();
        let (rate, conns) = (1000.0, 4);
        let mut times: Vec<Duration> = (0..conns)
            .flat_map(|i| {
                let s = Schedule::new(start, rate, conns, i);
                (0..250).map(move |k| s.intended(k) - start)
            })
            .collect();
        times.sort();
        assert_eq!(times.len(), 1000);
        // One request every millisecond overall.
        for w in times.windows(2) {
            let gap = w[1] - w[0];
            assert!((gap.as_secs_f64() - 0.001).abs() < 1e-6, "{gap:?}");
        }
        assert!(times[999] < Duration::from_secs(1));
    }

    #[test]
    fn a_stall_is_charged_to_every_request_that_waited() {
        let start = Instant::now();
        let ms = Duration::from_millis;
        let s = Schedule::new(start, 100.0, 1, 0); // one request every 10 ms
                                                   // Request 0 goes out on time and the server stalls for 1 s.
        let stall_end = start + Duration::from_secs(1);
        assert_eq!(
            s.corrected_latency(0, start, start, stall_end),
            Duration::from_secs(1)
        );
        // Request 50 was due at 500 ms but could only be sent at 1 s: it waited 500 ms.
        assert_eq!(
            s.corrected_latency(50, stall_end, stall_end, stall_end + ms(1)),
            ms(501)
        );
    }

    #[test]
    fn client_timer_lateness_is_not_charged_to_the_server() {
        let start = Instant::now();
        let ms = Duration::from_millis;
        let s = Schedule::new(start, 100.0, 1, 0);
        // The previous response came back at 5 ms; request 1 (due at 10 ms) left at 11 ms
        // because the client's timer fired late, and completed at 12 ms.
        let l = s.corrected_latency(1, start + ms(5), start + ms(11), start + ms(12));
        assert_eq!(l, ms(1));
        // Completion "before" the intended time (clock noise) is zero, not negative.
        assert_eq!(s.corrected_latency(10, start, start, start), Duration::ZERO);
    }
}
