//! The floor of an HTTP/1 data path on tokio: a minimal keep-alive forwarder, to measure
//! what the least a proxy can do per request costs on this machine (see "How far an own
//! HTTP/1 path could go" in loadtest/README.md). Not a proxy: no routing, limits,
//! metrics or health, GET-style requests without a body, responses with a
//! Content-Length only; anything else closes the connection.
//!
//! ```sh
//! cargo run --release -p rampart-loadtest --example floor -- 127.0.0.1:8081 127.0.0.1:9000
//! ```

use std::cell::RefCell;
use std::io;
use std::net::SocketAddr;
use std::rc::Rc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Idle upstream connections, shared by the connections of the one thread.
type Pool = Rc<RefCell<Vec<TcpStream>>>;

/// The request id every forwarded request and response carries (a fixed one: the
/// cost measured is writing it, not making it).
const REQUEST_ID: &[u8] = b"x-request-id: 0b7c3a52-5f0e-4b4e-9d0a-6a4c1f2e9b11\r\n";

fn main() -> io::Result<()> {
    let mut args = std::env::args().skip(1);
    let usage = || io::Error::other("usage: floor LISTEN_ADDR UPSTREAM_ADDR");
    let listen: SocketAddr = args
        .next()
        .ok_or_else(usage)?
        .parse()
        .map_err(io::Error::other)?;
    let upstream: SocketAddr = args
        .next()
        .ok_or_else(usage)?
        .parse()
        .map_err(io::Error::other)?;
    // One thread, as every proxy in `compare` gets one worker.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, async move {
        let listener = TcpListener::bind(listen).await?;
        println!("listening on {}", listener.local_addr()?);
        let pool: Pool = Rc::new(RefCell::new(Vec::new()));
        loop {
            let (client, peer) = listener.accept().await?;
            client.set_nodelay(true)?;
            let pool = pool.clone();
            tokio::task::spawn_local(async move {
                if let Err(e) = serve(client, peer, upstream, pool).await {
                    eprintln!("{peer}: {e}");
                }
            });
        }
    })
}

/// Appends a header line.
fn header(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

fn hop_by_hop(name: &str) -> bool {
    name.eq_ignore_ascii_case("connection") || name.eq_ignore_ascii_case("keep-alive")
}

fn bad(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.to_string())
}

/// Serves one client connection until it closes or sends something out of scope.
async fn serve(
    mut client: TcpStream,
    peer: SocketAddr,
    upstream: SocketAddr,
    pool: Pool,
) -> io::Result<()> {
    let forwarded_for = peer.ip().to_string();
    let mut req_buf = vec![0u8; 8192];
    let mut req_filled = 0;
    let mut resp_buf = vec![0u8; 32768];
    let mut out = Vec::with_capacity(1024);
    loop {
        // The request head, rewritten for the upstream into `out`.
        let head_len = loop {
            if req_filled == req_buf.len() {
                return Err(bad("request head larger than 8 KiB"));
            }
            let n = client.read(&mut req_buf[req_filled..]).await?;
            if n == 0 {
                return Ok(());
            }
            req_filled += n;
            let mut headers = [httparse::EMPTY_HEADER; 64];
            let mut req = httparse::Request::new(&mut headers);
            let httparse::Status::Complete(len) = req
                .parse(&req_buf[..req_filled])
                .map_err(|e| bad(&e.to_string()))?
            else {
                continue;
            };
            out.clear();
            out.extend_from_slice(req.method.unwrap_or("GET").as_bytes());
            out.push(b' ');
            out.extend_from_slice(req.path.unwrap_or("/").as_bytes());
            out.extend_from_slice(b" HTTP/1.1\r\n");
            for h in req.headers.iter() {
                if h.name.eq_ignore_ascii_case("content-length")
                    || h.name.eq_ignore_ascii_case("transfer-encoding")
                {
                    return Err(bad("request bodies are out of scope"));
                }
                if !hop_by_hop(h.name) {
                    header(&mut out, h.name.as_bytes(), h.value);
                }
            }
            header(&mut out, b"x-forwarded-for", forwarded_for.as_bytes());
            header(&mut out, b"x-forwarded-proto", b"http");
            out.extend_from_slice(REQUEST_ID);
            out.extend_from_slice(b"\r\n");
            break len;
        };
        req_buf.copy_within(head_len..req_filled, 0);
        req_filled -= head_len;

        let pooled = pool.borrow_mut().pop();
        let mut up = match pooled {
            Some(up) => up,
            None => {
                let up = TcpStream::connect(upstream).await?;
                up.set_nodelay(true)?;
                up
            }
        };
        up.write_all(&out).await?;

        // The response head, rewritten for the client into `out`, then the body.
        let mut resp_filled = 0;
        let (resp_head, content_length) = loop {
            if resp_filled == resp_buf.len() {
                return Err(bad("response head larger than 32 KiB"));
            }
            let n = up.read(&mut resp_buf[resp_filled..]).await?;
            if n == 0 {
                return Err(bad("upstream closed before its response"));
            }
            resp_filled += n;
            let mut headers = [httparse::EMPTY_HEADER; 64];
            let mut resp = httparse::Response::new(&mut headers);
            let httparse::Status::Complete(len) = resp
                .parse(&resp_buf[..resp_filled])
                .map_err(|e| bad(&e.to_string()))?
            else {
                continue;
            };
            let mut content_length = None;
            out.clear();
            out.extend_from_slice(b"HTTP/1.1 ");
            out.extend_from_slice(resp.code.unwrap_or(502).to_string().as_bytes());
            out.push(b' ');
            out.extend_from_slice(resp.reason.unwrap_or("").as_bytes());
            out.extend_from_slice(b"\r\n");
            for h in resp.headers.iter() {
                if h.name.eq_ignore_ascii_case("content-length") {
                    content_length = std::str::from_utf8(h.value)
                        .ok()
                        .and_then(|v| v.trim().parse::<usize>().ok());
                }
                if !hop_by_hop(h.name) {
                    header(&mut out, h.name.as_bytes(), h.value);
                }
            }
            out.extend_from_slice(REQUEST_ID);
            out.extend_from_slice(b"\r\n");
            let content_length =
                content_length.ok_or_else(|| bad("responses without Content-Length"))?;
            break (len, content_length);
        };
        let mut body = resp_filled - resp_head;
        out.extend_from_slice(&resp_buf[resp_head..resp_filled]);
        while body < content_length {
            let n = up.read(&mut resp_buf).await?;
            if n == 0 {
                return Err(bad("upstream closed within its response body"));
            }
            out.extend_from_slice(&resp_buf[..n]);
            body += n;
        }
        if body > content_length {
            return Err(bad("upstream sent more than its Content-Length"));
        }
        client.write_all(&out).await?;
        pool.borrow_mut().push(up);
    }
}
