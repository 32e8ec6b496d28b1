//! The end of every request, whichever transport carried it: counted in the route's
//! metrics and the dashboard's window, kept among the recent errors when it failed,
//! and written to the access log when one is configured. The transports call
//! [`finish`] once per request with what they know ([`Arrival`], [`Outcome`]); nothing
//! here is written twice.
//!
//! - [`sink`]: the queue and the writer thread.
//! - [`format`]: json, logfmt and combined lines.
//! - [`otlp`]: request spans exported over OTLP/HTTP.

pub mod format;
pub mod otlp;
pub mod sink;

use std::collections::VecDeque;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use http::HeaderName;
use rampart_config::{AccessLogFormat, ACCESS_LOG_FIELDS, ACCESS_LOG_SECRET_HEADERS};
use serde::Serialize;

use crate::edge::Scheme;
use crate::generation::{Generation, PoolRt};
use crate::metrics::Metrics;
use crate::policy::Answer;

pub use sink::{request_reopen, Sink, Target};

/// The access log of a generation: its settings compiled, and the sink it writes to
/// (shared with the generations before it while the path stays the same).
#[derive(Debug)]
pub struct AccessLogRt {
    /// Where lines go.
    pub sink: Arc<Sink>,
    /// How lines look.
    pub format: AccessLogFormat,
    /// Which of [`ACCESS_LOG_FIELDS`] are written (bit i: field i).
    pub fields: u32,
    /// Share of 1xx–3xx responses logged.
    pub sample: f64,
    /// Request headers logged by name.
    pub headers: Vec<HeaderName>,
    /// Query values replaced by `REDACTED`.
    pub redact_query: bool,
}

impl AccessLogRt {
    /// Compiles `settings`, writing to `sink`.
    #[must_use]
    pub fn new(settings: &rampart_config::AccessLog, sink: Arc<Sink>) -> Self {
        let bit = |name: &str| {
            ACCESS_LOG_FIELDS
                .iter()
                .position(|f| *f == name)
                .map_or(0, |i| 1u32 << i)
        };
        let mut fields = if settings.fields.is_empty() {
            u32::MAX
        } else {
            settings.fields.iter().fold(0, |m, f| m | bit(f))
        };
        for f in &settings.drop_fields {
            fields &= !bit(f);
        }
        let mut headers: Vec<HeaderName> = settings
            .headers
            .iter()
            .filter(|h| !ACCESS_LOG_SECRET_HEADERS.contains(&h.to_ascii_lowercase().as_str()))
            .filter_map(|h| HeaderName::try_from(h.as_str()).ok())
            .collect();
        // The combined format ends with the Referer and User-Agent.
        if settings.format == AccessLogFormat::Combined {
            for h in [http::header::REFERER, http::header::USER_AGENT] {
                if !headers.contains(&h) {
                    headers.push(h);
                }
            }
        }
        Self {
            sink,
            format: settings.format,
            fields,
            sample: settings.sample,
            headers,
            redact_query: settings.redact_query,
        }
    }

    /// Whether field `name` is written.
    #[must_use]
    pub fn has(&self, name: &str) -> bool {
        ACCESS_LOG_FIELDS
            .iter()
            .position(|f| *f == name)
            .is_some_and(|i| self.fields & (1 << i) != 0)
    }
}

/// What is known of a request when it arrives, taken only when it will be logged.
#[derive(Debug)]
pub struct Arrival {
    /// The method.
    pub method: http::Method,
    /// The host, the path and the query, one after the other in one allocation (see
    /// [`Arrival::host`], [`Arrival::path`], [`Arrival::query`]).
    text: String,
    host_end: usize,
    /// Where the path ends and the query (if any) starts.
    path_end: usize,
    has_query: bool,
    /// `HTTP/1.1`, `HTTP/1.0` or `HTTP/2`.
    pub protocol: &'static str,
    /// The client's address after trusted proxies.
    pub client: Option<IpAddr>,
    /// The declared body length (Content-Length), if any.
    pub body_len: Option<u64>,
    /// The logged request headers' values, in the order of `AccessLogRt::headers`.
    pub headers: Vec<Option<String>>,
    /// The `User-Agent`, for a span.
    pub user_agent: Option<String>,
    /// The access log takes this request (else only a span does).
    pub logged: bool,
    /// A span of this request is exported.
    pub traced: bool,
}

impl Arrival {
    /// What the access log and the span export need of `parts` from `peer`, or
    /// `None` when neither takes the request (no access log or its route turns it
    /// off, and no span export or the trace is not sampled).
    #[must_use]
    pub fn of(
        generation: &Generation,
        parts: &http::request::Parts,
        peer: Option<IpAddr>,
        route: Option<usize>,
        trace: Option<crate::policy::Trace>,
    ) -> Option<Box<Self>> {
        let log = generation
            .access_log
            .as_ref()
            .filter(|_| route.is_none_or(|r| generation.routes[r].access_log));
        let traced = generation.tracing.is_some() && trace.is_some_and(|t| t.sampled());
        if log.is_none() && !traced {
            return None;
        }
        let host = parts.uri.authority().map_or_else(
            || {
                parts
                    .headers
                    .get(http::header::HOST)
                    .map(|h| lossy(h.as_bytes()))
                    .unwrap_or_default()
            },
            |a| a.as_str().into(),
        );
        let path = parts.uri.path();
        let query = parts.uri.query();
        let mut text =
            String::with_capacity(host.len() + path.len() + query.map_or(0, |q| q.len() + 16));
        text.push_str(&host);
        let host_end = text.len();
        text.push_str(path);
        let path_end = text.len();
        if let Some(q) = query {
            // Spans always get a redacted query.
            if log.is_none_or(|l| l.redact_query) {
                redact(q, &mut text);
            } else {
                text.push_str(q);
            }
        }
        let header = |h: &http::HeaderName| {
            parts
                .headers
                .get(h)
                .map(|v| lossy(v.as_bytes()).into_owned())
        };
        let headers = log.map_or_else(Vec::new, |l| l.headers.iter().map(header).collect());
        Some(Box::new(Self {
            method: parts.method.clone(),
            text,
            host_end,
            path_end,
            has_query: query.is_some(),
            protocol: match parts.version {
                http::Version::HTTP_10 => "HTTP/1.0",
                http::Version::HTTP_2 => "HTTP/2",
                _ => "HTTP/1.1",
            },
            client: peer.map(|p| generation.forwarding.client_ip(p, &parts.headers)),
            body_len: crate::limits::content_length(&parts.headers).ok().flatten(),
            headers,
            user_agent: traced.then(|| header(&http::header::USER_AGENT)).flatten(),
            logged: log.is_some(),
            traced,
        }))
    }

    /// The host (Host or `:authority`), as sent.
    #[must_use]
    pub fn host(&self) -> &str {
        &self.text[..self.host_end]
    }

    /// The path, without the query.
    #[must_use]
    pub fn path(&self) -> &str {
        &self.text[self.host_end..self.path_end]
    }

    /// The query, without `?` (redacted when configured).
    #[must_use]
    pub fn query(&self) -> Option<&str> {
        self.has_query.then(|| &self.text[self.path_end..])
    }
}

/// `bytes` as text: borrowed when they are UTF-8 (the common case, checked on the ASCII
/// fast path of `from_utf8`), with replacement characters when they are not.
pub(crate) fn lossy(bytes: &[u8]) -> std::borrow::Cow<'_, str> {
    std::str::from_utf8(bytes).map_or_else(
        |_| String::from_utf8_lossy(bytes),
        std::borrow::Cow::Borrowed,
    )
}

/// Appends `a=1&b=2` to `out` as `a=REDACTED&b=REDACTED`: the names stay, the values go.
fn redact(query: &str, out: &mut String) {
    for (i, pair) in query.split('&').enumerate() {
        if i > 0 {
            out.push('&');
        }
        match pair.split_once('=') {
            Some((name, _)) => {
                out.push_str(name);
                out.push_str("=REDACTED");
            }
            None => out.push_str(pair),
        }
    }
}

/// How a request ended, as its transport saw it.
#[derive(Debug, Default)]
pub struct Outcome<'a> {
    /// The status answered (0 when nothing was: the client left first).
    pub status: u16,
    /// The route that matched.
    pub route: Option<usize>,
    /// The request id sent upstream and answered.
    pub request_id: Option<&'a [u8]>,
    /// The pool and endpoint of the last attempt.
    pub upstream: Option<(&'a PoolRt, usize)>,
    /// The pool the request was forwarded to (known also when no endpoint was
    /// available): a split's requests are counted under it.
    pub pool: Option<&'a PoolRt>,
    /// The status the upstream answered.
    pub upstream_status: Option<u16>,
    /// The last attempt's connect time (zero on a reused connection).
    pub upstream_connect: Option<Duration>,
    /// The last attempt's time to first byte.
    pub upstream_ttfb: Option<Duration>,
    /// Upstream attempts made.
    pub attempts: u32,
    /// Served by a fast path (rather than Pingora's).
    pub fast_path: bool,
    /// Why the proxy answered itself or the request failed (see [`error_kind`]).
    pub error: Option<&'static str>,
    /// Response bytes sent, when the transport counts them.
    pub bytes_sent: Option<u64>,
    /// The connection's TLS parameters, on HTTPS.
    pub tls: Option<&'a crate::tls::conn::TlsInfo>,
    /// The request's trace.
    pub trace: Option<crate::policy::Trace>,
    /// The upstream attempts, when the request is traced.
    pub attempt_spans: &'a [AttemptSpan],
}

/// One upstream attempt, for its span.
#[derive(Clone, Copy, Debug)]
pub struct AttemptSpan {
    /// The endpoint (index in its pool).
    pub endpoint: usize,
    /// When it started.
    pub start: Instant,
    /// When it ended (the response head, or the failure).
    pub end: Instant,
    /// The status the upstream answered.
    pub status: Option<u16>,
    /// Why it failed.
    pub error: Option<&'static str>,
}

/// Ends a request: metrics, the dashboard's window, the recent errors and the access
/// log. `started` is when the request began; `scheme` and `peer` are its listener's
/// and connection's.
pub fn finish(
    generation: &Generation,
    metrics: &Metrics,
    scheme: Scheme,
    peer: Option<IpAddr>,
    arrival: Option<&Arrival>,
    outcome: &Outcome<'_>,
    started: Instant,
) {
    let finished = Instant::now();
    let elapsed = finished.duration_since(started);
    let seconds = elapsed.as_secs_f64();
    let route_metrics = outcome.route.map_or(&generation.unrouted_metrics, |r| {
        generation.routes[r].metrics_for(outcome.pool)
    });
    route_metrics.observe(outcome.status, seconds);
    metrics.rolling.record(finished, outcome.status, seconds);
    let failed = outcome.status >= 500 || outcome.error.is_some();
    if failed {
        metrics
            .recent_errors
            .push(RecentError::new(generation, arrival, outcome, elapsed));
    }
    let Some(arrival) = arrival else { return };
    // Only what is logged or traced needs the wall-clock time.
    let at = crate::clock::wall_at(started, finished);
    if arrival.traced {
        if let (Some(t), Some(trace)) = (&generation.tracing, outcome.trace) {
            spans(
                &t.exporter,
                generation,
                scheme,
                peer,
                arrival,
                outcome,
                (at, started, elapsed),
                trace,
            );
        }
    }
    let Some(log) = generation.access_log.as_ref().filter(|_| arrival.logged) else {
        return;
    };
    let success = (100..400).contains(&outcome.status);
    if success && log.sample < 1.0 && rand::random::<f64>() >= log.sample {
        return;
    }
    let record = format::Record {
        arrival,
        outcome,
        generation,
        scheme,
        peer,
        at,
        duration: elapsed,
    };
    // Formatted straight into the sink's buffer.
    log.sink.append(|out| format::line(log, &record, out));
}

/// The server span of a request and a client span per upstream attempt, in the
/// OpenTelemetry HTTP semantic conventions, queued for export.
#[allow(clippy::too_many_arguments)]
fn spans(
    exporter: &otlp::Exporter,
    generation: &Generation,
    scheme: Scheme,
    peer: Option<IpAddr>,
    a: &Arrival,
    o: &Outcome<'_>,
    (start, started, elapsed): (SystemTime, Instant, Duration),
    trace: crate::policy::Trace,
) {
    use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
    use otlp::{boolean, int, string, SpanIds};
    let at = |i: Instant| start + i.saturating_duration_since(started);
    let method = a.method.as_str();
    let (host, port) = split_host(a.host());
    let mut attrs = vec![
        string("http.request.method", method),
        string("url.scheme", scheme.as_str()),
        string("url.path", a.path()),
        string(
            "network.protocol.version",
            a.protocol.trim_start_matches("HTTP/"),
        ),
        int("http.response.status_code", i64::from(o.status)),
        string("server.address", host),
        boolean("rampart.fast_path", o.fast_path),
    ];
    if let Some(p) = port {
        attrs.push(int("server.port", i64::from(p)));
    }
    if let Some(q) = a.query() {
        attrs.push(string("url.query", q));
    }
    if let Some(c) = a.client {
        attrs.push(string("client.address", &c.to_string()));
    }
    if let Some(p) = peer {
        attrs.push(string("network.peer.address", &p.to_string()));
    }
    if let Some(ua) = &a.user_agent {
        attrs.push(string("user_agent.original", ua));
    }
    if let Some(r) = o.route {
        attrs.push(string("rampart.route", &generation.routes[r].name));
    }
    if let Some(id) = o.request_id {
        attrs.push(string("rampart.request_id", &lossy(id)));
    }
    let server_error = o.status >= 500 || o.status == 0;
    if let Some(e) = o.error {
        attrs.push(string("error.type", e));
    } else if server_error {
        attrs.push(string("error.type", &o.status.to_string()));
    }
    exporter.send(otlp::span(
        SpanIds {
            trace_id: trace.trace_id,
            span_id: trace.span_id,
            parent: trace.parent_id,
            flags: trace.flags,
        },
        method.to_string(),
        SpanKind::Server,
        (start, start + elapsed),
        attrs,
        server_error,
    ));
    let Some((pool, _)) = o.upstream else { return };
    for (i, attempt) in o.attempt_spans.iter().enumerate() {
        let ep = &pool.endpoints[attempt.endpoint];
        let mut attrs = vec![
            string("http.request.method", method),
            string("server.address", &ep.addr.ip().to_string()),
            int("server.port", i64::from(ep.addr.port())),
            string("rampart.pool", &pool.name),
        ];
        if i > 0 {
            attrs.push(int("http.request.resend_count", i as i64));
        }
        if let Some(s) = attempt.status {
            attrs.push(int("http.response.status_code", i64::from(s)));
        }
        let failed = attempt.error.is_some() || attempt.status.is_some_and(|s| s >= 500);
        if let Some(e) = attempt.error {
            attrs.push(string("error.type", e));
        }
        exporter.send(otlp::span(
            SpanIds {
                trace_id: trace.trace_id,
                span_id: rand::random::<u64>() | 1,
                parent: Some(trace.span_id),
                flags: trace.flags,
            },
            method.to_string(),
            SpanKind::Client,
            (at(attempt.start), at(attempt.end)),
            attrs,
            failed,
        ));
    }
}

/// `host:port` (or `[v6]:port`) as host and port.
fn split_host(authority: &str) -> (&str, Option<u16>) {
    match authority.rsplit_once(':') {
        Some((h, p)) if !h.is_empty() && (!h.contains(':') || h.ends_with(']')) => (
            h.trim_start_matches('[').trim_end_matches(']'),
            p.parse().ok(),
        ),
        _ => (
            authority.trim_start_matches('[').trim_end_matches(']'),
            None,
        ),
    }
}

/// The error kind of a request the proxy answered itself, for the log and the
/// recent errors (`None` for answers that are not failures: redirects, static
/// responses, challenges, probes).
#[must_use]
pub fn error_kind(answer: &Answer) -> Option<&'static str> {
    match answer {
        Answer::Refused(_) => Some("refused"),
        Answer::NotFound => Some("no_route"),
        Answer::Forbidden => Some("forbidden"),
        Answer::ClientCertRequired { .. } => Some("client_cert_required"),
        Answer::RateLimited { .. } => Some("rate_limited"),
        Answer::Unauthorized { .. } => Some("unauthorized"),
        Answer::AuthDenied { .. } => Some("auth_denied"),
        Answer::Failed(status) => Some(failure_kind(*status)),
        Answer::Unavailable { .. } => Some("circuit_open"),
        Answer::Intercepted(_) => Some("upstream_status"),
        Answer::Redirect { .. }
        | Answer::Respond { .. }
        | Answer::AcmeChallenge(_)
        | Answer::Probe { .. } => None,
    }
}

/// The error kind of a failed request by the status the proxy answered.
#[must_use]
pub fn failure_kind(status: u16) -> &'static str {
    match status {
        502 => "upstream_error",
        503 => "no_endpoint",
        504 => "upstream_timeout",
        408 => "client_too_slow",
        400 => "client_timeout",
        _ => "failed",
    }
}

/// Failed requests kept for the dashboard and `/api/v1/errors`.
const RECENT_ERRORS: usize = 100;

/// One failed request, as the dashboard's "recent errors" shows it.
#[derive(Clone, Debug, Serialize)]
pub struct RecentError {
    /// When it ended (Unix milliseconds).
    pub time_ms: u64,
    /// Its request id.
    pub request_id: String,
    /// The method and path, when the access log took them.
    pub request: Option<String>,
    /// The status answered (0: none, the client left).
    pub status: u16,
    /// Why.
    pub error: Option<&'static str>,
    /// The route that matched.
    pub route: Option<String>,
    /// The pool's endpoint of the last attempt.
    pub upstream: Option<String>,
    /// How long it took, in milliseconds.
    pub duration_ms: f64,
}

impl RecentError {
    fn new(
        generation: &Generation,
        arrival: Option<&Arrival>,
        outcome: &Outcome<'_>,
        elapsed: Duration,
    ) -> Self {
        Self {
            time_ms: SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
            request_id: outcome
                .request_id
                .map(|id| lossy(id).into_owned())
                .unwrap_or_default(),
            request: arrival.map(|a| format!("{} {}", a.method, a.path())),
            status: outcome.status,
            error: outcome.error,
            route: outcome.route.map(|r| generation.routes[r].name.clone()),
            upstream: outcome.upstream.map(|(p, i)| p.endpoints[i].id.clone()),
            duration_ms: elapsed.as_secs_f64() * 1000.0,
        }
    }
}

/// The last [`RECENT_ERRORS`] failed requests, newest last.
#[derive(Debug, Default)]
pub struct RecentErrors(Mutex<VecDeque<RecentError>>);

impl RecentErrors {
    fn push(&self, e: RecentError) {
        let mut q = self.0.lock().expect("recent errors lock is never poisoned");
        if q.len() == RECENT_ERRORS {
            q.pop_front();
        }
        q.push_back(e);
    }

    /// A copy, newest first.
    #[must_use]
    pub fn newest_first(&self) -> Vec<RecentError> {
        let q = self.0.lock().expect("recent errors lock is never poisoned");
        q.iter().rev().cloned().collect()
    }
}
