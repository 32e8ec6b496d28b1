//! The HTTP/1 fast path: the common request — HTTP/1.1, no body or a Content-Length
//! body of up to 64 KiB, no upgrade, its head complete in the first read — carried by
//! Rampart itself rather than by Pingora. What happens to it is decided by the one
//! request policy ([`policy::decide`]) that Pingora's path calls too; this module only
//! moves bytes: it parses the head, writes the policy's answer or the upstream head of
//! its forward plan, and runs the upstream attempt (balancer pick, pooled connection,
//! retries, timeouts, passive health, body streaming). A request it cannot carry
//! (chunked or large bodies, `Expect`, upgrades, HTTP/1.0, an incomplete first read) is
//! declined before the policy runs and goes to Pingora with the bytes read so far
//! ([`Served::Pingora`]), so no decision is ever made twice.
//!
//! Why: Pingora's HTTP/1 request cycle cost ~3× the CPU of a minimal forwarder per
//! request (loadtest/README.md, "the data-path question"). Here a request is parsed
//! once (httparse), its upstream head written in one buffer, and the response head
//! rewritten and sent together with the first body bytes; bodies are passed through
//! as they come (Content-Length, or chunked with [`ChunkScanner`] finding the end).
//! Upstream connections are kept per worker thread ([`IdlePool`]): workers are
//! single-threaded runtimes, so no lock is taken.
//!
//! `server.http1_fast_path = false` sends every request to Pingora.

use std::cell::RefCell;
use std::collections::HashMap;
use std::io::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{BufMut, BytesMut};
use http::header::{HeaderName, HeaderValue};
use http::{HeaderMap, Method, Uri};
use pingora::protocols::Stream;
use prometheus::IntCounter;
use rampart_config::Limits;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::clock::{self, within};
use crate::edge::{record_endpoint_failure, Scheme, Tried};
use crate::generation::{Generation, PoolRt};
use crate::headers::{HeaderEdits, HOP_BY_HOP};
use crate::health::ms_at;
use crate::limits::body_too_slow;
use crate::metrics::Metrics;
use crate::policy::{self, Answer, Client, Forward, Verdict};

/// Most headers parsed in a request or response head; more go to Pingora (requests)
/// or count as a bad upstream response.
pub(crate) const MAX_HEADERS: usize = 100;
/// Largest upstream response head accepted (Pingora's limit too).
const MAX_RESPONSE_HEAD: usize = 64 * 1024;
/// Read buffer for an upstream response.
const UPSTREAM_BUFFER: usize = 16 * 1024;
/// Largest request body the fast path takes (read whole before the upstream request is
/// sent, so that a retry can send it again); larger ones go to Pingora, which streams.
pub(crate) const MAX_BODY: u64 = 64 * 1024;
/// Largest response (head and body) read whole before the first write to the client
/// when its bytes have already arrived.
const COALESCE_LIMIT: usize = 64 * 1024;
/// Idle upstream connections kept per endpoint and worker thread.
const IDLE_PER_ENDPOINT: usize = 64;

/// What the fast path did with a request.
#[derive(Debug)]
pub enum Served {
    /// Answered; the connection can carry the next request.
    KeepAlive,
    /// Answered or failed; the connection closes.
    Close,
    /// Not for this path: Pingora serves it, starting from these bytes.
    Pingora(BytesMut),
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
}

impl ConnInfo<'_> {
    /// The client as the policy sees it.
    pub(crate) fn client(&self) -> Client {
        Client {
            scheme: self.scheme,
            peer: self.peer,
        }
    }
}

/// Why a request's body could not be read from the client.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum BodyError {
    /// The client closed the connection or reset the stream: nothing to answer.
    ClientGone,
    /// A read took longer than `limits.body_read_timeout`, or the body did not match
    /// its declared length: 400.
    Stalled,
    /// The body came slower than `limits.min_body_rate`: 408.
    TooSlow,
    /// An HTTP/2 body longer or shorter than its Content-Length (RFC 9113 §8.1.1): 400.
    LengthMismatch,
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
        }
    }
}

/// Serves the request whose first bytes are `bytes`, or hands them back for Pingora.
pub async fn serve(
    stream: &mut Stream,
    bytes: BytesMut,
    generation: Arc<Generation>,
    conn: ConnInfo<'_>,
) -> Served {
    let started = Instant::now();
    let mut raw_headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let Some(head) = Head::parse(&bytes, &mut raw_headers) else {
        return Served::Pingora(bytes);
    };
    let decision = policy::decide(&generation, head.policy_view(), conn.client()).await;
    let request_id = decision.request_id;
    let mut client = Http1Client {
        stream,
        send_timeout: generation.config.limits.send_timeout.0,
    };
    let plan = match decision.verdict {
        Verdict::Forward(plan) => plan,
        Verdict::Answer(answer) => {
            // An unread body cannot be skipped safely: the connection ends.
            let close = head.client_close || conn.closing || head.body_len > 0;
            let request = Prepared::answering(&head.parts, decision.route, request_id, close);
            let keep =
                answer_request(&mut client, &answer, &request, &generation, conn, started).await;
            return if keep {
                Served::KeepAlive
            } else {
                Served::Close
            };
        }
    };
    let mut request = head.prepare(&plan, request_id, &generation, &bytes);
    drop(head);
    drop(bytes);
    if request.body_missing > 0 {
        if let Err(e) = read_body(client.stream, &mut request, &generation, started).await {
            body_failed(&mut client, e, &request, &generation, conn, started).await;
            return Served::Close;
        }
    }
    if forward_request(&mut client, &request, &plan, &generation, conn, started).await {
        Served::KeepAlive
    } else {
        Served::Close
    }
}

/// A request head this path can carry, parsed.
struct Head<'h, 'b> {
    req: httparse::Request<'h, 'b>,
    /// The head's bytes as received.
    raw: &'b [u8],
    parts: http::request::Parts,
    head_len: usize,
    body_len: u64,
    client_close: bool,
}

impl<'h, 'b> Head<'h, 'b> {
    /// Parses the head at the start of `bytes`; `None` when this path cannot carry the
    /// request (transport reasons only: no decision about it is made here).
    fn parse(bytes: &'b [u8], raw: &'h mut [httparse::Header<'b>]) -> Option<Self> {
        let mut req = httparse::Request::new(raw);
        // A head not complete in the first read or a head that does not parse: Pingora
        // reads on, or answers the error.
        let Ok(httparse::Status::Complete(head_len)) = req.parse(bytes) else {
            return None;
        };
        if req.version != Some(1) {
            return None;
        }
        let path = req.path?;
        // Origin-form and absolute-form; `*` and authority-form are Pingora's.
        if !(path.starts_with('/') || path.starts_with("http://") || path.starts_with("https://")) {
            return None;
        }
        let mut client_close = false;
        let mut length: Option<u64> = None;
        for h in req.headers.iter() {
            let name = h.name.as_bytes();
            if name.eq_ignore_ascii_case(b"transfer-encoding")
                || name.eq_ignore_ascii_case(b"upgrade")
                || name.eq_ignore_ascii_case(b"expect")
            {
                return None;
            }
            if name.eq_ignore_ascii_case(b"content-length") {
                // Several fields (even equal ones) and lists are Pingora's to reconcile
                // or refuse.
                if length.is_some() {
                    return None;
                }
                length = Some(parse_length(h.value)?);
            }
            if name.eq_ignore_ascii_case(b"connection") {
                client_close |= tokens(h.value).any(|t| t.eq_ignore_ascii_case(b"close"));
            }
        }
        let body_len = length.unwrap_or(0);
        let early = bytes.len() - head_len;
        // Bytes pipelined after the body, or a body larger than this path buffers.
        if early as u64 > body_len || body_len > MAX_BODY {
            return None;
        }
        let mut headers = HeaderMap::with_capacity(req.headers.len());
        for h in req.headers.iter() {
            let name = HeaderName::from_bytes(h.name.as_bytes()).ok()?;
            headers.append(name, HeaderValue::from_bytes(h.value).ok()?);
        }
        let (mut parts, ()) = http::Request::new(()).into_parts();
        parts.method = Method::from_bytes(req.method?.as_bytes()).ok()?;
        parts.uri = Uri::try_from(path).ok()?;
        parts.headers = headers;
        Some(Self {
            req,
            raw: &bytes[..head_len],
            parts,
            head_len,
            body_len,
            client_close,
        })
    }

    fn policy_view(&self) -> policy::Request<'_> {
        policy::Request {
            parts: &self.parts,
            raw_head: Some(self.raw),
            raw_target: self.req.path.unwrap_or("/").as_bytes(),
            body_ended: false,
        }
    }

    /// The request to forward under `plan`: its upstream head, then the body bytes
    /// that came with the head in `bytes`.
    fn prepare(
        &self,
        plan: &Forward,
        request_id: HeaderValue,
        generation: &Generation,
        bytes: &[u8],
    ) -> Prepared {
        let head = upstream_head(&self.req, plan, generation, &request_id);
        let mut request = Prepared::new(&self.parts, plan, request_id, head);
        request.client_close = self.client_close;
        request.with_body(self.body_len, &bytes[self.head_len..])
    }
}

/// Reads the rest of the request body from the client into the upstream request, as
/// the full path reads it: each read within `limits.body_read_timeout`, and after that
/// long no slower than `limits.min_body_rate`.
async fn read_body(
    stream: &mut Stream,
    request: &mut Prepared,
    generation: &Generation,
    started: Instant,
) -> Result<(), BodyError> {
    let limits = &generation.config.limits;
    request.upstream_head.reserve(request.body_missing);
    while request.body_missing > 0 {
        let mut room = (&mut request.upstream_head).limit(request.body_missing);
        let read = tokio::time::timeout(limits.body_read_timeout.0, stream.read_buf(&mut room));
        match read.await {
            Ok(Ok(n)) if n > 0 => request.body_missing -= n,
            Ok(_) => return Err(BodyError::ClientGone),
            Err(_) => return Err(BodyError::Stalled),
        }
        if request.body_too_slow(limits, started) {
            return Err(BodyError::TooSlow);
        }
    }
    Ok(())
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
    let Some(answer) = error.answer() else { return };
    client.answer(&answer, request, generation, true).await;
    count(conn, generation, request.route, answer.status(), started);
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
    count(conn, generation, request.route, answer.status(), started);
    sent && !close
}

/// Records a finished request in its route's (or the unrouted) metrics and the
/// dashboard's rolling window.
fn count(
    conn: ConnInfo<'_>,
    generation: &Generation,
    route: Option<usize>,
    status: u16,
    started: Instant,
) {
    let finished = Instant::now();
    let seconds = finished.duration_since(started).as_secs_f64();
    let metrics = route.map_or(&generation.unrouted_metrics, |r| {
        &generation.routes[r].metrics
    });
    metrics.observe(status, seconds);
    conn.metrics.rolling.record(finished, status, seconds);
}

/// Where the fast path sends a response: an HTTP/1 connection (the upstream's bytes as
/// framed) or an HTTP/2 stream (head and data frames, see [`crate::h2`]).
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

/// An HTTP/1 client connection.
pub(crate) struct Http1Client<'a> {
    stream: &'a mut Stream,
    send_timeout: Duration,
}

impl Downstream for Http1Client<'_> {
    const PAYLOAD: bool = false;

    fn counter(metrics: &Metrics) -> &IntCounter {
        &metrics.fast_path_requests
    }

    async fn head(
        &mut self,
        raw: &[u8],
        head: &FinalHead,
        request: &Prepared,
        generation: &Generation,
        close: bool,
        body: &[u8],
        _end: bool,
    ) -> bool {
        let mut out = downstream_head(raw, head, request, generation, close);
        out.extend_from_slice(body);
        self.body(&out, false).await
    }

    async fn body(&mut self, bytes: &[u8], _end: bool) -> bool {
        if bytes.is_empty() {
            return true;
        }
        let write = async {
            self.stream.write_all(bytes).await?;
            self.stream.flush().await
        };
        matches!(within(self.send_timeout, write).await, Ok(Ok(())))
    }

    async fn answer(
        &mut self,
        answer: &Answer,
        request: &Prepared,
        generation: &Generation,
        close: bool,
    ) -> bool {
        let id = policy::id_header(generation, &request.request_id);
        let bytes = answer.h1_bytes(id, request.head_request, close);
        self.body(&bytes, true).await
    }
}

/// Forwards a prepared request on `client` under `plan` and counts it. Returns whether
/// the client connection can carry another request.
pub(crate) async fn forward_request<D: Downstream>(
    client: &mut D,
    request: &Prepared,
    plan: &Forward,
    generation: &Generation,
    conn: ConnInfo<'_>,
    started: Instant,
) -> bool {
    let (status, keep_alive) = forward(client, request, plan, generation, conn, started).await;
    D::counter(conn.metrics).inc();
    count(conn, generation, request.route, status, started);
    keep_alive
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
}

impl Prepared {
    /// A request forwarded under `plan`, with its upstream head.
    pub(crate) fn new(
        parts: &http::request::Parts,
        plan: &Forward,
        request_id: HeaderValue,
        upstream_head: Vec<u8>,
    ) -> Self {
        Self {
            route: Some(plan.route),
            request_id,
            upstream_head,
            head_request: parts.method == Method::HEAD,
            idempotent: parts.method.is_idempotent(),
            client_close: false,
            body_len: 0,
            body_missing: 0,
        }
    }

    /// A request the policy answers.
    pub(crate) fn answering(
        parts: &http::request::Parts,
        route: Option<usize>,
        request_id: HeaderValue,
        close: bool,
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

/// The comma-separated tokens of a header value.
pub(crate) fn tokens(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    value
        .split(|&b| b == b',')
        .map(<[u8]>::trim_ascii)
        .filter(|t| !t.is_empty())
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
                && !crate::headers::PROTECTED
                    .iter()
                    .any(|p| name.eq_ignore_ascii_case(p)))
    }
}

/// The request head sent upstream under `plan`: the client's request line (or the
/// plan's target) and headers in their order and case, `Host` from the plan, without
/// hop-by-hop headers, with the forwarding headers and the request id.
fn upstream_head(
    req: &httparse::Request<'_, '_>,
    plan: &Forward,
    generation: &Generation,
    request_id: &HeaderValue,
) -> Vec<u8> {
    let id_name = &generation.forwarding.request_id;
    let hop_by_hop = HopByHop::of(req.headers);
    let raw_target = req.path.unwrap_or("/").as_bytes();
    let mut out = request_line(req.method.unwrap_or("GET"), raw_target, plan);
    let edits = &generation.routes[plan.route].request_headers;
    let mut host_sent = false;
    for h in req.headers.iter() {
        if h.name.eq_ignore_ascii_case("host") {
            if !host_sent && !edits.drops("host") {
                push_header(&mut out, h.name.as_bytes(), plan.host.as_bytes());
            }
            host_sent = true;
            continue;
        }
        if hop_by_hop.contains(h.name)
            || id_name.as_str().eq_ignore_ascii_case(h.name)
            || plan
                .forwarded
                .iter()
                .any(|(n, _)| n.eq_ignore_ascii_case(h.name))
            || edits.drops(h.name)
        {
            continue;
        }
        push_header(&mut out, h.name.as_bytes(), h.value);
    }
    if !host_sent && !edits.drops("host") {
        // Spelt as Pingora spells a Host it adds.
        push_header(&mut out, b"Host", plan.host.as_bytes());
    }
    finish_upstream_head(&mut out, plan, edits, id_name, request_id);
    out
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
/// forwarding headers the route's rules keep, the rules' own headers, the request id.
pub(crate) fn finish_upstream_head(
    out: &mut Vec<u8>,
    plan: &Forward,
    edits: &HeaderEdits,
    id_name: &HeaderName,
    request_id: &HeaderValue,
) {
    for (name, value) in &plan.forwarded {
        if !edits.drops(name) {
            push_header(out, name.as_bytes(), value.as_bytes());
        }
    }
    for (name, value) in &edits.set {
        push_header(out, name.as_str().as_bytes(), value.as_bytes());
    }
    push_header(out, id_name.as_str().as_bytes(), request_id.as_bytes());
    out.extend_from_slice(b"\r\n");
}

pub(crate) fn push_header(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// How one attempt on one endpoint ended.
enum Attempt {
    /// The response (or part of it) went to the client.
    Done { status: u16, keep_alive: bool },
    /// Nothing reached the client: `status` is answered unless another attempt is made.
    Failed {
        kind: &'static str,
        status: u16,
        retry: bool,
    },
}

/// Proxies a prepared request, trying endpoints as the pool's retry policy allows.
/// Returns the status logged and whether the client connection goes on.
async fn forward<D: Downstream>(
    client: &mut D,
    request: &Prepared,
    plan: &Forward,
    generation: &Generation,
    conn: ConnInfo<'_>,
    started: Instant,
) -> (u16, bool) {
    let route = &generation.routes[plan.route];
    let Some(pool) = route.pool.as_deref() else {
        return (500, false);
    };
    let mut tried = Tried::default();
    let mut attempts = 0u32;
    let deadline = clock::after(started, pool.timeouts.total.0);
    // What the last failed attempt would answer.
    let mut failed = 503;
    let status = loop {
        // The first try starts right after `started` was read.
        let now = if attempts == 0 {
            started
        } else {
            Instant::now()
        };
        if now >= deadline {
            break 504;
        }
        // No endpoint at all (503), or none left to retry on (the last failure's).
        let Some(idx) = pool.pick(plan.key_hash, tried.as_slice(), ms_at(now)) else {
            break failed;
        };
        tried.push(idx);
        attempts += 1;
        let within_budget = attempts <= pool.retries.attempts;
        // Whether a retry has somewhere to go; asked only when an attempt fails.
        let may_retry =
            || within_budget && pool.can_retry(plan.key_hash, tried.as_slice(), ms_at(now));
        let inflight = pool.endpoints[idx].state.start_request();
        let outcome = attempt(
            client, request, generation, pool, idx, now, deadline, &may_retry, conn,
        )
        .await;
        drop(inflight);
        match outcome {
            Attempt::Done { status, keep_alive } => return (status, keep_alive),
            Attempt::Failed {
                kind,
                status,
                retry,
            } => {
                let mut recorded = false;
                record_endpoint_failure(conn.metrics, pool, Some(idx), kind, &mut recorded);
                failed = status;
                if !(retry && within_budget) {
                    break status;
                }
            }
        }
    };
    // As Pingora's path after a failure: an error answer, and the connection closes.
    client
        .answer(&Answer::Failed(status), request, generation, true)
        .await;
    (status, false)
}

/// One try on endpoint `idx`, starting `now`, to be over by `deadline` (the route's
/// total timeout): a pooled connection (or, when it turns out stale, one fresh
/// connection), the request, the response head, then the body streamed through.
#[allow(clippy::too_many_arguments)]
async fn attempt<D: Downstream>(
    client: &mut D,
    request: &Prepared,
    generation: &Generation,
    pool: &PoolRt,
    idx: usize,
    mut now: Instant,
    deadline: Instant,
    may_retry: &(dyn Fn() -> bool + Sync),
    conn: ConnInfo<'_>,
) -> Attempt {
    let endpoint = &pool.endpoints[idx];
    let t = &pool.timeouts;
    let failed = |kind, status, retry| Attempt::Failed {
        kind,
        status,
        retry,
    };
    let mut buf: Vec<u8> = Vec::with_capacity(UPSTREAM_BUFFER);
    let mut stale_seen = false;
    let (mut upstream, head, upstream_started) = 'connect: loop {
        if now >= deadline {
            return failed("timeout", 504, false);
        }
        let pooled = if stale_seen {
            None
        } else {
            IdlePool::take(endpoint.addr, now)
        };
        let reused = pooled.is_some();
        let mut upstream = match pooled {
            Some(s) => s,
            None => {
                let limit = clock::after(now, t.connect.0).min(deadline);
                match tokio::time::timeout_at(limit.into(), TcpStream::connect(endpoint.addr)).await
                {
                    Ok(Ok(s)) => {
                        let _ = s.set_nodelay(true);
                        s
                    }
                    Ok(Err(_)) => return failed("connect", 502, true),
                    Err(_) => return failed("connect", 504, true),
                }
            }
        };
        let upstream_started = Instant::now();
        // The first read's limit counts from the write, every later one from its start.
        let mut read_limit = clock::after(upstream_started, t.first_byte.0).min(deadline);
        match tokio::time::timeout_at(
            read_limit.into(),
            upstream.write_all(&request.upstream_head),
        )
        .await
        {
            Ok(Ok(())) => {}
            // A pooled connection the upstream had closed: not the endpoint's fault.
            Ok(Err(_)) if reused => {
                stale_seen = true;
                now = Instant::now();
                continue 'connect;
            }
            Ok(Err(_)) => return failed("error", 502, request.idempotent),
            Err(_) => return failed("timeout", 504, request.idempotent),
        }
        buf.clear();
        loop {
            if buf.len() == buf.capacity() {
                if buf.len() >= MAX_RESPONSE_HEAD {
                    return failed("error", 502, false);
                }
                buf.reserve(UPSTREAM_BUFFER);
            }
            let read = tokio::time::timeout_at(read_limit.into(), upstream.read_buf(&mut buf));
            match read.await {
                Ok(Ok(0)) | Ok(Err(_)) if reused && buf.is_empty() => {
                    stale_seen = true;
                    now = Instant::now();
                    continue 'connect;
                }
                Ok(Ok(0)) | Ok(Err(_)) => return failed("error", 502, request.idempotent),
                Ok(Ok(_)) => {}
                Err(_) => return failed("timeout", 504, request.idempotent),
            }
            loop {
                match parse_response(&buf, request.head_request) {
                    Ok(Some(ResponseHead::Interim(len))) => {
                        buf.drain(..len);
                    }
                    Ok(Some(ResponseHead::Final(head))) => {
                        break 'connect (upstream, head, upstream_started)
                    }
                    Ok(None) => break,
                    Err(()) => return failed("error", 502, false),
                }
            }
            // Only part of the head: the next read gets a pause of its own.
            read_limit = clock::after(Instant::now(), t.first_byte.0).min(deadline);
        }
    };

    let status = head.status;
    let head_at = Instant::now();
    let ttfb = head_at.duration_since(upstream_started);
    pool.ttfb.observe(ttfb.as_secs_f64());
    pool.states[idx].observe_latency(ttfb, ms_at(head_at));
    if pool.retries.on_status.contains(&status) && request.idempotent && may_retry() {
        return failed("status", status, true);
    }
    if matches!(status, 502..=504) {
        let mut recorded = false;
        record_endpoint_failure(conn.metrics, pool, Some(idx), "status", &mut recorded);
    } else {
        pool.states[idx].record_success();
    }

    let close = request.client_close || conn.closing || head.body == Body::UntilClose;
    take_ready_body(&mut upstream, &mut buf, &head);
    let mut framing = Framing::new(head.body);
    let mut payload = Vec::new();
    let first = &buf[head.len..];
    let (used, body) = framing.pass(first, &mut payload, D::PAYLOAD);
    let mut clean = used == first.len() && framing.valid;
    let raw_head = &buf[..head.len];
    let mut client_ok = client
        .head(
            raw_head,
            &head,
            request,
            generation,
            close,
            body,
            framing.done(),
        )
        .await;
    let streamed = !framing.done();
    while client_ok && clean && !framing.done() {
        if Instant::now() >= deadline || endpoint.state.drained(pool.drain_timeout) {
            clean = false;
            break;
        }
        buf.clear();
        let read = tokio::time::timeout(t.first_byte.0, upstream.read_buf(&mut buf)).await;
        match read {
            Ok(Ok(0)) if framing.body == Body::UntilClose => {
                framing.finished = true;
                client_ok = client.body(&[], true).await;
                break;
            }
            Ok(Ok(n)) if n > 0 => {
                let (used, body) = framing.pass(&buf, &mut payload, D::PAYLOAD);
                clean = used == buf.len() && framing.valid;
                client_ok = client.body(body, framing.done()).await;
            }
            _ => clean = false,
        }
    }
    let complete = framing.done() && clean;
    if complete && head.upstream_reusable {
        let idle_since = if streamed { Instant::now() } else { head_at };
        IdlePool::put(endpoint.addr, upstream, t.idle.0, idle_since);
    }
    Attempt::Done {
        status,
        keep_alive: client_ok && complete && !close,
    }
}

/// Reads what has already arrived of a response body that fits in [`COALESCE_LIMIT`],
/// without waiting, so that the client gets the head and the body in one write (one
/// system call and one packet instead of one per upstream read).
fn take_ready_body(upstream: &mut TcpStream, buf: &mut Vec<u8>, head: &FinalHead) {
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
}

enum ResponseHead {
    /// A 1xx response (not 101) of this many bytes, which the client never asked for.
    Interim(usize),
    Final(FinalHead),
}

/// Parses an upstream response head: `Ok(None)` while incomplete, `Err` when it is
/// malformed or ambiguous (an upgrade that was not asked for, Content-Length with
/// Transfer-Encoding, conflicting lengths).
fn parse_response(buf: &[u8], head_request: bool) -> Result<Option<ResponseHead>, ()> {
    let mut raw_headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut raw_headers);
    let len = match resp.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(_) => return Err(()),
    };
    let status = resp.code.ok_or(())?;
    if status == 101 {
        return Err(());
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
                    return Err(());
                }
                let n: u64 = std::str::from_utf8(part)
                    .map_err(|_| ())?
                    .parse()
                    .map_err(|_| ())?;
                if length.is_some_and(|l| l != n) {
                    return Err(());
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
            (Some(_), Some(_)) => return Err(()),
            (Some(true), None) => Body::Chunked,
            (Some(false), None) | (None, None) => Body::UntilClose,
            (None, Some(n)) => Body::Length(n),
        }
    };
    Ok(Some(ResponseHead::Final(FinalHead {
        status,
        len,
        body,
        upstream_reusable: keep_alive && body != Body::UntilClose,
    })))
}

/// The response head for the client: the upstream's status and headers without
/// hop-by-hop ones, with the request id, and `Connection: close` when the connection
/// ends after this response.
fn downstream_head(
    raw: &[u8],
    head: &FinalHead,
    request: &Prepared,
    generation: &Generation,
    close: bool,
) -> Vec<u8> {
    let mut raw_headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut raw_headers);
    // Parsed before: cannot fail.
    let _ = resp.parse(raw);
    let id_name = &generation.forwarding.request_id;
    let hop_by_hop = HopByHop::of(resp.headers);
    let mut out = Vec::with_capacity(raw.len() + 128);
    let _ = write!(
        out,
        "HTTP/1.1 {} {}\r\n",
        head.status,
        resp.reason.unwrap_or("")
    );
    let none = HeaderEdits::default();
    let edits = request.response_edits(generation).unwrap_or(&none);
    for h in resp.headers.iter() {
        if hop_by_hop.contains(h.name)
            || id_name.as_str().eq_ignore_ascii_case(h.name)
            || edits.drops(h.name)
        {
            continue;
        }
        push_header(&mut out, h.name.as_bytes(), h.value);
    }
    for (name, value) in &edits.set {
        push_header(&mut out, name.as_str().as_bytes(), value.as_bytes());
    }
    push_header(
        &mut out,
        id_name.as_str().as_bytes(),
        request.request_id.as_bytes(),
    );
    if close {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out
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

/// Finds the end of a chunked body (RFC 9112 §7.1) in bytes passed through unchanged:
/// chunk sizes, extensions, data, and the trailer section.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ChunkScanner {
    state: ChunkState,
    size: u64,
    digits: u8,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
enum ChunkState {
    #[default]
    Size,
    Extension,
    SizeLf,
    Data,
    DataCr,
    DataLf,
    TrailerStart,
    TrailerLine,
    TrailerLf,
    LastLf,
    Done,
}

impl ChunkScanner {
    /// Whether the whole body (last chunk and trailers) has been seen.
    #[must_use]
    pub fn is_done(&self) -> bool {
        self.state == ChunkState::Done
    }

    /// Scans `bytes`; returns how many belong to the body (fewer than all only when the
    /// body ended).
    ///
    /// # Errors
    /// When the encoding is malformed: the body's end cannot be known.
    pub fn feed(&mut self, bytes: &[u8]) -> Result<usize, MalformedChunk> {
        self.feed_with(bytes, |_| {})
    }

    /// Like [`ChunkScanner::feed`], and gives each piece of chunk data to `data`.
    ///
    /// # Errors
    /// When the encoding is malformed.
    pub fn feed_with(
        &mut self,
        bytes: &[u8],
        mut data: impl FnMut(&[u8]),
    ) -> Result<usize, MalformedChunk> {
        use ChunkState as S;
        let mut i = 0;
        while i < bytes.len() {
            if self.state == S::Done {
                return Ok(i);
            }
            if self.state == S::Data {
                let take = usize::try_from(self.size)
                    .unwrap_or(usize::MAX)
                    .min(bytes.len() - i);
                self.size -= take as u64;
                data(&bytes[i..i + take]);
                i += take;
                if self.size == 0 {
                    self.state = S::DataCr;
                }
                continue;
            }
            let b = bytes[i];
            i += 1;
            self.state = match (self.state, b) {
                (S::Size, b) if b.is_ascii_hexdigit() => {
                    if self.digits == 15 {
                        return Err(MalformedChunk);
                    }
                    self.digits += 1;
                    let d = (b as char).to_digit(16).unwrap_or(0);
                    self.size = self.size * 16 + u64::from(d);
                    S::Size
                }
                (S::Size, b';' | b' ' | b'\t') if self.digits > 0 => S::Extension,
                (S::Size, b'\r') if self.digits > 0 => S::SizeLf,
                (S::Extension, b'\r') => S::SizeLf,
                (S::Extension, b) if b != b'\n' => S::Extension,
                (S::SizeLf, b'\n') => {
                    self.digits = 0;
                    if self.size == 0 {
                        S::TrailerStart
                    } else {
                        S::Data
                    }
                }
                (S::DataCr, b'\r') => S::DataLf,
                (S::DataLf, b'\n') => S::Size,
                (S::TrailerStart, b'\r') => S::LastLf,
                (S::TrailerStart | S::TrailerLine, b) if b != b'\n' && b != b'\r' => S::TrailerLine,
                (S::TrailerLine, b'\r') => S::TrailerLf,
                (S::TrailerLf, b'\n') => S::TrailerStart,
                (S::LastLf, b'\n') => S::Done,
                _ => return Err(MalformedChunk),
            };
        }
        Ok(i)
    }
}

/// A chunked body that does not follow the grammar.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("malformed chunked encoding")]
pub struct MalformedChunk;

/// Idle upstream connections of this worker thread, by endpoint address: taken
/// last-in first-out (the warmest), dropped after the pool's idle timeout or when the
/// upstream closed them.
#[derive(Default)]
pub struct IdlePool {
    by_addr: HashMap<SocketAddr, Vec<Idle>>,
    last_sweep: Option<Instant>,
}

struct Idle {
    stream: TcpStream,
    expires: Instant,
}

thread_local! {
    static IDLE: RefCell<IdlePool> = RefCell::new(IdlePool::default());
}

impl IdlePool {
    /// A live idle connection to `addr`, if this thread has one that has not expired
    /// by `now`.
    fn take(addr: SocketAddr, now: Instant) -> Option<TcpStream> {
        IDLE.with(|pool| {
            let mut pool = pool.borrow_mut();
            let list = pool.by_addr.get_mut(&addr)?;
            while let Some(idle) = list.pop() {
                if idle.expires > now && is_open(&idle.stream) {
                    return Some(idle.stream);
                }
            }
            None
        })
    }

    /// Keeps `stream`, idle since `now`, for reuse for up to `idle`.
    fn put(addr: SocketAddr, stream: TcpStream, idle: Duration, now: Instant) {
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
            let list = pool.by_addr.entry(addr).or_default();
            if list.len() >= IDLE_PER_ENDPOINT {
                list.remove(0);
            }
            list.push(Idle {
                stream,
                expires: clock::after(now, idle),
            });
        });
    }
}

/// Whether an idle upstream connection is still open and quiet: a read would block.
/// (Closed, or bytes the upstream sent unasked: not reusable.)
fn is_open(stream: &TcpStream) -> bool {
    let mut probe = [0u8; 1];
    matches!(stream.try_read(&mut probe), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scan_all(input: &[u8]) -> Result<(usize, bool), MalformedChunk> {
        let mut s = ChunkScanner::default();
        let n = s.feed(input)?;
        Ok((n, s.is_done()))
    }

    #[test]
    fn a_chunked_body_ends_after_the_last_chunk_and_trailers() {
        let body = b"5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\n\r\n";
        assert_eq!(scan_all(body), Ok((body.len(), true)));
        let trailers = b"3\r\nabc\r\n0\r\nx-sum: 1\r\ny: 2\r\n\r\n";
        assert_eq!(scan_all(trailers), Ok((trailers.len(), true)));
        // Bytes after the end are not the body's.
        let mut more = body.to_vec();
        more.extend_from_slice(b"HTTP/1.1 200 OK\r\n");
        assert_eq!(scan_all(&more), Ok((body.len(), true)));
    }

    #[test]
    fn a_chunked_body_is_found_whatever_the_read_boundaries() {
        let body = b"a\r\n0123456789\r\n1A\r\nabcdefghijklmnopqrstuvwxyz\r\n0\r\nt: v\r\n\r\n";
        for split in 0..body.len() {
            for step in 1..4 {
                let mut s = ChunkScanner::default();
                let mut seen = s.feed(&body[..split]).unwrap();
                for piece in body[split..].chunks(step) {
                    seen += s.feed(piece).unwrap();
                }
                assert_eq!(seen, body.len(), "split {split} step {step}");
                assert!(s.is_done());
            }
        }
    }

    #[test]
    fn a_malformed_chunked_body_is_an_error() {
        for bad in [
            &b"x\r\n"[..],
            b"5\nhello",
            b"5\r\nhelloX\r\n",
            b"\r\n",
            b"0000000000000001\r\n",
            b"0\r\n\n",
        ] {
            assert_eq!(
                scan_all(bad),
                Err(MalformedChunk),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        // Incomplete is not an error.
        assert_eq!(scan_all(b"5\r\nhel"), Ok((6, false)));
    }

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

    /// A chunked body of these chunk sizes (with an extension on odd ones) and
    /// trailers, followed by bytes that are not the body's.
    fn chunked_body(sizes: &[usize], trailers: usize) -> Vec<u8> {
        let mut body = Vec::new();
        for (i, &n) in sizes.iter().enumerate() {
            body.extend_from_slice(format!("{n:X}").as_bytes());
            if i % 2 == 1 {
                body.extend_from_slice(b";name=\"v\"");
            }
            body.extend_from_slice(b"\r\n");
            body.extend(std::iter::repeat_n(b'0' + (i % 10) as u8, n));
            body.extend_from_slice(b"\r\n");
        }
        body.extend_from_slice(b"0\r\n");
        for t in 0..trailers {
            body.extend_from_slice(format!("x-t{t}: {t}\r\n").as_bytes());
        }
        body.extend_from_slice(b"\r\n");
        body
    }

    proptest::proptest! {
        #[test]
        fn the_end_of_any_chunked_body_is_found_across_any_reads(
            sizes in proptest::collection::vec(1usize..3000, 0..8),
            trailers in 0usize..3,
            cuts in proptest::collection::vec(0usize..20_000, 0..6),
        ) {
            let body = chunked_body(&sizes, trailers);
            let mut stream = body.clone();
            stream.extend_from_slice(b"HTTP/1.1 200 OK\r\n");
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c % stream.len()).collect();
            cuts.push(stream.len());
            cuts.sort_unstable();
            let mut s = ChunkScanner::default();
            let (mut from, mut seen) = (0, 0);
            let mut data = Vec::new();
            for cut in cuts {
                let used = s
                    .feed_with(&stream[from..cut], |d| data.extend_from_slice(d))
                    .unwrap();
                seen += used;
                if s.is_done() {
                    break;
                }
                proptest::prop_assert_eq!(used, cut - from);
                from = cut;
            }
            proptest::prop_assert!(s.is_done());
            proptest::prop_assert_eq!(seen, body.len());
            // The data given out is the chunks' data, in order (what HTTP/2 clients get).
            let expected: Vec<u8> = sizes
                .iter()
                .enumerate()
                .flat_map(|(i, &n)| std::iter::repeat_n(b'0' + (i % 10) as u8, n))
                .collect();
            proptest::prop_assert_eq!(data, expected);
        }

        #[test]
        fn arbitrary_bytes_never_panic_and_reads_do_not_change_the_outcome(
            bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..200),
            cut in 0usize..200,
        ) {
            let cut = cut.min(bytes.len());
            let mut whole = ChunkScanner::default();
            let at_once = whole.feed(&bytes);
            let mut split = ChunkScanner::default();
            let in_two = split
                .feed(&bytes[..cut])
                .and_then(|a| if split.is_done() { Ok(a) } else { split.feed(&bytes[cut..]).map(|b| a + b) });
            proptest::prop_assert_eq!(at_once.is_ok(), in_two.is_ok());
            if let (Ok(a), Ok(b)) = (at_once, in_two) {
                proptest::prop_assert_eq!(a, b);
                proptest::prop_assert_eq!(whole.is_done(), split.is_done());
            }
            let _ = parse_response(&bytes, false);
        }
    }

    /// A generation forwarding every request to a pool, for `prepare`.
    fn forwarding_generation() -> (Generation, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let text = format!(
            "[server]\ndata_dir = {:?}\n\n[listeners]\nhttp = \"127.0.0.1:0\"\n\n[[routes]]\nname = \"all\"\naction = {{ forward = \"app\" }}\n\n\
             [pools.app]\nendpoints = [{{ address = \"127.0.0.1:9\" }}]\n",
            dir.path()
        );
        let config = rampart_config::parse(&text, "test.toml").unwrap();
        let builder =
            crate::generation::Builder::new(dir.path().to_path_buf(), Arc::new(Metrics::new()));
        (builder.build(config, 1, None).unwrap(), dir)
    }

    fn parsed_upstream_head(head: &[u8]) -> (String, String, Vec<(String, String)>) {
        let mut raw = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut req = httparse::Request::new(&mut raw);
        let n = req.parse(head).expect("the upstream head parses");
        assert_eq!(n, httparse::Status::Complete(head.len()), "one whole head");
        assert_eq!(req.version, Some(1));
        let headers = req
            .headers
            .iter()
            .map(|h| {
                let value = String::from_utf8_lossy(h.value).into_owned();
                (h.name.to_ascii_lowercase(), value)
            })
            .collect();
        (
            req.method.unwrap().to_string(),
            req.path.unwrap().to_string(),
            headers,
        )
    }

    /// What the fast path sends upstream for the head `text`, or `None` when it
    /// declines it (to Pingora) or the policy answers it.
    fn forwarded_head(text: &str, generation: &Generation) -> Option<Prepared> {
        let mut raw = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let head = Head::parse(text.as_bytes(), &mut raw)?;
        let client = Client {
            scheme: Scheme::Http,
            peer: Some("127.0.0.1".parse().unwrap()),
        };
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let decision = runtime.block_on(policy::decide(generation, head.policy_view(), client));
        let Verdict::Forward(plan) = decision.verdict else {
            return None;
        };
        Some(head.prepare(&plan, decision.request_id, generation, text.as_bytes()))
    }

    /// Whatever a client sends, a request the fast path takes goes upstream as one
    /// unambiguous HTTP/1.1 head: same method, the target it was routed on, one Host,
    /// no framing but one `Content-Length`, the length of the body the fast path reads,
    /// no hop-by-hop header, forwarding headers of our own. At least a tenth of the
    /// generated heads must be forwarded, or the property checks too little.
    #[test]
    fn the_upstream_head_is_one_unambiguous_request() {
        use proptest::prelude::*;
        use std::sync::atomic::{AtomicUsize, Ordering};
        static GENERATION: std::sync::LazyLock<(Generation, tempfile::TempDir)> =
            std::sync::LazyLock::new(forwarding_generation);
        const CASES: u32 = 4096;
        let strategy = (
            proptest::sample::select(vec![
                "GET", "GET", "HEAD", "DELETE", "POST", "OPTIONS", "CONNECT", "G T",
            ]),
            proptest::sample::select(vec![
                "/",
                "/",
                "/a?b=c",
                "/a/../b",
                "//x",
                "*",
                "http://h/x",
                "http://a.test/y",
                "/%2e%2e/",
                "/a b",
                "/p#/../x",
            ]),
            proptest::collection::vec(
                (
                    proptest::sample::select(vec![
                        "Connection",
                        "Keep-Alive",
                        "TE",
                        "Transfer-Encoding",
                        "Content-Length",
                        "Upgrade",
                        "Expect",
                        "X-Forwarded-For",
                        "Forwarded",
                        "X-Request-Id",
                        "X-A",
                        "X-A",
                        "X-B",
                        "Trailer",
                        "Proxy-Connection",
                        "Bad Name",
                    ]),
                    proptest::sample::select(vec![
                        "a.test",
                        "close",
                        "keep-alive, x-a",
                        "host",
                        "chunked",
                        "0",
                        "0",
                        "5",
                        "0, 0",
                        "websocket",
                        "100-continue",
                        "1.2.3.4",
                        "x\tY",
                        "\u{e9}",
                        "",
                        "a\rb",
                    ]),
                ),
                0..4,
            ),
            any::<bool>(),
            proptest::sample::select(vec![0usize, 1, 1, 1, 1, 1, 1, 2]),
            proptest::sample::select(vec![
                "a.test",
                "a.test",
                "A.Test:80",
                "[::1]",
                "a.test\", for=1",
            ]),
        );
        let forwarded = AtomicUsize::new(0);
        let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig::with_cases(CASES));
        runner
            .run(
                &strategy,
                |(method, path, headers, bare_lf, hosts, host)| {
                    let generation = &GENERATION.0;
                    let eol = if bare_lf { "\n" } else { "\r\n" };
                    let mut text = format!("{method} {path} HTTP/1.1{eol}");
                    for _ in 0..hosts {
                        text.push_str(&format!("Host: {host}{eol}"));
                    }
                    for (name, value) in &headers {
                        text.push_str(&format!("{name}: {value}{eol}"));
                    }
                    text.push_str(eol);
                    let Some(prepared) = forwarded_head(&text, generation) else {
                        return Ok(());
                    };
                    forwarded.fetch_add(1, Ordering::Relaxed);
                    let (m, p, up) = parsed_upstream_head(&prepared.upstream_head);
                    prop_assert_eq!(m, method);
                    let routed = path
                        .strip_prefix("http://h")
                        .or_else(|| path.strip_prefix("http://a.test"))
                        .unwrap_or(path);
                    prop_assert_eq!(p, routed);
                    prop_assert!(!path.contains('#') && method != "CONNECT");
                    let count = |n: &str| up.iter().filter(|(k, _)| k == n).count();
                    prop_assert_eq!(count("host"), 1);
                    let sent_host = &up.iter().find(|(k, _)| k == "host").unwrap().1;
                    prop_assert!(
                        !sent_host.contains('"') && !sent_host.contains(','),
                        "host {}",
                        sent_host
                    );
                    prop_assert_eq!(count("x-forwarded-for"), 1);
                    prop_assert_eq!(count("x-request-id"), 1);
                    prop_assert_eq!(count("transfer-encoding"), 0);
                    prop_assert!(count("content-length") <= 1);
                    if count("content-length") == 0 {
                        prop_assert_eq!(prepared.body_len, 0);
                    }
                    for (k, v) in &up {
                        prop_assert!(!HOP_BY_HOP.contains(&k.as_str()), "{} went upstream", k);
                        if k == "content-length" {
                            prop_assert_eq!(v.trim().parse::<u64>().ok(), Some(prepared.body_len));
                            prop_assert_eq!(prepared.body_missing as u64, prepared.body_len);
                        }
                        if k == "x-forwarded-for" {
                            prop_assert_eq!(v, "127.0.0.1");
                        }
                    }
                    // Headers the client's Connection named stay behind, except those the
                    // proxy relies on.
                    let named: Vec<String> = headers
                        .iter()
                        .filter(|(n, _)| n.eq_ignore_ascii_case("connection"))
                        .flat_map(|(_, v)| v.split(',').map(|t| t.trim().to_ascii_lowercase()))
                        .filter(|t| {
                            !t.is_empty() && !crate::headers::PROTECTED.contains(&t.as_str())
                        })
                        .collect();
                    for n in named {
                        prop_assert_eq!(count(&n), 0, "{} was named by Connection", n);
                    }
                    Ok(())
                },
            )
            .unwrap();
        let forwarded = forwarded.into_inner();
        assert!(
            forwarded >= CASES as usize / 10,
            "only {forwarded} of {CASES} generated heads were forwarded"
        );
    }

    #[test]
    fn hop_by_hop_includes_headers_named_by_connection_but_not_framing() {
        let headers = [
            httparse::Header {
                name: "Connection",
                value: b"x-secret, content-length",
            },
            httparse::Header {
                name: "connection",
                value: b"close",
            },
        ];
        let hop = HopByHop::of(&headers);
        assert!(hop.contains("Keep-Alive"));
        assert!(hop.contains("X-Secret"));
        assert!(hop.contains("connection"));
        assert!(!hop.contains("Content-Length"));
        assert!(!hop.contains("x-other"));
    }
}
