//! A generation: one validated configuration compiled for serving (route index, pools
//! with their balancers and endpoint state, certificates by SNI, limits). Immutable once
//! built; the proxy swaps whole generations atomically.
//!
//! Building does the slow, fallible work up front (resolving upstream names, reading
//! certificate files, issuing internal certificates) so that a bad configuration fails
//! here, before the swap, and the previous generation keeps serving.

use std::collections::BTreeMap;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{anyhow, Context};
use http::{HeaderName, HeaderValue};
use rampart_config::snapshot::{CertificateBundle, ClientAuthBundle};
use rampart_config::{
    Action, Config, HashKey, HealthCheck, HostPattern, Retries, Route, Timeouts, TlsSource,
};

use crate::balance::Balancer;
use crate::headers::ForwardingPolicy;
use crate::health::{EjectPolicy, EndpointState};
use crate::limits::HeaderLimits;
use crate::metrics::{Metrics, RequestMetrics};
use crate::routing::Router;
use crate::tls::client_auth::ClientAuthRt;
use crate::tls::internal_ca::InternalCa;
use crate::tls::{files, CertSet};

/// The compiled, immutable serving state of one configuration version.
#[derive(Debug)]
pub struct Generation {
    /// Monotonic version (1 for the first configuration loaded).
    pub version: u64,
    /// The configuration this was built from.
    pub config: Arc<Config>,
    /// Route index over `routes`.
    pub router: Router,
    /// Routes, in configuration order.
    pub routes: Vec<RouteRt>,
    /// Pools by name.
    pub pools: BTreeMap<String, Arc<PoolRt>>,
    /// Certificates by SNI.
    pub certs: CertSet,
    /// The fleet's session ticket keys, from the controller's snapshot (`None`: this
    /// process makes its own when `session_tickets.enabled`).
    pub fleet_tickets: Option<Arc<crate::tls::tickets::TicketRing>>,
    /// Some host authenticates clients by certificate (`client_auth`): handshakes read
    /// the ClientHello before choosing their configuration.
    pub client_auth_in_use: bool,
    /// On-demand TLS from the controller: a handshake for a name without a
    /// certificate asks for one (and reads the ClientHello first to know the name).
    pub on_demand: Option<Arc<rampart_config::snapshot::OnDemandPolicy>>,
    /// The headers that carry verified client certificates upstream, under any
    /// `client_auth`: removed from every client request.
    pub client_cert_headers: Vec<HeaderName>,
    /// Forwarding headers policy.
    pub forwarding: ForwardingPolicy,
    /// Request header limits.
    pub header_limits: HeaderLimits,
    /// Port of the HTTPS listener, for redirects.
    pub https_port: Option<u16>,
    /// ACME HTTP-01 answers pushed by the controller (token → key authorization).
    pub acme_challenges: Arc<BTreeMap<String, String>>,
    /// ACME TLS-ALPN-01 answers pushed by the controller: the certificate shown to an
    /// `acme-tls/1` handshake for each name (RFC 8737).
    pub acme_tls_alpn: Arc<std::collections::HashMap<String, Arc<rustls::sign::CertifiedKey>>>,
    /// Metrics of requests that matched no route.
    pub unrouted_metrics: RequestMetrics,
    /// The access log, when one is configured.
    pub access_log: Option<crate::access::AccessLogRt>,
    /// Span export, when configured.
    pub tracing: Option<TracingRt>,
    /// The global error pages (`[error_pages]`), for answers outside any route.
    pub error_pages: Option<Arc<crate::policy::pages::ErrorPagesRt>>,
}

impl Generation {
    /// Whether a client's request header `name` goes upstream as the client sent it
    /// when `plan` forwards the request: not the request id, a forwarding header the
    /// proxy writes, a client certificate header, one the route's `request_headers`
    /// remove or set, or one its auth service alone sets. Every transport and the
    /// mirror's copy ask this; hop-by-hop fields and Host are each transport's own.
    #[must_use]
    pub fn passes_header(&self, plan: &crate::policy::Forward, name: &str) -> bool {
        let route = &self.routes[plan.route];
        !(self
            .forwarding
            .request_id
            .as_str()
            .eq_ignore_ascii_case(name)
            || plan
                .forwarded
                .iter()
                .any(|(n, _)| n.as_str().eq_ignore_ascii_case(name))
            || self
                .client_cert_headers
                .iter()
                .any(|n| n.as_str().eq_ignore_ascii_case(name))
            || route.request_headers.drops(name)
            || route.auth_sets(name))
    }

    /// The error pages of an answer on route `route` (or on none) for a request to a
    /// pool with `pool_pages`: the route's own, else the pool's, else the global ones.
    #[must_use]
    pub fn pages<'a>(
        &'a self,
        route: Option<usize>,
        pool_pages: Option<&'a crate::policy::pages::ErrorPagesRt>,
    ) -> Option<&'a crate::policy::pages::ErrorPagesRt> {
        route
            .and_then(|r| self.routes[r].error_pages.as_deref())
            .or(pool_pages)
            .or(self.error_pages.as_deref())
    }
}

/// Span export in force: the exporter (kept across reloads that keep its settings)
/// and the share of new traces sampled.
#[derive(Debug)]
pub struct TracingRt {
    /// Where spans go.
    pub exporter: Arc<crate::access::otlp::Exporter>,
    /// Share of the traces started here that are sampled.
    pub sample: f64,
}

/// A route ready for serving.
#[derive(Debug)]
pub struct RouteRt {
    /// Route name (metrics label).
    pub name: String,
    /// What the route does.
    pub action: Action,
    /// The pool of a forward action (of a split: the first).
    pub pool: Option<Arc<PoolRt>>,
    /// The pools of a weighted split, when the action is one.
    pub split: Option<crate::policy::split::SplitRt>,
    /// Redirect plain HTTP to HTTPS.
    pub https_redirect: bool,
    /// Requests need a verified client certificate (`require_client_cert`).
    pub require_client_cert: bool,
    /// The route's regular-expression redirect: pattern, location template, status.
    pub redirect: Option<(regex::Regex, String, u16)>,
    /// The route's path rewrite: pattern, replacement.
    pub rewrite: Option<(regex::Regex, String)>,
    /// The path prefix removed before forwarding (`strip_prefix`), without a trailing
    /// slash; `None` when the path goes upstream as it came.
    pub strip_prefix: Option<String>,
    /// The client addresses served (`allow_from`); empty: everyone.
    pub allow_from: Vec<rampart_config::IpRange>,
    /// HTTP Basic authentication in front of the route.
    pub basic_auth: Option<Arc<crate::auth::BasicAuthRt>>,
    /// Forward authentication in front of the route.
    pub forward_auth: Option<Arc<crate::forward_auth::ForwardAuthRt>>,
    /// Headers set on or removed from the upstream request.
    pub request_headers: crate::headers::HeaderEdits,
    /// Headers set on or removed from the upstream's response.
    pub response_headers: crate::headers::HeaderEdits,
    /// Body size limit in bytes.
    pub max_body: u64,
    /// This route's request metrics.
    pub metrics: RequestMetrics,
    /// Its rate limit, whose buckets outlive reloads that keep the same settings.
    pub limiter: Option<Arc<crate::limits::rate::RouteLimiter>>,
    /// Whether its requests go to the access log.
    pub access_log: bool,
    /// Its own error pages (merged with the global ones), when it has some.
    pub error_pages: Option<Arc<crate::policy::pages::ErrorPagesRt>>,
    /// Its response compression.
    pub compress: Option<crate::compress::CompressRt>,
    /// Its traffic mirror.
    pub mirror: Option<crate::mirror::MirrorRt>,
}

impl RouteRt {
    /// The pool a plan chose: `choice` into a split's pools, else the route's pool.
    #[must_use]
    pub fn pool_at(&self, choice: usize) -> Option<&Arc<PoolRt>> {
        match &self.split {
            Some(s) => s.pools.get(choice).map(|p| &p.pool),
            None => self.pool.as_ref(),
        }
    }

    /// The request metrics of a request that went to `pool` (a split counts each of
    /// its pools under its own label).
    #[must_use]
    pub fn metrics_for(&self, pool: Option<&PoolRt>) -> &RequestMetrics {
        self.split
            .as_ref()
            .zip(pool)
            .and_then(|(s, pool)| s.pools.iter().find(|p| std::ptr::eq(&*p.pool, pool)))
            .map_or(&self.metrics, |p| &p.metrics)
    }

    /// Whether the client's header `name` is withheld from upstream because the
    /// route's `forward_auth` service alone may set it.
    #[must_use]
    pub fn auth_sets(&self, name: &str) -> bool {
        self.forward_auth
            .as_ref()
            .is_some_and(|a| a.copy.iter().any(|n| n.as_str().eq_ignore_ascii_case(name)))
    }
}

impl RouteRt {
    /// Whether `allow_from` lets the client at `ip` (after trusted proxies) in; a
    /// request without a client address is refused by a route that has a list.
    #[must_use]
    pub fn admits(&self, ip: Option<std::net::IpAddr>) -> bool {
        self.allow_from.is_empty()
            || ip.is_some_and(|ip| self.allow_from.iter().any(|r| r.contains(&ip)))
    }
}

/// What a request brings to the pick of an endpoint in its pool.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PickKey {
    /// The consistent-hash key's hash, when the pool's balancer uses one.
    pub hash: Option<u64>,
    /// The endpoint value of the request's sticky cookie, when the pool is sticky.
    pub sticky: Option<u64>,
}

impl PoolRt {
    /// Picks an endpoint for a request with this consistent-hash key that has not
    /// tried it yet (see [`crate::balance::Balancer::pick`]).
    #[must_use]
    pub fn pick(&self, key: PickKey, tried: &[usize], now_ms: u64) -> Option<usize> {
        self.balancer.pick(
            &self.states,
            crate::balance::PickInput {
                key_hash: key.hash,
                sticky: key
                    .sticky
                    .and_then(|v| self.sticky.as_ref().and_then(|s| s.endpoint(v))),
                tried,
                now_ms,
                panic_threshold: self.eject.panic_threshold,
                slow_start_ms: self.slow_start_ms,
            },
        )
    }

    /// Whether an endpoint is available now (healthy, not ejected): a split gives a
    /// pool without one no clients while another can serve.
    #[must_use]
    pub fn serving(&self, now_ms: u64) -> bool {
        self.states.iter().any(|s| s.is_available(now_ms))
    }

    /// Whether a retry has an endpoint to go to: one this request has not tried.
    #[must_use]
    pub fn can_retry(&self, key: PickKey, tried: &[usize], now_ms: u64) -> bool {
        self.pick(key, tried, now_ms).is_some()
    }

    /// The `Set-Cookie` of a sticky pool whose request went to endpoint `idx`, unless
    /// the request's cookie named it already.
    #[must_use]
    pub fn sticky_cookie(&self, key: PickKey, idx: usize, https: bool) -> Option<HeaderValue> {
        self.sticky.as_ref()?.set_cookie(idx, key.sticky, https)
    }

    /// Whether one more endpoint may be ejected now without passing the pool's cap
    /// (`passive_health.max_ejected_percent`; at least one endpoint always may be).
    #[must_use]
    pub fn may_eject(&self, now_ms: u64) -> bool {
        let ejected = self
            .states
            .iter()
            .filter(|s| s.ejected_until(now_ms).is_some())
            .count();
        let cap = (self.states.len() * usize::from(self.eject.max_ejected_percent) / 100).max(1);
        ejected < cap
    }
}

/// A pool ready for serving.
#[derive(Debug)]
pub struct PoolRt {
    /// Pool name (metrics label).
    pub name: String,
    /// Endpoints in configuration order.
    pub endpoints: Vec<EndpointRt>,
    /// The endpoints' live state, indexed like `endpoints` (what balancers read).
    pub states: Vec<Arc<EndpointState>>,
    /// The balancing policy.
    pub balancer: Balancer,
    /// What consistent hashing hashes.
    pub hash_key: HashKey,
    /// Passive-health ejection.
    pub eject: EjectPolicy,
    /// Upstream timeouts.
    pub timeouts: Timeouts,
    /// Retry policy.
    pub retries: Retries,
    /// Active health check, if configured.
    pub health_check: Option<HealthCheck>,
    /// How long in-flight requests on a removed endpoint may go on.
    pub drain_timeout: Duration,
    /// Slow start in milliseconds (0: none).
    pub slow_start_ms: u64,
    /// Upstream time-to-first-byte histogram of this pool.
    pub ttfb: prometheus::Histogram,
    /// How its endpoints are reached: protocol, TLS, PROXY protocol.
    pub peer: Arc<crate::peer::PeerSettings>,
    /// Its sticky-session cookie, when it has one.
    pub sticky: Option<crate::balance::sticky::StickyRt>,
    /// Its circuit breaker's settings.
    pub circuit_breaker: Option<rampart_config::CircuitBreaker>,
    /// Its own error pages (merged with the global ones), when it has some.
    pub error_pages: Option<Arc<crate::policy::pages::ErrorPagesRt>>,
    /// Its admission counters (in flight, retries, the breaker's window), kept across
    /// reloads that keep the pool.
    pub breaker: Arc<crate::limits::breaker::BreakerState>,
}

impl PoolRt {
    /// Admits a request (see [`crate::limits::breaker::admit`]); a refusal is
    /// counted.
    pub fn admit<S: std::ops::Deref<Target = crate::limits::breaker::BreakerState>>(
        &self,
        state: S,
        metrics: &crate::metrics::Metrics,
        now_ms: u64,
    ) -> Result<crate::limits::breaker::Ticket<S>, crate::limits::breaker::Refusal> {
        crate::limits::breaker::admit(state, self.circuit_breaker.as_ref(), now_ms).inspect_err(
            |r| {
                metrics
                    .pool_refused
                    .with_label_values(&[self.name.as_str(), r.as_str()])
                    .inc();
            },
        )
    }

    /// Whether the retry budget lets the request holding `ticket` retry; a refusal
    /// is counted.
    pub fn retry_allowed<S: std::ops::Deref<Target = crate::limits::breaker::BreakerState>>(
        &self,
        ticket: &crate::limits::breaker::Ticket<S>,
        metrics: &crate::metrics::Metrics,
    ) -> bool {
        let allowed = ticket.retry_allowed(&self.retries);
        if !allowed {
            metrics
                .retry_budget_exhausted
                .with_label_values(&[self.name.as_str()])
                .inc();
        }
        allowed
    }
}

/// An endpoint ready for serving.
#[derive(Debug)]
pub struct EndpointRt {
    /// Stable identity: the configured address ("host:port").
    pub id: String,
    /// The resolved socket address.
    pub addr: SocketAddr,
    /// Configured weight.
    pub weight: u32,
    /// Live state, carried over from the previous generation when the endpoint remains.
    pub state: Arc<EndpointState>,
}

/// Builds generations; keeps what must outlive one (the internal CA and its leaves).
#[derive(Debug)]
pub struct Builder {
    data_dir: PathBuf,
    ca: Mutex<Option<Arc<InternalCa>>>,
    metrics: Arc<Metrics>,
    /// The access log's writer, kept across reloads while its path stays the same.
    access_sink: Mutex<Option<Arc<crate::access::Sink>>>,
    /// The span exporter, kept across reloads while its settings stay the same.
    exporter: Mutex<Option<Arc<crate::access::otlp::Exporter>>>,
}

impl Builder {
    /// A builder whose internal CA lives under `data_dir`, registering generations'
    /// metric handles in `metrics`.
    #[must_use]
    pub fn new(data_dir: PathBuf, metrics: Arc<Metrics>) -> Self {
        Self {
            data_dir,
            ca: Mutex::new(None),
            metrics,
            access_sink: Mutex::new(None),
            exporter: Mutex::new(None),
        }
    }

    /// The span export of `config`: the current exporter when its settings are
    /// unchanged, a new one otherwise.
    fn tracing(&self, config: &Config) -> anyhow::Result<Option<TracingRt>> {
        use crate::access::otlp::{Exporter, SpanCounters};
        let Some(settings) = &config.tracing else {
            return Ok(None);
        };
        let mut current = self
            .exporter
            .lock()
            .expect("exporter lock is never poisoned: no panics while held");
        let exporter = match current.as_ref() {
            Some(e) if e.serves(settings) => e.clone(),
            _ => {
                let counters = SpanCounters {
                    exported: self.metrics.spans_exported.clone(),
                    dropped: self.metrics.spans_dropped.clone(),
                };
                let e = Exporter::start(
                    &settings.otlp_endpoint,
                    &settings.service_name,
                    settings.queue,
                    counters,
                )?;
                *current = Some(e.clone());
                e
            }
        };
        Ok(Some(TracingRt {
            exporter,
            sample: settings.sample,
        }))
    }

    /// The access log of `config`: the current writer when its path is unchanged, a
    /// new one otherwise (the old one ends with the last generation using it).
    fn access_log(&self, config: &Config) -> anyhow::Result<Option<crate::access::AccessLogRt>> {
        use crate::access::{AccessLogRt, Sink, Target};
        let Some(settings) = &config.access_log else {
            return Ok(None);
        };
        let target = Target::parse(&settings.path);
        let mut current = self
            .access_sink
            .lock()
            .expect("sink lock is never poisoned: no panics while held");
        let sink = match current.as_ref() {
            Some(s) if s.serves(&target, settings.buffer) => s.clone(),
            _ => {
                let sink = Sink::open(
                    target,
                    settings.buffer,
                    self.metrics.access_log_dropped.clone(),
                    self.metrics.access_log_lines.clone(),
                )?;
                *current = Some(sink.clone());
                sink
            }
        };
        Ok(Some(AccessLogRt::new(settings, sink)))
    }

    /// Whether an internal-CA certificate in use is due for renewal.
    #[must_use]
    pub fn internal_renewal_due(&self) -> bool {
        self.ca
            .lock()
            .expect("CA lock is never poisoned: no panics while held")
            .as_ref()
            .is_some_and(|ca| ca.renewal_due())
    }

    /// The internal CA, created on first use.
    ///
    /// # Errors
    /// When the CA cannot be read or created.
    pub fn internal_ca(&self) -> anyhow::Result<Arc<InternalCa>> {
        let mut ca = self
            .ca
            .lock()
            .expect("CA lock is never poisoned: no panics while held");
        if let Some(ca) = ca.as_ref() {
            return Ok(ca.clone());
        }
        let loaded =
            Arc::new(InternalCa::load_or_create(&self.data_dir).with_context(|| {
                format!("internal CA in {}", self.data_dir.join("ca").display())
            })?);
        *ca = Some(loaded.clone());
        Ok(loaded)
    }

    /// Compiles `config` as `version`, reusing endpoint state from `prev`.
    ///
    /// # Errors
    /// When an upstream name does not resolve or a certificate cannot be loaded; the
    /// message names the field and the file or host.
    pub fn build(
        &self,
        config: Config,
        version: u64,
        prev: Option<&Generation>,
    ) -> anyhow::Result<Generation> {
        self.build_with(config, &[], version, prev)
    }

    /// Like [`Builder::build`], also serving the certificates in `bundles` (from a
    /// snapshot, where certificates travel as PEM rather than as files).
    ///
    /// # Errors
    /// As [`Builder::build`], and when a bundle does not load.
    pub fn build_with(
        &self,
        config: Config,
        bundles: &[CertificateBundle],
        version: u64,
        prev: Option<&Generation>,
    ) -> anyhow::Result<Generation> {
        let mut pools = BTreeMap::new();
        for (name, pool) in &config.pools {
            pools.insert(
                name.clone(),
                Arc::new(build_pool(name, pool, prev, &self.metrics, &config)?),
            );
        }
        // Metric handles of routes that remain are reused: looking up label values for
        // every route of a large configuration was a tenth of the build.
        let prev_routes: std::collections::HashMap<&str, &RouteRt> = prev
            .map(|g| g.routes.iter().map(|r| (r.name.as_str(), r)).collect())
            .unwrap_or_default();
        let error_pages =
            crate::policy::pages::ErrorPagesRt::build(None, config.error_pages.as_ref())?;
        let routes = config
            .routes
            .iter()
            .map(|r| {
                let pages = crate::policy::pages::ErrorPagesRt::own(
                    r.error_pages.as_ref(),
                    config.error_pages.as_ref(),
                )
                .with_context(|| format!("routes {}", r.name))?;
                let mut route = build_route(
                    r,
                    &config,
                    &pools,
                    &self.metrics,
                    prev_routes.get(r.name.as_str()).copied(),
                );
                route.error_pages = pages;
                Ok(route)
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let certs = self.build_certs(&config, bundles, prev)?;
        let mut client_cert_headers: Vec<HeaderName> = Vec::new();
        for (_, cert) in certs.entries() {
            for (_, name) in cert.client_auth.iter().flat_map(|a| &a.headers) {
                if !client_cert_headers.contains(name) {
                    client_cert_headers.push(name.clone());
                }
            }
        }
        let client_auth_in_use = certs.entries().any(|(_, c)| c.client_auth.is_some());
        let access_log = self.access_log(&config)?;
        let tracing = self.tracing(&config)?;
        let forwarding = ForwardingPolicy {
            trusted: config.forwarding.trusted_proxies.clone(),
            request_id: HeaderName::from_bytes(config.forwarding.request_id_header.as_bytes())
                .context("forwarding.request_id_header")?,
        };
        let header_limits = HeaderLimits {
            max_bytes: usize::try_from(config.limits.max_header_bytes.0).unwrap_or(usize::MAX),
            max_count: config.limits.max_header_count,
        };
        Ok(Generation {
            version,
            router: Router::new(&config.routes),
            routes,
            pools,
            certs,
            fleet_tickets: None,
            client_auth_in_use,
            on_demand: None,
            client_cert_headers,
            forwarding,
            header_limits,
            https_port: config.listeners.https.map(|a| a.port()),
            acme_challenges: Arc::default(),
            acme_tls_alpn: Arc::default(),
            unrouted_metrics: RequestMetrics::new(&self.metrics, "", ""),
            access_log,
            tracing,
            error_pages,
            config: Arc::new(config),
        })
    }

    fn build_certs(
        &self,
        config: &Config,
        bundles: &[CertificateBundle],
        prev: Option<&Generation>,
    ) -> anyhow::Result<CertSet> {
        // A policy that stays keeps its handshake configuration (and session cache).
        let kept: std::collections::HashMap<u64, &Arc<ClientAuthRt>> = prev
            .map(|g| {
                g.certs
                    .entries()
                    .filter_map(|(_, c)| c.client_auth.as_ref())
                    .map(|a| (a.id, a))
                    .collect()
            })
            .unwrap_or_default();
        let client_auth = |bundle: &ClientAuthBundle| -> anyhow::Result<Arc<ClientAuthRt>> {
            let fresh = ClientAuthRt::new(bundle)?;
            Ok(match kept.get(&fresh.id) {
                Some(old) if old.headers == fresh.headers => Arc::clone(old),
                _ => Arc::new(fresh),
            })
        };
        let mut set = CertSet::default();
        for (i, b) in bundles.iter().enumerate() {
            let hosts: Vec<String> = b.hosts.iter().map(ToString::to_string).collect();
            let mut cert = files::from_pem(b.chain_pem.as_bytes(), b.key_pem.as_bytes())
                .with_context(|| format!("certificates[{i}] ({})", hosts.join(", ")))?;
            if let Some(auth) = &b.client_auth {
                cert.client_auth = Some(client_auth(auth).with_context(|| {
                    format!("certificates[{i}] ({}): client_auth", hosts.join(", "))
                })?);
            }
            for host in &b.hosts {
                match host {
                    HostPattern::Exact(h) => set.insert_exact(h.as_str(), cert.clone()),
                    HostPattern::Wildcard(s) => set.insert_wildcard(s.as_str(), cert.clone()),
                }
            }
        }
        for (i, entry) in config.tls.iter().enumerate() {
            let hosts: Vec<String> = entry.hosts.iter().map(ToString::to_string).collect();
            let mut cert = match &entry.source {
                TlsSource::Files { cert, key } => files::load(cert, key)
                    .with_context(|| format!("tls[{i}] ({})", hosts.join(", ")))?,
                TlsSource::Internal => self
                    .internal_ca()?
                    .leaf(&hosts)
                    .with_context(|| format!("tls[{i}]: issuing an internal certificate"))?,
                // Until the ACME orderer has a certificate for these names, they are
                // served from the internal CA so that the listener still works.
                TlsSource::Acme(_) => self.internal_ca()?.leaf(&hosts).with_context(|| {
                    format!("tls[{i}]: issuing a placeholder until ACME delivers")
                })?,
            };
            if let Some(auth) = &entry.client_auth {
                let bundle = ClientAuthBundle::read(auth).with_context(|| {
                    format!("tls[{i}].client_auth: reading {}", auth.ca_file.display())
                })?;
                cert.client_auth = Some(client_auth(&bundle).with_context(|| {
                    format!("tls[{i}].client_auth ({})", auth.ca_file.display())
                })?);
            }
            for host in &entry.hosts {
                match host {
                    HostPattern::Exact(h) => set.insert_exact(h.as_str(), cert.clone()),
                    HostPattern::Wildcard(s) => set.insert_wildcard(s.as_str(), cert.clone()),
                }
            }
        }
        let default = config
            .server
            .default_sni
            .as_ref()
            .and_then(|sni| set.lookup(sni.as_str()).cloned());
        set.set_default(default);
        Ok(set)
    }
}

fn build_pool(
    name: &str,
    pool: &rampart_config::Pool,
    prev: Option<&Generation>,
    metrics: &Metrics,
    config: &Config,
) -> anyhow::Result<PoolRt> {
    let error_pages = crate::policy::pages::ErrorPagesRt::own(
        pool.error_pages.as_ref(),
        config.error_pages.as_ref(),
    )
    .with_context(|| format!("pools.{name}"))?;
    let previous: std::collections::HashMap<&str, &Arc<EndpointState>> = prev
        .and_then(|g| g.pools.get(name))
        .map(|p| {
            p.endpoints
                .iter()
                .map(|e| (e.id.as_str(), &e.state))
                .collect()
        })
        .unwrap_or_default();
    let mut endpoints = Vec::with_capacity(pool.endpoints.len());
    for (i, ep) in pool.endpoints.iter().enumerate() {
        let id = ep.address.to_string();
        let addr = resolve(ep.address.host(), ep.address.port())
            .with_context(|| format!("pools.{name}.endpoints[{i}].address"))?;
        let state = previous
            .get(id.as_str())
            .map_or_else(|| Arc::new(EndpointState::default()), |s| Arc::clone(s));
        endpoints.push(EndpointRt {
            id,
            addr,
            weight: ep.weight,
            state,
        });
    }
    let peer = Arc::new(crate::peer::PeerSettings::build(name, pool)?);
    let weights: Vec<u32> = endpoints.iter().map(|e| e.weight).collect();
    let ids: Vec<String> = endpoints.iter().map(|e| e.id.clone()).collect();
    Ok(PoolRt {
        name: name.to_string(),
        states: endpoints.iter().map(|e| e.state.clone()).collect(),
        balancer: Balancer::new(pool.balance, &weights, &ids),
        circuit_breaker: pool.circuit_breaker.clone(),
        error_pages,
        breaker: prev
            .and_then(|g| g.pools.get(name))
            .map_or_else(Arc::default, |p| p.breaker.clone()),
        sticky: pool
            .sticky
            .as_ref()
            .map(|s| crate::balance::sticky::StickyRt::new(s, &ids)),
        endpoints,
        hash_key: pool.hash_key.clone().unwrap_or(HashKey::ClientIp),
        drain_timeout: pool.drain_timeout.0,
        slow_start_ms: pool
            .slow_start
            .map_or(0, |d| u64::try_from(d.0.as_millis()).unwrap_or(u64::MAX)),
        eject: EjectPolicy {
            consecutive_failures: pool.passive_health.consecutive_failures,
            base: pool.passive_health.eject_for.0,
            max: pool.passive_health.max_eject_for.0,
            panic_threshold: pool.passive_health.panic_threshold,
            max_ejected_percent: pool.passive_health.max_ejected_percent,
        },
        timeouts: pool.timeouts.clone(),
        retries: pool.retries.clone(),
        health_check: pool.health_check.clone(),
        ttfb: metrics.upstream_ttfb.with_label_values(&[name]),
        peer,
    })
}

fn build_route(
    route: &Route,
    config: &Config,
    pools: &BTreeMap<String, Arc<PoolRt>>,
    metrics: &Arc<Metrics>,
    prev: Option<&RouteRt>,
) -> RouteRt {
    let pool = match &route.action {
        Action::Forward(to) => pools.get(to.first()).cloned(),
        _ => None,
    };
    let split = match &route.action {
        Action::Forward(rampart_config::ForwardTo::Split(split)) => {
            let entries = split
                .iter()
                .filter_map(|w| {
                    Some(crate::policy::split::SplitPool {
                        pool: pools.get(&w.pool)?.clone(),
                        weight: w.weight,
                        metrics: RequestMetrics::new(metrics, &route.name, &w.pool),
                    })
                })
                .collect();
            Some(crate::policy::split::SplitRt::new(
                entries,
                &route.split.clone().unwrap_or_default(),
            ))
        }
        _ => None,
    };
    let pool_name = pool.as_ref().map_or("", |p| p.name.as_str());
    let shared_metrics = metrics.clone();
    let metrics = match prev {
        Some(r) if r.pool.as_ref().map_or("", |p| p.name.as_str()) == pool_name => {
            r.metrics.clone()
        }
        _ => RequestMetrics::new(metrics, &route.name, pool_name),
    };
    let limiter = route.rate_limit.as_ref().map(|limit| {
        prev.and_then(|r| r.limiter.clone())
            .filter(|l| l.config == *limit)
            .unwrap_or_else(|| Arc::new(crate::limits::rate::RouteLimiter::new(limit)))
    });
    RouteRt {
        name: route.name.clone(),
        action: route.action.clone(),
        pool,
        split,
        https_redirect: route.https_redirect,
        require_client_cert: route.require_client_cert,
        // Validation compiled these patterns already.
        redirect: route.redirect.as_ref().and_then(|r| {
            Some((
                regex::Regex::new(&r.pattern).ok()?,
                r.location.clone(),
                r.status,
            ))
        }),
        rewrite: route
            .rewrite
            .as_ref()
            .and_then(|r| Some((regex::Regex::new(&r.pattern).ok()?, r.replacement.clone()))),
        strip_prefix: (route.strip_prefix && matches!(route.action, Action::Forward(_)))
            .then(|| route.path_prefix.trim_end_matches('/').to_string())
            .filter(|p| !p.is_empty()),
        allow_from: route.allow_from.clone(),
        basic_auth: route
            .basic_auth
            .as_ref()
            .map(|a| Arc::new(crate::auth::BasicAuthRt::new(a))),
        forward_auth: route
            .forward_auth
            .as_ref()
            .map(|a| Arc::new(crate::forward_auth::ForwardAuthRt::new(a))),
        request_headers: crate::headers::HeaderEdits::new(&route.request_headers),
        response_headers: crate::headers::HeaderEdits::new(&route.response_headers),
        max_body: route
            .max_body_bytes
            .unwrap_or(config.limits.max_body_bytes)
            .0,
        metrics,
        limiter,
        access_log: route.access_log,
        error_pages: None,
        compress: route
            .compress
            .as_ref()
            .map(crate::compress::CompressRt::new),
        mirror: route.mirror.as_ref().and_then(|m| {
            Some(crate::mirror::MirrorRt::new(
                m,
                pools.get(&m.pool)?.clone(),
                prev.and_then(|r| r.mirror.as_ref()),
                shared_metrics,
            ))
        }),
    }
}

/// Resolves an upstream host once, at build time (never on the request path).
fn resolve(host: &str, port: u16) -> anyhow::Result<SocketAddr> {
    if let Ok(ip) = host.parse::<std::net::IpAddr>() {
        return Ok(SocketAddr::new(ip, port));
    }
    (host, port)
        .to_socket_addrs()
        .with_context(|| format!("resolving {host}:{port}"))?
        .next()
        .ok_or_else(|| anyhow!("{host}:{port} resolved to no address"))
}

/// How long until `total` is used up, measured from `started`.
#[must_use]
pub fn remaining(started: std::time::Instant, total: Duration) -> Duration {
    total.saturating_sub(started.elapsed())
}

/// After a swap from `old` to `new`: endpoints that left their pool start draining,
/// and those back in one (or kept) serve again.
pub fn mark_removed(old: &Generation, new: &Generation) {
    // A kept endpoint shares its state with the old generation (see `build_pool`).
    let serving: std::collections::HashSet<*const EndpointState> = new
        .pools
        .values()
        .flat_map(|p| p.states.iter().map(Arc::as_ptr))
        .collect();
    for state in old.pools.values().flat_map(|p| p.states.iter()) {
        if !serving.contains(&Arc::as_ptr(state)) {
            state.set_removed(true);
        }
    }
    for state in new.pools.values().flat_map(|p| p.states.iter()) {
        state.set_removed(false);
    }
}
