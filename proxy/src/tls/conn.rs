//! The server side of a client's TLS connection: rustls through tokio-rustls, adapted
//! to Pingora's stream traits so that both request paths serve it, and keeping what the
//! access log reports of the handshake (the SNI the client sent, whether the session
//! was resumed) that Pingora's own TLS stream does not keep.

use std::fmt;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime};

use async_trait::async_trait;
use pingora::protocols::raw_connect::ProxyDigest;
use pingora::protocols::tls::{SslDigest, TlsRef};
use pingora::protocols::{
    GetProxyDigest, GetSocketDigest, GetTimingDigest, Peek, Shutdown, SocketDigest, Ssl, Stream,
    TimingDigest, UniqueID, UniqueIDType, ALPN,
};
use rustls::HandshakeKind;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};

tokio::task_local! {
    /// The TLS connection of the request that Pingora's path serves in this task: the
    /// listener sets it around Pingora's request future, the edge reads it for the
    /// access log (the fast paths get it as an argument).
    pub static CONNECTION: Arc<TlsInfo>;
}

/// What a TLS connection's handshake settled, once per connection.
#[derive(Debug)]
pub struct TlsInfo {
    /// The protocol version as logs name it (`TLSv1.3`).
    pub version: &'static str,
    /// The cipher suite (`TLS13_AES_128_GCM_SHA256`).
    pub cipher: &'static str,
    /// The server name the client asked for (SNI), if it sent one.
    pub sni: Option<Box<str>>,
    /// The session was resumed (a ticket or session id), not a full handshake.
    pub resumed: bool,
    /// The client certificate that the host's `client_auth` verified, if any.
    pub client_cert: Option<Box<super::client_auth::ClientCert>>,
}

/// A client's TLS connection after its handshake.
pub struct TlsConn {
    inner: tokio_rustls::server::TlsStream<Stream>,
    digest: Arc<SslDigest>,
    info: Arc<TlsInfo>,
    established: SystemTime,
    handshake: Duration,
}

impl TlsConn {
    /// Completes the handshake on `stream` with `acceptor`.
    ///
    /// # Errors
    /// The handshake's error; a rustls error is inside the `io::Error`.
    pub async fn accept(acceptor: &super::Acceptor, stream: Stream) -> io::Result<TlsConn> {
        let started = Instant::now();
        let (inner, auth) = match acceptor.start(stream).await? {
            super::Started::Plain(accept) => (accept.await?, None),
            super::Started::Chosen(start, config, auth) => (start.into_stream(config).await?, auth),
        };
        let handshake = started.elapsed();
        let session = inner.get_ref().1;
        let version = match session.protocol_version() {
            Some(rustls::ProtocolVersion::TLSv1_3) => "TLSv1.3",
            Some(rustls::ProtocolVersion::TLSv1_2) => "TLSv1.2",
            v => v.and_then(|v| v.as_str()).unwrap_or_default(),
        };
        let cipher = session
            .negotiated_cipher_suite()
            .and_then(|s| s.suite().as_str())
            .unwrap_or_default();
        let info = TlsInfo {
            version,
            cipher,
            sni: session.server_name().map(Into::into),
            resumed: session.handshake_kind() == Some(HandshakeKind::Resumed),
            client_cert: auth.and_then(|auth| {
                let leaf = session.peer_certificates()?.first()?;
                super::client_auth::ClientCert::of(leaf, &auth).map(Box::new)
            }),
        };
        Ok(TlsConn {
            digest: Arc::new(SslDigest::new(cipher, version, None, None, Vec::new())),
            info: Arc::new(info),
            inner,
            established: SystemTime::now(),
            handshake,
        })
    }

    /// What the handshake settled.
    #[must_use]
    pub fn info(&self) -> &Arc<TlsInfo> {
        &self.info
    }

    /// Whether the handshake was an ACME TLS-ALPN-01 validation (`acme-tls/1`): the
    /// connection carries nothing after it.
    #[must_use]
    pub fn is_acme_validation(&self) -> bool {
        self.inner.get_ref().1.alpn_protocol() == Some(super::acme_alpn::ACME_TLS_1)
    }
}

impl AsyncRead for TlsConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[async_trait]
impl Shutdown for TlsConn {
    async fn shutdown(&mut self) {
        // close_notify, then the socket; a client already gone is not an error here.
        if let Err(e) = AsyncWriteExt::shutdown(&mut self.inner).await {
            tracing::debug!("TLS shutdown: {e}");
        }
    }
}

impl UniqueID for TlsConn {
    fn id(&self) -> UniqueIDType {
        self.inner.get_ref().0.id()
    }
}

impl Ssl for TlsConn {
    fn get_ssl(&self) -> Option<&TlsRef> {
        None
    }
    fn get_ssl_digest(&self) -> Option<Arc<SslDigest>> {
        Some(self.digest.clone())
    }
    fn selected_alpn_proto(&self) -> Option<ALPN> {
        self.inner
            .get_ref()
            .1
            .alpn_protocol()
            .and_then(|p| match p {
                b"h2" => Some(ALPN::H2),
                b"http/1.1" => Some(ALPN::H1),
                // The listener offers no other protocol.
                _ => None,
            })
    }
}

impl GetTimingDigest for TlsConn {
    fn get_timing_digest(&self) -> Vec<Option<TimingDigest>> {
        let mut digests = self.inner.get_ref().0.get_timing_digest();
        digests.push(Some(TimingDigest {
            established_ts: self.established,
            establishment_duration: Some(self.handshake),
            offload_wait_duration: None,
        }));
        digests
    }
    fn get_read_pending_time(&self) -> Duration {
        self.inner.get_ref().0.get_read_pending_time()
    }
    fn get_write_pending_time(&self) -> Duration {
        self.inner.get_ref().0.get_write_pending_time()
    }
}

impl GetProxyDigest for TlsConn {
    fn get_proxy_digest(&self) -> Option<Arc<ProxyDigest>> {
        self.inner.get_ref().0.get_proxy_digest()
    }
}

impl GetSocketDigest for TlsConn {
    fn get_socket_digest(&self) -> Option<Arc<SocketDigest>> {
        self.inner.get_ref().0.get_socket_digest()
    }
    fn set_socket_digest(&mut self, digest: SocketDigest) {
        self.inner.get_mut().0.set_socket_digest(digest);
    }
}

#[async_trait]
impl Peek for TlsConn {}

impl fmt::Debug for TlsConn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsConn")
            .field("info", &self.info)
            .finish_non_exhaustive()
    }
}
