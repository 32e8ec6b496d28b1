//! How the proxy reaches a pool's endpoints: the pool's protocol (`http1`, `h2`, `h2c`,
//! `auto`), TLS (server name, CA, client certificate, version floor) and PROXY protocol
//! settings, loaded and checked when a generation is built (a missing or bad file fails
//! the reload, and the old generation keeps serving), then turned into Pingora's
//! [`HttpPeer`] for each upstream attempt ([`PeerSettings::peer`]) and into a rustls
//! client for the fast paths and the active health checks ([`PeerTls::handshake`]).
//!
//! The fast paths carry HTTP/1.1 pools ([`PeerSettings::fast_path_carries`]), and the
//! HTTP/2 one `h2` and `h2c` pools too ([`PeerSettings::fast_path_multiplexes`]);
//! requests to other pools (a PROXY header, `auto`) go to Pingora's path with the
//! decision already made ([`crate::policy::handoff`]).

use std::hash::{Hash, Hasher};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use pingora::prelude::HttpPeer;
use pingora::protocols::ALPN;
use pingora::utils::tls::{CertKey, WrappedX509};
use rampart_config::{Pool, ProxyProtocol, TlsVersion, UpstreamProtocol, UpstreamTls};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

use crate::generation::EndpointRt;

/// A pool's connection settings, ready for serving.
#[derive(Debug)]
pub struct PeerSettings {
    /// The HTTP version spoken to the endpoints.
    pub protocol: UpstreamProtocol,
    /// TLS to the endpoints, when the pool has it.
    pub tls: Option<PeerTls>,
    /// Most concurrent streams on one HTTP/2 connection.
    pub max_streams: usize,
    /// The PROXY header sent at the start of each connection, if any.
    pub proxy_protocol: Option<ProxyProtocol>,
}

/// A pool's upstream TLS: what Pingora's connector and the health checks need.
pub struct PeerTls {
    server_name: Option<String>,
    ca: Option<Arc<[WrappedX509]>>,
    client: Option<Arc<CertKey>>,
    verify: bool,
    /// Oldest TLS version accepted.
    pub min_version: TlsVersion,
    /// Keeps pooled connections of pools with different trust apart (Pingora's reuse
    /// key has the address, SNI and client certificate, not the CA).
    group: u64,
    /// The same settings as a rustls client, for [`PeerTls::handshake`].
    rustls: Arc<rustls::ClientConfig>,
}

impl std::fmt::Debug for PeerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerTls")
            .field("server_name", &self.server_name)
            .field("custom_ca", &self.ca.is_some())
            .field("client_cert", &self.client.is_some())
            .field("verify", &self.verify)
            .field("min_version", &self.min_version)
            .finish_non_exhaustive()
    }
}

impl PeerSettings {
    /// Loads the pool's TLS files and checks them.
    ///
    /// # Errors
    /// A file that cannot be read or holds no usable certificate or key, named with the
    /// pool's field.
    pub fn build(name: &str, pool: &Pool) -> anyhow::Result<Self> {
        let tls = pool
            .tls
            .as_ref()
            .map(|tls| PeerTls::build(tls, pool.protocol))
            .transpose()
            .with_context(|| format!("pools.{name}.tls"))?;
        Ok(Self {
            protocol: pool.protocol,
            tls,
            max_streams: pool.max_streams as usize,
            proxy_protocol: pool.proxy_protocol,
        })
    }

    /// Whether the fast paths carry requests to this pool: HTTP/1.1, in cleartext or
    /// over TLS, without a PROXY header (what their connection pool speaks).
    #[must_use]
    pub fn fast_path_carries(&self) -> bool {
        self.protocol == UpstreamProtocol::Http1 && self.proxy_protocol.is_none()
    }

    /// Whether the HTTP/2 fast path carries requests to this pool as streams of its own
    /// HTTP/2 connections (`h2` over TLS, `h2c`; without a PROXY header).
    #[must_use]
    pub fn fast_path_multiplexes(&self) -> bool {
        self.multiplexed() && self.proxy_protocol.is_none()
    }

    /// What keeps this pool's idle connections apart from another pool's to the same
    /// address: 0 in cleartext, else a hash of the TLS settings.
    #[must_use]
    pub fn reuse_key(&self) -> u64 {
        self.tls.as_ref().map_or(0, |tls| tls.group)
    }

    /// Whether requests share connections as HTTP/2 streams (`h2`, `h2c`; `auto` learns
    /// it per connection).
    #[must_use]
    pub fn multiplexed(&self) -> bool {
        matches!(self.protocol, UpstreamProtocol::H2 | UpstreamProtocol::H2c)
    }

    /// Pingora's peer for one attempt at `endpoint`. `client` is the client
    /// connection's (source, destination), for a pool that sends the PROXY header.
    #[must_use]
    pub fn peer(
        &self,
        endpoint: &EndpointRt,
        client: Option<(SocketAddr, SocketAddr)>,
        connect_timeout: Duration,
    ) -> HttpPeer {
        let sni = self.tls.as_ref().map_or_else(String::new, |tls| {
            tls.server_name
                .clone()
                .unwrap_or_else(|| endpoint_host(&endpoint.id).to_string())
        });
        let mut peer = HttpPeer::new(endpoint.addr, self.tls.is_some(), sni);
        let options = &mut peer.options;
        match self.protocol {
            UpstreamProtocol::Http1 => options.alpn = ALPN::H1,
            UpstreamProtocol::H2 | UpstreamProtocol::H2c => options.alpn = ALPN::H2,
            UpstreamProtocol::Auto => options.alpn = ALPN::H2H1,
        }
        options.max_h2_streams = self.max_streams;
        if let Some(tls) = &self.tls {
            options.ca.clone_from(&tls.ca);
            options.verify_cert = tls.verify;
            options.verify_hostname = tls.verify;
            peer.client_cert_key.clone_from(&tls.client);
            peer.group_key = tls.group;
        }
        if let (Some(version), Some((source, dest))) = (self.proxy_protocol, client) {
            let header = crate::proxy_protocol::header(version, source, dest);
            // A connection that carries a client's address is that client's only.
            let mut hasher = std::hash::DefaultHasher::new();
            (peer.group_key, source, dest).hash(&mut hasher);
            peer.group_key = hasher.finish();
            peer.options.custom_l4 = Some(Arc::new(crate::proxy_protocol::SendProxy {
                header,
                timeout: connect_timeout,
            }));
        }
        peer
    }
}

/// A connection an active health check probes over.
pub trait ProbeIo: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> ProbeIo for T {}

/// A health check's connection to an endpoint, made as requests are sent.
pub struct ProbeConn {
    /// The connection, TLS established and PROXY header sent where the pool has them.
    pub io: Box<dyn ProbeIo>,
    /// The endpoint is to be spoken to in HTTP/2 (`h2`, `h2c`, or `auto` when its
    /// ALPN chose it).
    pub h2: bool,
}

impl PeerSettings {
    /// Connects to `addr` (the endpoint `endpoint_id`) as upstream attempts do: the
    /// PROXY header of a connection of the proxy's own (v2 `LOCAL`, v1 `UNKNOWN`), the
    /// pool's TLS and protocol.
    ///
    /// # Errors
    /// What failed: the connect, the header's write or the TLS handshake (with the
    /// certificate error rustls gives, e.g. an unknown issuer).
    pub async fn connect_probe(
        &self,
        addr: SocketAddr,
        endpoint_id: &str,
    ) -> anyhow::Result<ProbeConn> {
        use tokio::io::AsyncWriteExt;
        let mut tcp = tokio::net::TcpStream::connect(addr).await?;
        tcp.set_nodelay(true)?;
        if let Some(version) = self.proxy_protocol {
            tcp.write_all(crate::proxy_protocol::local_header(version))
                .await?;
        }
        let Some(tls) = &self.tls else {
            return Ok(ProbeConn {
                io: Box::new(tcp),
                h2: self.protocol == UpstreamProtocol::H2c,
            });
        };
        let conn = tls
            .handshake(tcp, endpoint_id)
            .await
            .context("TLS handshake")?;
        let h2 = conn.get_ref().1.alpn_protocol() == Some(b"h2");
        Ok(ProbeConn {
            io: Box::new(conn),
            h2,
        })
    }
}

/// The host part of an endpoint's configured address ("host:port", "[v6]:port").
fn endpoint_host(id: &str) -> &str {
    let host = id.rsplit_once(':').map_or(id, |(host, _)| host);
    host.trim_start_matches('[').trim_end_matches(']')
}

impl PeerTls {
    fn build(tls: &UpstreamTls, protocol: UpstreamProtocol) -> anyhow::Result<Self> {
        let ca_ders = tls
            .ca_file
            .as_deref()
            .map(|path| read_certs(path).context("ca_file"))
            .transpose()?;
        let client = match (&tls.client_cert, &tls.client_key) {
            (Some(cert), Some(key)) => {
                let chain = read_certs(cert).context("client_cert")?;
                let key = read_key(key).context("client_key")?;
                // Checks that the two belong together before Pingora takes them.
                crate::tls::certified_key(chain.clone(), &key)
                    .context("client_cert with client_key")?;
                Some((chain, key))
            }
            _ => None,
        };
        let verify = !tls.insecure_skip_verify;
        let client_config = client_config(tls, ca_ders.as_deref(), client.as_ref(), protocol)?;
        // Everything that makes a connection fit for this pool and not another one.
        let mut hasher = std::hash::DefaultHasher::new();
        (
            verify,
            tls.min_version == TlsVersion::Tls13,
            &tls.server_name,
        )
            .hash(&mut hasher);
        for der in ca_ders.iter().flatten() {
            der.as_ref().hash(&mut hasher);
        }
        for der in client.iter().flat_map(|(chain, _)| chain) {
            der.as_ref().hash(&mut hasher);
        }
        let ca = ca_ders.map(|ders| {
            ders.into_iter()
                .map(|der| WrappedX509::new(der.to_vec(), pingora::utils::tls::parse_x509))
                .collect::<Vec<_>>()
                .into()
        });
        let client = client.map(|(chain, key)| {
            Arc::new(CertKey::new(
                chain.iter().map(|c| c.to_vec()).collect(),
                key.secret_der().to_vec(),
            ))
        });
        Ok(Self {
            server_name: tls.server_name.clone(),
            ca,
            client,
            verify,
            min_version: tls.min_version,
            group: hasher.finish(),
            rustls: Arc::new(client_config),
        })
    }

    /// The TLS handshake on `tcp` to the endpoint `endpoint_id`, as the fast paths and
    /// the health checks make it (Pingora's connector makes its own from the same
    /// settings, see [`PeerSettings::peer`]): this pool's trust, client certificate,
    /// version floor and server name, offering its protocol by ALPN.
    ///
    /// # Errors
    /// A server name that is not one, or what rustls says of the handshake.
    pub async fn handshake(
        &self,
        tcp: tokio::net::TcpStream,
        endpoint_id: &str,
    ) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
        let name =
            ServerName::try_from(self.server_name(endpoint_id).to_string()).map_err(|e| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    format!("tls.server_name: {e}"),
                )
            })?;
        tokio_rustls::TlsConnector::from(self.rustls.clone())
            .connect(name, tcp)
            .await
    }

    /// The name the endpoint's certificate is checked against.
    fn server_name<'a>(&'a self, endpoint_id: &'a str) -> &'a str {
        self.server_name
            .as_deref()
            .unwrap_or_else(|| endpoint_host(endpoint_id))
    }

    /// Whether a connection that negotiated `version` (as Pingora's digest names it,
    /// `TLSv1.2`) may carry requests; Pingora's connector offers TLS 1.2 and 1.3.
    #[must_use]
    pub fn accepts(&self, version: Option<&str>) -> bool {
        self.min_version == TlsVersion::Tls12 || version == Some("TLSv1.3")
    }
}

/// Every certificate of a PEM file, each checked to parse (Pingora's connector would
/// panic on one that does not).
fn read_certs(path: &Path) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let pem = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let certs = rustls_pemfile::certs(&mut &pem[..])
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("{} is not valid PEM", path.display()))?;
    anyhow::ensure!(
        !certs.is_empty(),
        "no CERTIFICATE block found in {}",
        path.display()
    );
    for (i, der) in certs.iter().enumerate() {
        x509_parser::parse_x509_certificate(der)
            .map_err(|e| anyhow::anyhow!("certificate {i} of {}: {e}", path.display()))?;
    }
    Ok(certs)
}

fn read_key(path: &Path) -> anyhow::Result<PrivateKeyDer<'static>> {
    let pem = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    rustls_pemfile::private_key(&mut &pem[..])
        .with_context(|| format!("{} is not valid PEM", path.display()))?
        .with_context(|| format!("no PRIVATE KEY block found in {}", path.display()))
}

fn client_config(
    tls: &UpstreamTls,
    ca: Option<&[CertificateDer<'static>]>,
    client: Option<&(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
    protocol: UpstreamProtocol,
) -> anyhow::Result<rustls::ClientConfig> {
    let provider = rustls::crypto::CryptoProvider::get_default()
        .cloned()
        .context("no rustls crypto provider installed")?;
    let versions: &[&rustls::SupportedProtocolVersion] = match tls.min_version {
        TlsVersion::Tls12 => &[&rustls::version::TLS13, &rustls::version::TLS12],
        TlsVersion::Tls13 => &[&rustls::version::TLS13],
    };
    let mut roots = rustls::RootCertStore::empty();
    match ca {
        Some(ca) => {
            for der in ca {
                roots
                    .add(der.clone())
                    .context("ca_file: a certificate is not a usable CA")?;
            }
        }
        None => pingora::tls::load_platform_certs_incl_env_into_store(&mut roots)
            .map_err(|e| anyhow::anyhow!("loading the system's root certificates: {e}"))?,
    }
    let builder =
        rustls::ClientConfig::builder_with_provider(provider).with_protocol_versions(versions)?;
    let builder = if tls.insecure_skip_verify {
        builder
            .dangerous()
            // Any certificate; the handshake's signatures are still checked.
            .with_custom_certificate_verifier(Arc::new(rampart_pki::AcceptAnyServerCert::new()))
    } else {
        builder.with_root_certificates(roots)
    };
    let mut config = match client {
        Some((chain, key)) => builder
            .with_client_auth_cert(chain.clone(), key.clone_key())
            .context("client_cert with client_key")?,
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = match protocol {
        UpstreamProtocol::Http1 => vec![b"http/1.1".to_vec()],
        UpstreamProtocol::H2 | UpstreamProtocol::H2c => vec![b"h2".to_vec()],
        UpstreamProtocol::Auto => vec![b"h2".to_vec(), b"http/1.1".to_vec()],
    };
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_endpoint_host_is_the_default_server_name() {
        assert_eq!(endpoint_host("api.internal:8443"), "api.internal");
        assert_eq!(endpoint_host("127.0.0.1:8443"), "127.0.0.1");
        assert_eq!(endpoint_host("[::1]:8443"), "::1");
    }
}
