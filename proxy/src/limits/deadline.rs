//! A connection wrapper that enforces the header read deadline (slowloris defence).
//!
//! Pingora's own read timeout restarts on every byte, so a client that trickles one
//! byte every few seconds could hold a connection forever. [`GuardedStream`] watches the
//! plaintext HTTP/1 byte stream: from the first byte of a request (or from the accept,
//! for the first request) the whole header, up to the blank line, must arrive within the
//! deadline, or reads fail with `TimedOut` and Pingora closes the connection. Once the
//! header is complete nothing is enforced until the response starts; the next request
//! on the connection starts a new deadline at its first byte (idle keep-alive time is
//! bounded separately by the keep-alive timeout).

use std::fmt;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use async_trait::async_trait;
use pingora::protocols::raw_connect::ProxyDigest;
use pingora::protocols::tls::{SslDigest, TlsRef};
use pingora::protocols::{
    GetProxyDigest, GetSocketDigest, GetTimingDigest, Peek, Shutdown, SocketDigest, Ssl, Stream,
    TimingDigest, UniqueID, UniqueIDType, ALPN,
};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

/// Where the connection is in the request/response cycle.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// Reading a request header; `line_start` when the last line feed began a line
    /// that so far holds nothing but carriage returns.
    Header { line_start: bool },
    /// Header complete; body and response in progress.
    Message,
    /// Response started; the next byte read starts a new request header.
    Idle,
}

/// A stream with an optional header read deadline.
pub struct GuardedStream {
    inner: Stream,
    guard: Option<Guard>,
}

struct Guard {
    limit: Duration,
    phase: Phase,
    sleep: Pin<Box<Sleep>>,
    on_timeout: Option<Arc<dyn Fn() + Send + Sync>>,
    /// Held until the first request header is complete.
    arrival: Option<ArrivalTicket>,
}

/// Connections accepted whose first request header has not fully arrived yet.
///
/// Why: at shutdown Pingora drops every connection still waiting for a request header,
/// which is right for idle keep-alive connections but also hits a connection accepted
/// a moment before the listener closed whose request is still in flight: its client
/// sees the connection closed without an answer. The listener waits (briefly) for
/// these arrivals before letting Pingora clean up.
#[derive(Debug, Default)]
pub struct Arrivals {
    pending: std::sync::atomic::AtomicUsize,
    settled: tokio::sync::Notify,
}

/// One connection counted in [`Arrivals`] until dropped.
#[derive(Debug)]
pub struct ArrivalTicket(Arc<Arrivals>);

impl Arrivals {
    /// Counts a new connection until the ticket is dropped.
    #[must_use]
    pub fn ticket(self: &Arc<Self>) -> ArrivalTicket {
        self.pending
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        ArrivalTicket(self.clone())
    }

    /// Returns when no connection awaits its first header, or after `max`.
    pub async fn settled(&self, max: Duration) {
        let deadline = Instant::now() + max;
        loop {
            let notified = self.settled.notified();
            if self.pending.load(std::sync::atomic::Ordering::Acquire) == 0 {
                return;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return;
            }
        }
    }
}

impl Drop for ArrivalTicket {
    fn drop(&mut self) {
        if self
            .0
            .pending
            .fetch_sub(1, std::sync::atomic::Ordering::AcqRel)
            == 1
        {
            self.0.settled.notify_waiters();
        }
    }
}

impl GuardedStream {
    /// Wraps `inner`; the first request header must be complete within `limit` from now.
    /// `on_timeout` is called once if the deadline closes the connection.
    #[must_use]
    pub fn with_deadline(
        inner: Stream,
        limit: Duration,
        on_timeout: Arc<dyn Fn() + Send + Sync>,
    ) -> Self {
        let sleep = Box::pin(tokio::time::sleep(limit));
        Self {
            inner,
            guard: Some(Guard {
                limit,
                phase: Phase::Header { line_start: false },
                sleep,
                on_timeout: Some(on_timeout),
                arrival: None,
            }),
        }
    }

    /// Holds `ticket` until the first request header is complete (or the connection ends).
    #[must_use]
    pub fn counting(mut self, ticket: ArrivalTicket) -> Self {
        if let Some(g) = self.guard.as_mut() {
            g.arrival = Some(ticket);
        }
        self
    }
}

impl Guard {
    /// Scans bytes just read for the blank line that ends a header ("\r\n\r\n", or bare
    /// "\n\n", which the parser tolerates): a line feed at the start of a line.
    fn scan(&mut self, bytes: &[u8]) {
        for &b in bytes {
            let Phase::Header { line_start } = self.phase else {
                return;
            };
            self.phase = match b {
                b'\n' if line_start => Phase::Message,
                b'\n' => Phase::Header { line_start: true },
                b'\r' => Phase::Header { line_start },
                _ => Phase::Header { line_start: false },
            };
        }
    }
}

impl AsyncRead for GuardedStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if let Some(g) = this.guard.as_mut() {
            if matches!(g.phase, Phase::Header { .. }) && g.sleep.as_mut().poll(cx).is_ready() {
                if let Some(cb) = g.on_timeout.take() {
                    cb();
                }
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "request header not received within limits.header_read_timeout",
                )));
            }
        }
        let before = buf.filled().len();
        let res = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let (Poll::Ready(Ok(())), Some(g)) = (&res, this.guard.as_mut()) {
            let new = &buf.filled()[before..];
            if !new.is_empty() {
                if g.phase == Phase::Idle {
                    g.phase = Phase::Header { line_start: false };
                    let deadline = Instant::now() + g.limit;
                    g.sleep.as_mut().reset(deadline);
                }
                g.scan(new);
                if g.phase == Phase::Message {
                    g.arrival = None;
                }
            }
        }
        res
    }
}

impl GuardedStream {
    /// A final response (not "100 Continue" or "101 Switching Protocols") ends the
    /// message: the next bytes read belong to a new request.
    fn on_write(&mut self, first_bytes: &[u8]) {
        let Some(g) = self.guard.as_mut() else { return };
        let response = first_bytes.starts_with(b"HTTP/1.");
        let interim = first_bytes.get(9) == Some(&b'1');
        if g.phase == Phase::Message && response && !interim {
            g.phase = Phase::Idle;
        }
    }
}

impl AsyncWrite for GuardedStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.on_write(buf);
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        if let Some(first) = bufs.iter().find(|b| !b.is_empty()) {
            self.on_write(first);
        }
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[async_trait]
impl Shutdown for GuardedStream {
    async fn shutdown(&mut self) {
        self.inner.shutdown().await;
    }
}

impl UniqueID for GuardedStream {
    fn id(&self) -> UniqueIDType {
        self.inner.id()
    }
}

impl Ssl for GuardedStream {
    fn get_ssl(&self) -> Option<&TlsRef> {
        self.inner.get_ssl()
    }
    fn get_ssl_digest(&self) -> Option<Arc<SslDigest>> {
        self.inner.get_ssl_digest()
    }
    fn selected_alpn_proto(&self) -> Option<ALPN> {
        self.inner.selected_alpn_proto()
    }
}

impl GetTimingDigest for GuardedStream {
    fn get_timing_digest(&self) -> Vec<Option<TimingDigest>> {
        self.inner.get_timing_digest()
    }
    fn get_read_pending_time(&self) -> Duration {
        self.inner.get_read_pending_time()
    }
    fn get_write_pending_time(&self) -> Duration {
        self.inner.get_write_pending_time()
    }
}

impl GetProxyDigest for GuardedStream {
    fn get_proxy_digest(&self) -> Option<Arc<ProxyDigest>> {
        self.inner.get_proxy_digest()
    }
    fn set_proxy_digest(&mut self, digest: ProxyDigest) {
        self.inner.set_proxy_digest(digest);
    }
}

impl GetSocketDigest for GuardedStream {
    fn get_socket_digest(&self) -> Option<Arc<SocketDigest>> {
        self.inner.get_socket_digest()
    }
    fn set_socket_digest(&mut self, digest: SocketDigest) {
        self.inner.set_socket_digest(digest);
    }
}

#[async_trait]
impl Peek for GuardedStream {
    async fn try_peek(&mut self, buf: &mut [u8]) -> io::Result<bool> {
        self.inner.try_peek(buf).await
    }
}

impl fmt::Debug for GuardedStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GuardedStream")
            .field("inner", &self.inner)
            .field("guarded", &self.guard.is_some())
            .finish()
    }
}
