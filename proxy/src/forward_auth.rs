//! Forward authentication of routes (`forward_auth`), as oauth2-proxy, Authelia and
//! Traefik's ForwardAuth middleware expect: the request's head (not its body) goes to
//! the auth service first; a 2xx answer lets the request through with the configured
//! headers copied from that answer; any other answer (a 401, a 302 to the login page)
//! goes back to the client as the service wrote it; a service that fails or is too slow
//! fails the request closed (502, 504). Part of the request policy, so every transport
//! asks the same way.

use std::net::IpAddr;
use std::sync::OnceLock;
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue};

use crate::edge::Scheme;
use crate::headers::{HOP_BY_HOP, PROTECTED};
use crate::policy::{Answer, Authority};

/// Bytes of an auth service's refusal body passed to the client at most.
const MAX_BODY: usize = 64 * 1024;

/// Request headers never sent to the auth service: hop-by-hop ones, and those that
/// frame a message or name its host (the sub-request has no body and its own host).
fn not_sent(name: &str) -> bool {
    HOP_BY_HOP.contains(&name) || PROTECTED.contains(&name) || name.starts_with("x-forwarded-")
}

/// Response headers of a refusal not passed to the client: hop-by-hop and framing
/// ones (the proxy frames the answer itself), and the type it sets apart.
fn not_passed(name: &str) -> bool {
    HOP_BY_HOP.contains(&name)
        || matches!(
            name,
            "content-length" | "transfer-encoding" | "content-type"
        )
}

/// A route's `forward_auth`, ready for requests.
#[derive(Debug)]
pub struct ForwardAuthRt {
    url: String,
    /// Copied from a 2xx answer to the upstream request; always removed from the
    /// client's.
    pub copy: Vec<HeaderName>,
    timeout: Duration,
    /// Built on first use (and kept for the generation: connections are reused).
    client: OnceLock<reqwest::Client>,
}

/// The client in `cell`, built on first use: no redirects followed, `timeout` per
/// request, idle connections kept a minute (for the sub-requests of forward_auth and
/// the mirror's copies).
pub(crate) fn lazy_client(
    cell: &OnceLock<reqwest::Client>,
    timeout: Duration,
) -> Result<&reqwest::Client, reqwest::Error> {
    if let Some(c) = cell.get() {
        return Ok(c);
    }
    let c = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(timeout)
        .pool_idle_timeout(Duration::from_secs(60))
        .build()?;
    Ok(cell.get_or_init(|| c))
}

/// What the auth service said.
#[derive(Debug)]
pub enum Verdict {
    /// Let the request through with these headers (from [`ForwardAuthRt::copy`]).
    Allow(Vec<(HeaderName, String)>),
    /// Answer the client with this.
    Deny(Answer),
}

impl ForwardAuthRt {
    /// The runtime form of `config` (validated: the names parse).
    #[must_use]
    pub fn new(config: &rampart_config::ForwardAuth) -> Self {
        Self {
            url: config.url.clone(),
            copy: config
                .copy_headers
                .iter()
                .filter_map(|n| HeaderName::from_bytes(n.as_bytes()).ok())
                .collect(),
            timeout: config.timeout.0,
            client: OnceLock::new(),
        }
    }

    fn client(&self) -> Result<&reqwest::Client, reqwest::Error> {
        lazy_client(&self.client, self.timeout)
    }

    /// Asks the auth service about the request `parts` from `client_ip` over `scheme`
    /// for `authority`.
    pub async fn check(
        &self,
        parts: &http::request::Parts,
        scheme: Scheme,
        authority: &Authority,
        client_ip: Option<IpAddr>,
    ) -> Verdict {
        let client = match self.client() {
            Ok(c) => c,
            Err(e) => {
                tracing::error!("forward_auth: building the HTTP client: {e}");
                return Verdict::Deny(Answer::Failed(502));
            }
        };
        let mut req = client.get(&self.url);
        for (name, value) in &parts.headers {
            if not_sent(name.as_str()) {
                continue;
            }
            req = req.header(name, value);
        }
        let uri = parts.uri.path_and_query().map_or("/", |pq| pq.as_str());
        req = req
            .header("x-forwarded-method", parts.method.as_str())
            .header("x-forwarded-proto", scheme.as_str())
            .header("x-forwarded-host", authority.value.clone())
            .header("x-forwarded-uri", uri);
        if let Some(ip) = client_ip {
            req = req.header("x-forwarded-for", ip.to_string());
        }
        let resp = match req.send().await {
            Ok(r) => r,
            Err(e) => return Verdict::Deny(failed(&self.url, &e)),
        };
        let status = resp.status();
        if status.is_success() {
            let copied = self
                .copy
                .iter()
                .filter_map(|name| {
                    let v = resp.headers().get(name)?.to_str().ok()?;
                    Some((name.clone(), v.to_string()))
                })
                .collect();
            return Verdict::Allow(copied);
        }
        if status.is_informational() {
            tracing::warn!("forward_auth: {} answered {status}", self.url);
            return Verdict::Deny(Answer::Failed(502));
        }
        let content_type = resp.headers().get(http::header::CONTENT_TYPE).cloned();
        let headers: Vec<(HeaderName, HeaderValue)> = resp
            .headers()
            .iter()
            .filter(|(n, _)| !not_passed(n.as_str()))
            .map(|(n, v)| (n.clone(), v.clone()))
            .collect();
        let body = match read_capped(resp).await {
            Ok(b) => b,
            Err(e) => return Verdict::Deny(failed(&self.url, &e)),
        };
        Verdict::Deny(Answer::AuthDenied {
            status: status.as_u16(),
            content_type,
            headers,
            body,
        })
    }
}

/// The body of a refusal, at most [`MAX_BODY`] bytes (the rest is cut off).
async fn read_capped(mut resp: reqwest::Response) -> Result<Bytes, reqwest::Error> {
    let mut body = Vec::new();
    while let Some(chunk) = resp.chunk().await? {
        let room = MAX_BODY - body.len();
        body.extend_from_slice(&chunk[..chunk.len().min(room)]);
        if body.len() == MAX_BODY {
            break;
        }
    }
    Ok(Bytes::from(body))
}

/// An auth service that did not answer: 504 when it was too slow, else 502.
fn failed(url: &str, e: &reqwest::Error) -> Answer {
    tracing::warn!("forward_auth: {url}: {e}");
    Answer::Failed(if e.is_timeout() { 504 } else { 502 })
}
