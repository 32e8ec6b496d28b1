//! A fast-path connection to an endpoint: cleartext TCP, or TLS over it for a pool
//! with `tls` (the same trust, client certificate, server name and version floor as
//! the health checks use: [`crate::peer::PeerTls::handshake`]). Reads and writes
//! go through one enum, so the upstream attempt and the idle pool do not care which.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// An upstream connection of the fast paths.
#[derive(Debug)]
pub(crate) enum Upstream {
    /// Cleartext.
    Tcp(TcpStream),
    /// TLS (boxed: the session's state is large and most pools are cleartext).
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl Upstream {
    /// Reads what is already there into `buf` without waiting: `Ok(0)` at the end of
    /// the stream, `WouldBlock` when nothing has arrived.
    pub(crate) fn try_read_buf(&mut self, buf: &mut Vec<u8>) -> io::Result<usize> {
        match self {
            Upstream::Tcp(s) => s.try_read_buf(buf),
            Upstream::Tls(s) => {
                // One poll with a waker that is never woken: what the TLS session can
                // decrypt from what the socket already holds.
                let mut cx = Context::from_waker(Waker::noop());
                let mut chunk = [0u8; 8192];
                let mut read = ReadBuf::new(&mut chunk);
                match Pin::new(&mut **s).poll_read(&mut cx, &mut read) {
                    Poll::Ready(Ok(())) => {
                        buf.extend_from_slice(read.filled());
                        Ok(read.filled().len())
                    }
                    Poll::Ready(Err(e)) => Err(e),
                    Poll::Pending => Err(io::ErrorKind::WouldBlock.into()),
                }
            }
        }
    }

    /// Whether an idle connection is still open and quiet. A cleartext one that has
    /// bytes the upstream sent unasked is not reusable; a TLS one may hold a session
    /// ticket or a close_notify, so only a closed socket rules it out (a dead session
    /// shows at the first write, which the attempt retries on a new connection).
    pub(crate) fn is_open(&self) -> bool {
        let mut probe = [0u8; 1];
        match self {
            Upstream::Tcp(s) => {
                matches!(s.try_read(&mut probe), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
            }
            Upstream::Tls(s) => {
                let mut cx = Context::from_waker(Waker::noop());
                let mut peek = ReadBuf::new(&mut probe);
                match s.get_ref().0.poll_peek(&mut cx, &mut peek) {
                    Poll::Pending => true,
                    Poll::Ready(Ok(n)) => n > 0,
                    Poll::Ready(Err(_)) => false,
                }
            }
        }
    }
}

impl AsyncRead for Upstream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Upstream::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Upstream::Tls(s) => Pin::new(&mut **s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Upstream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Upstream::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            Upstream::Tls(s) => Pin::new(&mut **s).poll_write(cx, buf),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Upstream::Tcp(s) => Pin::new(s).poll_flush(cx),
            Upstream::Tls(s) => Pin::new(&mut **s).poll_flush(cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Upstream::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            Upstream::Tls(s) => Pin::new(&mut **s).poll_shutdown(cx),
        }
    }
}
