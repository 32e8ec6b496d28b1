//! The fast paths: the common request carried by Rampart itself rather than by
//! Pingora's proxy session, for less CPU per request (loadtest/README.md, "the
//! data-path question"). What happens to a request is decided by the one request
//! policy ([`crate::policy::decide`]) that Pingora's path calls too; the fast paths only
//! move bytes. A request a fast path cannot carry (chunked or large bodies, `Expect`,
//! upgrades, HTTP/1.0, an incomplete first read) is declined before the policy runs
//! and goes to Pingora, so no decision is ever made twice.
//!
//! - [`h1`]: the HTTP/1 transport (parsing a head, the upstream head, the client).
//! - [`h2`]: the HTTP/2 transport over Pingora's HTTP/2 session.
//! - [`upstream`]: the upstream attempt shared by both: balancer pick, pooled
//!   connection, send, response head, body streamed through, retries, passive health.
//! - [`mux`]: the HTTP/2 transport's attempt on an HTTP/2 pool (a stream of a shared
//!   upstream connection), in the same retry loop.
//! - [`chunked`]: where a chunked body ends. [`pool`]: idle upstream connections.
//!
//! This module: what the transports share — the request once decided ([`Prepared`]),
//! where a response goes ([`Downstream`]), answering and counting.

pub mod chunked;
pub(crate) mod conn;
pub mod h1;
pub mod h2;
pub(crate) mod mux;
pub mod pool;
pub mod upstream;

use std::net::IpAddr;
use std::time::Instant;

use bytes::BytesMut;
use http::header::{HeaderName, HeaderValue};
use http::Method;
use prometheus::IntCounter;
use rampart_config::Limits;

use self::upstream::{forward, FinalHead};
use crate::access::{self, Arrival, Outcome};
use crate::edge::Scheme;
use crate::generation::Generation;
use crate::headers::{tokens, HeaderEdits, HOP_BY_HOP, PROTECTED};
use crate::limits::body_too_slow;
use crate::metrics::Metrics;
use crate::policy::{Answer, Client, Forward, Style};

/// Most headers parsed in a request or response head; more go to Pingora (requests)
/// or count as a bad upstream response.
pub(crate) const MAX_HEADERS: usize = 100;

/// Largest request body the fast path takes (read whole before the upstream request is
/// sent, so that a retry can send it again); larger ones go to Pingora, which streams.
pub(crate) const MAX_BODY: u64 = 64 * 1024;

/// What the fast path did with a request.
#[derive(Debug)]
pub enum Served {
    /// Answered; the connection can carry the next request.
    KeepAlive,
    /// Answered or failed; the connection closes.
    Close,
    /// Not for this path: Pingora serves it, starting from these bytes, with the
    /// decision when one was made (a pool the fast path does not reach).
    Pingora(BytesMut, Option<Box<crate::policy::Decision>>),
}

/// What a request needs to know about its connection.
#[derive(Clone, Copy, Debug)]
pub struct ConnInfo<'a> {
    /// The listener's scheme.
    pub scheme: Scheme,
    /// The client's address.
    pub peer: Option<IpAddr>,
    /// Process metrics.
    pub metrics: &'a Metrics,
    /// The listener is shutting down: answer with `Connection: close`.
    pub closing: bool,
    /// The connection's TLS parameters (HTTPS), for the access log.
    pub tls: Option<&'a crate::tls::conn::TlsInfo>,
}

impl<'a> ConnInfo<'a> {
    /// The client as the policy sees it.
    pub(crate) fn client(&self) -> Client<'a> {
        Client {
            scheme: self.scheme,
            peer: self.peer,
            tls: self.tls,
        }
    }
}

/// Whether a fast path carries out `decision`: an answer, or a forward to a pool it
/// reaches on a route whose responses it passes as they come (no `compress`); the rest
/// is Pingora's. Both reach HTTP/1.1 pools, in cleartext or over TLS, without a PROXY
/// header; the HTTP/2 one (`multiplexing`) reaches `h2` and `h2c` pools too.
pub(crate) fn reaches(
    generation: &Generation,
    decision: &crate::policy::Decision,
    multiplexing: bool,
) -> bool {
    match &decision.verdict {
        crate::policy::Verdict::Forward(plan) => {
            generation.routes[plan.route].compress.is_none()
                && plan.pool(generation).is_none_or(|pool| {
                    pool.peer.fast_path_carries()
                        || (multiplexing && pool.peer.fast_path_multiplexes())
                })
        }
        crate::policy::Verdict::Answer(_) => true,
    }
}

/// Why a request's body could not be read from the client.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum BodyError {
    /// The client closed the connection or reset the stream: nothing to answer.
    ClientGone,
    /// A read took longer than `limits.body_read_timeout`: 400.
    Stalled,
    /// The body came slower than `limits.min_body_rate`: 408.
    TooSlow,
    /// An HTTP/2 body longer or shorter than its Content-Length (RFC 9113 §8.1.1): 400.
    LengthMismatch,
    /// A body of unknown length passed the route's `max_body_bytes`: 413.
    TooLarge,
}

impl BodyError {
    /// The answer to the client, if it is still there.
    pub(crate) fn answer(self) -> Option<Answer> {
        match self {
            BodyError::ClientGone => None,
            BodyError::Stalled => Some(Answer::Failed(400)),
            BodyError::TooSlow => Some(Answer::Failed(408)),
            BodyError::LengthMismatch => Some(Answer::Refused(
                crate::limits::Rejection::BodyLengthMismatch,
            )),
            BodyError::TooLarge => Some(Answer::Refused(crate::limits::Rejection::BodyTooLarge)),
        }
    }

    /// The access log's error kind of a request that failed this way.
    pub(crate) fn kind(self) -> &'static str {
        self.answer()
            .as_ref()
            .and_then(access::error_kind)
            .unwrap_or("client_closed")
    }
}

/// Answers a request whose body could not be read (nothing when the client went
/// away) and counts it as the full path counts it.
pub(crate) async fn body_failed<D: Downstream>(
    client: &mut D,
    error: BodyError,
    request: &Prepared,
    generation: &Generation,
    conn: ConnInfo<'_>,
    started: Instant,
) {
    let (status, error) = answer_body_failure(client, error, request, generation).await;
    let outcome = Outcome {
        status,
        error,
        ..request.outcome(conn)
    };
    finish(conn, generation, request, &outcome, started);
}

/// Answers a request whose body could not be read (nothing when the client went
/// away): the status and error kind the request ends with.
pub(crate) async fn answer_body_failure<D: Downstream>(
    client: &mut D,
    error: BodyError,
    request: &Prepared,
    generation: &Generation,
) -> (u16, Option<&'static str>) {
    let status = match error.answer() {
        Some(answer) => {
            client.answer(&answer, request, generation, true).await;
            answer.status()
        }
        None => 0,
    };
    (status, Some(error.kind()))
}

/// Writes the policy's answer to `request` and counts it. Returns whether the client
/// connection can carry another request.
pub(crate) async fn answer_request<D: Downstream>(
    client: &mut D,
    answer: &Answer,
    request: &Prepared,
    generation: &Generation,
    conn: ConnInfo<'_>,
    started: Instant,
) -> bool {
    let close = request.client_close || answer.closes();
    let sent = client.answer(answer, request, generation, close).await;
    conn.metrics.count_answer(
        answer,
        request.route.map(|r| generation.routes[r].name.as_str()),
    );
    D::counter(conn.metrics).inc();
    let outcome = Outcome {
        status: answer.status(),
        error: access::error_kind(answer),
        // Rendered again only when the request is logged.
        bytes_sent: request.arrival.as_ref().map(|_| {
            answer.body_len(
                request.head_request,
                request.style,
                Some(&request.request_id),
                request.pages(generation),
            )
        }),
        ..request.outcome(conn)
    };
    finish(conn, generation, request, &outcome, started);
    sent && !close
}

/// Ends a request the fast path served (see [`access::finish`]).
fn finish(
    conn: ConnInfo<'_>,
    generation: &Generation,
    request: &Prepared,
    outcome: &Outcome<'_>,
    started: Instant,
) {
    access::finish(
        generation,
        conn.metrics,
        conn.scheme,
        conn.peer,
        request.arrival.as_deref(),
        outcome,
        started,
    );
}

/// Where the fast path sends a response: an HTTP/1 connection (the upstream's bytes as
/// framed) or an HTTP/2 stream (head and data frames, see [`h2`]).
pub(crate) trait Downstream {
    /// Body bytes are passed decoded (the payload, without chunked framing) rather than
    /// as the upstream framed them.
    const PAYLOAD: bool;

    /// The counter of requests this kind of downstream served on the fast path.
    fn counter(metrics: &Metrics) -> &IntCounter;

    /// Sends the response head `raw` (parsed as `head`) with the first body bytes;
    /// `end` when they complete the body. False when the client cannot be written to.
    #[allow(clippy::too_many_arguments)]
    async fn head(
        &mut self,
        raw: &[u8],
        head: &FinalHead,
        request: &Prepared,
        generation: &Generation,
        close: bool,
        body: &[u8],
        end: bool,
    ) -> bool;

    /// Sends more body bytes; `end` when they complete it.
    async fn body(&mut self, bytes: &[u8], end: bool) -> bool;

    /// Sends an answer of the proxy's own, rendered by [`Answer`].
    async fn answer(
        &mut self,
        answer: &Answer,
        request: &Prepared,
        generation: &Generation,
        close: bool,
    ) -> bool;
}

/// Forwards a prepared request on `client` under `plan` and counts it. Returns whether
/// the client connection can carry another request.
pub(crate) async fn forward_request<D: Downstream>(
    client: &mut D,
    (request, plan): (&Prepared, &Forward),
    generation: &Generation,
    conn: ConnInfo<'_>,
    started: Instant,
    way: &impl upstream::Attempter<D>,
) -> bool {
    let done = forward(client, request, plan, generation, conn, started, way).await;
    D::counter(conn.metrics).inc();
    let pool = plan.pool(generation).map(AsRef::as_ref);
    let outcome = Outcome {
        status: done.status,
        upstream: pool.zip(done.endpoint),
        pool,
        upstream_status: done.relayed.map(|r| r.status),
        upstream_connect: done.relayed.map(|r| r.connect),
        upstream_ttfb: done.relayed.map(|r| r.ttfb),
        attempts: done.attempts,
        error: done.error,
        bytes_sent: done.relayed.map(|r| r.body_bytes),
        attempt_spans: &done.attempt_spans,
        ..request.outcome(conn)
    };
    finish(conn, generation, request, &outcome, started);
    done.keep_alive
}

/// A request the fast path serves, with everything it needs after the policy decided.
pub(crate) struct Prepared {
    /// The route that matched, if one did.
    pub(crate) route: Option<usize>,
    pub(crate) request_id: HeaderValue,
    /// The upstream request head, ready to write (empty for an answered request).
    pub(crate) upstream_head: Vec<u8>,
    pub(crate) head_request: bool,
    pub(crate) idempotent: bool,
    /// The connection closes after this request (the client asked, or the answer
    /// leaves a body unread).
    pub(crate) client_close: bool,
    /// The request body's length (Content-Length).
    pub(crate) body_len: u64,
    /// Bytes of the body still to be read from the client (the rest follows the head in
    /// `upstream_head`).
    pub(crate) body_missing: usize,
    /// What the access log (or a span) takes of the request, when it does.
    pub(crate) arrival: Option<Box<Arrival>>,
    /// The request's trace.
    pub(crate) trace: Option<crate::policy::Trace>,
    /// The form of an error answer (gRPC by `Content-Type`, else by `Accept`).
    pub(crate) style: Style,
    /// The error pages of the plan's pool, when it has its own.
    pub(crate) pool_pages: Option<std::sync::Arc<crate::policy::pages::ErrorPagesRt>>,
}

impl Prepared {
    /// A request forwarded under `plan`, with its upstream head.
    pub(crate) fn new(
        parts: &http::request::Parts,
        (plan, generation): (&Forward, &Generation),
        request_id: HeaderValue,
        upstream_head: Vec<u8>,
        (arrival, trace): (Option<Box<Arrival>>, Option<crate::policy::Trace>),
    ) -> Self {
        Self {
            upstream_head,
            pool_pages: plan.pool(generation).and_then(|p| p.error_pages.clone()),
            ..Self::answering(parts, Some(plan.route), request_id, false, (arrival, trace))
        }
    }

    /// A request the policy answers.
    pub(crate) fn answering(
        parts: &http::request::Parts,
        route: Option<usize>,
        request_id: HeaderValue,
        close: bool,
        (arrival, trace): (Option<Box<Arrival>>, Option<crate::policy::Trace>),
    ) -> Self {
        Self {
            route,
            request_id,
            upstream_head: Vec::new(),
            head_request: parts.method == Method::HEAD,
            idempotent: parts.method.is_idempotent(),
            client_close: close,
            body_len: 0,
            body_missing: 0,
            arrival,
            trace,
            style: Style::of(&parts.headers),
            pool_pages: None,
        }
    }

    /// Whether a span of this request is exported (its attempts are then recorded).
    pub(crate) fn traced(&self) -> bool {
        self.arrival.as_ref().is_some_and(|a| a.traced)
    }

    /// What every outcome of this request shares.
    fn outcome<'a>(&'a self, conn: ConnInfo<'a>) -> Outcome<'a> {
        Outcome {
            route: self.route,
            request_id: Some(self.request_id.as_bytes()),
            fast_path: true,
            tls: conn.tls,
            trace: self.trace,
            ..Outcome::default()
        }
    }

    /// The request has a body of `len` bytes, of which `early` came with the head.
    pub(crate) fn with_body(mut self, len: u64, early: &[u8]) -> Self {
        self.upstream_head.extend_from_slice(early);
        self.body_len = len;
        // At most MAX_BODY: fits in usize.
        self.body_missing = (len - early.len() as u64) as usize;
        self
    }

    /// The body read so far arrives slower than `limits.min_body_rate` allows.
    pub(crate) fn body_too_slow(&self, limits: &Limits, started: Instant) -> bool {
        let received = self.body_len - self.body_missing as u64;
        body_too_slow(
            received,
            started.elapsed(),
            limits.body_read_timeout.0,
            limits.min_body_rate.0,
        )
    }

    /// The error pages of this request's answers: the route's, the pool's or the
    /// global ones.
    pub(crate) fn pages<'g>(
        &'g self,
        generation: &'g Generation,
    ) -> Option<&'g crate::policy::pages::ErrorPagesRt> {
        generation.pages(self.route, self.pool_pages.as_deref())
    }

    /// The route's response header rules.
    pub(crate) fn response_edits<'g>(&self, generation: &'g Generation) -> Option<&'g HeaderEdits> {
        self.route.map(|r| &generation.routes[r].response_headers)
    }
}

/// A Content-Length value: digits only, at most 18 of them.
pub(crate) fn parse_length(value: &[u8]) -> Option<u64> {
    let value = value.trim_ascii();
    if value.is_empty() || value.len() > 18 || !value.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(value).ok()?.parse().ok()
}

/// The hop-by-hop headers of one message: the fixed list of `headers` plus every
/// header its `Connection` fields name — except the fields the proxy relies on
/// (Host, Content-Length, Transfer-Encoding), which `Connection` cannot remove.
pub(crate) struct HopByHop<'a> {
    named: Vec<&'a [u8]>,
}

impl<'a> HopByHop<'a> {
    pub(crate) fn of(headers: &[httparse::Header<'a>]) -> Self {
        let named = headers
            .iter()
            .filter(|h| h.name.eq_ignore_ascii_case("connection"))
            .flat_map(|h| tokens(h.value))
            .collect();
        Self { named }
    }

    pub(crate) fn contains(&self, name: &str) -> bool {
        HOP_BY_HOP.iter().any(|h| name.eq_ignore_ascii_case(h))
            || (self
                .named
                .iter()
                .any(|t| t.eq_ignore_ascii_case(name.as_bytes()))
                && !PROTECTED.iter().any(|p| name.eq_ignore_ascii_case(p)))
    }
}

/// The start of an upstream request head: `METHOD target HTTP/1.1`, the target being
/// the plan's when it has one, else the client's `raw` one.
pub(crate) fn request_line(method: &str, raw: &[u8], plan: &Forward) -> Vec<u8> {
    let mut out = Vec::with_capacity(512);
    out.extend_from_slice(method.as_bytes());
    out.push(b' ');
    match &plan.target {
        Some(target) => out.extend_from_slice(target.as_bytes()),
        None => out.extend_from_slice(raw),
    }
    out.extend_from_slice(b" HTTP/1.1\r\n");
    out
}

/// The end of an upstream request head, after the client's own headers: the
/// [`added_headers`] and the blank line.
pub(crate) fn finish_upstream_head(
    out: &mut Vec<u8>,
    plan: &Forward,
    edits: &HeaderEdits,
    id: (&HeaderName, &HeaderValue),
) {
    for (name, value) in added_headers(plan, edits, id) {
        push_header(out, name.as_str().as_bytes(), value);
    }
    out.extend_from_slice(b"\r\n");
}

/// The headers the proxy adds to an upstream request under `plan`, after the client's
/// own, on every transport: the forwarding headers the route's rules keep, the rules'
/// own headers, and the request id (`id`: its header's name and value).
pub(crate) fn added_headers<'a>(
    plan: &'a Forward,
    edits: &'a HeaderEdits,
    id: (&'a HeaderName, &'a HeaderValue),
) -> impl Iterator<Item = (&'a HeaderName, &'a [u8])> {
    let forwarded = plan
        .forwarded
        .iter()
        .filter(|(name, _)| !edits.drops(name.as_str()))
        .map(|(name, value)| (name, value.as_bytes()));
    let set = edits
        .set
        .iter()
        .map(|(name, value)| (name, value.as_bytes()));
    forwarded
        .chain(set)
        .chain(std::iter::once((id.0, id.1.as_bytes())))
}

pub(crate) fn push_header(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}
