//! TLS of the fleet API: a server certificate from the fleet CA for the configured
//! names, and client certificates verified against the same CA. A client without a
//! certificate may connect (it can only enrol); one with a certificate from another CA
//! fails the handshake.

use std::sync::Arc;

use anyhow::Context;
use rampart_pki::Ca;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;

/// The fleet API's certificate is re-issued at every start; this is ample.
const SERVER_CERT_LIFETIME: std::time::Duration = std::time::Duration::from_secs(90 * 24 * 3600);

/// The rustls configuration of the fleet API listener.
///
/// # Errors
/// When a name is invalid for a certificate.
pub fn server_config(ca: &Ca, names: &[String]) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(ca.cert_pem().as_bytes()).context("fleet CA PEM")?)
        .context("adding the fleet CA to the trust store")?;
    let verifier = WebPkiClientVerifier::builder(Arc::new(roots))
        .allow_unauthenticated()
        .build()
        .context("building the client certificate verifier")?;
    let issued = ca
        .issue_server(names, SERVER_CERT_LIFETIME)
        .context("controller.names")?;
    let chain = CertificateDer::pem_slice_iter(issued.chain_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .context("issued chain")?;
    let key = PrivateKeyDer::from_pem_slice(issued.key_pem.as_bytes()).context("issued key")?;
    let mut config = rustls::ServerConfig::builder()
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .context("fleet API certificate")?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}
