//! Raw HTTP/2 over TLS to a proxy's HTTPS listener, for frames no client library sends
//! (floods, malformed requests): the frame types and flags, a frame builder, and a
//! connection that has sent the preface and an empty SETTINGS frame.

use std::sync::Arc;

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use super::Proxy;

pub const DATA: u8 = 0;
pub const HEADERS: u8 = 1;
pub const RST_STREAM: u8 = 3;
pub const SETTINGS: u8 = 4;
pub const PING: u8 = 6;
pub const GOAWAY: u8 = 7;
pub const CONTINUATION: u8 = 9;
pub const END_STREAM: u8 = 1;
pub const END_HEADERS: u8 = 4;

/// One frame: the 9-byte header, then `payload`.
pub fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = u32::try_from(payload.len()).unwrap();
    let mut f = Vec::with_capacity(9 + payload.len());
    f.extend_from_slice(&len.to_be_bytes()[1..]);
    f.push(kind);
    f.push(flags);
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// A TLS connection to `proxy`'s HTTPS listener for `a.test` (trusting its internal
/// CA) that negotiated h2 and sent the client preface and an empty SETTINGS frame.
pub async fn connect(proxy: &Proxy) -> tokio_rustls::client::TlsStream<TcpStream> {
    let pem = std::fs::read(proxy.ca_path()).unwrap();
    let mut store = rustls::RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut &pem[..]) {
        store.add(cert.unwrap()).unwrap();
    }
    let mut config = rustls::ClientConfig::builder()
        .with_root_certificates(store)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = TcpStream::connect(proxy.https).await.unwrap();
    let mut tls = connector
        .connect("a.test".try_into().unwrap(), tcp)
        .await
        .unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    tls.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .await
        .unwrap();
    tls.write_all(&frame(SETTINGS, 0, 0, &[])).await.unwrap();
    tls
}

/// One frame read from the proxy.
#[derive(Debug)]
pub struct Frame {
    pub kind: u8,
    pub stream: u32,
    pub payload: Vec<u8>,
}

/// Reads the next whole frame from `conn`, keeping what follows it in `buf` (which
/// must be kept between calls); `None` once the connection ends or fails.
pub async fn next_frame(
    conn: &mut (impl tokio::io::AsyncRead + Unpin),
    buf: &mut Vec<u8>,
) -> Option<Frame> {
    use tokio::io::AsyncReadExt;
    loop {
        if buf.len() >= 9 {
            let len = usize::from(buf[0]) << 16 | usize::from(buf[1]) << 8 | usize::from(buf[2]);
            if buf.len() >= 9 + len {
                let frame = Frame {
                    kind: buf[3],
                    stream: u32::from_be_bytes(buf[5..9].try_into().unwrap()),
                    payload: buf[9..9 + len].to_vec(),
                };
                buf.drain(..9 + len);
                return Some(frame);
            }
        }
        let mut chunk = [0u8; 16384];
        match conn.read(&mut chunk).await {
            Ok(n) if n > 0 => buf.extend_from_slice(&chunk[..n]),
            _ => return None,
        }
    }
}
