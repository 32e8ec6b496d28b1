//! Per-endpoint run-time state: health (active and passive), in-flight requests and the
//! latency EWMA. All atomics, read on the request path without locks.
//!
//! A new generation reuses the `EndpointState` of every endpoint that it keeps (same pool,
//! same address), so a reload neither forgets that an endpoint is down nor resets the
//! balancers' statistics.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Milliseconds since this process first asked; a cheap monotonic clock for atomics.
#[must_use]
pub fn now_ms() -> u64 {
    ms_at(Instant::now())
}

/// [`now_ms`] at `at`, an instant the caller has already read (0 before the first ask).
#[must_use]
pub fn ms_at(at: Instant) -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    let start = *START.get_or_init(Instant::now);
    u64::try_from(at.saturating_duration_since(start).as_millis()).unwrap_or(u64::MAX)
}

/// Decay time constant of the latency EWMA.
const EWMA_TAU_MS: f64 = 10_000.0;
/// Latency assumed for an endpoint that has not answered yet (1 ms): new endpoints are
/// tried rather than starved.
const EWMA_INITIAL_US: f64 = 1_000.0;
/// Longest first ejection of an endpoint that has not answered a request yet: a container
/// that discovery announced before its process listens is tried again within a second,
/// not locked out for the pool's whole `eject_for`.
const NEW_ENDPOINT_EJECT: Duration = Duration::from_secs(1);

/// The live state of one endpoint.
#[derive(Debug)]
pub struct EndpointState {
    /// Result of active health checks (true until checks say otherwise).
    active_healthy: AtomicBool,
    active_ok_streak: AtomicU32,
    active_fail_streak: AtomicU32,
    passive_fail_streak: AtomicU32,
    /// `now_ms()` until which the endpoint is ejected by passive health; 0 when not.
    ejected_until_ms: AtomicU64,
    /// Ejections in a row without a success in between (for the doubling back-off).
    ejections: AtomicU32,
    inflight: AtomicU64,
    /// f64 bits of the latency EWMA in microseconds.
    ewma_us: AtomicU64,
    ewma_stamp_ms: AtomicU64,
    requests: AtomicU64,
    failures: AtomicU64,
    /// `now_ms()` when the endpoint left its pool (0: it serves). Requests still in
    /// flight on it are cut once the pool's drain timeout has passed since.
    removed_at_ms: AtomicU64,
    /// When the endpoint last joined its pool or came back from a failed active check
    /// (`now_ms()`), for slow start.
    warm_from_ms: AtomicU64,
    /// The last failure to reach it (a connect or TLS error, a failed probe) and when,
    /// for /status: written only when something fails.
    last_error: arc_swap::ArcSwapOption<(u64, Box<str>)>,
    /// Held by a request of an HTTP/2 pool while Pingora finds or opens its connection
    /// to this endpoint, so that a burst of requests shares one new connection instead
    /// of each opening its own (see `edge::RequestCtx::connecting`).
    connect_gate: std::sync::Arc<tokio::sync::Mutex<()>>,
}

impl Default for EndpointState {
    fn default() -> Self {
        Self {
            active_healthy: AtomicBool::new(true),
            active_ok_streak: AtomicU32::new(0),
            active_fail_streak: AtomicU32::new(0),
            passive_fail_streak: AtomicU32::new(0),
            ejected_until_ms: AtomicU64::new(0),
            ejections: AtomicU32::new(0),
            inflight: AtomicU64::new(0),
            ewma_us: AtomicU64::new(EWMA_INITIAL_US.to_bits()),
            ewma_stamp_ms: AtomicU64::new(0),
            requests: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            removed_at_ms: AtomicU64::new(0),
            warm_from_ms: AtomicU64::new(now_ms()),
            last_error: arc_swap::ArcSwapOption::empty(),
            connect_gate: std::sync::Arc::default(),
        }
    }
}

/// Passive-health parameters applied when recording a failure.
#[derive(Clone, Copy, Debug)]
pub struct EjectPolicy {
    /// Consecutive failures that eject (0 = never).
    pub consecutive_failures: u32,
    /// First ejection period.
    pub base: Duration,
    /// Longest ejection period.
    pub max: Duration,
    /// Below this share (percent) of endpoints free of ejection, ejections are ignored.
    pub panic_threshold: u8,
    /// At most this share (percent) of endpoints is ejected at once (at least one).
    pub max_ejected_percent: u8,
}

impl EndpointState {
    /// Whether the endpoint may receive new requests now.
    #[must_use]
    pub fn is_available(&self, now_ms: u64) -> bool {
        self.active_healthy.load(Ordering::Relaxed)
            && self.ejected_until_ms.load(Ordering::Relaxed) <= now_ms
    }

    /// The gate a request of an HTTP/2 pool holds while it gets its connection.
    #[must_use]
    pub fn connect_gate(&self) -> std::sync::Arc<tokio::sync::Mutex<()>> {
        self.connect_gate.clone()
    }

    /// Notes why the endpoint could not be reached at `now_ms` (shown in /status).
    pub fn note_error(&self, now_ms: u64, reason: impl Into<Box<str>>) {
        self.last_error
            .store(Some(std::sync::Arc::new((now_ms, reason.into()))));
    }

    /// The last failure noted, with its `now_ms()` time.
    #[must_use]
    pub fn last_error(&self) -> Option<std::sync::Arc<(u64, Box<str>)>> {
        self.last_error.load_full()
    }

    /// How far the endpoint is into its slow start at `now_ms`: from 0.0 when it
    /// joined its pool, passed its active check again or its ejection ended, to 1.0
    /// (full share) `window_ms` later. Always 1.0 without slow start (`window_ms` 0).
    #[must_use]
    pub fn warmth(&self, now_ms: u64, window_ms: u64) -> f64 {
        if window_ms == 0 {
            return 1.0;
        }
        let ejected_until = self.ejected_until_ms.load(Ordering::Relaxed);
        let since = self
            .warm_from_ms
            .load(Ordering::Relaxed)
            .max(if ejected_until <= now_ms {
                ejected_until
            } else {
                0
            });
        #[allow(clippy::cast_precision_loss)] // milliseconds: far below 2^52
        let warmth = now_ms.saturating_sub(since) as f64 / window_ms as f64;
        warmth.min(1.0)
    }

    /// Restarts the slow start at `now_ms` (as if the endpoint had just joined).
    pub fn warm_from(&self, now_ms: u64) {
        self.warm_from_ms.store(now_ms, Ordering::Relaxed);
    }

    /// Whether active checks consider the endpoint healthy.
    #[must_use]
    pub fn active_healthy(&self) -> bool {
        self.active_healthy.load(Ordering::Relaxed)
    }

    /// Until when (in `now_ms()` time) the endpoint is ejected, if it is.
    #[must_use]
    pub fn ejected_until(&self, now_ms: u64) -> Option<u64> {
        let until = self.ejected_until_ms.load(Ordering::Relaxed);
        (until > now_ms).then_some(until)
    }

    /// Records an active probe result; returns `Some(new_health)` when it flipped.
    pub fn record_probe(
        &self,
        ok: bool,
        healthy_threshold: u32,
        unhealthy_threshold: u32,
    ) -> Option<bool> {
        if ok {
            self.active_fail_streak.store(0, Ordering::Relaxed);
            let streak = self
                .active_ok_streak
                .fetch_add(1, Ordering::Relaxed)
                .saturating_add(1);
            if !self.active_healthy() && streak >= healthy_threshold {
                self.active_healthy.store(true, Ordering::Relaxed);
                self.warm_from_ms.store(now_ms(), Ordering::Relaxed);
                return Some(true);
            }
        } else {
            self.active_ok_streak.store(0, Ordering::Relaxed);
            let streak = self
                .active_fail_streak
                .fetch_add(1, Ordering::Relaxed)
                .saturating_add(1);
            if self.active_healthy() && streak >= unhealthy_threshold {
                self.active_healthy.store(false, Ordering::Relaxed);
                return Some(false);
            }
        }
        None
    }

    /// Records a successful request: resets the passive failure streak.
    pub fn record_success(&self) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        self.passive_fail_streak.store(0, Ordering::Relaxed);
        self.ejections.store(0, Ordering::Relaxed);
    }

    /// Records a failed request; ejects the endpoint when the streak reaches the policy's
    /// threshold. Returns the ejection period when it ejected: the policy's, doubling per
    /// ejection in a row, starting at no more than [`NEW_ENDPOINT_EJECT`] while the endpoint
    /// has never answered (still starting, most likely).
    /// `may_eject` is false when the pool's cap of ejected endpoints is reached.
    pub fn record_failure(
        &self,
        policy: EjectPolicy,
        now_ms: u64,
        may_eject: bool,
    ) -> Option<Duration> {
        self.requests.fetch_add(1, Ordering::Relaxed);
        self.failures.fetch_add(1, Ordering::Relaxed);
        if policy.consecutive_failures == 0 || !may_eject {
            return None;
        }
        // An endpoint already ejected (a request it took in panic, or one in flight)
        // does not extend its ejection.
        if self.ejected_until(now_ms).is_some() {
            return None;
        }
        let streak = self
            .passive_fail_streak
            .fetch_add(1, Ordering::Relaxed)
            .saturating_add(1);
        if streak < policy.consecutive_failures {
            return None;
        }
        self.passive_fail_streak.store(0, Ordering::Relaxed);
        let n = self.ejections.fetch_add(1, Ordering::Relaxed).min(16);
        // Every request is counted, failures also apart: more requests than failures
        // means the endpoint has answered at least once since it joined its pool.
        let (requests, failures) = self.counts();
        let base = if requests > failures {
            policy.base
        } else {
            policy.base.min(NEW_ENDPOINT_EJECT)
        };
        let period = base.saturating_mul(1 << n).min(policy.max);
        let until = now_ms.saturating_add(u64::try_from(period.as_millis()).unwrap_or(u64::MAX));
        self.ejected_until_ms.store(until, Ordering::Relaxed);
        Some(period)
    }

    /// Marks the endpoint as having left its pool now (or back in it).
    pub fn set_removed(&self, removed: bool) {
        if removed {
            // Keeps the first removal time if already removed.
            let _ = self.removed_at_ms.compare_exchange(
                0,
                now_ms().max(1),
                Ordering::Relaxed,
                Ordering::Relaxed,
            );
        } else {
            self.removed_at_ms.store(0, Ordering::Relaxed);
        }
    }

    /// Whether the endpoint left its pool (in the generation this state belongs to).
    #[must_use]
    pub fn is_removed(&self) -> bool {
        self.removed_at_ms.load(Ordering::Relaxed) != 0
    }

    /// Whether the endpoint left its pool more than `drain` ago.
    #[must_use]
    pub fn drained(&self, drain: Duration) -> bool {
        let at = self.removed_at_ms.load(Ordering::Relaxed);
        at != 0
            && now_ms().saturating_sub(at) >= u64::try_from(drain.as_millis()).unwrap_or(u64::MAX)
    }

    /// Requests currently in flight to this endpoint.
    #[must_use]
    pub fn inflight(&self) -> u64 {
        self.inflight.load(Ordering::Relaxed)
    }

    /// Marks one more request in flight; the guard marks it finished when dropped.
    #[must_use]
    pub fn start_request(self: &std::sync::Arc<Self>) -> InflightGuard {
        self.inflight.fetch_add(1, Ordering::Relaxed);
        InflightGuard(self.clone())
    }

    /// Total requests and failures recorded.
    #[must_use]
    pub fn counts(&self) -> (u64, u64) {
        (
            self.requests.load(Ordering::Relaxed),
            self.failures.load(Ordering::Relaxed),
        )
    }

    /// The latency EWMA in microseconds.
    #[must_use]
    pub fn ewma_us(&self) -> f64 {
        f64::from_bits(self.ewma_us.load(Ordering::Relaxed))
    }

    /// Folds a latency sample into the EWMA, weighting by the time since the last sample
    /// (so a quiet endpoint's old latency fades). Racy updates lose a sample at worst.
    pub fn observe_latency(&self, latency: Duration, now_ms: u64) {
        let sample = latency.as_secs_f64() * 1e6;
        let last = self.ewma_stamp_ms.swap(now_ms, Ordering::Relaxed);
        #[allow(clippy::cast_precision_loss)] // milliseconds: far below 2^52
        let dt = now_ms.saturating_sub(last) as f64;
        let w = (-dt / EWMA_TAU_MS).exp();
        let new = self.ewma_us() * w + sample * (1.0 - w);
        self.ewma_us.store(new.to_bits(), Ordering::Relaxed);
    }

    /// The P2C-EWMA cost: latency EWMA scaled by the requests waiting on this endpoint.
    #[must_use]
    pub fn load_cost(&self) -> f64 {
        #[allow(clippy::cast_precision_loss)]
        let inflight = self.inflight() as f64;
        self.ewma_us() * (inflight + 1.0)
    }
}

/// Decrements an endpoint's in-flight count when dropped.
#[derive(Debug)]
pub struct InflightGuard(std::sync::Arc<EndpointState>);

impl Drop for InflightGuard {
    fn drop(&mut self) {
        self.0.inflight.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: EjectPolicy = EjectPolicy {
        consecutive_failures: 3,
        base: Duration::from_secs(10),
        max: Duration::from_secs(25),
        panic_threshold: 50,
        max_ejected_percent: 50,
    };

    /// An endpoint that has answered once (the policy's periods apply in full).
    fn answered() -> EndpointState {
        let s = EndpointState::default();
        s.record_success();
        s
    }

    #[test]
    fn consecutive_failures_eject_with_doubling_backoff_capped() {
        let s = answered();
        assert_eq!(s.record_failure(POLICY, 0, true), None);
        assert_eq!(s.record_failure(POLICY, 0, true), None);
        assert_eq!(
            s.record_failure(POLICY, 0, true),
            Some(Duration::from_secs(10))
        );
        assert!(!s.is_available(5_000));
        assert!(s.is_available(10_000));
        for _ in 0..2 {
            s.record_failure(POLICY, 10_000, true);
        }
        assert_eq!(
            s.record_failure(POLICY, 10_000, true),
            Some(Duration::from_secs(20))
        );
        for _ in 0..2 {
            s.record_failure(POLICY, 30_000, true);
        }
        assert_eq!(
            s.record_failure(POLICY, 30_000, true),
            Some(Duration::from_secs(25))
        );
    }

    #[test]
    fn an_ejected_endpoint_is_not_ejected_again_and_the_cap_holds() {
        let s = answered();
        for _ in 0..3 {
            s.record_failure(POLICY, 0, true);
        }
        assert!(!s.is_available(1));
        // Failures while ejected (requests it took in panic) do not extend it.
        for _ in 0..10 {
            assert_eq!(s.record_failure(POLICY, 1_000, true), None);
        }
        assert!(s.is_available(10_000));
        let capped = EndpointState::default();
        for _ in 0..10 {
            assert_eq!(capped.record_failure(POLICY, 0, false), None);
        }
        assert!(capped.is_available(1));
    }

    #[test]
    fn an_endpoint_that_never_answered_is_ejected_briefly_then_doubling() {
        // A container announced before its process listens: refused connects eject it
        // for a second, not for the pool's 10 s, and a dead one backs off by doubling.
        let s = EndpointState::default();
        let eject = |s: &EndpointState, at| {
            (0..3)
                .filter_map(|_| s.record_failure(POLICY, at, true))
                .last()
        };
        assert_eq!(eject(&s, 0), Some(Duration::from_secs(1)));
        assert!(!s.is_available(999));
        assert!(s.is_available(1_000));
        assert_eq!(eject(&s, 1_000), Some(Duration::from_secs(2)));
        assert_eq!(eject(&s, 3_000), Some(Duration::from_secs(4)));
        // Once it has answered, the next ejection is the policy's own.
        s.record_success();
        assert_eq!(eject(&s, 7_000), Some(Duration::from_secs(10)));
    }

    #[test]
    fn a_success_resets_the_streak() {
        let s = EndpointState::default();
        s.record_failure(POLICY, 0, true);
        s.record_failure(POLICY, 0, true);
        s.record_success();
        assert_eq!(s.record_failure(POLICY, 0, true), None);
        assert!(s.is_available(0));
    }

    #[test]
    fn probes_flip_health_at_thresholds() {
        let s = EndpointState::default();
        assert_eq!(s.record_probe(false, 2, 2), None);
        assert_eq!(s.record_probe(false, 2, 2), Some(false));
        assert!(!s.is_available(0));
        assert_eq!(s.record_probe(true, 2, 2), None);
        assert_eq!(s.record_probe(true, 2, 2), Some(true));
        assert!(s.is_available(0));
    }

    #[test]
    fn inflight_guard_counts() {
        let s = std::sync::Arc::new(EndpointState::default());
        let g1 = s.start_request();
        let g2 = s.start_request();
        assert_eq!(s.inflight(), 2);
        drop(g1);
        drop(g2);
        assert_eq!(s.inflight(), 0);
    }

    #[test]
    fn ewma_moves_toward_samples() {
        let s = EndpointState::default();
        s.observe_latency(Duration::from_millis(100), 100_000);
        assert!(s.ewma_us() > 90_000.0, "{}", s.ewma_us());
        s.observe_latency(Duration::from_millis(1), 100_001);
        assert!(s.ewma_us() > 90_000.0, "one quick sample barely moves it");
    }
}
