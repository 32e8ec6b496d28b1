//! The snapshot: everything a proxy of the fleet serves, as one versioned value that the
//! controller compiles and pushes and every proxy applies whole. Also the other messages
//! of the fleet protocol (enrolment, ack, heartbeat, status), so that the proxy and the
//! controller share one wire model without depending on each other.
//!
//! A snapshot carries no file paths: certificates travel as PEM, endpoints as addresses
//! (discovery already merged in). What stays local to a proxy (listeners, threads, data
//! directory) comes from the proxy's own command line or file; see [`Snapshot::into_config`].

use std::collections::BTreeMap;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use crate::diagnostics::{FieldPath, Issue};
use crate::model::{Config, Forwarding, Limits, Pool, Route};
use crate::units::{HostPattern, Hostname};

/// Version of the snapshot wire format; a proxy refuses snapshots of another schema.
pub const SCHEMA: u32 = 1;

/// The `code` of a fleet API refusal for an instance the controller does not know
/// (never enrolled there, or forgotten after `controller.forget_after`): a proxy that
/// holds a join token enrols again.
pub const NOT_ENROLLED: &str = "not_enrolled";

/// Everything a proxy serves, at one version.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Snapshot {
    /// Wire format version ([`SCHEMA`]).
    pub schema: u32,
    /// Monotonic version: never reused, even across controller restarts and failovers.
    pub version: u64,
    /// Client limits.
    pub limits: Limits,
    /// Forwarding headers policy.
    pub forwarding: Forwarding,
    /// Routes in priority order of the configuration.
    pub routes: Vec<Route>,
    /// Pools with their static and discovered endpoints.
    pub pools: BTreeMap<String, Pool>,
    /// Certificates by host.
    pub certificates: Vec<CertificateBundle>,
    /// Host whose certificate answers handshakes without a known SNI.
    pub default_sni: Option<Hostname>,
    /// ACME HTTP-01 answers: token → key authorization, served by every proxy under
    /// `/.well-known/acme-challenge/<token>` while an order is pending.
    #[serde(default)]
    pub acme_challenges: BTreeMap<String, String>,
    /// ACME TLS-ALPN-01 answers: name → SHA-256 of the key authorization (base64url),
    /// which every proxy puts in the certificate it shows `acme-tls/1` handshakes for
    /// that name while an order is pending.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub acme_tls_alpn: BTreeMap<String, String>,
    /// The fleet's TLS session ticket keys (absent: tickets off, or a controller that
    /// does not make them; a proxy then makes its own).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_tickets: Option<TicketKeys>,
    /// On-demand TLS (absent: off): which names a proxy asks the controller about when
    /// a handshake names one that no certificate covers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_demand: Option<OnDemandPolicy>,
    /// The controller's `[error_pages]` (absent: none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_pages: Option<crate::ErrorPages>,
}

/// What a proxy needs of `[tls_on_demand]`.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct OnDemandPolicy {
    /// Names that may be asked about (empty: any).
    pub allow: Vec<HostPattern>,
    /// How long the handshake that asked waits for the certificate, in milliseconds.
    pub hold_ms: u64,
}

impl OnDemandPolicy {
    /// Whether a handshake for `name` (lowercase) may ask for a certificate.
    #[must_use]
    pub fn allows(&self, name: &str) -> bool {
        self.allow.is_empty() || self.allow.iter().any(|p| p.matches(name))
    }
}

/// `POST /v1/on-demand`: a proxy saw a handshake for a name without a certificate.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct OnDemandRequest {
    /// The server name of the handshake.
    pub name: String,
}

/// The controller's answer to an [`OnDemandRequest`].
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct OnDemandAnswer {
    /// The name is approved: its certificate is held or being ordered.
    pub approved: bool,
    /// Why, in words for the proxy's log.
    pub detail: String,
    /// A denied name: ask again no sooner than this (seconds).
    #[serde(default)]
    pub retry_after_secs: u64,
}

/// The session ticket keys every proxy of a fleet shares, so that a ticket issued by
/// one resumes on another. Never logged (its `Debug` shows no key).
#[derive(Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct TicketKeys {
    /// The ticket lifetime a client is told, in seconds (the rotation period).
    pub lifetime: u32,
    /// 32-byte keys, base64url: the first encrypts new tickets, each decrypts (the next
    /// key is sent a period before it encrypts, so that every proxy can read its
    /// tickets by then; the previous one stays a period after).
    pub keys: Vec<String>,
}

impl std::fmt::Debug for TicketKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TicketKeys")
            .field("lifetime", &self.lifetime)
            .field("keys", &self.keys.len())
            .finish()
    }
}

/// A certificate chain and key for some hosts, as PEM.
#[derive(Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CertificateBundle {
    /// Hosts (exact or wildcard) served with this certificate.
    pub hosts: Vec<HostPattern>,
    /// Chain, leaf first.
    pub chain_pem: String,
    /// Private key.
    pub key_pem: String,
    /// Client certificate authentication of these hosts, with its CA as PEM.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_auth: Option<ClientAuthBundle>,
}

/// A `client_auth` as a snapshot carries it: the CA certificates as PEM, not a path.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ClientAuthBundle {
    /// CA certificates a client certificate must chain to, PEM.
    pub ca_pem: String,
    /// Whether a certificate is required at the handshake.
    pub mode: crate::ClientAuthMode,
    /// Headers that carry the verified certificate upstream.
    pub headers: crate::ClientCertHeaders,
}

impl ClientAuthBundle {
    /// The bundle of `auth`, reading its CA file.
    ///
    /// # Errors
    /// When the CA file cannot be read.
    pub fn read(auth: &crate::ClientAuth) -> std::io::Result<Self> {
        Ok(Self {
            ca_pem: std::fs::read_to_string(&auth.ca_file)?,
            mode: auth.mode,
            headers: auth.headers.clone(),
        })
    }
}

impl std::fmt::Debug for CertificateBundle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print private keys.
        f.debug_struct("CertificateBundle")
            .field("hosts", &self.hosts)
            .finish_non_exhaustive()
    }
}

impl Snapshot {
    /// The configuration a proxy serves: its local settings (`server`, `listeners`) with
    /// everything else from this snapshot, plus the certificates to load. Checks the
    /// schema and the same cross-field rules as a configuration file.
    ///
    /// # Errors
    /// Every problem found, each with its path inside the snapshot.
    pub fn into_config(
        self,
        local: &Config,
    ) -> Result<(Config, Vec<CertificateBundle>), Vec<Issue>> {
        if self.schema != SCHEMA {
            return Err(vec![Issue::new(
                FieldPath::root().key("schema"),
                format!("snapshot schema {} is not {SCHEMA}", self.schema),
                "run the same Rampart version on the controller and the proxies",
            )]);
        }
        let mut server = local.server.clone();
        server.default_sni = self.default_sni;
        let config = Config {
            server,
            listeners: local.listeners.clone(),
            limits: self.limits,
            forwarding: self.forwarding,
            tls: Vec::new(),
            routes: self.routes,
            pools: self.pools,
            controller: None,
            discovery: crate::Discovery::default(),
            dns: None,
            // Where this proxy writes its log is its own (like its listeners).
            access_log: local.access_log.clone(),
            tracing: local.tracing.clone(),
            // In a fleet the controller decides: its keys come in the snapshot, and
            // without them no proxy issues tickets of its own.
            session_tickets: crate::SessionTickets {
                enabled: self.session_tickets.is_some(),
                ..local.session_tickets.clone()
            },
            // The controller's: what proxies need of it travels as `on_demand`.
            tls_on_demand: None,
            error_pages: self.error_pages,
        };
        let issues = crate::validate::validate_snapshot(&config);
        if issues.is_empty() {
            Ok((config, self.certificates))
        } else {
            Err(issues)
        }
    }
}

/// A one-time join token, `rmp1.<id>.<secret>.<ca>`: the id names the controller's
/// record, the secret proves the holder, and `<ca>` is the SHA-256 of the fleet CA
/// certificate that the joining proxy pins to trust the controller.
#[derive(Clone, PartialEq, Eq)]
pub struct JoinToken {
    /// Record id (16 hex digits).
    pub id: String,
    /// Secret (32 hex digits).
    pub secret: String,
    /// Fleet CA fingerprint (64 lowercase hex digits).
    pub ca_sha256: String,
}

impl JoinToken {
    const PREFIX: &'static str = "rmp1";

    /// The parts of `token`, if it has the form above.
    #[must_use]
    pub fn parse(token: &str) -> Option<Self> {
        let mut parts = token.trim().split('.');
        let (Some(Self::PREFIX), Some(id), Some(secret), Some(ca), None) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            return None;
        };
        let hex = |s: &str, len: usize| s.len() == len && s.bytes().all(|b| b.is_ascii_hexdigit());
        (hex(id, 16) && hex(secret, 32) && hex(ca, 64)).then(|| Self {
            id: id.to_string(),
            secret: secret.to_string(),
            ca_sha256: ca.to_ascii_lowercase(),
        })
    }
}

impl std::fmt::Display for JoinToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}.{}.{}.{}",
            Self::PREFIX,
            self.id,
            self.secret,
            self.ca_sha256
        )
    }
}

impl std::fmt::Debug for JoinToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the secret.
        f.debug_struct("JoinToken")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

/// `POST /v1/enroll`: a new proxy asks for a client certificate.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct EnrollRequest {
    /// The one-time join token (`rampart controller token create`).
    pub token: String,
    /// Certificate request for the proxy's own key, PEM.
    pub csr_pem: String,
    /// The proxy's host name, for humans reading `/status`.
    pub hostname: String,
}

/// The answer to an enrolment.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct EnrollResponse {
    /// The identity the controller gave the proxy.
    pub instance: String,
    /// The client certificate, PEM.
    pub cert_pem: String,
    /// The fleet CA, PEM: trust it for the controller from now on.
    pub ca_pem: String,
}

/// `POST /v1/renew`: an enrolled proxy asks for a certificate for a new key (answered
/// with an [`EnrollResponse`] for the same identity).
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RenewRequest {
    /// Certificate request for the new key, PEM.
    pub csr_pem: String,
}

/// `POST /v1/ack`: what a proxy did with a snapshot.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Ack {
    /// The snapshot version.
    pub version: u64,
    /// Whether it is now serving.
    pub applied: AckResult,
    /// Why it was refused (empty when applied).
    #[serde(default)]
    pub detail: String,
}

/// Outcome of applying a snapshot.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum AckResult {
    /// Serving it.
    Ok,
    /// Refused; the previous version keeps serving.
    Error,
}

/// A proxy's traffic over a recent window (its in-process rolling windows).
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq)]
pub struct TrafficSummary {
    /// Window length in seconds.
    pub seconds: u64,
    /// Requests per second, on average.
    pub rate: f64,
    /// Share of requests answered 5xx.
    pub error_ratio: f64,
    /// Median latency in milliseconds (upper bound of its bucket).
    pub p50_ms: f64,
    /// 99th percentile latency in milliseconds (upper bound of its bucket).
    pub p99_ms: f64,
}

/// `POST /v1/heartbeat`: a proxy says it is alive. Unknown fields are ignored, so that
/// newer proxies can add some (upgrade controllers first all the same).
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
pub struct Heartbeat {
    /// Public addresses clients reach this proxy on (for DNS).
    #[serde(default)]
    pub public_addrs: Vec<IpAddr>,
    /// Whether its listeners accept and it serves a snapshot.
    pub ready: bool,
    /// The snapshot version it serves (0: none yet).
    pub version: u64,
    /// Port of its HTTPS listener (the DNS probe's target).
    #[serde(default)]
    pub https_port: Option<u16>,
    /// Its traffic over the last minute.
    #[serde(default)]
    pub traffic: Option<TrafficSummary>,
}

/// One proxy instance as the controller sees it (`/status`, `rampart controller status`).
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
pub struct InstanceStatus {
    /// Identity given at enrolment.
    pub id: String,
    /// Host name it enrolled with.
    pub hostname: String,
    /// Address it connects from.
    pub peer: Option<String>,
    /// Public addresses from its heartbeat.
    pub public_addrs: Vec<IpAddr>,
    /// Version it reports serving.
    pub version: u64,
    /// Whether it reported ready.
    pub ready: bool,
    /// Seconds since its last heartbeat (None: never).
    pub last_heartbeat_secs: Option<f64>,
    /// The last snapshot it refused, and why.
    pub last_error: Option<String>,
    /// `ready`, `not_ready`, `stale` (no heartbeat within the timeout) or `revoked`.
    pub state: String,
    /// Its traffic over the last minute, as its last heartbeat said.
    #[serde(default)]
    pub traffic: Option<TrafficSummary>,
}

/// The controller's `/status`.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
pub struct ControllerStatus {
    /// Version of the current snapshot.
    pub version: u64,
    /// Whether this controller holds the leader lease (always true with a local store).
    pub leader: bool,
    /// Proxy instances.
    pub instances: Vec<InstanceStatus>,
    /// Discovery providers and their last errors.
    pub discovery: Vec<ProviderStatus>,
    /// DNS automation, when configured.
    #[serde(default)]
    pub dns: Option<DnsStatus>,
}

/// DNS automation as the controller sees it (`/status`, `rampart dns plan`).
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
pub struct DnsStatus {
    /// Provider kind.
    pub provider: String,
    /// The zone.
    pub zone: String,
    /// Unix time of the last pass that read the provider and applied its plan.
    pub last_sync_unix: Option<u64>,
    /// What went wrong in the last pass, if anything.
    pub last_error: Option<String>,
    /// Seconds from the last instance change to the provider reflecting it.
    pub last_convergence_secs: Option<f64>,
    /// The instances as DNS sees them (heartbeat and probe).
    pub instances: Vec<DnsInstance>,
    /// The last plan computed (after it was applied, the changes it made).
    pub plan: DnsPlan,
    /// Each managed name: its owner and values before the last pass, and the values
    /// the pass wanted.
    #[serde(default)]
    pub names: Vec<DnsNameStatus>,
}

/// One managed name as the last DNS pass found and left it.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
pub struct DnsNameStatus {
    /// The name.
    pub name: String,
    /// The ownership TXT values found at it (`heritage=rampart,owner=...`).
    pub owners: Vec<String>,
    /// A/AAAA values the provider held.
    pub actual: Vec<String>,
    /// A/AAAA values the plan wanted.
    pub desired: Vec<String>,
    /// Whether they differed (drift that the pass set out to fix, or could not).
    pub drift: bool,
}

/// One proxy instance as the DNS loop sees it.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
pub struct DnsInstance {
    /// Instance id.
    pub id: String,
    /// Public addresses.
    pub addrs: Vec<IpAddr>,
    /// Its heartbeat is fresh and says ready.
    pub heartbeat_ready: bool,
    /// The probe of its public listener: None while not probed.
    pub probe_ok: Option<bool>,
    /// The last probe error.
    pub probe_error: Option<String>,
    /// Published in DNS.
    pub ready: bool,
}

/// A DNS plan in words: what would be (or was) created, updated, deleted or left alone.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
pub struct DnsPlan {
    /// Changes, one line each: `upsert www.example.com A [set i-1] 192.0.2.1 (ttl 60)`.
    pub changes: Vec<String>,
    /// Names left alone and why (records Rampart does not own).
    pub skipped: Vec<String>,
    /// Names held at their floor (every instance looks dead).
    pub floored: Vec<String>,
    /// Names whose changes failed, with the provider's reason.
    pub failed: Vec<String>,
}

/// A discovery provider's state.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
pub struct ProviderStatus {
    /// Provider name, e.g. `file:endpoints.d`.
    pub name: String,
    /// Endpoints it currently contributes.
    pub endpoints: usize,
    /// Problems in its last read (the last good endpoints stay in use).
    pub errors: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snapshot() -> Snapshot {
        let cfg = crate::parse(
            "[listeners]\nhttp = \"127.0.0.1:1\"\n[[routes]]\nname = \"r\"\naction = { forward = \"p\" }\n[pools.p]\nendpoints = [{ address = \"127.0.0.1:2\" }]\n",
            "t",
        )
        .unwrap();
        Snapshot {
            schema: SCHEMA,
            version: 7,
            limits: cfg.limits,
            forwarding: cfg.forwarding,
            routes: cfg.routes,
            pools: cfg.pools,
            certificates: vec![],
            session_tickets: None,
            on_demand: None,
            error_pages: None,
            default_sni: None,
            acme_challenges: BTreeMap::new(),
            acme_tls_alpn: BTreeMap::new(),
        }
    }

    #[test]
    fn a_route_without_strip_prefix_is_sent_as_before_the_field_existed() {
        // Proxies older than `strip_prefix` refuse unknown route fields.
        let mut snap = snapshot();
        let json = serde_json::to_string(&snap).unwrap();
        assert!(!json.contains("strip_prefix"), "{json}");
        snap.routes[0].strip_prefix = true;
        let json = serde_json::to_string(&snap).unwrap();
        assert!(json.contains("\"strip_prefix\":true"), "{json}");
        let back: Snapshot = serde_json::from_str(&json).unwrap();
        assert!(back.routes[0].strip_prefix);
    }

    #[test]
    fn a_snapshot_round_trips_and_keeps_local_listeners() {
        let snap = snapshot();
        let json = serde_json::to_string(&snap).unwrap();
        let back: Snapshot = serde_json::from_str(&json).unwrap();
        assert_eq!(back, snap);
        let mut local = Config::default();
        local.listeners.http = Some("127.0.0.1:9".parse().unwrap());
        let (cfg, certs) = back.into_config(&local).unwrap();
        assert_eq!(cfg.listeners.http, local.listeners.http);
        assert_eq!(cfg.routes.len(), 1);
        assert!(certs.is_empty());
    }

    #[test]
    fn a_snapshot_breaking_the_rules_is_refused_with_paths() {
        let mut snap = snapshot();
        snap.routes[0].action = crate::Action::Forward("missing".into());
        let mut local = Config::default();
        local.listeners.http = Some("127.0.0.1:9".parse().unwrap());
        let issues = snap.clone().into_config(&local).unwrap_err();
        assert!(
            issues
                .iter()
                .any(|i| i.path.to_string().starts_with("routes[0]")),
            "{issues:?}"
        );
        snap.schema = 99;
        let issues = snap.into_config(&local).unwrap_err();
        assert_eq!(issues[0].path.to_string(), "schema");
    }
}
