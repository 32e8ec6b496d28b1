//! TLS termination: certificates by SNI, loaded into memory at build time and resolved
//! synchronously during the handshake (rustls' `ResolvesServerCert` must not do I/O).
//!
//! The certificate set is part of a generation, so a reload swaps routes and
//! certificates together; handshakes already under way finish with the set they
//! started with, new handshakes see the new one.
//!
//! - [`acme_alpn`]: ACME TLS-ALPN-01 answers on this listener
//! - [`client_auth`]: client certificates (mutual TLS) per `[[tls]]` entry
//! - [`conn`]: a client's TLS connection, adapted to Pingora's stream traits
//! - [`files`]: PEM certificate and key files
//! - [`internal_ca`]: Rampart's local CA (rcgen) for `source = "internal"`
//! - [`on_demand`]: certificates asked for at the handshake (`[tls_on_demand]`)
//! - [`tickets`]: session ticket keys, the fleet's or this process's

pub mod acme_alpn;
pub mod client_auth;
pub mod conn;
pub mod files;
pub mod internal_ca;
pub mod on_demand;
pub mod tickets;

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

use crate::generation::Generation;
use crate::metrics::Metrics;
use client_auth::ClientAuthRt;

/// A loaded certificate with what the admin API and metrics show about it.
#[derive(Clone)]
pub struct LoadedCert {
    /// The chain and signing key used in handshakes.
    pub key: Arc<CertifiedKey>,
    /// Not-after of the leaf, in seconds since the Unix epoch.
    pub not_after: i64,
    /// Issuer of the leaf, as a distinguished name string.
    pub issuer: String,
    /// Client certificate authentication of the hosts served with this certificate.
    pub client_auth: Option<Arc<ClientAuthRt>>,
}

impl fmt::Debug for LoadedCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LoadedCert")
            .field("not_after", &self.not_after)
            .field("issuer", &self.issuer)
            .field("client_auth", &self.client_auth)
            .finish_non_exhaustive()
    }
}

/// The certificates of a generation by host name.
#[derive(Clone, Debug, Default)]
pub struct CertSet {
    exact: HashMap<String, LoadedCert>,
    /// Keyed by the suffix after `*.`.
    wildcard: HashMap<String, LoadedCert>,
    default: Option<LoadedCert>,
}

impl CertSet {
    /// Adds `cert` for an exact host name.
    pub fn insert_exact(&mut self, host: &str, cert: LoadedCert) {
        self.exact.insert(host.to_string(), cert);
    }
    /// Adds `cert` for `*.suffix`.
    pub fn insert_wildcard(&mut self, suffix: &str, cert: LoadedCert) {
        self.wildcard.insert(suffix.to_string(), cert);
    }
    /// Sets the certificate for clients without a known SNI.
    pub fn set_default(&mut self, cert: Option<LoadedCert>) {
        self.default = cert;
    }

    /// The certificate for `sni` (exact first, then wildcard), if any.
    #[must_use]
    pub fn lookup(&self, sni: &str) -> Option<&LoadedCert> {
        let sni = sni.trim_end_matches('.').to_ascii_lowercase();
        self.exact.get(&sni).or_else(|| {
            sni.split_once('.')
                .and_then(|(_, parent)| self.wildcard.get(parent))
        })
    }

    /// The certificate for a handshake: by SNI, else the default (or none: the
    /// handshake fails with `unrecognized_name`).
    #[must_use]
    pub fn resolve(&self, sni: Option<&str>) -> Option<&LoadedCert> {
        sni.and_then(|s| self.lookup(s)).or(self.default.as_ref())
    }

    /// Every (name, certificate) pair, wildcards written as `*.suffix`.
    pub fn entries(&self) -> impl Iterator<Item = (String, &LoadedCert)> {
        self.exact
            .iter()
            .map(|(h, c)| (h.clone(), c))
            .chain(self.wildcard.iter().map(|(s, c)| (format!("*.{s}"), c)))
    }
}

/// rustls certificate resolver reading the current generation's [`CertSet`].
pub struct SniResolver {
    current: Arc<ArcSwap<Generation>>,
    metrics: Arc<Metrics>,
}

impl SniResolver {
    /// A resolver over the live generation.
    #[must_use]
    pub fn new(current: Arc<ArcSwap<Generation>>, metrics: Arc<Metrics>) -> Self {
        Self { current, metrics }
    }
}

impl fmt::Debug for SniResolver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SniResolver")
    }
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let generation = self.current.load();
        if !generation.acme_tls_alpn.is_empty() && acme_alpn::is_challenge(hello.alpn()) {
            // A validation is answered with the challenge certificate, or refused.
            let name = hello.server_name()?.to_ascii_lowercase();
            return generation.acme_tls_alpn.get(&name).cloned();
        }
        let found = generation
            .certs
            .resolve(hello.server_name())
            .map(|c| c.key.clone());
        if found.is_none() {
            self.metrics
                .tls_handshake_failures
                .with_label_values(&["unknown_sni"])
                .inc();
        }
        found
    }
}

/// The rustls server configuration of the HTTPS listener: TLS 1.2 and 1.3 with the
/// provider's default (forward-secret) suites in the server's order, ALPN h2 then
/// http/1.1, SNI resolver, session tickets from `ticketer`; client certificates
/// checked by `verifier` when given.
///
/// # Errors
/// When the process-wide crypto provider does not support TLS 1.2/1.3.
pub fn server_config(
    resolver: Arc<SniResolver>,
    ticketer: Arc<tickets::Ticketer>,
    verifier: Option<Arc<dyn rustls::server::danger::ClientCertVerifier>>,
) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    let builder = rustls::ServerConfig::builder_with_protocol_versions(&[
        &rustls::version::TLS13,
        &rustls::version::TLS12,
    ]);
    let mut config = match verifier {
        Some(v) => builder.with_client_cert_verifier(v),
        None => builder.with_no_client_auth(),
    }
    .with_cert_resolver(resolver);
    // acme-tls/1 last: only an ACME validation offers it, and offers nothing else.
    config.alpn_protocols = vec![
        b"h2".to_vec(),
        b"http/1.1".to_vec(),
        acme_alpn::ACME_TLS_1.to_vec(),
    ];
    // The server's suite order (the provider's: AES-GCM, then ChaCha20-Poly1305) wins
    // over the client's, so no client can talk it down to its weakest offer.
    config.ignore_client_order = true;
    // Resumption by ticket, with keys shared by the fleet (or this process's own).
    config.ticketer = ticketer;
    Ok(Arc::new(config))
}

/// The HTTPS listener's handshakes: one configuration for every host, and, while the
/// live generation has `client_auth` somewhere, one per client-auth policy, chosen by
/// the SNI of the ClientHello; under on-demand TLS, a ClientHello for a name without a
/// certificate first waits for one.
pub struct Acceptor {
    plain: tokio_rustls::TlsAcceptor,
    resolver: Arc<SniResolver>,
    ticketer: Arc<tickets::Ticketer>,
    current: Arc<ArcSwap<Generation>>,
    on_demand: Option<Arc<on_demand::OnDemand>>,
}

impl fmt::Debug for Acceptor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Acceptor")
    }
}

/// A handshake begun: with the shared configuration, or with the one chosen after
/// reading the ClientHello (and the client-auth policy it applies, if any).
pub enum Started {
    /// The shared configuration; no client certificate is asked for.
    Plain(tokio_rustls::Accept<pingora::protocols::Stream>),
    /// The configuration the SNI chose.
    Chosen(
        tokio_rustls::StartHandshake<pingora::protocols::Stream>,
        Arc<rustls::ServerConfig>,
        Option<Arc<ClientAuthRt>>,
    ),
}

impl Acceptor {
    /// The acceptor of the live generation's certificates.
    ///
    /// # Errors
    /// As [`server_config`].
    pub fn new(
        current: Arc<ArcSwap<Generation>>,
        metrics: Arc<Metrics>,
        on_demand: Option<Arc<on_demand::OnDemand>>,
    ) -> anyhow::Result<Self> {
        let resolver = Arc::new(SniResolver::new(current.clone(), metrics));
        let ticketer = Arc::new(tickets::Ticketer::new(current.clone()));
        Ok(Self {
            plain: tokio_rustls::TlsAcceptor::from(server_config(
                resolver.clone(),
                ticketer.clone(),
                None,
            )?),
            resolver,
            ticketer,
            current,
            on_demand,
        })
    }

    /// Starts the handshake on `stream`: when the live generation authenticates
    /// clients anywhere, reads the ClientHello first to pick the configuration.
    ///
    /// # Errors
    /// Reading or parsing the ClientHello.
    pub async fn start(&self, stream: pingora::protocols::Stream) -> std::io::Result<Started> {
        {
            let generation = self.current.load();
            if !generation.client_auth_in_use
                && (generation.on_demand.is_none() || self.on_demand.is_none())
            {
                return Ok(Started::Plain(self.plain.accept(stream)));
            }
        }
        let start =
            tokio_rustls::LazyConfigAcceptor::new(rustls::server::Acceptor::default(), stream)
                .await?;
        if let Some(od) = &self.on_demand {
            // `obtain` returns at once for a name with a certificate.
            let hello = start.client_hello();
            let sni = hello
                .server_name()
                .filter(|_| !acme_alpn::is_challenge(hello.alpn()))
                .map(str::to_string);
            if let Some(sni) = sni {
                od.obtain(&self.current, &sni).await;
            }
        }
        let auth = {
            let hello = start.client_hello();
            let generation = self.current.load();
            // An ACME validation (acme-tls/1) is not asked for a client certificate.
            if acme_alpn::is_challenge(hello.alpn()) {
                None
            } else {
                generation
                    .certs
                    .resolve(hello.server_name())
                    .and_then(|c| c.client_auth.clone())
            }
        };
        let config = match &auth {
            Some(auth) => auth.server_config(|verifier| {
                server_config(self.resolver.clone(), self.ticketer.clone(), Some(verifier))
                    .expect("the provider was checked when the listener started")
            }),
            None => self.plain.config().clone(),
        };
        Ok(Started::Chosen(start, config, auth))
    }
}

/// Builds a rustls signing key from a DER private key with the installed provider.
///
/// # Errors
/// When the key type is not supported.
pub fn certified_key(
    chain: Vec<rustls::pki_types::CertificateDer<'static>>,
    key: &rustls::pki_types::PrivateKeyDer<'static>,
) -> anyhow::Result<CertifiedKey> {
    let provider = rustls::crypto::CryptoProvider::get_default()
        .ok_or_else(|| anyhow::anyhow!("no rustls crypto provider installed (call rampart_proxy::install_crypto_provider first)"))?;
    let signing = provider.key_provider.load_private_key(key.clone_key())?;
    let ck = CertifiedKey::new(chain, signing);
    ck.keys_match()
        .map_err(|e| anyhow::anyhow!("certificate and private key do not belong together: {e}"))?;
    Ok(ck)
}

/// Reads not-after and issuer of a DER leaf certificate.
///
/// # Errors
/// When the certificate cannot be parsed.
pub fn describe(leaf: &[u8]) -> anyhow::Result<(i64, String)> {
    let (_, cert) = x509_parser::parse_x509_certificate(leaf)
        .map_err(|e| anyhow::anyhow!("parsing certificate: {e}"))?;
    Ok((
        cert.validity().not_after.timestamp(),
        cert.issuer().to_string(),
    ))
}
