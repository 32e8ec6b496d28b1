//! The request policy: what Rampart does with a request, decided once, the same way
//! for every transport. [`decide`] sees a parsed request head and the client and
//! returns a [`Decision`]: an [`Answer`] the proxy gives itself (rendered by
//! [`answer`]) or a [`Forward`] plan (route, balancing key, the upstream's `Host`,
//! target and forwarding headers). The HTTP/1 and HTTP/2 fast paths (`h1`, `h2`) and
//! Pingora's `ProxyHttp` phases (`edge`) call it and carry out what it says; a
//! transport may decline a request it cannot carry before calling it; one whose plan
//! names a pool it cannot reach hands the decision to Pingora's path with [`handoff`].
//!
//! Neighbours: [`crate::limits`] (the checks of a head), [`crate::routing`] (route
//! matching), [`crate::headers`] (forwarding headers), [`crate::balance`] (the pick,
//! in the upstream attempt).

pub mod answer;
pub mod authority;
pub mod pages;
pub mod split;
pub mod trace;

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue};
use rampart_config::{Action, HashKey};

pub use answer::{Answer, Style};
pub use authority::Authority;
pub use trace::Trace;

use crate::edge::Scheme;
use crate::generation::{Generation, PickKey, PoolRt, RouteRt};
use crate::headers::valid_request_id;
use crate::limits::{check_request, Rejection, RequestView};
use crate::routing::{stripped_target, RouteRequest};
use crate::tls::client_auth::{ClientAuthRt, ClientCert};
use crate::tls::conn::TlsInfo;

/// A request head as the policy sees it.
#[derive(Clone, Copy, Debug)]
pub struct Request<'a> {
    /// Method, target, version and headers.
    pub parts: &'a http::request::Parts,
    /// The HTTP/1 head as received, when there is one (for the size and framing
    /// checks).
    pub raw_head: Option<&'a [u8]>,
    /// The request target as received (a fragment survives only here).
    pub raw_target: &'a [u8],
    /// The request ended with its head (HTTP/2 END_STREAM on HEADERS): a declared
    /// Content-Length other than 0 is then a lie (RFC 9113 §8.1.1).
    pub body_ended: bool,
}

/// Where the request came from.
#[derive(Clone, Copy, Debug)]
pub struct Client<'a> {
    /// The listener's scheme.
    pub scheme: Scheme,
    /// The peer's address.
    pub peer: Option<IpAddr>,
    /// The TLS connection's handshake (HTTPS): its SNI and client certificate.
    pub tls: Option<&'a TlsInfo>,
}

/// What the policy decided for one request.
#[derive(Debug)]
pub struct Decision {
    /// The request id sent upstream and in the response.
    pub request_id: HeaderValue,
    /// The request's trace (`None` with `forwarding.trace_context = "off"`).
    pub trace: Option<Trace>,
    /// The route that matched, when one did (for metrics).
    pub route: Option<usize>,
    /// Answer or forward.
    pub verdict: Verdict,
}

/// Answer the client, or forward upstream.
#[derive(Debug)]
pub enum Verdict {
    /// The proxy answers itself.
    Answer(Answer),
    /// The request goes to the route's pool.
    Forward(Forward),
}

/// How a request is forwarded.
#[derive(Debug)]
pub struct Forward {
    /// The route (index into `Generation::routes`); its action is `forward`.
    pub route: usize,
    /// The client's address (after trusted proxies).
    pub client_ip: Option<IpAddr>,
    /// The pool chosen: an index into the route's split, 0 without one (see
    /// [`Forward::pool`]).
    pub pool: usize,
    /// What the pick of an endpoint takes from the request: its consistent-hash key
    /// and its sticky cookie.
    pub key: PickKey,
    /// A `Set-Cookie` for the response that keeps the client on the pool a split
    /// chose for it.
    pub split_cookie: Option<HeaderValue>,
    /// The coding a compressible response gets (the route compresses and the client
    /// accepts it).
    pub compress: Option<crate::compress::Coding>,
    /// The request has a body (a declared length, chunked, or an HTTP/2 stream still
    /// open).
    pub has_body: bool,
    /// The route mirror's copy of a request with a body, waiting for the body.
    pub mirror: Option<Box<crate::mirror::MirrorSlot>>,
    /// The `Host` sent upstream: the authority the request was routed on.
    pub host: HeaderValue,
    /// The target sent upstream when it is not the client's own (a stripped prefix,
    /// an absolute-form target made origin-form).
    pub target: Option<String>,
    /// Forwarding headers to set (X-Forwarded-*, Forwarded, traceparent), replacing
    /// the client's.
    pub forwarded: Vec<(HeaderName, String)>,
    /// The request's whole time budget: the pool's `timeouts.total`, or less when a
    /// gRPC client set a deadline (`grpc-timeout`).
    pub total: Duration,
    /// For a gRPC call to an HTTP/2 pool, the longest pause in its request stream (the
    /// pool's `timeouts.first_byte`): a client or bidirectional stream sends a message
    /// now and then, so the slow-upload limits (`body_read_timeout`, `min_body_rate`)
    /// do not apply to it.
    pub stream_pause: Option<Duration>,
}

impl Forward {
    /// The pool the plan forwards to, in `generation`.
    #[must_use]
    pub fn pool<'g>(&self, generation: &'g Generation) -> Option<&'g Arc<PoolRt>> {
        generation.routes[self.route].pool_at(self.pool)
    }

    /// The `Set-Cookie` values the proxy adds to the response of endpoint `idx` of
    /// `pool`: the split's choice of pool and the sticky pool's endpoint, each when
    /// the request did not carry it already.
    #[must_use]
    pub fn set_cookies(&self, pool: &PoolRt, idx: usize, https: bool) -> [Option<HeaderValue>; 2] {
        [
            self.split_cookie.clone(),
            pool.sticky_cookie(self.key, idx, https),
        ]
    }
}

tokio::task_local! {
    /// A decision a fast path made and then handed, with the request, to Pingora's path
    /// (its pool speaks what the fast paths do not carry): Pingora's path takes it
    /// ([`handed`]) instead of deciding again, so that a rate limit is charged once and
    /// the request id stays the same.
    static HANDED: std::cell::RefCell<Option<Box<Decision>>>;
}

/// Runs `request` (Pingora's path serving one request) with `decision` already made.
pub async fn handoff<F: std::future::Future>(decision: Box<Decision>, request: F) -> F::Output {
    HANDED
        .scope(std::cell::RefCell::new(Some(decision)), request)
        .await
}

/// The decision handed over for the request being served, once ([`handoff`]).
#[must_use]
pub fn handed() -> Option<Box<Decision>> {
    HANDED.try_with(|d| d.borrow_mut().take()).ok().flatten()
}

/// Decides what to do with `req` from `client` under `generation`. Side effects: the
/// route's rate limit takes a token when the request reaches it, a password check
/// may run bcrypt on the blocking pool, a route's `forward_auth` service is asked, and
/// a route's `mirror` starts its copy of a forwarded request (on a task of its own).
pub async fn decide(generation: &Generation, req: Request<'_>, client: Client<'_>) -> Decision {
    let request_id = request_id(req.parts, generation);
    let trusted = client
        .peer
        .is_some_and(|p| generation.forwarding.is_trusted(p));
    let sample = generation.tracing.as_ref().map(|t| t.sample);
    let trace = trace::continues(generation.config.forwarding.trace_context, trusted)
        .map(|continued| Trace::of(&req.parts.headers, continued, sample));
    let (route, verdict) = match route_and_verdict(generation, req, client).await {
        Ok((route, mut forward)) => {
            if let Some(t) = &trace {
                forward
                    .forwarded
                    .push((HeaderName::from_static("traceparent"), t.header()));
            }
            if let Some(mirror) = &generation.routes[route].mirror {
                forward.mirror = mirror.copy(generation, req.parts, &forward, &request_id);
            }
            (Some(route), Verdict::Forward(forward))
        }
        Err((route, answer)) => (route, Verdict::Answer(answer)),
    };
    Decision {
        request_id,
        trace,
        route,
        verdict,
    }
}

type Outcome = Result<(usize, Forward), (Option<usize>, Answer)>;

async fn route_and_verdict(
    generation: &Generation,
    req: Request<'_>,
    client: Client<'_>,
) -> Outcome {
    let refuse = |r: Rejection| Err((None, Answer::Refused(r)));
    let parts = req.parts;
    let view = RequestView {
        method: &parts.method,
        uri: &parts.uri,
        headers: &parts.headers,
        raw: req.raw_head,
    };
    let declared = match check_request(view, generation.header_limits) {
        Ok(declared) => declared.unwrap_or(0),
        Err(r) => return refuse(r),
    };
    if parts.method == http::Method::CONNECT {
        return refuse(Rejection::Connect);
    }
    if req.raw_target.contains(&b'#') {
        return refuse(Rejection::Fragment);
    }
    if let Some(answer) = well_known(generation, parts.uri.path()) {
        return Err((None, answer));
    }
    let authority = match authority::of_request(parts, req.raw_target) {
        Ok(a) => a,
        Err(r) => return refuse(r),
    };
    let client_ip = client
        .peer
        .map(|p| generation.forwarding.client_ip(p, &parts.headers));
    let Some(idx) = generation.router.select(&RouteRequest {
        host: &authority.host,
        path: parts.uri.path(),
        headers: &parts.headers,
    }) else {
        return Err((None, Answer::NotFound));
    };
    let route = &generation.routes[idx];
    let cert = CertView::of(generation, route, client, &authority.host);
    if let Some(answer) =
        route_answer(generation, route, req, client, client_ip, &authority, &cert).await
    {
        return Err((Some(idx), answer));
    }
    if req.body_ended && declared > 0 {
        return Err((Some(idx), Answer::Refused(Rejection::BodyLengthMismatch)));
    }
    if declared > route.max_body {
        return Err((Some(idx), Answer::Refused(Rejection::BodyTooLarge)));
    }
    // Last: the auth service is asked only about a request the proxy would forward.
    let copied = match &route.forward_auth {
        Some(auth) => match auth
            .check(req.parts, client.scheme, &authority, client_ip)
            .await
        {
            crate::forward_auth::Verdict::Allow(copied) => copied,
            crate::forward_auth::Verdict::Deny(answer) => return Err((Some(idx), answer)),
        },
        None => Vec::new(),
    };
    let mut plan = forward_plan(generation, idx, req, client, client_ip, authority, &cert);
    plan.forwarded.extend(copied);
    plan.has_body = declared > 0
        || parts.headers.contains_key(http::header::TRANSFER_ENCODING)
        || (parts.version == http::Version::HTTP_2 && !req.body_ended);
    Ok((idx, plan))
}

/// The answers of the well-known paths, before any route: an ACME HTTP-01 validation
/// (before HTTPS redirects, by every proxy) and the controller's probe of this
/// listener.
fn well_known(generation: &Generation, path: &str) -> Option<Answer> {
    if let Some(token) = path.strip_prefix("/.well-known/acme-challenge/") {
        let key_auth = generation.acme_challenges.get(token)?;
        return Some(Answer::AcmeChallenge(Bytes::from(key_auth.clone())));
    }
    (path == rampart_config::PROBE_PATH).then_some(Answer::Probe {
        ready: generation.version > 0,
    })
}

/// What a matched route answers itself, in order: not from a listed address, plain
/// HTTP to HTTPS, over the rate limit, no valid password (after the redirect, so no
/// password crosses plain HTTP, and after the rate limit, which bounds the bcrypt work
/// a guesser causes), a static answer or redirect. `None`: forward.
async fn route_answer(
    generation: &Generation,
    route: &RouteRt,
    req: Request<'_>,
    client: Client<'_>,
    client_ip: Option<IpAddr>,
    authority: &Authority,
    cert: &CertView<'_>,
) -> Option<Answer> {
    let parts = req.parts;
    if !route.admits(client_ip) {
        return Some(Answer::Forbidden);
    }
    if route.https_redirect && client.scheme == Scheme::Http {
        let location = https_location(&authority.host, generation.https_port, &parts.uri);
        return Some(Answer::Redirect {
            status: 308,
            location,
        });
    }
    let required = route.require_client_cert
        || cert
            .auth
            .is_some_and(|a| a.mode == rampart_config::ClientAuthMode::Require);
    if required && cert.verified.is_none() {
        // Was the handshake for this host's policy (then no certificate was sent)? A
        // plain-HTTP request had none: no other connection would do better (403).
        let sni_auth = client
            .tls
            .and_then(|t| t.sni.as_deref())
            .and_then(|sni| generation.certs.lookup(sni))
            .and_then(|c| c.client_auth.as_ref());
        let same = match (sni_auth, cert.auth) {
            (Some(a), Some(b)) => a.id == b.id,
            (None, None) => true,
            _ => false,
        };
        return Some(Answer::ClientCertRequired {
            misdirected: client.tls.is_some() && !same,
        });
    }
    if let Some((pattern, location, status)) = &route.redirect {
        let pq = parts.uri.path_and_query().map_or("/", |pq| pq.as_str());
        let url = format!(
            "{}://{}{pq}",
            client.scheme.as_str(),
            authority.value.to_str().unwrap_or("")
        );
        if pattern.is_match(&url) {
            let location = pattern.replace(&url, location.as_str());
            return Some(Answer::Redirect {
                status: *status,
                location: crate::headers::uri_escaped(&location),
            });
        }
    }
    if let Some(limiter) = &route.limiter {
        if let Err(wait) = limiter.check(hash_key(&limiter.config.key, parts, client_ip)) {
            return Some(Answer::RateLimited {
                retry_after: whole_seconds(wait),
            });
        }
    }
    if let Some(auth) = &route.basic_auth {
        let authorization = parts.headers.get(http::header::AUTHORIZATION);
        if !auth.admits(authorization.map(HeaderValue::as_bytes)).await {
            return Some(Answer::Unauthorized {
                challenge: auth.challenge.clone(),
            });
        }
    }
    match &route.action {
        Action::Forward(_) => None,
        Action::Respond(r) => Some(Answer::Respond {
            status: r.status,
            content_type: r.content_type.clone(),
            body: Bytes::from(r.body.clone()),
        }),
        Action::Redirect(r) => {
            let mut location = r.location.clone();
            if r.keep_path {
                let pq = parts.uri.path_and_query().map_or("/", |pq| pq.as_str());
                location = format!("{}{pq}", location.trim_end_matches('/'));
            }
            Some(Answer::Redirect {
                status: r.status,
                location,
            })
        }
    }
}

/// The plan of a request to forward on route `idx`.
fn forward_plan(
    generation: &Generation,
    idx: usize,
    req: Request<'_>,
    client: Client<'_>,
    client_ip: Option<IpAddr>,
    authority: Authority,
    cert: &CertView<'_>,
) -> Forward {
    let parts = req.parts;
    let route = &generation.routes[idx];
    let stripped = route.strip_prefix.as_deref();
    let (choice, split_cookie) = route.split.as_ref().map_or((0, None), |s| {
        s.choose(
            &parts.headers,
            client.scheme == Scheme::Https,
            crate::health::now_ms(),
        )
    });
    let pool = route.pool_at(choice);
    let key = PickKey {
        hash: pool
            .filter(|p| p.balancer.uses_key())
            .map(|p| hash_key(&p.hash_key, parts, client_ip)),
        sticky: pool
            .and_then(|p| p.sticky.as_ref())
            .and_then(|s| s.requested(&parts.headers)),
    };
    let target = match stripped {
        Some(prefix) => Some(stripped_target(prefix, &parts.uri)),
        None if route.rewrite.is_some() => route
            .rewrite
            .as_ref()
            .map(|(pattern, replacement)| rewritten_target(pattern, replacement, &parts.uri)),
        // Absolute-form (HTTP/1) goes upstream in origin-form.
        None if authority::absolute_form_authority(req.raw_target).is_some() => Some(
            parts
                .uri
                .path_and_query()
                .map_or("/", |pq| pq.as_str())
                .to_string(),
        ),
        None => None,
    };
    let host = authority.value.to_str().unwrap_or("");
    let mut forwarded = client.peer.map_or_else(Vec::new, |peer| {
        generation.forwarding.forwarded_headers(
            peer,
            client.scheme.as_str(),
            host,
            &parts.headers,
            stripped,
        )
    });
    if let (Some(auth), Some(verified)) = (cert.auth, cert.verified) {
        for (field, name) in &auth.headers {
            if let Some(value) = verified.value(*field) {
                forwarded.push((name.clone(), value.to_string()));
            }
        }
    }
    let total = pool.map_or(Duration::MAX, |pool| pool.timeouts.total.0);
    let total = grpc_timeout(&parts.headers).map_or(total, |t| t.min(total));
    let stream_pause = pool
        .filter(|pool| pool.peer.multiplexed() && Style::of(&parts.headers) == Style::Grpc)
        .map(|pool| pool.timeouts.first_byte.0);
    Forward {
        route: idx,
        client_ip,
        pool: choice,
        key,
        split_cookie,
        has_body: false,
        mirror: None,
        compress: route.compress.as_ref().and_then(|c| c.choose(parts)),
        host: authority.value,
        target,
        forwarded,
        total,
        stream_pause,
    }
}

/// A request's client certificate as its host sees it, worked out once per request.
#[derive(Default)]
struct CertView<'a> {
    /// The client-auth policy of the request's host.
    auth: Option<&'a ClientAuthRt>,
    /// The connection's certificate, if that policy verified it (a certificate
    /// verified for another host's policy does not count).
    verified: Option<&'a ClientCert>,
}

impl<'a> CertView<'a> {
    /// Nothing to look up unless some host authenticates clients (or the route asks
    /// for a certificate, which then no connection can have).
    fn of(generation: &'a Generation, route: &RouteRt, client: Client<'a>, host: &str) -> Self {
        if !(generation.client_auth_in_use || route.require_client_cert) {
            return Self::default();
        }
        let auth = generation
            .certs
            .lookup(host)
            .and_then(|c| c.client_auth.as_deref());
        let verified = client
            .tls
            .and_then(|t| t.client_cert.as_deref())
            .filter(|cert| auth.is_some_and(|a| a.id == cert.policy));
        Self { auth, verified }
    }
}

/// The target of `uri` with its path's first match of `pattern` replaced (an empty or
/// relative result gets its leading `/`), the query as it came; bytes that cannot be
/// in a URI escaped (the path's own escapes kept).
fn rewritten_target(pattern: &regex::Regex, replacement: &str, uri: &http::Uri) -> String {
    let path = pattern.replace(uri.path(), replacement);
    let mut target = String::with_capacity(path.len() + 16);
    if !path.starts_with('/') {
        target.push('/');
    }
    target.push_str(&crate::headers::uri_escaped(&path));
    if let Some(q) = uri.query() {
        target.push('?');
        target.push_str(q);
    }
    target
}

/// A gRPC client's deadline (`grpc-timeout`: up to 8 digits and a unit, H M S m u n).
/// An invalid value is ignored, as gRPC servers do.
fn grpc_timeout(headers: &http::HeaderMap) -> Option<Duration> {
    let v = headers.get("grpc-timeout")?.to_str().ok()?;
    let (digits, unit) = v.split_at(v.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// Whole seconds of `wait`, rounded up, at least 1 (for Retry-After).
fn whole_seconds(wait: Duration) -> u64 {
    (wait.as_secs() + u64::from(wait.subsec_nanos() > 0)).max(1)
}

/// The request id: the client's when valid, else a new UUID.
///
/// Marked never to be indexed by HTTP/2's header compression (RFC 7541 §7.1.3): a value
/// that never repeats only takes room in an HPACK table. Indexed, every request's id
/// was entered into the connection's table, evicting the fields that do repeat, and
/// lengthened the chain of same-named entries that the next lookup compared one by one.
pub(crate) fn request_id(req: &http::request::Parts, generation: &Generation) -> HeaderValue {
    let mut id = req
        .headers
        .get(&generation.forwarding.request_id)
        .filter(|v| valid_request_id(v.as_bytes()))
        .cloned()
        .unwrap_or_else(|| {
            // Encoded into the stack: `to_string` would go through the formatter.
            let mut text = [0u8; uuid::fmt::Hyphenated::LENGTH];
            let id = uuid::Uuid::new_v4().hyphenated().encode_lower(&mut text);
            HeaderValue::from_str(id).expect("a UUID is a valid header value")
        });
    id.set_sensitive(true);
    id
}

/// `https://host[:port]/path?query` for an HTTP→HTTPS redirect.
fn https_location(host: &str, https_port: Option<u16>, uri: &http::Uri) -> String {
    let pq = uri.path_and_query().map_or("/", |pq| pq.as_str());
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
        HashKey::Cookie(name) => {
            crate::headers::cookie(&req.headers, name).map_or_else(by_ip, |v| xxh3_64(v.as_bytes()))
        }
    }
}

/// The request id header of `generation` with `value`, as answers carry it.
#[must_use]
pub fn id_header<'a>(
    generation: &'a Generation,
    value: &'a HeaderValue,
) -> (&'a HeaderName, &'a HeaderValue) {
    (&generation.forwarding.request_id, value)
}

/// The request target in the request line of a raw HTTP/1 head (`GET <target> …`).
#[must_use]
pub fn raw_target(head: &[u8]) -> Option<&[u8]> {
    let line = head.split(|&b| b == b'\n').next()?;
    let mut parts = line.split(|&b| b == b' ').filter(|p| !p.is_empty());
    parts.next()?;
    parts.next()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rewrite_replaces_the_first_match_of_the_path_and_keeps_the_query() {
        let re = |p: &str| regex::Regex::new(p).unwrap();
        let uri = |u: &str| u.parse::<http::Uri>().unwrap();
        assert_eq!(
            rewritten_target(&re("^/v1/(.*)$"), "/api/$1", &uri("/v1/users/7?x=1&y")),
            "/api/users/7?x=1&y"
        );
        // No match: the path as it came.
        assert_eq!(
            rewritten_target(&re("^/v1/"), "/api/", &uri("/v2/a")),
            "/v2/a"
        );
        // A prefix removed entirely still leaves a path.
        assert_eq!(rewritten_target(&re("^/api"), "", &uri("/api")), "/");
        assert_eq!(rewritten_target(&re("^/api/"), "", &uri("/api/x")), "/x");
        // The path's escapes go on as they came, not escaped again.
        assert_eq!(
            rewritten_target(&re("^/v1/(.*)$"), "/$1", &uri("/v1/a%20b%2Fc")),
            "/a%20b%2Fc"
        );
        // Named groups.
        assert_eq!(
            rewritten_target(
                &re("^/u/(?P<id>[0-9]+)$"),
                "/users/${id}/profile",
                &uri("/u/42")
            ),
            "/users/42/profile"
        );
    }

    #[test]
    fn grpc_timeouts_parse_as_the_grpc_spec_writes_them() {
        let of = |v: &'static str| {
            let mut h = http::HeaderMap::new();
            h.insert("grpc-timeout", HeaderValue::from_static(v));
            grpc_timeout(&h)
        };
        assert_eq!(of("300m"), Some(Duration::from_millis(300)));
        assert_eq!(of("2S"), Some(Duration::from_secs(2)));
        assert_eq!(of("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(of("99999999n"), Some(Duration::from_nanos(99_999_999)));
        for bad in ["", "m", "123456789m", "10x", "-1S", "1.5S"] {
            assert_eq!(of(bad), None, "{bad}");
        }
    }
}
