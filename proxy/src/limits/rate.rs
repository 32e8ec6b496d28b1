//! Per-route request rate limits (a token bucket per client key, GCRA through the
//! `governor` crate) and the per-client-address connection count of a listener.

use std::collections::HashMap;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use rampart_config::model::RateLimit;

/// How many checks between sweeps of buckets that are full again (idle clients).
const SWEEP_EVERY: u64 = 4096;

/// A route's limiter: one bucket per key (a hash of the client IP, header or cookie).
pub struct RouteLimiter {
    /// The settings it was built from (a reload with the same keeps the buckets).
    pub config: RateLimit,
    limiter: DefaultKeyedRateLimiter<u64>,
    clock: DefaultClock,
    checks: AtomicU64,
}

impl std::fmt::Debug for RouteLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RouteLimiter")
            .field("config", &self.config)
            .field("keys", &self.limiter.len())
            .finish_non_exhaustive()
    }
}

impl RouteLimiter {
    /// A limiter for `config` (validated: requests, burst and period are not zero).
    #[must_use]
    pub fn new(config: &RateLimit) -> Self {
        let requests = NonZeroU32::new(config.requests).unwrap_or(NonZeroU32::MIN);
        let burst = config.burst.and_then(NonZeroU32::new).unwrap_or(requests);
        // One token every per/requests; at least a nanosecond.
        let interval = (config.per.0 / requests.get()).max(Duration::from_nanos(1));
        let quota = Quota::with_period(interval)
            .expect("the interval is not zero")
            .allow_burst(burst);
        Self {
            config: config.clone(),
            limiter: RateLimiter::keyed(quota),
            clock: DefaultClock::default(),
            checks: AtomicU64::new(0),
        }
    }

    /// Takes a token from `key`'s bucket: `Ok`, or `Err(wait)` until the next one.
    ///
    /// # Errors
    /// The time until the bucket has a token again.
    pub fn check(&self, key: u64) -> Result<(), Duration> {
        if self.checks.fetch_add(1, Ordering::Relaxed) % SWEEP_EVERY == SWEEP_EVERY - 1 {
            self.limiter.retain_recent();
        }
        self.limiter
            .check_key(&key)
            .map_err(|not_until| not_until.wait_time_from(self.clock.now()))
    }

    /// Buckets held (clients seen recently).
    #[must_use]
    pub fn keys(&self) -> usize {
        self.limiter.len()
    }
}

/// Open connections per client address on one listener.
#[derive(Debug, Default)]
pub struct PerClient {
    open: Mutex<HashMap<IpAddr, usize>>,
}

impl PerClient {
    /// Counts a new connection from `ip` unless it already has `max`: `true` when
    /// admitted (release it with [`PerClient::release`]).
    pub fn admit(&self, ip: IpAddr, max: usize) -> bool {
        let mut open = self
            .open
            .lock()
            .expect("never poisoned: no panics while held");
        let n = open.entry(ip).or_default();
        if *n >= max {
            if *n == 0 {
                open.remove(&ip);
            }
            return false;
        }
        *n += 1;
        true
    }

    /// Forgets one connection from `ip`.
    pub fn release(&self, ip: IpAddr) {
        let mut open = self
            .open
            .lock()
            .expect("never poisoned: no panics while held");
        if let Some(n) = open.get_mut(&ip) {
            *n -= 1;
            if *n == 0 {
                open.remove(&ip);
            }
        }
    }

    /// Client addresses with open connections.
    #[must_use]
    pub fn clients(&self) -> usize {
        self.open
            .lock()
            .expect("never poisoned: no panics while held")
            .len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rampart_config::units::{Dur, HashKey};

    fn limit(requests: u32, per: Duration, burst: Option<u32>) -> RateLimit {
        RateLimit {
            requests,
            per: Dur(per),
            burst,
            key: HashKey::ClientIp,
        }
    }

    #[test]
    fn a_bucket_allows_its_burst_then_refuses_with_the_wait() {
        let l = RouteLimiter::new(&limit(10, Duration::from_secs(3600), Some(3)));
        for _ in 0..3 {
            assert!(l.check(1).is_ok());
        }
        let wait = l.check(1).unwrap_err();
        // One token per 6 minutes.
        assert!(
            wait > Duration::from_secs(300) && wait <= Duration::from_secs(360),
            "{wait:?}"
        );
        // Another client has its own bucket.
        assert!(l.check(2).is_ok());
        assert_eq!(l.keys(), 2);
    }

    #[test]
    fn the_burst_defaults_to_the_rate() {
        let l = RouteLimiter::new(&limit(5, Duration::from_secs(3600), None));
        assert_eq!((0..10).filter(|_| l.check(7).is_ok()).count(), 5);
    }

    #[test]
    fn per_client_connections_are_capped_and_released() {
        let p = PerClient::default();
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        assert!(p.admit(ip, 2));
        assert!(p.admit(ip, 2));
        assert!(!p.admit(ip, 2));
        assert!(p.admit("192.0.2.2".parse().unwrap(), 2));
        p.release(ip);
        assert!(p.admit(ip, 2));
        p.release(ip);
        p.release(ip);
        assert_eq!(p.clients(), 1);
    }
}
