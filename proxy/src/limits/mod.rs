//! Request limits: size and count of headers, ambiguous framing (request smuggling),
//! dot-segments in paths, body size; and [`deadline`], the per-connection header read
//! deadline (slowloris).
//!
//! [`check_request`] is pure: it sees the parsed request header and says which status
//! to answer with, if any.

pub mod breaker;
pub mod deadline;
pub mod rate;

use http::{HeaderMap, Method, Uri};

use crate::headers::{tokens, FORWARDING, PROTECTED};

/// Why a request is refused before routing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rejection {
    /// 431: request line and headers exceed `limits.max_header_bytes`.
    HeaderTooLarge,
    /// 431: more headers than `limits.max_header_count`.
    TooManyHeaders,
    /// 400: both Content-Length and Transfer-Encoding (smuggling).
    ContentLengthWithTransferEncoding,
    /// 400: several different or unparsable Content-Length values.
    BadContentLength,
    /// 400: a path with `..` or `.` segments, which upstreams may resolve differently.
    DotSegments,
    /// 400: no host (HTTP/1.1 without Host, HTTP/2 without :authority).
    MissingHost,
    /// 413: declared body larger than the route's limit.
    BodyTooLarge,
    /// 400: a Host (or authority) that is not `host[:port]`.
    BadHost,
    /// 400: the target's authority (absolute-form, `:authority`) and Host differ, or
    /// several Host fields.
    AuthorityMismatch,
    /// 400: a request target with a fragment (`#…`), which is never sent on the wire.
    Fragment,
    /// 405: CONNECT; no route tunnels.
    Connect,
    /// 400: an HTTP/2 request whose DATA frames do not match its Content-Length.
    BodyLengthMismatch,
    /// 400: `Connection` names a field the proxy routes on, frames by or sets (Host,
    /// Content-Length, Transfer-Encoding, X-Forwarded-*), a pseudo-header, something
    /// that is not a token, or too many.
    BadConnection,
}

impl Rejection {
    /// The status answered.
    #[must_use]
    pub fn status(self) -> u16 {
        match self {
            Rejection::HeaderTooLarge | Rejection::TooManyHeaders => 431,
            Rejection::BodyTooLarge => 413,
            Rejection::Connect => 405,
            _ => 400,
        }
    }

    /// A short reason, used as the response body and in logs.
    #[must_use]
    pub fn reason(self) -> &'static str {
        match self {
            Rejection::HeaderTooLarge => "request header fields too large",
            Rejection::TooManyHeaders => "too many request header fields",
            Rejection::ContentLengthWithTransferEncoding => {
                "both Content-Length and Transfer-Encoding are present"
            }
            Rejection::BadContentLength => "invalid or conflicting Content-Length",
            Rejection::DotSegments => "dot-segments are not allowed in the path",
            Rejection::MissingHost => "missing Host header",
            Rejection::BodyTooLarge => "request body too large",
            Rejection::BadHost => "invalid Host: expected host[:port]",
            Rejection::AuthorityMismatch => {
                "the request target's authority and the Host header differ"
            }
            Rejection::Fragment => "a fragment (#) is not allowed in the request target",
            Rejection::Connect => "CONNECT is not supported",
            Rejection::BodyLengthMismatch => "the request body does not match its Content-Length",
            Rejection::BadConnection => {
                "Connection may not name Host, the framing fields, X-Forwarded-* or more than 9 tokens"
            }
        }
    }
}

/// Header limits in force.
#[derive(Clone, Copy, Debug)]
pub struct HeaderLimits {
    /// Maximum request line plus headers, in bytes.
    pub max_bytes: usize,
    /// Maximum number of headers.
    pub max_count: usize,
}

/// The parts of a request header that [`check_request`] looks at.
#[derive(Clone, Copy, Debug)]
pub struct RequestView<'a> {
    /// Method.
    pub method: &'a Method,
    /// Request target.
    pub uri: &'a Uri,
    /// Headers.
    pub headers: &'a HeaderMap,
    /// The raw HTTP/1 request header as received, when there is one. Pingora drops
    /// Content-Length when Transfer-Encoding is present; the raw bytes still show it.
    pub raw: Option<&'a [u8]>,
}

/// Checks a request header against the limits and framing rules; returns its declared
/// Content-Length (parsed once here, for the caller's body checks).
///
/// # Errors
/// The [`Rejection`] to answer with.
pub fn check_request(req: RequestView<'_>, limits: HeaderLimits) -> Result<Option<u64>, Rejection> {
    if req.headers.len() > limits.max_count {
        return Err(Rejection::TooManyHeaders);
    }
    let size = req.raw.map_or_else(
        || {
            let line = req.method.as_str().len() + req.uri.to_string().len() + 12;
            line + req
                .headers
                .iter()
                .map(|(k, v)| k.as_str().len() + v.len() + 4)
                .sum::<usize>()
        },
        <[u8]>::len,
    );
    if size > limits.max_bytes {
        return Err(Rejection::HeaderTooLarge);
    }
    let has_te = req.headers.contains_key(http::header::TRANSFER_ENCODING);
    let has_cl = req.headers.contains_key(http::header::CONTENT_LENGTH)
        || req.raw.is_some_and(raw_has_content_length);
    if has_te && has_cl {
        return Err(Rejection::ContentLengthWithTransferEncoding);
    }
    let declared = content_length(req.headers)?;
    check_connection(req.headers)?;
    if has_dot_segments(req.uri.path()) {
        return Err(Rejection::DotSegments);
    }
    Ok(declared)
}

/// Most tokens a request's `Connection` fields may hold (as Pingora, after Envoy).
const MAX_CONNECTION_TOKENS: usize = 9;

/// Refuses a `Connection` that would remove what the proxy relies on: a field it
/// routes on or sets, a pseudo-header, a token that is not one, or too many tokens
/// (Pingora's path refuses the same, so both paths agree).
fn check_connection(headers: &HeaderMap) -> Result<(), Rejection> {
    let tchar = |b: &u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(b);
    let named = headers
        .get_all(http::header::CONNECTION)
        .iter()
        .flat_map(|v| tokens(v.as_bytes()));
    for (count, token) in named.enumerate() {
        let protected = PROTECTED
            .iter()
            .chain(FORWARDING)
            .any(|p| token.eq_ignore_ascii_case(p.as_bytes()));
        if count >= MAX_CONNECTION_TOKENS || !token.iter().all(tchar) || protected {
            return Err(Rejection::BadConnection);
        }
    }
    Ok(())
}

/// The declared Content-Length: all values (including comma lists) must agree.
///
/// # Errors
/// [`Rejection::BadContentLength`] when a value is not a number or values differ.
pub fn content_length(headers: &HeaderMap) -> Result<Option<u64>, Rejection> {
    let mut found: Option<u64> = None;
    for v in headers.get_all(http::header::CONTENT_LENGTH) {
        let s = v.to_str().map_err(|_| Rejection::BadContentLength)?;
        for part in s.split(',') {
            let part = part.trim();
            if part.is_empty() || !part.bytes().all(|b| b.is_ascii_digit()) {
                return Err(Rejection::BadContentLength);
            }
            let n: u64 = part.parse().map_err(|_| Rejection::BadContentLength)?;
            if found.is_some_and(|f| f != n) {
                return Err(Rejection::BadContentLength);
            }
            found = Some(n);
        }
    }
    Ok(found)
}

/// Whether a body of `bytes` after `elapsed` is below `min_rate` bytes per second on
/// average, once the `grace` period is over (0 disables the check).
#[must_use]
pub fn body_too_slow(
    bytes: u64,
    elapsed: std::time::Duration,
    grace: std::time::Duration,
    min_rate: u64,
) -> bool {
    min_rate > 0 && elapsed > grace && (bytes as f64) < min_rate as f64 * elapsed.as_secs_f64()
}

/// The limits a request body passed on as it arrives is held to, on every transport
/// that streams one (Pingora's path, the HTTP/2 fast path's HTTP/2 upstreams): the
/// route's `max_body_bytes`, and `limits.min_body_rate` once `body_read_timeout` is
/// over — but for a gRPC stream, whose messages come with pauses between them.
#[derive(Clone, Copy, Debug)]
pub struct StreamedBody {
    /// The most bytes the body may have.
    pub max_body: u64,
    /// The slowest average rate (bytes per second) and its grace, when checked.
    pub min_rate: Option<(u64, std::time::Duration)>,
}

/// What a body passed on as it arrives broke.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BodyBreach {
    /// Over `max_body_bytes`: 413.
    TooLarge,
    /// Slower than `min_body_rate`: 408.
    TooSlow,
}

impl StreamedBody {
    /// The limits of `limits` with the route's `max_body`; `grpc_stream` skips the rate.
    #[must_use]
    pub fn new(limits: &rampart_config::Limits, max_body: u64, grpc_stream: bool) -> Self {
        let min_rate = (limits.min_body_rate.0 > 0 && !grpc_stream)
            .then_some((limits.min_body_rate.0, limits.body_read_timeout.0));
        Self { max_body, min_rate }
    }

    /// Whether `received` bytes, the request having started at `started`, keep to the
    /// limits (the clock is read only when the rate is checked).
    ///
    /// # Errors
    /// The limit broken.
    pub fn check(&self, received: u64, started: std::time::Instant) -> Result<(), BodyBreach> {
        if received > self.max_body {
            return Err(BodyBreach::TooLarge);
        }
        let slow = self
            .min_rate
            .is_some_and(|(rate, grace)| body_too_slow(received, started.elapsed(), grace, rate));
        if slow {
            return Err(BodyBreach::TooSlow);
        }
        Ok(())
    }
}

/// Whether a raw HTTP/1 header block has a Content-Length field.
#[must_use]
pub fn raw_has_content_length(raw: &[u8]) -> bool {
    raw.split(|&b| b == b'\n').skip(1).any(|line| {
        line.iter().position(|&b| b == b':').is_some_and(|colon| {
            line[..colon]
                .trim_ascii()
                .eq_ignore_ascii_case(b"content-length")
        })
    })
}

/// Whether a path contains `.` or `..` segments, also percent-encoded (`%2e`).
#[must_use]
pub fn has_dot_segments(path: &str) -> bool {
    // On every request: no allocation. A segment is a dot-segment when it is one or two
    // dots, each written "." or "%2e" (any case).
    path.split('/').any(|seg| {
        let mut rest = seg.as_bytes();
        let mut dots = 0;
        while !rest.is_empty() && dots < 3 {
            if rest[0] == b'.' {
                rest = &rest[1..];
            } else if rest.len() >= 3 && rest[..3].eq_ignore_ascii_case(b"%2e") {
                rest = &rest[3..];
            } else {
                return false;
            }
            dots += 1;
        }
        rest.is_empty() && (dots == 1 || dots == 2)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: HeaderLimits = HeaderLimits {
        max_bytes: 1024,
        max_count: 10,
    };

    fn check(pairs: &[(&'static str, &str)], path: &str) -> Result<(), Rejection> {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, v.parse().unwrap());
        }
        let uri: Uri = path.parse().unwrap();
        check_request(
            RequestView {
                method: &Method::POST,
                uri: &uri,
                headers: &h,
                raw: None,
            },
            LIMITS,
        )
        .map(|_| ())
    }

    #[test]
    fn framing_and_size_rules() {
        assert_eq!(check(&[("host", "a")], "/"), Ok(()));
        assert_eq!(
            check(
                &[("content-length", "3"), ("transfer-encoding", "chunked")],
                "/"
            ),
            Err(Rejection::ContentLengthWithTransferEncoding)
        );
        assert_eq!(
            check(&[("content-length", "3"), ("content-length", "4")], "/"),
            Err(Rejection::BadContentLength)
        );
        assert_eq!(check(&[("content-length", "3, 3")], "/"), Ok(()));
        assert_eq!(
            check(&[("content-length", "3, 4")], "/"),
            Err(Rejection::BadContentLength)
        );
        assert_eq!(
            check(&[("content-length", "-1")], "/"),
            Err(Rejection::BadContentLength)
        );
        assert_eq!(
            check(&[("x-big", &"a".repeat(2000))], "/"),
            Err(Rejection::HeaderTooLarge)
        );
        let many: Vec<(&'static str, &str)> =
            ["a", "b", "c", "d", "e", "f", "g", "h", "i", "j", "k"]
                .iter()
                .map(|n| (*n, "1"))
                .collect();
        assert_eq!(check(&many, "/"), Err(Rejection::TooManyHeaders));
        for bad in [
            "host",
            "close, X-Forwarded-For",
            ":authority",
            "\"x-a\"",
            "a,b,c,d,e,f,g,h,i,j",
        ] {
            assert_eq!(
                check(&[("connection", bad)], "/"),
                Err(Rejection::BadConnection),
                "{bad}"
            );
        }
        assert_eq!(
            check(&[("connection", "close, x-a, keep-alive")], "/"),
            Ok(())
        );
        assert_eq!(
            check(&[("connection", "Content-Length")], "/"),
            Err(Rejection::BadConnection)
        );
    }

    #[test]
    fn content_length_is_found_in_raw_headers() {
        assert!(raw_has_content_length(
            b"POST / HTTP/1.1\r\nHost: a\r\ncontent-LENGTH : 5\r\n\r\n"
        ));
        assert!(!raw_has_content_length(
            b"POST /content-length: HTTP/1.1\r\nHost: a\r\n\r\n"
        ));
        let uri: Uri = "/".parse().unwrap();
        let raw = b"POST / HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n";
        let mut te = HeaderMap::new();
        te.insert("transfer-encoding", "chunked".parse().unwrap());
        let view = RequestView {
            method: &Method::POST,
            uri: &uri,
            headers: &te,
            raw: Some(raw),
        };
        assert_eq!(
            check_request(view, LIMITS),
            Err(Rejection::ContentLengthWithTransferEncoding)
        );
    }

    #[test]
    fn a_body_is_too_slow_only_below_the_rate_after_the_grace_period() {
        let s = std::time::Duration::from_secs;
        // Within the grace period anything goes.
        assert!(!body_too_slow(0, s(5), s(10), 256));
        // After it, the average counts: 20 s at 256 B/s needs 5120 bytes.
        assert!(body_too_slow(5000, s(20), s(10), 256));
        assert!(!body_too_slow(6000, s(20), s(10), 256));
        // 0 turns it off.
        assert!(!body_too_slow(0, s(100), s(10), 0));
    }

    #[test]
    fn a_streamed_body_keeps_to_the_route_size_and_to_the_rate_but_for_grpc_streams() {
        let limits = rampart_config::Limits::default();
        let long_ago = std::time::Instant::now()
            .checked_sub(std::time::Duration::from_secs(60))
            .unwrap();
        let upload = StreamedBody::new(&limits, 1000, false);
        assert_eq!(
            upload.check(1001, std::time::Instant::now()),
            Err(BodyBreach::TooLarge)
        );
        assert_eq!(upload.check(1000, std::time::Instant::now()), Ok(()));
        // 60 s for 10 bytes is below the default 256 B/s, past its 10 s grace.
        assert_eq!(upload.check(10, long_ago), Err(BodyBreach::TooSlow));
        // A gRPC stream pauses between messages: only its size counts.
        let stream = StreamedBody::new(&limits, 1000, true);
        assert_eq!(stream.check(10, long_ago), Ok(()));
        assert_eq!(stream.check(1001, long_ago), Err(BodyBreach::TooLarge));
    }

    #[test]
    fn dot_segments_are_refused() {
        assert!(has_dot_segments("/a/../b"));
        assert!(has_dot_segments("/a/%2E%2e/b"));
        assert!(has_dot_segments("/a/."));
        assert!(!has_dot_segments("/a/..b/c.d"));
        assert!(has_dot_segments("/a/.%2E/b"));
        assert!(has_dot_segments("%2e"));
        assert!(!has_dot_segments("/a/.../b"));
        assert!(!has_dot_segments("/a/%2e%2e%2e/b"));
        assert!(!has_dot_segments("/a/%2/b"));
        assert!(!has_dot_segments("/a//b/"));
        assert!(!has_dot_segments("/a/%2ex/b"));
        assert_eq!(check(&[], "/api/../admin"), Err(Rejection::DotSegments));
    }
}
