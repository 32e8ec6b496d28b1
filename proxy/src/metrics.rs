//! Prometheus metrics of the data plane, in one registry served by the admin listener.
//! Gauges that describe the current generation (endpoint health, certificate expiry)
//! are refreshed at scrape time from the generation itself, so they never go stale.

use std::sync::Arc;

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::generation::Generation;
use crate::health::now_ms;

/// Latency buckets in seconds, from 1 ms to 60 s.
const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

/// Every metric the proxy exports.
#[allow(missing_docs)] // the help texts below document each metric
pub struct Metrics {
    registry: Registry,
    pub requests: IntCounterVec,
    pub request_duration: HistogramVec,
    pub upstream_ttfb: HistogramVec,
    pub upstream_failures: IntCounterVec,
    pub active_connections: IntGaugeVec,
    pub rejected_connections: IntCounterVec,
    /// Connections closed at once because their client address had
    /// `limits.max_connections_per_ip` open.
    pub rejected_client_connections: IntCounterVec,
    /// Connections from `listeners.proxy_protocol_from` closed for a missing or bad PROXY header.
    pub proxy_protocol_refused: IntCounterVec,
    /// Requests answered 429 by a route's rate limit.
    pub rate_limited: IntCounterVec,
    /// 1 while a pool is below its panic threshold (ejections ignored).
    pub pool_panic: IntGaugeVec,
    /// 1 while a pool's circuit breaker is open.
    pub breaker_open: IntGaugeVec,
    /// Requests in flight to each pool.
    pub pool_inflight: IntGaugeVec,
    /// Requests a pool's circuit breaker refused, by reason.
    pub pool_refused: IntCounterVec,
    /// Retries not made because the pool's retry budget was spent.
    pub retry_budget_exhausted: IntCounterVec,
    /// Requests copied to a route's shadow pool, by outcome.
    pub mirrored: IntCounterVec,
    /// Bytes into and out of response compression, by coding.
    pub compression_bytes: IntCounterVec,
    /// CPU time spent compressing responses, by coding.
    pub compression_seconds: prometheus::CounterVec,
    /// The last minutes of traffic, for the dashboard.
    pub rolling: crate::rolling::Rolling,
    pub tls_handshakes: IntCounter,
    pub tls_handshake_failures: IntCounterVec,
    /// Handshakes for names without a certificate under on-demand TLS, by outcome.
    pub tls_on_demand: IntCounterVec,
    pub endpoint_healthy: IntGaugeVec,
    pub endpoint_ejections: IntCounterVec,
    pub config_version: IntGauge,
    pub config_reloads: IntCounter,
    pub config_reload_failures: IntCounter,
    pub certificate_expiry: IntGaugeVec,
    pub header_timeouts: IntCounter,
    /// Requests served by the HTTP/1 fast path (`h1`); the rest went through Pingora.
    pub fast_path_requests: IntCounter,
    /// Requests served by the HTTP/2 fast path (`h2`); the rest went through Pingora.
    pub http2_fast_path_requests: IntCounter,
    pub swap_duration: Histogram,
    /// Access log lines written.
    pub access_log_lines: IntCounter,
    /// Access log lines dropped because the writer fell behind (a full queue).
    pub access_log_dropped: IntCounter,
    /// The last failed requests, for the dashboard and `/api/v1/errors`.
    pub recent_errors: crate::access::RecentErrors,
    /// Spans the OTLP collector accepted.
    pub spans_exported: IntCounter,
    /// Spans dropped, by reason (`queue_full`, `export_failed`).
    pub spans_dropped: IntCounterVec,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

fn reg<C: prometheus::core::Collector + Clone + 'static>(r: &Registry, c: C) -> C {
    r.register(Box::new(c.clone()))
        .expect("metric names are unique and valid");
    c
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Creates and registers every metric.
    #[must_use]
    pub fn new() -> Self {
        let r = Registry::new();
        build_info(&r);
        let hist = |name: &str, help: &str| {
            HistogramOpts::new(name, help).buckets(LATENCY_BUCKETS.to_vec())
        };
        Self {
            requests: reg(&r, IntCounterVec::new(Opts::new("rampart_requests_total", "Requests answered, by route, pool and status class"), &["route", "pool", "class"]).expect("valid")),
            request_duration: reg(&r, HistogramVec::new(hist("rampart_request_duration_seconds", "Time from request header to the end of the response, by route"), &["route"]).expect("valid")),
            upstream_ttfb: reg(&r, HistogramVec::new(hist("rampart_upstream_ttfb_seconds", "Time from sending a request upstream to its response header, by pool"), &["pool"]).expect("valid")),
            upstream_failures: reg(&r, IntCounterVec::new(Opts::new("rampart_upstream_failures_total", "Failed upstream attempts, by pool and kind (connect, timeout, status, error)"), &["pool", "kind"]).expect("valid")),
            active_connections: reg(&r, IntGaugeVec::new(Opts::new("rampart_active_connections", "Open client connections, by listener"), &["listener"]).expect("valid")),
            rejected_connections: reg(&r, IntCounterVec::new(Opts::new("rampart_rejected_connections_total", "Client connections closed at once because limits.max_connections was reached"), &["listener"]).expect("valid")),
            rejected_client_connections: reg(&r, IntCounterVec::new(Opts::new("rampart_rejected_client_connections_total", "Client connections closed at once because their address had limits.max_connections_per_ip open"), &["listener"]).expect("valid")),
            proxy_protocol_refused: reg(&r, IntCounterVec::new(Opts::new("rampart_proxy_protocol_refused_total", "Connections from listeners.proxy_protocol_from closed because they did not start with a valid PROXY protocol header"), &["listener"]).expect("valid")),
            rate_limited: reg(&r, IntCounterVec::new(Opts::new("rampart_rate_limited_requests_total", "Requests answered 429 by the route's rate limit"), &["route"]).expect("valid")),
            breaker_open: reg(&r, IntGaugeVec::new(Opts::new("rampart_circuit_breaker_open", "1 while a pool's circuit breaker is open (its requests are answered 503)"), &["pool"]).expect("valid")),
            pool_inflight: reg(&r, IntGaugeVec::new(Opts::new("rampart_pool_requests_in_flight", "Requests in flight to each pool"), &["pool"]).expect("valid")),
            pool_refused: reg(&r, IntCounterVec::new(Opts::new("rampart_pool_refused_total", "Requests refused by a pool's circuit breaker, by reason (max_in_flight, circuit_open)"), &["pool", "reason"]).expect("valid")),
            mirrored: reg(&r, IntCounterVec::new(Opts::new("rampart_mirrored_requests_total", "Requests copied to a route's shadow pool, by outcome (sent, failed, busy: over max_in_flight, too_large: a body over max_body, no_endpoint)"), &["route", "outcome"]).expect("valid")),
            compression_bytes: reg(&r, IntCounterVec::new(Opts::new("rampart_compression_bytes_total", "Response bytes into (side=in) and out of (side=out) compression, by algorithm"), &["algorithm", "side"]).expect("valid")),
            compression_seconds: reg(&r, prometheus::CounterVec::new(Opts::new("rampart_compression_seconds_total", "Time spent compressing responses, by algorithm"), &["algorithm"]).expect("valid")),
            retry_budget_exhausted: reg(&r, IntCounterVec::new(Opts::new("rampart_retry_budget_exhausted_total", "Retries not made because the pool's retry budget was spent"), &["pool"]).expect("valid")),
            pool_panic: reg(&r, IntGaugeVec::new(Opts::new("rampart_pool_panic", "1 while fewer than passive_health.panic_threshold percent of a pool's endpoints are free of ejection: ejections are then ignored"), &["pool"]).expect("valid")),
            tls_handshakes: reg(&r, IntCounter::new("rampart_tls_handshakes_total", "Completed TLS handshakes").expect("valid")),
            tls_handshake_failures: reg(&r, IntCounterVec::new(Opts::new("rampart_tls_handshake_failures_total", "Failed TLS handshakes, by reason"), &["reason"]).expect("valid")),
            tls_on_demand: reg(&r, IntCounterVec::new(Opts::new("rampart_tls_on_demand_handshakes_total", "Handshakes for a name without a certificate under on-demand TLS, by outcome (served: its certificate came while the handshake waited; denied; cached_denial; not_allowed; late: approved but not served within tls_on_demand.hold; unavailable: no controller to ask)"), &["outcome"]).expect("valid")),
            endpoint_healthy: reg(&r, IntGaugeVec::new(Opts::new("rampart_endpoint_healthy", "1 when an endpoint may receive traffic (active check passing and not ejected)"), &["pool", "endpoint"]).expect("valid")),
            endpoint_ejections: reg(&r, IntCounterVec::new(Opts::new("rampart_endpoint_ejections_total", "Passive-health ejections, by pool and endpoint"), &["pool", "endpoint"]).expect("valid")),
            config_version: reg(&r, IntGauge::new("rampart_config_version", "Version of the configuration generation being served").expect("valid")),
            config_reloads: reg(&r, IntCounter::new("rampart_config_reloads_total", "Successful configuration reloads").expect("valid")),
            config_reload_failures: reg(&r, IntCounter::new("rampart_config_reload_failures_total", "Configuration reloads that failed; the previous generation kept serving").expect("valid")),
            certificate_expiry: reg(&r, IntGaugeVec::new(Opts::new("rampart_certificate_expiry_seconds", "Seconds until the certificate served for a name expires"), &["name"]).expect("valid")),
            header_timeouts: reg(&r, IntCounter::new("rampart_header_read_timeouts_total", "Client connections closed for not sending a request header in time").expect("valid")),
            fast_path_requests: reg(&r, IntCounter::new("rampart_http1_fast_path_requests_total", "HTTP/1 requests served by the fast path; the others went through the full (Pingora) path").expect("valid")),
            http2_fast_path_requests: reg(&r, IntCounter::new("rampart_http2_fast_path_requests_total", "HTTP/2 requests served by the fast path; the others went through the full (Pingora) path").expect("valid")),
            swap_duration: reg(&r, Histogram::with_opts(hist("rampart_config_build_seconds", "Time to build a configuration generation")).expect("valid")),
            access_log_lines: reg(&r, IntCounter::new("rampart_access_log_lines_total", "Access log lines written").expect("valid")),
            access_log_dropped: reg(&r, IntCounter::new("rampart_access_log_dropped_total", "Access log lines dropped because the writer fell behind (the disk or pipe is slower than the requests); requests never wait for the log").expect("valid")),
            recent_errors: crate::access::RecentErrors::default(),
            spans_exported: reg(&r, IntCounter::new("rampart_otlp_spans_exported_total", "Request spans the OTLP collector accepted").expect("valid")),
            spans_dropped: reg(&r, IntCounterVec::new(Opts::new("rampart_otlp_spans_dropped_total", "Request spans dropped: the queue was full (queue_full) or the collector refused or could not be reached (export_failed)"), &["reason"]).expect("valid")),
            rolling: crate::rolling::Rolling::default(),
            registry: r,
        }
    }

    /// Counts what an answer of the policy says about the request (rate limits), the
    /// same for every transport.
    pub fn count_answer(&self, answer: &crate::policy::Answer, route: Option<&str>) {
        if let (crate::policy::Answer::RateLimited { .. }, Some(route)) = (answer, route) {
            self.rate_limited.with_label_values(&[route]).inc();
        }
    }

    /// Prometheus text exposition of every metric, with generation gauges refreshed.
    #[must_use]
    pub fn render(&self, generation: &Generation) -> Vec<u8> {
        self.refresh(generation);
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("encoding to a Vec cannot fail");
        out
    }

    fn refresh(&self, generation: &Generation) {
        let now = now_ms();
        self.endpoint_healthy.reset();
        self.pool_panic.reset();
        self.breaker_open.reset();
        self.pool_inflight.reset();
        for pool in generation.pools.values() {
            self.breaker_open
                .with_label_values(&[pool.name.as_str()])
                .set(i64::from(pool.breaker.is_open(now)));
            self.pool_inflight
                .with_label_values(&[pool.name.as_str()])
                .set(i64::from(pool.breaker.inflight()));
            let panic = crate::balance::in_panic(&pool.states, now, pool.eject.panic_threshold);
            self.pool_panic
                .with_label_values(&[pool.name.as_str()])
                .set(i64::from(panic));
            for ep in &pool.endpoints {
                self.endpoint_healthy
                    .with_label_values(&[pool.name.as_str(), ep.id.as_str()])
                    .set(i64::from(ep.state.is_available(now)));
            }
        }
        self.certificate_expiry.reset();
        let unix_now = rampart_config::unix_now_signed();
        for (name, cert) in generation.certs.entries() {
            self.certificate_expiry
                .with_label_values(&[name.as_str()])
                .set(cert.not_after - unix_now);
        }
        self.config_version
            .set(i64::try_from(generation.version).unwrap_or(i64::MAX));
    }
}

/// Status classes, in the order of [`RequestMetrics::by_class`].
const CLASSES: [&str; 6] = ["1xx", "2xx", "3xx", "4xx", "5xx", "other"];

/// The request metrics of one route, resolved once per generation so that the request
/// path only increments (no label hashing or registry locks per request). The 2xx
/// counter and the duration histogram are resolved up front; the other classes on their
/// first request (once per route), which keeps building a generation of thousands of
/// routes fast. Clones share the handles, so generations that keep a route share them.
#[derive(Clone)]
pub struct RequestMetrics {
    inner: Arc<RouteHandles>,
}

struct RouteHandles {
    family: prometheus::IntCounterVec,
    route: String,
    pool: String,
    by_class: [std::sync::OnceLock<IntCounter>; 6],
    duration: Histogram,
}

impl std::fmt::Debug for RequestMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RequestMetrics")
    }
}

impl RequestMetrics {
    /// The handles for `route` and `pool` ("" when none).
    #[must_use]
    pub fn new(metrics: &Metrics, route: &str, pool: &str) -> Self {
        let handles = RouteHandles {
            family: metrics.requests.clone(),
            route: route.to_string(),
            pool: pool.to_string(),
            by_class: Default::default(),
            duration: metrics.request_duration.with_label_values(&[route]),
        };
        // The class nearly every request has: resolved now, so it is exported as 0.
        handles.class(1);
        Self {
            inner: Arc::new(handles),
        }
    }

    /// Counts a finished request.
    pub fn observe(&self, status: u16, seconds: f64) {
        let class = match status {
            100..=199 => 0,
            200..=299 => 1,
            300..=399 => 2,
            400..=499 => 3,
            500..=599 => 4,
            _ => 5,
        };
        self.inner.class(class).inc();
        self.inner.duration.observe(seconds);
    }
}

impl RouteHandles {
    fn class(&self, i: usize) -> &IntCounter {
        self.by_class[i].get_or_init(|| {
            self.family
                .with_label_values(&[&self.route, &self.pool, CLASSES[i]])
        })
    }
}

/// Registers `rampart_build_info` (always 1; the labels say which binary this is).
fn build_info(r: &Registry) {
    let info = rampart_config::build::get();
    let mut opts = Opts::new(
        "rampart_build_info",
        "Version, git commit, compiler, target and profile of the running binary (always 1)",
    );
    for (k, v) in info.labels() {
        opts = opts.const_label(k, v);
    }
    let g = IntGauge::with_opts(opts).expect("valid");
    g.set(1);
    reg(r, g);
}
