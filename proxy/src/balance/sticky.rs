//! Sticky sessions with a cookie the proxy issues (a pool's `sticky`): the cookie's
//! value names an endpoint opaquely — a keyed hash of its identity, never its address —
//! so a client stays on its endpoint while that endpoint is available, and adding an
//! endpoint moves no session (the other endpoints' values do not change).

use http::header::HeaderValue;
use http::HeaderMap;
use rampart_config::Sticky;

/// A pool's sticky cookie, ready for serving.
#[derive(Debug)]
pub struct StickyRt {
    /// The cookie's name.
    pub cookie: String,
    /// The attributes after `name=value` for HTTP and for HTTPS responses.
    attributes: [String; 2],
    /// The cookie value of each endpoint, indexed like the pool's endpoints.
    pub values: Vec<u64>,
}

/// The key the endpoint values are hashed with: fixed, so that every proxy of a fleet
/// and every generation gives an endpoint the same value. The value is opaque, not
/// secret: a client that sends another endpoint's value is only sent there.
const SEED: u64 = 0x7261_6d70_6172_7473;

impl StickyRt {
    /// The cookie of a pool whose endpoints have these identities (`ids`, stable
    /// across reloads).
    #[must_use]
    pub fn new(config: &Sticky, ids: &[String]) -> Self {
        Self {
            cookie: config.cookie.clone(),
            attributes: crate::headers::cookie_attributes(
                config.ttl.map(|t| t.0),
                config.secure,
                config.http_only,
                config.same_site,
            ),
            values: ids.iter().map(|id| value_of(id)).collect(),
        }
    }

    /// The endpoint value the request's cookie names, if it sent one that parses.
    #[must_use]
    pub fn requested(&self, headers: &HeaderMap) -> Option<u64> {
        let v = crate::headers::cookie(headers, &self.cookie)?.trim_matches('"');
        if v.len() != 16 {
            return None;
        }
        u64::from_str_radix(v, 16).ok()
    }

    /// The index of the endpoint whose value is `value`.
    #[must_use]
    pub fn endpoint(&self, value: u64) -> Option<usize> {
        self.values.iter().position(|&v| v == value)
    }

    /// The `Set-Cookie` that sends a client to endpoint `idx`, unless the request
    /// already named it (`requested`).
    #[must_use]
    pub fn set_cookie(
        &self,
        idx: usize,
        requested: Option<u64>,
        https: bool,
    ) -> Option<HeaderValue> {
        let value = *self.values.get(idx)?;
        if requested == Some(value) {
            return None;
        }
        let attributes = &self.attributes[usize::from(https)];
        HeaderValue::try_from(format!("{}={value:016x}{attributes}", self.cookie)).ok()
    }
}

/// An endpoint identity's cookie value.
fn value_of(id: &str) -> u64 {
    xxhash_rust::xxh3::xxh3_64_with_seed(id.as_bytes(), SEED)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("10.0.0.{i}:80")).collect()
    }

    #[test]
    fn adding_an_endpoint_changes_no_other_endpoints_value() {
        let before = StickyRt::new(&Sticky::default(), &ids(3));
        let after = StickyRt::new(&Sticky::default(), &ids(4));
        assert_eq!(before.values[..], after.values[..3]);
        // Distinct, and not the address.
        let mut v = after.values.clone();
        v.dedup();
        assert_eq!(v.len(), 4);
        let c = after.set_cookie(0, None, false).unwrap();
        assert!(!c.to_str().unwrap().contains("10.0.0"), "{c:?}");
    }

    #[test]
    fn the_cookie_round_trips_and_is_set_only_when_it_changes() {
        let s = StickyRt::new(
            &Sticky {
                ttl: Some(rampart_config::Dur(std::time::Duration::from_secs(3600))),
                ..Sticky::default()
            },
            &ids(2),
        );
        let set = s.set_cookie(1, None, true).unwrap();
        let set = set.to_str().unwrap();
        assert!(
            set.ends_with("; Path=/; Max-Age=3600; Secure; HttpOnly; SameSite=Lax"),
            "{set}"
        );
        let pair = set.split(';').next().unwrap();
        let mut h = HeaderMap::new();
        h.insert(
            http::header::COOKIE,
            HeaderValue::try_from(format!("a=1; {pair}; b=2")).unwrap(),
        );
        let requested = s.requested(&h);
        assert_eq!(requested.and_then(|v| s.endpoint(v)), Some(1));
        assert_eq!(s.set_cookie(1, requested, true), None);
        assert!(s.set_cookie(0, requested, true).is_some());
        // Over HTTP: no Secure unless asked for.
        let plain = s.set_cookie(0, None, false).unwrap();
        assert!(!plain.to_str().unwrap().contains("Secure"), "{plain:?}");
        // Garbage names nothing.
        h.insert(http::header::COOKIE, HeaderValue::from_static("rp_s=zz"));
        assert_eq!(s.requested(&h), None);
    }
}
