//! Rampart's internal CA for `source = "internal"`: a [`rampart_pki::Ca`] kept in
//! `<data_dir>/ca/` that issues leaf certificates for configured names. Clients trust
//! `<data_dir>/ca/ca.pem`.
//!
//! Leaves are issued in memory at build time and cached per host list for the life of
//! the process, so reloads do not churn certificates.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

use anyhow::Context;
use rampart_pki::Ca;

use super::{files, LoadedCert};

/// Leaf certificates are valid this long.
const LEAF_LIFETIME: Duration = Duration::from_secs(90 * 24 * 3600);
/// A leaf with less than this left is issued anew (a third of its life, as ACME does).
const RENEW_BEFORE: Duration = Duration::from_secs(30 * 24 * 3600);

/// A loaded internal CA with its cache of issued leaves.
#[derive(Debug)]
pub struct InternalCa {
    ca: Ca,
    leaves: Mutex<HashMap<Vec<String>, LoadedCert>>,
}

impl InternalCa {
    /// Loads the CA from `<data_dir>/ca/`, creating it if absent.
    ///
    /// # Errors
    /// When the directory cannot be created or the files are unreadable or corrupt.
    pub fn load_or_create(data_dir: &Path) -> anyhow::Result<Self> {
        Ok(Self {
            ca: Ca::load_or_create(&data_dir.join("ca"), "Rampart internal CA")?,
            leaves: Mutex::new(HashMap::new()),
        })
    }

    /// Where the CA certificate (to be trusted by clients) is.
    #[must_use]
    pub fn cert_path(&self) -> &Path {
        self.ca.cert_path()
    }

    /// A certificate for `hosts` (names or `*.suffix`), issued once and again when it
    /// has less than [`RENEW_BEFORE`] left.
    ///
    /// # Errors
    /// When issuing fails (invalid names).
    pub fn leaf(&self, hosts: &[String]) -> anyhow::Result<LoadedCert> {
        let mut leaves = self
            .leaves
            .lock()
            .expect("leaf cache lock is never poisoned: no panics while held");
        if let Some(c) = leaves.get(hosts).filter(|c| !due(c, now_unix())) {
            return Ok(c.clone());
        }
        let issued = self.ca.issue_server(hosts, LEAF_LIFETIME)?;
        let cert = files::from_pem(issued.chain_pem.as_bytes(), issued.key_pem.as_bytes())
            .context("loading the issued certificate")?;
        leaves.insert(hosts.to_vec(), cert.clone());
        Ok(cert)
    }

    /// Whether a leaf in use is due for renewal (a rebuild of the generation renews it).
    #[must_use]
    pub fn renewal_due(&self) -> bool {
        let now = now_unix();
        self.leaves
            .lock()
            .expect("leaf cache lock is never poisoned: no panics while held")
            .values()
            .any(|c| due(c, now))
    }
}

fn due(cert: &LoadedCert, now: i64) -> bool {
    cert.not_after - now < i64::try_from(RENEW_BEFORE.as_secs()).unwrap_or(i64::MAX)
}

fn now_unix() -> i64 {
    rampart_config::unix_now_signed()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_leaf_near_its_expiry_is_issued_anew() {
        crate::install_crypto_provider();
        let dir = tempfile::tempdir().unwrap();
        let ca = InternalCa::load_or_create(dir.path()).unwrap();
        let hosts = vec!["a.test".to_string()];
        let first = ca.leaf(&hosts).unwrap();
        assert!(!ca.renewal_due());
        assert_eq!(
            ca.leaf(&hosts).unwrap().not_after,
            first.not_after,
            "cached"
        );
        // Ten days left: due, and the next build gets a fresh one.
        let mut aging = first;
        aging.not_after = now_unix() + 10 * 24 * 3600;
        ca.leaves
            .lock()
            .unwrap()
            .insert(hosts.clone(), aging.clone());
        assert!(ca.renewal_due());
        let renewed = ca.leaf(&hosts).unwrap();
        assert!(renewed.not_after > aging.not_after + 60 * 24 * 3600);
        assert!(!ca.renewal_due());
    }
}
