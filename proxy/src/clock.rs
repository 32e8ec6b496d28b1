//! Clock reads kept off the request path: time limits armed only when an operation
//! has to wait, and wall-clock seconds derived from a monotonic instant already read.
//!
//! On the machines this runs on (virtual, `kvm-clock`), a `clock_gettime` costs about as
//! much as parsing a request head; a proxied request used to read the clock fifteen
//! times. It now reads it four times: when the request starts, when the upstream
//! request is sent, when the response head arrives, and when the request ends.

use std::future::Future;
use std::sync::OnceLock;
use std::task::Poll;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::time::error::Elapsed;

/// Runs `fut` within `limit`, starting the limit only if the first poll does not
/// finish it: a write the socket takes at once costs no clock read and no timer.
///
/// # Errors
/// [`Elapsed`] when the limit passes first.
pub(crate) async fn within<F: Future>(limit: Duration, fut: F) -> Result<F::Output, Elapsed> {
    let mut fut = std::pin::pin!(fut);
    let first = std::future::poll_fn(|cx| Poll::Ready(fut.as_mut().poll(cx))).await;
    match first {
        Poll::Ready(output) => Ok(output),
        Poll::Pending => tokio::time::timeout(limit, fut).await,
    }
}

/// `at + d`, or a time decades away when that does not fit (a configured "1000000y").
#[must_use]
pub fn after(at: Instant, d: Duration) -> Instant {
    at.checked_add(d)
        .or_else(|| at.checked_add(Duration::from_secs(30 * 365 * 86_400)))
        .unwrap_or(at)
}

/// Unix time in seconds at `at`, from the wall clock read once per process and the
/// monotonic clock since (it ignores later steps of the wall clock; it is for
/// per-second traffic windows, not for timestamps that must match other hosts).
#[must_use]
pub fn unix_secs_at(at: Instant) -> u64 {
    static BASE: OnceLock<(Instant, Duration)> = OnceLock::new();
    let (instant, unix) = *BASE.get_or_init(|| {
        let unix = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        (Instant::now(), unix)
    });
    let since = at.saturating_duration_since(instant);
    (unix + since).as_secs()
}

/// The wall-clock time of `at`, an instant before `now` (both already read): from a
/// wall-clock reading this thread takes at most once a second, so a request's log
/// time costs no clock read of its own yet follows steps of the wall clock (NTP)
/// within a second.
#[must_use]
pub fn wall_at(at: Instant, now: Instant) -> SystemTime {
    thread_local! {
        static ANCHOR: std::cell::Cell<Option<(Instant, SystemTime)>> = const { std::cell::Cell::new(None) };
    }
    let (instant, wall) = match ANCHOR.get() {
        Some((i, w)) if now.saturating_duration_since(i) < Duration::from_secs(1) => (i, w),
        _ => {
            let anchor = (now, SystemTime::now());
            ANCHOR.set(Some(anchor));
            anchor
        }
    };
    if at >= instant {
        wall + at.duration_since(instant)
    } else {
        wall.checked_sub(instant.duration_since(at)).unwrap_or(wall)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_ready_future_finishes_without_a_timer_and_a_slow_one_is_cut_off() {
        assert_eq!(within(Duration::ZERO, async { 7 }).await.ok(), Some(7));
        let slow = within(Duration::from_millis(20), std::future::pending::<()>()).await;
        assert!(slow.is_err(), "a pending future must hit the limit");
        // A future that waits once and then finishes, well within its limit.
        let mut polled = false;
        let once = std::future::poll_fn(|cx| {
            if polled {
                Poll::Ready(3)
            } else {
                polled = true;
                cx.waker().wake_by_ref();
                Poll::Pending
            }
        });
        assert_eq!(within(Duration::from_secs(5), once).await.ok(), Some(3));
    }

    #[test]
    fn wall_times_of_instants_are_the_wall_clock_within_a_millisecond() {
        let before = SystemTime::now();
        let start = Instant::now();
        let end = start + Duration::from_millis(250);
        let (at_start, at_end) = (wall_at(start, start), wall_at(start, end));
        let after = SystemTime::now();
        let slack = Duration::from_millis(1);
        assert!(at_start + slack >= before && at_start <= after + slack);
        assert_eq!(at_start, at_end, "one anchor, read once");
        assert_eq!(
            wall_at(end, end).duration_since(at_start).unwrap(),
            Duration::from_millis(250)
        );
        // An instant before the anchor.
        let earlier = wall_at(start, start + Duration::from_millis(100));
        assert!(earlier <= at_start + slack);
    }

    #[test]
    fn unix_seconds_follow_the_wall_clock_and_advance_with_the_monotonic_one() {
        let now = Instant::now();
        let wall = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("the clock is after 1970")
            .as_secs();
        let derived = unix_secs_at(now);
        assert!(derived.abs_diff(wall) <= 1, "{derived} vs {wall}");
        let later = unix_secs_at(now + Duration::from_secs(90));
        assert_eq!(later - derived, 90);
    }
}
