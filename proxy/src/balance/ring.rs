//! A Ketama-style hash ring: every endpoint owns `POINTS_PER_WEIGHT × weight` points,
//! placed by hashing its stable id, so adding or removing one endpoint only moves the
//! keys that land next to its points (about 1/n of them).

use xxhash_rust::xxh3::xxh3_64;

/// Points on the ring per unit of weight; 160 as in libketama keeps shares within a few
/// percent of the weights.
const POINTS_PER_WEIGHT: u32 = 160;

/// A consistent-hash ring of endpoint indexes.
#[derive(Debug)]
pub struct Ring {
    points: Vec<(u64, u32)>,
    endpoints: usize,
}

impl Ring {
    /// Builds the ring; `ids` must be stable across reloads (addresses).
    #[must_use]
    pub fn new(weights: &[u32], ids: &[String]) -> Self {
        let mut points = Vec::new();
        for (i, (w, id)) in weights.iter().zip(ids).enumerate() {
            let idx = u32::try_from(i).expect("endpoint count fits in u32");
            for p in 0..w.saturating_mul(POINTS_PER_WEIGHT) {
                points.push((xxh3_64(format!("{id}#{p}").as_bytes()), idx));
            }
        }
        points.sort_unstable();
        Self {
            points,
            endpoints: weights.len(),
        }
    }

    /// The first endpoint clockwise from `key` for which `ok` holds.
    pub fn lookup(&self, key: u64, ok: impl Fn(usize) -> bool) -> Option<usize> {
        if self.points.is_empty() {
            return None;
        }
        let start = self.points.partition_point(|&(h, _)| h < key);
        let len = self.points.len();
        let mut seen = vec![false; self.endpoints];
        let mut distinct = 0;
        for k in 0..len {
            let idx = self.points[(start + k) % len].1 as usize;
            if seen[idx] {
                continue;
            }
            if ok(idx) {
                return Some(idx);
            }
            seen[idx] = true;
            distinct += 1;
            if distinct == self.endpoints {
                break;
            }
        }
        None
    }
}
