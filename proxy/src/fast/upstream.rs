//! The upstream attempt of the fast paths: pick an endpoint the request has not tried,
//! take a pooled connection or connect, send the upstream head, read the response head
//! (skipping interim 1xx), stream the body through as it is framed, and retry as the
//! pool's policy allows; passive health and latency are recorded as on Pingora's path.

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::conn::Upstream;

use super::chunked::{ChunkScanner, MalformedChunk};
use super::pool::IdlePool;
use super::{ConnInfo, Downstream, Prepared, MAX_HEADERS};
use crate::access::AttemptSpan;
use crate::clock::{self};
use crate::edge::{record_endpoint_failure, Tried};
use crate::generation::{Generation, PoolRt};
use crate::headers::tokens;
use crate::health::ms_at;
use crate::policy::{Answer, Forward};
use http::HeaderValue;

/// Largest upstream response head accepted (Pingora's limit too).
const MAX_RESPONSE_HEAD: usize = 64 * 1024;
/// Read buffer for an upstream response.
const UPSTREAM_BUFFER: usize = 16 * 1024;

/// Largest response (head and body) read whole before the first write to the client
/// when its bytes have already arrived.
const COALESCE_LIMIT: usize = 64 * 1024;

/// Why an attempt on an endpoint failed before anything reached the client (on either
/// path: Pingora's counts its failures with the same kinds).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum FailureKind {
    /// The TCP connect failed or timed out.
    Connect,
    /// No (complete) response head within the first-byte timeout or the total.
    Timeout,
    /// The connection failed, or the response head was malformed.
    Error,
    /// The upstream answered a status the pool retries on.
    Status,
}

impl FailureKind {
    /// The `kind` label of `rampart_upstream_failures_total`, as Pingora's path counts.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            FailureKind::Connect => "connect",
            FailureKind::Timeout => "timeout",
            FailureKind::Error => "error",
            FailureKind::Status => "status",
        }
    }

    /// The access log's error kind of a request that failed this way.
    pub(crate) fn error(self) -> &'static str {
        match self {
            FailureKind::Connect => "upstream_connect",
            FailureKind::Timeout => "upstream_timeout",
            FailureKind::Error => "upstream_error",
            FailureKind::Status => "upstream_status",
        }
    }
}

/// An attempt that failed before the client got anything: `status` is answered
/// unless another attempt is made (`retry`: safe to make).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Failed {
    kind: FailureKind,
    status: u16,
    retry: bool,
}

impl Failed {
    pub(crate) fn new(kind: FailureKind, status: u16, retry: bool) -> Self {
        Self {
            kind,
            status,
            retry,
        }
    }
}

/// How one attempt on one endpoint ended.
pub(crate) enum Attempt {
    /// The response (or part of it) went to the client.
    Done(Relayed),
    /// Nothing reached the client.
    Failed(Failed),
    /// The client's side failed before any of the response reached it: its request
    /// body, passed on as it arrived, stopped, came too slowly or grew too large.
    Client(super::BodyError),
}

/// A response the upstream started: its status, the body bytes that reached the
/// client, the time to its first byte and whether the client connection goes on.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Relayed {
    pub(crate) status: u16,
    pub(crate) body_bytes: u64,
    pub(crate) ttfb: Duration,
    /// The connect (zero on a pooled connection).
    pub(crate) connect: Duration,
    pub(crate) keep_alive: bool,
}

/// How a forwarded request ended, for [`crate::access::finish`].
#[derive(Clone, Debug, Default)]
pub(crate) struct Forwarded {
    /// The status the client got.
    pub(crate) status: u16,
    /// The client connection can carry another request.
    pub(crate) keep_alive: bool,
    /// The endpoint of the last attempt.
    pub(crate) endpoint: Option<usize>,
    /// Attempts made.
    pub(crate) attempts: u32,
    /// The upstream's response, when one reached the client.
    pub(crate) relayed: Option<Relayed>,
    /// Why it failed, when the proxy answered.
    pub(crate) error: Option<&'static str>,
    /// Every attempt, when the request is traced (else empty).
    pub(crate) attempt_spans: Vec<AttemptSpan>,
}

/// One try of a request on one endpoint of its pool (see [`forward`]).
pub(crate) struct Try<'a> {
    pub(crate) request: &'a Prepared,
    pub(crate) plan: &'a Forward,
    pub(crate) generation: &'a Generation,
    pub(crate) pool: &'a PoolRt,
    /// The endpoint (an index into the pool's endpoints).
    pub(crate) idx: usize,
    /// When the try starts.
    pub(crate) now: Instant,
    /// When the request's whole time budget (the route's total timeout) runs out.
    pub(crate) deadline: Instant,
    /// Whether a retry has somewhere to go and the pool's budget allows it.
    pub(crate) may_retry: &'a (dyn Fn() -> bool + Sync),
    pub(crate) conn: ConnInfo<'a>,
}

/// How an attempt reaches an endpoint and relays its response to a `D`: over a pooled
/// HTTP/1.1 connection ([`Http1`]) or as a stream of a shared HTTP/2 connection
/// ([`super::mux`]). The retry loop around it ([`forward`]) is the same for both.
pub(crate) trait Attempter<D> {
    /// Makes the try `t` and relays what the endpoint answers to `client`.
    async fn attempt(&self, client: &mut D, t: Try<'_>) -> Attempt;
}

/// Attempts over HTTP/1.1 connections of the per-worker idle pool.
pub(crate) struct Http1;

impl<D: Downstream> Attempter<D> for Http1 {
    async fn attempt(&self, client: &mut D, t: Try<'_>) -> Attempt {
        attempt(client, &t).await
    }
}

/// Proxies a prepared request, trying endpoints as the pool's retry policy allows,
/// each try made by `way`.
pub(crate) async fn forward<D: Downstream>(
    client: &mut D,
    request: &Prepared,
    plan: &Forward,
    generation: &Generation,
    conn: ConnInfo<'_>,
    started: Instant,
    way: &impl Attempter<D>,
) -> Forwarded {
    let Some(pool) = plan.pool(generation).map(AsRef::as_ref) else {
        return Forwarded {
            status: 500,
            ..Forwarded::default()
        };
    };
    // The body is whole by now (the fast paths read it before forwarding).
    if let Some(copy) = plan.mirror.as_ref().and_then(|m| m.take()) {
        let len = usize::try_from(request.body_len).unwrap_or(usize::MAX);
        let head = &request.upstream_head;
        if len <= head.len() {
            copy.send(bytes::Bytes::copy_from_slice(&head[head.len() - len..]));
        }
    }
    let mut ticket = match pool.admit(&*pool.breaker, conn.metrics, ms_at(started)) {
        Ok(t) => t,
        Err(refusal) => {
            client
                .answer(&refusal.answer(), request, generation, true)
                .await;
            return Forwarded {
                status: 503,
                error: Some(refusal.as_str()),
                ..Forwarded::default()
            };
        }
    };
    let mut tried = Tried::default();
    let mut attempts = 0u32;
    let mut attempt_spans = Vec::new();
    let traced = request.traced();
    let deadline = clock::after(started, plan.total);
    // What the last failed attempt would answer, and why.
    let (mut failed, mut why) = (503, "no_endpoint");
    let (status, error) = loop {
        // The first try starts right after `started` was read.
        let now = if attempts == 0 {
            started
        } else {
            Instant::now()
        };
        if now >= deadline {
            break (504, "upstream_timeout");
        }
        // No endpoint at all (503), or none left to retry on (the last failure's).
        let Some(idx) = pool.pick(plan.key, tried.as_slice(), ms_at(now)) else {
            break (failed, why);
        };
        tried.push(idx);
        if attempts > 0 {
            ticket.retrying();
        }
        attempts += 1;
        let within_budget = attempts <= pool.retries.attempts;
        // Whether a retry has somewhere to go and the pool's retry budget allows it;
        // asked only when an attempt fails.
        let may_retry = || {
            within_budget
                && pool.can_retry(plan.key, tried.as_slice(), ms_at(now))
                && pool.retry_allowed(&ticket, conn.metrics)
        };
        let inflight = pool.endpoints[idx].state.start_request();
        let t = Try {
            request,
            plan,
            generation,
            pool,
            idx,
            now,
            deadline,
            may_retry: &may_retry,
            conn,
        };
        let outcome = way.attempt(client, t).await;
        drop(inflight);
        // A client's failure says nothing about the endpoint.
        let ok = match &outcome {
            Attempt::Done(r) => !matches!(r.status, 502..=504),
            Attempt::Failed(_) => false,
            Attempt::Client(_) => true,
        };
        ticket.record(ok, pool.circuit_breaker.as_ref(), ms_at(Instant::now()));
        if traced {
            let (status, error) = match &outcome {
                Attempt::Done(r) => (Some(r.status), None),
                Attempt::Failed(f) => (
                    (f.kind == FailureKind::Status).then_some(f.status),
                    Some(f.kind.error()),
                ),
                Attempt::Client(e) => (None, Some(e.kind())),
            };
            attempt_spans.push(AttemptSpan {
                endpoint: idx,
                start: now,
                end: Instant::now(),
                status,
                error,
            });
        }
        match outcome {
            Attempt::Done(relayed) => {
                return Forwarded {
                    status: relayed.status,
                    keep_alive: relayed.keep_alive,
                    endpoint: Some(idx),
                    attempts,
                    relayed: Some(relayed),
                    error: None,
                    attempt_spans,
                }
            }
            Attempt::Client(e) => {
                let (status, error) =
                    super::answer_body_failure(client, e, request, generation).await;
                return Forwarded {
                    status,
                    keep_alive: false,
                    endpoint: Some(idx),
                    attempts,
                    relayed: None,
                    error,
                    attempt_spans,
                };
            }
            Attempt::Failed(f) => {
                let mut recorded = false;
                record_endpoint_failure(conn.metrics, pool, Some(idx), f.kind, &mut recorded);
                (failed, why) = (f.status, f.kind.error());
                if !(f.retry && within_budget && pool.retry_allowed(&ticket, conn.metrics)) {
                    break (f.status, why);
                }
            }
        }
    };
    // As Pingora's path after a failure: an error answer, and the connection closes.
    client
        .answer(&Answer::Failed(status), request, generation, true)
        .await;
    Forwarded {
        status,
        keep_alive: false,
        endpoint: tried.as_slice().last().copied(),
        attempts,
        relayed: None,
        error: Some(error),
        attempt_spans,
    }
}

/// An upstream connection whose response head has arrived.
struct Exchanged {
    upstream: Upstream,
    head: FinalHead,
    /// When the request was written (for the time to first byte).
    sent_at: Instant,
    /// How long the connect took (zero on a pooled connection).
    connect: Duration,
}

/// One try over HTTP/1.1: the exchange of heads, then the body streamed through.
async fn attempt<D: Downstream>(client: &mut D, t: &Try<'_>) -> Attempt {
    let Try {
        request,
        plan,
        generation,
        pool,
        idx,
        now,
        deadline,
        conn,
        ..
    } = *t;
    let mut buf: Vec<u8> = Vec::with_capacity(UPSTREAM_BUFFER);
    let exchanged = match exchange_heads(request, pool, idx, now, deadline, &mut buf).await {
        Ok(e) => e,
        Err(f) => return Attempt::Failed(f),
    };
    let head_at = Instant::now();
    let ttfb = head_at.duration_since(exchanged.sent_at);
    let status = exchanged.head.status;
    let arrived = (head_at, ttfb);
    if let Some(ended) = judge_head(client, t, status, arrived, exchanged.connect).await {
        return ended;
    }
    let cookies = plan.set_cookies(pool, idx, conn.scheme == crate::edge::Scheme::Https);
    let relay = Relay {
        cookies,
        request,
        generation,
        pool,
        idx,
        deadline,
        head_at,
        ttfb,
        connect: exchanged.connect,
        close: request.client_close || conn.closing,
    };
    relay.run(client, exchanged, buf).await
}

/// What a response head's `status`, arrived at `head_at`, `ttfb` after the request was
/// sent, means for try `t` before any of its body is relayed, on either kind of upstream: latency
/// and passive health recorded; `Some` when the try ends here — a status the pool
/// retries on (nothing reached the client), or one the route's error pages intercept
/// (the proxy's page answered; the upstream's body is never read).
pub(crate) async fn judge_head<D: Downstream>(
    client: &mut D,
    t: &Try<'_>,
    status: u16,
    (head_at, ttfb): (Instant, Duration),
    connect: Duration,
) -> Option<Attempt> {
    let Try {
        request,
        generation,
        pool,
        idx,
        conn,
        ..
    } = *t;
    pool.ttfb.observe(ttfb.as_secs_f64());
    pool.states[idx].observe_latency(ttfb, ms_at(head_at));
    if pool.retries.on_status.contains(&status) && request.idempotent && (t.may_retry)() {
        return Some(Attempt::Failed(Failed::new(
            FailureKind::Status,
            status,
            true,
        )));
    }
    if matches!(status, 502..=504) {
        let mut recorded = false;
        let kind = FailureKind::Status;
        record_endpoint_failure(conn.metrics, pool, Some(idx), kind, &mut recorded);
    } else {
        pool.states[idx].record_success();
    }
    let pages = request.pages(generation);
    if !pages.is_some_and(|p| p.intercept.contains(&status)) {
        return None;
    }
    let close = request.client_close || conn.closing;
    let answer = Answer::Intercepted(status);
    let written = client.answer(&answer, request, generation, close).await;
    let id = Some(&request.request_id);
    Some(Attempt::Done(Relayed {
        status,
        body_bytes: answer.body_len(request.head_request, request.style, id, pages),
        ttfb,
        connect,
        keep_alive: written && !close,
    }))
}

/// A pooled connection (or, when it turns out stale, one fresh connection), the
/// request written, and the response head read into `buf` (interim 1xx skipped).
async fn exchange_heads(
    request: &Prepared,
    pool: &PoolRt,
    idx: usize,
    mut now: Instant,
    deadline: Instant,
    buf: &mut Vec<u8>,
) -> Result<Exchanged, Failed> {
    let endpoint = &pool.endpoints[idx];
    let t = &pool.timeouts;
    let retry = request.idempotent;
    let mut stale_seen = false;
    loop {
        if now >= deadline {
            return Err(Failed::new(FailureKind::Timeout, 504, false));
        }
        let pooled = if stale_seen {
            None
        } else {
            IdlePool::take(endpoint.addr, pool.peer.reuse_key(), now)
        };
        let reused = pooled.is_some();
        let mut upstream = match pooled {
            Some(s) => s,
            None => {
                let limit = clock::after(now, t.connect.0).min(deadline);
                connect(pool, idx, limit).await?
            }
        };
        let sent_at = Instant::now();
        let connect = if reused {
            Duration::ZERO
        } else {
            sent_at.duration_since(now)
        };
        // The first read's limit counts from the write, every later one from its start.
        let read_limit = clock::after(sent_at, t.first_byte.0).min(deadline);
        // Flushed: over TLS a write may leave records in the session until then.
        let write = async {
            upstream.write_all(&request.upstream_head).await?;
            upstream.flush().await
        };
        match tokio::time::timeout_at(read_limit.into(), write).await {
            Ok(Ok(())) => {}
            // A pooled connection the upstream had closed: not the endpoint's fault.
            Ok(Err(_)) if reused => {
                stale_seen = true;
                now = Instant::now();
                continue;
            }
            Ok(Err(_)) => return Err(Failed::new(FailureKind::Error, 502, retry)),
            Err(_) => return Err(Failed::new(FailureKind::Timeout, 504, retry)),
        }
        buf.clear();
        match read_head(
            &mut upstream,
            request,
            t.first_byte.0,
            read_limit,
            deadline,
            buf,
        )
        .await
        {
            Ok(head) => {
                return Ok(Exchanged {
                    upstream,
                    head,
                    sent_at,
                    connect,
                })
            }
            Err(HeadError::Closed) if reused => {
                stale_seen = true;
                now = Instant::now();
            }
            Err(HeadError::Closed) => return Err(Failed::new(FailureKind::Error, 502, retry)),
            Err(HeadError::Timeout) => return Err(Failed::new(FailureKind::Timeout, 504, retry)),
            Err(HeadError::Malformed) => return Err(Failed::new(FailureKind::Error, 502, false)),
        }
    }
}

/// Connects to endpoint `idx` of `pool` by `limit`: TCP, then TLS when the pool has it
/// (a handshake that fails is a connect failure, its reason noted for /status).
pub(crate) async fn connect(pool: &PoolRt, idx: usize, limit: Instant) -> Result<Upstream, Failed> {
    let endpoint = &pool.endpoints[idx];
    let tcp = match tokio::time::timeout_at(limit.into(), TcpStream::connect(endpoint.addr)).await {
        Ok(Ok(s)) => {
            // Best effort: a socket without it still works, only slower.
            let _ = s.set_nodelay(true);
            s
        }
        Ok(Err(_)) => return Err(Failed::new(FailureKind::Connect, 502, true)),
        Err(_) => return Err(Failed::new(FailureKind::Connect, 504, true)),
    };
    let Some(tls) = &pool.peer.tls else {
        return Ok(Upstream::Tcp(tcp));
    };
    let failed = |reason: String| {
        tracing::warn!(pool = %pool.name, endpoint = %endpoint.id, "TLS to the endpoint failed: {reason}");
        endpoint
            .state
            .note_error(crate::health::now_ms(), format!("connecting: {reason}"));
        Failed::new(FailureKind::Connect, 502, true)
    };
    match tokio::time::timeout_at(limit.into(), tls.handshake(tcp, &endpoint.id)).await {
        Ok(Ok(s)) => Ok(Upstream::Tls(Box::new(s))),
        Ok(Err(e)) => {
            let floor = if tls.min_version == rampart_config::TlsVersion::Tls13 {
                " (the pool accepts TLS 1.3 only: tls.min_version)"
            } else {
                ""
            };
            Err(failed(format!("TLS handshake: {e}{floor}")))
        }
        Err(_) => Err(Failed::new(FailureKind::Connect, 504, true)),
    }
}

/// Why no response head was read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum HeadError {
    /// The upstream closed (or reset) before sending a byte of it.
    Closed,
    /// It did not arrive in time.
    Timeout,
    /// It was malformed, ambiguous or too large (or closed half-way).
    Malformed,
}

/// Reads a final response head into `buf`: the first read by `first_limit`, each
/// later one within `pause` (and all by `deadline`).
async fn read_head(
    upstream: &mut Upstream,
    request: &Prepared,
    pause: std::time::Duration,
    first_limit: Instant,
    deadline: Instant,
    buf: &mut Vec<u8>,
) -> Result<FinalHead, HeadError> {
    let mut limit = first_limit;
    loop {
        if buf.len() == buf.capacity() {
            if buf.len() >= MAX_RESPONSE_HEAD {
                return Err(HeadError::Malformed);
            }
            buf.reserve(UPSTREAM_BUFFER);
        }
        match tokio::time::timeout_at(limit.into(), upstream.read_buf(buf)).await {
            Ok(Ok(0) | Err(_)) if buf.is_empty() => return Err(HeadError::Closed),
            Ok(Ok(0) | Err(_)) => return Err(HeadError::Malformed),
            Ok(Ok(_)) => {}
            Err(_) => return Err(HeadError::Timeout),
        }
        loop {
            match parse_response(buf, request.head_request) {
                Ok(Some(ResponseHead::Interim(len))) => {
                    buf.drain(..len);
                }
                Ok(Some(ResponseHead::Final(head))) => return Ok(head),
                Ok(None) => break,
                Err(MalformedResponse) => return Err(HeadError::Malformed),
            }
        }
        // Only part of the head: the next read gets a pause of its own.
        limit = clock::after(Instant::now(), pause).min(deadline);
    }
}

/// The response body's way from the upstream to the client.
struct Relay<'a> {
    /// The `Set-Cookie` values the proxy adds to the response.
    cookies: [Option<HeaderValue>; 2],
    request: &'a Prepared,
    generation: &'a Generation,
    pool: &'a PoolRt,
    idx: usize,
    deadline: Instant,
    head_at: Instant,
    /// From the request written to the response head.
    ttfb: Duration,
    /// The connect.
    connect: Duration,
    /// The client connection closes after this response.
    close: bool,
}

impl Relay<'_> {
    /// Sends the head with what has arrived of the body, then streams the rest as it
    /// is framed; returns the upstream connection to the idle pool when the body ended
    /// cleanly.
    async fn run<D: Downstream>(self, client: &mut D, ex: Exchanged, mut buf: Vec<u8>) -> Attempt {
        let Exchanged {
            mut upstream,
            mut head,
            ..
        } = ex;
        head.cookies = self.cookies;
        let endpoint = &self.pool.endpoints[self.idx];
        let close = self.close || head.body == Body::UntilClose;
        take_ready_body(&mut upstream, &mut buf, &head);
        let mut framing = Framing::new(head.body);
        let mut payload = Vec::new();
        let first = &buf[head.len..];
        let (used, body) = framing.pass(first, &mut payload, D::PAYLOAD);
        let mut clean = used == first.len() && framing.valid;
        let raw_head = &buf[..head.len];
        let done = framing.done();
        let mut sent = body.len() as u64;
        let mut client_ok = client
            .head(
                raw_head,
                &head,
                self.request,
                self.generation,
                close,
                body,
                done,
            )
            .await;
        let streamed = !framing.done();
        while client_ok && clean && !framing.done() {
            if Instant::now() >= self.deadline || endpoint.state.drained(self.pool.drain_timeout) {
                clean = false;
                break;
            }
            buf.clear();
            let pause = self.pool.timeouts.first_byte.0;
            match tokio::time::timeout(pause, upstream.read_buf(&mut buf)).await {
                Ok(Ok(0)) if framing.body == Body::UntilClose => {
                    framing.finished = true;
                    client_ok = client.body(&[], true).await;
                    break;
                }
                Ok(Ok(n)) if n > 0 => {
                    let (used, body) = framing.pass(&buf, &mut payload, D::PAYLOAD);
                    clean = used == buf.len() && framing.valid;
                    sent += body.len() as u64;
                    client_ok = client.body(body, framing.done()).await;
                }
                _ => clean = false,
            }
        }
        let complete = framing.done() && clean;
        if complete && head.upstream_reusable {
            let idle_since = if streamed {
                Instant::now()
            } else {
                self.head_at
            };
            IdlePool::put(
                endpoint.addr,
                self.pool.peer.reuse_key(),
                upstream,
                self.pool.timeouts.idle.0,
                idle_since,
            );
        }
        Attempt::Done(Relayed {
            status: head.status,
            body_bytes: sent,
            ttfb: self.ttfb,
            connect: self.connect,
            keep_alive: client_ok && complete && !close,
        })
    }
}

/// Reads what has already arrived of a response body that fits in [`COALESCE_LIMIT`],
/// without waiting, so that the client gets the head and the body in one write (one
/// system call and one packet instead of one per upstream read).
fn take_ready_body(upstream: &mut Upstream, buf: &mut Vec<u8>, head: &FinalHead) {
    let Body::Length(n) = head.body else { return };
    let total = (head.len as u64).saturating_add(n);
    if total > COALESCE_LIMIT as u64 {
        return;
    }
    // `total` fits in usize: it is at most COALESCE_LIMIT.
    let total = total as usize;
    if buf.len() < total {
        buf.reserve(total - buf.len());
    }
    while buf.len() < total {
        match upstream.try_read_buf(buf) {
            Ok(n) if n > 0 => {}
            // Nothing more yet, the end of the stream or an error: the body loop sees it.
            _ => break,
        }
    }
}

/// How a response body is delimited.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Body {
    /// No body (HEAD, 204, 304).
    Empty,
    /// Content-Length.
    Length(u64),
    /// Transfer-Encoding ending in chunked.
    Chunked,
    /// Read until the upstream closes (the client connection closes too).
    UntilClose,
}

/// A parsed upstream response head.
#[derive(Debug)]
pub(crate) struct FinalHead {
    pub(crate) status: u16,
    /// Bytes of the head in the buffer.
    len: usize,
    body: Body,
    /// The upstream connection can carry another request once the body is read.
    upstream_reusable: bool,
    /// `Set-Cookie` values the proxy adds: a split's choice of pool, a sticky
    /// pool's endpoint.
    pub(crate) cookies: [Option<HeaderValue>; 2],
}

/// A response head that is malformed or ambiguous (an upgrade not asked for,
/// Content-Length with Transfer-Encoding, conflicting lengths).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("malformed or ambiguous upstream response head")]
pub(crate) struct MalformedResponse;

pub(crate) enum ResponseHead {
    /// A 1xx response (not 101) of this many bytes, which the client never asked for.
    Interim(usize),
    Final(FinalHead),
}

/// Parses an upstream response head: `Ok(None)` while incomplete, `Err` when it is
/// malformed or ambiguous (an upgrade that was not asked for, Content-Length with
/// Transfer-Encoding, conflicting lengths).
pub(crate) fn parse_response(
    buf: &[u8],
    head_request: bool,
) -> Result<Option<ResponseHead>, MalformedResponse> {
    let mut raw_headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut raw_headers);
    let len = match resp.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(_) => return Err(MalformedResponse),
    };
    let status = resp.code.ok_or(MalformedResponse)?;
    if status == 101 {
        return Err(MalformedResponse);
    }
    if (100..200).contains(&status) {
        return Ok(Some(ResponseHead::Interim(len)));
    }
    let mut length: Option<u64> = None;
    let mut chunked: Option<bool> = None;
    let mut keep_alive = resp.version == Some(1);
    for h in resp.headers.iter() {
        if h.name.eq_ignore_ascii_case("content-length") {
            for part in tokens(h.value) {
                if !part.iter().all(u8::is_ascii_digit) {
                    return Err(MalformedResponse);
                }
                let n: u64 = std::str::from_utf8(part)
                    .map_err(|_| MalformedResponse)?
                    .parse()
                    .map_err(|_| MalformedResponse)?;
                if length.is_some_and(|l| l != n) {
                    return Err(MalformedResponse);
                }
                length = Some(n);
            }
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            // The last coding decides (several fields form one list).
            if let Some(last) = tokens(h.value).last() {
                chunked = Some(last.eq_ignore_ascii_case(b"chunked"));
            }
        } else if h.name.eq_ignore_ascii_case("connection")
            && tokens(h.value).any(|t| t.eq_ignore_ascii_case(b"close"))
        {
            keep_alive = false;
        }
    }
    let body = if head_request || status == 204 || status == 304 {
        Body::Empty
    } else {
        match (chunked, length) {
            (Some(_), Some(_)) => return Err(MalformedResponse),
            (Some(true), None) => Body::Chunked,
            (Some(false), None) | (None, None) => Body::UntilClose,
            (None, Some(n)) => Body::Length(n),
        }
    };
    Ok(Some(ResponseHead::Final(FinalHead {
        cookies: [None, None],
        status,
        len,
        body,
        upstream_reusable: keep_alive && body != Body::UntilClose,
    })))
}

/// Tracks where a response body ends as its bytes pass through.
#[derive(Debug)]
struct Framing {
    body: Body,
    left: u64,
    chunks: ChunkScanner,
    finished: bool,
    /// False once the chunked encoding was malformed.
    valid: bool,
}

impl Framing {
    fn new(body: Body) -> Self {
        Self {
            body,
            left: if let Body::Length(n) = body { n } else { 0 },
            chunks: ChunkScanner::default(),
            finished: matches!(body, Body::Empty | Body::Length(0)),
            valid: true,
        }
    }

    /// Takes the body bytes at the start of `bytes`; returns how many belong to it.
    fn feed(&mut self, bytes: &[u8]) -> usize {
        match self.body {
            Body::Empty => 0,
            Body::Length(_) => {
                let n = usize::try_from(self.left)
                    .unwrap_or(usize::MAX)
                    .min(bytes.len());
                self.left -= n as u64;
                self.finished = self.left == 0;
                n
            }
            Body::Chunked => match self.chunks.feed(bytes) {
                Ok(n) => {
                    self.finished = self.chunks.is_done();
                    n
                }
                Err(MalformedChunk) => {
                    self.valid = false;
                    0
                }
            },
            Body::UntilClose => bytes.len(),
        }
    }

    fn done(&self) -> bool {
        self.finished
    }

    /// Takes the body bytes at the start of `bytes` as [`Framing::feed`] does, and
    /// returns how many it took and what to send on: those bytes as framed, or with
    /// `payload` only the message's data (the chunk data of a chunked body).
    fn pass<'a>(
        &mut self,
        bytes: &'a [u8],
        payload: &'a mut Vec<u8>,
        decode: bool,
    ) -> (usize, &'a [u8]) {
        if !decode || self.body != Body::Chunked {
            let used = self.feed(bytes);
            return (used, &bytes[..used]);
        }
        payload.clear();
        match self
            .chunks
            .feed_with(bytes, |data| payload.extend_from_slice(data))
        {
            Ok(n) => {
                self.finished = self.chunks.is_done();
                (n, payload.as_slice())
            }
            Err(MalformedChunk) => {
                self.valid = false;
                (0, &[])
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn final_head(raw: &[u8], head_request: bool) -> FinalHead {
        match parse_response(raw, head_request) {
            Ok(Some(ResponseHead::Final(h))) => h,
            _ => panic!("not a final head"),
        }
    }

    #[test]
    fn response_framing_follows_rfc_9112() {
        let h = final_head(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n", false);
        assert_eq!((h.body, h.upstream_reusable), (Body::Length(5), true));
        let h = final_head(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n", true);
        assert_eq!(h.body, Body::Empty);
        let h = final_head(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
            false,
        );
        assert_eq!(h.body, Body::Chunked);
        let h = final_head(b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip\r\n\r\n", false);
        assert_eq!((h.body, h.upstream_reusable), (Body::UntilClose, false));
        let h = final_head(b"HTTP/1.1 200 OK\r\n\r\n", false);
        assert_eq!(h.body, Body::UntilClose);
        let h = final_head(b"HTTP/1.1 204 No Content\r\n\r\n", false);
        assert_eq!(h.body, Body::Empty);
        let h = final_head(
            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\n",
            false,
        );
        assert!(!h.upstream_reusable);
        let h = final_head(b"HTTP/1.0 200 OK\r\ncontent-length: 2\r\n\r\n", false);
        assert!(!h.upstream_reusable);
        let h = final_head(b"HTTP/1.1 200 OK\r\ncontent-length: 7, 7\r\n\r\n", false);
        assert_eq!(h.body, Body::Length(7));
        assert!(matches!(
            parse_response(
                b"HTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\nHTTP/1.1",
                false
            ),
            Ok(Some(ResponseHead::Interim(40)))
        ));
        assert!(matches!(
            parse_response(b"HTTP/1.1 200 OK\r\ncontent-le", false),
            Ok(None)
        ));
        for bad in [
            &b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\ntransfer-encoding: chunked\r\n\r\n"[..],
            b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\ncontent-length: 6\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ncontent-length: -1\r\n\r\n",
            b"HTTP/1.1 101 Switching Protocols\r\n\r\n",
            b"HTTP/1.1 abc\r\n\r\n",
        ] {
            assert!(
                parse_response(bad, false).is_err(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn framing_takes_only_the_bodys_bytes() {
        let mut f = Framing::new(Body::Length(4));
        assert_eq!(f.feed(b"ab"), 2);
        assert!(!f.done());
        assert_eq!(f.feed(b"cdEXTRA"), 2);
        assert!(f.done());
        let mut f = Framing::new(Body::Chunked);
        assert_eq!(f.feed(b"1\r\na\r\n0\r\n\r\nX"), 11);
        assert!(f.done() && f.valid);
        let mut f = Framing::new(Body::Chunked);
        assert_eq!(f.feed(b"zz"), 0);
        assert!(!f.valid);
    }
}
