//! ACME TLS-ALPN-01 (RFC 8737) on the HTTPS listener: while the controller has an order
//! pending, the snapshot carries, for each name, the SHA-256 of the key authorization;
//! each proxy makes the self-signed certificate that carries it ([`certificates`]), the
//! SNI resolver shows it to handshakes that offer only `acme-tls/1`
//! ([`is_challenge`]), and the listener closes such a connection once the handshake is
//! done (no HTTP is spoken on it).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use base64::Engine as _;
use rustls::sign::CertifiedKey;

/// The ALPN protocol of a TLS-ALPN-01 validation.
pub const ACME_TLS_1: &[u8] = b"acme-tls/1";

/// The challenge certificates for `answers` (name → base64url SHA-256 digest). One
/// that cannot be made is logged and left out: the validation of that name fails,
/// the controller backs off, and everything else is served as before.
#[must_use]
pub fn certificates(answers: &BTreeMap<String, String>) -> HashMap<String, Arc<CertifiedKey>> {
    let mut out = HashMap::with_capacity(answers.len());
    for (name, digest) in answers {
        match certificate(name, digest) {
            Ok(key) => {
                out.insert(name.to_ascii_lowercase(), Arc::new(key));
            }
            Err(e) => tracing::error!(name, "TLS-ALPN-01 challenge certificate: {e:#}"),
        }
    }
    out
}

fn certificate(name: &str, digest: &str) -> anyhow::Result<CertifiedKey> {
    let digest = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(digest.trim_end_matches('='))
        .map_err(|e| anyhow::anyhow!("the digest is not base64url: {e}"))?;
    let (cert, key) = rampart_pki::acme_tls_alpn_cert(name, &digest)?;
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(key.into());
    // Not through `certified_key`: its check that key and certificate belong together
    // parses the certificate with webpki, which refuses the critical acmeIdentifier
    // extension that is this certificate's point (both were made together just now).
    let provider = rustls::crypto::CryptoProvider::get_default()
        .ok_or_else(|| anyhow::anyhow!("no rustls crypto provider installed"))?;
    let signing = provider.key_provider.load_private_key(key)?;
    Ok(CertifiedKey::new(vec![cert.into()], signing))
}

/// Whether a ClientHello is an ACME validation: it offers `acme-tls/1` and nothing else
/// (RFC 8737 §3: the validation server offers only that protocol).
#[must_use]
pub fn is_challenge<'a>(alpn: Option<impl Iterator<Item = &'a [u8]>>) -> bool {
    let Some(mut offered) = alpn else {
        return false;
    };
    offered.next() == Some(ACME_TLS_1) && offered.next().is_none()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_challenge_certificate_carries_the_digest_in_a_critical_extension() {
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        let digest = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode([7u8; 32]);
        let certs = certificates(&BTreeMap::from([
            ("Shop.Example.com".to_string(), digest),
            ("bad.example.com".to_string(), "not base64!".to_string()),
        ]));
        assert_eq!(certs.len(), 1, "the bad one is left out");
        let key = &certs["shop.example.com"];
        let (_, cert) = x509_parser::parse_x509_certificate(&key.cert[0]).unwrap();
        // id-pe-acmeIdentifier (1.3.6.1.5.5.7.1.31), critical, an OCTET STRING of the digest.
        let ext = cert
            .extensions()
            .iter()
            .find(|e| e.oid.to_id_string() == "1.3.6.1.5.5.7.1.31")
            .expect("acmeIdentifier extension");
        assert!(ext.critical);
        assert_eq!(ext.value, [&[0x04, 32][..], &[7u8; 32][..]].concat());
        let names = cert.subject_alternative_name().unwrap().unwrap();
        assert_eq!(
            format!("{:?}", names.value.general_names),
            "[DNSName(\"Shop.Example.com\")]"
        );
    }

    #[test]
    fn only_a_hello_offering_acme_tls_alone_is_a_challenge() {
        let of =
            |protocols: &'static [&'static [u8]]| is_challenge(Some(protocols.iter().copied()));
        assert!(of(&[ACME_TLS_1]));
        assert!(!of(&[b"h2", ACME_TLS_1]));
        assert!(!of(&[ACME_TLS_1, b"h2"]));
        assert!(!of(&[b"h2"]));
        assert!(!is_challenge(None::<std::iter::Empty<&[u8]>>));
    }
}
