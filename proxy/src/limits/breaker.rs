//! A pool's admission: the circuit breaker (`max_in_flight`, `error_ratio`) and the
//! retry budget, shared by the upstream attempts of every transport. The counters live
//! in a [`BreakerState`] that outlives reloads keeping the pool (like endpoint state);
//! each forwarded request holds a [`Ticket`] from admission to its end.

use std::ops::Deref;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};

use rampart_config::{CircuitBreaker, Retries};

use crate::policy::Answer;

/// A pool's live admission counters.
#[derive(Debug, Default)]
pub struct BreakerState {
    /// Requests in flight to the pool.
    inflight: AtomicU32,
    /// Retries in flight to the pool.
    retrying: AtomicU32,
    /// When the current error-ratio window began (`now_ms` units).
    window_start: AtomicU64,
    /// Attempts that succeeded and failed in the window.
    ok: AtomicU32,
    failed: AtomicU32,
    /// While open: until when (`now_ms`); 0 when closed.
    open_until: AtomicU64,
    /// A trial request is in flight (half open).
    probing: AtomicBool,
}

/// Why a request was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// `max_in_flight` requests are in flight.
    Full,
    /// The breaker is open; a retry may pass after this many seconds.
    Open(u64),
}

impl Refusal {
    /// The answer to the client: 503 with `Retry-After`.
    #[must_use]
    pub fn answer(self) -> Answer {
        let retry_after = match self {
            Refusal::Full => 1,
            Refusal::Open(s) => s,
        };
        Answer::Unavailable { retry_after }
    }

    /// The access log's error kind and the metric's `reason`.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::Full => "max_in_flight",
            Refusal::Open(_) => "circuit_open",
        }
    }
}

impl BreakerState {
    /// Whether the breaker is open now (for metrics and /status).
    #[must_use]
    pub fn is_open(&self, now_ms: u64) -> bool {
        let until = self.open_until.load(Ordering::Relaxed);
        until != 0 && now_ms < until
    }

    /// Requests in flight to the pool.
    #[must_use]
    pub fn inflight(&self) -> u32 {
        self.inflight.load(Ordering::Relaxed)
    }
}

/// Admits a request to the pool whose state `state` is, under `config`.
pub fn admit<S: Deref<Target = BreakerState>>(
    state: S,
    config: Option<&CircuitBreaker>,
    now_ms: u64,
) -> Result<Ticket<S>, Refusal> {
    let inflight = state.inflight.fetch_add(1, Ordering::Relaxed);
    let mut ticket = Ticket {
        state,
        probe: false,
        retry: false,
    };
    let Some(config) = config else {
        return Ok(ticket);
    };
    if config.max_in_flight.is_some_and(|max| inflight >= max) {
        return Err(Refusal::Full);
    }
    if config.error_ratio.is_some() {
        let until = ticket.state.open_until.load(Ordering::Relaxed);
        if until != 0 {
            if now_ms < until {
                return Err(Refusal::Open((until - now_ms).div_ceil(1000).max(1)));
            }
            // Half open: one trial at a time.
            if ticket.state.probing.swap(true, Ordering::AcqRel) {
                return Err(Refusal::Open(1));
            }
            ticket.probe = true;
        }
    }
    Ok(ticket)
}

/// A request admitted to a pool: counted in flight until dropped.
#[derive(Debug)]
pub struct Ticket<S: Deref<Target = BreakerState>> {
    state: S,
    /// This request is the half-open breaker's trial.
    probe: bool,
    /// This request has made a retry (counted in `retrying`).
    retry: bool,
}

impl<S: Deref<Target = BreakerState>> Ticket<S> {
    /// Whether the retry budget lets this request retry now.
    #[must_use]
    pub fn retry_allowed(&self, retries: &Retries) -> bool {
        if self.retry {
            return true;
        }
        let inflight = u64::from(self.state.inflight.load(Ordering::Relaxed));
        let budget = (inflight * u64::from(retries.budget_percent) / 100)
            .max(u64::from(retries.min_retries));
        u64::from(self.state.retrying.load(Ordering::Relaxed)) < budget
    }

    /// This request is retrying: counted against the budget until it ends.
    pub fn retrying(&mut self) {
        if !self.retry {
            self.retry = true;
            self.state.retrying.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Records how an upstream attempt ended (`ok`: an answer other than 502–504).
    pub fn record(&mut self, ok: bool, config: Option<&CircuitBreaker>, now_ms: u64) {
        let Some((config, ratio)) = config.and_then(|c| Some((c, c.error_ratio?))) else {
            return;
        };
        let s = &*self.state;
        let open_for = u64::try_from(config.open_for.0.as_millis()).unwrap_or(u64::MAX);
        if self.probe {
            self.probe = false;
            if ok {
                s.ok.store(0, Ordering::Relaxed);
                s.failed.store(0, Ordering::Relaxed);
                s.window_start.store(now_ms, Ordering::Relaxed);
                s.open_until.store(0, Ordering::Relaxed);
            } else {
                s.open_until
                    .store(now_ms.saturating_add(open_for).max(1), Ordering::Relaxed);
            }
            s.probing.store(false, Ordering::Release);
            return;
        }
        if s.open_until.load(Ordering::Relaxed) != 0 {
            return;
        }
        let window = u64::try_from(config.window.0.as_millis()).unwrap_or(u64::MAX);
        let start = s.window_start.load(Ordering::Relaxed);
        if now_ms.saturating_sub(start) >= window
            && s.window_start
                .compare_exchange(start, now_ms, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            s.ok.store(0, Ordering::Relaxed);
            s.failed.store(0, Ordering::Relaxed);
        }
        if ok {
            s.ok.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let failed = s.failed.fetch_add(1, Ordering::Relaxed) + 1;
        let total = failed + s.ok.load(Ordering::Relaxed);
        if total >= config.min_requests && f64::from(failed) >= ratio * f64::from(total) {
            s.open_until
                .store(now_ms.saturating_add(open_for).max(1), Ordering::Relaxed);
            s.ok.store(0, Ordering::Relaxed);
            s.failed.store(0, Ordering::Relaxed);
            tracing::warn!(
                failed,
                total,
                "circuit breaker opened: {failed} of the last {total} upstream attempts failed"
            );
        }
    }
}

impl<S: Deref<Target = BreakerState>> Drop for Ticket<S> {
    fn drop(&mut self) {
        self.state.inflight.fetch_sub(1, Ordering::Relaxed);
        if self.retry {
            self.state.retrying.fetch_sub(1, Ordering::Relaxed);
        }
        if self.probe {
            // The trial ended without an answer (the client left): let another try.
            self.state.probing.store(false, Ordering::Release);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rampart_config::Dur;

    fn breaker() -> CircuitBreaker {
        CircuitBreaker {
            max_in_flight: Some(2),
            error_ratio: Some(0.5),
            min_requests: 4,
            window: Dur::secs(10),
            open_for: Dur::secs(5),
        }
    }

    #[test]
    fn max_in_flight_refuses_the_request_over_it_and_frees_the_place_at_its_end() {
        let s = BreakerState::default();
        let c = breaker();
        let a = admit(&s, Some(&c), 1).unwrap();
        let b = admit(&s, Some(&c), 1).unwrap();
        assert_eq!(admit(&s, Some(&c), 1).unwrap_err(), Refusal::Full);
        drop(a);
        assert!(admit(&s, Some(&c), 1).is_ok());
        drop(b);
        assert_eq!(s.inflight(), 0);
    }

    #[test]
    fn failures_over_the_ratio_open_it_then_one_trial_closes_or_reopens_it() {
        let s = BreakerState::default();
        let c = breaker();
        // Three failures in four attempts (≥ 0.5, ≥ min_requests): open.
        for ok in [true, false, false] {
            admit(&s, Some(&c), 1_000)
                .unwrap()
                .record(ok, Some(&c), 1_000);
        }
        assert!(!s.is_open(1_000), "3 attempts are under min_requests");
        admit(&s, Some(&c), 1_000)
            .unwrap()
            .record(false, Some(&c), 1_000);
        assert!(s.is_open(1_000));
        assert_eq!(admit(&s, Some(&c), 2_100).unwrap_err(), Refusal::Open(4));
        // After open_for: one trial, the others refused while it runs.
        let mut trial = admit(&s, Some(&c), 6_000).unwrap();
        assert_eq!(admit(&s, Some(&c), 6_000).unwrap_err(), Refusal::Open(1));
        trial.record(false, Some(&c), 6_000);
        drop(trial);
        assert!(s.is_open(6_001), "a failed trial opens it again");
        let mut trial = admit(&s, Some(&c), 11_000).unwrap();
        trial.record(true, Some(&c), 11_000);
        drop(trial);
        assert!(!s.is_open(11_000));
        assert!(admit(&s, Some(&c), 11_000).is_ok());
        // A trial whose client left lets the next request try.
        let s = BreakerState::default();
        for _ in 0..4 {
            admit(&s, Some(&c), 0).unwrap().record(false, Some(&c), 0);
        }
        drop(admit(&s, Some(&c), 5_000).unwrap());
        assert!(admit(&s, Some(&c), 5_000).is_ok());
    }

    #[test]
    fn a_window_that_ended_forgets_its_failures() {
        let s = BreakerState::default();
        let c = breaker();
        for _ in 0..3 {
            admit(&s, Some(&c), 0).unwrap().record(false, Some(&c), 0);
        }
        admit(&s, Some(&c), 10_000)
            .unwrap()
            .record(false, Some(&c), 10_000);
        assert!(!s.is_open(10_000));
    }

    #[test]
    fn the_retry_budget_is_a_share_of_the_requests_in_flight_with_a_floor() {
        let s = BreakerState::default();
        let retries = Retries::default(); // 20%, at least 3
        let mut tickets: Vec<_> = (0..20).map(|_| admit(&s, None, 0).unwrap()).collect();
        // 20 in flight: max(3, 4) = 4 retries at once.
        for t in tickets.iter_mut().take(4) {
            assert!(t.retry_allowed(&retries));
            t.retrying();
        }
        assert!(!tickets[4].retry_allowed(&retries));
        assert!(
            tickets[0].retry_allowed(&retries),
            "a retrying request goes on"
        );
        // Two retries end: 18 in flight, max(3, 3) = 3, 2 retrying.
        drop(tickets.drain(..2));
        assert!(tickets[3].retry_allowed(&retries));
        // Few requests: the floor.
        let s = BreakerState::default();
        let mut one = admit(&s, None, 0).unwrap();
        assert!(one.retry_allowed(&retries));
        one.retrying();
        assert_eq!(s.retrying.load(Ordering::Relaxed), 1);
        drop(one);
        assert_eq!(s.retrying.load(Ordering::Relaxed), 0);
    }
}
