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
        let issued = self.ca.issue_server(hosts, LEAF_LIFETIME)?;
        let cert = files::from_pem(issued.chain_pem.as_bytes(), issued.key_pem.as_bytes())
            .context("loading the issued certificate")?;
        leaves.insert(hosts.to_vec(), cert.clone());
        Ok(cert)
    }
}
