//! Certificates from PEM files (`source = { files = { cert, key } }`).

use std::path::Path;

use anyhow::Context;

use super::{certified_key, describe, LoadedCert};

/// Loads a PEM chain and key; the errors name the file and what is wrong with it.
///
/// # Errors
/// When a file cannot be read, holds no certificate or key, or the two do not match.
pub fn load(cert: &Path, key: &Path) -> anyhow::Result<LoadedCert> {
    let cert_pem =
        std::fs::read(cert).with_context(|| format!("reading certificate {}", cert.display()))?;
    let key_pem =
        std::fs::read(key).with_context(|| format!("reading private key {}", key.display()))?;
    from_pem(&cert_pem, &key_pem)
        .with_context(|| format!("loading {} with {}", cert.display(), key.display()))
}

/// Builds a [`LoadedCert`] from PEM text.
///
/// # Errors
/// When the PEM holds no certificate or key, or they do not match.
pub fn from_pem(cert_pem: &[u8], key_pem: &[u8]) -> anyhow::Result<LoadedCert> {
    let chain = rustls_pemfile::certs(&mut &cert_pem[..])
        .collect::<Result<Vec<_>, _>>()
        .context("the certificate file is not valid PEM")?;
    let leaf = chain
        .first()
        .context("no CERTIFICATE block found in the certificate file")?;
    let (not_after, issuer) = describe(leaf)?;
    let key = rustls_pemfile::private_key(&mut &key_pem[..])
        .context("the key file is not valid PEM")?
        .context("no PRIVATE KEY block found in the key file")?;
    let ck = certified_key(chain, &key)?;
    Ok(LoadedCert {
        client_auth: None,
        key: std::sync::Arc::new(ck),
        not_after,
        issuer,
    })
}
