//! The `ProxyHttp` implementation: a table of contents. Each phase loads what it needs
//! from the request's generation and delegates to the module that owns the concern
//! (`limits`, `routing`, `balance`, `headers`, `health`).
//!
//! A request loads the current generation once, in `new_ctx`, and keeps it to the end:
//! a swap in the middle of a request never changes its route, pool or endpoints.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use async_trait::async_trait;
use bytes::Bytes;
use http::header::{HeaderValue, CONTENT_LENGTH, COOKIE, HOST};
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::prelude::HttpPeer;
use pingora::proxy::{FailToProxy, ProxyHttp, Session};
use pingora::{Error, ErrorSource, ErrorType, Result, RetryType};

use crate::access::{self, Arrival, AttemptSpan, Outcome};
use crate::fast::upstream::FailureKind;
use crate::generation::{remaining, Generation, PoolRt, RouteRt};
use crate::headers::{hop_by_hop, is_upgrade, joined_cookies};
use crate::health::{now_ms, InflightGuard};
use crate::limits::breaker::{BreakerState, Ticket};
use crate::limits::{content_length, BodyBreach, StreamedBody};
use crate::metrics::Metrics;
use crate::policy::{self, Answer, Client, Forward, Style, Verdict};
use pingora::protocols::http::compression::Encode;

/// Which listener a request came in on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scheme {
    /// Plain HTTP.
    Http,
    /// HTTPS.
    Https,
}

impl Scheme {
    /// "http" or "https".
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Scheme::Http => "http",
            Scheme::Https => "https",
        }
    }
}

/// The proxy logic of one listener.
pub struct Edge {
    scheme: Scheme,
    current: Arc<ArcSwap<Generation>>,
    metrics: Arc<Metrics>,
}

impl Edge {
    /// Proxy logic for a listener of `scheme` serving the live generation.
    #[must_use]
    pub fn new(scheme: Scheme, current: Arc<ArcSwap<Generation>>, metrics: Arc<Metrics>) -> Self {
        Self {
            scheme,
            current,
            metrics,
        }
    }
}

/// Endpoints a request has tried, without a heap allocation (at most 1 + 10 retries).
#[derive(Debug, Default)]
pub(crate) struct Tried {
    idx: [usize; 11],
    len: usize,
}

impl Tried {
    pub(crate) fn push(&mut self, i: usize) {
        if self.len < self.idx.len() {
            self.idx[self.len] = i;
            self.len += 1;
        }
    }
    pub(crate) fn as_slice(&self) -> &[usize] {
        &self.idx[..self.len]
    }
}

/// Per-request state.
pub struct RequestCtx {
    generation: Arc<Generation>,
    started: Instant,
    route: Option<usize>,
    /// The policy's plan when the request is forwarded.
    plan: Option<Forward>,
    request_id: Option<HeaderValue>,
    tried: Tried,
    attempts: u32,
    endpoint: Option<usize>,
    inflight: Option<InflightGuard>,
    upstream_started: Option<Instant>,
    /// When the current attempt had its connection (new or reused).
    upstream_connected: Option<Instant>,
    /// The current attempt's connect time (zero on a reused connection).
    upstream_connect: Option<Duration>,
    body_bytes: u64,
    /// Set when the current upstream error is a retryable status (502/503).
    status_retry: bool,
    /// Set once the current attempt's outcome was recorded in passive health.
    outcome_recorded: bool,
    /// Why the proxy answered itself (the access log's `error`).
    error: Option<&'static str>,
    /// The last upstream response's status and time to first byte.
    upstream_status: Option<(u16, Duration)>,
    /// The request's trace (the access log's `trace_id`).
    trace: Option<policy::Trace>,
    /// Every upstream attempt, when the request's span is exported.
    attempt_spans: Option<Vec<AttemptSpan>>,
    /// The endpoint's connect gate, held while Pingora finds or opens the HTTP/2
    /// connection of this attempt. Pingora's pool takes a connection out while it opens
    /// a stream on it, and opens a new connection for every request that finds none:
    /// a burst of 64 requests opened up to 51 connections to one h2c endpoint, one at a
    /// time through the gate it opens one (tests/upstream_protocols.rs).
    connecting: Option<tokio::sync::OwnedMutexGuard<()>>,
    /// The request's admission to its pool (circuit breaker, retry budget), from the
    /// first attempt to the end of the request.
    ticket: Option<Ticket<Arc<BreakerState>>>,
    /// The answer to give instead of the failure's own (the breaker's 503).
    refusal: Option<Answer>,
    /// The body of an upstream response replaced by an error page (`intercept`),
    /// until it is sent in place of the upstream's.
    intercepted: Option<Bytes>,
    /// The route mirror's copy of this request and its body so far.
    mirror: Option<(crate::mirror::PendingCopy, bytes::BytesMut)>,
    /// The encoder of a response being compressed, and its coding.
    encoder: Option<(crate::compress::Coding, Box<dyn Encode + Send + Sync>)>,
}

impl RequestCtx {
    fn route(&self) -> Option<&RouteRt> {
        self.route.map(|i| &self.generation.routes[i])
    }
    /// The error pages of this request's answers: the route's, the plan's pool's or
    /// the global ones.
    fn pages(&self) -> Option<&crate::policy::pages::ErrorPagesRt> {
        let pool = self.plan.as_ref().and(self.pool());
        self.generation
            .pages(self.route, pool.and_then(|p| p.error_pages.as_deref()))
    }

    /// The pool the plan chose (of a split, one of its pools), else the route's.
    fn pool(&self) -> Option<&Arc<PoolRt>> {
        let route = self.route()?;
        match &self.plan {
            Some(plan) => route.pool_at(plan.pool),
            None => route.pool.as_ref(),
        }
    }
    /// Whether the pool's retry budget allows another attempt and an endpoint this
    /// request has not tried can take it.
    fn retry_left(&self, pool: &PoolRt, metrics: &Metrics) -> bool {
        let key = self.plan.as_ref().map(|p| p.key).unwrap_or_default();
        self.attempts <= pool.retries.attempts
            && pool.can_retry(key, self.tried.as_slice(), now_ms())
            && self
                .ticket
                .as_ref()
                .is_none_or(|t| pool.retry_allowed(t, metrics))
    }

    /// The request's whole time budget: the plan's (the pool's `timeouts.total`, or
    /// less when a gRPC client set a deadline).
    fn total(&self, pool: &PoolRt) -> Duration {
        self.plan
            .as_ref()
            .map_or(pool.timeouts.total.0, |p| p.total)
    }

    fn labels(&self) -> (&str, &str) {
        let route = self.route().map_or("", |r| r.name.as_str());
        let pool = self.pool().map_or("", |p| p.name.as_str());
        (route, pool)
    }
}

#[async_trait]
impl ProxyHttp for Edge {
    type CTX = RequestCtx;

    fn new_ctx(&self) -> RequestCtx {
        RequestCtx {
            generation: self.current.load_full(),
            started: Instant::now(),
            route: None,
            plan: None,
            request_id: None,
            tried: Tried::default(),
            attempts: 0,
            endpoint: None,
            inflight: None,
            upstream_started: None,
            upstream_connected: None,
            upstream_connect: None,
            body_bytes: 0,
            status_retry: false,
            outcome_recorded: false,
            error: None,
            upstream_status: None,
            trace: None,
            attempt_spans: None,
            connecting: None,
            ticket: None,
            refusal: None,
            intercepted: None,
            mirror: None,
            encoder: None,
        }
    }

    async fn early_request_filter(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        let limits = &ctx.generation.config.limits;
        let keepalive = limits.keepalive_timeout.0.as_secs().max(1);
        // The keep-alive timeout applies to a connection that stays open: an HTTP/1.0
        // request without `Connection: keep-alive` (or one with `close`) ends its
        // connection after the answer, as RFC 9112 §9.3 has it.
        let persistent = session
            .as_downstream()
            .as_http1()
            .is_none_or(pingora::protocols::http::v1::server::HttpSession::will_keepalive);
        if persistent {
            session.set_keepalive(Some(keepalive));
        }
        let downstream = session.as_downstream_mut();
        downstream.set_read_timeout(Some(limits.body_read_timeout.0));
        downstream.set_write_timeout(Some(limits.send_timeout.0));
        Ok(())
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<bool> {
        let generation = ctx.generation.clone();
        let raw = session
            .as_downstream()
            .as_http1()
            .map(pingora::protocols::http::v1::server::HttpSession::get_headers_raw_bytes);
        // The connection's handshake (its SNI and client certificate), which the
        // policy reads only where some host authenticates clients.
        let tls = (self.scheme == Scheme::Https && generation.client_auth_in_use)
            .then(|| crate::tls::conn::CONNECTION.try_with(Arc::clone).ok())
            .flatten();
        let client = Client {
            scheme: self.scheme,
            peer: client_peer(session),
            tls: tls.as_deref(),
        };
        let body_ended = session.as_downstream().is_http2() && session.is_body_empty();
        let req = session.req_header();
        let view = policy::Request {
            parts: req,
            raw_head: raw.as_deref(),
            // Pingora keeps the target's fragment only in the raw head.
            raw_target: raw
                .as_deref()
                .and_then(policy::raw_target)
                .unwrap_or_else(|| req.raw_path()),
            body_ended,
        };
        // A fast path that decided and then handed the request over (its pool speaks
        // what the fast paths do not) passes its decision on.
        let decision = match policy::handed() {
            Some(decision) => *decision,
            None => policy::decide(&generation, view, client).await,
        };
        ctx.request_id = Some(decision.request_id);
        ctx.trace = decision.trace;
        if generation.tracing.is_some() && decision.trace.is_some_and(|t| t.sampled()) {
            ctx.attempt_spans = Some(Vec::new());
        }
        ctx.route = decision.route;
        match decision.verdict {
            Verdict::Forward(plan) => {
                if let Some(pause) = plan.stream_pause {
                    session.as_downstream_mut().set_read_timeout(Some(pause));
                }
                ctx.plan = Some(plan);
                if let Err(e) = buffer_http2_body(session, ctx).await {
                    if let Some(answer) = e.answer() {
                        send_answer(session, ctx, &answer).await?;
                    }
                    return Ok(true);
                }
                Ok(false)
            }
            Verdict::Answer(answer) => {
                let route = ctx.route().map(|r| r.name.as_str());
                self.metrics.count_answer(&answer, route);
                send_answer(session, ctx, &answer).await?;
                Ok(true)
            }
        }
    }

    async fn request_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<Bytes>,
        eos: bool,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        mirror_body(ctx, body.as_ref(), eos);
        if let Some(b) = body {
            ctx.body_bytes += b.len() as u64;
            let max_body = ctx.route().map_or(u64::MAX, |r| r.max_body);
            let grpc_stream = ctx.plan.as_ref().is_some_and(|p| p.stream_pause.is_some());
            let limits = StreamedBody::new(&ctx.generation.config.limits, max_body, grpc_stream);
            // The client's errors (Downstream): Pingora's HTTP/2 upstream path answers
            // them; as upstream errors it would only stop reading the body.
            let (status, why) = match limits.check(ctx.body_bytes, ctx.started) {
                Ok(()) => return Ok(()),
                Err(BodyBreach::TooLarge) => {
                    (413, "request body exceeds the route's max_body_bytes")
                }
                Err(BodyBreach::TooSlow) => {
                    (408, "request body arrives slower than limits.min_body_rate")
                }
            };
            return Err(Error::explain(ErrorType::HTTPStatus(status), why).into_down());
        }
        Ok(())
    }

    async fn upstream_peer(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> Result<Box<HttpPeer>> {
        let pool = ctx.pool().cloned().ok_or_else(|| {
            Error::explain(ErrorType::InternalError, "forward route without a pool")
        })?;
        let left = remaining(ctx.started, ctx.total(&pool));
        if left.is_zero() {
            return Error::e_explain(
                ErrorType::HTTPStatus(504),
                "timeouts.total exhausted before an upstream answered",
            );
        }
        // The policy hashed the key when the pool's balancer uses one, and read the
        // sticky cookie when the pool has one.
        let key = ctx.plan.as_ref().map(|p| p.key).unwrap_or_default();
        match ctx.ticket.as_mut() {
            Some(ticket) => ticket.retrying(),
            None => match pool.admit(pool.breaker.clone(), &self.metrics, now_ms()) {
                Ok(ticket) => ctx.ticket = Some(ticket),
                Err(refusal) => {
                    ctx.error = Some(refusal.as_str());
                    ctx.refusal = Some(refusal.answer());
                    return Error::e_explain(
                        ErrorType::HTTPStatus(503),
                        format!("pool {}: {}", pool.name, refusal.as_str()),
                    );
                }
            },
        }
        let Some(idx) = pool.pick(key, ctx.tried.as_slice(), now_ms()) else {
            return Error::e_explain(
                ErrorType::HTTPStatus(503),
                format!("pool {} has no available endpoint", pool.name),
            );
        };
        let endpoint = &pool.endpoints[idx];
        ctx.tried.push(idx);
        ctx.attempts += 1;
        ctx.endpoint = Some(idx);
        ctx.inflight = Some(endpoint.state.start_request());
        let now = Instant::now();
        ctx.upstream_started = Some(now);
        ctx.upstream_connected = None;
        ctx.upstream_connect = None;
        if let Some(spans) = ctx.attempt_spans.as_mut() {
            end_attempt(spans, None, Some("retried"));
            spans.push(AttemptSpan {
                endpoint: idx,
                start: now,
                end: now,
                status: None,
                error: None,
            });
        }
        ctx.status_retry = false;
        ctx.outcome_recorded = false;
        let t = &pool.timeouts;
        let client = pool
            .peer
            .proxy_protocol
            .and_then(|_| Some((inet(session.client_addr())?, inet(session.server_addr())?)));
        let mut peer = pool.peer.peer(endpoint, client, t.connect.0.min(left));
        if pool.peer.multiplexed() {
            // Bounded: past the connect timeout, go on without the gate.
            let gate = endpoint.state.connect_gate().lock_owned();
            ctx.connecting = tokio::time::timeout(t.connect.0.min(left), gate).await.ok();
        }
        peer.options.connection_timeout = Some(t.connect.0.min(left));
        peer.options.read_timeout = Some(t.first_byte.0.min(left));
        peer.options.write_timeout = Some(t.first_byte.0.min(left));
        peer.options.idle_timeout = Some(t.idle.0);
        Ok(Box::new(peer))
    }

    async fn connected_to_upstream(
        &self,
        _session: &mut Session,
        reused: bool,
        _peer: &HttpPeer,
        _fd: std::os::unix::io::RawFd,
        digest: Option<&pingora::protocols::Digest>,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        ctx.connecting = None;
        // Pingora's connector offers TLS 1.2 and 1.3: a pool that wants 1.3 only refuses
        // a connection that settled for less before any request byte is sent on it.
        if let Some(tls) = ctx.pool().and_then(|p| p.peer.tls.as_ref()) {
            let version = digest
                .and_then(|d| d.ssl_digest.as_ref())
                .map(|d| d.version.as_ref());
            if !tls.accepts(version) {
                return Error::e_explain(
                    ErrorType::HTTPStatus(502),
                    format!(
                        "the endpoint negotiated {}, below the pool's tls.min_version",
                        version.unwrap_or("no TLS")
                    ),
                );
            }
        }
        let now = Instant::now();
        ctx.upstream_connected = Some(now);
        ctx.upstream_connect = Some(match (reused, ctx.upstream_started) {
            (false, Some(started)) => now.duration_since(started),
            _ => Duration::ZERO,
        });
        Ok(())
    }

    async fn upstream_request_filter(
        &self,
        session: &mut Session,
        upstream: &mut RequestHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        let Some(plan) = ctx.plan.as_ref() else {
            return Error::e_explain(ErrorType::InternalError, "forwarding without a plan");
        };
        let upgrade = is_upgrade(&upstream.headers);
        let te_trailers = crate::headers::te_trailers(&upstream.headers);
        for name in hop_by_hop(&upstream.headers, upgrade) {
            upstream.remove_header(&name);
        }
        if te_trailers && ctx.pool().is_some_and(|p| p.peer.multiplexed()) {
            upstream.insert_header(http::header::TE, "trailers")?;
        }
        // Repeated identical Content-Length values (accepted by check_request, as a list
        // or as several fields) go on as one: a strict upstream would refuse them.
        let lengths = upstream.headers.get_all(CONTENT_LENGTH);
        if lengths.iter().count() > 1 || lengths.iter().any(|v| v.as_bytes().contains(&b',')) {
            if let Ok(Some(n)) = content_length(&upstream.headers) {
                upstream.insert_header(CONTENT_LENGTH, n.to_string())?;
            }
        }
        // HTTP/2 clients may split Cookie into several fields; an HTTP/1.1 upstream gets
        // them as one (RFC 9113 §8.2.3).
        if session.as_downstream().is_http2()
            && upstream.headers.get_all(COOKIE).iter().nth(1).is_some()
        {
            if let Some(joined) = joined_cookies(&upstream.headers) {
                upstream.insert_header(COOKIE, joined)?;
            }
        }
        // The authority the request was routed on, in place of the client's Host (left
        // as it is, in its case and place, when it is that already).
        if upstream.headers.get(HOST) != Some(&plan.host) {
            upstream.insert_header(HOST, plan.host.clone())?;
        }
        if let Some(target) = &plan.target {
            let uri = target.parse::<http::Uri>().map_err(|e| {
                Error::because(ErrorType::InvalidHTTPHeader, "the upstream target", e)
            })?;
            upstream.set_uri(uri);
        }
        let route = &ctx.generation.routes[plan.route];
        let edits = &route.request_headers;
        // Only the proxy sets the client certificate headers (from the plan), and only
        // the route's auth service its identity headers.
        for name in &ctx.generation.client_cert_headers {
            upstream.remove_header(name);
        }
        for name in route.forward_auth.iter().flat_map(|a| &a.copy) {
            upstream.remove_header(name);
        }
        // Removed and appended (not replaced in place), as the fast paths write them.
        for (name, value) in &plan.forwarded {
            upstream.remove_header(name);
            if !edits.drops(name.as_str()) {
                upstream.append_header(name.clone(), value.as_str())?;
            }
        }
        for name in &edits.remove {
            upstream.remove_header(name);
        }
        for (name, value) in &edits.set {
            upstream.remove_header(name);
            upstream.append_header(name.clone(), value.clone())?;
        }
        if let Some(id) = &ctx.request_id {
            let name = ctx.generation.forwarding.request_id.clone();
            upstream.remove_header(&name);
            upstream.append_header(name, id.clone())?;
        }
        Ok(())
    }

    async fn upstream_response_filter(
        &self,
        session: &mut Session,
        resp: &mut ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        let Some(pool) = ctx.pool().cloned() else {
            return Ok(());
        };
        let status = resp.status.as_u16();
        // From the connection, as the fast paths count it: the connect is its own figure.
        if let (Some(idx), Some(started)) = (
            ctx.endpoint,
            ctx.upstream_connected.or(ctx.upstream_started),
        ) {
            let ttfb = started.elapsed();
            pool.ttfb.observe(ttfb.as_secs_f64());
            pool.states[idx].observe_latency(ttfb, now_ms());
            ctx.upstream_status = Some((status, ttfb));
        }
        if let Some(spans) = ctx.attempt_spans.as_mut() {
            end_attempt(spans, Some(status), None);
        }
        if pool.retries.on_status.contains(&status)
            && status_retry_allowed(session, ctx, &pool, &self.metrics)
        {
            self.record_failure(ctx, &pool, FailureKind::Status);
            ctx.status_retry = true;
            let mut e = Error::explain(
                ErrorType::HTTPStatus(status),
                format!("upstream answered {status}; retrying on another endpoint"),
            );
            e.set_retry(true);
            return Err(e);
        }
        if matches!(status, 502..=504) {
            self.record_failure(ctx, &pool, FailureKind::Status);
        } else {
            self.record_success(ctx, &pool);
        }
        if status != 101 {
            for name in hop_by_hop(&resp.headers, false) {
                resp.remove_header(&name);
            }
        }
        if let Some(route) = ctx.route() {
            for name in &route.response_headers.remove {
                resp.remove_header(name);
            }
            for (name, value) in &route.response_headers.set {
                resp.insert_header(name.clone(), value.clone())?;
            }
        }
        if let (Some(plan), Some(idx)) = (&ctx.plan, ctx.endpoint) {
            let https = self.scheme == Scheme::Https;
            for cookie in plan.set_cookies(&pool, idx, https).into_iter().flatten() {
                resp.append_header(http::header::SET_COOKIE, cookie)?;
            }
        }
        if ctx.pages().is_some_and(|p| p.intercept.contains(&status)) {
            // The upstream's body is dropped as it comes (response_body_filter) and
            // the page sent in its place.
            let (head, body) = answer_head(session, ctx, &Answer::Intercepted(status))?;
            *resp = head;
            ctx.error = Some("upstream_status");
            ctx.intercepted = Some(body);
        } else if let Some(c) = ctx.route().and_then(|r| r.compress.as_ref()) {
            if c.eligible(resp) {
                crate::compress::add_vary(resp);
                let coding = ctx.plan.as_ref().and_then(|p| p.compress);
                let encoder = coding.and_then(|coding| Some((coding, c.apply(resp, coding)?)));
                ctx.encoder = encoder;
            }
        }
        Ok(())
    }

    fn upstream_response_body_filter(
        &self,
        _session: &mut Session,
        _body: &mut Option<Bytes>,
        _eos: bool,
        ctx: &mut RequestCtx,
    ) -> Result<Option<Duration>> {
        if let Some(pool) = ctx.pool() {
            if remaining(ctx.started, ctx.total(pool)).is_zero() {
                return Error::e_explain(
                    ErrorType::ReadTimedout,
                    "timeouts.total exceeded while streaming the response",
                );
            }
            // The endpoint left the pool and its drain time is over.
            let drained = ctx
                .endpoint
                .and_then(|i| pool.endpoints.get(i))
                .is_some_and(|e| e.state.drained(pool.drain_timeout));
            if drained {
                return Error::e_explain(
                    ErrorType::ReadTimedout,
                    "the endpoint left the pool and drain_timeout passed while streaming the response",
                );
            }
        }
        Ok(None)
    }

    fn response_body_filter(
        &self,
        session: &mut Session,
        body: &mut Option<Bytes>,
        end_of_stream: bool,
        ctx: &mut RequestCtx,
    ) -> Result<Option<Duration>> {
        if let Some(page) = ctx.intercepted.as_mut() {
            let head = session.req_header().method == http::Method::HEAD;
            // The page once (it may be empty: then nothing), then nothing more.
            *body = (!head && !page.is_empty()).then(|| std::mem::take(page));
        } else if let Some((_, encoder)) = ctx.encoder.as_mut() {
            let input = body.as_deref().unwrap_or(&[]);
            let out = encoder.encode(input, end_of_stream)?;
            *body = (!out.is_empty()).then_some(out);
        }
        Ok(None)
    }

    async fn response_filter(
        &self,
        _session: &mut Session,
        resp: &mut ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        if let Some(id) = &ctx.request_id {
            resp.insert_header(ctx.generation.forwarding.request_id.clone(), id.clone())?;
        }
        Ok(())
    }

    fn fail_to_connect(
        &self,
        session: &mut Session,
        _peer: &HttpPeer,
        ctx: &mut RequestCtx,
        mut e: Box<Error>,
    ) -> Box<Error> {
        ctx.connecting = None;
        let Some(pool) = ctx.pool().cloned() else {
            return e;
        };
        if let Some(idx) = ctx.endpoint {
            // Why, for /status (a TLS failure names the certificate problem).
            pool.states[idx].note_error(now_ms(), format!("connecting: {e}"));
        }
        self.record_failure(ctx, &pool, FailureKind::Connect);
        // Nothing reached the upstream: a retry is safe for any method, but a body that
        // was already read from the client cannot be replayed.
        let body_pending = session.as_ref().retry_buffer_truncated();
        e.set_retry(ctx.retry_left(&pool, &self.metrics) && !body_pending);
        e
    }

    fn error_while_proxy(
        &self,
        peer: &HttpPeer,
        session: &mut Session,
        e: Box<Error>,
        ctx: &mut RequestCtx,
        client_reused: bool,
    ) -> Box<Error> {
        let mut e = e.more_context(format!("upstream {peer}"));
        let Some(pool) = ctx.pool().cloned() else {
            return e;
        };
        if ctx.status_retry {
            e.set_retry(ctx.retry_left(&pool, &self.metrics));
            return e;
        }
        let kind = if matches!(
            e.etype(),
            ErrorType::ReadTimedout | ErrorType::WriteTimedout
        ) {
            FailureKind::Timeout
        } else {
            FailureKind::Error
        };
        // A pooled connection that the upstream had already closed is not the endpoint's
        // fault, and neither is the client's (a slow or vanished client, a body over the
        // limit): only upstream errors count against it, or slow clients would get
        // healthy endpoints ejected. (`RetryType::retry()` panics while undecided: match,
        // do not call it.)
        let stale_pooled = client_reused && matches!(e.retry, RetryType::ReusedOnly);
        if !stale_pooled && e.esource() == &ErrorSource::Upstream {
            self.record_failure(ctx, &pool, kind);
        }
        // An idempotent request without a body can go to another endpoint after a
        // reset or timeout, as long as nothing of the response reached the client yet.
        let safe = session.req_header().method.is_idempotent()
            && ctx.body_bytes == 0
            && !session.as_ref().retry_buffer_truncated()
            && session.response_written().is_none()
            && !is_upgrade(&session.req_header().headers);
        e.set_retry(safe && ctx.retry_left(&pool, &self.metrics));
        e
    }

    async fn fail_to_proxy(
        &self,
        session: &mut Session,
        e: &Error,
        ctx: &mut RequestCtx,
    ) -> FailToProxy {
        let code = error_status(e);
        // The connection is not reused after a failure; say so (Connection: close) so
        // that keep-alive clients do not send their next request into a closing socket.
        session.set_keepalive(None);
        if code > 0 && session.response_written().is_none() {
            let answer = ctx.refusal.take().unwrap_or(Answer::Failed(code));
            if let Err(err) = send_answer(session, ctx, &answer).await {
                tracing::debug!("could not send the error response: {err}");
            }
        }
        FailToProxy {
            error_code: code,
            can_reuse_downstream: false,
        }
    }

    async fn logging(&self, session: &mut Session, e: Option<&Error>, ctx: &mut RequestCtx) {
        let status = session
            .response_written()
            .map_or_else(|| e.map_or(0, error_status), |r| r.status.as_u16());
        ctx.inflight = None;
        ctx.ticket = None;
        if let Some((coding, encoder)) = ctx.encoder.take() {
            let (_, bytes_in, bytes_out, took) = encoder.stat();
            let m = &self.metrics;
            m.compression_bytes
                .with_label_values(&[coding.token(), "in"])
                .inc_by(bytes_in as u64);
            m.compression_bytes
                .with_label_values(&[coding.token(), "out"])
                .inc_by(bytes_out as u64);
            m.compression_seconds
                .with_label_values(&[coding.token()])
                .inc_by(took.as_secs_f64());
        }
        if let Some(spans) = ctx.attempt_spans.as_mut() {
            end_attempt(spans, None, None);
        }
        if let Some(e) = e {
            let (route, pool) = ctx.labels();
            tracing::debug!(route, pool, status, "request failed: {e}");
        }
        let generation = ctx.generation.clone();
        let peer = client_peer(session);
        let arrival = Arrival::of(
            &generation,
            session.req_header(),
            peer,
            ctx.route,
            ctx.trace,
        );
        let downstream = session.as_downstream();
        let tls = arrival
            .is_some()
            .then(|| crate::tls::conn::CONNECTION.try_with(Arc::clone).ok())
            .flatten();
        let outcome = Outcome {
            status,
            route: ctx.route,
            request_id: ctx.request_id.as_ref().map(HeaderValue::as_bytes),
            upstream: ctx.pool().map(AsRef::as_ref).zip(ctx.endpoint),
            pool: ctx.plan.as_ref().and(ctx.pool()).map(AsRef::as_ref),
            upstream_status: ctx.upstream_status.map(|(s, _)| s),
            upstream_connect: ctx.upstream_connect,
            upstream_ttfb: ctx.upstream_status.map(|(_, t)| t),
            attempts: ctx.attempts,
            fast_path: false,
            error: ctx.error.or_else(|| e.map(|e| error_kind(e, status))),
            bytes_sent: Some(downstream.body_bytes_sent() as u64),
            tls: tls.as_deref(),
            trace: ctx.trace,
            attempt_spans: ctx.attempt_spans.as_deref().unwrap_or_default(),
        };
        access::finish(
            &generation,
            &self.metrics,
            self.scheme,
            peer,
            arrival.as_deref(),
            &outcome,
            ctx.started,
        );
    }
}

impl Edge {
    fn record_failure(&self, ctx: &mut RequestCtx, pool: &PoolRt, kind: FailureKind) {
        if let Some(spans) = ctx.attempt_spans.as_mut() {
            end_attempt(spans, None, Some(kind.error()));
        }
        if !ctx.outcome_recorded {
            if let Some(t) = ctx.ticket.as_mut() {
                t.record(false, pool.circuit_breaker.as_ref(), now_ms());
            }
        }
        record_endpoint_failure(
            &self.metrics,
            pool,
            ctx.endpoint,
            kind,
            &mut ctx.outcome_recorded,
        );
    }

    fn record_success(&self, ctx: &mut RequestCtx, pool: &PoolRt) {
        let Some(idx) = ctx.endpoint else { return };
        if !std::mem::replace(&mut ctx.outcome_recorded, true) {
            pool.states[idx].record_success();
            if let Some(t) = ctx.ticket.as_mut() {
                t.record(true, pool.circuit_breaker.as_ref(), now_ms());
            }
        }
    }
}

/// Counts an upstream failure of `kind` for the pool and, unless this attempt's outcome
/// was `recorded` already, against endpoint `idx`'s passive health (ejecting it after
/// enough in a row).
pub(crate) fn record_endpoint_failure(
    metrics: &Metrics,
    pool: &PoolRt,
    idx: Option<usize>,
    kind: FailureKind,
    recorded: &mut bool,
) {
    metrics
        .upstream_failures
        .with_label_values(&[pool.name.as_str(), kind.as_str()])
        .inc();
    let Some(idx) = idx else { return };
    if std::mem::replace(recorded, true) {
        return;
    }
    let ep = &pool.endpoints[idx];
    let now = now_ms();
    if let Some(period) = ep
        .state
        .record_failure(pool.eject, now, pool.may_eject(now))
    {
        metrics
            .endpoint_ejections
            .with_label_values(&[pool.name.as_str(), ep.id.as_str()])
            .inc();
        tracing::warn!(pool = %pool.name, endpoint = %ep.id, "ejected for {period:?} after {} consecutive failures", pool.eject.consecutive_failures);
    }
}

/// Whether a 502/503 may be retried: idempotent method, no request body at all, and
/// attempts left.
fn status_retry_allowed(
    session: &Session,
    ctx: &RequestCtx,
    pool: &PoolRt,
    metrics: &Metrics,
) -> bool {
    let req = session.req_header();
    let bodiless = ctx.body_bytes == 0
        && !req.headers.contains_key(http::header::TRANSFER_ENCODING)
        && content_length(&req.headers).ok().flatten().unwrap_or(0) == 0;
    req.method.is_idempotent()
        && bodiless
        && !is_upgrade(&req.headers)
        && ctx.retry_left(pool, metrics)
}

/// Ends the last attempt if it is still open (its end not set past its start), with
/// the upstream's `status` or why it failed.
fn end_attempt(spans: &mut [AttemptSpan], status: Option<u16>, error: Option<&'static str>) {
    if let Some(last) = spans.last_mut() {
        if last.end == last.start && last.status.is_none() && last.error.is_none() {
            last.end = Instant::now();
            last.status = status;
            last.error = error;
        }
    }
}

/// The access log's error kind of a request that failed with `e` (answered `status`).
fn error_kind(e: &Error, status: u16) -> &'static str {
    let upstream = e.esource() == &ErrorSource::Upstream;
    match e.etype() {
        _ if e.esource() == &ErrorSource::Downstream => "client_closed",
        ErrorType::ConnectTimedout | ErrorType::ConnectRefused | ErrorType::ConnectError
            if upstream =>
        {
            "upstream_connect"
        }
        ErrorType::ReadTimedout | ErrorType::WriteTimedout if upstream => "upstream_timeout",
        _ => access::failure_kind(status),
    }
}

/// The status answered for a proxying error.
fn error_status(e: &Error) -> u16 {
    match e.etype() {
        ErrorType::HTTPStatus(code) => *code,
        ErrorType::ConnectTimedout | ErrorType::ReadTimedout | ErrorType::WriteTimedout
            if e.esource() == &ErrorSource::Upstream =>
        {
            504
        }
        _ => match e.esource() {
            ErrorSource::Upstream => 502,
            ErrorSource::Downstream => match e.etype() {
                ErrorType::WriteError | ErrorType::ReadError | ErrorType::ConnectionClosed => 0,
                _ => 400,
            },
            ErrorSource::Internal | ErrorSource::Unset => 500,
        },
    }
}

/// Reads an HTTP/2 request body of a declared length of up to 64 KiB whole before
/// anything is forwarded, as the HTTP/2 fast path does, into Pingora's retry buffer
/// (which Pingora sends upstream first): a body that does not match its length is
/// refused and nothing reaches the upstream. Larger bodies stream.
async fn buffer_http2_body(
    session: &mut Session,
    ctx: &mut RequestCtx,
) -> std::result::Result<(), crate::fast::BodyError> {
    if !session.as_downstream().is_http2() || session.is_body_empty() {
        return Ok(());
    }
    let declared = content_length(&session.req_header().headers).ok().flatten();
    let Some(declared) = declared.filter(|&n| n <= crate::fast::MAX_BODY) else {
        return Ok(());
    };
    session.as_mut().enable_retry_buffering();
    let limits = &ctx.generation.config.limits;
    let mut read = 0u64;
    let result =
        crate::fast::h2::read_declared_body(declared, limits, ctx.started, session, |data| {
            read += data.len() as u64;
        })
        .await;
    ctx.body_bytes = read;
    result
}

/// Gathers the body of a request the route mirrors, and sends the copy at its end
/// (or gives it up once the body passes the mirror's `max_body`).
fn mirror_body(ctx: &mut RequestCtx, chunk: Option<&Bytes>, eos: bool) {
    if ctx.mirror.is_none() {
        let Some(copy) = ctx
            .plan
            .as_ref()
            .and_then(|p| p.mirror.as_ref())
            .and_then(|m| m.take())
        else {
            return;
        };
        ctx.mirror = Some((copy, bytes::BytesMut::new()));
    }
    let Some((copy, buf)) = ctx.mirror.as_mut() else {
        return;
    };
    if let Some(chunk) = chunk {
        if (buf.len() + chunk.len()) as u64 > copy.max_body() {
            if let Some((copy, _)) = ctx.mirror.take() {
                copy.too_large();
            }
            return;
        }
        buf.extend_from_slice(chunk);
    }
    if eos {
        if let Some((copy, buf)) = ctx.mirror.take() {
            copy.send(buf.freeze());
        }
    }
}

/// The head and body of `answer` to the request of `session`: its request id, the form
/// its `Accept` asks for, the error pages of its route or pool.
fn answer_head(
    session: &Session,
    ctx: &RequestCtx,
    answer: &Answer,
) -> Result<(ResponseHeader, Bytes)> {
    let id = ctx
        .request_id
        .as_ref()
        .map(|v| (&ctx.generation.forwarding.request_id, v));
    let style = Style::of(&session.req_header().headers);
    answer.response_header(id, style, ctx.pages())
}

/// Writes the policy's answer (or a failure's) on Pingora's session.
async fn send_answer(session: &mut Session, ctx: &mut RequestCtx, answer: &Answer) -> Result<()> {
    ctx.error = access::error_kind(answer);
    if answer.closes() {
        session.set_keepalive(None);
    }
    let (head, body) = answer_head(session, ctx, answer)?;
    let head_only = session.req_header().method == http::Method::HEAD;
    session
        .write_response_header(Box::new(head), head_only || body.is_empty())
        .await?;
    if !head_only && !body.is_empty() {
        session.write_response_body(Some(body), true).await?;
    }
    Ok(())
}

fn inet(addr: Option<&pingora::protocols::l4::socket::SocketAddr>) -> Option<std::net::SocketAddr> {
    addr.and_then(pingora::protocols::l4::socket::SocketAddr::as_inet)
        .copied()
}

fn client_peer(session: &Session) -> Option<IpAddr> {
    inet(session.client_addr()).map(|a| a.ip())
}
