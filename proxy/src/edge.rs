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
use http::header::{HeaderValue, CONTENT_LENGTH, CONTENT_TYPE, COOKIE, HOST, LOCATION};
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::prelude::HttpPeer;
use pingora::proxy::{FailToProxy, ProxyHttp, Session};
use pingora::{Error, ErrorSource, ErrorType, Result, RetryType};
use rampart_config::{Action, HashKey};

use crate::balance::PickInput;
use crate::generation::{remaining, Generation, PoolRt, RouteRt};
use crate::headers::{hop_by_hop, is_upgrade, joined_cookies, valid_request_id};
use crate::health::{now_ms, InflightGuard};
use crate::limits::{check_request, content_length, Rejection, RequestView};
use crate::metrics::Metrics;
use crate::routing::{stripped_target, RouteRequest};

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
    client_ip: Option<IpAddr>,
    request_id: Option<HeaderValue>,
    tried: Tried,
    attempts: u32,
    endpoint: Option<usize>,
    inflight: Option<InflightGuard>,
    upstream_started: Option<Instant>,
    body_bytes: u64,
    /// Set when the current upstream error is a retryable status (502/503).
    status_retry: bool,
    /// Set once the current attempt's outcome was recorded in passive health.
    outcome_recorded: bool,
}

impl RequestCtx {
    fn route(&self) -> Option<&RouteRt> {
        self.route.map(|i| &self.generation.routes[i])
    }
    fn pool(&self) -> Option<&Arc<PoolRt>> {
        self.route().and_then(|r| r.pool.as_ref())
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
            client_ip: None,
            request_id: None,
            tried: Tried::default(),
            attempts: 0,
            endpoint: None,
            inflight: None,
            upstream_started: None,
            body_bytes: 0,
            status_retry: false,
            outcome_recorded: false,
        }
    }

    async fn early_request_filter(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        let limits = &ctx.generation.config.limits;
        let keepalive = limits.keepalive_timeout.0.as_secs().max(1);
        session.set_keepalive(Some(keepalive));
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
        let req = session.req_header();
        let view = RequestView {
            method: &req.method,
            uri: &req.uri,
            headers: &req.headers,
            raw: raw.as_deref(),
        };
        if let Err(rejection) = check_request(view, generation.header_limits) {
            return reject(session, ctx, rejection).await;
        }
        if let Some(token) = session
            .req_header()
            .uri
            .path()
            .strip_prefix("/.well-known/acme-challenge/")
        {
            // An ACME HTTP-01 validation for a certificate the controller is ordering:
            // answered before any route (and before HTTPS redirects), by every proxy.
            if let Some(key_auth) = generation.acme_challenges.get(token) {
                let body = Bytes::from(key_auth.clone());
                respond(session, ctx, 200, "application/octet-stream", body, None).await?;
                return Ok(true);
            }
        }
        if session.req_header().uri.path() == rampart_config::PROBE_PATH {
            // The controller's DNS probe: answered here, before any route, so that it
            // tests this listener and never reaches a site.
            let (status, body) = if generation.version > 0 {
                (200, "ok\n")
            } else {
                (503, "no configuration yet\n")
            };
            respond(
                session,
                ctx,
                status,
                "text/plain; charset=utf-8",
                Bytes::from_static(body.as_bytes()),
                None,
            )
            .await?;
            return Ok(true);
        }
        let peer = client_peer(session);
        ctx.client_ip = peer.map(|p| {
            generation
                .forwarding
                .client_ip(p, &session.req_header().headers)
        });
        ctx.request_id = Some(request_id(session.req_header(), &generation));
        let Some(host) = request_host(session.req_header()) else {
            return reject(session, ctx, Rejection::MissingHost).await;
        };
        ctx.route = generation.router.select(&RouteRequest {
            host: &host,
            path: session.req_header().uri.path(),
            headers: &session.req_header().headers,
        });
        let Some(route) = ctx.route() else {
            respond(
                session,
                ctx,
                404,
                "text/plain; charset=utf-8",
                Bytes::from_static(b"no route matches this request\n"),
                None,
            )
            .await?;
            return Ok(true);
        };
        if !route.admits(ctx.client_ip) {
            respond(
                session,
                ctx,
                403,
                "text/plain; charset=utf-8",
                Bytes::from_static(b"forbidden: this route does not serve your address\n"),
                None,
            )
            .await?;
            return Ok(true);
        }
        if route.https_redirect && self.scheme == Scheme::Http {
            let location = https_location(&host, generation.https_port, session.req_header());
            respond(
                session,
                ctx,
                308,
                "text/plain; charset=utf-8",
                Bytes::new(),
                Some((LOCATION, location)),
            )
            .await?;
            return Ok(true);
        }
        if let Some(limiter) = &route.limiter {
            let key = hash_key(&limiter.config.key, session.req_header(), ctx.client_ip);
            if let Err(wait) = limiter.check(key) {
                self.metrics
                    .rate_limited
                    .with_label_values(&[&route.name])
                    .inc();
                let retry_after = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
                respond(
                    session,
                    ctx,
                    429,
                    "text/plain; charset=utf-8",
                    Bytes::from_static(b"too many requests; retry after the time in Retry-After\n"),
                    Some((http::header::RETRY_AFTER, retry_after.max(1).to_string())),
                )
                .await?;
                return Ok(true);
            }
        }
        // After the HTTPS redirect (no password over plain HTTP) and the rate limit
        // (which bounds the bcrypt work a guesser can cause).
        if let Some(auth) = route.basic_auth.clone() {
            let authorization = session
                .req_header()
                .headers
                .get(http::header::AUTHORIZATION)
                .map(|v| v.as_bytes().to_vec());
            if !auth.admits(authorization.as_deref()).await {
                respond(
                    session,
                    ctx,
                    401,
                    "text/plain; charset=utf-8",
                    Bytes::from_static(b"authentication required\n"),
                    Some((http::header::WWW_AUTHENTICATE, auth.challenge.clone())),
                )
                .await?;
                return Ok(true);
            }
        }
        // Borrowed again: answering above needed the context mutably.
        let Some(route) = ctx.route() else {
            return Ok(false);
        };
        match &route.action {
            Action::Respond(r) => {
                let (status, content_type, body) = (
                    r.status,
                    r.content_type.clone(),
                    Bytes::from(r.body.clone()),
                );
                respond(session, ctx, status, &content_type, body, None).await?;
                Ok(true)
            }
            Action::Redirect(r) => {
                let mut location = r.location.clone();
                if r.keep_path {
                    let pq = session
                        .req_header()
                        .uri
                        .path_and_query()
                        .map_or("/", |pq| pq.as_str());
                    location = format!("{}{pq}", location.trim_end_matches('/'));
                }
                respond(
                    session,
                    ctx,
                    r.status,
                    "text/plain; charset=utf-8",
                    Bytes::new(),
                    Some((LOCATION, location)),
                )
                .await?;
                Ok(true)
            }
            Action::Forward(_) => {
                let declared = content_length(&session.req_header().headers)
                    .ok()
                    .flatten()
                    .unwrap_or(0);
                if declared > route.max_body {
                    return reject(session, ctx, Rejection::BodyTooLarge).await;
                }
                Ok(false)
            }
        }
    }

    async fn request_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<Bytes>,
        _eos: bool,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        if let Some(b) = body {
            ctx.body_bytes += b.len() as u64;
            if ctx.route().is_some_and(|r| ctx.body_bytes > r.max_body) {
                return Error::e_explain(
                    ErrorType::HTTPStatus(413),
                    "request body exceeds the route's max_body_bytes",
                );
            }
            let limits = &ctx.generation.config.limits;
            if body_too_slow(
                ctx.body_bytes,
                ctx.started.elapsed(),
                limits.body_read_timeout.0,
                limits.min_body_rate.0,
            ) {
                return Error::e_explain(
                    ErrorType::HTTPStatus(408),
                    "request body arrives slower than limits.min_body_rate",
                );
            }
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
        let left = remaining(ctx.started, pool.timeouts.total.0);
        if left.is_zero() {
            return Error::e_explain(
                ErrorType::HTTPStatus(504),
                "timeouts.total exhausted before an upstream answered",
            );
        }
        // Only consistent hashing reads the key; skip the hashing for other policies.
        let key_hash = pool
            .balancer
            .uses_key()
            .then(|| hash_key(&pool.hash_key, session.req_header(), ctx.client_ip));
        let Some(idx) = pool.balancer.pick(
            &pool.states,
            PickInput {
                key_hash,
                tried: ctx.tried.as_slice(),
                now_ms: now_ms(),
            },
        ) else {
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
        ctx.upstream_started = Some(Instant::now());
        ctx.status_retry = false;
        ctx.outcome_recorded = false;
        let mut peer = HttpPeer::new(endpoint.addr, false, String::new());
        let t = &pool.timeouts;
        peer.options.connection_timeout = Some(t.connect.0.min(left));
        peer.options.read_timeout = Some(t.first_byte.0.min(left));
        peer.options.write_timeout = Some(t.first_byte.0.min(left));
        peer.options.idle_timeout = Some(t.idle.0);
        Ok(Box::new(peer))
    }

    async fn upstream_request_filter(
        &self,
        session: &mut Session,
        upstream: &mut RequestHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        let upgrade = is_upgrade(&upstream.headers);
        for name in hop_by_hop(&upstream.headers, upgrade) {
            upstream.remove_header(&name);
        }
        // Repeated identical Content-Length values (accepted by check_request, as a list
        // or as several fields) go on as one: a strict upstream would refuse them.
        let lengths = upstream.headers.get_all(CONTENT_LENGTH);
        if lengths.iter().count() > 1 || lengths.iter().any(|v| v.as_bytes().contains(&b',')) {
            if let Ok(Some(n)) = crate::limits::content_length(&upstream.headers) {
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
        if upstream.headers.get(HOST).is_none() {
            if let Some(authority) = session.req_header().uri.authority() {
                upstream.insert_header(HOST, authority.as_str())?;
            }
        }
        let stripped = ctx.route().and_then(|r| r.strip_prefix.as_deref());
        // X-Forwarded-Host and Forwarded carry the Host as the client sent it.
        let forwarded = client_peer(session).map(|peer| {
            let host = upstream
                .headers
                .get(HOST)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("");
            ctx.generation.forwarding.forwarded_headers(
                peer,
                self.scheme.as_str(),
                host,
                &upstream.headers,
                stripped,
            )
        });
        if let Some(prefix) = stripped {
            let target = stripped_target(prefix, &session.req_header().uri);
            let uri = target.parse::<http::Uri>().map_err(|e| {
                Error::because(
                    ErrorType::InvalidHTTPHeader,
                    format!("the path without {prefix} is not a valid target"),
                    e,
                )
            })?;
            upstream.set_uri(uri);
        }
        for (name, value) in forwarded.into_iter().flatten() {
            upstream.insert_header(name, value)?;
        }
        if let Some(route) = ctx.route() {
            for name in &route.request_headers.remove {
                upstream.remove_header(name);
            }
            for (name, value) in &route.request_headers.set {
                upstream.insert_header(name.clone(), value.clone())?;
            }
        }
        if let Some(id) = &ctx.request_id {
            upstream.insert_header(ctx.generation.forwarding.request_id.clone(), id.clone())?;
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
        if let (Some(idx), Some(started)) = (ctx.endpoint, ctx.upstream_started) {
            let ttfb = started.elapsed();
            pool.ttfb.observe(ttfb.as_secs_f64());
            pool.states[idx].observe_latency(ttfb, now_ms());
        }
        if pool.retries.on_status.contains(&status) && status_retry_allowed(session, ctx, &pool) {
            self.record_failure(ctx, &pool, "status");
            ctx.status_retry = true;
            let mut e = Error::explain(
                ErrorType::HTTPStatus(status),
                format!("upstream answered {status}; retrying on another endpoint"),
            );
            e.set_retry(true);
            return Err(e);
        }
        if matches!(status, 502..=504) {
            self.record_failure(ctx, &pool, "status");
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
            if remaining(ctx.started, pool.timeouts.total.0).is_zero() {
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
        let Some(pool) = ctx.pool().cloned() else {
            return e;
        };
        self.record_failure(ctx, &pool, "connect");
        // Nothing reached the upstream: a retry is safe for any method, but a body that
        // was already read from the client cannot be replayed.
        let body_pending = session.as_ref().retry_buffer_truncated();
        e.set_retry(ctx.attempts <= pool.retries.attempts && !body_pending);
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
            e.set_retry(ctx.attempts <= pool.retries.attempts);
            return e;
        }
        let kind = if matches!(
            e.etype(),
            ErrorType::ReadTimedout | ErrorType::WriteTimedout
        ) {
            "timeout"
        } else {
            "error"
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
        e.set_retry(safe && ctx.attempts <= pool.retries.attempts);
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
            let reason = http::StatusCode::from_u16(code)
                .ok()
                .and_then(|s| s.canonical_reason())
                .unwrap_or("error");
            let body = Bytes::from(format!("{code} {reason}\n"));
            if let Err(err) =
                respond(session, ctx, code, "text/plain; charset=utf-8", body, None).await
            {
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
        let metrics = ctx
            .route()
            .map_or(&ctx.generation.unrouted_metrics, |r| &r.metrics);
        let finished = Instant::now();
        let seconds = finished.duration_since(ctx.started).as_secs_f64();
        metrics.observe(status, seconds);
        self.metrics.rolling.record(finished, status, seconds);
        if let Some(e) = e {
            let (route, pool) = ctx.labels();
            tracing::debug!(route, pool, status, "request failed: {e}");
        }
    }
}

impl Edge {
    fn record_failure(&self, ctx: &mut RequestCtx, pool: &PoolRt, kind: &str) {
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
    kind: &str,
    recorded: &mut bool,
) {
    metrics
        .upstream_failures
        .with_label_values(&[pool.name.as_str(), kind])
        .inc();
    let Some(idx) = idx else { return };
    if std::mem::replace(recorded, true) {
        return;
    }
    let ep = &pool.endpoints[idx];
    if let Some(period) = ep.state.record_failure(pool.eject, now_ms()) {
        metrics
            .endpoint_ejections
            .with_label_values(&[pool.name.as_str(), ep.id.as_str()])
            .inc();
        tracing::warn!(pool = %pool.name, endpoint = %ep.id, "ejected for {period:?} after {} consecutive failures", pool.eject.consecutive_failures);
    }
}

/// Whether a 502/503 may be retried: idempotent method, no request body at all, and
/// attempts left.
fn status_retry_allowed(session: &Session, ctx: &RequestCtx, pool: &PoolRt) -> bool {
    let req = session.req_header();
    let bodiless = ctx.body_bytes == 0
        && !req.headers.contains_key(http::header::TRANSFER_ENCODING)
        && content_length(&req.headers).ok().flatten().unwrap_or(0) == 0;
    req.method.is_idempotent()
        && bodiless
        && !is_upgrade(&req.headers)
        && ctx.attempts <= pool.retries.attempts
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

async fn reject(session: &mut Session, ctx: &RequestCtx, rejection: Rejection) -> Result<bool> {
    tracing::debug!("rejecting request: {}", rejection.reason());
    session.set_keepalive(None);
    let body = Bytes::from(format!("{}\n", rejection.reason()));
    respond(
        session,
        ctx,
        rejection.status(),
        "text/plain; charset=utf-8",
        body,
        None,
    )
    .await?;
    Ok(true)
}

/// Writes a complete response from the proxy itself (static answers, redirects, errors).
async fn respond(
    session: &mut Session,
    ctx: &RequestCtx,
    status: u16,
    content_type: &str,
    body: Bytes,
    header: Option<(http::HeaderName, String)>,
) -> Result<()> {
    let mut resp = ResponseHeader::build(status, Some(5))?;
    resp.insert_header(CONTENT_TYPE, content_type)?;
    resp.insert_header(CONTENT_LENGTH, body.len().to_string())?;
    if let Some((name, value)) = header {
        resp.insert_header(name, value)?;
    }
    if status == 503 {
        resp.insert_header(http::header::RETRY_AFTER, "1")?;
    }
    if let Some(id) = &ctx.request_id {
        resp.insert_header(ctx.generation.forwarding.request_id.clone(), id.clone())?;
    }
    let head_only = session.req_header().method == http::Method::HEAD;
    session
        .write_response_header(Box::new(resp), head_only || body.is_empty())
        .await?;
    if !head_only && !body.is_empty() {
        session.write_response_body(Some(body), true).await?;
    }
    Ok(())
}

fn client_peer(session: &Session) -> Option<IpAddr> {
    session
        .client_addr()
        .and_then(|a| a.as_inet())
        .map(std::net::SocketAddr::ip)
}

/// The request id: the client's when valid, else a new UUID.
pub(crate) fn request_id(req: &http::request::Parts, generation: &Generation) -> HeaderValue {
    req.headers
        .get(&generation.forwarding.request_id)
        .filter(|v| valid_request_id(v.as_bytes()))
        .cloned()
        .unwrap_or_else(|| {
            // Encoded into the stack: `to_string` would go through the formatter.
            let mut text = [0u8; uuid::fmt::Hyphenated::LENGTH];
            let id = uuid::Uuid::new_v4().hyphenated().encode_lower(&mut text);
            HeaderValue::from_str(id).expect("a UUID is a valid header value")
        })
}

/// The request's host: the URI authority (HTTP/2, absolute-form) or the Host header,
/// lowercase, without port or trailing dot. HTTP/1.0 without Host gets "".
pub(crate) fn request_host(req: &http::request::Parts) -> Option<String> {
    let raw = match req.uri.authority() {
        Some(a) => a.host().to_string(),
        None => match req.headers.get(HOST) {
            Some(h) => {
                let h = h.to_str().ok()?;
                let host = if let Some(v6) = h.strip_prefix('[') {
                    v6.split(']').next()?
                } else {
                    h.rsplit_once(':').map_or(h, |(host, port)| {
                        if port.bytes().all(|b| b.is_ascii_digit()) {
                            host
                        } else {
                            h
                        }
                    })
                };
                host.to_string()
            }
            None if req.version == http::Version::HTTP_10 => String::new(),
            None => return None,
        },
    };
    let host = raw.trim_end_matches('.').to_ascii_lowercase();
    host.bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"-.:_".contains(&b))
        .then_some(host)
}

/// `https://host[:port]/path?query` for an HTTP→HTTPS redirect.
fn https_location(host: &str, https_port: Option<u16>, req: &RequestHeader) -> String {
    let pq = req.uri.path_and_query().map_or("/", |pq| pq.as_str());
    let host = if host.contains(':') {
        format!("[{host}]")
    } else {
        host.to_string()
    };
    match https_port {
        Some(443) | None => format!("https://{host}{pq}"),
        Some(port) => format!("https://{host}:{port}{pq}"),
    }
}

/// Whether a body of `bytes` after `elapsed` is below `min_rate` bytes per second on
/// average, once the `grace` period is over (0 disables the check).
pub(crate) fn body_too_slow(bytes: u64, elapsed: Duration, grace: Duration, min_rate: u64) -> bool {
    min_rate > 0 && elapsed > grace && (bytes as f64) < min_rate as f64 * elapsed.as_secs_f64()
}

/// The consistent-hash key of a request; a missing header or cookie falls back to the
/// client address so such requests still stick to one endpoint.
pub(crate) fn hash_key(key: &HashKey, req: &http::request::Parts, client: Option<IpAddr>) -> u64 {
    use xxhash_rust::xxh3::xxh3_64;
    let by_ip = || client.map_or(0, |ip| xxh3_64(ip.to_string().as_bytes()));
    match key {
        HashKey::ClientIp => by_ip(),
        HashKey::Header(name) => req
            .headers
            .get(name.as_str())
            .map_or_else(by_ip, |v| xxh3_64(v.as_bytes())),
        HashKey::Cookie(name) => req
            .headers
            .get_all(http::header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(';'))
            .filter_map(|c| c.trim().split_once('='))
            .find(|(k, _)| k == name)
            .map_or_else(by_ip, |(_, v)| xxh3_64(v.as_bytes())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_body_is_too_slow_only_below_the_rate_after_the_grace_period() {
        let s = Duration::from_secs;
        // Within the grace period anything goes.
        assert!(!body_too_slow(0, s(5), s(10), 256));
        // After it, the average counts: 20 s at 256 B/s needs 5120 bytes.
        assert!(body_too_slow(5000, s(20), s(10), 256));
        assert!(!body_too_slow(6000, s(20), s(10), 256));
        // 0 turns it off.
        assert!(!body_too_slow(0, s(100), s(10), 0));
    }
}
