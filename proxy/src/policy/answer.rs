//! Answers the proxy gives itself: one typed value per kind of answer, and the one
//! place where each becomes a status, headers and a body. The HTTP/1 fast path writes
//! [`Answer::h1_bytes`]; the HTTP/2 fast path and Pingora's path send
//! [`Answer::response_header`] and [`Rendered::body`]. No transport writes a status
//! line or an error text of its own.

use std::io::Write as _;

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue, CONTENT_LENGTH, CONTENT_TYPE};
use pingora::http::ResponseHeader;

use crate::limits::Rejection;

const TEXT: &str = "text/plain; charset=utf-8";

/// A response the proxy writes itself instead of forwarding.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Answer {
    /// A request refused before routing (limits, framing, host, method).
    Refused(Rejection),
    /// 404: no route matches.
    NotFound,
    /// 403: the route's `allow_from` does not list the client.
    Forbidden,
    /// A redirect: the route's own, or plain HTTP to HTTPS (308).
    Redirect {
        /// 301, 302, 303, 307 or 308.
        status: u16,
        /// The `Location`.
        location: String,
    },
    /// 429 from the route's rate limit, with the seconds until a retry may pass.
    RateLimited {
        /// Whole seconds, at least 1.
        retry_after: u64,
    },
    /// 401 from the route's `basic_auth`.
    Unauthorized {
        /// The `WWW-Authenticate` value.
        challenge: String,
    },
    /// The route's static `respond`.
    Respond {
        /// Status.
        status: u16,
        /// Content-Type.
        content_type: String,
        /// Body.
        body: Bytes,
    },
    /// 200 with the key authorisation of an ACME HTTP-01 challenge.
    AcmeChallenge(Bytes),
    /// The controller's probe: 200 once a configuration is served, else 503.
    Probe {
        /// A configuration (version > 0) is served.
        ready: bool,
    },
    /// The request could not be proxied (502, 503, 504, 408, …): no endpoint, an
    /// upstream failure or timeout, a body too slow.
    Failed(u16),
}

/// An answer as status, headers and body.
#[derive(Clone, Debug)]
pub struct Rendered {
    /// Status.
    pub status: u16,
    /// Content-Type.
    pub content_type: HeaderValue,
    /// One more header (Location, Retry-After, WWW-Authenticate).
    pub header: Option<(HeaderName, HeaderValue)>,
    /// Body (not sent for HEAD).
    pub body: Bytes,
}

impl Answer {
    /// The status code.
    #[must_use]
    pub fn status(&self) -> u16 {
        match self {
            Answer::Refused(r) => r.status(),
            Answer::NotFound => 404,
            Answer::Forbidden => 403,
            Answer::Redirect { status, .. } | Answer::Respond { status, .. } => *status,
            Answer::RateLimited { .. } => 429,
            Answer::Unauthorized { .. } => 401,
            Answer::AcmeChallenge(_) => 200,
            Answer::Probe { ready } => {
                if *ready {
                    200
                } else {
                    503
                }
            }
            Answer::Failed(status) => *status,
        }
    }

    /// The body bytes sent for this answer (none for HEAD), for the access log.
    #[must_use]
    pub fn body_len(&self, head: bool) -> u64 {
        if head {
            0
        } else {
            self.render().body.len() as u64
        }
    }

    /// Whether the client connection closes after this answer: a refused request's
    /// body (if any) is never read, so the connection cannot carry another request.
    #[must_use]
    pub fn closes(&self) -> bool {
        matches!(self, Answer::Refused(_) | Answer::Failed(_))
    }

    /// The status, headers and body of this answer.
    #[must_use]
    pub fn render(&self) -> Rendered {
        let text = HeaderValue::from_static(TEXT);
        let fixed = |body: &'static str| Bytes::from_static(body.as_bytes());
        let (content_type, header, body) = match self {
            Answer::Refused(r) => (text, None, Bytes::from(format!("{}\n", r.reason()))),
            Answer::NotFound => (text, None, fixed("no route matches this request\n")),
            Answer::Forbidden => (
                text,
                None,
                fixed("forbidden: this route does not serve your address\n"),
            ),
            Answer::Redirect { location, .. } => (
                text,
                value(location).map(|v| (http::header::LOCATION, v)),
                Bytes::new(),
            ),
            Answer::RateLimited { retry_after } => (
                text,
                Some((http::header::RETRY_AFTER, HeaderValue::from(*retry_after))),
                fixed("too many requests; retry after the time in Retry-After\n"),
            ),
            Answer::Unauthorized { challenge } => (
                text,
                value(challenge).map(|v| (http::header::WWW_AUTHENTICATE, v)),
                fixed("authentication required\n"),
            ),
            Answer::Respond {
                content_type, body, ..
            } => (value(content_type).unwrap_or(text), None, body.clone()),
            Answer::AcmeChallenge(key_auth) => (
                HeaderValue::from_static("application/octet-stream"),
                None,
                key_auth.clone(),
            ),
            Answer::Probe { ready: true } => (text, None, fixed("ok\n")),
            Answer::Probe { ready: false } => (text, None, fixed("no configuration yet\n")),
            Answer::Failed(status) => (text, None, Bytes::from(error_text(*status))),
        };
        let status = self.status();
        // Every 503 says when to come back (a static one too).
        let header = header.or_else(|| {
            (status == 503).then(|| (http::header::RETRY_AFTER, HeaderValue::from_static("1")))
        });
        Rendered {
            status,
            content_type,
            header,
            body,
        }
    }

    /// The answer as an HTTP/1.1 response: the request id (`id`), `Connection: close`
    /// when `close`, and no body bytes for a HEAD request.
    #[must_use]
    pub fn h1_bytes(&self, id: (&HeaderName, &HeaderValue), head: bool, close: bool) -> Vec<u8> {
        let r = self.render();
        let mut out = Vec::with_capacity(192 + r.body.len());
        let reason = reason(r.status);
        // Writes into a Vec cannot fail.
        let _ = write!(out, "HTTP/1.1 {} {reason}\r\n", r.status);
        let mut put = |name: &[u8], v: &[u8]| {
            out.extend_from_slice(name);
            out.extend_from_slice(b": ");
            out.extend_from_slice(v);
            out.extend_from_slice(b"\r\n");
        };
        put(b"content-type", r.content_type.as_bytes());
        put(b"content-length", r.body.len().to_string().as_bytes());
        if let Some((name, v)) = &r.header {
            put(name.as_str().as_bytes(), v.as_bytes());
        }
        put(id.0.as_str().as_bytes(), id.1.as_bytes());
        if close {
            put(b"connection", b"close");
        }
        out.extend_from_slice(b"\r\n");
        if !head {
            out.extend_from_slice(&r.body);
        }
        out
    }

    /// The answer's head for HTTP/2 and Pingora's session, with the request id, and
    /// its body.
    ///
    /// # Errors
    /// When Pingora refuses a header (it validated nothing new: the values are ours).
    pub fn response_header(
        &self,
        id: Option<(&HeaderName, &HeaderValue)>,
    ) -> pingora::Result<(ResponseHeader, Bytes)> {
        let r = self.render();
        let mut head = ResponseHeader::build(r.status, Some(5))?;
        head.insert_header(CONTENT_TYPE, r.content_type)?;
        head.insert_header(CONTENT_LENGTH, r.body.len())?;
        if let Some((name, v)) = r.header {
            head.insert_header(name, v)?;
        }
        if let Some((name, v)) = id {
            head.insert_header(name.clone(), v.clone())?;
        }
        Ok((head, r.body))
    }
}

fn value(s: &str) -> Option<HeaderValue> {
    HeaderValue::from_str(s).ok()
}

fn reason(status: u16) -> &'static str {
    http::StatusCode::from_u16(status)
        .ok()
        .and_then(|s| s.canonical_reason())
        .unwrap_or("")
}

/// The body of an error the proxy answers: `502 Bad Gateway\n`.
#[must_use]
pub fn error_text(status: u16) -> String {
    let reason = match reason(status) {
        "" => "error",
        r => r,
    };
    format!("{status} {reason}\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_answer_renders_its_status_headers_and_body() {
        let id = (
            HeaderName::from_static("x-request-id"),
            HeaderValue::from_static("r1"),
        );
        let bytes = Answer::RateLimited { retry_after: 3 }.h1_bytes((&id.0, &id.1), false, true);
        let text = String::from_utf8(bytes).unwrap();
        assert!(
            text.starts_with("HTTP/1.1 429 Too Many Requests\r\n"),
            "{text}"
        );
        assert!(text.contains("retry-after: 3\r\n"));
        assert!(text.contains("x-request-id: r1\r\n"));
        assert!(text.contains("connection: close\r\n"));
        assert!(text.ends_with("\r\n\r\ntoo many requests; retry after the time in Retry-After\n"));

        let head = Answer::Failed(503).h1_bytes((&id.0, &id.1), true, false);
        let head = String::from_utf8(head).unwrap();
        assert!(head.contains("content-length: 24\r\n"), "{head}");
        assert!(head.contains("retry-after: 1\r\n"));
        assert!(head.ends_with("\r\n\r\n"), "HEAD gets no body: {head}");

        let (h2, body) = Answer::Refused(Rejection::Connect)
            .response_header(Some((&id.0, &id.1)))
            .unwrap();
        assert_eq!(h2.status.as_u16(), 405);
        assert_eq!(&body[..], b"CONNECT is not supported\n");
        assert_eq!(h2.headers["content-length"], "25");
    }

    #[test]
    fn refusals_and_failures_close_the_connection() {
        assert!(Answer::Refused(Rejection::BadHost).closes());
        assert!(Answer::Failed(502).closes());
        assert!(!Answer::NotFound.closes());
        assert!(!Answer::RateLimited { retry_after: 1 }.closes());
    }
}
