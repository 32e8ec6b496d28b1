//! A real ACME CA for tests: pebble (Debian's package) with its own API certificate,
//! and pebble-challtestsrv answering its DNS lookups with 127.0.0.1 unless another
//! resolver is given.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::{eventually, free_addr};

/// How pebble misbehaves.
#[derive(Default)]
pub struct Options {
    /// A DNS server to resolve through instead of pebble-challtestsrv.
    pub resolver: Option<SocketAddr>,
    /// Percent of good nonces rejected (PEBBLE_WFE_NONCEREJECT).
    pub nonce_reject: u8,
    /// Certificate validity in seconds (certificateValidityPeriod).
    pub validity: Option<u64>,
    /// Validations sleep up to this many seconds (PEBBLE_VA_SLEEPTIME).
    pub va_sleep: Option<u64>,
    /// External Account Binding required, with this (key id, base64url HMAC key).
    pub eab: Option<(String, String)>,
    /// The port TLS-ALPN-01 validations connect to (a proxy's HTTPS listener).
    pub tls_port: Option<u16>,
}

/// A child process killed on drop.
pub struct Killed(pub Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// pebble and its DNS, with pebble's HTTP-01 validations sent to `http_port`.
pub struct Pebble {
    _dns: Option<Killed>,
    _pebble: Killed,
    /// The ACME directory URL.
    pub directory: String,
    management: SocketAddr,
    /// The CA of pebble's own API certificate.
    pub api_ca: PathBuf,
    /// Where pebble logs (one line per request).
    pub log: PathBuf,
}

impl Pebble {
    pub async fn start(dir: &Path, http_port: u16) -> Self {
        Self::start_with(dir, http_port, Options::default()).await
    }

    /// Like [`Pebble::start`], rejecting `percent` of good nonces.
    pub async fn start_rejecting_nonces(dir: &Path, http_port: u16, percent: u8) -> Self {
        let opts = Options {
            nonce_reject: percent,
            ..Options::default()
        };
        Self::start_with(dir, http_port, opts).await
    }

    /// Like [`Pebble::start`], issuing certificates valid for `secs` seconds.
    pub async fn start_short_lived(dir: &Path, http_port: u16, secs: u64) -> Self {
        let opts = Options {
            validity: Some(secs),
            ..Options::default()
        };
        Self::start_with(dir, http_port, opts).await
    }

    /// Like [`Pebble::start`]; with `resolver`, pebble asks that DNS server (the
    /// controller's embedded one) instead of pebble-challtestsrv.
    pub async fn start_with_dns(dir: &Path, http_port: u16, resolver: Option<SocketAddr>) -> Self {
        let opts = Options {
            resolver,
            ..Options::default()
        };
        Self::start_with(dir, http_port, opts).await
    }

    /// pebble with `opts`.
    pub async fn start_with(dir: &Path, http_port: u16, opts: Options) -> Self {
        let Options {
            resolver,
            nonce_reject,
            validity,
            va_sleep,
            eab,
            tls_port,
        } = opts;
        let ca =
            rampart_pki::Ca::load_or_create(&dir.join("pebble-ca"), "pebble API test CA").unwrap();
        let issued = ca
            .issue_server(
                &["localhost".into(), "127.0.0.1".into()],
                Duration::from_secs(3600),
            )
            .unwrap();
        std::fs::write(dir.join("pebble-cert.pem"), &issued.chain_pem).unwrap();
        std::fs::write(dir.join("pebble-key.pem"), &issued.key_pem).unwrap();
        let (api, management, dns) = (free_addr(), free_addr(), free_addr());
        std::fs::write(
            dir.join("pebble.json"),
            format!(
                r#"{{"pebble": {{"listenAddress": "{api}", "managementListenAddress": "{management}",
 "certificate": "{}", "privateKey": "{}", "httpPort": {http_port}, "tlsPort": {},
 "ocspResponderURL": "", "externalAccountBindingRequired": {}{}{}}}}}"#,
                dir.join("pebble-cert.pem").display(),
                dir.join("pebble-key.pem").display(),
                tls_port.unwrap_or_else(|| free_addr().port()),
                eab.is_some(),
                eab.as_ref().map_or(String::new(), |(kid, key)| format!(
                    ", \"externalAccountMACKeys\": {{\"{kid}\": \"{key}\"}}"
                )),
                validity.map_or(String::new(), |v| format!(", \"certificateValidityPeriod\": {v}"))
            ),
        )
        .unwrap();
        let dns_proc = match resolver {
            Some(_) => None,
            None => Some(Killed(
                Command::new("pebble-challtestsrv")
                    .args(["-defaultIPv4", "127.0.0.1", "-defaultIPv6", ""])
                    .args([
                        "-dns01",
                        &dns.to_string(),
                        "-http01",
                        "",
                        "-https01",
                        "",
                        "-tlsalpn01",
                        "",
                    ])
                    .args(["-management", &free_addr().to_string()])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .expect("pebble-challtestsrv (scripts/setup installs pebble)"),
            )),
        };
        let dns = resolver.unwrap_or(dns);
        let pebble = Command::new("pebble")
            .arg("-config")
            .arg(dir.join("pebble.json"))
            .args(["-dnsserver", &dns.to_string()])
            .envs(match va_sleep {
                Some(secs) => vec![("PEBBLE_VA_SLEEPTIME", secs.to_string())],
                None => vec![("PEBBLE_VA_NOSLEEP", "1".to_string())],
            })
            .env("PEBBLE_WFE_NONCEREJECT", nonce_reject.to_string())
            .stdout(std::fs::File::create(dir.join("pebble.log")).unwrap())
            .stderr(Stdio::null())
            .spawn()
            .expect("pebble (scripts/setup installs it)");
        eventually("pebble to listen", || async {
            tokio::net::TcpStream::connect(api).await.ok().map(drop)
        })
        .await;
        Self {
            _dns: dns_proc,
            _pebble: Killed(pebble),
            directory: format!("https://{api}/dir"),
            management,
            api_ca: ca.cert_path().to_path_buf(),
            log: dir.join("pebble.log"),
        }
    }

    /// The root pebble issues certificates under (a new one at every start).
    pub async fn root(&self) -> reqwest::Certificate {
        reqwest::Certificate::from_pem(&self.root_pem().await).unwrap()
    }

    /// [`Pebble::root`] as PEM.
    pub async fn root_pem(&self) -> Vec<u8> {
        let pem = std::fs::read(&self.api_ca).unwrap();
        let client = reqwest::Client::builder()
            .tls_certs_only([reqwest::Certificate::from_pem(&pem).unwrap()])
            .build()
            .unwrap();
        client
            .get(format!("https://{}/roots/0", self.management))
            .send()
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap()
            .to_vec()
    }
}
