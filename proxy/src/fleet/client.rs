//! The proxy's side of the fleet API as a plain client: enrol with a join token
//! (trusting the controller by the CA fingerprint the token pins), then watch, ack and
//! heartbeat with the client certificate received. No Pingora here, so tests and
//! benchmarks can run many clients in one process.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use rampart_config::snapshot::{
    Ack, EnrollRequest, EnrollResponse, Heartbeat, JoinToken, OnDemandAnswer, OnDemandRequest,
    RenewRequest,
};
use rampart_pki::{write_atomic, Mode};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use serde::{Deserialize, Serialize};

/// What a proxy received at enrolment; kept in `<data_dir>/fleet/identity.json` (0600).
#[derive(Clone, Serialize, Deserialize)]
pub struct Identity {
    /// Instance id given by the controller.
    pub instance: String,
    /// Client certificate, PEM.
    pub cert_pem: String,
    /// Private key of the certificate, PEM.
    pub key_pem: String,
    /// Fleet CA, PEM.
    pub ca_pem: String,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("instance", &self.instance)
            .finish_non_exhaustive()
    }
}

impl Identity {
    /// Whether less than a third of the certificate's lifetime is left (or it does not
    /// parse): time to renew.
    #[must_use]
    pub fn renewal_due(&self) -> bool {
        let Ok((_, pem)) = x509_parser::pem::parse_x509_pem(self.cert_pem.as_bytes()) else {
            return true;
        };
        let Ok(cert) = pem.parse_x509() else {
            return true;
        };
        let validity = cert.validity();
        let (start, end) = (
            validity.not_before.timestamp(),
            validity.not_after.timestamp(),
        );
        let now = rampart_config::unix_now_signed();
        end - now < (end - start) / 3
    }

    /// The identity stored in `data_dir`, if the proxy enrolled before.
    ///
    /// # Errors
    /// When the file exists but cannot be read or parsed.
    pub fn load(data_dir: &Path) -> anyhow::Result<Option<Self>> {
        let path = data_dir.join("fleet").join("identity.json");
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map(Some).with_context(|| {
                format!("{} is corrupt; remove it and enrol again", path.display())
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(anyhow::Error::new(e).context(format!("reading {}", path.display()))),
        }
    }

    /// Removes the identity stored in `data_dir` (the controller forgot it), so that
    /// the proxy enrols again.
    ///
    /// # Errors
    /// When the file exists and cannot be removed.
    pub fn remove(data_dir: &Path) -> anyhow::Result<()> {
        let path = data_dir.join("fleet").join("identity.json");
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(anyhow::Error::new(e).context(format!("removing {}", path.display())))
            }
            _ => Ok(()),
        }
    }

    /// Stores this identity in `data_dir`.
    ///
    /// # Errors
    /// When the file cannot be written.
    pub fn save(&self, data_dir: &Path) -> anyhow::Result<()> {
        let dir = data_dir.join("fleet");
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        write_atomic(
            &dir.join("identity.json"),
            &serde_json::to_vec(self)?,
            Mode::Private,
        )
    }
}

/// Why a fleet call did not succeed.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// The controller answered with an error status; retrying will not help without a fix.
    #[error("controller refused ({status}): {message}")]
    Refused {
        /// HTTP status.
        status: u16,
        /// The controller's explanation.
        message: String,
        /// The controller's machine-readable reason, when it gave one
        /// (`not_enrolled`: this identity is unknown there; enrol again).
        code: Option<String>,
    },
    /// The controller could not be reached or answered garbage: retry later.
    #[error("controller unreachable: {0:#}")]
    Unreachable(anyhow::Error),
}

/// What a watch returned.
#[derive(Debug)]
pub enum WatchResult {
    /// A snapshot (its version from the header, and the raw JSON to decode).
    Snapshot {
        /// Version announced by the controller.
        version: u64,
        /// The encoded snapshot.
        body: bytes::Bytes,
    },
    /// Nothing new within the controller's watch timeout.
    NoChange,
}

/// Enrols with a join token: creates a key, sends a CSR, returns the identity.
///
/// # Errors
/// [`CallError::Refused`] for a bad, used or expired token; `Unreachable` otherwise.
pub async fn enroll(controller: &str, token: &str, hostname: &str) -> Result<Identity, CallError> {
    let pin = JoinToken::parse(token)
        .ok_or_else(|| CallError::Refused {
            status: 0,
            message: "the join token is malformed (expected rmp1.<id>.<secret>.<ca-hash> as printed by `rampart controller token create`)".into(),
            code: None,
        })?
        .ca_sha256;
    let tls = rustls::ClientConfig::builder()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(PinnedCa { pin }))
        .with_no_client_auth();
    let client = http_client(tls, Duration::from_secs(15)).map_err(CallError::Unreachable)?;
    let (key_pem, csr_pem) = rampart_pki::new_request(hostname).map_err(CallError::Unreachable)?;
    let request = EnrollRequest {
        token: token.trim().to_string(),
        csr_pem,
        hostname: hostname.to_string(),
    };
    let url = format!("{}/v1/enroll", controller.trim_end_matches('/'));
    identity_from(post_json(&client, url, &request).await?, key_pem).await
}

/// Posts `body` as JSON; a success status or the controller's error.
async fn post_json<T: Serialize + Sync>(
    client: &reqwest::Client,
    url: String,
    body: &T,
) -> Result<reqwest::Response, CallError> {
    let resp = client
        .post(url)
        .json(body)
        .send()
        .await
        .map_err(|e| CallError::Unreachable(e.into()))?;
    check(resp).await
}

/// The identity in an enrolment or renewal answer, with the key the CSR was made for.
async fn identity_from(resp: reqwest::Response, key_pem: String) -> Result<Identity, CallError> {
    let body: EnrollResponse = resp
        .json()
        .await
        .map_err(|e| CallError::Unreachable(e.into()))?;
    Ok(Identity {
        instance: body.instance,
        cert_pem: body.cert_pem,
        key_pem,
        ca_pem: body.ca_pem,
    })
}

async fn check(resp: reqwest::Response) -> Result<reqwest::Response, CallError> {
    let status = resp.status();
    if status.is_success() {
        return Ok(resp);
    }
    let text = resp.text().await.unwrap_or_default();
    let parsed = serde_json::from_str::<serde_json::Value>(&text).ok();
    let field = |name: &str| {
        parsed
            .as_ref()
            .and_then(|v| v.get(name))
            .and_then(|e| e.as_str())
            .map(str::to_string)
    };
    let code = field("code");
    let message = field("error").unwrap_or(text);
    if status.is_server_error() {
        return Err(CallError::Unreachable(anyhow!("{status}: {message}")));
    }
    Err(CallError::Refused {
        status: status.as_u16(),
        message,
        code,
    })
}

fn http_client(tls: rustls::ClientConfig, timeout: Duration) -> anyhow::Result<reqwest::Client> {
    reqwest::Client::builder()
        .use_preconfigured_tls(tls)
        .timeout(timeout)
        .connect_timeout(Duration::from_secs(5))
        .pool_idle_timeout(Duration::from_secs(90))
        .build()
        .context("building the fleet HTTP client")
}

/// An enrolled proxy's connection to the controller.
#[derive(Debug, Clone)]
pub struct FleetClient {
    base: String,
    client: reqwest::Client,
    /// This proxy's identity.
    pub identity: Arc<Identity>,
}

impl FleetClient {
    /// A client of `controller` (https URL) authenticating as `identity`; watches may
    /// wait up to `watch_timeout` on the controller side.
    ///
    /// # Errors
    /// When the stored certificates do not parse.
    pub fn new(
        controller: &str,
        identity: Identity,
        watch_timeout: Duration,
    ) -> anyhow::Result<Self> {
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_slice(identity.ca_pem.as_bytes()).context("fleet CA")?)
            .context("fleet CA")?;
        let chain = CertificateDer::pem_slice_iter(identity.cert_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .context("client certificate")?;
        let key =
            PrivateKeyDer::from_pem_slice(identity.key_pem.as_bytes()).context("client key")?;
        let tls = rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)
            .context("client certificate and key do not match")?;
        Ok(Self {
            base: controller.trim_end_matches('/').to_string(),
            client: http_client(tls, watch_timeout + Duration::from_secs(15))?,
            identity: Arc::new(identity),
        })
    }

    /// Waits for a snapshot whose version is not `after`.
    ///
    /// # Errors
    /// See [`CallError`].
    pub async fn watch(&self, after: u64) -> Result<WatchResult, CallError> {
        let resp = self
            .client
            .get(format!("{}/v1/watch?after={after}", self.base))
            .send()
            .await
            .map_err(|e| CallError::Unreachable(e.into()))?;
        let resp = check(resp).await?;
        if resp.status() == reqwest::StatusCode::NO_CONTENT {
            return Ok(WatchResult::NoChange);
        }
        let version = resp
            .headers()
            .get("rampart-version")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let body = resp
            .bytes()
            .await
            .map_err(|e| CallError::Unreachable(e.into()))?;
        Ok(WatchResult::Snapshot { version, body })
    }

    /// Reports what was done with a snapshot.
    ///
    /// # Errors
    /// See [`CallError`].
    pub async fn ack(&self, ack: &Ack) -> Result<(), CallError> {
        self.post("/v1/ack", ack).await
    }

    /// Gets a new certificate for a new key (same identity); returns the new identity.
    ///
    /// # Errors
    /// See [`CallError`].
    pub async fn renew(&self) -> Result<Identity, CallError> {
        let (key_pem, csr_pem) =
            rampart_pki::new_request(&self.identity.instance).map_err(CallError::Unreachable)?;
        let url = format!("{}/v1/renew", self.base);
        let resp = post_json(&self.client, url, &RenewRequest { csr_pem }).await?;
        identity_from(resp, key_pem).await
    }

    /// Asks for the certificate of `name`, seen in a handshake (on-demand TLS).
    ///
    /// # Errors
    /// See [`CallError`].
    pub async fn on_demand(&self, name: &str) -> Result<OnDemandAnswer, CallError> {
        let url = format!("{}/v1/on-demand", self.base);
        let request = OnDemandRequest {
            name: name.to_string(),
        };
        post_json(&self.client, url, &request)
            .await?
            .json()
            .await
            .map_err(|e| CallError::Unreachable(e.into()))
    }

    /// Says this proxy is alive.
    ///
    /// # Errors
    /// See [`CallError`].
    pub async fn heartbeat(&self, hb: &Heartbeat) -> Result<(), CallError> {
        self.post("/v1/heartbeat", hb).await
    }

    async fn post<T: Serialize + Sync>(&self, path: &str, body: &T) -> Result<(), CallError> {
        post_json(&self.client, format!("{}{path}", self.base), body)
            .await
            .map(drop)
    }
}

/// Trusts a server whose chain carries the CA with the pinned SHA-256 and whose leaf
/// that CA signed for the name connected to. Used only to enrol.
#[derive(Debug)]
struct PinnedCa {
    pin: String,
}

impl ServerCertVerifier for PinnedCa {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let ca = intermediates
            .iter()
            .find(|c| rampart_pki::fingerprint_der(c) == self.pin)
            .ok_or_else(|| {
                rustls::Error::General(
                    "the controller's CA does not match the join token (wrong controller, or a token from another one)".into(),
                )
            })?;
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca.clone().into_owned())?;
        let inner = WebPkiServerVerifier::builder(Arc::new(roots))
            .build()
            .map_err(|e| rustls::Error::General(e.to_string()))?;
        inner.verify_server_cert(end_entity, &[], server_name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &algorithms())
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &algorithms())
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        algorithms().supported_schemes()
    }
}

fn algorithms() -> rustls::crypto::WebPkiSupportedAlgorithms {
    rustls::crypto::CryptoProvider::get_default().map_or_else(
        || rustls::crypto::aws_lc_rs::default_provider().signature_verification_algorithms,
        |p| p.signature_verification_algorithms,
    )
}

/// Checks a controller URL before anything is attempted with it.
///
/// # Errors
/// When it is not an `https://host:port` URL.
pub fn check_url(url: &str) -> anyhow::Result<()> {
    let rest = url.strip_prefix("https://").ok_or_else(|| {
        anyhow!("--controller {url}: the fleet API is HTTPS only; use https://HOST:PORT")
    })?;
    if rest.trim_end_matches('/').is_empty() {
        bail!("--controller {url}: no host; use https://HOST:PORT");
    }
    Ok(())
}
