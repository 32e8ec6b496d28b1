//! The controller's two certificate authorities, kept in the store so that every
//! controller sharing it uses the same ones: the fleet CA (client certificates of
//! proxies and the fleet API's server certificate) and the internal serving CA (for
//! routes whose TLS source is `internal`, and placeholders until ACME delivers).

use std::path::PathBuf;

use anyhow::Context;
use rampart_pki::Ca;

use crate::store::Store;

/// Which authority.
#[derive(Clone, Copy, Debug)]
pub enum Authority {
    /// Signs proxies' client certificates and the fleet API's certificate.
    Fleet,
    /// Signs certificates served to clients for `internal` names.
    Serving,
}

impl Authority {
    fn prefix(self) -> &'static str {
        match self {
            Self::Fleet => "fleet-ca",
            Self::Serving => "internal-ca",
        }
    }

    fn name(self) -> &'static str {
        match self {
            Self::Fleet => "Rampart fleet CA",
            Self::Serving => "Rampart internal CA",
        }
    }
}

/// Loads `which` CA from the store, creating it on first use. When two controllers
/// start at once, one creation wins and both load the winner.
///
/// # Errors
/// When the store fails or holds a corrupt CA.
pub async fn load(store: &dyn Store, which: Authority) -> anyhow::Result<Ca> {
    let cert_key = format!("{}/ca.pem", which.prefix());
    let key_key = format!("{}/ca.key", which.prefix());
    if store.get(&cert_key).await?.is_none() {
        let (cert, key) = Ca::new_root_pem(which.name())?;
        // The key first: a cert without its key would be unusable.
        if store.create(&key_key, key.as_bytes()).await? {
            store.put(&cert_key, cert.as_bytes()).await?;
        }
    }
    let cert = wait_for(store, &cert_key).await?;
    let key = wait_for(store, &key_key).await?;
    Ca::from_pem(&cert, &key, PathBuf::from(cert_key.clone()))
        .with_context(|| format!("loading {} from the store", which.name()))
}

/// Reads a key that another controller may be about to write (bounded wait).
async fn wait_for(store: &dyn Store, key: &str) -> anyhow::Result<String> {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        if let Some(v) = store.get(key).await? {
            return String::from_utf8(v).with_context(|| format!("store key {key} is not text"));
        }
        if tokio::time::Instant::now() > deadline {
            anyhow::bail!("store key {key} is missing (a CA was half created); remove the {} entries to start over", key.split('/').next().unwrap_or(key));
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}
