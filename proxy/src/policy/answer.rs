//! Answers the proxy gives itself: one typed value per kind of answer, and the one
//! place where each becomes a status, headers and a body. The HTTP/1 fast path writes
//! [`Answer::h1_bytes`]; the HTTP/2 fast path and Pingora's path send
//! [`Answer::response_header`] and [`Rendered::body`]. No transport writes a status
//! line or an error text of its own.
//!
//! An error the proxy answers (a refusal, no route, forbidden, rate limited, login
//! required, an upstream failure) is written in the form the client's `Accept` asks
//! for ([`Style`]): plain text, an HTML page for browsers, or an RFC 9457 problem
//! document for API clients — each with the request id, so that a user's screenshot or
//! an API client's log leads to the access log line. A gRPC client (`Content-Type:
//! application/grpc*`) gets a trailers-only gRPC response instead: HTTP 200 with the
//! `grpc-status` that matches the failure (no endpoint → UNAVAILABLE, timeout →
//! DEADLINE_EXCEEDED, rate limit → RESOURCE_EXHAUSTED, no route → UNIMPLEMENTED…).

use std::io::Write as _;

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue, CONTENT_LENGTH, CONTENT_TYPE};
use pingora::http::ResponseHeader;

use crate::access::format::json_str;
use crate::limits::Rejection;
use crate::policy::pages::ErrorPagesRt;

const TEXT: &str = "text/plain; charset=utf-8";
const HTML: &str = "text/html; charset=utf-8";
const PROBLEM: &str = "application/problem+json";
const GRPC: &str = "application/grpc";

/// The form of the body of an error the proxy answers, chosen by the request's
/// `Accept` (highest q-value wins; ties and `*/*` go to plain text).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Style {
    /// `text/plain`: what curl and scripts get (no `Accept`, or `*/*`).
    #[default]
    Text,
    /// `text/html`: what browsers ask for first.
    Html,
    /// `application/problem+json` (RFC 9457), for `application/json` or
    /// `application/problem+json`.
    Json,
    /// A gRPC call (`Content-Type: application/grpc*`): a trailers-only response whose
    /// `grpc-status` and `grpc-message` say what failed.
    Grpc,
}

impl Style {
    /// The Content-Type of an error body in this style.
    #[must_use]
    pub fn content_type(self) -> &'static str {
        match self {
            Style::Text => TEXT,
            Style::Html => HTML,
            Style::Json => PROBLEM,
            Style::Grpc => GRPC,
        }
    }

    /// The style a request with `headers` gets: gRPC for a gRPC call, else what its
    /// `Accept` asks for.
    #[must_use]
    pub fn of(headers: &http::HeaderMap) -> Style {
        let grpc = headers
            .get(CONTENT_TYPE)
            .is_some_and(|v| v.as_bytes().starts_with(GRPC.as_bytes()));
        if grpc {
            return Style::Grpc;
        }
        Style::of_accept(headers.get(http::header::ACCEPT))
    }

    /// The style `accept` asks for.
    #[must_use]
    pub fn of_accept(accept: Option<&HeaderValue>) -> Style {
        let Some(accept) = accept.and_then(|v| v.to_str().ok()) else {
            return Style::Text;
        };
        // Most requests name neither: no parse.
        if !accept.contains("html") && !accept.contains("json") {
            return Style::Text;
        }
        let mut best = (Style::Text, 0u16);
        for range in accept.split(',') {
            let mut parts = range.split(';');
            let media = parts.next().unwrap_or("").trim();
            let q = parts
                .filter_map(|p| p.trim().strip_prefix("q="))
                .find_map(parse_q)
                .unwrap_or(1000);
            let style = if media.eq_ignore_ascii_case("text/html") {
                Style::Html
            } else if media.eq_ignore_ascii_case("application/json")
                || media.eq_ignore_ascii_case("application/problem+json")
            {
                Style::Json
            } else if media.eq_ignore_ascii_case("text/plain") || media == "*/*" {
                Style::Text
            } else {
                continue;
            };
            // Strictly higher: on a tie the earlier (or plain text) stays.
            if q > best.1 {
                best = (style, q);
            }
        }
        best.0
    }
}

/// A q-value ("0.8") in thousandths.
fn parse_q(q: &str) -> Option<u16> {
    let q = q.trim();
    let (whole, frac) = q.split_once('.').unwrap_or((q, ""));
    let whole: u16 = whole.parse().ok()?;
    if whole > 1 || frac.len() > 3 || !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let frac: u16 = format!("{frac:0<3}").parse().ok()?;
    Some((whole * 1000 + frac).min(1000))
}

/// A response the proxy writes itself instead of forwarding.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Answer {
    /// A request refused before routing (limits, framing, host, method).
    Refused(Rejection),
    /// 404: no route matches.
    NotFound,
    /// 403: the route's `allow_from` does not list the client.
    Forbidden,
    /// The host or route needs a client certificate the connection did not verify
    /// for it: 403 when the handshake was for this host (no certificate sent), 421
    /// Misdirected Request when it was for another host's policy (a browser then
    /// retries on a connection of its own for this host, sending its certificate).
    ClientCertRequired {
        /// The handshake was for a host under another client-auth policy.
        misdirected: bool,
    },
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
    /// 503 from the pool's circuit breaker (open, or `max_in_flight` reached), with
    /// the seconds until a retry may pass.
    Unavailable {
        /// Whole seconds, at least 1.
        retry_after: u64,
    },
    /// An upstream error response replaced by the route's error page
    /// (`error_pages.intercept`): the upstream's status, the proxy's body.
    Intercepted(u16),
    /// The request could not be proxied (502, 503, 504, 408, …): no endpoint, an
    /// upstream failure or timeout, a body too slow.
    Failed(u16),
    /// The route's `forward_auth` service refused the request: its answer, passed on
    /// (a 401 with its challenge, a 302 to the login page, a 403).
    AuthDenied {
        /// The service's status.
        status: u16,
        /// Its Content-Type, if any.
        content_type: Option<HeaderValue>,
        /// Its other headers (Location, WWW-Authenticate, Set-Cookie, …), framing and
        /// hop-by-hop ones left out.
        headers: Vec<(HeaderName, HeaderValue)>,
        /// Its body (at most 64 KiB).
        body: Bytes,
    },
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
    /// For a gRPC call: `grpc-status` and `grpc-message` (percent-encoded).
    pub grpc: Option<(u8, HeaderValue)>,
    /// More headers, each appended (an auth service's refusal: Set-Cookie, Location…).
    pub extra: Vec<(HeaderName, HeaderValue)>,
}

impl Answer {
    /// The status code.
    #[must_use]
    pub fn status(&self) -> u16 {
        match self {
            Answer::Refused(r) => r.status(),
            Answer::NotFound => 404,
            Answer::Forbidden => 403,
            Answer::ClientCertRequired { misdirected } => {
                if *misdirected {
                    421
                } else {
                    403
                }
            }
            Answer::Redirect { status, .. }
            | Answer::Respond { status, .. }
            | Answer::AuthDenied { status, .. } => *status,
            Answer::RateLimited { .. } => 429,
            Answer::Unavailable { .. } => 503,
            Answer::Unauthorized { .. } => 401,
            Answer::AcmeChallenge(_) => 200,
            Answer::Probe { ready } => {
                if *ready {
                    200
                } else {
                    503
                }
            }
            Answer::Failed(status) | Answer::Intercepted(status) => *status,
        }
    }

    /// The body bytes sent for this answer (none for HEAD), for the access log.
    #[must_use]
    pub fn body_len(
        &self,
        head: bool,
        style: Style,
        id: Option<&HeaderValue>,
        pages: Option<&ErrorPagesRt>,
    ) -> u64 {
        if head {
            0
        } else {
            self.render(style, id, pages).body.len() as u64
        }
    }

    /// Whether the client connection closes after this answer: a refused request's
    /// body (if any) is never read, so the connection cannot carry another request.
    #[must_use]
    pub fn closes(&self) -> bool {
        matches!(
            self,
            Answer::Refused(_) | Answer::Failed(_) | Answer::Unavailable { .. }
        )
    }

    /// The status, headers and body of this answer; an error's body in `style`, with
    /// the request id `id`: the operator's page for that form when `pages` has one.
    #[must_use]
    pub fn render(
        &self,
        style: Style,
        id: Option<&HeaderValue>,
        pages: Option<&ErrorPagesRt>,
    ) -> Rendered {
        let text = || HeaderValue::from_static(TEXT);
        let fixed = |body: &'static str| Bytes::from_static(body.as_bytes());
        let status = self.status();
        let mut grpc = None;
        let mut error = |detail: &str| {
            if style == Style::Grpc {
                grpc = Some((grpc_code(status), grpc_message(detail)));
            }
            let own = pages.and_then(|p| {
                let id = id.and_then(|v| v.to_str().ok());
                p.render(style, status, title(status), detail, id)
            });
            match own {
                Some(body) => (HeaderValue::from_static(style.content_type()), body),
                None => error_body(status, detail, style, id),
            }
        };
        let header = match self {
            Answer::Redirect { location, .. } => {
                value(location).map(|v| (http::header::LOCATION, v))
            }
            Answer::RateLimited { retry_after } | Answer::Unavailable { retry_after } => {
                Some((http::header::RETRY_AFTER, HeaderValue::from(*retry_after)))
            }
            Answer::Unauthorized { challenge } => {
                value(challenge).map(|v| (http::header::WWW_AUTHENTICATE, v))
            }
            _ => None,
        };
        let (content_type, body) = match self {
            Answer::Refused(r) => error(r.reason()),
            Answer::NotFound => error("no route matches this request"),
            Answer::Forbidden => error("forbidden: this route does not serve your address"),
            Answer::ClientCertRequired { misdirected: false } => {
                error("a client certificate is required: send one signed by a CA this host trusts")
            }
            Answer::ClientCertRequired { misdirected: true } => error(
                "this connection was not authenticated for this host: open a new connection to it",
            ),
            Answer::RateLimited { .. } => {
                error("too many requests; retry after the time in Retry-After")
            }
            Answer::Unauthorized { .. } => error("authentication required"),
            Answer::Unavailable { .. } => {
                error("the service is overloaded or failing; retry after the time in Retry-After")
            }
            Answer::Failed(_) | Answer::Intercepted(_) => {
                error(&format!("{status} {}", title(status)))
            }
            Answer::Redirect { .. } => (text(), Bytes::new()),
            Answer::Respond {
                content_type, body, ..
            } => (value(content_type).unwrap_or_else(text), body.clone()),
            Answer::AcmeChallenge(key_auth) => (
                HeaderValue::from_static("application/octet-stream"),
                key_auth.clone(),
            ),
            Answer::AuthDenied {
                content_type, body, ..
            } => (content_type.clone().unwrap_or_else(text), body.clone()),
            Answer::Probe { ready: true } => (text(), fixed("ok\n")),
            Answer::Probe { ready: false } => (text(), fixed("no configuration yet\n")),
        };
        // Every 503 says when to come back (a static one too).
        let header = header.or_else(|| {
            (status == 503).then(|| (http::header::RETRY_AFTER, HeaderValue::from_static("1")))
        });
        let extra = match self {
            Answer::AuthDenied { headers, .. } => headers.clone(),
            _ => Vec::new(),
        };
        Rendered {
            // A gRPC failure travels in grpc-status, on an HTTP 200 (the gRPC spec).
            status: if grpc.is_some() { 200 } else { status },
            content_type,
            header,
            body,
            grpc,
            extra,
        }
    }

    /// The answer as an HTTP/1.1 response: the request id (`id`), `Connection: close`
    /// when `close`, an error's body in `style`, and no body bytes for a HEAD request.
    #[must_use]
    pub fn h1_bytes(
        &self,
        id: (&HeaderName, &HeaderValue),
        style: Style,
        head: bool,
        close: bool,
        pages: Option<&ErrorPagesRt>,
    ) -> Vec<u8> {
        let r = self.render(style, Some(id.1), pages);
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
        if let Some((code, message)) = &r.grpc {
            put(b"grpc-status", code.to_string().as_bytes());
            put(b"grpc-message", message.as_bytes());
        }
        for (name, v) in &r.extra {
            if name != id.0 {
                put(name.as_str().as_bytes(), v.as_bytes());
            }
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
    /// its body (an error's in `style`).
    ///
    /// # Errors
    /// When Pingora refuses a header (it validated nothing new: the values are ours).
    pub fn response_header(
        &self,
        id: Option<(&HeaderName, &HeaderValue)>,
        style: Style,
        pages: Option<&ErrorPagesRt>,
    ) -> pingora::Result<(ResponseHeader, Bytes)> {
        let r = self.render(style, id.map(|(_, v)| v), pages);
        let mut head = ResponseHeader::build(r.status, Some(5))?;
        head.insert_header(CONTENT_TYPE, r.content_type)?;
        head.insert_header(CONTENT_LENGTH, r.body.len())?;
        if let Some((name, v)) = r.header {
            head.insert_header(name, v)?;
        }
        if let Some((code, message)) = r.grpc {
            head.insert_header("grpc-status", u16::from(code))?;
            head.insert_header("grpc-message", message)?;
        }
        for (name, v) in r.extra {
            if id.is_none_or(|(id, _)| *id != name) {
                head.append_header(name, v)?;
            }
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

/// An error's body in `style`, with its content type: the detail line (and the request
/// id on a line of its own), an HTML page, or an RFC 9457 problem document. Both the
/// detail and the id are escaped (a client may choose its request id).
fn error_body(
    status: u16,
    detail: &str,
    style: Style,
    id: Option<&HeaderValue>,
) -> (HeaderValue, Bytes) {
    let id = id.map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
    let title = title(status);
    let body = match style {
        Style::Grpc => String::new(),
        Style::Text => match &id {
            Some(id) => format!("{detail}\nrequest id: {id}\n"),
            None => format!("{detail}\n"),
        },
        Style::Html => {
            let page = maud::html! {
                (maud::DOCTYPE)
                html {
                    head { meta charset="utf-8"; title { (status) " " (title) } }
                    body {
                        h1 { (status) " " (title) }
                        p { (detail) }
                        @if let Some(id) = &id { p { "Request id: " code { (id) } } }
                    }
                }
            };
            page.into_string() + "\n"
        }
        Style::Json => {
            let mut doc = format!(
                "{{\"type\":\"about:blank\",\"title\":\"{title}\",\"status\":{status},\"detail\":"
            );
            json_str(&mut doc, detail);
            if let Some(id) = &id {
                doc.push_str(",\"request_id\":");
                json_str(&mut doc, id);
            }
            doc.push_str("}\n");
            doc
        }
    };
    (
        HeaderValue::from_static(style.content_type()),
        Bytes::from(body),
    )
}

/// The gRPC status code of a failure the proxy answers with HTTP `status` (the gRPC
/// HTTP mapping, with the proxy's own meanings: 429 is its rate limit, 504 and 408
/// its timeouts).
fn grpc_code(status: u16) -> u8 {
    match status {
        400 => 13,            // INTERNAL: a malformed request
        401 => 16,            // UNAUTHENTICATED
        403 => 7,             // PERMISSION_DENIED
        404 => 12,            // UNIMPLEMENTED: no route for this method
        408 | 504 => 4,       // DEADLINE_EXCEEDED
        413 | 429 | 431 => 8, // RESOURCE_EXHAUSTED
        502 | 503 => 14,      // UNAVAILABLE: retry may help
        _ => 2,               // UNKNOWN
    }
}

/// `grpc-message`: the detail percent-encoded as the gRPC spec asks (bytes outside
/// printable ASCII, and `%`).
fn grpc_message(detail: &str) -> HeaderValue {
    HeaderValue::from_str(&crate::headers::printable(detail))
        .unwrap_or_else(|_| HeaderValue::from_static(""))
}

/// The reason phrase of `status`, or "Error" for a code without one.
fn title(status: u16) -> &'static str {
    match reason(status) {
        "" => "Error",
        r => r,
    }
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
        let bytes = Answer::RateLimited { retry_after: 3 }.h1_bytes(
            (&id.0, &id.1),
            Style::Text,
            false,
            true,
            None,
        );
        let text = String::from_utf8(bytes).unwrap();
        assert!(
            text.starts_with("HTTP/1.1 429 Too Many Requests\r\n"),
            "{text}"
        );
        assert!(text.contains("retry-after: 3\r\n"));
        assert!(text.contains("x-request-id: r1\r\n"));
        assert!(text.contains("connection: close\r\n"));
        assert!(text.ends_with(
            "\r\n\r\ntoo many requests; retry after the time in Retry-After\nrequest id: r1\n"
        ));

        let head = Answer::Failed(503).h1_bytes((&id.0, &id.1), Style::Text, true, false, None);
        let head = String::from_utf8(head).unwrap();
        // "503 Service Unavailable\nrequest id: r1\n"
        assert!(head.contains("content-length: 39\r\n"), "{head}");
        assert!(head.contains("retry-after: 1\r\n"));
        assert!(head.ends_with("\r\n\r\n"), "HEAD gets no body: {head}");

        let (h2, body) = Answer::Refused(Rejection::Connect)
            .response_header(Some((&id.0, &id.1)), Style::Text, None)
            .unwrap();
        assert_eq!(h2.status.as_u16(), 405);
        assert_eq!(&body[..], b"CONNECT is not supported\nrequest id: r1\n");
        assert_eq!(h2.headers["content-length"], "40");
    }

    #[test]
    fn the_accept_header_chooses_the_form_of_an_error() {
        let of = |v: &'static str| Style::of_accept(Some(&HeaderValue::from_static(v)));
        assert_eq!(Style::of_accept(None), Style::Text);
        assert_eq!(of("*/*"), Style::Text);
        // Firefox and Chrome.
        assert_eq!(
            of("text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"),
            Style::Html
        );
        assert_eq!(of("application/json"), Style::Json);
        assert_eq!(of("application/problem+json"), Style::Json);
        assert_eq!(of("application/json;q=0.5, text/html;q=0.9"), Style::Html);
        assert_eq!(of("text/html;q=0.2, application/json"), Style::Json);
        assert_eq!(of("text/plain, text/html;q=0.5"), Style::Text);
        // A tie keeps plain text; q=0 refuses a form.
        assert_eq!(of("*/*, application/json"), Style::Text);
        assert_eq!(of("application/json;q=0, */*;q=0.1"), Style::Text);
        // Nonsense q-values are taken as 1, as if absent.
        assert_eq!(of("application/json;q=2.5"), Style::Json);
        assert_eq!(of("image/png"), Style::Text);
    }

    #[test]
    fn an_error_page_and_problem_document_carry_the_request_id_escaped() {
        let id = HeaderValue::from_static("<id\">");
        let r = Answer::Failed(502).render(Style::Html, Some(&id), None);
        assert_eq!(r.content_type, "text/html; charset=utf-8");
        let html = std::str::from_utf8(&r.body).unwrap();
        assert!(html.contains("<title>502 Bad Gateway</title>"), "{html}");
        assert!(html.contains("<code>&lt;id&quot;&gt;</code>"), "{html}");
        assert!(!html.contains("<id"), "{html}");

        let r = Answer::NotFound.render(Style::Json, Some(&id), None);
        assert_eq!(r.content_type, "application/problem+json");
        let doc: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(doc["status"], 404);
        assert_eq!(doc["title"], "Not Found");
        assert_eq!(doc["detail"], "no route matches this request");
        assert_eq!(doc["request_id"], "<id\">");

        // Answers that are not errors keep their own bodies in every form.
        let ok = Answer::Probe { ready: true }.render(Style::Html, Some(&id), None);
        assert_eq!(&ok.body[..], b"ok\n");
        let moved = Answer::Redirect {
            status: 308,
            location: "https://a.test/".into(),
        }
        .render(Style::Json, Some(&id), None);
        assert!(moved.body.is_empty());
        // A 429 keeps its Retry-After whatever the form.
        let limited = Answer::RateLimited { retry_after: 2 }.render(Style::Json, None, None);
        assert_eq!(limited.header.unwrap().1, "2");
    }

    #[test]
    fn refusals_and_failures_close_the_connection() {
        assert!(Answer::Refused(Rejection::BadHost).closes());
        assert!(Answer::Failed(502).closes());
        assert!(!Answer::NotFound.closes());
        assert!(!Answer::RateLimited { retry_after: 1 }.closes());
    }
}
