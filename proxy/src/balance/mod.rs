//! Load-balancing policies: given the endpoints of a pool and their live state, pick one.
//!
//! Pure and lock-free: a [`Balancer`] is compiled once per generation (the weighted
//! schedule, the hash ring) and `pick` only reads atomics. Endpoints that are unhealthy
//! or ejected are skipped; endpoints already tried by this request are avoided while
//! another one is available (retries go elsewhere).

mod ring;
pub mod sticky;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use rampart_config::Balance;
use rand::Rng;

use crate::health::EndpointState;
pub use ring::Ring;

/// A compiled balancing policy for one pool.
#[derive(Debug)]
pub struct Balancer {
    policy: Compiled,
    cursor: AtomicUsize,
}

#[derive(Debug)]
enum Compiled {
    RoundRobin,
    /// Smooth weighted round robin, unrolled into a schedule of endpoint indexes.
    Weighted(Vec<u32>),
    LeastConn,
    ConsistentHash(Ring),
    P2cEwma,
}

/// What a pick needs to know about the request.
#[derive(Clone, Copy, Debug, Default)]
pub struct PickInput<'a> {
    /// Hash of the request's key (consistent hash only).
    pub key_hash: Option<u64>,
    /// The endpoint the request's sticky cookie names: taken while it is available
    /// and not tried.
    pub sticky: Option<usize>,
    /// Endpoints already tried by this request.
    pub tried: &'a [usize],
    /// The current time in `now_ms()` units.
    pub now_ms: u64,
    /// The pool's panic threshold in percent (`passive_health.panic_threshold`).
    pub panic_threshold: u8,
    /// The pool's slow start in milliseconds (0: none).
    pub slow_start_ms: u64,
}

impl Balancer {
    /// Compiles `policy` for endpoints with these `weights` and identities (`ids` are
    /// used to place endpoints on the hash ring, so they must be stable across reloads).
    #[must_use]
    pub fn new(policy: Balance, weights: &[u32], ids: &[String]) -> Self {
        let policy = match policy {
            Balance::RoundRobin => Compiled::RoundRobin,
            Balance::Weighted => Compiled::Weighted(smooth_weighted_schedule(weights)),
            Balance::LeastConn => Compiled::LeastConn,
            Balance::ConsistentHash => Compiled::ConsistentHash(Ring::new(weights, ids)),
            Balance::P2cEwma => Compiled::P2cEwma,
        };
        Self {
            policy,
            cursor: AtomicUsize::new(0),
        }
    }

    /// Whether picks depend on the request's key (consistent hashing).
    #[must_use]
    pub fn uses_key(&self) -> bool {
        matches!(self.policy, Compiled::ConsistentHash(_))
    }

    /// Picks an endpoint index that this request has not tried yet (a retry never goes
    /// back to an endpoint that failed it: after a timeout that would only double the
    /// wait), or `None` when there is none. Endpoints must pass active checks and be
    /// free of passive ejection — unless the pool is in panic (fewer than
    /// `panic_threshold` percent are free of ejection), when ejections are ignored.
    #[must_use]
    pub fn pick(&self, states: &[Arc<EndpointState>], input: PickInput<'_>) -> Option<usize> {
        let panic = in_panic(states, input.now_ms, input.panic_threshold);
        let now = input.now_ms;
        let usable = |i: usize| {
            !input.tried.contains(&i)
                && if panic {
                    // Passive ejection is ignored; active checks still count.
                    states[i].active_healthy()
                } else {
                    states[i].is_available(now)
                }
        };
        if let Some(i) = input.sticky.filter(|&i| i < states.len() && usable(i)) {
            return Some(i);
        }
        let first = self.pick_filtered(states, input, usable)?;
        // Slow start, the same for every policy: an endpoint still warming up keeps the
        // pick in proportion to its warmth; otherwise the request goes to another
        // endpoint the policy picks (which keeps it even if warming too: the requests
        // are served, only their spread changes).
        if input.slow_start_ms > 0 {
            let warmth = states[first].warmth(now, input.slow_start_ms);
            if warmth < 1.0 && rand::rng().random::<f64>() >= warmth {
                // As a retry would: the turn is not taken again.
                let skipped = [first];
                let again = PickInput {
                    tried: if input.tried.is_empty() {
                        &skipped
                    } else {
                        input.tried
                    },
                    ..input
                };
                if let Some(other) = self.pick_filtered(states, again, |i| i != first && usable(i))
                {
                    return Some(other);
                }
            }
        }
        Some(first)
    }

    fn pick_filtered(
        &self,
        states: &[Arc<EndpointState>],
        input: PickInput<'_>,
        ok: impl Fn(usize) -> bool,
    ) -> Option<usize> {
        let n = states.len();
        if n == 0 {
            return None;
        }
        // A retry does not take a turn: it continues from the current position, so a
        // failing endpoint does not shift every other endpoint's share.
        let next = || {
            if input.tried.is_empty() {
                self.cursor.fetch_add(1, Ordering::Relaxed)
            } else {
                self.cursor.load(Ordering::Relaxed)
            }
        };
        match &self.policy {
            Compiled::RoundRobin => {
                let start = next();
                (0..n).map(|k| (start + k) % n).find(|&i| ok(i))
            }
            Compiled::Weighted(schedule) => {
                let len = schedule.len();
                let start = next();
                (0..len)
                    .map(|k| schedule[(start + k) % len] as usize)
                    .find(|&i| ok(i))
            }
            Compiled::LeastConn => {
                let start = next();
                (0..n)
                    .map(|k| (start + k) % n)
                    .filter(|&i| ok(i))
                    .min_by_key(|&i| states[i].inflight())
            }
            Compiled::ConsistentHash(ring) => {
                let key = input.key_hash.unwrap_or_else(|| rand::rng().random());
                ring.lookup(key, ok)
            }
            Compiled::P2cEwma => p2c(states, ok),
        }
    }
}

/// Whether fewer than `threshold` percent of `states` are free of ejection (and pass
/// active checks). Stops counting as soon as enough are: a healthy pool costs a few
/// loads.
#[must_use]
pub fn in_panic(states: &[Arc<EndpointState>], now_ms: u64, threshold: u8) -> bool {
    if threshold == 0 || states.is_empty() {
        return false;
    }
    let needed = (states.len() * usize::from(threshold)).div_ceil(100);
    let mut available = 0;
    for s in states {
        if s.is_available(now_ms) {
            available += 1;
            if available >= needed {
                return false;
            }
        }
    }
    true
}

/// Power of two choices: two distinct random available endpoints, the cheaper wins.
fn p2c(states: &[Arc<EndpointState>], ok: impl Fn(usize) -> bool) -> Option<usize> {
    let candidates: Vec<usize> = (0..states.len()).filter(|&i| ok(i)).collect();
    match candidates.len() {
        0 => None,
        1 => Some(candidates[0]),
        n => {
            let mut rng = rand::rng();
            let a = rng.random_range(0..n);
            let b = (a + rng.random_range(1..n)) % n;
            let (a, b) = (candidates[a], candidates[b]);
            Some(if states[b].load_cost() < states[a].load_cost() {
                b
            } else {
                a
            })
        }
    }
}

/// Unrolls nginx's smooth weighted round robin into one period: each endpoint appears
/// `weight / gcd` times, spread out rather than in runs.
fn smooth_weighted_schedule(weights: &[u32]) -> Vec<u32> {
    let g = weights.iter().copied().fold(0, gcd).max(1);
    let w: Vec<i64> = weights.iter().map(|&x| i64::from(x / g)).collect();
    let total: i64 = w.iter().sum();
    let mut current = vec![0i64; w.len()];
    let mut schedule = Vec::with_capacity(usize::try_from(total).unwrap_or(0));
    for _ in 0..total {
        for (c, wi) in current.iter_mut().zip(&w) {
            *c += wi;
        }
        let (best, _) = current
            .iter()
            .enumerate()
            .max_by_key(|&(i, c)| (*c, std::cmp::Reverse(i)))
            .expect("total > 0 implies at least one endpoint");
        current[best] -= total;
        schedule.push(u32::try_from(best).expect("endpoint count fits in u32"));
    }
    schedule
}

fn gcd(a: u32, b: u32) -> u32 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::health::EjectPolicy;
    use proptest::prelude::*;
    use std::time::Duration;

    const ALL: [Balance; 5] = [
        Balance::RoundRobin,
        Balance::Weighted,
        Balance::LeastConn,
        Balance::ConsistentHash,
        Balance::P2cEwma,
    ];

    fn states(n: usize) -> Vec<Arc<EndpointState>> {
        (0..n).map(|_| Arc::new(EndpointState::default())).collect()
    }

    fn ids(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("10.0.0.{i}:80")).collect()
    }

    fn counts(b: &Balancer, s: &[Arc<EndpointState>], picks: usize) -> Vec<usize> {
        let mut c = vec![0; s.len()];
        for _ in 0..picks {
            c[b.pick(s, PickInput::default()).unwrap()] += 1;
        }
        c
    }

    /// The share of endpoint 1 of 4,000 picks among two, at `warmth` of its slow start
    /// (endpoint 0 warm), under `policy`; consistent hash with a key per request.
    fn warming_share(policy: Balance, warmth: f64) -> f64 {
        let s = states(2);
        let window = 10_000;
        // Both joined at 0 (warm by `window`), endpoint 1 joins again at `window`.
        s[0].warm_from(0);
        s[1].warm_from(window);
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let now = window + (warmth * window as f64) as u64;
        let b = Balancer::new(policy, &[1, 1], &ids(2));
        let mut on_1 = 0;
        for k in 0..4000u64 {
            let input = PickInput {
                key_hash: Some(k.wrapping_mul(0x9E37_79B9_7F4A_7C15)),
                now_ms: now,
                slow_start_ms: window,
                ..PickInput::default()
            };
            on_1 += usize::from(b.pick(&s, input).unwrap() == 1);
        }
        #[allow(clippy::cast_precision_loss)]
        let share = on_1 as f64 / 4000.0;
        share
    }

    #[test]
    fn slow_start_ramps_a_new_endpoints_share_up_under_every_policy() {
        for policy in ALL {
            let shares: Vec<f64> = [0.0, 0.2, 0.6, 1.0]
                .iter()
                .map(|&w| warming_share(policy, w))
                .collect();
            // Nothing at first, then about half the full share times the warmth
            // (a pick it loses goes to the warm endpoint), then the full half.
            assert!(shares[0] < 0.01, "{policy:?}: {shares:?}");
            assert!((0.05..0.17).contains(&shares[1]), "{policy:?}: {shares:?}");
            assert!((0.22..0.40).contains(&shares[2]), "{policy:?}: {shares:?}");
            assert!((0.42..0.58).contains(&shares[3]), "{policy:?}: {shares:?}");
        }
    }

    #[test]
    fn slow_start_begins_again_when_an_endpoint_recovers() {
        let s = EndpointState::default();
        s.warm_from(0);
        assert!((s.warmth(30_000, 30_000) - 1.0).abs() < f64::EPSILON);
        s.record_probe(false, 1, 1);
        s.record_probe(true, 1, 1);
        let now = crate::health::now_ms();
        assert!(s.warmth(now, 30_000) < 0.01);
        // Without slow start, always full.
        assert!((s.warmth(now, 0) - 1.0).abs() < f64::EPSILON);
        // An ejection that ended: warming from its end.
        let e = EndpointState::default();
        e.warm_from(0);
        let policy = EjectPolicy {
            consecutive_failures: 1,
            base: Duration::from_secs(10),
            max: Duration::from_secs(10),
            panic_threshold: 0,
            max_ejected_percent: 100,
        };
        // Answered once: the full ejection period applies.
        e.record_success();
        e.record_failure(policy, 100_000, true).unwrap();
        let until = e.ejected_until(100_000).unwrap();
        assert!(e.warmth(until + 3_000, 30_000) < 0.11);
    }

    #[test]
    fn smooth_schedule_interleaves() {
        assert_eq!(
            smooth_weighted_schedule(&[5, 1, 1]),
            vec![0, 0, 1, 0, 2, 0, 0]
        );
        assert_eq!(smooth_weighted_schedule(&[2, 2]), vec![0, 1]);
    }

    #[test]
    fn round_robin_is_even_and_skips_unavailable() {
        let s = states(3);
        let b = Balancer::new(Balance::RoundRobin, &[1, 5, 1], &ids(3));
        assert_eq!(counts(&b, &s, 300), vec![100, 100, 100]);
        s[1].record_probe(false, 1, 1);
        let c = counts(&b, &s, 300);
        assert_eq!(c[1], 0);
        assert_eq!(c[0] + c[2], 300);
    }

    #[test]
    fn no_available_endpoint_gives_none() {
        let s = states(2);
        for st in &s {
            st.record_probe(false, 1, 1);
        }
        for policy in ALL {
            let b = Balancer::new(policy, &[1, 1], &ids(2));
            assert_eq!(b.pick(&s, PickInput::default()), None, "{policy:?}");
        }
    }

    #[test]
    fn retries_go_only_to_endpoints_not_tried() {
        let s = states(3);
        for policy in ALL {
            let b = Balancer::new(policy, &[1, 1, 1], &ids(3));
            for _ in 0..50 {
                let input = PickInput {
                    key_hash: Some(42),
                    tried: &[0, 1],
                    ..PickInput::default()
                };
                assert_eq!(b.pick(&s, input), Some(2), "{policy:?}");
            }
            // A timed-out request is not sent to the endpoint that timed out again.
            let input = PickInput {
                key_hash: Some(42),
                tried: &[0, 1, 2],
                ..PickInput::default()
            };
            assert_eq!(
                b.pick(&s, input),
                None,
                "{policy:?} went back to a tried endpoint"
            );
        }
    }

    #[test]
    fn below_the_panic_threshold_ejected_endpoints_take_traffic_again() {
        let policy = EjectPolicy {
            consecutive_failures: 1,
            base: std::time::Duration::from_secs(60),
            max: std::time::Duration::from_secs(60),
            panic_threshold: 50,
            max_ejected_percent: 100,
        };
        let s = states(4);
        // One of four ejected: 75% free, no panic; the ejected one gets nothing.
        s[0].record_failure(policy, 0, true);
        let b = Balancer::new(Balance::RoundRobin, &[1; 4], &ids(4));
        let input = PickInput {
            panic_threshold: 50,
            ..PickInput::default()
        };
        assert!(!in_panic(&s, 0, 50));
        assert!((0..100).all(|_| b.pick(&s, input) != Some(0)));
        // Three of four ejected: panic, all four share the traffic again.
        s[1].record_failure(policy, 0, true);
        s[2].record_failure(policy, 0, true);
        assert!(in_panic(&s, 0, 50));
        let picked: std::collections::BTreeSet<_> =
            (0..100).filter_map(|_| b.pick(&s, input)).collect();
        assert_eq!(picked.len(), 4);
        // A single ejected endpoint still takes requests: the pool recovers with the
        // first that succeeds.
        let one = states(1);
        one[0].record_failure(policy, 0, true);
        assert!(!one[0].is_available(0));
        let b = Balancer::new(Balance::RoundRobin, &[1], &ids(1));
        assert_eq!(b.pick(&one, input), Some(0));
        // 0 turns panic off; active health is never overridden.
        assert_eq!(b.pick(&one, PickInput::default()), None);
        let down = states(1);
        down[0].record_probe(false, 1, 1);
        assert_eq!(b.pick(&down, input), None);
    }

    #[test]
    fn least_conn_prefers_idle_endpoint() {
        let s = states(3);
        let _busy: Vec<_> = [0, 0, 1].iter().map(|&i| s[i].start_request()).collect();
        let b = Balancer::new(Balance::LeastConn, &[1, 1, 1], &ids(3));
        for _ in 0..10 {
            assert_eq!(b.pick(&s, PickInput::default()), Some(2));
        }
    }

    #[test]
    fn p2c_avoids_the_slow_endpoint() {
        let s = states(2);
        s[0].observe_latency(Duration::from_millis(200), 60_000);
        s[1].observe_latency(Duration::from_millis(2), 60_000);
        let b = Balancer::new(Balance::P2cEwma, &[1, 1], &ids(2));
        assert_eq!(counts(&b, &s, 1000), vec![0, 1000]);
        let s = states(5);
        s[3].observe_latency(Duration::from_millis(500), 60_000);
        let b = Balancer::new(Balance::P2cEwma, &[1; 5], &ids(5));
        let c = counts(&b, &s, 10_000);
        // The slow endpoint only wins when both choices are itself, which p2c never draws.
        assert_eq!(c[3], 0, "{c:?}");
    }

    #[test]
    fn consistent_hash_is_stable_per_key() {
        let s = states(4);
        let b = Balancer::new(Balance::ConsistentHash, &[1; 4], &ids(4));
        for key in 0..100u64 {
            let k = xxhash_rust::xxh3::xxh3_64(&key.to_le_bytes());
            let first = b.pick(
                &s,
                PickInput {
                    key_hash: Some(k),
                    ..PickInput::default()
                },
            );
            for _ in 0..3 {
                assert_eq!(
                    b.pick(
                        &s,
                        PickInput {
                            key_hash: Some(k),
                            ..PickInput::default()
                        }
                    ),
                    first
                );
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(16))]

        #[test]
        fn weighted_shares_follow_weights(weights in proptest::collection::vec(1u32..20, 1..6)) {
            let s = states(weights.len());
            let b = Balancer::new(Balance::Weighted, &weights, &ids(weights.len()));
            let picks = 100_000;
            let c = counts(&b, &s, picks);
            let total: u32 = weights.iter().sum();
            for (i, w) in weights.iter().enumerate() {
                let expected = picks as f64 * f64::from(*w) / f64::from(total);
                let got = c[i] as f64;
                prop_assert!((got - expected).abs() <= expected * 0.01 + 20.0, "endpoint {} got {} expected {}", i, got, expected);
            }
        }

        #[test]
        fn consistent_hash_weights_hold(weights in proptest::collection::vec(1u32..5, 2..6)) {
            let n = weights.len();
            let s = states(n);
            let b = Balancer::new(Balance::ConsistentHash, &weights, &ids(n));
            let mut c = vec![0usize; n];
            for key in 0..100_000u64 {
                let k = xxhash_rust::xxh3::xxh3_64(&key.to_le_bytes());
                c[b.pick(&s, PickInput { key_hash: Some(k), ..PickInput::default() }).unwrap()] += 1;
            }
            let total: u32 = weights.iter().sum();
            for (i, w) in weights.iter().enumerate() {
                let expected = 100_000.0 * f64::from(*w) / f64::from(total);
                prop_assert!((c[i] as f64 - expected).abs() < expected * 0.25, "endpoint {} got {} expected {}", i, c[i], expected);
            }
        }

        #[test]
        fn adding_an_endpoint_moves_about_one_nth_of_keys(n in 2usize..10) {
            let before = Balancer::new(Balance::ConsistentHash, &vec![1; n], &ids(n));
            let after = Balancer::new(Balance::ConsistentHash, &vec![1; n + 1], &ids(n + 1));
            let (s1, s2) = (states(n), states(n + 1));
            let keys = 20_000u64;
            let mut moved = 0;
            for key in 0..keys {
                let k = xxhash_rust::xxh3::xxh3_64(&key.to_le_bytes());
                let a = before.pick(&s1, PickInput { key_hash: Some(k), ..PickInput::default() }).unwrap();
                let b = after.pick(&s2, PickInput { key_hash: Some(k), ..PickInput::default() }).unwrap();
                if a != b {
                    prop_assert_eq!(b, n, "a key may only move to the new endpoint");
                    moved += 1;
                }
            }
            let ideal = keys as f64 / (n + 1) as f64;
            prop_assert!((moved as f64) < ideal * 1.5 && (moved as f64) > ideal * 0.5, "moved {} ideal {}", moved, ideal);
        }
    }
}
