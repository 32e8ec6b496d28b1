//! A lean HTTP client for load: HTTP/1.1 with a pre-serialised request and an
//! `httparse`-based response reader (no per-request allocation once warm), and HTTP/2
//! through hyper's connection API. Both over plain TCP or rustls.
//!
//! The client must not be the bottleneck of a benchmark, so the HTTP/1.1 path does the
//! minimum: write the same bytes, read until the response is complete, repeat.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use anyhow::{bail, Context as _};
use bytes::{Buf, Bytes, BytesMut};
use http_body_util::BodyExt;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

use crate::stats::ErrorClass;

/// Where requests go, parsed from the URL.
#[derive(Clone, Debug)]
pub struct Target {
    /// Connect address.
    pub addr: SocketAddr,
    /// Host (for SNI and the Host header).
    pub host: String,
    /// `host[:port]` as written in the URL.
    pub authority: String,
    /// Path and query.
    pub path: String,
    /// HTTPS.
    pub tls: bool,
}

impl Target {
    /// Parses `http://` or `https://` URLs and resolves the host once, unless
    /// `connect_to` says where to connect (the URL's host still names the site: SNI and
    /// the Host header).
    ///
    /// # Errors
    /// When the URL is not http(s) or the host does not resolve.
    pub fn parse(url: &str, connect_to: Option<std::net::SocketAddr>) -> anyhow::Result<Self> {
        let uri: http::Uri = url
            .parse()
            .with_context(|| format!("invalid URL {url:?}"))?;
        let tls = match uri.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            _ => bail!("{url:?}: only http:// and https:// URLs are supported"),
        };
        let authority = uri.authority().context("the URL has no host")?.to_string();
        let host = uri
            .host()
            .context("the URL has no host")?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let port = uri.port_u16().unwrap_or(if tls { 443 } else { 80 });
        let addr = match connect_to {
            Some(addr) => addr,
            None => std::net::ToSocketAddrs::to_socket_addrs(&(host.as_str(), port))
                .with_context(|| format!("resolving {host}"))?
                .next()
                .with_context(|| format!("{host} resolved to no address"))?,
        };
        let path = uri.path_and_query().map_or("/", |p| p.as_str()).to_string();
        Ok(Self {
            addr,
            host,
            authority,
            path,
            tls,
        })
    }
}

/// How to verify the server.
#[derive(Clone, Debug)]
pub enum Trust {
    /// Trust only this PEM bundle.
    CaFile(std::path::PathBuf),
    /// Accept any certificate (benchmarks against self-signed peers).
    Insecure,
    /// Check nothing: any certificate, and not the server's handshake signature either.
    /// Only for measuring servers' handshakes: verifying a P-256 signature costs the
    /// client more than making it costs the server, so a verifying client, not the
    /// server, would be the bottleneck of a handshakes-per-second run.
    Unverified,
}

/// Builds the rustls client configuration. Session resumption is off when every
/// request opens a new connection, so that each one is a full handshake.
///
/// # Errors
/// When the CA file cannot be read.
pub fn tls_config(
    trust: &Trust,
    h2: bool,
    resumption: bool,
) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    let builder = rustls::ClientConfig::builder();
    let mut config = match trust {
        Trust::CaFile(path) => {
            let pem = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
            let mut roots = rustls::RootCertStore::empty();
            for cert in rustls_pemfile::certs(&mut &pem[..]) {
                roots.add(cert?)?;
            }
            builder.with_root_certificates(roots).with_no_client_auth()
        }
        Trust::Insecure => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(rampart_pki::AcceptAnyServerCert::new()))
            .with_no_client_auth(),
        Trust::Unverified => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(Unverified::default()))
            .with_no_client_auth(),
    };
    config.alpn_protocols = if h2 {
        vec![b"h2".to_vec()]
    } else {
        vec![b"http/1.1".to_vec()]
    };
    if !resumption {
        config.resumption = rustls::client::Resumption::disabled();
    }
    Ok(Arc::new(config))
}

/// The verifier of [`Trust::Unverified`]: rampart-pki's [`AcceptAnyServerCert`] (any
/// certificate, same provider and schemes) minus its handshake-signature checks. Kept
/// here so that no crate that ships has a verifier that skips signatures.
///
/// [`AcceptAnyServerCert`]: rampart_pki::AcceptAnyServerCert
#[derive(Debug, Default)]
struct Unverified(rampart_pki::AcceptAnyServerCert);

impl rustls::client::danger::ServerCertVerifier for Unverified {
    fn verify_server_cert(
        &self,
        end_entity: &rustls::pki_types::CertificateDer<'_>,
        intermediates: &[rustls::pki_types::CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        self.0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
    }
    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &rustls::pki_types::CertificateDer<'_>,
        _dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }
    fn verify_tls13_signature(
        &self,
        _message: &[u8],
        _cert: &rustls::pki_types::CertificateDer<'_>,
        _dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// TCP or TLS-over-TCP.
pub enum Transport {
    /// Plain TCP.
    Plain(TcpStream),
    /// TLS.
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl Transport {
    /// Connects (and handshakes) to `target`.
    ///
    /// # Errors
    /// The connect or handshake failure.
    pub async fn connect(
        target: &Target,
        tls: Option<&Arc<rustls::ClientConfig>>,
    ) -> io::Result<Self> {
        let tcp = TcpStream::connect(target.addr).await?;
        tcp.set_nodelay(true)?;
        let Some(config) = tls else {
            return Ok(Transport::Plain(tcp));
        };
        let name = ServerName::try_from(target.host.clone())
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        let stream = tokio_rustls::TlsConnector::from(config.clone())
            .connect(name, tcp)
            .await?;
        Ok(Transport::Tls(Box::new(stream)))
    }

    /// Whether the TLS handshake resumed a session.
    #[must_use]
    pub fn resumed(&self) -> bool {
        match self {
            Transport::Plain(_) => false,
            Transport::Tls(s) => {
                s.get_ref().1.handshake_kind() == Some(rustls::HandshakeKind::Resumed)
            }
        }
    }

    /// Whether HTTP/2 was negotiated.
    #[must_use]
    pub fn is_h2(&self) -> bool {
        match self {
            Transport::Plain(_) => false,
            Transport::Tls(s) => s.get_ref().1.alpn_protocol() == Some(b"h2"),
        }
    }
}

impl AsyncRead for Transport {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Transport::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Transport::Tls(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Transport {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Transport::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Transport::Tls(s) => Pin::new(s).poll_write(cx, buf),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Transport::Plain(s) => Pin::new(s).poll_flush(cx),
            Transport::Tls(s) => Pin::new(s).poll_flush(cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Transport::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Transport::Tls(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

/// The serialised HTTP/1.1 request sent again and again.
#[must_use]
pub fn h1_request(target: &Target, headers: &[(String, String)], close: bool) -> Bytes {
    let mut req = format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: rampart-loadtest\r\n",
        target.path, target.authority
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    if close {
        req.push_str("Connection: close\r\n");
    }
    req.push_str("\r\n");
    Bytes::from(req)
}

/// The outcome of one exchange.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Exchange {
    /// Response status.
    pub status: u16,
    /// Bytes of the response (head and body).
    pub bytes: usize,
    /// The server will close the connection (`Connection: close`).
    pub closing: bool,
}

/// An HTTP/1.1 connection with its read buffer.
pub struct H1 {
    io: Transport,
    buf: BytesMut,
}

impl H1 {
    /// Wraps a connected transport.
    #[must_use]
    pub fn new(io: Transport) -> Self {
        Self {
            io,
            buf: BytesMut::with_capacity(16 * 1024),
        }
    }

    /// Sends `request` and reads the whole response.
    ///
    /// # Errors
    /// An I/O error, or `InvalidData` when the response is malformed.
    pub async fn exchange(&mut self, request: &[u8]) -> io::Result<Exchange> {
        self.io.write_all(request).await?;
        let (status, head_len, body, closing) = loop {
            if let Some(parsed) = parse_head(&self.buf)? {
                break parsed;
            }
            self.fill().await?;
        };
        self.buf.advance(head_len);
        let body_len = match body {
            Body::Length(n) => {
                while self.buf.len() < n {
                    self.fill().await?;
                }
                self.buf.advance(n);
                n
            }
            Body::Chunked => self.read_chunked().await?,
            Body::UntilClose => {
                let mut n = self.buf.len();
                self.buf.clear();
                loop {
                    match self.io.read_buf(&mut self.buf).await? {
                        0 => break,
                        m => n += m,
                    }
                    self.buf.clear();
                }
                n
            }
        };
        Ok(Exchange {
            status,
            bytes: head_len + body_len,
            closing: closing || body == Body::UntilClose,
        })
    }

    async fn fill(&mut self) -> io::Result<()> {
        if self.buf.capacity() - self.buf.len() < 4096 {
            self.buf.reserve(16 * 1024);
        }
        match self.io.read_buf(&mut self.buf).await? {
            0 => Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "connection closed mid-response",
            )),
            _ => Ok(()),
        }
    }

    async fn read_chunked(&mut self) -> io::Result<usize> {
        let mut total = 0;
        loop {
            let (consumed, size) = loop {
                match httparse::parse_chunk_size(&self.buf) {
                    Ok(httparse::Status::Complete((c, s))) => {
                        break (
                            c,
                            usize::try_from(s).map_err(|_| invalid("chunk too large"))?,
                        )
                    }
                    Ok(httparse::Status::Partial) => self.fill().await?,
                    Err(_) => return Err(invalid("bad chunk size")),
                }
            };
            self.buf.advance(consumed);
            // The chunk data and its CRLF (for the last chunk: the final CRLF, no trailers).
            while self.buf.len() < size + 2 {
                self.fill().await?;
            }
            self.buf.advance(size + 2);
            total += consumed + size + 2;
            if size == 0 {
                return Ok(total);
            }
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Body {
    Length(usize),
    Chunked,
    UntilClose,
}

fn invalid(msg: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.to_string())
}

/// Parses a response head: (status, head length, body framing, connection closing).
fn parse_head(buf: &[u8]) -> io::Result<Option<(u16, usize, Body, bool)>> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut resp = httparse::Response::new(&mut headers);
    let head_len = match resp.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(invalid(&format!("bad response head: {e}"))),
    };
    let status = resp.code.unwrap_or(0);
    let mut body = if status == 204 || status == 304 || (100..200).contains(&status) {
        Body::Length(0)
    } else {
        Body::UntilClose
    };
    let mut closing = false;
    for h in resp.headers.iter() {
        if h.name.eq_ignore_ascii_case("content-length") {
            let n = std::str::from_utf8(h.value)
                .ok()
                .and_then(|v| v.trim().parse().ok())
                .ok_or_else(|| invalid("bad content-length"))?;
            body = Body::Length(n);
        } else if h.name.eq_ignore_ascii_case("transfer-encoding")
            && h.value.eq_ignore_ascii_case(b"chunked")
        {
            body = Body::Chunked;
        } else if h.name.eq_ignore_ascii_case("connection")
            && h.value.eq_ignore_ascii_case(b"close")
        {
            closing = true;
        }
    }
    Ok(Some((status, head_len, body, closing)))
}

/// An HTTP/2 connection; each clone sends its own streams on the same connection (one
/// at a time per clone). With `Content-Type: application/grpc` among the headers, each
/// request is a gRPC unary call (POST, one small message, its length not declared, as
/// ghz sends it) and succeeds only with `grpc-status: 0`, as ghz counts it.
#[derive(Clone)]
pub struct H2 {
    send: hyper::client::conn::http2::SendRequest<OneFrame>,
    request: Arc<http::Request<()>>,
    /// The framed message of a gRPC call.
    grpc: Option<Bytes>,
}

/// The message every gRPC call of the load sends: a length-prefixed 10-byte protobuf
/// (field 1, an 8-byte string).
const GRPC_MESSAGE: &[u8] = b"\0\0\0\0\x0a\x0a\x08loadtest";

/// A request body of at most one DATA frame, sent without declaring its length — as
/// gRPC clients (ghz, grpc-go, tonic) send a call: no `content-length`. An empty one
/// ends the stream with the request's HEADERS.
pub struct OneFrame(Option<Bytes>);

impl hyper::body::Body for OneFrame {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, Self::Error>>> {
        std::task::Poll::Ready(
            self.get_mut()
                .0
                .take()
                .map(|d| Ok(hyper::body::Frame::data(d))),
        )
    }

    fn is_end_stream(&self) -> bool {
        self.0.is_none()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        match self.0 {
            None => hyper::body::SizeHint::with_exact(0),
            Some(_) => hyper::body::SizeHint::default(),
        }
    }
}

impl H2 {
    /// Performs the HTTP/2 handshake on `io`.
    ///
    /// # Errors
    /// When the handshake fails.
    pub async fn handshake(
        io: Transport,
        target: &Target,
        headers: &[(String, String)],
    ) -> io::Result<Self> {
        let (send, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(io))
                .await
                .map_err(io::Error::other)?;
        tokio::spawn(conn);
        let grpc = headers.iter().any(|(k, v)| {
            k.eq_ignore_ascii_case("content-type") && v.starts_with("application/grpc")
        });
        let method = if grpc { "POST" } else { "GET" };
        let mut builder = http::Request::builder()
            .method(method)
            .uri(format!("https://{}{}", target.authority, target.path));
        for (k, v) in headers {
            builder = builder.header(k.as_str(), v.as_str());
        }
        if grpc {
            builder = builder.header("te", "trailers");
        }
        let request = Arc::new(builder.body(()).map_err(io::Error::other)?);
        Ok(Self {
            send,
            request,
            grpc: grpc.then(|| Bytes::from_static(GRPC_MESSAGE)),
        })
    }

    /// Whether the connection is gone (new streams would fail).
    #[must_use]
    pub fn is_closed(&self) -> bool {
        self.send.is_closed()
    }

    /// Sends the request and reads the whole response.
    ///
    /// # Errors
    /// The stream or connection error.
    pub async fn exchange(&mut self) -> io::Result<Exchange> {
        let mut req = http::Request::new(OneFrame(self.grpc.clone()));
        *req.method_mut() = self.request.method().clone();
        *req.uri_mut() = self.request.uri().clone();
        *req.headers_mut() = self.request.headers().clone();
        let resp = self
            .send
            .send_request(req)
            .await
            .map_err(io::Error::other)?;
        let mut status = resp.status().as_u16();
        // A trailers-only gRPC answer carries its status in the head.
        let mut grpc_status = resp.headers().get("grpc-status").cloned();
        let mut body = resp.into_body();
        let mut bytes = 0;
        while let Some(frame) = body.frame().await {
            match frame.map_err(io::Error::other)?.into_data() {
                Ok(data) => bytes += data.len(),
                Err(frame) => {
                    if let Ok(trailers) = frame.into_trailers() {
                        grpc_status = trailers.get("grpc-status").cloned().or(grpc_status);
                    }
                }
            }
        }
        if self.grpc.is_some() && status == 200 && grpc_status.as_ref().is_none_or(|s| s != "0") {
            // A failed call: counted as an error like a 5xx.
            status = 502;
        }
        Ok(Exchange {
            status,
            bytes,
            closing: false,
        })
    }
}

/// The error class of a failed exchange.
#[must_use]
pub fn classify(e: &io::Error) -> ErrorClass {
    match e.kind() {
        io::ErrorKind::TimedOut => ErrorClass::Timeout,
        _ => ErrorClass::Reset,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn response_heads_are_parsed_with_their_framing() {
        let head = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello";
        assert_eq!(
            parse_head(head).unwrap(),
            Some((200, head.len() - 5, Body::Length(5), false))
        );
        let head = b"HTTP/1.1 503 Busy\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n";
        assert_eq!(
            parse_head(head).unwrap(),
            Some((503, head.len(), Body::Chunked, true))
        );
        assert_eq!(parse_head(b"HTTP/1.1 200 OK\r\nContent-Le").unwrap(), None);
        assert!(parse_head(b"NOT HTTP\r\n\r\n").is_err());
        let head = b"HTTP/1.1 204 No Content\r\n\r\n";
        assert_eq!(
            parse_head(head).unwrap(),
            Some((204, head.len(), Body::Length(0), false))
        );
    }

    #[test]
    fn targets_parse_and_requests_serialise() {
        let t = Target::parse("http://127.0.0.1:8080/a?b=c", None).unwrap();
        assert!(!t.tls);
        assert_eq!(t.addr.port(), 8080);
        assert_eq!(t.path, "/a?b=c");
        let req = h1_request(&t, &[("X-K".into(), "v".into())], true);
        assert_eq!(&req[..], &b"GET /a?b=c HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nUser-Agent: rampart-loadtest\r\nX-K: v\r\nConnection: close\r\n\r\n"[..]);
        assert!(Target::parse("ftp://x/", None).is_err());
    }
}
