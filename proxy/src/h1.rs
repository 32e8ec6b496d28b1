//! The HTTP/1 fast path: the common request — HTTP/1.1, no body or a Content-Length
//! body of up to 64 KiB, no upgrade, its head complete in the first read, a forward
//! route — proxied by Rampart itself rather than by Pingora, with the same policy:
//! limits, routing, rate limits, balancing, forwarding headers, passive health,
//! retries, timeouts, body read limits and metrics are the functions `edge` uses.
//! Anything else goes to Pingora with the bytes read so far ([`Served::Pingora`]),
//! decided before anything has a side effect, so every feature keeps working and
//! Pingora stays the complete implementation (HTTP/2 framing, chunked and large
//! bodies, `Expect`, upgrades, HTTP/1.0, static answers, rejections).
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
use http::header::{HeaderName, HeaderValue, HOST};
use http::{HeaderMap, Method, Uri};
use pingora::protocols::Stream;
use prometheus::IntCounter;
use rampart_config::{Action, Limits};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::balance::PickInput;
use crate::clock::{self, within};
use crate::edge::{
    body_too_slow, hash_key, record_endpoint_failure, request_host, request_id, Scheme, Tried,
};
use crate::generation::{Generation, PoolRt, RouteRt};
use crate::headers::{HeaderEdits, HOP_BY_HOP};
use crate::health::ms_at;
use crate::limits::{check_request, RequestView};
use crate::metrics::Metrics;
use crate::routing::{stripped_target, RouteRequest};

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

/// Serves the request whose first bytes are `bytes`, or hands them back for Pingora.
pub async fn serve(
    stream: &mut Stream,
    bytes: BytesMut,
    generation: Arc<Generation>,
    conn: ConnInfo<'_>,
) -> Served {
    let started = Instant::now();
    let Some(mut request) = prepare(&bytes, &generation, conn) else {
        return Served::Pingora(bytes);
    };
    drop(bytes);
    if request.body_missing > 0 {
        if request.limited.is_some() {
            // Refused without reading the body: the connection cannot go on.
            request.client_close = true;
        } else if let Err(status) = read_body(stream, &mut request, &generation, started).await {
            let mut client = Http1Client {
                stream,
                send_timeout: generation.config.limits.send_timeout.0,
            };
            body_failed(&mut client, status, &request, &generation, conn, started).await;
            return Served::Close;
        }
    }
    let mut client = Http1Client {
        stream,
        send_timeout: generation.config.limits.send_timeout.0,
    };
    if proxy_request(&mut client, &request, &generation, conn, started).await {
        Served::KeepAlive
    } else {
        Served::Close
    }
}

/// Reads the rest of the request body from the client into the upstream request, as
/// the full path reads it: each read within `limits.body_read_timeout` (else 400), and
/// after that long no slower than `limits.min_body_rate` (else 408). `Err(0)` when the
/// client went away.
async fn read_body(
    stream: &mut Stream,
    request: &mut Prepared,
    generation: &Generation,
    started: Instant,
) -> Result<(), u16> {
    let limits = &generation.config.limits;
    request.upstream_head.reserve(request.body_missing);
    while request.body_missing > 0 {
        let mut room = (&mut request.upstream_head).limit(request.body_missing);
        let read = tokio::time::timeout(limits.body_read_timeout.0, stream.read_buf(&mut room));
        match read.await {
            Ok(Ok(n)) if n > 0 => request.body_missing -= n,
            Ok(_) => return Err(0),
            Err(_) => return Err(400),
        }
        if request.body_too_slow(limits, started) {
            return Err(408);
        }
    }
    Ok(())
}

/// Answers a request whose body could not be read (`status` 0: the client went away,
/// nothing to answer) and counts it as the full path counts it.
pub(crate) async fn body_failed<D: Downstream>(
    client: &mut D,
    status: u16,
    request: &Prepared,
    generation: &Generation,
    conn: ConnInfo<'_>,
    started: Instant,
) {
    if status == 0 {
        return;
    }
    let body = error_text(status);
    client
        .local(status, &body, request, generation, None, true)
        .await;
    let finished = Instant::now();
    let seconds = finished.duration_since(started).as_secs_f64();
    generation.routes[request.route]
        .metrics
        .observe(status, seconds);
    conn.metrics.rolling.record(finished, status, seconds);
}

/// The body of an error answered by the proxy, as the full path writes it.
fn error_text(status: u16) -> String {
    let reason = http::StatusCode::from_u16(status)
        .ok()
        .and_then(|s| s.canonical_reason())
        .unwrap_or("error");
    format!("{status} {reason}\n")
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

    /// Sends a complete response of the proxy's own (errors, rate limits).
    async fn local(
        &mut self,
        status: u16,
        body: &str,
        request: &Prepared,
        generation: &Generation,
        extra: Option<(&str, u64)>,
        close: bool,
    ) -> bool;
}

/// An HTTP/1 client connection.
struct Http1Client<'a> {
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

    async fn local(
        &mut self,
        status: u16,
        body: &str,
        request: &Prepared,
        generation: &Generation,
        extra: Option<(&str, u64)>,
        close: bool,
    ) -> bool {
        let head = local_response(status, body, request, generation, extra, close);
        self.body(&head, true).await
    }
}

/// Answers a prepared request on `client`: the rate limit's answer or the upstream's.
/// Returns whether the client connection can carry another request.
pub(crate) async fn proxy_request<D: Downstream>(
    client: &mut D,
    request: &Prepared,
    generation: &Generation,
    conn: ConnInfo<'_>,
    started: Instant,
) -> bool {
    let route = &generation.routes[request.route];
    let close = request.client_close || conn.closing;
    let (status, keep_alive) = match request.limited {
        Some(wait) => {
            conn.metrics
                .rate_limited
                .with_label_values(&[&route.name])
                .inc();
            let retry_after = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
            let sent = client
                .local(
                    429,
                    "too many requests; retry after the time in Retry-After\n",
                    request,
                    generation,
                    Some(("retry-after", retry_after.max(1))),
                    close,
                )
                .await;
            (429, sent && !close)
        }
        None => forward(client, request, generation, conn, started).await,
    };
    let finished = Instant::now();
    let seconds = finished.duration_since(started).as_secs_f64();
    D::counter(conn.metrics).inc();
    route.metrics.observe(status, seconds);
    conn.metrics.rolling.record(finished, status, seconds);
    keep_alive
}

/// A request the fast path serves, with everything it needs after parsing.
pub(crate) struct Prepared {
    pub(crate) route: usize,
    pub(crate) request_id: HeaderValue,
    /// The upstream request head, ready to write.
    pub(crate) upstream_head: Vec<u8>,
    pub(crate) head_request: bool,
    pub(crate) idempotent: bool,
    /// The client asked to close the connection after this request.
    pub(crate) client_close: bool,
    pub(crate) key_hash: Option<u64>,
    /// Set when the route's rate limit refused the request: the wait until it may retry.
    pub(crate) limited: Option<Duration>,
    /// The request body's length (Content-Length).
    pub(crate) body_len: u64,
    /// Bytes of the body still to be read from the client (the rest follows the head in
    /// `upstream_head`).
    pub(crate) body_missing: usize,
}

/// Parses the request head in `bytes` and decides whether this path serves it: `None`
/// sends it to Pingora. Nothing here has a side effect until that is decided (the rate
/// limit's token is taken last).
fn prepare(bytes: &[u8], generation: &Generation, conn: ConnInfo<'_>) -> Option<Prepared> {
    let mut raw_headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut raw_headers);
    // A head not complete in the first read or a head that does not parse: Pingora
    // reads on, or answers the error.
    let Ok(httparse::Status::Complete(head_len)) = req.parse(bytes) else {
        return None;
    };
    if req.version != Some(1) {
        return None;
    }
    let path = req.path?;
    if !path.starts_with('/') {
        return None;
    }
    let mut client_close = false;
    let mut hosts = 0;
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
            // Several fields (even equal ones) and lists are Pingora's to reconcile or
            // refuse.
            if length.is_some() {
                return None;
            }
            length = Some(parse_length(h.value)?);
        }
        if name.eq_ignore_ascii_case(b"host") {
            hosts += 1;
        }
        if name.eq_ignore_ascii_case(b"connection") {
            client_close |= tokens(h.value).any(|t| t.eq_ignore_ascii_case(b"close"));
        }
    }
    let body_len = length.unwrap_or(0);
    let early = &bytes[head_len..];
    // Bytes pipelined after the body, or a body larger than this path buffers.
    if early.len() as u64 > body_len || body_len > MAX_BODY {
        return None;
    }
    if hosts != 1 {
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
    let route = route_for(&parts, Some(&bytes[..head_len]), body_len, generation, conn)?;
    let prepared = admit(
        &parts,
        route,
        generation,
        conn,
        client_close,
        |id, route| upstream_head(&req, &parts, generation, conn, id, route),
    );
    Some(prepared.with_body(body_len, early))
}

/// A Content-Length value: digits only, at most 18 of them.
pub(crate) fn parse_length(value: &[u8]) -> Option<u64> {
    let value = value.trim_ascii();
    if value.is_empty() || value.len() > 18 || !value.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(value).ok()?.parse().ok()
}

/// The route of a request the fast path can serve: one that passes the request checks,
/// is not for the ACME or probe paths, and matches a `forward` route (not to be
/// redirected to HTTPS) whose `max_body_bytes` its `body_len` fits. `None` leaves the
/// request to Pingora. No side effect.
pub(crate) fn route_for(
    parts: &http::request::Parts,
    raw: Option<&[u8]>,
    body_len: u64,
    generation: &Generation,
    conn: ConnInfo<'_>,
) -> Option<usize> {
    let view = RequestView {
        method: &parts.method,
        uri: &parts.uri,
        headers: &parts.headers,
        raw,
    };
    check_request(view, generation.header_limits).ok()?;
    let url_path = parts.uri.path();
    if url_path.starts_with("/.well-known/acme-challenge/")
        || url_path == rampart_config::PROBE_PATH
    {
        return None;
    }
    let host = request_host(parts)?;
    let route_idx = generation.router.select(&RouteRequest {
        host: &host,
        path: url_path,
        headers: &parts.headers,
    })?;
    let route = &generation.routes[route_idx];
    if (route.https_redirect && conn.scheme == Scheme::Http)
        || !matches!(route.action, Action::Forward(_))
    {
        return None;
    }
    // Behind a login: the full path checks it.
    if route.basic_auth.is_some() {
        return None;
    }
    // Refused by allow_from: the full path answers 403.
    if !route.allow_from.is_empty() {
        let client = conn
            .peer
            .map(|p| generation.forwarding.client_ip(p, &parts.headers));
        if !route.admits(client) {
            return None;
        }
    }
    route.pool.as_ref()?;
    // Over the route's limit: the full path answers 413.
    if body_len > route.max_body {
        return None;
    }
    Some(route_idx)
}

impl Prepared {
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
}

/// Takes a request [`route_for`] chose `route` for: its request id, balancing key, upstream
/// head (written by `head` with the request id) and the route's rate-limit verdict,
/// which takes a token.
pub(crate) fn admit(
    parts: &http::request::Parts,
    route: usize,
    generation: &Generation,
    conn: ConnInfo<'_>,
    client_close: bool,
    head: impl FnOnce(&HeaderValue, &RouteRt) -> Vec<u8>,
) -> Prepared {
    let route_rt = &generation.routes[route];
    let client_ip = conn
        .peer
        .map(|p| generation.forwarding.client_ip(p, &parts.headers));
    let request_id = request_id(parts, generation);
    let key_hash = route_rt.pool.as_ref().and_then(|pool| {
        pool.balancer
            .uses_key()
            .then(|| hash_key(&pool.hash_key, parts, client_ip))
    });
    let upstream_head = head(&request_id, route_rt);
    let limited = route_rt.limiter.as_ref().and_then(|limiter| {
        limiter
            .check(hash_key(&limiter.config.key, parts, client_ip))
            .err()
    });
    Prepared {
        route,
        request_id,
        upstream_head,
        head_request: parts.method == Method::HEAD,
        idempotent: parts.method.is_idempotent(),
        client_close,
        key_hash,
        limited,
        body_len: 0,
        body_missing: 0,
    }
}

/// The comma-separated tokens of a header value.
pub(crate) fn tokens(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    value
        .split(|&b| b == b',')
        .map(<[u8]>::trim_ascii)
        .filter(|t| !t.is_empty())
}

/// The hop-by-hop headers of one message: the fixed list of `headers` plus every
/// header its `Connection` fields name (Content-Length and Transfer-Encoding stay:
/// they frame the message).
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
                && !name.eq_ignore_ascii_case("content-length")
                && !name.eq_ignore_ascii_case("transfer-encoding"))
    }
}

/// The request head sent upstream: the client's request line (its target without the
/// route's stripped prefix) and headers in their order and case, without hop-by-hop
/// headers, with the forwarding headers and the request id set as `edge` sets them.
fn upstream_head(
    req: &httparse::Request<'_, '_>,
    parts: &http::request::Parts,
    generation: &Generation,
    conn: ConnInfo<'_>,
    request_id: &HeaderValue,
    route: &RouteRt,
) -> Vec<u8> {
    let headers = &parts.headers;
    let host = headers
        .get(HOST)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let stripped = route.strip_prefix.as_deref();
    let forwarded = conn.peer.map(|peer| {
        generation
            .forwarding
            .forwarded_headers(peer, conn.scheme.as_str(), host, headers, stripped)
    });
    let forwarded = forwarded.unwrap_or_default();
    let id_name = &generation.forwarding.request_id;
    let hop_by_hop = HopByHop::of(req.headers);
    let mut out = request_line(
        req.method.unwrap_or("GET"),
        req.path.unwrap_or("/").as_bytes(),
        &parts.uri,
        stripped,
    );
    let edits = &route.request_headers;
    for h in req.headers.iter() {
        if hop_by_hop.contains(h.name)
            || id_name.as_str().eq_ignore_ascii_case(h.name)
            || forwarded
                .iter()
                .any(|(n, _)| n.eq_ignore_ascii_case(h.name))
            || edits.drops(h.name)
        {
            continue;
        }
        push_header(&mut out, h.name.as_bytes(), h.value);
    }
    finish_upstream_head(&mut out, &forwarded, edits, id_name, request_id);
    out
}

/// The start of an upstream request head: `METHOD target HTTP/1.1`, the target being
/// the client's `raw` one, or, when the route strips `stripped`, the rest of `uri`.
pub(crate) fn request_line(method: &str, raw: &[u8], uri: &Uri, stripped: Option<&str>) -> Vec<u8> {
    let mut out = Vec::with_capacity(512);
    out.extend_from_slice(method.as_bytes());
    out.push(b' ');
    match stripped {
        Some(prefix) => out.extend_from_slice(stripped_target(prefix, uri).as_bytes()),
        None => out.extend_from_slice(raw),
    }
    out.extend_from_slice(b" HTTP/1.1\r\n");
    out
}

/// The end of an upstream request head, after the client's own headers: the
/// forwarding headers the route's rules keep, the rules' own headers, the request id.
pub(crate) fn finish_upstream_head(
    out: &mut Vec<u8>,
    forwarded: &[(&'static str, String)],
    edits: &HeaderEdits,
    id_name: &HeaderName,
    request_id: &HeaderValue,
) {
    for (name, value) in forwarded {
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

/// A complete response from the proxy itself (errors, rate limits), as `edge` writes it.
fn local_response(
    status: u16,
    body: &str,
    request: &Prepared,
    generation: &Generation,
    extra: Option<(&str, u64)>,
    close: bool,
) -> Vec<u8> {
    let reason = http::StatusCode::from_u16(status)
        .ok()
        .and_then(|s| s.canonical_reason())
        .unwrap_or("");
    let mut out = Vec::with_capacity(256 + body.len());
    let _ = write!(
        out,
        "HTTP/1.1 {status} {reason}\r\ncontent-type: text/plain; charset=utf-8\r\n\
         content-length: {}\r\n",
        body.len()
    );
    if let Some((name, value)) = extra {
        let _ = write!(out, "{name}: {value}\r\n");
    }
    if status == 503 {
        out.extend_from_slice(b"retry-after: 1\r\n");
    }
    push_header(
        &mut out,
        generation.forwarding.request_id.as_str().as_bytes(),
        request.request_id.as_bytes(),
    );
    if close {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    if !request.head_request {
        out.extend_from_slice(body.as_bytes());
    }
    out
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
    generation: &Generation,
    conn: ConnInfo<'_>,
    started: Instant,
) -> (u16, bool) {
    let route = &generation.routes[request.route];
    let Some(pool) = route.pool.as_deref() else {
        return (500, false);
    };
    let mut tried = Tried::default();
    let mut attempts = 0u32;
    let deadline = clock::after(started, pool.timeouts.total.0);
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
        let Some(idx) = pool.balancer.pick(
            &pool.states,
            PickInput {
                key_hash: request.key_hash,
                tried: tried.as_slice(),
                now_ms: ms_at(now),
            },
        ) else {
            break 503;
        };
        tried.push(idx);
        attempts += 1;
        let may_retry = attempts <= pool.retries.attempts;
        let inflight = pool.endpoints[idx].state.start_request();
        let outcome = attempt(
            client, request, generation, pool, idx, now, deadline, may_retry, conn,
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
                if !(retry && may_retry) {
                    break status;
                }
            }
        }
    };
    // As Pingora's path after a failure: an error answer, and the connection closes.
    let body = error_text(status);
    client
        .local(status, &body, request, generation, None, true)
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
    may_retry: bool,
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
    if pool.retries.on_status.contains(&status) && request.idempotent && may_retry {
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
    let edits = &generation.routes[request.route].response_headers;
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

    proptest::proptest! {
        // Most random heads are declined (to Pingora): enough cases that hundreds are taken.
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(4096))]

        /// Whatever a client sends, a request the fast path takes goes upstream as one
        /// unambiguous HTTP/1.1 head: same method and target, one Host, no framing but
        /// one `Content-Length`, the length of the body the fast path reads, no
        /// hop-by-hop header, forwarding headers of our own.
        #[test]
        fn the_upstream_head_is_one_unambiguous_request(
            method in proptest::sample::select(vec!["GET", "HEAD", "DELETE", "POST", "OPTIONS", "G T"]),
            path in proptest::sample::select(vec!["/", "/a?b=c", "/a/../b", "//x", "*", "http://h/x", "/%2e%2e/", "/a b"]),
            headers in proptest::collection::vec(
                (
                    proptest::sample::select(vec![
                        "host", "Connection", "Keep-Alive", "TE", "Transfer-Encoding",
                        "Content-Length", "Upgrade", "Expect", "X-Forwarded-For", "Forwarded",
                        "X-Request-Id", "X-A", "Trailer", "Proxy-Connection", "Bad Name",
                    ]),
                    proptest::sample::select(vec![
                        "a.test", "close", "keep-alive, x-a", "chunked", "0", "5", "0, 0",
                        "websocket", "100-continue", "1.2.3.4", "x\tY", "\u{e9}", "", "a\rb",
                    ]),
                ),
                0..6,
            ),
            bare_lf in proptest::prelude::any::<bool>(),
            hosts in proptest::sample::select(vec![0usize, 1, 1, 1, 1, 2]),
        ) {
            static GENERATION: std::sync::LazyLock<(Generation, tempfile::TempDir)> =
                std::sync::LazyLock::new(forwarding_generation);
            let generation = &GENERATION.0;
            let eol = if bare_lf { "\n" } else { "\r\n" };
            let mut text = format!("{method} {path} HTTP/1.1{eol}");
            for _ in 0..hosts {
                text.push_str(&format!("Host: a.test{eol}"));
            }
            for (name, value) in &headers {
                text.push_str(&format!("{name}: {value}{eol}"));
            }
            text.push_str(eol);
            let metrics = Metrics::new();
            let conn = ConnInfo {
                scheme: Scheme::Http,
                peer: Some("127.0.0.1".parse().unwrap()),
                metrics: &metrics,
                closing: false,
            };
            let Some(prepared) = prepare(text.as_bytes(), generation, conn) else {
                return Ok(());
            };
            let (m, p, up) = parsed_upstream_head(&prepared.upstream_head);
            proptest::prop_assert_eq!(m, method);
            proptest::prop_assert_eq!(p, path);
            let count = |n: &str| up.iter().filter(|(k, _)| k == n).count();
            proptest::prop_assert_eq!(count("host"), 1);
            proptest::prop_assert_eq!(count("x-forwarded-for"), 1);
            proptest::prop_assert_eq!(count("x-request-id"), 1);
            proptest::prop_assert_eq!(count("transfer-encoding"), 0);
            proptest::prop_assert!(count("content-length") <= 1);
            if count("content-length") == 0 {
                proptest::prop_assert_eq!(prepared.body_len, 0);
            }
            for (k, v) in &up {
                proptest::prop_assert!(!HOP_BY_HOP.contains(&k.as_str()), "{} went upstream", k);
                if k == "content-length" {
                    proptest::prop_assert_eq!(v.trim().parse::<u64>().ok(), Some(prepared.body_len));
                    proptest::prop_assert_eq!(prepared.body_missing as u64, prepared.body_len);
                }
                if k == "x-forwarded-for" {
                    proptest::prop_assert_eq!(v, "127.0.0.1");
                }
            }
            // Headers the client's Connection named stay behind.
            let named: Vec<String> = headers
                .iter()
                .filter(|(n, _)| n.eq_ignore_ascii_case("connection"))
                .flat_map(|(_, v)| v.split(',').map(|t| t.trim().to_ascii_lowercase()))
                .filter(|t| !t.is_empty() && t != "content-length")
                .collect();
            for n in named {
                proptest::prop_assert_eq!(count(&n), 0, "{} was named by Connection", n);
            }
        }
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
