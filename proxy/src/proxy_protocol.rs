//! The PROXY protocol (HAProxy's `proxy-protocol.txt`, versions 1 and 2): the header a
//! TCP load balancer puts at the start of a connection to say whose it is. Listeners
//! read it from trusted sources ([`read`], `listeners.proxy_protocol_from`); pools send it
//! to their endpoints ([`header`], `pools.<name>.proxy_protocol`) through
//! [`SendProxy`], the connector Pingora's path uses for such pools.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use async_trait::async_trait;
use rampart_config::ProxyProtocol;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};

/// The twelve bytes that open a version 2 header.
const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// The longest version 1 header, CRLF included (the specification's bound).
const V1_MAX: usize = 107;
/// The largest version 2 address block accepted (addresses and TLVs a load balancer
/// sends fit easily; the format allows 64 KiB).
const V2_MAX_BODY: usize = 4096;

/// The header for a connection from `source` to `dest` (the addresses of the client's
/// connection to the proxy).
#[must_use]
pub fn header(version: ProxyProtocol, source: SocketAddr, dest: SocketAddr) -> Vec<u8> {
    // Both addresses in one family: an IPv4 client of an IPv6 listener is written mapped.
    let (source, dest) = same_family(source, dest);
    match version {
        ProxyProtocol::V1 => {
            let family = if source.is_ipv4() { "TCP4" } else { "TCP6" };
            format!(
                "PROXY {family} {} {} {} {}\r\n",
                source.ip(),
                dest.ip(),
                source.port(),
                dest.port()
            )
            .into_bytes()
        }
        ProxyProtocol::V2 => {
            let mut out = Vec::with_capacity(16 + 36);
            out.extend_from_slice(&V2_SIGNATURE);
            out.push(0x21); // version 2, PROXY command
            match (source.ip(), dest.ip()) {
                (IpAddr::V4(s), IpAddr::V4(d)) => {
                    out.push(0x11); // TCP over IPv4
                    out.extend_from_slice(&12u16.to_be_bytes());
                    out.extend_from_slice(&s.octets());
                    out.extend_from_slice(&d.octets());
                }
                (s, d) => {
                    out.push(0x21); // TCP over IPv6
                    out.extend_from_slice(&36u16.to_be_bytes());
                    out.extend_from_slice(&v6(s).octets());
                    out.extend_from_slice(&v6(d).octets());
                }
            }
            out.extend_from_slice(&source.port().to_be_bytes());
            out.extend_from_slice(&dest.port().to_be_bytes());
            out
        }
    }
}

/// The header of a connection the proxy makes for itself (health checks): v2 `LOCAL`,
/// v1 `UNKNOWN`; the receiver keeps the connection's own address.
#[must_use]
pub fn local_header(version: ProxyProtocol) -> &'static [u8] {
    match version {
        ProxyProtocol::V1 => b"PROXY UNKNOWN\r\n",
        ProxyProtocol::V2 => b"\r\n\r\n\0\r\nQUIT\n\x20\x00\x00\x00",
    }
}

fn v6(ip: IpAddr) -> std::net::Ipv6Addr {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    }
}

fn same_family(source: SocketAddr, dest: SocketAddr) -> (SocketAddr, SocketAddr) {
    if source.is_ipv4() == dest.is_ipv4() {
        return (source, dest);
    }
    (
        SocketAddr::new(IpAddr::V6(v6(source.ip())), source.port()),
        SocketAddr::new(IpAddr::V6(v6(dest.ip())), dest.port()),
    )
}

/// Why a connection's PROXY header was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HeaderError {
    /// The connection did not start with a PROXY header.
    #[error("the connection does not start with a PROXY protocol header")]
    Missing,
    /// A header that does not follow the specification.
    #[error("malformed PROXY protocol header: {0}")]
    Malformed(&'static str),
    /// The connection ended or failed while the header was read.
    #[error("reading the PROXY protocol header: {0}")]
    Io(String),
}

/// Reads the PROXY header (version 1 or 2) at the start of `stream`, consuming exactly
/// its bytes. `Ok(Some(addr))`: the client's address; `Ok(None)`: the sender speaks
/// for itself (`LOCAL`, `UNKNOWN`, or a family without addresses, as health checks of
/// a load balancer send), so the connection's own address stands.
///
/// # Errors
/// When the connection does not start with a valid header.
pub async fn read<S: AsyncRead + Unpin + ?Sized>(
    stream: &mut S,
) -> Result<Option<SocketAddr>, HeaderError> {
    let io = |e: std::io::Error| HeaderError::Io(e.to_string());
    let mut start = [0u8; 12];
    stream.read_exact(&mut start).await.map_err(io)?;
    if start == V2_SIGNATURE {
        let mut fixed = [0u8; 4];
        stream.read_exact(&mut fixed).await.map_err(io)?;
        let len = usize::from(u16::from_be_bytes([fixed[2], fixed[3]]));
        if len > V2_MAX_BODY {
            return Err(HeaderError::Malformed("address block longer than 4 KiB"));
        }
        let mut body = vec![0u8; len];
        stream.read_exact(&mut body).await.map_err(io)?;
        return parse_v2(fixed[0], fixed[1], &body);
    }
    if !start.starts_with(b"PROXY ") {
        return Err(HeaderError::Missing);
    }
    // Version 1 ends at CRLF: read byte by byte so that nothing after it is consumed
    // (at most 107 bytes, once per connection from a trusted load balancer).
    let mut line = start.to_vec();
    while !line.ends_with(b"\r\n") {
        if line.len() >= V1_MAX {
            return Err(HeaderError::Malformed(
                "version 1 line longer than 107 bytes",
            ));
        }
        line.push(stream.read_u8().await.map_err(io)?);
    }
    parse_v1(&line[..line.len() - 2])
}

fn parse_v1(line: &[u8]) -> Result<Option<SocketAddr>, HeaderError> {
    let line = std::str::from_utf8(line).map_err(|_| HeaderError::Malformed("not ASCII"))?;
    let fields: Vec<&str> = line.split(' ').collect();
    match fields.as_slice() {
        ["PROXY", "UNKNOWN", ..] => Ok(None),
        ["PROXY", family @ ("TCP4" | "TCP6"), src, _dst, sport, _dport] => {
            let ip: IpAddr = src
                .parse()
                .map_err(|_| HeaderError::Malformed("bad source address"))?;
            if ip.is_ipv4() != (*family == "TCP4") {
                return Err(HeaderError::Malformed("address does not match its family"));
            }
            let port: u16 = sport
                .parse()
                .map_err(|_| HeaderError::Malformed("bad source port"))?;
            Ok(Some(SocketAddr::new(ip, port)))
        }
        _ => Err(HeaderError::Malformed(
            "expected PROXY TCP4|TCP6|UNKNOWN with four fields",
        )),
    }
}

fn parse_v2(ver_cmd: u8, family: u8, body: &[u8]) -> Result<Option<SocketAddr>, HeaderError> {
    if ver_cmd >> 4 != 2 {
        return Err(HeaderError::Malformed(
            "version 2 signature with another version",
        ));
    }
    match ver_cmd & 0x0f {
        0 => return Ok(None), // LOCAL: the balancer's own connection (health checks)
        1 => {}
        _ => return Err(HeaderError::Malformed("unknown command")),
    }
    match family >> 4 {
        1 if body.len() >= 12 => {
            let ip = IpAddr::from([body[0], body[1], body[2], body[3]]);
            Ok(Some(SocketAddr::new(
                ip,
                u16::from_be_bytes([body[8], body[9]]),
            )))
        }
        2 if body.len() >= 36 => {
            let mut octets = [0u8; 16];
            octets.copy_from_slice(&body[..16]);
            let ip = IpAddr::from(octets);
            Ok(Some(SocketAddr::new(
                ip,
                u16::from_be_bytes([body[32], body[33]]),
            )))
        }
        1 | 2 => Err(HeaderError::Malformed(
            "address block shorter than its family",
        )),
        // UNSPEC, or UNIX sockets: no client IP address to take.
        _ => Ok(None),
    }
}

/// Pingora's connector for a pool that sends the PROXY header: connects, writes the
/// header of the client connection it was made for, and hands the stream on (TLS, if
/// the pool has it, starts after the header, as the specification requires).
#[derive(Debug)]
pub struct SendProxy {
    /// The header written first.
    pub header: Vec<u8>,
    /// The pool's connect timeout (the header's write included).
    pub timeout: Duration,
}

#[async_trait]
impl pingora::connectors::L4Connect for SendProxy {
    async fn connect(
        &self,
        addr: &pingora::protocols::l4::socket::SocketAddr,
    ) -> pingora::Result<pingora::protocols::l4::stream::Stream> {
        use pingora::{Error, ErrorType};
        let Some(addr) = addr.as_inet() else {
            return Error::e_explain(
                ErrorType::ConnectError,
                "PROXY protocol needs a TCP endpoint",
            );
        };
        let connect = async {
            let mut tcp = tokio::net::TcpStream::connect(addr).await?;
            tcp.set_nodelay(true)?;
            tcp.write_all(&self.header).await?;
            Ok::<_, std::io::Error>(tcp)
        };
        match tokio::time::timeout(self.timeout, connect).await {
            Ok(Ok(tcp)) => Ok(tcp.into()),
            Ok(Err(e)) => Err(Error::because(
                ErrorType::ConnectError,
                format!("connecting to {addr} (PROXY protocol)"),
                e,
            )),
            Err(_) => Error::e_explain(
                ErrorType::ConnectTimedout,
                format!(
                    "connecting to {addr}: no connection within {:?}",
                    self.timeout
                ),
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    async fn round_trip(version: ProxyProtocol, src: &str, dst: &str) -> Option<SocketAddr> {
        let mut bytes = header(version, addr(src), addr(dst));
        bytes.extend_from_slice(b"GET / HTTP/1.1\r\n");
        let mut reader = &bytes[..];
        let got = read(&mut reader).await.unwrap();
        // Exactly the header is consumed: the request follows untouched.
        assert_eq!(reader, b"GET / HTTP/1.1\r\n");
        got
    }

    #[tokio::test]
    async fn headers_written_are_read_back_with_the_client_address() {
        for v in [ProxyProtocol::V1, ProxyProtocol::V2] {
            let got = round_trip(v, "192.0.2.7:40000", "10.0.0.1:443").await;
            assert_eq!(got, Some(addr("192.0.2.7:40000")), "{v:?}");
            let got = round_trip(v, "[2001:db8::7]:5", "[2001:db8::1]:443").await;
            assert_eq!(got, Some(addr("[2001:db8::7]:5")), "{v:?}");
        }
    }

    #[test]
    fn the_written_forms_follow_the_specification() {
        let v1 = header(
            ProxyProtocol::V1,
            addr("192.0.2.7:40000"),
            addr("10.0.0.1:443"),
        );
        assert_eq!(v1, b"PROXY TCP4 192.0.2.7 10.0.0.1 40000 443\r\n");
        let v2 = header(
            ProxyProtocol::V2,
            addr("192.0.2.7:40000"),
            addr("10.0.0.1:443"),
        );
        assert_eq!(&v2[..12], &V2_SIGNATURE);
        assert_eq!(&v2[12..16], &[0x21, 0x11, 0, 12]);
        assert_eq!(&v2[16..20], &[192, 0, 2, 7]);
        assert_eq!(&v2[24..26], &40000u16.to_be_bytes());
        // Mixed families are written as IPv6 (mapped).
        let mixed = header(ProxyProtocol::V1, addr("192.0.2.7:1"), addr("[::1]:443"));
        assert_eq!(mixed, b"PROXY TCP6 ::ffff:192.0.2.7 ::1 1 443\r\n");
    }

    #[tokio::test]
    async fn local_and_unknown_keep_the_connection_address() {
        let mut local = V2_SIGNATURE.to_vec();
        local.extend_from_slice(&[0x20, 0x00, 0, 0]);
        assert_eq!(read(&mut &local[..]).await, Ok(None));
        assert_eq!(local_header(ProxyProtocol::V2), &local[..]);
        let v1 = local_header(ProxyProtocol::V1);
        assert_eq!(read(&mut &v1[..]).await, Ok(None));
        assert_eq!(read(&mut &b"PROXY UNKNOWN\r\n"[..]).await, Ok(None));
    }

    #[tokio::test]
    async fn bad_headers_are_refused() {
        for bad in [
            &b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"[..],
            b"PROXY TCP4 999.0.0.1 10.0.0.1 1 2\r\n",
            b"PROXY TCP4 ::1 10.0.0.1 1 2\r\n",
            b"PROXY TCP4 1.2.3.4 10.0.0.1 1\r\n",
            b"PROXY TCP4 1.2.3.4 10.0.0.1 99999 2\r\n",
            &[b'P', b'R', b'O', b'X', b'Y', b' '].repeat(30),
        ] {
            assert!(
                read(&mut &bad[..]).await.is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        let mut v2 = V2_SIGNATURE.to_vec();
        v2.extend_from_slice(&[0x21, 0x11, 0, 4, 1, 2, 3, 4]);
        assert!(read(&mut &v2[..]).await.is_err());
        let mut long = V2_SIGNATURE.to_vec();
        long.extend_from_slice(&[0x21, 0x11, 0xff, 0xff]);
        assert!(read(&mut &long[..]).await.is_err());
    }
}
