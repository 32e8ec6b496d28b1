//! Client certificate authentication (mutual TLS) per `[[tls]]` entry: the verifier
//! that a handshake for the entry's hosts uses, and what a verified certificate tells
//! the upstream.
//!
//! A connection's certificate counts only for hosts of the policy that verified it: a
//! client that shakes hands for one name and then asks for another (HTTP/2 connection
//! coalescing, or on purpose) is not authenticated there.

use std::fmt;
use std::sync::{Arc, OnceLock};

use anyhow::Context as _;
use http::header::HeaderName;
use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use rampart_config::snapshot::ClientAuthBundle;
use rampart_config::{CertField, ClientAuthMode};
use rustls::server::danger::ClientCertVerifier;
use rustls::server::WebPkiClientVerifier;
use x509_parser::extensions::GeneralName;

/// One `client_auth` of a generation, ready for handshakes.
pub struct ClientAuthRt {
    /// Identifies the policy (its CA and mode): a certificate verified under one
    /// policy does not authenticate requests for the hosts of another.
    pub id: u64,
    /// Whether the handshake requires a certificate.
    pub mode: ClientAuthMode,
    /// The headers that carry a verified certificate upstream.
    pub headers: Vec<(CertField, HeaderName)>,
    verifier: Arc<dyn ClientCertVerifier>,
    /// The listener's configuration with this verifier, made at its first handshake.
    config: OnceLock<Arc<rustls::ServerConfig>>,
}

impl fmt::Debug for ClientAuthRt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientAuthRt")
            .field("id", &self.id)
            .field("mode", &self.mode)
            .finish_non_exhaustive()
    }
}

impl ClientAuthRt {
    /// The policy of `bundle`.
    ///
    /// # Errors
    /// When the CA PEM holds no certificate or one the verifier refuses.
    pub fn new(bundle: &ClientAuthBundle) -> anyhow::Result<Self> {
        let mut roots = rustls::RootCertStore::empty();
        let mut found = 0;
        for cert in rustls_pemfile::certs(&mut bundle.ca_pem.as_bytes()) {
            let cert = cert.context("the client CA file is not PEM")?;
            roots
                .add(cert)
                .context("a certificate of the client CA file is not a usable CA")?;
            found += 1;
        }
        anyhow::ensure!(
            found > 0,
            "the client CA file holds no certificate (expected PEM blocks \"BEGIN CERTIFICATE\")"
        );
        let builder = WebPkiClientVerifier::builder(Arc::new(roots));
        let verifier = match bundle.mode {
            ClientAuthMode::Require => builder.build(),
            ClientAuthMode::Optional => builder.allow_unauthenticated().build(),
        }
        .context("building the client certificate verifier")?;
        let headers = bundle
            .headers
            .named()
            .map(|(field, name)| {
                HeaderName::from_bytes(name.as_bytes())
                    .map(|n| (field, n))
                    .with_context(|| format!("{name:?} is not a header name"))
            })
            .collect::<anyhow::Result<_>>()?;
        let mut id = xxhash_rust::xxh3::Xxh3::new();
        id.update(bundle.ca_pem.as_bytes());
        id.update(&[u8::from(bundle.mode == ClientAuthMode::Require)]);
        Ok(Self {
            id: id.digest(),
            mode: bundle.mode,
            headers,
            verifier,
            config: OnceLock::new(),
        })
    }

    /// The listener's configuration for this policy's hosts, made once from the
    /// verifier by `make`.
    pub fn server_config(
        &self,
        make: impl FnOnce(Arc<dyn ClientCertVerifier>) -> Arc<rustls::ServerConfig>,
    ) -> Arc<rustls::ServerConfig> {
        self.config
            .get_or_init(|| make(self.verifier.clone()))
            .clone()
    }

    /// Whether a header carries the PEM (which is then kept per connection).
    fn wants_pem(&self) -> bool {
        self.headers.iter().any(|(f, _)| *f == CertField::Pem)
    }
}

/// What a verified client certificate tells the upstream, worked out once per
/// connection.
#[derive(Debug)]
pub struct ClientCert {
    /// The [`ClientAuthRt::id`] of the policy that verified it.
    pub policy: u64,
    /// The subject's distinguished name.
    pub subject: String,
    /// The subject alternative names (`DNS:…`, `email:…`, `URI:…`, `IP:…`).
    pub sans: String,
    /// SHA-256 of the DER certificate, lowercase hex.
    pub fingerprint: String,
    /// The PEM, URL-encoded (only when a header carries it).
    pub pem: Option<String>,
}

/// What URL-encoding leaves of a PEM: letters, digits and `-_.~` (RFC 3986 unreserved).
const PEM_ESCAPED: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');

/// `der` as a PEM certificate, in lines of 64 characters.
fn certificate_pem(der: &[u8]) -> String {
    use base64::Engine as _;
    let text = base64::engine::general_purpose::STANDARD.encode(der);
    let mut pem = String::from("-----BEGIN CERTIFICATE-----\n");
    for line in text.as_bytes().chunks(64) {
        pem.push_str(std::str::from_utf8(line).unwrap_or_default());
        pem.push('\n');
    }
    pem.push_str("-----END CERTIFICATE-----\n");
    pem
}

impl ClientCert {
    /// The details of the leaf `der` that `auth` verified; `None` when it does not
    /// parse (the verifier parsed it, so this does not happen).
    #[must_use]
    pub fn of(der: &[u8], auth: &ClientAuthRt) -> Option<Self> {
        let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
        let mut sans = Vec::new();
        if let Ok(Some(ext)) = cert.subject_alternative_name() {
            for name in &ext.value.general_names {
                match name {
                    GeneralName::DNSName(d) => sans.push(format!("DNS:{d}")),
                    GeneralName::RFC822Name(m) => sans.push(format!("email:{m}")),
                    GeneralName::URI(u) => sans.push(format!("URI:{u}")),
                    GeneralName::IPAddress(ip) => match ip.len() {
                        4 => sans.push(format!(
                            "IP:{}",
                            std::net::Ipv4Addr::from(<[u8; 4]>::try_from(*ip).ok()?)
                        )),
                        16 => sans.push(format!(
                            "IP:{}",
                            std::net::Ipv6Addr::from(<[u8; 16]>::try_from(*ip).ok()?)
                        )),
                        _ => {}
                    },
                    _ => {}
                }
            }
        }
        let fingerprint = rampart_pki::fingerprint_der(der);
        let pem = auth
            .wants_pem()
            .then(|| utf8_percent_encode(&certificate_pem(der), PEM_ESCAPED).to_string());
        Some(Self {
            policy: auth.id,
            subject: crate::headers::printable(&cert.subject().to_string()),
            sans: crate::headers::printable(&sans.join(",")),
            fingerprint,
            pem,
        })
    }

    /// The value of `field`.
    #[must_use]
    pub fn value(&self, field: CertField) -> Option<&str> {
        match field {
            CertField::Subject => Some(&self.subject),
            CertField::Sans => Some(&self.sans),
            CertField::Fingerprint => Some(&self.fingerprint),
            CertField::Pem => self.pem.as_deref(),
        }
    }
}
