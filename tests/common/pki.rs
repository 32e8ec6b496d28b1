//! A test CA (rcgen) that signs server and client certificates, written as PEM files.

use std::path::{Path, PathBuf};

use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// A test CA that signs server and client certificates, written as PEM files.
pub struct Pki {
    pub dir: tempfile::TempDir,
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
    pub ca_der: CertificateDer<'static>,
}

impl Pki {
    pub fn new(name: &str) -> Pki {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, format!("{name} CA"));
        let ca = params.self_signed(&key).unwrap();
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("ca.pem"), ca.pem()).unwrap();
        Pki {
            dir,
            ca_der: ca.der().clone(),
            issuer: rcgen::Issuer::new(params, key),
        }
    }

    pub fn ca_file(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    /// A leaf for `names` (serial `serial`), written as `<file>.pem` and `<file>.key`.
    pub fn leaf(&self, file: &str, names: &[&str], serial: u64) -> (PathBuf, PathBuf) {
        let mut params = rcgen::CertificateParams::new(
            names.iter().map(ToString::to_string).collect::<Vec<_>>(),
        )
        .unwrap();
        params.serial_number = Some(rcgen::SerialNumber::from(serial));
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, names[0]);
        self.sign(file, &params)
    }

    /// A leaf of `params`, written as `<file>.pem` and `<file>.key`.
    pub fn sign(&self, file: &str, params: &rcgen::CertificateParams) -> (PathBuf, PathBuf) {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        let (pem, key_path) = (
            self.dir.path().join(format!("{file}.pem")),
            self.dir.path().join(format!("{file}.key")),
        );
        std::fs::write(&pem, cert.pem()).unwrap();
        std::fs::write(&key_path, key.serialize_pem()).unwrap();
        (pem, key_path)
    }
}

pub fn read_chain(path: &Path) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
    let pem = std::fs::read(path).unwrap();
    let chain = rustls_pemfile::certs(&mut &pem[..])
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let key_pem = std::fs::read(path.with_extension("key")).unwrap();
    let key = rustls_pemfile::private_key(&mut &key_pem[..])
        .unwrap()
        .unwrap();
    (chain, key)
}
