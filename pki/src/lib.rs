//! Rampart's certificate authorities, kept in a directory: a P-256 root created on first
//! use (key file mode 0600) that issues server certificates for host names and signs the
//! certificate requests of fleet members. Used by the proxy (the internal CA behind
//! `source = "internal"`) and the controller (the fleet CA behind mutual TLS).
//!
//! Also the one place that writes files atomically ([`write_atomic`]): temp file, fsync,
//! rename, so that a crash never leaves half a key or half a snapshot behind.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use anyhow::Context;
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use sha2::{Digest, Sha256};

/// The root is valid for ten years.
const ROOT_LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Certificates are back-dated this much to tolerate clock skew between hosts.
const BACKDATE: Duration = Duration::from_secs(3600);

/// A certificate and its private key, both PEM.
#[derive(Clone, Debug)]
pub struct Issued {
    /// The certificate followed by the CA certificate.
    pub chain_pem: String,
    /// The private key (PKCS#8).
    pub key_pem: String,
}

/// A CA loaded from its directory.
pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    cert_pem: String,
    cert_path: PathBuf,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca")
            .field("cert_path", &self.cert_path)
            .finish_non_exhaustive()
    }
}

impl Ca {
    /// Loads the CA in `dir` (`ca.pem`, `ca.key`), creating it named `name` if absent.
    ///
    /// # Errors
    /// When the directory cannot be created or the files are unreadable or corrupt.
    pub fn load_or_create(dir: &Path, name: &str) -> anyhow::Result<Self> {
        let cert_path = dir.join("ca.pem");
        let key_path = dir.join("ca.key");
        if !cert_path.exists() || !key_path.exists() {
            let (cert_pem, key_pem) = create_root(name)?;
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
            write_atomic(&key_path, key_pem.as_bytes(), Mode::Private)?;
            write_atomic(&cert_path, cert_pem.as_bytes(), Mode::Public)?;
        }
        let cert_pem = std::fs::read_to_string(&cert_path)
            .with_context(|| format!("reading {}", cert_path.display()))?;
        let key_pem = std::fs::read_to_string(&key_path)
            .with_context(|| format!("reading {}", key_path.display()))?;
        Self::from_pem(&cert_pem, &key_pem, cert_path)
    }

    /// A CA from its PEM certificate and key (as kept in a remote store).
    ///
    /// # Errors
    /// When either does not parse.
    pub fn from_pem(cert_pem: &str, key_pem: &str, cert_path: PathBuf) -> anyhow::Result<Self> {
        let key = KeyPair::from_pem(key_pem).context("parsing the CA key")?;
        let issuer =
            Issuer::from_ca_cert_pem(cert_pem, key).context("parsing the CA certificate")?;
        Ok(Self {
            issuer,
            cert_pem: cert_pem.to_string(),
            cert_path,
        })
    }

    /// A new root as PEM (certificate, key), for stores that are not a directory.
    ///
    /// # Errors
    /// When key generation or signing fails.
    pub fn new_root_pem(name: &str) -> anyhow::Result<(String, String)> {
        create_root(name)
    }

    /// Where the CA certificate (to be trusted by clients) is.
    #[must_use]
    pub fn cert_path(&self) -> &Path {
        &self.cert_path
    }

    /// The CA certificate, PEM.
    #[must_use]
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// SHA-256 of the CA certificate (DER), lowercase hex: what join tokens pin.
    ///
    /// # Errors
    /// When the stored certificate is not valid PEM.
    pub fn fingerprint(&self) -> anyhow::Result<String> {
        fingerprint_pem(&self.cert_pem)
    }

    /// A server certificate for `hosts` (DNS names, `*.suffix` or IP addresses) valid for
    /// `lifetime`, with a fresh key.
    ///
    /// # Errors
    /// When a host is not a valid name for a certificate.
    pub fn issue_server(&self, hosts: &[String], lifetime: Duration) -> anyhow::Result<Issued> {
        let mut params = CertificateParams::default();
        params.subject_alt_names = hosts
            .iter()
            .map(|h| match h.parse::<std::net::IpAddr>() {
                Ok(ip) => Ok(SanType::IpAddress(ip)),
                Err(_) => Ok(SanType::DnsName(h.clone().try_into()?)),
            })
            .collect::<Result<_, rcgen::Error>>()
            .context("invalid host name for a certificate")?;
        params.distinguished_name.push(
            DnType::CommonName,
            hosts.first().cloned().unwrap_or_default(),
        );
        set_validity(&mut params, lifetime);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let key = KeyPair::generate().context("generating a key")?;
        let cert = params
            .signed_by(&key, &self.issuer)
            .context("signing the certificate")?;
        Ok(Issued {
            chain_pem: format!("{}{}", cert.pem(), self.cert_pem),
            key_pem: key.serialize_pem(),
        })
    }

    /// Signs a certificate request (PEM) as a client certificate for `identity`: the
    /// subject and names the requester asked for are replaced, so a member cannot choose
    /// its own identity.
    ///
    /// # Errors
    /// When the request does not parse or its signature is invalid.
    pub fn sign_client(
        &self,
        csr_pem: &str,
        identity: &str,
        lifetime: Duration,
    ) -> anyhow::Result<String> {
        let mut csr = CertificateSigningRequestParams::from_pem(csr_pem)
            .context("the certificate request is not a valid PEM CSR")?;
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, identity);
        params.subject_alt_names = vec![SanType::DnsName(
            identity
                .to_string()
                .try_into()
                .context("identity is not a valid DNS label")?,
        )];
        set_validity(&mut params, lifetime);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        csr.params = params;
        let cert = csr
            .signed_by(&self.issuer)
            .context("signing the certificate request")?;
        Ok(cert.pem())
    }
}

/// A fresh key and a certificate request for it (PEM key, PEM CSR).
///
/// # Errors
/// When key generation or serialisation fails.
pub fn new_request(name: &str) -> anyhow::Result<(String, String)> {
    let key = KeyPair::generate().context("generating a key")?;
    let mut params = CertificateParams::default();
    params.distinguished_name.push(DnType::CommonName, name);
    let csr = params
        .serialize_request(&key)
        .context("creating the certificate request")?;
    Ok((key.serialize_pem(), csr.pem().context("encoding the CSR")?))
}

/// SHA-256 of the first certificate in `pem` (DER), lowercase hex.
///
/// # Errors
/// When `pem` holds no certificate.
pub fn fingerprint_pem(pem: &str) -> anyhow::Result<String> {
    let (_, block) = x509_parser::pem::parse_x509_pem(pem.as_bytes())
        .map_err(|e| anyhow::anyhow!("not a PEM certificate: {e}"))?;
    Ok(fingerprint_der(&block.contents))
}

/// SHA-256 of a DER certificate, lowercase hex.
#[must_use]
pub fn fingerprint_der(der: &[u8]) -> String {
    hex(&Sha256::digest(der))
}

/// SHA-256 of `data`, lowercase hex (for secrets that are stored hashed).
#[must_use]
pub fn sha256_hex(data: &[u8]) -> String {
    hex(&Sha256::digest(data))
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes.iter().fold(String::new(), |mut s, b| {
        // Writing to a String cannot fail.
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// The validity (not before, not after; Unix seconds) of the first certificate in `pem`.
///
/// # Errors
/// When `pem` holds no parsable certificate.
pub fn validity_pem(pem: &str) -> anyhow::Result<(u64, u64)> {
    let (_, block) = x509_parser::pem::parse_x509_pem(pem.as_bytes())
        .map_err(|e| anyhow::anyhow!("not a PEM certificate: {e}"))?;
    let (_, cert) = x509_parser::parse_x509_certificate(&block.contents)
        .map_err(|e| anyhow::anyhow!("not an X.509 certificate: {e}"))?;
    let v = cert.validity();
    let secs = |t: x509_parser::time::ASN1Time| u64::try_from(t.timestamp()).unwrap_or(0);
    Ok((secs(v.not_before), secs(v.not_after)))
}

/// The issuer (distinguished name) of the first certificate in `pem`.
///
/// # Errors
/// When `pem` holds no parsable certificate.
pub fn issuer_pem(pem: &str) -> anyhow::Result<String> {
    let (_, block) = x509_parser::pem::parse_x509_pem(pem.as_bytes())
        .map_err(|e| anyhow::anyhow!("not a PEM certificate: {e}"))?;
    let (_, cert) = x509_parser::parse_x509_certificate(&block.contents)
        .map_err(|e| anyhow::anyhow!("not an X.509 certificate: {e}"))?;
    Ok(cert.issuer().to_string())
}

/// A new private key (PEM) and a CSR (DER) for a server certificate covering `names`,
/// for an ACME order.
///
/// # Errors
/// When a name is not a valid DNS name.
pub fn server_request(names: &[String]) -> anyhow::Result<(String, Vec<u8>)> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(names.to_vec())?;
    params.distinguished_name = rcgen::DistinguishedName::new();
    let csr = params.serialize_request(&key)?;
    Ok((key.serialize_pem(), csr.der().to_vec()))
}

/// The common name of the first certificate in a DER chain (a fleet member's identity).
#[must_use]
pub fn common_name(der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let cn = cert.subject().iter_common_name().next()?;
    cn.as_str().ok().map(str::to_string)
}

fn set_validity(params: &mut CertificateParams, lifetime: Duration) {
    let now = SystemTime::now();
    params.not_before = (now - BACKDATE).into();
    params.not_after = (now + lifetime).into();
}

fn create_root(name: &str) -> anyhow::Result<(String, String)> {
    let mut params = CertificateParams::default();
    params.distinguished_name.push(DnType::CommonName, name);
    params
        .distinguished_name
        .push(DnType::OrganizationName, "Rampart");
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    set_validity(&mut params, ROOT_LIFETIME);
    let key = KeyPair::generate().context("generating the CA key")?;
    let cert = params.self_signed(&key).context("self-signing the CA")?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// Who may read a file written by [`write_atomic`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Owner only (0600): keys, tokens, snapshots holding keys.
    Private,
    /// Everyone (0644): certificates.
    Public,
}

/// Writes `contents` to `path` atomically: a temp file beside it, fsync, rename, then
/// fsync of the directory, so that readers and crashes see the old or the new file whole.
///
/// # Errors
/// When any step fails; the message names the file.
pub fn write_atomic(path: &Path, contents: &[u8], mode: Mode) -> anyhow::Result<()> {
    let tmp = path.with_extension(format!(
        "tmp.{}.{:?}",
        std::process::id(),
        std::thread::current().id()
    ));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(match mode {
            Mode::Private => 0o600,
            Mode::Public => 0o644,
        })
        .open(&tmp)
        .with_context(|| format!("creating {}", tmp.display()))?;
    f.write_all(contents)
        .and_then(|()| f.sync_all())
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path)
        .with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        // Persist the rename itself; a directory that cannot be opened is not fatal.
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ca_survives_a_restart_and_signs_requests_with_the_identity_it_chooses() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::load_or_create(dir.path(), "test CA").unwrap();
        let again = Ca::load_or_create(dir.path(), "test CA").unwrap();
        assert_eq!(ca.fingerprint().unwrap(), again.fingerprint().unwrap());

        let (_key, csr) = new_request("i-want-to-be-admin").unwrap();
        let cert = ca
            .sign_client(&csr, "inst-1", Duration::from_secs(60))
            .unwrap();
        let (_, block) = x509_parser::pem::parse_x509_pem(cert.as_bytes()).unwrap();
        assert_eq!(common_name(&block.contents).as_deref(), Some("inst-1"));
    }

    #[test]
    fn server_certificates_carry_names_and_ips() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::load_or_create(dir.path(), "test CA").unwrap();
        let issued = ca
            .issue_server(
                &["example.test".into(), "127.0.0.1".into()],
                Duration::from_secs(60),
            )
            .unwrap();
        assert_eq!(issued.chain_pem.matches("BEGIN CERTIFICATE").count(), 2);
        assert!(ca
            .issue_server(&["bücher.example".into()], Duration::from_secs(60))
            .is_err());
    }

    #[test]
    fn atomic_writes_replace_whole_files_with_the_requested_mode() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("secret");
        write_atomic(&p, b"one", Mode::Private).unwrap();
        write_atomic(&p, b"two", Mode::Private).unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        assert_eq!(
            std::fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}

/// A TLS client certificate verifier that accepts any server certificate (still
/// checking the handshake signatures): for `rampart-loadtest --insecure` and the DNS
/// probe, which test a listener, not who signed its certificate.
#[derive(Debug)]
pub struct AcceptAnyServerCert(std::sync::Arc<rustls::crypto::CryptoProvider>);

impl Default for AcceptAnyServerCert {
    fn default() -> Self {
        Self::new()
    }
}

impl AcceptAnyServerCert {
    /// With the process-wide crypto provider (aws-lc-rs).
    #[must_use]
    pub fn new() -> Self {
        Self(
            rustls::crypto::CryptoProvider::get_default()
                .cloned()
                .unwrap_or_else(|| {
                    std::sync::Arc::new(rustls::crypto::aws_lc_rs::default_provider())
                }),
        )
    }
}

impl rustls::client::danger::ServerCertVerifier for AcceptAnyServerCert {
    fn verify_server_cert(
        &self,
        _end_entity: &rustls::pki_types::CertificateDer<'_>,
        _intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// The certificate that answers an ACME TLS-ALPN-01 challenge for `name` (RFC 8737):
/// self-signed, for `name` only, with the critical `acmeIdentifier` extension holding
/// `digest` (SHA-256 of the key authorization). Returns the certificate and its
/// private key (PKCS#8), DER.
///
/// # Errors
/// When `digest` is not 32 bytes or the certificate cannot be made.
pub fn acme_tls_alpn_cert(name: &str, digest: &[u8]) -> anyhow::Result<(Vec<u8>, Vec<u8>)> {
    anyhow::ensure!(
        digest.len() == 32,
        "a TLS-ALPN-01 digest is 32 bytes, got {}",
        digest.len()
    );
    let key = rcgen::KeyPair::generate()?;
    let mut params = rcgen::CertificateParams::new(vec![name.to_string()])?;
    params.custom_extensions = vec![rcgen::CustomExtension::new_acme_identifier(digest)];
    let cert = params.self_signed(&key)?;
    Ok((cert.der().to_vec(), key.serialize_der()))
}
