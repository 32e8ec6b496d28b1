//! The client side of a listener, before HTTP: the connection limit, the TLS handshake
//! (with its own deadline and failure metrics), and the header read deadline. Then the
//! connection's HTTP/1 requests are served one at a time by the fast path ([`h1`]) or,
//! when it declines one, by Pingora's HTTP proxy: between requests a kept-alive
//! connection waits here, holding no per-request state (see [`EdgeApp::next_request`]).
//! An HTTP/2 connection's streams are offered to [`h2`] the same way, each in a task of
//! its own (see [`EdgeApp::serve_http2`]).

use std::future::poll_fn;
use std::mem::MaybeUninit;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use arc_swap::ArcSwap;
use async_trait::async_trait;
use bytes::BytesMut;
use pingora::apps::{HttpPersistentSettings, HttpServerApp, ServerApp};
use pingora::protocols::http::v2::{
    self,
    server::{H2Accept, HttpSession},
};
use pingora::protocols::http::ServerSession;
use pingora::protocols::{Digest, SocketDigest, Stream};
use pingora::proxy::HttpProxy;
use pingora::server::ShutdownWatch;
use tokio::io::{AsyncWriteExt, ReadBuf};

use crate::edge::{Edge, Scheme};
use crate::fast::{h1, h2, ConnInfo, Served};
use crate::generation::Generation;
use crate::limits::deadline::{ArrivalTicket, Arrivals, GuardedStream};
use crate::limits::rate::PerClient;
use crate::metrics::Metrics;
use crate::policy::{self, Decision};
use crate::proxy_protocol;
use crate::tls::conn::{TlsConn, TlsInfo, CONNECTION};

/// Longest wait at shutdown for requests of just-accepted connections to arrive.
const ARRIVAL_WAIT: Duration = Duration::from_secs(1);
/// The most read at once when a kept-alive connection wakes up; the rest of a larger
/// request header is read by Pingora's parser.
const WAKE_READ: usize = 4096;
/// Streams of one HTTP/2 connection that Pingora's acceptance checks may reject
/// (reset or answered) before the connection is closed: Pingora's own bound.
const MAX_MALFORMED_STREAMS: usize = 32;
/// Capacity of the header buffer handed to Pingora (its own initial size, so that the
/// parser reads the rest of a larger header without reallocating at once).
const HEADER_BUFFER: usize = 4096;

/// A listener's connection handler wrapping the HTTP proxy.
pub struct EdgeApp {
    name: &'static str,
    scheme: Scheme,
    proxy: Arc<HttpProxy<Edge>>,
    tls: Option<crate::tls::Acceptor>,
    current: Arc<ArcSwap<Generation>>,
    metrics: Arc<Metrics>,
    open: AtomicUsize,
    per_client: PerClient,
    arrivals: Arc<Arrivals>,
    /// Set at shutdown, when kept-alive connections waiting for a request are closed.
    closing: AtomicBool,
    /// Wakes the connections waiting in [`EdgeApp::next_request`] at shutdown.
    closed: tokio::sync::Notify,
}

impl EdgeApp {
    /// A handler for the listener `name`; with `tls`, connections are TLS first.
    #[must_use]
    pub fn new(
        name: &'static str,
        proxy: HttpProxy<Edge>,
        tls: Option<crate::tls::Acceptor>,
        current: Arc<ArcSwap<Generation>>,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            name,
            scheme: if tls.is_some() {
                Scheme::Https
            } else {
                Scheme::Http
            },
            proxy: Arc::new(proxy),
            tls,
            current,
            metrics,
            open: AtomicUsize::new(0),
            per_client: PerClient::default(),
            arrivals: Arc::new(Arrivals::default()),
            closing: AtomicBool::new(false),
            closed: tokio::sync::Notify::new(),
        }
    }
}

/// The streams of one HTTP/2 connection being served, so that the connection can tell
/// when it has been idle.
#[derive(Default)]
struct ActiveStreams {
    count: AtomicUsize,
    idle: tokio::sync::Notify,
}

/// One stream being served; ends it when dropped.
struct StreamGuard(Arc<ActiveStreams>);

impl ActiveStreams {
    fn start(self: &Arc<Self>) -> StreamGuard {
        self.count.fetch_add(1, Ordering::Relaxed);
        StreamGuard(self.clone())
    }

    /// Completes once no stream has been served for `limit`; a stream that starts is
    /// seen by the caller, which calls again.
    async fn idle_for(&self, limit: Duration) {
        while self.count.load(Ordering::Relaxed) != 0 {
            self.idle.notified().await;
        }
        tokio::time::sleep(limit).await;
    }
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        if self.0.count.fetch_sub(1, Ordering::Relaxed) == 1 {
            // A stored permit if nobody waits yet: the next wait sees it.
            self.0.idle.notify_one();
        }
    }
}

/// Decrements the open-connection counts and gauge when a connection ends.
struct OpenGuard<'a>(&'a EdgeApp, Option<std::net::IpAddr>);

impl Drop for OpenGuard<'_> {
    fn drop(&mut self) {
        if let Some(ip) = self.1 {
            self.0.per_client.release(ip);
        }
        self.0.open.fetch_sub(1, Ordering::Relaxed);
        self.0
            .metrics
            .active_connections
            .with_label_values(&[self.0.name])
            .dec();
    }
}

#[async_trait]
impl ServerApp for EdgeApp {
    async fn process_new(
        self: &Arc<Self>,
        stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        // Pingora calls this from a task whose future also holds the state of Pingora's
        // own TLS handshake (unused: Rampart does TLS here), ~9 KB that would live as
        // long as the connection. The connection gets a task of its own instead, sized
        // for what it needs, and Pingora's task ends now.
        // Counted as awaiting its first request from now, not from when its task runs:
        // the shutdown's wait for arrivals must not miss it.
        let arrival = self.arrivals.ticket();
        let app = self.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move { app.serve_connection(stream, arrival, &shutdown).await });
        None
    }

    async fn cleanup(&self) {
        // The listener is closed by now; let requests of connections accepted just
        // before it closed arrive before Pingora drops connections awaiting a header.
        let limit = self.current.load().config.limits.header_read_timeout.0;
        self.arrivals.settled(limit.min(ARRIVAL_WAIT)).await;
        self.closing.store(true, Ordering::Release);
        self.closed.notify_waiters();
        self.proxy.cleanup().await;
    }
}

impl EdgeApp {
    /// One client connection: the connection limits, TLS, then HTTP/2 through Pingora
    /// or HTTP/1 request by request (see [`EdgeApp::serve_http1`]).
    async fn serve_connection(
        self: &Arc<Self>,
        stream: Stream,
        arrival: ArrivalTicket,
        shutdown: &ShutdownWatch,
    ) {
        let generation = self.current.load_full();
        let limits = &generation.config.limits;
        if self.open.fetch_add(1, Ordering::Relaxed) >= limits.max_connections {
            self.open.fetch_sub(1, Ordering::Relaxed);
            self.metrics
                .rejected_connections
                .with_label_values(&[self.name])
                .inc();
            return;
        }
        let mut stream = stream;
        let mut client = stream
            .get_socket_digest()
            .and_then(|d| d.peer_addr().and_then(|a| a.as_inet()).map(|a| a.ip()));
        // A load balancer in front speaks first: the client is the one it names (and
        // the per-client limit counts that client, not the balancer).
        if client.is_some_and(|ip| {
            let from = &generation.config.listeners.proxy_protocol_from;
            from.iter().any(|range| range.contains(&ip))
        }) {
            match self
                .proxy_header(&mut stream, limits.header_read_timeout.0)
                .await
            {
                Ok(Some(addr)) => client = Some(addr.ip()),
                Ok(None) => {}
                Err(e) => {
                    self.open.fetch_sub(1, Ordering::Relaxed);
                    self.metrics
                        .proxy_protocol_refused
                        .with_label_values(&[self.name])
                        .inc();
                    tracing::debug!(listener = self.name, source = ?client, "connection refused: {e}");
                    return;
                }
            }
        }
        if let Some(ip) = client {
            if !self.per_client.admit(ip, limits.max_connections_per_ip) {
                self.open.fetch_sub(1, Ordering::Relaxed);
                self.metrics
                    .rejected_client_connections
                    .with_label_values(&[self.name])
                    .inc();
                return;
            }
        }
        self.metrics
            .active_connections
            .with_label_values(&[self.name])
            .inc();
        let _open = OpenGuard(self, client);
        let header_timeout = limits.header_read_timeout.0;
        let h2c = self.tls.is_none() && generation.config.listeners.h2c;
        // Under on-demand TLS a handshake may also wait for its certificate.
        let hold = generation
            .on_demand
            .as_ref()
            .map_or(Duration::ZERO, |p| Duration::from_millis(p.hold_ms));
        drop(generation);

        let (stream, tls): (Stream, _) = match &self.tls {
            None if h2c => match sniff_h2c(stream, header_timeout).await {
                Some((stream, true)) => {
                    // HTTP/2 ends with a GOAWAY at shutdown, not by a refusal.
                    drop(arrival);
                    Box::pin(self.serve_http2(stream, client, None, shutdown)).await;
                    return;
                }
                Some((stream, false)) => (stream, None),
                None => return,
            },
            None => (stream, None),
            // Boxed: the handshake's state is large and needed only until it completes,
            // while this future lives as long as the connection.
            Some(acceptor) => {
                match Box::pin(self.handshake(acceptor, stream, header_timeout + hold)).await {
                    // RFC 8737 §3: the validation is the handshake; then the connection ends.
                    Some(conn) if conn.is_acme_validation() => return,
                    Some(conn) => {
                        let info = conn.info().clone();
                        (Box::new(conn), Some(info))
                    }
                    None => return,
                }
            }
        };
        // HTTP/2 multiplexes many requests on one connection: the HTTP/1 header deadline
        // does not apply (its own limits are a later hardening item).
        let is_h2 = matches!(
            pingora::protocols::Ssl::selected_alpn_proto(&*stream),
            Some(pingora::protocols::ALPN::H2)
        );
        if is_h2 {
            // Boxed: the HTTP/2 state would otherwise make every connection's future,
            // HTTP/1 ones included, as large as itself.
            drop(arrival);
            Box::pin(self.serve_http2(stream, client, tls, shutdown)).await;
            return;
        }
        let metrics = self.metrics.clone();
        let stream = Box::new(
            GuardedStream::with_deadline(
                stream,
                header_timeout,
                Arc::new(move || metrics.header_timeouts.inc()),
            )
            .counting(arrival),
        );
        self.serve_http1(stream, client, tls, shutdown).await;
    }

    /// Reads the PROXY header a trusted load balancer opens `stream` with, within
    /// `limit`; the client address it names becomes the connection's peer address for
    /// Pingora's path too.
    async fn proxy_header(
        &self,
        stream: &mut Stream,
        limit: Duration,
    ) -> Result<Option<std::net::SocketAddr>, proxy_protocol::HeaderError> {
        let read = tokio::time::timeout(limit, proxy_protocol::read(stream)).await;
        let addr = read.map_err(|_| {
            proxy_protocol::HeaderError::Io(format!("no complete header within {limit:?}"))
        })??;
        if let Some(addr) = addr {
            let digest = SocketDigest::from_raw_fd(stream.id());
            let _ = digest.peer_addr.set(Some(addr.into()));
            stream.set_socket_digest(digest);
        }
        Ok(addr)
    }

    /// Pingora's HTTP/1 keep-alive loop (as in its `ServerApp` for HTTP apps), except
    /// that between requests the connection waits in [`EdgeApp::next_request`] instead
    /// of inside Pingora's request reader. Pingora's per-request future and header
    /// buffer (~22 KB) exist only while a request is being served, so an idle
    /// keep-alive connection costs little more than its socket and TLS state.
    ///
    /// Each request is first offered to the fast path ([`h1::serve`]), which serves the
    /// common case itself and hands anything else to Pingora with the bytes read.
    async fn serve_http1(
        self: &Arc<Self>,
        mut stream: Stream,
        client: Option<IpAddr>,
        tls: Option<Arc<TlsInfo>>,
        shutdown: &ShutdownWatch,
    ) {
        let mut settings: Option<HttpPersistentSettings> = None;
        let mut first = true;
        loop {
            let Some(mut bytes) = self.next_request(&mut stream, first).await else {
                return;
            };
            first = false;
            let mut handed = None;
            let generation = self.current.load_full();
            if generation.config.server.http1_fast_path {
                let conn = ConnInfo {
                    scheme: self.scheme,
                    peer: client,
                    metrics: &self.metrics,
                    closing: *shutdown.borrow() || self.closing.load(Ordering::Acquire),
                    tls: tls.as_deref(),
                };
                // Boxed: the request's state exists only while it is served.
                match Box::pin(h1::serve(&mut stream, bytes, generation, conn)).await {
                    Served::KeepAlive => continue,
                    Served::Close => {
                        let limit = self.current.load().config.limits.send_timeout.0;
                        let _ = tokio::time::timeout(limit, stream.shutdown()).await;
                        return;
                    }
                    Served::Pingora(back, decided) => {
                        bytes = back;
                        handed = decided;
                    }
                }
            } else {
                drop(generation);
            }
            // The session is built and moved into Pingora's (boxed) future in a
            // statement of its own, so that this future, which lives as long as the
            // connection, keeps no room for it.
            let request = self.proxy.process_new_http(
                self.http1_session(stream, settings.take(), Some(bytes), shutdown),
                shutdown,
            );
            // Pingora's path learns of the TLS connection, and of a decision already
            // made, from the task it runs in.
            let reused = in_context(tls.clone(), handed, request).await;
            let Some(reused) = reused else {
                return;
            };
            let (next, persistent) = reused.consume();
            stream = next;
            settings = persistent;
        }
    }

    /// HTTP/2 as Pingora's HTTP server serves it (its codec, stream acceptance and
    /// checks, graceful shutdown with GOAWAY), except that each stream's request is first
    /// offered to the fast path ([`h2::serve`]); what it declines goes to Pingora's proxy.
    async fn serve_http2(
        self: &Arc<Self>,
        stream: Stream,
        client: Option<IpAddr>,
        tls: Option<Arc<TlsInfo>>,
        shutdown: &ShutdownWatch,
    ) {
        let digest = Arc::new(Digest {
            ssl_digest: stream.get_ssl_digest(),
            timing_digest: stream.get_timing_digest(),
            proxy_digest: stream.get_proxy_digest(),
            socket_digest: stream.get_socket_digest(),
        });
        let Ok(mut conn) = v2::server::handshake(stream, self.proxy.h2_options()).await else {
            return;
        };
        let mut shutdown = shutdown.clone();
        let mut draining = false;
        let mut malformed = 0;
        let active = Arc::new(ActiveStreams::default());
        loop {
            let next = if draining {
                HttpSession::from_h2_conn(&mut conn, digest.clone()).await
            } else {
                let keepalive = self.current.load().config.limits.keepalive_timeout.0;
                tokio::select! {
                    biased;
                    _ = shutdown.changed() => {
                        // GOAWAY; streams already opened are still served.
                        conn.graceful_shutdown();
                        draining = true;
                        continue;
                    }
                    next = HttpSession::from_h2_conn(&mut conn, digest.clone()) => next,
                    // No stream for the keep-alive timeout: GOAWAY, as for an idle
                    // HTTP/1 connection (a new stream restarts the wait).
                    () = active.idle_for(keepalive) => {
                        conn.graceful_shutdown();
                        draining = true;
                        continue;
                    }
                }
            };
            let session = match next {
                Ok(Some(H2Accept::Session(session))) => session,
                // Answered or reset by Pingora's checks; bounded per connection as
                // Pingora's own accept loop bounds it.
                Ok(Some(H2Accept::Rejected)) => {
                    malformed += 1;
                    if malformed >= MAX_MALFORMED_STREAMS {
                        return;
                    }
                    continue;
                }
                // Closed by the client, or a connection error.
                Ok(None) | Err(_) => return,
            };
            let app = self.clone();
            let shutdown = shutdown.clone();
            let guard = active.start();
            let tls = tls.clone();
            // The stream's future (~5 KB) is boxed once; spawned unboxed, tokio would
            // copy it by value through its spawn path and again into the task's stage
            // when it completes (memmove was 7 % of the CPU with HTTP/2 clients).
            tokio::spawn(Box::pin(async move {
                let _guard = guard;
                let generation = app.current.load_full();
                let handed = if generation.config.server.http2_fast_path {
                    let conn = ConnInfo {
                        scheme: app.scheme,
                        peer: client,
                        metrics: &app.metrics,
                        closing: false,
                        tls: tls.as_deref(),
                    };
                    h2::serve(session, generation, conn).await
                } else {
                    Some((session, None))
                };
                if let Some((session, decided)) = handed {
                    // Boxed: Pingora's request future is ~5 KB and would otherwise make
                    // every stream's task that large, copied at spawn and at completion
                    // (7 % of the CPU with HTTP/2 clients, in memmove).
                    let request = Box::pin(
                        app.proxy
                            .process_new_http(ServerSession::new_http2(session), &shutdown),
                    );
                    in_context(tls, decided, request).await;
                }
            }));
        }
    }

    /// A Pingora HTTP/1 session for the next request on `stream`: the previous
    /// request's keep-alive settings, or Pingora's defaults on a new connection (the
    /// route's limits set the keep-alive timeout once the request is read), starting
    /// from the bytes [`EdgeApp::next_request`] already read.
    fn http1_session(
        &self,
        stream: Stream,
        settings: Option<HttpPersistentSettings>,
        first_bytes: Option<BytesMut>,
        shutdown: &ShutdownWatch,
    ) -> ServerSession {
        let mut session = ServerSession::new_http1(stream);
        match settings {
            Some(s) => s.apply_to_session(&mut session),
            None => {
                session.set_keepalive((!*shutdown.borrow()).then_some(60));
                session.set_keepalive_reuses_remaining(
                    self.proxy
                        .server_options()
                        .and_then(|o| o.keepalive_request_limit),
                );
            }
        }
        // Pingora sets a pipelined prefix of its own only with pipelining enabled,
        // which Rampart never enables, so this cannot overwrite one.
        if let Some(bytes) = first_bytes {
            session.set_pipelined_prefix(bytes);
        }
        session
    }

    /// Waits on a connection for the first bytes of its next request, and returns them
    /// to be parsed as the start of that request (on a new connection the header
    /// deadline of [`GuardedStream`] bounds the wait). The wait
    /// holds no buffer: bytes are read into the stack when the socket is readable and
    /// copied into a header buffer only then. `None` when the client closes the
    /// connection, the keep-alive timeout passes or, between requests, the listener
    /// shuts down. A connection's `first` request is awaited even then: the client
    /// connected to a listener that was open and is already sending it, and closing the
    /// socket with its bytes unread would reset the connection (the request is then
    /// answered with `Connection: close`).
    async fn next_request(&self, stream: &mut Stream, first: bool) -> Option<BytesMut> {
        let closed = self.closed.notified();
        if !first && self.closing.load(Ordering::Acquire) {
            return None;
        }
        let keepalive = self.current.load().config.limits.keepalive_timeout.0;
        let wake = poll_fn(|cx| {
            let mut chunk = [MaybeUninit::<u8>::uninit(); WAKE_READ];
            let mut buf = ReadBuf::uninit(&mut chunk);
            match Pin::new(&mut **stream).poll_read(cx, &mut buf) {
                Poll::Pending => Poll::Pending,
                Poll::Ready(Ok(())) if !buf.filled().is_empty() => {
                    let mut bytes = BytesMut::with_capacity(HEADER_BUFFER);
                    bytes.extend_from_slice(buf.filled());
                    Poll::Ready(Some(bytes))
                }
                // End of stream (the client closed the idle connection) or an error.
                Poll::Ready(_) => Poll::Ready(None),
            }
        });
        let closed = async {
            if first {
                std::future::pending().await
            } else {
                closed.await;
            }
        };
        tokio::select! {
            biased;
            bytes = crate::clock::within(keepalive, wake) => bytes.ok().flatten(),
            () = closed => None,
        }
    }
}

impl EdgeApp {
    async fn handshake(
        &self,
        acceptor: &crate::tls::Acceptor,
        stream: Stream,
        limit: Duration,
    ) -> Option<TlsConn> {
        match tokio::time::timeout(limit, TlsConn::accept(acceptor, stream)).await {
            Ok(Ok(tls)) => {
                self.metrics.tls_handshakes.inc();
                Some(tls)
            }
            Ok(Err(e)) => {
                let reason = handshake_failure_reason(&e);
                // unknown_sni is counted by the resolver, which knows the name.
                if reason != "unknown_sni" {
                    self.metrics
                        .tls_handshake_failures
                        .with_label_values(&[reason])
                        .inc();
                }
                tracing::debug!(reason, "TLS handshake failed: {e}");
                None
            }
            Err(_) => {
                self.metrics
                    .tls_handshake_failures
                    .with_label_values(&["timeout"])
                    .inc();
                None
            }
        }
    }
}

/// The HTTP/2 connection preface (RFC 9113 §3.4).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Whether a cleartext connection opens with the HTTP/2 preface (h2c with prior
/// knowledge): reads until the bytes differ from it or it is complete, then puts them
/// back, so that either protocol reads the connection from its start. `None`: the
/// connection closed or stalled first.
async fn sniff_h2c(stream: Stream, limit: Duration) -> Option<(Stream, bool)> {
    let Ok(mut l4) = stream
        .into_any()
        .downcast::<pingora::protocols::l4::stream::Stream>()
    else {
        // Pingora's TCP listener hands out only l4 streams; anything else is closed.
        return None;
    };
    let mut seen = Vec::with_capacity(H2_PREFACE.len());
    let read = async {
        let mut buf = [0u8; 24];
        while seen.len() < H2_PREFACE.len() && H2_PREFACE.starts_with(&seen) {
            let want = H2_PREFACE.len() - seen.len();
            let n = tokio::io::AsyncReadExt::read(&mut *l4, &mut buf[..want])
                .await
                .ok()?;
            if n == 0 {
                return None;
            }
            seen.extend_from_slice(&buf[..n]);
        }
        Some(())
    };
    tokio::time::timeout(limit, read).await.ok()??;
    let h2 = seen == H2_PREFACE;
    l4.rewind(&seen);
    Some((l4, h2))
}

/// Runs Pingora's request future with what its path reads from the task: the TLS
/// connection, and a decision a fast path already made.
async fn in_context<F: std::future::Future>(
    tls: Option<Arc<TlsInfo>>,
    decided: Option<Box<Decision>>,
    request: F,
) -> F::Output {
    match (tls, decided) {
        (Some(info), None) => CONNECTION.scope(info, request).await,
        (Some(info), Some(d)) => CONNECTION.scope(info, policy::handoff(d, request)).await,
        (None, None) => request.await,
        (None, Some(d)) => policy::handoff(d, request).await,
    }
}

/// A metric label for why a handshake failed, from the rustls error underneath.
fn handshake_failure_reason(e: &std::io::Error) -> &'static str {
    if let Some(tls) = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
        return rustls_reason(tls);
    }
    match e.kind() {
        std::io::ErrorKind::UnexpectedEof
        | std::io::ErrorKind::ConnectionReset
        | std::io::ErrorKind::BrokenPipe => "client_closed",
        _ => "io",
    }
}

fn rustls_reason(e: &rustls::Error) -> &'static str {
    match e {
        rustls::Error::General(msg) if msg.contains("no server certificate") => "unknown_sni",
        rustls::Error::PeerIncompatible(_) => "incompatible_client",
        rustls::Error::InvalidMessage(_)
        | rustls::Error::InappropriateMessage { .. }
        | rustls::Error::InappropriateHandshakeMessage { .. } => "bad_message",
        rustls::Error::AlertReceived(_) => "client_alert",
        rustls::Error::NoApplicationProtocol => "no_alpn",
        // A host's client_auth refused the client's certificate, or it sent none.
        rustls::Error::InvalidCertificate(_) | rustls::Error::NoCertificatesPresented => {
            "client_cert"
        }
        _ => "other",
    }
}
