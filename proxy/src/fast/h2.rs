//! The HTTP/2 fast path: a request without a body, or with a declared length of up to
//! 64 KiB (read whole first), is decided by the one request policy
//! ([`policy::decide`]) and answered or proxied by the same code as the HTTP/1 fast
//! path ([`h1`](crate::h1)): the same renderer of answers, the per-worker upstream
//! pool, one upstream head written at once. HTTP/2 framing (the codec, flow control,
//! stream acceptance and its checks) stays Pingora's and the `h2` crate's; only what
//! Pingora's proxy would do between the request head and the response is replaced.
//! A body of unknown length or over 64 KiB (gRPC calls, uploads) is passed on as it
//! arrives when the policy sends it to an HTTP/2 pool ([`mux`](super::mux)); to any
//! other pool Pingora's proxy carries it, with the decision.
//!
//! Why: with HTTP/2 clients, Pingora's request cycle spent 2.5× nginx's user-space CPU
//! per request (loadtest/README.md). `server.http2_fast_path = false` turns this off.

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue, CONTENT_LENGTH, COOKIE, HOST};
use pingora::http::ResponseHeader;
use pingora::protocols::http::v2::server::HttpSession;
use prometheus::IntCounter;

use super::mux::MuxRequest;
use super::{
    answer_request, body_failed, finish_upstream_head, forward_request, parse_length, push_header,
    request_line, BodyError, ConnInfo, Downstream, FinalHead, HopByHop, Prepared, MAX_BODY,
    MAX_HEADERS,
};
use crate::access::Arrival;
use crate::generation::Generation;
use crate::headers::{hop_by_hop, joined_cookies};
use crate::metrics::Metrics;
use crate::policy::{self, Answer, Forward, Verdict};

/// Serves the request of an HTTP/2 stream, or hands the stream back for Pingora (with
/// the decision, when one was made for a pool this path does not reach).
pub async fn serve(
    mut session: HttpSession,
    generation: Arc<Generation>,
    conn: ConnInfo<'_>,
) -> Option<(HttpSession, Option<Box<policy::Decision>>)> {
    let started = Instant::now();
    let Some(carried) = carried_body(&session) else {
        return Some((session, None));
    };
    session.set_write_timeout(Some(generation.config.limits.send_timeout.0));
    let req = session.req_header();
    let view = policy::Request {
        parts: req,
        raw_head: None,
        raw_target: req.raw_path(),
        body_ended: session.is_body_empty(),
    };
    let decision = policy::decide(&generation, view, conn.client()).await;
    if !super::reaches(&generation, &decision, true) || !carried.reaches(&decision, &generation) {
        return Some((session, Some(Box::new(decision))));
    }
    let (request_id, trace) = (decision.request_id, decision.trace);
    let plan = match decision.verdict {
        Verdict::Forward(plan) => plan,
        Verdict::Answer(answer) => {
            // Dropping the stream resets what the client still sends of a body.
            let req = session.req_header();
            let arrival = Arrival::of(&generation, req, conn.peer, decision.route, trace);
            let request =
                Prepared::answering(req, decision.route, request_id, false, (arrival, trace));
            let mut client = Http2Client {
                session: &mut session,
            };
            answer_request(&mut client, &answer, &request, &generation, conn, started).await;
            return None;
        }
    };
    // An HTTP/2 pool's request goes as a stream of its own (`mux`); the prepared
    // request then holds only the body.
    let mux = plan.pool(&generation).and_then(|pool| {
        pool.peer.fast_path_multiplexes().then(|| {
            let request = MuxRequest::new(&session, (&plan, pool), &generation, &request_id);
            match carried {
                Carried::Whole(_) => request,
                Carried::Streamed => request.map(MuxRequest::streaming_body),
            }
            .ok_or(Answer::Failed(502))
        })
    });
    let head = match mux {
        Some(_) => Vec::new(),
        None => upstream_head(session.req_header(), &plan, &generation, &request_id),
    };
    let req = session.req_header();
    let arrival = Arrival::of(&generation, req, conn.peer, Some(plan.route), trace);
    let mut request = Prepared::new(
        req,
        (&plan, &generation),
        request_id,
        head,
        (arrival, trace),
    )
    .with_body(carried.whole_len(), &[]);
    if carried == Carried::Streamed {
        // A body passed on as it arrives cannot be sent again: one try only, but
        // for a stream the upstream refused before any of it went.
        request.idempotent = false;
    }
    if request.body_missing > 0 {
        if let Err(e) = read_body(&mut session, &mut request, &generation, started).await {
            let mut client = Http2Client {
                session: &mut session,
            };
            body_failed(&mut client, e, &request, &generation, conn, started).await;
            return None;
        }
    }
    let mut client = Http2Client {
        session: &mut session,
    };
    let forwarded = (&request, &plan);
    match mux {
        None => {
            let way = &super::upstream::Http1;
            forward_request(&mut client, forwarded, &generation, conn, started, way).await;
        }
        Some(Ok(way)) => {
            forward_request(&mut client, forwarded, &generation, conn, started, &way).await;
        }
        Some(Err(answer)) => {
            answer_request(&mut client, &answer, &request, &generation, conn, started).await;
        }
    }
    // A response that did not end (the upstream failed mid-body) is reset when the
    // session is dropped: the client sees the stream fail, never a truncated success.
    None
}

/// How this path carries a stream's request body.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Carried {
    /// Read whole before the upstream request (a declared length of up to
    /// [`MAX_BODY`], or no body): any pool, and a retry sends it again.
    Whole(u64),
    /// Passed on as it arrives (a length unknown, as gRPC clients send, or over
    /// [`MAX_BODY`]): only to an HTTP/2 pool, as a stream of its own; the rest
    /// (HTTP/1 pools, a route that mirrors) is Pingora's, with the decision.
    Streamed,
}

impl Carried {
    /// The length of a body read whole (0 for one passed on as it arrives).
    fn whole_len(self) -> u64 {
        match self {
            Carried::Whole(len) => len,
            Carried::Streamed => 0,
        }
    }

    /// Whether this path carries the body to where `decision` sends it.
    fn reaches(self, decision: &policy::Decision, generation: &Generation) -> bool {
        match (&decision.verdict, self) {
            (Verdict::Forward(plan), Carried::Streamed) => {
                plan.mirror.is_none()
                    && plan
                        .pool(generation)
                        .is_some_and(|pool| pool.peer.fast_path_multiplexes())
            }
            _ => true,
        }
    }
}

/// How this path carries the request body, or `None` to leave the stream to Pingora
/// untouched (two `Content-Length` fields, or one that is not a number).
fn carried_body(session: &HttpSession) -> Option<Carried> {
    let req = session.req_header();
    let mut lengths = req.headers.get_all(CONTENT_LENGTH).iter();
    let declared = match (lengths.next(), lengths.next()) {
        (None, _) => None,
        (Some(length), None) => Some(parse_length(length.as_bytes())?),
        (Some(_), Some(_)) => return None,
    };
    if session.is_body_empty() {
        // A declared length with no DATA to come is the policy's to refuse.
        return Some(Carried::Whole(0));
    }
    Some(match declared {
        Some(n) if n <= MAX_BODY => Carried::Whole(n),
        _ => Carried::Streamed,
    })
}

/// Reads the request body from the stream into the upstream request, under
/// [`read_declared_body`]'s rules.
async fn read_body(
    session: &mut HttpSession,
    request: &mut Prepared,
    generation: &Generation,
    started: Instant,
) -> Result<(), BodyError> {
    let limits = &generation.config.limits;
    let declared = request.body_len;
    read_declared_body(declared, limits, started, session, |data| {
        request.upstream_head.extend_from_slice(data);
    })
    .await
}

/// Where a request body is read from: an HTTP/2 stream of the fast path, or Pingora's
/// session.
pub(crate) trait BodySource {
    /// The next piece of the body; `None` at its end.
    async fn next_body(&mut self) -> pingora::Result<Option<Bytes>>;
}

impl BodySource for HttpSession {
    async fn next_body(&mut self) -> pingora::Result<Option<Bytes>> {
        self.read_body_bytes().await
    }
}

impl BodySource for pingora::proxy::Session {
    async fn next_body(&mut self) -> pingora::Result<Option<Bytes>> {
        self.as_mut().read_request_body().await
    }
}

/// Reads an HTTP/2 request body of `declared` bytes whole, before anything is
/// forwarded (both the fast path and Pingora's path do, up to 64 KiB): each read
/// within `limits.body_read_timeout` ([`BodyError::Stalled`]), no slower than
/// `limits.min_body_rate` after that ([`BodyError::TooSlow`]), and exactly as long as
/// declared ([`BodyError::LengthMismatch`], RFC 9113 §8.1.1). A reset stream is
/// [`BodyError::ClientGone`].
pub(crate) async fn read_declared_body(
    declared: u64,
    limits: &rampart_config::Limits,
    started: Instant,
    source: &mut impl BodySource,
    mut keep: impl FnMut(&[u8]),
) -> Result<(), BodyError> {
    let mut received = 0u64;
    loop {
        match tokio::time::timeout(limits.body_read_timeout.0, source.next_body()).await {
            Ok(Ok(Some(data))) => {
                received += data.len() as u64;
                if received > declared {
                    return Err(BodyError::LengthMismatch);
                }
                keep(&data);
            }
            Ok(Ok(None)) if received == declared => return Ok(()),
            Ok(Ok(None)) => return Err(BodyError::LengthMismatch),
            Ok(Err(_)) => return Err(BodyError::ClientGone),
            Err(_) => return Err(BodyError::Stalled),
        }
        let slow = crate::limits::body_too_slow(
            received,
            started.elapsed(),
            limits.body_read_timeout.0,
            limits.min_body_rate.0,
        );
        if slow {
            return Err(BodyError::TooSlow);
        }
    }
}

/// The HTTP/1.1 request head sent upstream for an HTTP/2 request under `plan`: its
/// method and path (or the plan's target), `Host` from the plan, the headers without
/// hop-by-hop ones, cookies as one field (RFC 9113 §8.2.3), and the forwarding headers
/// and request id.
fn upstream_head(
    req: &pingora::http::RequestHeader,
    plan: &Forward,
    generation: &Generation,
    request_id: &HeaderValue,
) -> Vec<u8> {
    let headers = &req.headers;
    let id_name = &generation.forwarding.request_id;
    let hop = hop_by_hop(headers, false);
    let mut out = request_line(req.method.as_str(), req.raw_path(), plan);
    let edits = &generation.routes[plan.route].request_headers;
    if !edits.drops("host") {
        // Spelt as Pingora's path spells it.
        push_header(&mut out, b"Host", plan.host.as_bytes());
    }
    for (name, value) in headers {
        if name == HOST
            || name == COOKIE
            || hop.contains(name)
            || !generation.passes_header(plan, name.as_str())
        {
            continue;
        }
        push_header(&mut out, name.as_str().as_bytes(), value.as_bytes());
    }
    if let Some(cookies) = joined_cookies(headers).filter(|_| !edits.drops("cookie")) {
        push_header(&mut out, b"cookie", &cookies);
    }
    finish_upstream_head(&mut out, plan, edits, (id_name, request_id));
    out
}

/// An HTTP/2 stream: the response goes out as a HEADERS frame and DATA frames.
pub(crate) struct Http2Client<'a> {
    session: &'a mut HttpSession,
}

impl Http2Client<'_> {
    /// The client's stream (its request head).
    pub(crate) fn session(&self) -> &HttpSession {
        self.session
    }

    /// The client's stream, to read its body from (and take its response's writer).
    pub(crate) fn session_mut(&mut self) -> &mut HttpSession {
        self.session
    }

    /// Sends `header` and then `body`, ending the stream with the last frame when `end`.
    pub(crate) async fn send(&mut self, header: ResponseHeader, body: &[u8], end: bool) -> bool {
        let header_ends = end && body.is_empty();
        if self
            .session
            .write_response_header(Box::new(header), header_ends)
            .is_err()
        {
            return false;
        }
        header_ends || self.body(body, end).await
    }
}

impl Downstream for Http2Client<'_> {
    const PAYLOAD: bool = true;

    fn counter(metrics: &Metrics) -> &IntCounter {
        &metrics.http2_fast_path_requests
    }

    async fn head(
        &mut self,
        raw: &[u8],
        head: &FinalHead,
        request: &Prepared,
        generation: &Generation,
        _close: bool,
        body: &[u8],
        end: bool,
    ) -> bool {
        let Some(header) = response_header(raw, head, request, generation) else {
            return false;
        };
        self.send(header, body, end).await
    }

    async fn body(&mut self, bytes: &[u8], end: bool) -> bool {
        if bytes.is_empty() && !end {
            return true;
        }
        self.session
            .write_body(Bytes::copy_from_slice(bytes), end)
            .await
            .is_ok()
    }

    async fn answer(
        &mut self,
        answer: &Answer,
        request: &Prepared,
        generation: &Generation,
        _close: bool,
    ) -> bool {
        let id = policy::id_header(generation, &request.request_id);
        let pages = request.pages(generation);
        let Ok((header, body)) = answer.response_header(Some(id), request.style, pages) else {
            return false;
        };
        let body = if request.head_request {
            Bytes::new()
        } else {
            body
        };
        self.send(header, &body, true).await
    }
}

/// The response head for an HTTP/2 client from an HTTP/2 upstream's `parts`, kept
/// as they are (names parsed once, by `h2`) but for the fields
/// [`response_header_from`] changes: the route's `response_headers` edits, the proxy's
/// `cookies` and the request id.
pub(crate) fn response_header_of(
    parts: http::response::Parts,
    cookies: &[Option<HeaderValue>; 2],
    request: &Prepared,
    generation: &Generation,
) -> Option<ResponseHeader> {
    // The upstream's own request id is replaced by the proxy's (inserted last).
    let mut header = ResponseHeader::from(parts);
    if let Some(edits) = request.response_edits(generation) {
        for name in &edits.remove {
            header.remove_header(name);
        }
        for (name, _) in &edits.set {
            header.remove_header(name);
        }
    }
    finish_response_header(header, cookies, request, generation)
}

/// The response head for an HTTP/2 client from an HTTP/1 upstream's: its status and
/// headers without hop-by-hop ones (HTTP/2 has no connection-specific fields).
/// `None` when the upstream sent a header that cannot be represented.
fn response_header(
    raw: &[u8],
    head: &FinalHead,
    request: &Prepared,
    generation: &Generation,
) -> Option<ResponseHeader> {
    let mut raw_headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut raw_headers);
    // Parsed before: cannot fail.
    let _ = resp.parse(raw);
    let hop = HopByHop::of(resp.headers);
    let headers = resp
        .headers
        .iter()
        .filter(|h| !hop.contains(h.name))
        .map(|h| (h.name, h.value));
    response_header_from(head.status, headers, &head.cookies, request, generation)
}

/// The response head for an HTTP/2 client: `status` and the upstream's `headers`
/// (connection-specific ones already left out) without those the route's
/// `response_headers` remove, with the ones it sets, the proxy's `cookies` and the
/// request id. `None` when a header cannot be represented.
fn response_header_from<'h>(
    status: u16,
    headers: impl Iterator<Item = (&'h str, &'h [u8])>,
    cookies: &[Option<HeaderValue>; 2],
    request: &Prepared,
    generation: &Generation,
) -> Option<ResponseHeader> {
    let id_name = &generation.forwarding.request_id;
    let none = crate::headers::HeaderEdits::default();
    let edits = request.response_edits(generation).unwrap_or(&none);
    let len = headers.size_hint().0;
    let mut header = ResponseHeader::build(status, Some(len + edits.set.len() + 4)).ok()?;
    for (name, value) in headers {
        if id_name.as_str().eq_ignore_ascii_case(name) || edits.drops(name) {
            continue;
        }
        let name = HeaderName::from_bytes(name.as_bytes()).ok()?;
        let value = HeaderValue::from_bytes(value).ok()?;
        header.append_header(name, value).ok()?;
    }
    finish_response_header(header, cookies, request, generation)
}

/// What every response head for an HTTP/2 client ends with, after the upstream's own
/// fields: the route's `response_headers` set ones, the proxy's `cookies`, the request
/// id.
fn finish_response_header(
    mut header: ResponseHeader,
    cookies: &[Option<HeaderValue>; 2],
    request: &Prepared,
    generation: &Generation,
) -> Option<ResponseHeader> {
    if let Some(edits) = request.response_edits(generation) {
        for (name, value) in &edits.set {
            header.append_header(name.clone(), value.clone()).ok()?;
        }
    }
    for cookie in cookies.iter().flatten() {
        header
            .append_header(http::header::SET_COOKIE, cookie.clone())
            .ok()?;
    }
    let id_name = &generation.forwarding.request_id;
    header
        .insert_header(id_name.clone(), request.request_id.clone())
        .ok()?;
    Some(header)
}
