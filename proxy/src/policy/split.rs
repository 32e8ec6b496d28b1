//! Weighted splits between pools on one route (`forward = [{ pool, weight }, ...]`),
//! decided in the policy: an override header or cookie that names a pool wins (for
//! testers, whatever the weights), then the pool the client's split cookie names (so
//! that a user does not flap between versions), then a weighted random choice, which
//! the response then records in that cookie. A pool with no endpoint available (none
//! yet, all down or ejected) keeps no client and draws none while another pool can
//! serve: its share goes to the others, as a pool's share goes to its healthy
//! endpoints.

use std::sync::Arc;

use http::header::{HeaderName, HeaderValue};
use http::HeaderMap;
use rand::Rng;

use crate::generation::PoolRt;
use crate::metrics::RequestMetrics;

/// A route's split, ready for serving.
#[derive(Debug)]
pub struct SplitRt {
    /// The pools in configuration order, with their weights (their sum is more than
    /// 0: validation saw to it) and request metrics.
    pub pools: Vec<SplitPool>,
    /// The cookie that keeps a client on its pool (`None`: choose every time).
    cookie: Option<String>,
    /// The cookie's attributes for HTTP and for HTTPS responses.
    attributes: [String; 2],
    /// The header that names a pool to use.
    override_header: Option<HeaderName>,
    /// The cookie that names a pool to use.
    override_cookie: Option<String>,
}

/// One pool of a split.
#[derive(Debug)]
pub struct SplitPool {
    /// The pool.
    pub pool: Arc<PoolRt>,
    /// Its weight.
    pub weight: u32,
    /// The route's request metrics with this pool's label.
    pub metrics: RequestMetrics,
}

impl SplitRt {
    /// A split over `pools` (weight and metrics each) with `settings`.
    #[must_use]
    pub fn new(pools: Vec<SplitPool>, settings: &rampart_config::Split) -> Self {
        // Secure over HTTPS, HttpOnly, SameSite=Lax.
        let attributes = crate::headers::cookie_attributes(
            settings.ttl.map(|t| t.0),
            None,
            true,
            rampart_config::SameSite::Lax,
        );
        Self {
            pools,
            cookie: Some(settings.cookie.clone()).filter(|c| !c.is_empty()),
            attributes,
            override_header: settings
                .override_header
                .as_deref()
                .and_then(|h| HeaderName::try_from(h).ok()),
            override_cookie: settings.override_cookie.clone(),
        }
    }

    /// The pool (index into `pools`) for a request with `headers` at `now_ms`, and
    /// the `Set-Cookie` that keeps the client there when the choice was new.
    #[must_use]
    pub fn choose(
        &self,
        headers: &HeaderMap,
        https: bool,
        now_ms: u64,
    ) -> (usize, Option<HeaderValue>) {
        let named = |name: &str| self.pools.iter().position(|p| p.pool.name == name);
        let cookie =
            |name: &str| crate::headers::cookie(headers, name).map(|v| v.trim_matches('"'));
        let forced = self
            .override_header
            .as_ref()
            .and_then(|h| headers.get(h))
            .and_then(|v| v.to_str().ok())
            .and_then(|v| named(v.trim()))
            .or_else(|| {
                self.override_cookie
                    .as_deref()
                    .and_then(cookie)
                    .and_then(named)
            });
        if let Some(i) = forced {
            return (i, None);
        }
        // The weights of the pools that can serve now; the configured ones when all or
        // none can (in the latter case the request is answered 503 by whichever pool
        // it draws). Worked out only when some pool cannot serve.
        let serving: Option<Vec<u32>> = if self.pools.iter().all(|p| p.pool.serving(now_ms)) {
            None
        } else {
            let w: Vec<u32> = self
                .pools
                .iter()
                .map(|p| if p.pool.serving(now_ms) { p.weight } else { 0 })
                .collect();
            w.iter().any(|&w| w > 0).then_some(w)
        };
        let weight = |i: usize| serving.as_ref().map_or(self.pools[i].weight, |w| w[i]);
        let Some(name) = &self.cookie else {
            return (self.weighted(weight), None);
        };
        // A pool whose weight went to 0, or that cannot serve while another can, keeps
        // nobody: its clients move.
        if let Some(i) = cookie(name).and_then(named).filter(|&i| weight(i) > 0) {
            return (i, None);
        }
        let i = self.weighted(weight);
        let attributes = &self.attributes[usize::from(https)];
        let set =
            HeaderValue::try_from(format!("{name}={}{attributes}", self.pools[i].pool.name)).ok();
        (i, set)
    }

    /// A pool drawn in proportion to `weight` (of each pool's index).
    fn weighted(&self, weight: impl Fn(usize) -> u32) -> usize {
        let n = self.pools.len();
        let total: u64 = (0..n).map(|i| u64::from(weight(i))).sum();
        let draw = rand::rng().random_range(0..total.max(1));
        slot(draw, (0..n).map(weight))
    }
}

/// The index whose share of `0..sum(weights)` holds `draw` (each index owns as many
/// consecutive numbers as its weight).
fn slot(mut draw: u64, weights: impl Iterator<Item = u32>) -> usize {
    for (i, w) in weights.enumerate() {
        let w = u64::from(w);
        if draw < w {
            return i;
        }
        draw -= w;
    }
    0
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Every pool gets exactly its weight's share of the draws, and a pool of
        /// weight 0 none.
        #[test]
        fn each_pool_owns_its_weight_of_the_draws(weights in prop::collection::vec(0u32..50, 1..6)) {
            let total: u64 = weights.iter().map(|&w| u64::from(w)).sum();
            prop_assume!(total > 0);
            let mut got = vec![0u64; weights.len()];
            for draw in 0..total {
                got[slot(draw, weights.iter().copied())] += 1;
            }
            let want: Vec<u64> = weights.iter().map(|&w| u64::from(w)).collect();
            prop_assert_eq!(got, want);
        }
    }
}
