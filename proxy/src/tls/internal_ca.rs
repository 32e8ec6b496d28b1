//! Rampart's internal CA for `source = "internal"`: a P-256 root kept in
//! `<data_dir>/ca/` (created on first use, key file mode 0600) that issues short-lived
//! leaf certificates for configured names. Clients trust `<data_dir>/ca/ca.pem`.
//!
//! Leaves are issued in memory at build time and cached per host list for the life of
//! the process, so reloads do not churn certificates.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use anyhow::Context;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};

use super::{files, LoadedCert};

/// Leaf certificates are valid this long (and re-issued at start after half of it).
const LEAF_LIFETIME: Duration = Duration::from_secs(30 * 24 * 3600);
/// The root is valid for ten years.
const ROOT_LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// A loaded internal CA with its cache of issued leaves.
pub struct InternalCa {
    issuer: Issuer<'static, KeyPair>,
    cert_path: PathBuf,
    leaves: Mutex<HashMap<Vec<String>, LoadedCert>>,
}

impl std::fmt::Debug for InternalCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InternalCa")
            .field("cert_path", &self.cert_path)
            .finish_non_exhaustive()
    }
}

impl InternalCa {
    /// Loads the CA from `<data_dir>/ca/`, creating it if absent.
    ///
    /// # Errors
    /// When the directory cannot be created or the files are unreadable or corrupt.
    pub fn load_or_create(data_dir: &Path) -> anyhow::Result<Self> {
        let dir = data_dir.join("ca");
        let cert_path = dir.join("ca.pem");
        let key_path = dir.join("ca.key");
        if !cert_path.exists() || !key_path.exists() {
            create(&dir, &cert_path, &key_path)?;
        }
        let cert_pem = std::fs::read_to_string(&cert_path)
            .with_context(|| format!("reading {}", cert_path.display()))?;
        let key_pem = std::fs::read_to_string(&key_path)
            .with_context(|| format!("reading {}", key_path.display()))?;
        let key = KeyPair::from_pem(&key_pem)
            .with_context(|| format!("parsing CA key {}", key_path.display()))?;
        let issuer = Issuer::from_ca_cert_pem(&cert_pem, key)
            .with_context(|| format!("parsing CA certificate {}", cert_path.display()))?;
        Ok(Self {
            issuer,
            cert_path,
            leaves: Mutex::new(HashMap::new()),
        })
    }

    /// Where the CA certificate (to be trusted by clients) is.
    #[must_use]
    pub fn cert_path(&self) -> &Path {
        &self.cert_path
    }

    /// A certificate for `hosts` (names or `*.suffix`), issued once per process.
    ///
    /// # Errors
    /// When issuing fails (invalid names).
    pub fn leaf(&self, hosts: &[String]) -> anyhow::Result<LoadedCert> {
        let mut leaves = self
            .leaves
            .lock()
            .expect("leaf cache lock is never poisoned: no panics while held");
        if let Some(c) = leaves.get(hosts) {
            return Ok(c.clone());
        }
        let cert = self.issue(hosts)?;
        leaves.insert(hosts.to_vec(), cert.clone());
        Ok(cert)
    }

    fn issue(&self, hosts: &[String]) -> anyhow::Result<LoadedCert> {
        let mut params = CertificateParams::new(hosts.to_vec())
            .context("invalid host name for a certificate")?;
        params.subject_alt_names = hosts
            .iter()
            .map(|h| match h.parse::<std::net::IpAddr>() {
                Ok(ip) => Ok(SanType::IpAddress(ip)),
                Err(_) => Ok(SanType::DnsName(h.clone().try_into()?)),
            })
            .collect::<Result<_, rcgen::Error>>()?;
        params.distinguished_name.push(
            DnType::CommonName,
            hosts.first().cloned().unwrap_or_default(),
        );
        let now = SystemTime::now();
        params.not_before = (now - Duration::from_secs(3600)).into();
        params.not_after = (now + LEAF_LIFETIME).into();
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let key = KeyPair::generate().context("generating a leaf key")?;
        let cert = params
            .signed_by(&key, &self.issuer)
            .context("signing the leaf certificate")?;
        let chain_pem = cert.pem();
        files::from_pem(chain_pem.as_bytes(), key.serialize_pem().as_bytes())
    }
}

fn create(dir: &Path, cert_path: &Path, key_path: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut params = CertificateParams::default();
    params
        .distinguished_name
        .push(DnType::CommonName, "Rampart internal CA");
    params
        .distinguished_name
        .push(DnType::OrganizationName, "Rampart");
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let now = SystemTime::now();
    params.not_before = (now - Duration::from_secs(3600)).into();
    params.not_after = (now + ROOT_LIFETIME).into();
    let key = KeyPair::generate().context("generating the CA key")?;
    let cert = params.self_signed(&key).context("self-signing the CA")?;
    write_private(key_path, key.serialize_pem().as_bytes())?;
    std::fs::write(cert_path, cert.pem())
        .with_context(|| format!("writing {}", cert_path.display()))?;
    Ok(())
}

/// Writes a secret file with mode 0600, atomically (temp file, then rename).
fn write_private(path: &Path, contents: &[u8]) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("creating {}", tmp.display()))?;
    f.write_all(contents)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
        .with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))?;
    Ok(())
}
