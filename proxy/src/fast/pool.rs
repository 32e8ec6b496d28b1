//! Idle upstream connections of the fast paths, per worker thread.

use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use super::conn::Upstream;

use crate::clock::{self};

/// Idle upstream connections kept per endpoint and worker thread. As many as a busy
/// worker has requests in flight to one endpoint: HTTP/2 clients keep ten to a hundred
/// streams open per connection, and a pool smaller than the streams in flight closes
/// a connection after most responses and opens a new one for the next request (with
/// 32 connections × 10 streams and a cap of 64, 55,000 new upstream connections in
/// five seconds, each a handshake and a TIME_WAIT; HAProxy keeps every one by
/// default). Idle ones cost a socket each and go after the pool's `timeouts.idle`.
const IDLE_PER_ENDPOINT: usize = 1024;

/// Idle upstream connections of this worker thread, by endpoint address: taken
/// last-in first-out (the warmest), dropped after the pool's idle timeout or when the
/// upstream closed them.
#[derive(Default)]
pub struct IdlePool {
    /// By endpoint address and the pool's TLS settings (`PeerSettings::reuse_key`).
    by_addr: HashMap<(SocketAddr, u64), VecDeque<Idle>>,
    last_sweep: Option<Instant>,
}

struct Idle {
    stream: Upstream,
    expires: Instant,
}

thread_local! {
    static IDLE: RefCell<IdlePool> = RefCell::new(IdlePool::default());
}

impl IdlePool {
    /// A live idle connection to `addr`, if this thread has one that has not expired
    /// by `now`.
    pub(crate) fn take(addr: SocketAddr, key: u64, now: Instant) -> Option<Upstream> {
        IDLE.with(|pool| {
            let mut pool = pool.borrow_mut();
            let list = pool.by_addr.get_mut(&(addr, key))?;
            while let Some(idle) = list.pop_back() {
                if idle.expires > now && idle.stream.is_open() {
                    return Some(idle.stream);
                }
            }
            None
        })
    }

    /// Keeps `stream`, idle since `now`, for reuse for up to `idle`.
    pub(crate) fn put(addr: SocketAddr, key: u64, stream: Upstream, idle: Duration, now: Instant) {
        IDLE.with(|pool| {
            let mut pool = pool.borrow_mut();
            // Now and then, drop what expired everywhere (endpoints that left the
            // configuration are never taken from again).
            if pool
                .last_sweep
                .is_none_or(|t| now.duration_since(t) > Duration::from_secs(5))
            {
                pool.last_sweep = Some(now);
                pool.by_addr.retain(|_, list| {
                    list.retain(|i| i.expires > now);
                    !list.is_empty()
                });
            }
            let list = pool.by_addr.entry((addr, key)).or_default();
            if list.len() >= IDLE_PER_ENDPOINT {
                list.pop_front();
            }
            list.push_back(Idle {
                stream,
                expires: clock::after(now, idle),
            });
        });
    }
}
