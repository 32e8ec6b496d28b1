//! HTTP/2 upstreams of the HTTP/2 fast path: a request for an `h2` or `h2c` pool
//! (without a PROXY header) goes out as a stream of one of this worker's HTTP/2
//! connections to the endpoint, and its response — head, DATA as it arrives, trailers
//! (gRPC's status) — goes back on the client's stream. The retry loop, the balancer's
//! pick, passive health, the error pages and the answers are the HTTP/1 attempt's
//! ([`upstream::forward`], [`upstream::judge_head`]); only the exchange differs.
//!
//! Why: through Pingora's path an HTTP/2 upstream cost 2.8× HAProxy's CPU per request
//! (loadtest/README.md, "Upstream protocols"), most of it Pingora's proxy session
//! around the `h2` client, which this path does without.
//!
//! Connections: per worker thread and endpoint (and TLS settings), as many as the
//! streams in flight need at the pool's `max_streams` each; a new one is opened under
//! the endpoint's connect gate, so a burst opens one connection, not one per request.
//! One with no stream for the pool's idle timeout is closed by its own task.

use std::cell::RefCell;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use h2::client::SendRequest;
use http::header::{HeaderValue, HOST, TE};
use http::{Request, Uri};
use pingora::protocols::http::v2::server::HttpSession;

use super::h2::Http2Client;
use super::upstream::{self, judge_head, Attempt, Attempter, Failed, FailureKind, Relayed, Try};
use crate::clock;
use crate::generation::{Generation, PoolRt};
use crate::policy::Forward;

/// A stream's receive window: what an upstream may send ahead of the client reading
/// it, and so what a stream's slow client can keep buffered here (HTTP/2's default).
const STREAM_WINDOW: u32 = 65_535;
/// The largest window HTTP/2 allows (RFC 9113 §6.9.1).
const MAX_WINDOW: u32 = 0x7fff_ffff;

/// How a request goes to an HTTP/2 upstream: the first attempt's request, built
/// before the body is read, and what a retry needs to build its own (its body is the
/// prepared request's, read whole before the first attempt).
pub(crate) struct MuxRequest {
    /// Taken by the first attempt (moved into `h2`, not copied).
    first: std::sync::Mutex<Option<Request<()>>>,
}

impl MuxRequest {
    /// The upstream request for the HTTP/2 request `session` holds under `plan`
    /// ([`upstream_request`]); `None` when the target is not a valid URI.
    pub(crate) fn new(
        session: &HttpSession,
        (plan, pool): (&Forward, &PoolRt),
        generation: &Generation,
        request_id: &HeaderValue,
    ) -> Option<Self> {
        let first = upstream_request(session, (plan, pool), generation, request_id)?;
        Some(Self {
            first: std::sync::Mutex::new(Some(first)),
        })
    }

    /// The request for a try: the first one, or one built again for a retry.
    fn take(&self, client: &Http2Client<'_>, t: &Try<'_>) -> Option<Request<()>> {
        let first = self
            .first
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        first.or_else(|| {
            let id = &t.request.request_id;
            upstream_request(client.session(), (t.plan, t.pool), t.generation, id)
        })
    }
}

/// The upstream request for the HTTP/2 request `session` holds under `plan`: its
/// method and target (or the plan's), `:authority` the plan's host, the headers every
/// transport passes (an HTTP/2 request has no connection-specific fields but
/// `TE: trailers`, which goes on), and the forwarding headers, the route's own and the
/// request id. `None` when the target is not a valid URI.
fn upstream_request(
    session: &HttpSession,
    (plan, pool): (&Forward, &PoolRt),
    generation: &Generation,
    request_id: &HeaderValue,
) -> Option<Request<()>> {
    let req = session.req_header();
    let target = plan
        .target
        .as_deref()
        .unwrap_or_else(|| req.uri.path_and_query().map_or("/", |pq| pq.as_str()));
    let scheme = if pool.peer.tls.is_some() {
        "https"
    } else {
        "http"
    };
    let authority = plan.host.to_str().ok()?;
    let uri = Uri::builder()
        .scheme(scheme)
        .authority(authority)
        .path_and_query(target)
        .build()
        .ok()?;
    let edits = &generation.routes[plan.route].request_headers;
    let mut out = Request::new(());
    *out.method_mut() = req.method.clone();
    *out.uri_mut() = uri;
    let headers = out.headers_mut();
    headers.reserve(req.headers.len() + plan.forwarded.len() + 4);
    for (name, value) in &req.headers {
        if name == HOST || name == TE || !generation.passes_header(plan, name.as_str()) {
            continue;
        }
        headers.append(name.clone(), value.clone());
    }
    if crate::headers::te_trailers(&req.headers) {
        headers.insert(TE, HeaderValue::from_static("trailers"));
    }
    let id = (&generation.forwarding.request_id, request_id);
    for (name, value) in super::added_headers(plan, edits, id) {
        // Made of valid header values by the policy and the configuration.
        if let Ok(value) = HeaderValue::from_bytes(value) {
            headers.append(name.clone(), value);
        }
    }
    Some(out)
}

impl Attempter<Http2Client<'_>> for MuxRequest {
    async fn attempt(&self, client: &mut Http2Client<'_>, t: Try<'_>) -> Attempt {
        let Try {
            request,
            plan,
            generation,
            pool,
            idx,
            deadline,
            conn,
            ..
        } = t;
        let Exchanged {
            response,
            slot,
            sent_at,
            connect,
        } = match self.exchange(&t, || self.take(client, &t)).await {
            Ok(e) => e,
            Err(f) => return Attempt::Failed(f),
        };
        let head_at = Instant::now();
        let ttfb = head_at.duration_since(sent_at);
        let (parts, mut body) = response.into_parts();
        let status = parts.status.as_u16();
        // Dropping `body` resets the upstream stream when the try ends here.
        if let Some(ended) = judge_head(client, &t, status, (head_at, ttfb), connect).await {
            return ended;
        }
        let cookies = plan.set_cookies(pool, idx, conn.scheme == crate::edge::Scheme::Https);
        let Some(header) = super::h2::response_header_of(parts, &cookies, request, generation)
        else {
            // A header the client's stream cannot carry: the stream is reset.
            return Attempt::Done(Relayed {
                status: 502,
                body_bytes: 0,
                ttfb,
                connect,
                keep_alive: false,
            });
        };
        let mut ended = body.is_end_stream() || request.head_request;
        let mut client_ok = client.send(header, &[], ended).await;
        let endpoint = &pool.endpoints[idx];
        let pause = pool.timeouts.first_byte.0;
        let mut sent = 0u64;
        while client_ok && !ended {
            if Instant::now() >= deadline || endpoint.state.drained(pool.drain_timeout) {
                break;
            }
            match tokio::time::timeout(pause, body.data()).await {
                Ok(Some(Ok(data))) => {
                    // The window opens again as the client's stream takes the data.
                    let _ = body.flow_control().release_capacity(data.len());
                    sent += data.len() as u64;
                    client_ok = client.data(data, false).await;
                }
                Ok(None) => {
                    ended = true;
                    client_ok = match tokio::time::timeout(pause, body.trailers()).await {
                        Ok(Ok(Some(trailers))) => client.trailers(trailers),
                        Ok(Ok(None)) => client.data(Bytes::new(), true).await,
                        _ => {
                            ended = false;
                            false
                        }
                    };
                }
                // A reset, the connection gone, or a pause longer than first_byte: the
                // client's stream is reset when the session is dropped.
                Ok(Some(Err(_))) | Err(_) => break,
            }
        }
        drop((body, slot));
        Attempt::Done(Relayed {
            status,
            body_bytes: sent,
            ttfb,
            connect,
            keep_alive: client_ok && ended,
        })
    }
}

/// A request sent on a stream and its response head received.
struct Exchanged {
    response: http::Response<h2::RecvStream>,
    /// The stream's place on its connection, held while the body is read.
    slot: Slot,
    /// When the request was sent (for the time to first byte).
    sent_at: Instant,
    /// The connect, when this try opened the connection (else zero).
    connect: Duration,
}

impl MuxRequest {
    /// Sends the request on a stream of a pooled connection to the try's endpoint, or
    /// of a new one, and waits for the response head (interim 1xx skipped by `h2`). A
    /// stream the upstream refused unprocessed (a GOAWAY, `REFUSED_STREAM`) on a pooled
    /// connection is sent once more on a fresh one, as a stale HTTP/1 connection is.
    async fn exchange(
        &self,
        t: &Try<'_>,
        mut request_for: impl FnMut() -> Option<Request<()>>,
    ) -> Result<Exchanged, Failed> {
        let (pool, idx, deadline, request) = (t.pool, t.idx, t.deadline, t.request);
        let retry = request.idempotent;
        let mut now = t.now;
        let mut fresh_only = false;
        loop {
            if now >= deadline {
                return Err(Failed::new(FailureKind::Timeout, 504, false));
            }
            let (send, slot, connect) = stream_to(pool, idx, now, deadline, fresh_only).await?;
            let reused = connect.is_none();
            let sent_at = Instant::now();
            let read_limit = clock::after(sent_at, pool.timeouts.first_byte.0).min(deadline);
            let body = &request.upstream_head;
            // Built for the first try; a retry's can only fail as the first did.
            let Some(upstream_request) = request_for() else {
                return Err(Failed::new(FailureKind::Error, 502, false));
            };
            let exchange = async {
                let mut send = send.ready().await?;
                let (response, mut stream) =
                    send.send_request(upstream_request, body.is_empty())?;
                if !body.is_empty() {
                    stream.send_data(Bytes::copy_from_slice(body), true)?;
                }
                response.await
            };
            match tokio::time::timeout_at(read_limit.into(), exchange).await {
                Ok(Ok(response)) => {
                    return Ok(Exchanged {
                        response,
                        slot,
                        sent_at,
                        connect: connect.unwrap_or_default(),
                    });
                }
                // A pooled connection that ended under the request (as a stale HTTP/1
                // one) or refused the stream: once more on a fresh one.
                Ok(Err(e)) if reused && (unprocessed(&e) || e.is_io()) => {
                    slot.close();
                    fresh_only = true;
                    now = Instant::now();
                }
                Ok(Err(e)) => {
                    slot.close();
                    let safe = retry || unprocessed(&e);
                    return Err(Failed::new(FailureKind::Error, 502, safe));
                }
                Err(_) => return Err(Failed::new(FailureKind::Timeout, 504, retry)),
            }
        }
    }
}

/// The upstream did not process the stream: it may be sent again, whatever its method.
fn unprocessed(e: &h2::Error) -> bool {
    e.is_go_away() || e.reason() == Some(h2::Reason::REFUSED_STREAM)
}

/// One HTTP/2 connection of this worker to an endpoint.
struct MuxConn {
    send: SendRequest<Bytes>,
    state: Arc<ConnState>,
}

impl MuxConn {
    /// Still worth keeping at `now_ms`: open, and busy or idle for less than its limit.
    fn keep(&self, now_ms: u64) -> bool {
        !self.state.closed.load(Ordering::Acquire) && !self.state.idle_expired(now_ms)
    }
}

/// This worker's HTTP/2 upstream connections.
#[derive(Default)]
struct Conns {
    /// By endpoint address and the pool's TLS settings (`PeerSettings::reuse_key`).
    by_key: HashMap<(SocketAddr, u64), Vec<MuxConn>>,
    /// When every list was last swept (endpoints that left the configuration are never
    /// asked for again; their connections go at the next sweep).
    last_sweep_ms: u64,
}

/// What the streams of a connection and its driver task share.
struct ConnState {
    /// Streams in flight.
    streams: AtomicUsize,
    /// The connection ended (or failed a stream in a way that condemns it).
    closed: AtomicBool,
    /// When its last stream ended (milliseconds on [`crate::health::now_ms`]'s clock).
    idle_since_ms: std::sync::atomic::AtomicU64,
    /// How long it is kept without a stream (the pool's `timeouts.idle`), in ms.
    idle_ms: u64,
}

impl ConnState {
    /// A connection opened for its first stream, kept `idle` without one.
    fn new(idle: Duration) -> Self {
        Self {
            streams: AtomicUsize::new(1),
            closed: AtomicBool::new(false),
            idle_since_ms: std::sync::atomic::AtomicU64::new(0),
            idle_ms: u64::try_from(idle.as_millis()).unwrap_or(u64::MAX),
        }
    }

    /// It has had no stream for its idle limit at `now_ms`.
    fn idle_expired(&self, now_ms: u64) -> bool {
        self.streams.load(Ordering::Acquire) == 0
            && now_ms.saturating_sub(self.idle_since_ms.load(Ordering::Relaxed)) >= self.idle_ms
    }
}

/// A stream's place on a connection, given back when the try is over.
struct Slot(Arc<ConnState>);

impl Slot {
    /// The connection failed a stream: no new stream goes to it.
    fn close(&self) {
        self.0.closed.store(true, Ordering::Release);
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0
            .idle_since_ms
            .store(crate::health::now_ms(), Ordering::Relaxed);
        self.0.streams.fetch_sub(1, Ordering::AcqRel);
    }
}

thread_local! {
    /// This worker's HTTP/2 upstream connections, by endpoint address and TLS settings.
    static CONNS: RefCell<Conns> = RefCell::default();
}

/// A stream on a connection to endpoint `idx`: a pooled connection with room for one
/// more (unless `fresh_only`), else a new one. The connect time is `Some` for a new one.
async fn stream_to(
    pool: &PoolRt,
    idx: usize,
    now: Instant,
    deadline: Instant,
    fresh_only: bool,
) -> Result<(SendRequest<Bytes>, Slot, Option<Duration>), Failed> {
    let endpoint = &pool.endpoints[idx];
    let key = (endpoint.addr, pool.peer.reuse_key());
    let max = pool.peer.max_streams.max(1);
    let idle = pool.timeouts.idle.0;
    if !fresh_only {
        if let Some((send, slot)) = take(key, max) {
            return Ok((send, slot, None));
        }
    }
    let limit = clock::after(now, pool.timeouts.connect.0).min(deadline);
    // One connect at a time per endpoint: the requests of a burst wait for it and
    // share it rather than each opening a connection.
    let gate = endpoint.state.connect_gate();
    let Ok(_held) = tokio::time::timeout_at(limit.into(), gate.lock_owned()).await else {
        return Err(Failed::new(FailureKind::Connect, 504, true));
    };
    if !fresh_only {
        if let Some((send, slot)) = take(key, max) {
            return Ok((send, slot, None));
        }
    }
    let io = upstream::connect(pool, idx, limit).await?;
    // The connection's window holds every stream's full window: streams whose clients
    // read slowly (or not at all) can never stall the others sharing the connection.
    let connection_window = u32::try_from(max)
        .unwrap_or(u32::MAX)
        .saturating_mul(STREAM_WINDOW)
        .min(MAX_WINDOW);
    let mut builder = h2::client::Builder::new();
    builder
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(connection_window);
    let handshake = builder.handshake::<_, Bytes>(io);
    let (send, connection) = match tokio::time::timeout_at(limit.into(), handshake).await {
        Ok(Ok(pair)) => pair,
        Ok(Err(_)) => return Err(Failed::new(FailureKind::Connect, 502, true)),
        Err(_) => return Err(Failed::new(FailureKind::Connect, 504, true)),
    };
    let state = Arc::new(ConnState::new(idle));
    tokio::spawn(drive(connection, state.clone()));
    let slot = Slot(state.clone());
    let connected = Instant::now().saturating_duration_since(now);
    CONNS.with(|c| {
        c.borrow_mut().by_key.entry(key).or_default().push(MuxConn {
            send: send.clone(),
            state,
        });
    });
    Ok((send, slot, Some(connected)))
}

/// Runs an upstream connection until the upstream closes it, or until it has had no
/// stream for its idle limit (then it is closed here: the pool's handle alone would
/// keep it open for as long as the worker sees no other request to that endpoint).
async fn drive(
    connection: h2::client::Connection<super::conn::Upstream, Bytes>,
    state: Arc<ConnState>,
) {
    let idle = Duration::from_millis(state.idle_ms);
    tokio::pin!(connection);
    loop {
        tokio::select! {
            _ = connection.as_mut() => break,
            () = tokio::time::sleep(idle) => {
                if state.idle_expired(crate::health::now_ms()) {
                    // No new stream is given this connection from now on; one handed
                    // out just before fails as on a stale connection and is retried.
                    state.closed.store(true, Ordering::Release);
                    if state.streams.load(Ordering::Acquire) == 0 {
                        return;
                    }
                }
            }
        }
    }
    state.closed.store(true, Ordering::Release);
}

/// A stream slot on a live pooled connection to `key` with fewer than `max` streams;
/// connections that ended, or were idle too long, are let go on the way.
fn take(key: (SocketAddr, u64), max: usize) -> Option<(SendRequest<Bytes>, Slot)> {
    CONNS.with(|c| {
        let mut conns = c.borrow_mut();
        let now_ms = crate::health::now_ms();
        if now_ms.saturating_sub(conns.last_sweep_ms) > 5_000 {
            conns.last_sweep_ms = now_ms;
            conns.by_key.retain(|_, list| {
                list.retain(|c| c.keep(now_ms));
                !list.is_empty()
            });
        }
        let list = conns.by_key.get_mut(&key)?;
        list.retain(|c| c.keep(now_ms));
        // At most the pool's `max_streams`, and at most what the endpoint allows
        // (SETTINGS_MAX_CONCURRENT_STREAMS): a stream over its limit would wait on this
        // connection rather than go out on another.
        let conn = list.iter().find(|c| {
            let limit = max.min(c.send.current_max_send_streams());
            c.state.streams.load(Ordering::Acquire) < limit
        })?;
        conn.state.streams.fetch_add(1, Ordering::AcqRel);
        Some((conn.send.clone(), Slot(conn.state.clone())))
    })
}
