//! The ACME planner: for each certificate Rampart should hold, decide *now* whether to
//! leave it, order it, or wait — and until when. Pure: times are Unix seconds passed in,
//! jitter is a number passed in, nothing is read or written.
//!
//! - Renewal is due at 1/3 of the lifetime remaining, or earlier inside the CA's ARI
//!   window (RFC 9773; at a point of the window picked per certificate so that a fleet
//!   of names does not renew at once), or at once when the certificate was revoked.
//! - After a failure, a certificate waits 1 min, doubling up to 24 h, jittered; a CA's
//!   `Retry-After` is honoured when it is later.
//! - A model of the CA's rate limits (Let's Encrypt's by default) refuses an order that
//!   would be rate limited and says when it could next be sent.

use std::collections::BTreeSet;

/// Seconds in an hour, a day, a week.
const HOUR: u64 = 3600;
const DAY: u64 = 24 * HOUR;
const WEEK: u64 = 7 * DAY;

/// A certificate as held (in the store).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Held {
    /// Names it covers.
    pub names: BTreeSet<String>,
    /// Validity start and end (Unix seconds).
    pub not_before: u64,
    /// Validity end (Unix seconds).
    pub not_after: u64,
    /// The CA said it was revoked.
    pub revoked: bool,
    /// The CA's suggested renewal window (ARI), if it offers one.
    pub ari: Option<(u64, u64)>,
}

/// Failures so far for a certificate, and the CA's own retry hint.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Failures {
    /// Consecutive failed orders.
    pub count: u32,
    /// When the last one failed.
    pub last_at: u64,
    /// The CA's `Retry-After`, as a Unix time.
    pub retry_after: Option<u64>,
}

/// Why an order is (or would be) sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    /// No certificate yet, or it does not cover the names.
    Missing,
    /// Expired.
    Expired,
    /// Less than a third of its lifetime left.
    Lifetime,
    /// Inside the CA's ARI window.
    Ari,
    /// Revoked.
    Revoked,
}

/// Why nothing is sent yet although an order is wanted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Blocked {
    /// Backing off after failures.
    Backoff {
        /// Consecutive failures.
        failures: u32,
    },
    /// The CA asked to wait (Retry-After).
    RetryAfter,
    /// The order would exceed a rate limit; which one.
    RateLimit(&'static str),
}

/// The decision for one certificate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Valid; look again at `renew_at`.
    Keep {
        /// When renewal becomes due.
        renew_at: u64,
    },
    /// Send an order now.
    Order(Reason),
    /// An order is wanted but must wait until `until`.
    Wait {
        /// Why it is wanted.
        reason: Reason,
        /// Why it waits.
        blocked: Blocked,
        /// Earliest time to send it.
        until: u64,
    },
}

/// When a held certificate is due for renewal: 1/3 of its lifetime before the end, or
/// inside the ARI window (at `spread` ∈ [0, 1) of the way through it), whichever is
/// earlier.
#[must_use]
pub fn renew_at(held: &Held, spread: f64) -> u64 {
    let lifetime = held.not_after.saturating_sub(held.not_before);
    let by_lifetime = held.not_after.saturating_sub(lifetime / 3);
    match held.ari {
        Some((start, end)) if end >= start => {
            let offset = ((end - start) as f64 * spread.clamp(0.0, 0.999)) as u64;
            by_lifetime.min(start + offset)
        }
        _ => by_lifetime,
    }
}

/// The back-off after `count` consecutive failures: 1 min doubling to 24 h, times
/// `jitter` ∈ [0.5, 1.0] (so that retries of many names spread out).
#[must_use]
pub fn backoff(count: u32, jitter: f64) -> u64 {
    if count == 0 {
        return 0;
    }
    let base = 60u64
        .saturating_mul(1 << count.saturating_sub(1).min(20))
        .min(DAY);
    ((base as f64) * jitter.clamp(0.5, 1.0)) as u64
}

/// Decides what to do now for a certificate that should cover `names`.
///
/// `spread` places the renewal inside an ARI window, `jitter` scales the back-off;
/// callers derive both from the names so that decisions are stable between passes.
#[must_use]
pub fn decide(
    now: u64,
    names: &BTreeSet<String>,
    held: Option<&Held>,
    failures: &Failures,
    limits: &RateModel,
    spread: f64,
    jitter: f64,
) -> Decision {
    let reason = match held {
        None => Reason::Missing,
        Some(h) if !names.is_subset(&h.names) => Reason::Missing,
        Some(h) if h.revoked => Reason::Revoked,
        Some(h) if now >= h.not_after => Reason::Expired,
        Some(h) => {
            let at = renew_at(h, spread);
            if now < at {
                return Decision::Keep { renew_at: at };
            }
            let lifetime = h.not_after.saturating_sub(h.not_before);
            if now >= h.not_after.saturating_sub(lifetime / 3) {
                Reason::Lifetime
            } else {
                Reason::Ari
            }
        }
    };
    let mut wait: Option<(Blocked, u64)> = None;
    let mut later = |blocked: Blocked, until: u64| {
        if until > now && wait.as_ref().is_none_or(|(_, u)| until > *u) {
            wait = Some((blocked, until));
        }
    };
    if failures.count > 0 {
        later(
            Blocked::Backoff {
                failures: failures.count,
            },
            failures.last_at + backoff(failures.count, jitter),
        );
    }
    if let Some(t) = failures.retry_after {
        later(Blocked::RetryAfter, t);
    }
    if let Err((limit, until)) = limits.admits(now, names) {
        later(Blocked::RateLimit(limit), until);
    }
    match wait {
        Some((blocked, until)) => Decision::Wait {
            reason,
            blocked,
            until,
        },
        None => Decision::Order(reason),
    }
}

/// What the CA allows (Let's Encrypt's published limits by default).
#[derive(Clone, Debug)]
pub struct Limits {
    /// New certificates per registered domain per week.
    pub certs_per_domain_per_week: usize,
    /// Certificates for exactly the same names per week.
    pub duplicates_per_week: usize,
    /// Failed validations per name per hour.
    pub failed_validations_per_hour: usize,
    /// New orders per account per 3 hours.
    pub orders_per_3h: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            certs_per_domain_per_week: 50,
            duplicates_per_week: 5,
            failed_validations_per_hour: 5,
            orders_per_3h: 300,
        }
    }
}

/// What happened at the CA, as far as its limits count it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Event {
    /// An order was created.
    Order {
        /// When.
        at: u64,
    },
    /// A certificate was issued for these names.
    Issued {
        /// When.
        at: u64,
        /// Its names.
        names: BTreeSet<String>,
    },
    /// A validation of this name failed.
    FailedValidation {
        /// When.
        at: u64,
        /// The name.
        name: String,
    },
}

/// The rate-limit model: the CA's limits and what this account did recently.
#[derive(Clone, Debug, Default)]
pub struct RateModel {
    /// The limits.
    pub limits: Limits,
    /// Recent events (older than a week can be dropped with [`RateModel::prune`]).
    pub events: Vec<Event>,
}

/// The registered domain of a name, approximated by its last two labels. For names
/// under multi-label public suffixes (`example.co.uk`) this groups more names together
/// than the CA does, so the model errs on the side of sending fewer orders.
#[must_use]
pub fn registered_domain(name: &str) -> String {
    let name = name.trim_start_matches("*.");
    let labels: Vec<&str> = name.rsplitn(3, '.').collect();
    match labels.as_slice() {
        [tld, sld, ..] => format!("{sld}.{tld}"),
        _ => name.to_string(),
    }
}

impl RateModel {
    /// Forgets events older than any limit's window.
    pub fn prune(&mut self, now: u64) {
        self.events.retain(|e| {
            let at = match e {
                Event::Order { at }
                | Event::Issued { at, .. }
                | Event::FailedValidation { at, .. } => *at,
            };
            at + WEEK > now
        });
    }

    /// Every limit an order for `names` counts against, with the times of the events
    /// inside its window.
    fn usage(&self, now: u64, names: &BTreeSet<String>) -> Vec<Usage> {
        let mut out = Vec::new();
        let mut add = |limit: &'static str, window: u64, max: usize, mut times: Vec<u64>| {
            times.retain(|t| t + window > now);
            times.sort_unstable();
            out.push(Usage {
                limit,
                window,
                max,
                times,
            });
        };
        let times = |f: &dyn Fn(&Event) -> Option<u64>| -> Vec<u64> {
            self.events.iter().filter_map(f).collect()
        };
        add(
            "orders per account per 3 hours",
            3 * HOUR,
            self.limits.orders_per_3h,
            times(&|e| match e {
                Event::Order { at } => Some(*at),
                _ => None,
            }),
        );
        let domains: BTreeSet<String> = names.iter().map(|n| registered_domain(n)).collect();
        for domain in &domains {
            add(
                "certificates per registered domain per week",
                WEEK,
                self.limits.certs_per_domain_per_week,
                times(&|e| match e {
                    Event::Issued { at, names }
                        if names.iter().any(|n| &registered_domain(n) == domain) =>
                    {
                        Some(*at)
                    }
                    _ => None,
                }),
            );
        }
        add(
            "duplicate certificates per week",
            WEEK,
            self.limits.duplicates_per_week,
            times(&|e| match e {
                Event::Issued { at, names: n } if n == names => Some(*at),
                _ => None,
            }),
        );
        for name in names {
            add(
                "failed validations per name per hour",
                HOUR,
                self.limits.failed_validations_per_hour,
                times(&|e| match e {
                    Event::FailedValidation { at, name: n } if n == name => Some(*at),
                    _ => None,
                }),
            );
        }
        out
    }

    /// Whether an order for `names` may be sent at `now`; if not, the limit it would
    /// hit and when it could be sent.
    ///
    /// # Errors
    /// The limit's name and the Unix time at which the order would fit again.
    pub fn admits(&self, now: u64, names: &BTreeSet<String>) -> Result<(), (&'static str, u64)> {
        let mut worst: Option<(&'static str, u64)> = None;
        for u in self.usage(now, names) {
            if u.times.len() >= u.max {
                // The order fits once the oldest counted event leaves the window.
                let until = u.times[u.times.len() - u.max] + u.window;
                if worst.is_none_or(|(_, w)| until > w) {
                    worst = Some((u.limit, until));
                }
            }
        }
        match worst {
            Some(w) => Err(w),
            None => Ok(()),
        }
    }

    /// How many more orders for `names` the tightest limit allows now.
    #[must_use]
    pub fn headroom(&self, now: u64, names: &BTreeSet<String>) -> usize {
        self.usage(now, names)
            .iter()
            .map(|u| u.max.saturating_sub(u.times.len()))
            .min()
            .unwrap_or(usize::MAX)
    }
}

/// One limit's use.
struct Usage {
    limit: &'static str,
    window: u64,
    max: usize,
    times: Vec<u64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(n: &[&str]) -> BTreeSet<String> {
        n.iter().map(ToString::to_string).collect()
    }

    fn held(not_before: u64, days: u64) -> Held {
        Held {
            names: names(&["www.example.com"]),
            not_before,
            not_after: not_before + days * DAY,
            revoked: false,
            ari: None,
        }
    }

    fn decide_now(now: u64, h: Option<&Held>, f: &Failures, m: &RateModel) -> Decision {
        decide(now, &names(&["www.example.com"]), h, f, m, 0.5, 1.0)
    }

    #[test]
    fn missing_orders_valid_keeps_until_a_third_is_left() {
        let m = RateModel::default();
        let f = Failures::default();
        assert_eq!(
            decide_now(0, None, &f, &m),
            Decision::Order(Reason::Missing)
        );
        let h = held(0, 90);
        assert_eq!(
            decide_now(DAY, Some(&h), &f, &m),
            Decision::Keep { renew_at: 60 * DAY }
        );
        assert_eq!(
            decide_now(60 * DAY, Some(&h), &f, &m),
            Decision::Order(Reason::Lifetime)
        );
        assert_eq!(
            decide_now(91 * DAY, Some(&h), &f, &m),
            Decision::Order(Reason::Expired)
        );
        // 45-day certificates renew at day 30.
        assert_eq!(
            decide_now(0, Some(&held(0, 45)), &f, &m),
            Decision::Keep { renew_at: 30 * DAY }
        );
        // A certificate that lacks a wanted name is as good as missing.
        let other = Held {
            names: names(&["api.example.com"]),
            ..held(0, 90)
        };
        assert_eq!(
            decide_now(DAY, Some(&other), &f, &m),
            Decision::Order(Reason::Missing)
        );
    }

    #[test]
    fn ari_and_revocation_come_first() {
        let m = RateModel::default();
        let f = Failures::default();
        let h = Held {
            ari: Some((10 * DAY, 12 * DAY)),
            ..held(0, 90)
        };
        assert_eq!(renew_at(&h, 0.5), 11 * DAY);
        assert_eq!(
            decide_now(11 * DAY, Some(&h), &f, &m),
            Decision::Order(Reason::Ari)
        );
        // A window after the lifetime rule does not delay renewal.
        let late = Held {
            ari: Some((80 * DAY, 85 * DAY)),
            ..held(0, 90)
        };
        assert_eq!(renew_at(&late, 0.5), 60 * DAY);
        let revoked = Held {
            revoked: true,
            ..held(0, 90)
        };
        assert_eq!(
            decide_now(DAY, Some(&revoked), &f, &m),
            Decision::Order(Reason::Revoked)
        );
    }

    #[test]
    fn failures_back_off_doubling_to_a_day_and_retry_after_is_honoured() {
        assert_eq!(backoff(1, 1.0), 60);
        assert_eq!(backoff(2, 1.0), 120);
        assert_eq!(backoff(12, 1.0), DAY);
        assert_eq!(backoff(40, 1.0), DAY);
        assert_eq!(backoff(3, 0.5), 120);
        let m = RateModel::default();
        let f = Failures {
            count: 3,
            last_at: 1000,
            retry_after: None,
        };
        assert_eq!(
            decide_now(1100, None, &f, &m),
            Decision::Wait {
                reason: Reason::Missing,
                blocked: Blocked::Backoff { failures: 3 },
                until: 1240
            }
        );
        assert_eq!(
            decide_now(1240, None, &f, &m),
            Decision::Order(Reason::Missing)
        );
        let f = Failures {
            count: 1,
            last_at: 1000,
            retry_after: Some(5000),
        };
        assert_eq!(
            decide_now(1100, None, &f, &m),
            Decision::Wait {
                reason: Reason::Missing,
                blocked: Blocked::RetryAfter,
                until: 5000
            }
        );
    }

    #[test]
    fn rate_limits_refuse_an_order_and_say_when() {
        let mut m = RateModel::default();
        let n = names(&["www.example.com"]);
        for i in 0..5 {
            m.events.push(Event::Issued {
                at: i * HOUR,
                names: n.clone(),
            });
        }
        assert_eq!(
            m.admits(10 * HOUR, &n),
            Err(("duplicate certificates per week", WEEK))
        );
        // Another name set of the same domain is not a duplicate.
        assert!(m.admits(10 * HOUR, &names(&["api.example.com"])).is_ok());
        for i in 0..5 {
            m.events.push(Event::FailedValidation {
                at: 20 * HOUR + i,
                name: "api.example.com".into(),
            });
        }
        assert_eq!(
            m.admits(20 * HOUR + 10, &names(&["api.example.com"])),
            Err(("failed validations per name per hour", 21 * HOUR))
        );
        assert_eq!(m.headroom(10 * HOUR, &n), 0);
        assert_eq!(m.headroom(10 * HOUR, &names(&["api.example.com"])), 5 - 5);
        assert_eq!(m.headroom(22 * HOUR, &names(&["other.example.org"])), 5);
        assert_eq!(registered_domain("a.b.example.com"), "example.com");
        assert_eq!(registered_domain("*.example.com"), "example.com");
        m.prune(WEEK + 30 * HOUR);
        assert!(m.events.is_empty());
    }

    /// 90 days, one certificate, the CA failing a share of the orders: the planner
    /// orders once per renewal plus once per failure, never while a valid
    /// certificate is far from its end, and never lets it lapse while the CA works.
    #[test]
    fn ninety_days_with_failures_orders_the_minimum() {
        for fail_every in [0u64, 2, 3] {
            let mut now = 0;
            let mut held: Option<Held> = None;
            let mut failures = Failures::default();
            let mut model = RateModel::default();
            let (mut orders, mut failed, mut issued) = (0u64, 0u64, 0u64);
            let mut lapsed = 0;
            while now < 90 * DAY {
                let n = names(&["www.example.com"]);
                match decide(now, &n, held.as_ref(), &failures, &model, 0.5, 1.0) {
                    Decision::Order(_) => {
                        orders += 1;
                        model.events.push(Event::Order { at: now });
                        if fail_every > 0 && orders % fail_every == 0 {
                            failed += 1;
                            failures.count += 1;
                            failures.last_at = now;
                            model.events.push(Event::FailedValidation {
                                at: now,
                                name: "www.example.com".into(),
                            });
                        } else {
                            issued += 1;
                            failures = Failures::default();
                            held = Some(Held {
                                names: n.clone(),
                                not_before: now,
                                not_after: now + 45 * DAY,
                                revoked: false,
                                ari: None,
                            });
                            model.events.push(Event::Issued { at: now, names: n });
                        }
                    }
                    Decision::Keep { .. } | Decision::Wait { .. } => {}
                }
                if held.as_ref().is_some_and(|h| now >= h.not_after) {
                    lapsed += 1;
                }
                model.prune(now);
                now += 60;
            }
            // 45-day certificates renewed at 2/3: issued at day 0, 30, 60.
            assert_eq!(issued, 3, "fail_every {fail_every}");
            assert_eq!(orders, issued + failed, "one order per issue or failure");
            assert_eq!(lapsed, 0);
        }
    }
}
