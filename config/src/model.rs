//! The configuration a user writes, as Rust types. Every field is documented here; the
//! doc comments become the descriptions in `rampart schema`. Defaults live in this file
//! only (the `default_*` functions and `Default` impls).
//!
//! Deserialising checks the shape and the value types (durations, sizes, host names);
//! cross-field rules (a route's pool exists, thresholds are sane, ...) are in
//! [`crate::validate`].

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;

use ipnet::IpNet;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::units::{Address, ByteSize, Dur, HashKey, HostPattern, Hostname, IpRange};

/// A whole Rampart configuration file.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Process-wide settings: data directory, threads, shutdown timing, default SNI.
    #[serde(default)]
    pub server: Server,
    /// Where Rampart listens for HTTP, HTTPS and the admin API.
    #[serde(default)]
    pub listeners: Listeners,
    /// Limits that protect the proxy from oversized or slow clients.
    #[serde(default)]
    pub limits: Limits,
    /// Forwarding headers (X-Forwarded-*, Forwarded, X-Request-Id) and which peers are trusted.
    #[serde(default)]
    pub forwarding: Forwarding,
    /// Certificates, each for a list of hosts, from files, the internal CA or ACME.
    #[serde(default)]
    pub tls: Vec<TlsEntry>,
    /// Routes, matched by host, path prefix and headers; the highest priority wins.
    #[serde(default)]
    pub routes: Vec<Route>,
    /// Upstream pools by name: endpoints, balancing, health checks, timeouts, retries.
    #[serde(default)]
    pub pools: BTreeMap<String, Pool>,
    /// The controller (`rampart controller`): fleet API, admin, store.
    #[serde(default)]
    pub controller: Option<ControllerSettings>,
    /// Where the controller discovers endpoints beyond the static ones in `[pools]`.
    #[serde(default)]
    pub discovery: Discovery,
    /// DNS automation (controller): public names follow the ready proxy instances.
    #[serde(default)]
    pub dns: Option<DnsSettings>,
    /// The proxy's access log: one line per request (absent: none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access_log: Option<AccessLog>,
    /// Request spans exported over OTLP/HTTP (absent: none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tracing: Option<Tracing>,
    /// TLS session tickets: resumption without a per-process cache, across the fleet
    /// when a controller hands out the keys.
    #[serde(default)]
    pub session_tickets: SessionTickets,
    /// On-demand certificates (controller): a handshake for a name no `[[tls]]` entry
    /// covers asks the SaaS application whether to get one (absent: never).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_on_demand: Option<TlsOnDemand>,
    /// The proxy's own error answers in the operator's words, for every route (a
    /// route's `error_pages` takes precedence, form by form).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_pages: Option<ErrorPages>,
}

/// Pages for the proxy's own error answers (404, 403, 429, 502, 503, 504, …), one per
/// form the client's `Accept` chooses, and the upstream statuses replaced by them:
/// `error_pages = { html = { file = "/etc/rampart/error.html" }, intercept = [502, 503] }`.
/// A page may hold `{status}`, `{title}`, `{detail}` and `{request_id}`, each written
/// escaped for the page's form.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ErrorPages {
    /// For browsers (`Accept: text/html`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub html: Option<PageSource>,
    /// For API clients (`Accept: application/json`): an RFC 9457 problem document.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub json: Option<PageSource>,
    /// For everything else (curl, scripts).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<PageSource>,
    /// Upstream responses with these statuses (400–599) are replaced by the page, so
    /// that an application's stack trace or a bare "Bad Gateway" never reaches users.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub intercept: Vec<u16>,
}

/// A route's traffic mirror: copies of its requests, sent to a shadow pool whose
/// answers are thrown away, never slowing or failing the request itself.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Mirror {
    /// The shadow pool (HTTP/1.1 in cleartext).
    pub pool: String,
    /// Share of the route's requests copied, 0–100.
    #[serde(default = "default_mirror_percent")]
    pub percent: f64,
    /// Most copies in flight at once; more are skipped (counted), never queued.
    #[serde(default = "default_mirror_in_flight")]
    pub max_in_flight: u32,
    /// How long a copy may take before it is abandoned.
    #[serde(default = "default_mirror_timeout")]
    pub timeout: Dur,
    /// Longest request body copied (a longer request is not copied, and counted).
    #[serde(default = "default_mirror_max_body")]
    pub max_body: ByteSize,
}

fn default_mirror_max_body() -> ByteSize {
    ByteSize(64 << 10)
}

fn default_mirror_percent() -> f64 {
    100.0
}
fn default_mirror_in_flight() -> u32 {
    100
}
fn default_mirror_timeout() -> Dur {
    Dur::secs(5)
}

/// Response compression of a route.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Compress {
    /// The codings offered, in the proxy's order of preference where the client's
    /// `Accept-Encoding` q-values tie: `"zstd"`, `"br"`, `"gzip"`.
    #[serde(default = "default_compress_algorithms")]
    pub algorithms: Vec<String>,
    /// Content types compressed (the media type before any `;`; a `type/*` entry
    /// matches the whole type).
    #[serde(default = "default_compress_types")]
    pub types: Vec<String>,
    /// Responses whose Content-Length is below this are sent as they are (a response
    /// without one is compressed).
    #[serde(default = "default_compress_min_size")]
    pub min_size: ByteSize,
    /// Levels per coding (gzip 1–9, br 1–11, zstd 1–19).
    #[serde(default)]
    pub levels: CompressLevels,
}

impl Default for Compress {
    fn default() -> Self {
        Self {
            algorithms: default_compress_algorithms(),
            types: default_compress_types(),
            min_size: default_compress_min_size(),
            levels: CompressLevels::default(),
        }
    }
}

/// Compression levels per coding.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct CompressLevels {
    /// gzip (1–9; nginx's default is 1).
    #[serde(default = "default_gzip_level")]
    pub gzip: u32,
    /// Brotli (1–11).
    #[serde(default = "default_br_level")]
    pub br: u32,
    /// zstd (1–19).
    #[serde(default = "default_zstd_level")]
    pub zstd: u32,
}

impl Default for CompressLevels {
    fn default() -> Self {
        Self {
            gzip: default_gzip_level(),
            br: default_br_level(),
            zstd: default_zstd_level(),
        }
    }
}

fn default_compress_algorithms() -> Vec<String> {
    ["zstd", "br", "gzip"].map(String::from).to_vec()
}
fn default_compress_types() -> Vec<String> {
    [
        "text/html",
        "text/css",
        "text/plain",
        "text/xml",
        "text/javascript",
        "text/csv",
        "text/markdown",
        "application/javascript",
        "application/json",
        "application/problem+json",
        "application/ld+json",
        "application/manifest+json",
        "application/xml",
        "application/rss+xml",
        "application/atom+xml",
        "application/wasm",
        "image/svg+xml",
        "image/x-icon",
        "font/ttf",
        "font/otf",
    ]
    .map(String::from)
    .to_vec()
}
fn default_compress_min_size() -> ByteSize {
    ByteSize(1024)
}
fn default_gzip_level() -> u32 {
    5
}
fn default_br_level() -> u32 {
    4
}
fn default_zstd_level() -> u32 {
    3
}

/// Where a page comes from.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum PageSource {
    /// A file, read when the configuration is loaded (on a fleet proxy: its own path).
    File(std::path::PathBuf),
    /// The page itself.
    Inline(String),
}

/// On-demand TLS: certificates for names learnt from handshakes (a customer's
/// `shop.customer.com` pointed at the service), ordered once for the whole fleet by the
/// controller after the application's `ask` endpoint approves the name.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TlsOnDemand {
    /// The application's approval endpoint: `GET <ask>?domain=<name>` answers 200 for
    /// a name it serves; anything else (or no answer within 5 s) denies it.
    pub ask: String,
    /// Names that may be asked about at all (exact or `*.suffix`); empty: any name
    /// (the ask decides). Others are refused without asking.
    #[serde(default)]
    pub allow: Vec<HostPattern>,
    /// How long a denied name is refused without asking again.
    #[serde(default = "default_on_demand_deny_for")]
    pub deny_for: Dur,
    /// Ask calls per second at most, for all names together (a scanner sending random
    /// SNI is refused beyond it without asking).
    #[serde(default = "default_on_demand_asks_per_second")]
    pub asks_per_second: u32,
    /// New names approved per hour at most.
    #[serde(default = "default_on_demand_max_per_hour")]
    pub max_per_hour: u32,
    /// Names held at most (approved and not yet dropped).
    #[serde(default = "default_on_demand_max_total")]
    pub max_total: u32,
    /// How long the handshake that asked for a new name waits for its certificate
    /// before it fails (`0s`: fail at once; the next handshake gets the certificate).
    #[serde(default = "default_on_demand_hold")]
    pub hold: Dur,
    /// The CA and challenge to order with (`http-01` or `tls-alpn-01`: a customer's
    /// DNS zone is not ours to write TXT records in).
    pub acme: AcmeSource,
}

fn default_on_demand_deny_for() -> Dur {
    Dur::secs(600)
}
fn default_on_demand_asks_per_second() -> u32 {
    10
}
fn default_on_demand_max_per_hour() -> u32 {
    100
}
fn default_on_demand_max_total() -> u32 {
    10_000
}
fn default_on_demand_hold() -> Dur {
    Dur::secs(10)
}

/// TLS session tickets (RFC 8446 §4.6.1, RFC 5077): a returning client resumes its
/// session without a full handshake. A standalone proxy makes and rotates its own
/// keys; a controller makes them for its fleet (carried in the snapshot), so that a
/// client resumes on any proxy.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SessionTickets {
    /// Issue tickets (`false`: resumption only from each process's session cache).
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// How long a key encrypts new tickets; it decrypts for as long again, so a ticket
    /// resumes for between one and two of these (and the lifetime hint is one).
    #[serde(default = "default_ticket_rotation")]
    pub rotate: Dur,
}

impl Default for SessionTickets {
    fn default() -> Self {
        Self {
            enabled: true,
            rotate: default_ticket_rotation(),
        }
    }
}

fn default_ticket_rotation() -> Dur {
    Dur::secs(3600)
}

/// OpenTelemetry export of request spans: one server span per request and a client
/// span per upstream attempt, batched to an OTLP/HTTP (protobuf) endpoint by a
/// background task with a bounded queue (spans beyond it are dropped and counted).
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Tracing {
    /// The OTLP/HTTP traces endpoint, e.g. "http://127.0.0.1:4318/v1/traces".
    pub otlp_endpoint: String,
    /// Share of the traces started here that are sampled (0.0–1.0, by trace id); a
    /// continued trace follows its parent's sampled flag.
    #[serde(default = "default_sample")]
    pub sample: f64,
    /// `service.name` of the exported resource.
    #[serde(default = "default_service_name")]
    pub service_name: String,
    /// Spans waiting for export at most.
    #[serde(default = "default_span_queue")]
    pub queue: usize,
}

fn default_service_name() -> String {
    "rampart".to_string()
}
fn default_span_queue() -> usize {
    8192
}

/// The access log: one line per finished request, whichever path served it, written by
/// a background writer so that a request never waits on the disk.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AccessLog {
    /// A file (appended to; reopened on SIGUSR1 for logrotate) or "stdout".
    pub path: String,
    /// `json` (one object per line), `logfmt`, or `combined` (nginx's and Apache's).
    #[serde(default)]
    pub format: AccessLogFormat,
    /// Only these fields (json and logfmt; empty: every field). Names as documented.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub fields: Vec<String>,
    /// Fields left out (json and logfmt).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub drop_fields: Vec<String>,
    /// Share of successful (1xx–3xx) requests logged, 0.0–1.0; every other is logged.
    #[serde(default = "default_sample")]
    pub sample: f64,
    /// Request headers logged by name (as `header_<name>`). Authorization, Cookie,
    /// Set-Cookie and Proxy-Authorization are never logged.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<String>,
    /// Query string values replaced by `REDACTED` (names kept); false logs them.
    #[serde(default = "default_true")]
    pub redact_query: bool,
    /// Lines waiting for the writer at most; beyond, lines are dropped and counted
    /// (`rampart_access_log_dropped_total`) rather than making requests wait.
    #[serde(default = "default_access_log_buffer")]
    pub buffer: usize,
}

/// The access log's fields, by their JSON (and logfmt) names, in the order written.
pub const ACCESS_LOG_FIELDS: &[&str] = &[
    "time",
    "request_id",
    "trace_id",
    "client",
    "peer",
    "method",
    "scheme",
    "host",
    "path",
    "query",
    "protocol",
    "status",
    "bytes_received",
    "bytes_sent",
    "duration_ms",
    "upstream",
    "upstream_status",
    "upstream_connect_ms",
    "upstream_ttfb_ms",
    "route",
    "pool",
    "attempts",
    "fast_path",
    "tls_version",
    "tls_cipher",
    "tls_sni",
    "tls_resumed",
    "error",
    "headers",
];

/// Request headers the access log never writes, whatever `headers` asks.
pub const ACCESS_LOG_SECRET_HEADERS: &[&str] = &[
    "authorization",
    "proxy-authorization",
    "cookie",
    "set-cookie",
];

/// How access log lines are written.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum AccessLogFormat {
    /// One JSON object per line.
    #[default]
    Json,
    /// `key=value` pairs, quoted where needed.
    Logfmt,
    /// The combined log format of nginx and Apache.
    Combined,
}

fn default_sample() -> f64 {
    1.0
}
fn default_access_log_buffer() -> usize {
    16_384
}

/// DNS automation: the controller keeps each public name pointing at the live, ready
/// proxy instances.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DnsSettings {
    /// The zone the names live in, e.g. "example.com".
    pub zone: Hostname,
    /// Marks the records this installation owns (a TXT `heritage=rampart,owner=<id>` at
    /// each name). Installations that share a zone need different ids.
    #[serde(default = "default_dns_owner")]
    pub owner_id: String,
    /// Where the records are kept.
    #[serde(default)]
    pub provider: DnsProvider,
    /// The names to manage.
    #[serde(default)]
    pub names: Vec<DnsName>,
    /// Reconcile at least this often; instance changes trigger a pass at once.
    #[serde(default = "default_dns_interval")]
    pub interval: Dur,
    /// At most this many record-set changes per provider call (Route53 allows 1000).
    #[serde(default = "default_dns_batch")]
    pub batch_size: usize,
    /// Active probe of every instance's public HTTPS listener.
    #[serde(default)]
    pub probe: DnsProbe,
}

fn default_dns_owner() -> String {
    "rampart".to_string()
}
fn default_dns_interval() -> Dur {
    Dur::secs(10)
}
fn default_dns_batch() -> usize {
    100
}

/// One public name.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DnsName {
    /// Fully qualified name inside the zone, e.g. "www.example.com".
    pub name: Hostname,
    /// How the instances' addresses are published.
    #[serde(default)]
    pub policy: DnsPolicy,
    /// Time to live of the records.
    #[serde(default = "default_dns_ttl")]
    pub ttl: Dur,
    /// Never fewer values than this because instances look dead: when every instance
    /// looks dead the name keeps its last values and an alert metric is raised.
    #[serde(default = "default_min_records")]
    pub min_records: usize,
}

fn default_dns_ttl() -> Dur {
    Dur::secs(60)
}
fn default_min_records() -> usize {
    1
}

/// How a name's values are published.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum DnsPolicy {
    /// One record set per instance (Route53 multivalue answers); on plain DNS servers,
    /// one set with every value.
    #[default]
    Multivalue,
    /// One weighted record set per instance, set identifier = instance id (Route53).
    Weighted,
    /// Every value in one record set.
    Simple,
}

/// The DNS provider.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum DnsProvider {
    /// An authoritative DNS server inside the controller, for local use and tests.
    Embedded {
        /// UDP and TCP address it answers on.
        #[serde(default = "default_embedded_dns")]
        listen: SocketAddr,
    },
    /// Amazon Route53; credentials and region from the usual AWS chain.
    Route53 {
        /// Hosted zone id; looked up by the zone name when absent.
        #[serde(default)]
        hosted_zone_id: Option<String>,
        /// Region (default: the AWS chain's, else us-east-1).
        #[serde(default)]
        region: Option<String>,
        /// Another endpoint (tests, FIPS or VPC endpoints).
        #[serde(default)]
        endpoint_url: Option<String>,
        /// Wait until Route53 reports each change INSYNC.
        #[serde(default)]
        wait_for_insync: bool,
    },
    /// Dynamic updates (RFC 2136) signed with TSIG, to BIND, Knot, PowerDNS...
    Rfc2136 {
        /// The primary server's address, e.g. "10.0.0.53:53".
        server: SocketAddr,
        /// TSIG key name, as in the server's `key` statement.
        tsig_key_name: String,
        /// TSIG algorithm.
        #[serde(default)]
        tsig_algorithm: TsigAlgorithm,
        /// File holding the base64 TSIG secret (a BIND key file works too).
        tsig_secret_file: PathBuf,
    },
}

impl Default for DnsProvider {
    fn default() -> Self {
        Self::Embedded {
            listen: default_embedded_dns(),
        }
    }
}

fn default_embedded_dns() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8053))
}

/// TSIG algorithms.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum TsigAlgorithm {
    /// HMAC-SHA256 (BIND's `tsig-keygen` default).
    #[default]
    HmacSha256,
    /// HMAC-SHA384.
    HmacSha384,
    /// HMAC-SHA512.
    HmacSha512,
}

/// The active probe of the instances' public listeners.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DnsProbe {
    /// Probe at all (without it, heartbeats alone decide).
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// HTTPS port to probe (default: the port the instance reports listening on).
    #[serde(default)]
    pub port: Option<u16>,
    /// Path every proxy answers itself on its public listeners.
    #[serde(default = "default_dns_probe_path")]
    pub path: String,
    /// Time between probes of one instance.
    #[serde(default = "default_probe_interval")]
    pub interval: Dur,
    /// A probe slower than this fails.
    #[serde(default = "default_probe_timeout")]
    pub timeout: Dur,
    /// Consecutive failures before an instance is taken out.
    #[serde(default = "default_probe_unhealthy")]
    pub unhealthy_threshold: u32,
    /// Consecutive successes before it is put back.
    #[serde(default = "default_probe_healthy")]
    pub healthy_threshold: u32,
}

impl Default for DnsProbe {
    fn default() -> Self {
        Self {
            enabled: true,
            port: None,
            path: default_dns_probe_path(),
            interval: default_probe_interval(),
            timeout: default_probe_timeout(),
            unhealthy_threshold: default_probe_unhealthy(),
            healthy_threshold: default_probe_healthy(),
        }
    }
}

/// Path the proxies answer on their public listeners for the DNS probe: under
/// `/.well-known/` so that it never takes a path from the sites behind the proxy.
pub const PROBE_PATH: &str = "/.well-known/rampart/healthz";

fn default_dns_probe_path() -> String {
    PROBE_PATH.to_string()
}
fn default_probe_interval() -> Dur {
    Dur::secs(2)
}
fn default_probe_timeout() -> Dur {
    Dur::secs(1)
}
fn default_probe_unhealthy() -> u32 {
    3
}
fn default_probe_healthy() -> u32 {
    1
}

/// Settings of the controller, which pushes snapshots of this configuration to proxies.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ControllerSettings {
    /// Fleet API address (HTTPS, mutual TLS). Keep it off public networks.
    #[serde(default = "default_fleet_listen")]
    pub listen: SocketAddr,
    /// Admin address of the controller: /metrics, /status, /healthz.
    #[serde(default = "default_controller_admin")]
    pub admin: Option<SocketAddr>,
    /// Names and IP addresses proxies use to reach the fleet API (the SANs of its
    /// certificate). Default: "localhost" and "127.0.0.1".
    #[serde(default = "default_fleet_names")]
    pub names: Vec<String>,
    /// How long a watch request waits for a new snapshot before answering "no change".
    #[serde(default = "default_watch_timeout")]
    pub watch_timeout: Dur,
    /// A proxy that has not sent a heartbeat for this long is counted as stale.
    #[serde(default = "default_instance_timeout")]
    pub instance_timeout: Dur,
    /// A proxy silent this long (no heartbeat) is forgotten: its record leaves the
    /// store, `/status` and the metrics, and it must enrol again to come back. Keeps a
    /// fleet whose replicas come and go (each new replica enrols anew) from piling up
    /// dead instances. Revoked instances are kept.
    #[serde(default = "default_forget_after")]
    pub forget_after: Dur,
    /// Where certificates, join tokens and fleet state are kept.
    #[serde(default)]
    pub store: StoreSettings,
    /// Write a reusable join token (valid 24 h, replaced every 12 h) to this file, for
    /// proxies started with `--join-token-file` on a shared volume (a Compose or Swarm
    /// service scaled to any number of replicas). Anyone who can read the file can
    /// enrol a proxy: keep it on a volume only the fleet mounts.
    #[serde(default)]
    pub join_token_file: Option<PathBuf>,
    /// A file holding the token that the dashboard (`/` on `admin`), `/status` and
    /// `/api/v1` then require (Bearer, or Basic with the token as password);
    /// `/healthz` and `/metrics` stay open. Its path is read at start, its content at
    /// each request.
    #[serde(default)]
    pub admin_token_file: Option<PathBuf>,
}

fn default_fleet_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9443))
}
fn default_controller_admin() -> Option<SocketAddr> {
    Some(SocketAddr::from(([127, 0, 0, 1], 9901)))
}
fn default_fleet_names() -> Vec<String> {
    vec!["localhost".to_string(), "127.0.0.1".to_string()]
}
fn default_watch_timeout() -> Dur {
    Dur::secs(30)
}
fn default_instance_timeout() -> Dur {
    Dur::secs(30)
}
fn default_forget_after() -> Dur {
    Dur::secs(24 * 3600)
}

/// The controller's store.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum StoreSettings {
    /// Files under `<server.data_dir>/controller` (one controller).
    #[default]
    Local,
    /// etcd: shared state and a leader lease, so that several controllers can run.
    Etcd(EtcdSettings),
}

/// etcd store settings.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct EtcdSettings {
    /// Client URLs, e.g. ["http://10.0.0.2:2379"].
    pub endpoints: Vec<String>,
    /// Key prefix under which everything is kept.
    #[serde(default = "default_etcd_prefix")]
    pub prefix: String,
    /// Leader lease time to live: a dead leader is replaced within this time.
    #[serde(default = "default_lease_ttl")]
    pub lease_ttl: Dur,
}

fn default_etcd_prefix() -> String {
    "/rampart".to_string()
}
fn default_lease_ttl() -> Dur {
    Dur::secs(10)
}

/// Endpoint discovery providers of the controller.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Discovery {
    /// Endpoint lists in files: `[[discovery.files]] path = "endpoints.d"`.
    #[serde(default)]
    pub files: Vec<FileDiscovery>,
    /// Routes and endpoints from labelled containers of a Docker engine.
    #[serde(default)]
    pub docker: Vec<DockerDiscovery>,
    /// Endpoints of a pool from DNS SRV records (Consul, Kubernetes headless services),
    /// re-resolved when their TTL runs out.
    #[serde(default)]
    pub dns_srv: Vec<SrvDiscovery>,
    /// Routes and endpoints from labelled services of a Docker Swarm (a manager's API).
    #[serde(default)]
    pub swarm: Vec<SwarmDiscovery>,
}

/// A Docker Swarm whose services with `rampart.enable=true` (service labels, `deploy:
/// labels:` in a stack file) become routes and endpoints.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SwarmDiscovery {
    /// A manager's API socket.
    #[serde(default = "default_docker_socket")]
    pub socket: String,
    /// The overlay network whose task addresses are used (`tasks` mode). Default: the
    /// networks of the controller's own container, when it runs in one.
    #[serde(default)]
    pub network: Option<String>,
    /// `tasks`: one endpoint per running task, at its address on the overlay (the
    /// proxies must be attached to it). `mesh`: one endpoint per service, at
    /// `mesh_address` and the port the routing mesh publishes.
    #[serde(default)]
    pub mode: SwarmMode,
    /// Where proxies reach the routing mesh (a node's address), for `mode = "mesh"`.
    #[serde(default)]
    pub mesh_address: Option<std::net::IpAddr>,
}

/// How Swarm services are reached.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum SwarmMode {
    /// Each task at its overlay address.
    #[default]
    Tasks,
    /// Each service through the routing mesh.
    Mesh,
}

/// A pool's endpoints from the SRV records of a name: `[[discovery.dns_srv]]
/// name = "_web._tcp.service.consul" pool = "web" server = "127.0.0.1:8600"`.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SrvDiscovery {
    /// The SRV name, e.g. `_web._tcp.service.consul`.
    pub name: String,
    /// The pool whose endpoints these are (defined under `[pools.<name>]`).
    pub pool: String,
    /// The DNS server to ask (UDP). Default: the first nameserver of /etc/resolv.conf.
    #[serde(default)]
    pub server: Option<SocketAddr>,
    /// Re-resolve at least this often, and at most as often as the records' TTL says
    /// (bounded below by 1 s).
    #[serde(default = "default_srv_interval")]
    pub interval: Dur,
}

fn default_srv_interval() -> Dur {
    Dur::secs(30)
}

impl Discovery {
    /// Whether any provider is configured (pools may then start without endpoints).
    #[must_use]
    pub fn any(&self) -> bool {
        !self.files.is_empty()
            || !self.docker.is_empty()
            || !self.dns_srv.is_empty()
            || !self.swarm.is_empty()
    }
}

/// A Docker engine whose running containers with `rampart.enable=true` become routes
/// and endpoints (labels: see the README).
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DockerDiscovery {
    /// The engine's API socket.
    #[serde(default = "default_docker_socket")]
    pub socket: String,
    /// The network whose container addresses are used. Default: when the controller
    /// itself runs in a container, the networks it is attached to (containers it
    /// cannot reach are left out); otherwise each container's first network.
    #[serde(default)]
    pub network: Option<String>,
}

fn default_docker_socket() -> String {
    "unix:///var/run/docker.sock".to_string()
}

/// A watched file, or directory of `*.toml` files, each listing endpoints by pool:
/// `[pools.web] endpoints = [{ address = "10.0.0.7:8080" }]`.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FileDiscovery {
    /// The file or directory.
    pub path: PathBuf,
}

/// What a discovery file holds: endpoints by pool name.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct EndpointFile {
    /// Endpoints to add to each named pool of the configuration.
    #[serde(default)]
    pub pools: BTreeMap<String, EndpointList>,
}

/// The endpoints a discovery file gives one pool.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct EndpointList {
    /// The endpoints.
    #[serde(default)]
    pub endpoints: Vec<Endpoint>,
}

/// Process-wide settings.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Server {
    /// Directory for state: the internal CA, issued certificates, ACME accounts.
    #[serde(default = "default_data_dir")]
    pub data_dir: PathBuf,
    /// Worker threads for the proxy (default: the number of CPUs).
    #[serde(default)]
    pub threads: Option<usize>,
    /// Let idle worker threads steal tasks from busy ones. Off by default: independent
    /// single-threaded workers (as nginx's processes) measured ~25% more requests per
    /// CPU-second here; turn it on when a few connections carry most of the load.
    #[serde(default)]
    pub work_stealing: bool,
    /// Carry plain HTTP/1.1 requests without a body or with one of up to 64 KiB on
    /// Rampart's own transport (less CPU per request than Pingora's session, which
    /// carries chunked and larger bodies, upgrades and HTTP/1.0). The same policy
    /// decides for both; off sends every request through Pingora's path.
    #[serde(default = "default_true")]
    pub http1_fast_path: bool,
    /// Carry HTTP/2 requests without a body or with a declared one of up to 64 KiB on
    /// Rampart's own transport (HTTP/2 framing stays Pingora's). The same policy
    /// decides for both; off sends every HTTP/2 request through Pingora's path.
    #[serde(default = "default_true")]
    pub http2_fast_path: bool,
    /// After a stop signal, keep accepting for this long before draining (lets load
    /// balancers notice that the instance is going away).
    #[serde(default = "default_grace_period")]
    pub grace_period: Dur,
    /// After the grace period, how long in-flight requests get to finish.
    #[serde(default = "default_shutdown_timeout")]
    pub shutdown_timeout: Dur,
    /// Host whose certificate is served to clients that send no SNI or an unknown one.
    /// When unset, such handshakes fail with `unrecognized_name`.
    #[serde(default)]
    pub default_sni: Option<Hostname>,
    /// Unix socket used for graceful binary upgrades (the new process takes the
    /// listening sockets from the old one over it). Default: `<data_dir>/upgrade.sock`.
    #[serde(default)]
    pub upgrade_socket: Option<PathBuf>,
}

impl Default for Server {
    fn default() -> Self {
        Self {
            data_dir: default_data_dir(),
            threads: None,
            work_stealing: false,
            http1_fast_path: true,
            http2_fast_path: true,
            grace_period: default_grace_period(),
            shutdown_timeout: default_shutdown_timeout(),
            default_sni: None,
            upgrade_socket: None,
        }
    }
}

fn default_data_dir() -> PathBuf {
    PathBuf::from("./rampart-data")
}
fn default_grace_period() -> Dur {
    Dur::secs(1)
}
fn default_shutdown_timeout() -> Dur {
    Dur::secs(10)
}

/// Listening addresses. At least one of `http` and `https` must be set.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Listeners {
    /// Plain HTTP listener, e.g. "0.0.0.0:80".
    #[serde(default)]
    pub http: Option<SocketAddr>,
    /// HTTPS listener (HTTP/1.1 and HTTP/2 by ALPN), e.g. "0.0.0.0:443".
    #[serde(default)]
    pub https: Option<SocketAddr>,
    /// Admin listener for /metrics, /healthz, /ready, /status, the dashboard (/) and
    /// its JSON (/api/v1/...). Keep it private.
    #[serde(default = "default_admin")]
    pub admin: Option<SocketAddr>,
    /// A file holding the token the dashboard, /status and /api/v1 then require (as
    /// `Authorization: Bearer <token>`, or as the password of Basic auth with any user
    /// name); /healthz, /ready and /metrics stay open for probes and scrapers.
    #[serde(default)]
    pub admin_token_file: Option<PathBuf>,
    /// Sources (a TCP load balancer in front, as CIDR ranges or addresses) whose
    /// connections to the http and https listeners must start with a PROXY protocol
    /// header, v1 or v2 (HAProxy's `accept-proxy`): the client address is taken from
    /// it. Connections from elsewhere are served as they come; a PROXY header from them
    /// is not valid HTTP or TLS and is refused.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub proxy_protocol_from: Vec<IpRange>,
    /// Also serve HTTP/2 in cleartext with prior knowledge (h2c) on the `http`
    /// listener, for gRPC clients on a private network; HTTP/1.1 is served beside it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub h2c: bool,
}

impl Default for Listeners {
    fn default() -> Self {
        Self {
            http: None,
            https: None,
            admin: default_admin(),
            admin_token_file: None,
            proxy_protocol_from: Vec::new(),
            h2c: false,
        }
    }
}

fn default_admin() -> Option<SocketAddr> {
    Some(SocketAddr::from(([127, 0, 0, 1], 9900)))
}

/// Limits on what clients may send. The defaults are safe for most sites.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Maximum size of the request line plus all headers; larger requests get 431.
    #[serde(default = "default_max_header_bytes")]
    pub max_header_bytes: ByteSize,
    /// Maximum number of request headers; more get 431.
    #[serde(default = "default_max_header_count")]
    pub max_header_count: usize,
    /// A client must send a complete request header within this time from its first
    /// byte (or from connecting), or the connection is closed (slowloris defence).
    #[serde(default = "default_header_read_timeout")]
    pub header_read_timeout: Dur,
    /// How long an idle client keep-alive connection stays open between requests.
    #[serde(default = "default_keepalive_timeout")]
    pub keepalive_timeout: Dur,
    /// The longest pause between two reads of a request body before the request is
    /// given up (slow-body defence; HTTP/1).
    #[serde(default = "default_body_read_timeout")]
    pub body_read_timeout: Dur,
    /// After `body_read_timeout`, a request body arriving slower than this many bytes
    /// per second on average is given up with 408 (a trickle of a byte a second evades
    /// any idle timeout); "0B" turns the check off.
    #[serde(default = "default_min_body_rate")]
    pub min_body_rate: ByteSize,
    /// The longest a write of the response to the client may wait for the client to
    /// read (slow-read defence).
    #[serde(default = "default_send_timeout")]
    pub send_timeout: Dur,
    /// Maximum request body size (routes may lower or raise it); larger gets 413.
    #[serde(default = "default_max_body_bytes")]
    pub max_body_bytes: ByteSize,
    /// Maximum simultaneous client connections per listener; further ones are closed at once.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Maximum simultaneous connections from one client IP address per listener; further
    /// ones are closed at once (raise it for clients behind large NATs).
    #[serde(default = "default_max_connections_per_ip")]
    pub max_connections_per_ip: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_header_bytes: default_max_header_bytes(),
            max_header_count: default_max_header_count(),
            header_read_timeout: default_header_read_timeout(),
            keepalive_timeout: default_keepalive_timeout(),
            body_read_timeout: default_body_read_timeout(),
            min_body_rate: default_min_body_rate(),
            send_timeout: default_send_timeout(),
            max_body_bytes: default_max_body_bytes(),
            max_connections: default_max_connections(),
            max_connections_per_ip: default_max_connections_per_ip(),
        }
    }
}

fn default_max_header_bytes() -> ByteSize {
    ByteSize(32 << 10)
}
fn default_max_header_count() -> usize {
    100
}
fn default_header_read_timeout() -> Dur {
    Dur::secs(10)
}
fn default_keepalive_timeout() -> Dur {
    Dur::secs(60)
}
/// 10 s, as the pause a real client never reaches: with `min_body_rate` after it, a
/// trickled body is cut within about 12 s (HAProxy cuts within its 30 s `timeout
/// client`), while a 50 KB/s upload passes.
fn default_body_read_timeout() -> Dur {
    Dur::secs(10)
}
fn default_min_body_rate() -> ByteSize {
    ByteSize(256)
}
/// 10 s: a reader that takes nothing for that long is gone or attacking; one on a
/// 64 KB/s link frees room in the socket buffer many times a second.
fn default_send_timeout() -> Dur {
    Dur::secs(10)
}
fn default_max_body_bytes() -> ByteSize {
    ByteSize(10 << 20)
}
fn default_max_connections() -> usize {
    10_000
}
fn default_max_connections_per_ip() -> usize {
    1_000
}

/// Forwarding headers added to upstream requests.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Forwarding {
    /// Peers (CIDRs) whose X-Forwarded-For / Forwarded headers are believed. From any
    /// other peer those headers are replaced, not appended to.
    #[serde(default)]
    #[schemars(with = "Vec<String>")]
    pub trusted_proxies: Vec<IpNet>,
    /// Header that carries the request id; generated (UUID v4) when the client sent none.
    #[serde(default = "default_request_id_header")]
    pub request_id_header: String,
    /// W3C trace context: whose `traceparent` a request continues (`trusted`: from
    /// `trusted_proxies` only; `always`; `off`: leave trace headers alone). Otherwise a
    /// trace starts at the proxy; the upstream gets the proxy's span as parent.
    #[serde(default)]
    pub trace_context: TraceContext,
}

impl Default for Forwarding {
    fn default() -> Self {
        Self {
            trusted_proxies: Vec::new(),
            request_id_header: default_request_id_header(),
            trace_context: TraceContext::default(),
        }
    }
}

/// Whose `traceparent` a request continues.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum TraceContext {
    /// A client in `forwarding.trusted_proxies` continues its trace; others start one.
    #[default]
    Trusted,
    /// Every client's valid `traceparent` is continued.
    Always,
    /// The proxy neither starts nor continues traces: trace headers pass as sent.
    Off,
}

fn default_request_id_header() -> String {
    "x-request-id".to_string()
}

/// One certificate: the hosts it covers and where it comes from.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TlsEntry {
    /// Hosts (exact or `*.wildcard`) this certificate is served for, chosen by SNI.
    pub hosts: Vec<HostPattern>,
    /// Where the certificate comes from.
    pub source: TlsSource,
    /// Client certificate authentication (mutual TLS) for these hosts:
    /// `client_auth = { ca_file = "clients-ca.pem", mode = "require" }`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_auth: Option<ClientAuth>,
}

/// Client certificate authentication of a `[[tls]]` entry's hosts.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ClientAuth {
    /// CA certificates (PEM) that a client certificate must chain to.
    pub ca_file: PathBuf,
    /// `require`: a handshake without a valid client certificate fails; `optional`: a
    /// client may send none (routes with `require_client_cert` then answer 403), but a
    /// certificate it sends must be valid.
    #[serde(default)]
    pub mode: ClientAuthMode,
    /// Headers that carry the verified certificate's details upstream. They are removed
    /// from every client request, so a client cannot send its own.
    #[serde(default)]
    pub headers: ClientCertHeaders,
}

/// Whether a client certificate is required at the handshake.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq, Hash)]
#[serde(rename_all = "snake_case")]
pub enum ClientAuthMode {
    /// Every handshake for these hosts must present a valid certificate.
    #[default]
    Require,
    /// A certificate is asked for but may be left out.
    Optional,
}

/// The names of the headers that carry a verified client certificate upstream; an
/// empty name sends no such header.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq, Eq, Hash)]
#[serde(deny_unknown_fields)]
pub struct ClientCertHeaders {
    /// The subject's distinguished name (RFC 4514 form, e.g. `CN=alice,O=Example`).
    #[serde(default = "default_cert_subject_header")]
    pub subject: String,
    /// The subject alternative names, comma-separated (`DNS:a.example`,
    /// `email:alice@example.com`, `URI:spiffe://...`, `IP:10.0.0.1`).
    #[serde(default = "default_cert_sans_header")]
    pub sans: String,
    /// SHA-256 of the certificate (DER), lowercase hex.
    #[serde(default = "default_cert_fingerprint_header")]
    pub fingerprint: String,
    /// The certificate as PEM, URL-encoded (off unless named, e.g. `"x-client-cert"`).
    #[serde(default)]
    pub pem: String,
}

impl Default for ClientCertHeaders {
    fn default() -> Self {
        Self {
            subject: default_cert_subject_header(),
            sans: default_cert_sans_header(),
            fingerprint: default_cert_fingerprint_header(),
            pem: String::new(),
        }
    }
}

impl ClientCertHeaders {
    /// The configured (non-empty) names with what each carries.
    pub fn named(&self) -> impl Iterator<Item = (CertField, &str)> {
        [
            (CertField::Subject, self.subject.as_str()),
            (CertField::Sans, self.sans.as_str()),
            (CertField::Fingerprint, self.fingerprint.as_str()),
            (CertField::Pem, self.pem.as_str()),
        ]
        .into_iter()
        .filter(|(_, name)| !name.is_empty())
    }
}

/// A detail of a client certificate that a header carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CertField {
    /// The subject DN.
    Subject,
    /// The subject alternative names.
    Sans,
    /// The SHA-256 fingerprint.
    Fingerprint,
    /// The URL-encoded PEM.
    Pem,
}

fn default_cert_subject_header() -> String {
    "x-client-cert-subject".to_string()
}
fn default_cert_sans_header() -> String {
    "x-client-cert-sans".to_string()
}
fn default_cert_fingerprint_header() -> String {
    "x-client-cert-fingerprint".to_string()
}

/// Where a certificate comes from.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum TlsSource {
    /// PEM files on disk: `source = { files = { cert = "...", key = "..." } }`.
    Files {
        /// Certificate chain (leaf first), PEM.
        cert: PathBuf,
        /// Private key (PKCS#8, PKCS#1 or SEC1), PEM.
        key: PathBuf,
    },
    /// Issued by Rampart's local CA kept in the data directory: `source = "internal"`.
    /// For development and internal names; clients must trust `<data_dir>/ca/ca.pem`.
    Internal,
    /// Obtained and renewed over ACME: `source = { acme = { email = "..." } }`.
    Acme(AcmeSource),
}

/// ACME settings of a certificate.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AcmeSource {
    /// Contact e-mail for the ACME account.
    pub email: String,
    /// ACME directory URL (default: Let's Encrypt production).
    #[serde(default = "default_acme_directory")]
    pub directory: String,
    /// Challenge type; wildcards need `dns-01`.
    #[serde(default)]
    pub challenge: AcmeChallenge,
    /// Trust this CA certificate (PEM) for the ACME directory's HTTPS, instead of the
    /// system roots: private ACME CAs, or pebble in tests.
    #[serde(default)]
    pub directory_ca: Option<PathBuf>,
    /// Other ACME CAs tried in order when an order at `directory` fails (e.g. ZeroSSL or
    /// Google Trust Services behind Let's Encrypt); same e-mail and challenge.
    #[serde(default)]
    pub fallback: Vec<AcmeFallback>,
    /// External Account Binding, which ZeroSSL, Google Trust Services and Sectigo
    /// require to create an account: `eab = { kid = "...", hmac_key_file = "..." }`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eab: Option<Eab>,
}

/// Another ACME CA for the same certificate.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AcmeFallback {
    /// Directory URL.
    pub directory: String,
    /// A CA certificate (PEM) to trust for this directory's HTTPS.
    #[serde(default)]
    pub directory_ca: Option<PathBuf>,
    /// This CA's External Account Binding, when it requires one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eab: Option<Eab>,
}

/// External Account Binding (RFC 8555 §7.3.4): the key id and HMAC key a CA hands out
/// with an account in its dashboard.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Eab {
    /// The key id (`EAB KID`).
    pub kid: String,
    /// A file holding the HMAC key as the CA shows it (base64url, `EAB HMAC Key`); read
    /// when an account is created, kept out of the configuration file.
    pub hmac_key_file: PathBuf,
}

fn default_acme_directory() -> String {
    "https://acme-v02.api.letsencrypt.org/directory".to_string()
}

/// ACME challenge type.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
pub enum AcmeChallenge {
    /// Answered by the proxies on the HTTP listener under /.well-known/acme-challenge/.
    #[default]
    #[serde(rename = "http-01")]
    Http01,
    /// Answered with a TXT record through the DNS provider.
    #[serde(rename = "dns-01")]
    Dns01,
    /// Answered by the proxies' HTTPS listeners (port 443) with a self-signed
    /// certificate to `acme-tls/1` handshakes (RFC 8737): for an edge whose port 80 is
    /// closed.
    #[serde(rename = "tls-alpn-01")]
    TlsAlpn01,
}

/// A route: which requests it matches and what it does with them.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Route {
    /// Unique name, used in metrics and /status.
    pub name: String,
    /// Hosts matched (exact or `*.wildcard`); empty matches any host.
    #[serde(default)]
    pub hosts: Vec<HostPattern>,
    /// Path prefix matched at segment boundaries ("/api" matches "/api" and "/api/x", not "/apix").
    #[serde(default = "default_path_prefix")]
    pub path_prefix: String,
    /// Headers that must be present with exactly these values (names case-insensitive).
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// Higher priorities are tried first; ties go to the more specific route
    /// (exact host over wildcard over any host, then longer path prefix, then more
    /// header conditions, then the earlier route in the file).
    #[serde(default)]
    pub priority: i32,
    /// Only clients from these addresses (after `forwarding.trusted_proxies`) are
    /// served; others get 403. Empty: everyone.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow_from: Vec<IpRange>,
    /// HTTP Basic authentication in front of the route: others get 401.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub basic_auth: Option<BasicAuth>,
    /// Forward authentication (oauth2-proxy, Authelia, any auth service): each
    /// request is first sent, without its body, to `url`; a 2xx answer lets it through
    /// with `copy_headers` taken from that answer, any other answer goes back to the
    /// client as it came: `forward_auth = { url = "http://auth:4180/oauth2/auth",
    /// copy_headers = ["X-Auth-Request-User"] }`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub forward_auth: Option<ForwardAuth>,
    /// Requests need a client certificate verified by the `client_auth` of the
    /// host's `[[tls]]` entry (for routes under a host whose mode is `optional`);
    /// without one the answer is 403.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub require_client_cert: bool,
    /// Answer plain-HTTP requests for this route with a 308 redirect to HTTPS.
    #[serde(default)]
    pub https_redirect: bool,
    /// Redirect the requests whose URL (`scheme://host[:port]/path?query`) matches a
    /// regular expression; the others go on to the action:
    /// `redirect = { pattern = "^https://www\\.(.+)$", location = "https://$1", status = 301 }`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redirect: Option<RegexRedirect>,
    /// Rewrite the path sent upstream with a regular expression (the first match is
    /// replaced; the query is kept): `rewrite = { pattern = "^/v1/(.*)$", replacement = "/api/$1" }`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rewrite: Option<Rewrite>,
    /// Forward without `path_prefix`: `/api/users?x=1` reaches the pool as
    /// `/users?x=1` (and `/api` as `/`), with `X-Forwarded-Prefix: /api` so that the
    /// application can build its links.
    // Left out of snapshots when false: a proxy older than this field then still
    // applies every snapshot that does not use it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub strip_prefix: bool,
    /// Headers set on or removed from the request sent upstream, after the forwarding
    /// headers: `{ set = { "X-Env" = "prod" }, remove = ["X-Debug"] }`.
    #[serde(default, skip_serializing_if = "HeaderRules::is_empty")]
    pub request_headers: HeaderRules,
    /// Headers set on or removed from the upstream's response before the client gets
    /// it: `{ set = { "Strict-Transport-Security" = "max-age=31536000" }, remove = ["Server"] }`.
    #[serde(default, skip_serializing_if = "HeaderRules::is_empty")]
    pub response_headers: HeaderRules,
    /// Whether this route's requests go to the access log (when there is one).
    #[serde(default = "default_true", skip_serializing_if = "is_true")]
    pub access_log: bool,
    /// Maximum request body for this route (default: `limits.max_body_bytes`).
    #[serde(default)]
    pub max_body_bytes: Option<ByteSize>,
    /// Requests over this rate per client (token bucket) get 429 with Retry-After:
    /// `rate_limit = { requests = 100, per = "1s", burst = 200 }`.
    #[serde(default)]
    pub rate_limit: Option<RateLimit>,
    /// Stickiness and overrides of a weighted split (`action = { forward = [...] }`):
    /// `split = { cookie = "rp_split", ttl = "1d", override_header = "X-Canary" }`.
    /// A split without it keeps clients on their pool with the `rp_split` cookie.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub split: Option<Split>,
    /// This route's error pages (each form it leaves out is the global
    /// `[error_pages]`'s): `error_pages = { html = { file = "/etc/rampart/shop.html" },
    /// intercept = [502, 503, 504] }`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_pages: Option<ErrorPages>,
    /// Compress the upstream's responses for clients that accept it:
    /// `compress = {}` (gzip, brotli and zstd for text, JSON, JavaScript, SVG… of
    /// 1 KiB and more) or `compress = { algorithms = ["gzip"], levels = { gzip = 1 } }`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compress: Option<Compress>,
    /// Copy a share of this route's requests to a shadow pool, fire-and-forget:
    /// `mirror = { pool = "shadow", percent = 10 }`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mirror: Option<Mirror>,
    /// What to do with a matching request.
    pub action: Action,
}

/// HTTP Basic authentication of a route.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct BasicAuth {
    /// Shown by browsers in their login prompt.
    #[serde(default = "default_realm")]
    pub realm: String,
    /// User name → bcrypt hash of the password (`rampart hash-password` makes one).
    pub users: BTreeMap<String, String>,
}

/// A route's forward authentication.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ForwardAuth {
    /// The auth service's check URL (http:// or https://). It gets a GET with the
    /// client's headers (not its body) and `X-Forwarded-Method`, `-Proto`, `-Host`,
    /// `-Uri` and `-For` saying what the request is.
    pub url: String,
    /// Headers of the auth service's 2xx answer that go upstream with the request (its
    /// user, e-mail, groups). The client's own headers of these names are always
    /// removed, so a client cannot claim an identity the service did not give.
    #[serde(default)]
    pub copy_headers: Vec<String>,
    /// How long the auth service may take; slower (or unreachable) fails closed: 504
    /// (502).
    #[serde(default = "default_forward_auth_timeout")]
    pub timeout: Dur,
}

fn default_forward_auth_timeout() -> Dur {
    Dur::secs(5)
}

fn default_realm() -> String {
    "restricted".to_string()
}

/// Headers a route sets on, or removes from, the messages it passes on.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct HeaderRules {
    /// Set, replacing the message's own values of that name: `{ "X-Env" = "prod" }`.
    #[serde(default)]
    pub set: BTreeMap<String, String>,
    /// Removed, in any case: `["X-Debug"]`.
    #[serde(default)]
    pub remove: Vec<String>,
}

impl HeaderRules {
    /// Whether the rules change nothing.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.set.is_empty() && self.remove.is_empty()
    }
}

/// A route's request rate limit: a token bucket per key that refills `requests` tokens
/// every `per` and holds at most `burst`.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RateLimit {
    /// Requests allowed per `per`, sustained.
    pub requests: u32,
    /// The period of `requests` (default 1s).
    #[serde(default = "default_rate_period")]
    pub per: Dur,
    /// Requests allowed at once after a quiet spell (default: `requests`).
    #[serde(default)]
    pub burst: Option<u32>,
    /// Whose bucket a request takes from: "client_ip" (default, after trusted-proxy
    /// resolution), "header:<name>" or "cookie:<name>" (falling back to the client IP
    /// when absent).
    #[serde(default = "default_rate_key")]
    pub key: HashKey,
}

fn default_rate_period() -> Dur {
    Dur::secs(1)
}
fn default_rate_key() -> HashKey {
    HashKey::ClientIp
}

fn default_path_prefix() -> String {
    "/".to_string()
}

/// What a route does.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Action {
    /// Proxy to the named pool, `action = { forward = "web" }`, or split the requests
    /// between pools by weight, `action = { forward = [{ pool = "v1", weight = 95 },
    /// { pool = "v2", weight = 5 }] }` (see the route's `split` for stickiness and
    /// overrides).
    Forward(ForwardTo),
    /// Redirect: `action = { redirect = { location = "https://example.com", status = 301 } }`.
    Redirect(Redirect),
    /// Answer directly: `action = { respond = { status = 503, body = "maintenance" } }`.
    Respond(Respond),
}

/// Where a forward action sends requests: one pool, or several by weight.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(
    untagged,
    expecting = "a pool name (forward = \"web\") or a split (forward = [{ pool = \"v1\", weight = 95 }, { pool = \"v2\", weight = 5 }])"
)]
pub enum ForwardTo {
    /// Every request to this pool.
    Pool(String),
    /// Each client to one of these pools, chosen by weight.
    Split(Vec<WeightedPool>),
}

impl ForwardTo {
    /// The pools named, in order.
    pub fn pools(&self) -> impl Iterator<Item = &str> {
        let (one, many) = match self {
            ForwardTo::Pool(p) => (Some(p.as_str()), &[][..]),
            ForwardTo::Split(s) => (None, &s[..]),
        };
        one.into_iter().chain(many.iter().map(|w| w.pool.as_str()))
    }

    /// Whether `pool` is one of the pools named.
    #[must_use]
    pub fn names(&self, pool: &str) -> bool {
        self.pools().any(|p| p == pool)
    }

    /// The first pool named (the only one of a plain forward).
    #[must_use]
    pub fn first(&self) -> &str {
        self.pools().next().unwrap_or("")
    }
}

impl From<&str> for ForwardTo {
    fn from(pool: &str) -> Self {
        ForwardTo::Pool(pool.to_string())
    }
}

impl From<String> for ForwardTo {
    fn from(pool: String) -> Self {
        ForwardTo::Pool(pool)
    }
}

impl std::fmt::Display for ForwardTo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ForwardTo::Pool(p) => f.write_str(p),
            ForwardTo::Split(s) => {
                for (i, w) in s.iter().enumerate() {
                    let sep = if i == 0 { "" } else { ", " };
                    write!(f, "{sep}{} {}", w.pool, w.weight)?;
                }
                Ok(())
            }
        }
    }
}

/// One pool of a weighted split and its share.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct WeightedPool {
    /// The pool.
    pub pool: String,
    /// Its share relative to the others' (0: only clients an override sends there).
    pub weight: u32,
}

/// How a route's weighted split (`forward = [...]`) keeps each client on its pool and
/// lets testers choose one.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Split {
    /// The cookie the proxy sets to keep a client on the pool it was given, so that a
    /// user does not flap between versions; `""` chooses afresh for every request.
    #[serde(default = "default_split_cookie")]
    pub cookie: String,
    /// How long that cookie lasts (absent: until the browser closes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl: Option<Dur>,
    /// A request header whose value names the pool to use, whatever the weights (for
    /// testers): `override_header = "X-Canary"` and `X-Canary: v2`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub override_header: Option<String>,
    /// A cookie whose value names the pool to use, whatever the weights.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub override_cookie: Option<String>,
}

impl Default for Split {
    fn default() -> Self {
        Self {
            cookie: default_split_cookie(),
            ttl: None,
            override_header: None,
            override_cookie: None,
        }
    }
}

fn default_split_cookie() -> String {
    "rp_split".to_string()
}

/// A redirect answer.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Redirect {
    /// Target URL (scheme and host, optionally a path).
    pub location: String,
    /// 301, 302, 303, 307 or 308.
    #[serde(default = "default_redirect_status")]
    pub status: u16,
    /// Append the request's path and query to `location`.
    #[serde(default)]
    pub keep_path: bool,
}

fn default_redirect_status() -> u16 {
    308
}

/// A route's regular-expression redirect.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RegexRedirect {
    /// Matched against `scheme://host[:port]/path?query` (Rust `regex` syntax).
    pub pattern: String,
    /// The `Location`, with `$1`, `${name}` for the pattern's groups.
    pub location: String,
    /// 301, 302, 303, 307 or 308.
    #[serde(default = "default_redirect_status")]
    pub status: u16,
}

/// A route's regular-expression path rewrite.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Rewrite {
    /// Matched against the request's path (Rust `regex` syntax).
    pub pattern: String,
    /// What the first match becomes, with `$1`, `${name}` for the pattern's groups.
    pub replacement: String,
}

/// A static answer (maintenance pages, health endpoints, the quickstart).
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Respond {
    /// HTTP status code.
    #[serde(default = "default_respond_status")]
    pub status: u16,
    /// Response body.
    #[serde(default)]
    pub body: String,
    /// Content-Type of the body.
    #[serde(default = "default_content_type")]
    pub content_type: String,
}

fn default_respond_status() -> u16 {
    200
}
fn default_content_type() -> String {
    "text/plain; charset=utf-8".to_string()
}

/// An upstream pool.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Pool {
    /// The endpoints requests are balanced across.
    #[serde(default)]
    pub endpoints: Vec<Endpoint>,
    /// Load-balancing policy.
    #[serde(default)]
    pub balance: Balance,
    /// Key hashed by `balance = "consistent_hash"` (default "client_ip").
    #[serde(default)]
    pub hash_key: Option<HashKey>,
    /// Active health checks; endpoints that fail them get no traffic.
    #[serde(default)]
    pub health_check: Option<HealthCheck>,
    /// Passive health: eject an endpoint after consecutive failures of real requests.
    #[serde(default)]
    pub passive_health: PassiveHealth,
    /// Upstream timeouts.
    #[serde(default)]
    pub timeouts: Timeouts,
    /// Retries of failed upstream attempts (only where safe).
    #[serde(default)]
    pub retries: Retries,
    /// How long requests still in flight on an endpoint that left the pool (a
    /// reload, a container stopped) may go on: responses still streaming after this
    /// are cut. New requests never go to it.
    #[serde(default = "default_drain_timeout")]
    pub drain_timeout: Dur,
    /// The HTTP version spoken to the endpoints: `"http1"` (default), `"h2"` (HTTP/2
    /// over TLS), `"h2c"` (HTTP/2 in cleartext, prior knowledge) or `"auto"` (HTTP/2
    /// or HTTP/1.1 as the endpoint's TLS ALPN chooses).
    #[serde(default, skip_serializing_if = "UpstreamProtocol::is_default")]
    pub protocol: UpstreamProtocol,
    /// TLS to the endpoints (absent: cleartext): `tls = {}` verifies them against the
    /// system's roots under the endpoint's host name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<UpstreamTls>,
    /// Most concurrent requests on one HTTP/2 connection to an endpoint (`h2`, `h2c`,
    /// `auto`); more open further connections.
    #[serde(default = "default_max_streams")]
    pub max_streams: u32,
    /// Sends a PROXY protocol header (`"v1"` text or `"v2"` binary) with the client's
    /// address at the start of every connection to the endpoints (HAProxy's
    /// `send-proxy`). Such connections are reused only for requests of the same client
    /// connection address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proxy_protocol: Option<ProxyProtocol>,
    /// Slow start (HAProxy's `slowstart`): an endpoint that joins the pool, or comes
    /// back from a failed health check or an ejection, gets a share of the requests
    /// that grows from nothing to its full share over this time, with every balancing
    /// policy: `slow_start = "30s"`. Absent: full share at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slow_start: Option<Dur>,
    /// Sticky sessions with a cookie the proxy issues: the cookie names the endpoint a
    /// client was sent to (opaquely), and the client stays there while it is
    /// available; adding endpoints moves no session. `sticky = { cookie = "rp_s",
    /// ttl = "1h" }` (`sticky = {}`: every default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sticky: Option<Sticky>,
    /// A circuit breaker: `circuit_breaker = { max_in_flight = 500, error_ratio = 0.5 }`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub circuit_breaker: Option<CircuitBreaker>,
    /// Error pages of the requests forwarded to this pool (a route's own win; each
    /// form left out is the global `[error_pages]`'s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_pages: Option<ErrorPages>,
}

/// A pool's sticky-session cookie.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Sticky {
    /// The cookie's name.
    #[serde(default = "default_sticky_cookie")]
    pub cookie: String,
    /// How long it lasts (absent: until the browser closes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl: Option<Dur>,
    /// Sent only over HTTPS (`Secure`); absent: set on responses to HTTPS requests.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secure: Option<bool>,
    /// Hidden from scripts (`HttpOnly`).
    #[serde(default = "default_true")]
    pub http_only: bool,
    /// `SameSite`: `"lax"` (default), `"strict"` or `"none"` (which browsers accept
    /// only with `Secure`).
    #[serde(default)]
    pub same_site: SameSite,
}

impl Default for Sticky {
    fn default() -> Self {
        Self {
            cookie: default_sticky_cookie(),
            ttl: None,
            secure: None,
            http_only: true,
            same_site: SameSite::default(),
        }
    }
}

fn default_sticky_cookie() -> String {
    "rp_s".to_string()
}

/// A cookie's `SameSite` attribute.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum SameSite {
    /// `SameSite=Lax`.
    #[default]
    Lax,
    /// `SameSite=Strict`.
    Strict,
    /// `SameSite=None`.
    None,
}

impl SameSite {
    /// The attribute's value.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            SameSite::Lax => "Lax",
            SameSite::Strict => "Strict",
            SameSite::None => "None",
        }
    }
}

fn default_max_streams() -> u32 {
    100
}

impl Default for Pool {
    /// A pool with no endpoints and every default (what a pool only discovery names
    /// gets).
    fn default() -> Self {
        Self {
            endpoints: Vec::new(),
            balance: Balance::default(),
            hash_key: None,
            health_check: None,
            passive_health: PassiveHealth::default(),
            timeouts: Timeouts::default(),
            retries: Retries::default(),
            drain_timeout: default_drain_timeout(),
            protocol: UpstreamProtocol::default(),
            tls: None,
            max_streams: default_max_streams(),
            proxy_protocol: None,
            slow_start: None,
            sticky: None,
            circuit_breaker: None,
            error_pages: None,
        }
    }
}

/// How a pool's endpoints are reached, as a provider's labels set it for a pool the
/// configuration file does not define (`rampart.pool.<name>.protocol`, `.tls.*`,
/// `.max_streams`, `.proxy_protocol`). Absent fields keep the defaults.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PoolSettings {
    /// `protocol`.
    pub protocol: Option<UpstreamProtocol>,
    /// `tls`.
    pub tls: Option<UpstreamTls>,
    /// `max_streams`.
    pub max_streams: Option<u32>,
    /// `proxy_protocol`.
    pub proxy_protocol: Option<ProxyProtocol>,
    /// `sticky`, `sticky.cookie`, `sticky.ttl`.
    pub sticky: Option<Sticky>,
    /// `slow_start`.
    pub slow_start: Option<Dur>,
    /// `max_in_flight` (the circuit breaker's concurrency limit).
    pub max_in_flight: Option<u32>,
}

impl PoolSettings {
    /// Sets what these settings name on `pool`.
    pub fn apply(&self, pool: &mut Pool) {
        if let Some(p) = self.protocol {
            pool.protocol = p;
        }
        if let Some(tls) = &self.tls {
            pool.tls = Some(tls.clone());
        }
        if let Some(n) = self.max_streams {
            pool.max_streams = n;
        }
        if let Some(v) = self.proxy_protocol {
            pool.proxy_protocol = Some(v);
        }
        if let Some(s) = &self.sticky {
            pool.sticky = Some(s.clone());
        }
        if let Some(d) = self.slow_start {
            pool.slow_start = Some(d);
        }
        if let Some(n) = self.max_in_flight {
            let cb = pool.circuit_breaker.get_or_insert_with(|| CircuitBreaker {
                max_in_flight: None,
                error_ratio: None,
                min_requests: default_breaker_min_requests(),
                window: default_breaker_window(),
                open_for: default_breaker_open_for(),
            });
            cb.max_in_flight = Some(n);
        }
    }
}

/// The HTTP version a pool speaks to its endpoints.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum UpstreamProtocol {
    /// HTTP/1.1, keep-alive connections reused.
    #[default]
    Http1,
    /// HTTP/2 over TLS (needs `tls`): many requests share a connection; gRPC needs it.
    H2,
    /// HTTP/2 over cleartext TCP with prior knowledge (gRPC services in a private network).
    H2c,
    /// HTTP/2 when the endpoint's TLS ALPN offers it, else HTTP/1.1 (needs `tls`).
    Auto,
}

impl UpstreamProtocol {
    #[allow(clippy::trivially_copy_pass_by_ref)] // serde's skip_serializing_if signature
    fn is_default(&self) -> bool {
        *self == UpstreamProtocol::Http1
    }
    /// The name used in the configuration.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            UpstreamProtocol::Http1 => "http1",
            UpstreamProtocol::H2 => "h2",
            UpstreamProtocol::H2c => "h2c",
            UpstreamProtocol::Auto => "auto",
        }
    }
}

/// TLS from the proxy to a pool's endpoints.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct UpstreamTls {
    /// The name sent as SNI and that the endpoint's certificate must carry (default:
    /// the endpoint's host, a name or an IP address).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_name: Option<String>,
    /// PEM file of the CA certificates the endpoints' certificates must chain to
    /// (default: the system's roots).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
    /// PEM certificate chain presented to endpoints that ask for a client certificate
    /// (mutual TLS); needs `client_key`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_cert: Option<PathBuf>,
    /// PEM private key of `client_cert`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_key: Option<PathBuf>,
    /// Oldest TLS version accepted from an endpoint: `"1.2"` (default) or `"1.3"`.
    #[serde(default, skip_serializing_if = "TlsVersion::is_default")]
    pub min_version: TlsVersion,
    /// Accepts any certificate from the endpoints, so anyone on the path can read and
    /// change the traffic. Refused unless `i_understand_this_is_insecure = true` too.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub insecure_skip_verify: bool,
    /// The acknowledgement `insecure_skip_verify` needs.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub i_understand_this_is_insecure: bool,
}

/// A TLS protocol version floor.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
pub enum TlsVersion {
    /// TLS 1.2 and 1.3.
    #[default]
    #[serde(rename = "1.2")]
    Tls12,
    /// TLS 1.3 only.
    #[serde(rename = "1.3")]
    Tls13,
}

impl TlsVersion {
    #[allow(clippy::trivially_copy_pass_by_ref)] // serde's skip_serializing_if signature
    fn is_default(&self) -> bool {
        *self == TlsVersion::Tls12
    }
}

/// A PROXY protocol version (haproxy.org/download/2.9/doc/proxy-protocol.txt).
#[derive(Clone, Copy, Debug, Deserialize, Serialize, JsonSchema, PartialEq, Eq, Hash)]
#[serde(rename_all = "snake_case")]
pub enum ProxyProtocol {
    /// The human-readable header (`PROXY TCP4 ...\r\n`).
    V1,
    /// The binary header.
    V2,
}

fn default_drain_timeout() -> Dur {
    Dur::secs(30)
}

/// One upstream endpoint.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Endpoint {
    /// "host:port" of the upstream (plain HTTP/1.1, connections are reused).
    pub address: Address,
    /// Relative share of traffic for "weighted" and "consistent_hash" (1-1000).
    #[serde(default = "default_weight")]
    pub weight: u32,
}

fn default_weight() -> u32 {
    1
}

/// Load-balancing policy of a pool.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Balance {
    /// Each healthy endpoint in turn, ignoring weights.
    #[default]
    RoundRobin,
    /// Smooth weighted round robin (as nginx): shares follow `weight`.
    Weighted,
    /// The endpoint with the fewest requests in flight (ties in turn).
    LeastConn,
    /// Ketama ring on `hash_key`: the same key goes to the same endpoint, and adding an
    /// endpoint moves only about 1/n of the keys.
    ConsistentHash,
    /// Power of two random choices, comparing latency EWMA × (in-flight + 1).
    P2cEwma,
}

/// Active health check of every endpoint of a pool.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct HealthCheck {
    /// What to probe: `probe = "tcp"` or `probe = { http = { path = "/healthz" } }`.
    #[serde(default)]
    pub probe: Probe,
    /// Time between probes of one endpoint.
    #[serde(default = "default_check_interval")]
    pub interval: Dur,
    /// A probe that takes longer fails.
    #[serde(default = "default_check_timeout")]
    pub timeout: Dur,
    /// Consecutive successes that bring an unhealthy endpoint back.
    #[serde(default = "default_healthy_threshold")]
    pub healthy_threshold: u32,
    /// Consecutive failures that take a healthy endpoint out.
    #[serde(default = "default_unhealthy_threshold")]
    pub unhealthy_threshold: u32,
}

fn default_check_interval() -> Dur {
    Dur::secs(5)
}
fn default_check_timeout() -> Dur {
    Dur::secs(2)
}
fn default_healthy_threshold() -> u32 {
    2
}
fn default_unhealthy_threshold() -> u32 {
    3
}

/// A health probe.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Probe {
    /// A TCP connect succeeds.
    Tcp,
    /// An HTTP GET returns the expected status.
    Http(HttpProbe),
    /// A gRPC health check (`grpc.health.v1.Health/Check`) answers SERVING; needs an
    /// HTTP/2 pool (`protocol = "h2"`, `"h2c"` or `"auto"`).
    Grpc(GrpcProbe),
}

/// A gRPC health probe.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct GrpcProbe {
    /// The service asked about (`""`: the server as a whole).
    #[serde(default)]
    pub service: String,
}

impl Default for Probe {
    fn default() -> Self {
        Probe::Http(HttpProbe::default())
    }
}

/// An HTTP health probe.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct HttpProbe {
    /// Path requested.
    #[serde(default = "default_probe_path")]
    pub path: String,
    /// Status that counts as healthy.
    #[serde(default = "default_probe_status")]
    pub expect_status: u16,
    /// Host header sent (default: the endpoint address).
    #[serde(default)]
    pub host: Option<Hostname>,
}

impl Default for HttpProbe {
    fn default() -> Self {
        Self {
            path: default_probe_path(),
            expect_status: default_probe_status(),
            host: None,
        }
    }
}

fn default_true() -> bool {
    true
}
#[allow(clippy::trivially_copy_pass_by_ref)] // serde's skip_serializing_if signature
fn is_true(b: &bool) -> bool {
    *b
}
fn default_probe_path() -> String {
    "/healthz".to_string()
}
fn default_probe_status() -> u16 {
    200
}

/// Passive health: consecutive failed requests (connect errors, timeouts, 5xx from the
/// upstream's own failure) eject an endpoint; the ejection doubles on each repeat.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PassiveHealth {
    /// Consecutive failures that eject an endpoint (0 disables passive health).
    #[serde(default = "default_consecutive_failures")]
    pub consecutive_failures: u32,
    /// First ejection period.
    #[serde(default = "default_eject_for")]
    pub eject_for: Dur,
    /// Longest ejection period after repeated ejections.
    #[serde(default = "default_max_eject_for")]
    pub max_eject_for: Dur,
    /// Panic threshold, in percent: while fewer than this share of the pool's
    /// (actively healthy) endpoints are free of ejection, ejections are ignored and
    /// requests are balanced over all of them, so that failures on one path (a hanging
    /// URL, a burst of timeouts) never take a whole pool offline and a pool recovers with
    /// the first request that succeeds (Envoy's healthy panic threshold). 0 disables.
    #[serde(default = "default_panic_threshold")]
    pub panic_threshold: u8,
    /// At most this share of a pool's endpoints, in percent, is ejected at once (at
    /// least one endpoint can always be).
    #[serde(default = "default_max_ejected_percent")]
    pub max_ejected_percent: u8,
}

impl Default for PassiveHealth {
    fn default() -> Self {
        Self {
            consecutive_failures: default_consecutive_failures(),
            eject_for: default_eject_for(),
            max_eject_for: default_max_eject_for(),
            panic_threshold: default_panic_threshold(),
            max_ejected_percent: default_max_ejected_percent(),
        }
    }
}

fn default_panic_threshold() -> u8 {
    50
}
fn default_max_ejected_percent() -> u8 {
    50
}

fn default_consecutive_failures() -> u32 {
    5
}
fn default_eject_for() -> Dur {
    Dur::secs(10)
}
fn default_max_eject_for() -> Dur {
    Dur::secs(300)
}

/// Upstream timeouts.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Timeouts {
    /// TCP connect.
    #[serde(default = "default_connect_timeout")]
    pub connect: Dur,
    /// From sending the request until the first response byte (also the longest
    /// pause between two reads of the response).
    #[serde(default = "default_first_byte_timeout")]
    pub first_byte: Dur,
    /// How long an idle upstream keep-alive connection is kept for reuse.
    #[serde(default = "default_idle_timeout")]
    pub idle: Dur,
    /// Whole request, from routing to the last response byte; 504 if it is hit before
    /// the response started.
    #[serde(default = "default_total_timeout")]
    pub total: Dur,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            connect: default_connect_timeout(),
            first_byte: default_first_byte_timeout(),
            idle: default_idle_timeout(),
            total: default_total_timeout(),
        }
    }
}

fn default_connect_timeout() -> Dur {
    Dur::secs(3)
}
fn default_first_byte_timeout() -> Dur {
    Dur::secs(30)
}
fn default_idle_timeout() -> Dur {
    Dur::secs(60)
}
fn default_total_timeout() -> Dur {
    Dur::secs(300)
}

/// Retries of failed upstream attempts, each on another endpoint where one exists.
/// Connect failures are always safe to retry. A response status in `on_status` is
/// retried only for idempotent methods without a request body: a request whose body
/// was sent is never retried.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Retries {
    /// Extra attempts after the first (0 disables retries).
    #[serde(default = "default_retry_attempts")]
    pub attempts: u32,
    /// Upstream statuses retried for idempotent, bodiless requests (502 and/or 503).
    #[serde(default = "default_retry_statuses")]
    pub on_status: Vec<u16>,
    /// The retry budget (as Envoy's and linkerd's): retries in flight to the pool are
    /// at most this percentage of its requests in flight, so that a failing pool is not
    /// sent a storm of retries on top of its load.
    #[serde(
        default = "default_retry_budget",
        skip_serializing_if = "is_default_retry_budget"
    )]
    pub budget_percent: u32,
    /// Retries in flight the budget always allows, however few requests there are.
    #[serde(
        default = "default_min_retries",
        skip_serializing_if = "is_default_min_retries"
    )]
    pub min_retries: u32,
}

impl Default for Retries {
    fn default() -> Self {
        Self {
            attempts: default_retry_attempts(),
            on_status: default_retry_statuses(),
            budget_percent: default_retry_budget(),
            min_retries: default_min_retries(),
        }
    }
}

fn default_retry_budget() -> u32 {
    20
}
fn is_default_retry_budget(v: &u32) -> bool {
    *v == default_retry_budget()
}
fn default_min_retries() -> u32 {
    3
}
fn is_default_min_retries(v: &u32) -> bool {
    *v == default_min_retries()
}

/// A pool's circuit breaker: requests beyond `max_in_flight`, and every request while
/// the pool's upstream attempts fail at `error_ratio` or more, are answered 503 with
/// `Retry-After` at once instead of adding load to a pool that cannot take it.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CircuitBreaker {
    /// Most requests in flight to the pool (all its endpoints); more are refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_in_flight: Option<u32>,
    /// The share of failed upstream attempts (connect errors, timeouts, 502–504) in
    /// `window` that opens the breaker, between 0 and 1 (absent: never opens).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_ratio: Option<f64>,
    /// Attempts in the window before the ratio counts.
    #[serde(default = "default_breaker_min_requests")]
    pub min_requests: u32,
    /// The window the ratio is measured over.
    #[serde(default = "default_breaker_window")]
    pub window: Dur,
    /// How long the breaker stays open; then one trial request is let through, and
    /// its success closes it (its failure opens it again).
    #[serde(default = "default_breaker_open_for")]
    pub open_for: Dur,
}

fn default_breaker_min_requests() -> u32 {
    20
}
fn default_breaker_window() -> Dur {
    Dur::secs(10)
}
fn default_breaker_open_for() -> Dur {
    Dur::secs(5)
}

fn default_retry_attempts() -> u32 {
    1
}
fn default_retry_statuses() -> Vec<u16> {
    vec![502, 503]
}
