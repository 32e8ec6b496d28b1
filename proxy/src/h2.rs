//! The HTTP/2 fast path: a request without a body, or with a declared length of up to
//! 64 KiB (read whole first), that goes to a `forward` route is
//! proxied by the same code as the HTTP/1 fast path ([`h1`](crate::h1)): the same
//! policy functions, the per-worker upstream pool, one upstream head written at once.
//! HTTP/2 framing (the codec, flow control, stream acceptance and its checks) stays
//! Pingora's and the `h2` crate's; only what Pingora's proxy would do between the
//! request head and the response is replaced. Anything else (`CONNECT`, static
//! answers, rejections, bodies of unknown length or over 64 KiB) goes to Pingora's
//! proxy with the stream untouched.
//!
//! Why: with HTTP/2 clients, Pingora's request cycle spent 2.5× nginx's user-space CPU
//! per request (loadtest/README.md). `server.http2_fast_path = false` turns this off.

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue, CONTENT_LENGTH, CONTENT_TYPE, COOKIE, HOST};
use http::Method;
use pingora::http::ResponseHeader;
use pingora::protocols::http::v2::server::HttpSession;
use prometheus::IntCounter;

use crate::generation::{Generation, RouteRt};
use crate::h1::{
    admit, body_failed, finish_upstream_head, parse_length, proxy_request, push_header,
    request_line, route_for, ConnInfo, Downstream, FinalHead, HopByHop, Prepared, MAX_BODY,
    MAX_HEADERS,
};
use crate::headers::{hop_by_hop, joined_cookies};
use crate::metrics::Metrics;

/// Serves the request of an HTTP/2 stream, or hands the stream back for Pingora.
pub async fn serve(
    mut session: HttpSession,
    generation: Arc<Generation>,
    conn: ConnInfo<'_>,
) -> Option<HttpSession> {
    let started = Instant::now();
    let Some(mut request) = prepare(&session, &generation, conn) else {
        return Some(session);
    };
    session.set_write_timeout(Some(generation.config.limits.send_timeout.0));
    // A rate-limited request is answered without its body (dropping the stream resets
    // what the client still sends).
    if request.body_missing > 0 && request.limited.is_none() {
        if let Err(status) = read_body(&mut session, &mut request, &generation, started).await {
            let mut client = Http2Client {
                session: &mut session,
            };
            body_failed(&mut client, status, &request, &generation, conn, started).await;
            return None;
        }
    }
    let mut client = Http2Client {
        session: &mut session,
    };
    proxy_request(&mut client, &request, &generation, conn, started).await;
    // A response that did not end (the upstream failed mid-body) is reset when the
    // session is dropped: the client sees the stream fail, never a truncated success.
    None
}

/// Decides whether this path serves the stream's request and prepares it; `None` sends
/// it to Pingora.
fn prepare(session: &HttpSession, generation: &Generation, conn: ConnInfo<'_>) -> Option<Prepared> {
    let req = session.req_header();
    if req.method == Method::CONNECT {
        return None;
    }
    // A body is taken when its length is declared and this path buffers it; one of
    // unknown length, or a larger one, Pingora streams.
    let body_len = if session.is_body_empty() {
        0
    } else {
        let mut lengths = req.headers.get_all(CONTENT_LENGTH).iter();
        let (Some(length), None) = (lengths.next(), lengths.next()) else {
            return None;
        };
        parse_length(length.as_bytes()).filter(|&n| n <= MAX_BODY)?
    };
    let route = route_for(req, None, body_len, generation, conn)?;
    let prepared = admit(req, route, generation, conn, false, |id, route| {
        upstream_head(req, req.raw_path(), generation, conn, id, route)
    });
    Some(prepared.with_body(body_len, &[]))
}

/// Reads the request body from the stream into the upstream request, under the full
/// path's rules (see `h1`'s): 400 when a read takes longer than
/// `limits.body_read_timeout` or the body is not as long as declared, 408 when it comes
/// slower than `limits.min_body_rate`; `Err(0)` when the client reset the stream.
async fn read_body(
    session: &mut HttpSession,
    request: &mut Prepared,
    generation: &Generation,
    started: Instant,
) -> Result<(), u16> {
    let limits = &generation.config.limits;
    loop {
        let read = tokio::time::timeout(limits.body_read_timeout.0, session.read_body_bytes());
        match read.await {
            Ok(Ok(Some(data))) => {
                if data.len() > request.body_missing {
                    return Err(400);
                }
                request.body_missing -= data.len();
                request.upstream_head.extend_from_slice(&data);
            }
            Ok(Ok(None)) if request.body_missing == 0 => return Ok(()),
            Ok(Ok(None)) | Err(_) => return Err(400),
            Ok(Err(_)) => return Err(0),
        }
        if request.body_too_slow(limits, started) {
            return Err(408);
        }
    }
}

/// The HTTP/1.1 request head sent upstream for an HTTP/2 request: its method and path,
/// `Host` from the Host header or else `:authority`, the headers without hop-by-hop
/// ones, cookies as one field (RFC 9113 §8.2.3), and the forwarding headers and
/// request id set as `edge` sets them.
fn upstream_head(
    req: &http::request::Parts,
    raw_path: &[u8],
    generation: &Generation,
    conn: ConnInfo<'_>,
    request_id: &HeaderValue,
    route: &RouteRt,
) -> Vec<u8> {
    let headers = &req.headers;
    let host = match headers.get(HOST) {
        Some(h) => h.as_bytes(),
        None => req
            .uri
            .authority()
            .map_or(&b""[..], |a| a.as_str().as_bytes()),
    };
    let stripped = route.strip_prefix.as_deref();
    let forwarded = conn.peer.map(|peer| {
        generation.forwarding.forwarded_headers(
            peer,
            conn.scheme.as_str(),
            std::str::from_utf8(host).unwrap_or(""),
            headers,
            stripped,
        )
    });
    let forwarded = forwarded.unwrap_or_default();
    let id_name = &generation.forwarding.request_id;
    let hop = hop_by_hop(headers, false);
    let mut out = request_line(req.method.as_str(), raw_path, &req.uri, stripped);
    let edits = &route.request_headers;
    if !edits.drops("host") {
        push_header(&mut out, b"host", host);
    }
    for (name, value) in headers {
        if name == HOST
            || name == COOKIE
            || hop.contains(name)
            || name == id_name
            || forwarded.iter().any(|(n, _)| name.as_str() == *n)
            || edits.drops(name.as_str())
        {
            continue;
        }
        push_header(&mut out, name.as_str().as_bytes(), value.as_bytes());
    }
    if let Some(cookies) = joined_cookies(headers).filter(|_| !edits.drops("cookie")) {
        push_header(&mut out, b"cookie", &cookies);
    }
    finish_upstream_head(&mut out, &forwarded, edits, id_name, request_id);
    out
}

/// An HTTP/2 stream: the response goes out as a HEADERS frame and DATA frames.
struct Http2Client<'a> {
    session: &'a mut HttpSession,
}

impl Http2Client<'_> {
    /// Sends `header` and then `body`, ending the stream with the last frame when `end`.
    async fn send(&mut self, header: ResponseHeader, body: &[u8], end: bool) -> bool {
        let header_ends = end && body.is_empty();
        if self
            .session
            .write_response_header(Box::new(header), header_ends)
            .is_err()
        {
            return false;
        }
        header_ends || self.body(body, end).await
    }
}

impl Downstream for Http2Client<'_> {
    const PAYLOAD: bool = true;

    fn counter(metrics: &Metrics) -> &IntCounter {
        &metrics.http2_fast_path_requests
    }

    async fn head(
        &mut self,
        raw: &[u8],
        head: &FinalHead,
        request: &Prepared,
        generation: &Generation,
        _close: bool,
        body: &[u8],
        end: bool,
    ) -> bool {
        let Some(header) = response_header(raw, head.status, request, generation) else {
            return false;
        };
        self.send(header, body, end).await
    }

    async fn body(&mut self, bytes: &[u8], end: bool) -> bool {
        if bytes.is_empty() && !end {
            return true;
        }
        self.session
            .write_body(Bytes::copy_from_slice(bytes), end)
            .await
            .is_ok()
    }

    async fn local(
        &mut self,
        status: u16,
        body: &str,
        request: &Prepared,
        generation: &Generation,
        extra: Option<(&str, u64)>,
        _close: bool,
    ) -> bool {
        let Ok(mut header) = ResponseHeader::build(status, Some(5)) else {
            return false;
        };
        let id = generation.forwarding.request_id.clone();
        let set = header
            .insert_header(CONTENT_TYPE, "text/plain; charset=utf-8")
            .and_then(|_| header.insert_header(CONTENT_LENGTH, body.len()))
            .and_then(|_| match extra {
                Some((name, value)) => header.insert_header(name.to_string(), value),
                None => Ok(()),
            })
            .and_then(|_| match status {
                503 => header.insert_header(http::header::RETRY_AFTER, 1),
                _ => Ok(()),
            })
            .and_then(|_| header.insert_header(id, request.request_id.clone()));
        if set.is_err() {
            return false;
        }
        let body = if request.head_request { "" } else { body };
        self.send(header, body.as_bytes(), true).await
    }
}

/// The response head for an HTTP/2 client: the upstream's status and headers without
/// hop-by-hop ones (HTTP/2 has no connection-specific fields), with the request id.
/// `None` when the upstream sent a header that cannot be represented.
fn response_header(
    raw: &[u8],
    status: u16,
    request: &Prepared,
    generation: &Generation,
) -> Option<ResponseHeader> {
    let mut raw_headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut raw_headers);
    // Parsed before: cannot fail.
    let _ = resp.parse(raw);
    let id_name = &generation.forwarding.request_id;
    let hop = HopByHop::of(resp.headers);
    let edits = &generation.routes[request.route].response_headers;
    let mut header =
        ResponseHeader::build(status, Some(resp.headers.len() + edits.set.len() + 2)).ok()?;
    for h in resp.headers.iter() {
        if hop.contains(h.name)
            || id_name.as_str().eq_ignore_ascii_case(h.name)
            || edits.drops(h.name)
        {
            continue;
        }
        let name = HeaderName::from_bytes(h.name.as_bytes()).ok()?;
        let value = HeaderValue::from_bytes(h.value).ok()?;
        header.append_header(name, value).ok()?;
    }
    for (name, value) in &edits.set {
        header.append_header(name.clone(), value.clone()).ok()?;
    }
    header
        .insert_header(id_name.clone(), request.request_id.clone())
        .ok()?;
    Some(header)
}
