//! The admin listener: `/metrics` (Prometheus text), `/healthz` (the process answers),
//! `/ready` (a configuration is serving and the process is not shutting down),
//! `/status` (JSON: version, reload outcome, routes, pools with endpoint health,
//! certificates), the dashboard (`/`) and its JSON (`/api/v1/status`,
//! `/api/v1/dashboard`). Bind it to a private address; with
//! `listeners.admin_token_file`, all but the probes and `/metrics` need the token.

use std::sync::Arc;
use std::time::UNIX_EPOCH;

use async_trait::async_trait;
use http::Response;
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;
use rampart_config::Action;
use serde_json::{json, Value};

use crate::generation::Generation;
use crate::health::now_ms;
use crate::live::Live;

/// The admin HTTP application.
pub struct AdminApp {
    live: Arc<Live>,
}

impl AdminApp {
    /// Admin API over the live state.
    #[must_use]
    pub fn new(live: Arc<Live>) -> Self {
        Self { live }
    }
}

#[async_trait]
impl ServeHttp for AdminApp {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let path = session.req_header().uri.path().to_string();
        let generation = self.live.current.load_full();
        let open = matches!(path.as_str(), "/metrics" | "/healthz" | "/ready");
        if !open {
            if let Some(refusal) = refusal(
                generation.config.listeners.admin_token_file.as_deref(),
                session
                    .req_header()
                    .headers
                    .get(http::header::AUTHORIZATION),
            ) {
                return refusal;
            }
        }
        match path.as_str() {
            "/" => {
                let view = crate::dashboard::view(&self.live, &generation);
                let html = if session.req_header().uri.query() == Some("body") {
                    crate::dashboard::body(&view)
                } else {
                    crate::dashboard::page(&view)
                };
                reply(200, "text/html; charset=utf-8", html.into_string().into_bytes())
            }
            "/api/v1/dashboard" => {
                let view = crate::dashboard::view(&self.live, &generation);
                let body = serde_json::to_vec_pretty(&view).expect("views always serialise");
                reply(200, "application/json", body)
            }
            "/api/v1/status" => {
                let body = serde_json::to_vec_pretty(&status(&self.live, &generation))
                    .expect("JSON values always serialise");
                reply(200, "application/json", body)
            }
            "/metrics" => reply(
                200,
                "text/plain; version=0.0.4",
                self.live.metrics.render(&generation),
            ),
            "/healthz" => reply(200, "text/plain", b"ok\n".to_vec()),
            "/ready" if self.live.is_ready() => reply(200, "text/plain", b"ready\n".to_vec()),
            "/ready" => reply(503, "text/plain", b"not ready\n".to_vec()),
            "/status" => {
                let body = serde_json::to_vec_pretty(&status(&self.live, &generation))
                    .expect("JSON values always serialise");
                reply(200, "application/json", body)
            }
            _ => reply(
                404,
                "text/plain",
                b"not found: try /, /api/v1/dashboard, /api/v1/status, /metrics, /healthz, /ready or /status\n".to_vec(),
            ),
        }
    }
}

/// Checks the request's credentials against the token in `token_file` (none: open):
/// the response refusing the request, if it is refused. The token is read at each
/// request, so replacing the file rotates it.
fn refusal(
    token_file: Option<&std::path::Path>,
    given: Option<&http::HeaderValue>,
) -> Option<Response<Vec<u8>>> {
    let file = token_file?;
    let token = match std::fs::read_to_string(file) {
        Ok(t) if !t.trim().is_empty() => t.trim().to_string(),
        Ok(_) | Err(_) => {
            tracing::error!(
                "admin token file {} is unreadable or empty: refusing every admin request",
                file.display()
            );
            return Some(reply(
                503,
                "text/plain",
                b"the admin token file is unreadable or empty; see the proxy's log\n".to_vec(),
            ));
        }
    };
    if given
        .and_then(|v| v.to_str().ok())
        .and_then(presented)
        .is_some_and(|p| constant_time_eq(p.as_bytes(), token.as_bytes()))
    {
        return None;
    }
    let mut refused = reply(
        401,
        "text/plain",
        b"send the admin token: Authorization: Bearer <token> (or Basic, token as password)\n"
            .to_vec(),
    );
    refused.headers_mut().insert(
        http::header::WWW_AUTHENTICATE,
        http::HeaderValue::from_static("Basic realm=\"rampart\", charset=\"UTF-8\""),
    );
    Some(refused)
}

/// The token in an Authorization value: Bearer, or the password of Basic.
fn presented(value: &str) -> Option<String> {
    use base64::Engine as _;
    let (scheme, rest) = value.trim().split_once(' ')?;
    if scheme.eq_ignore_ascii_case("bearer") {
        return Some(rest.trim().to_string());
    }
    if scheme.eq_ignore_ascii_case("basic") {
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(rest.trim())
            .ok()?;
        let text = String::from_utf8(decoded).ok()?;
        return text
            .split_once(':')
            .map(|(_, password)| password.to_string());
    }
    None
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn reply(status: u16, content_type: &str, body: Vec<u8>) -> Response<Vec<u8>> {
    Response::builder()
        .status(status)
        .header(http::header::CONTENT_TYPE, content_type)
        .header(http::header::CONTENT_LENGTH, body.len())
        .header(http::header::CACHE_CONTROL, "no-store")
        .body(body)
        .expect("static status and header names are valid")
}

/// The `/status` document.
#[must_use]
pub fn status(live: &Live, generation: &Generation) -> Value {
    let now = now_ms();
    let reload = live.last_reload.load();
    let last_reload = reload.as_ref().as_ref().map(|r| {
        json!({
            "at_unix": r.at.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()),
            "ok": r.error.is_none(),
            "error": r.error,
        })
    });
    let routes: Vec<Value> = generation
        .config
        .routes
        .iter()
        .map(|r| {
            let action = match &r.action {
                Action::Forward(p) => json!({ "forward": p }),
                Action::Redirect(x) => json!({ "redirect": x.location, "status": x.status }),
                Action::Respond(x) => json!({ "respond": x.status }),
            };
            json!({
                "name": r.name,
                "hosts": r.hosts.iter().map(ToString::to_string).collect::<Vec<_>>(),
                "path_prefix": r.path_prefix,
                "priority": r.priority,
                "action": action,
            })
        })
        .collect();
    let pools: serde_json::Map<String, Value> = generation
        .pools
        .values()
        .map(|p| {
            let endpoints: Vec<Value> = p
                .endpoints
                .iter()
                .map(|e| {
                    let (requests, failures) = e.state.counts();
                    json!({
                        "address": e.id,
                        "resolved": e.addr.to_string(),
                        "weight": e.weight,
                        "available": e.state.is_available(now),
                        "active_healthy": e.state.active_healthy(),
                        "ejected_for_ms": e.state.ejected_until(now).map(|u| u - now),
                        "inflight": e.state.inflight(),
                        "latency_ewma_ms": e.state.ewma_us() / 1000.0,
                        "requests": requests,
                        "failures": failures,
                    })
                })
                .collect();
            let balance = generation.config.pools.get(&p.name).map(|c| c.balance);
            (
                p.name.clone(),
                json!({ "balance": balance, "endpoints": endpoints }),
            )
        })
        .collect();
    let unix_now = std::time::SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
    let mut certificates: Vec<Value> = generation
        .certs
        .entries()
        .map(|(name, c)| json!({ "name": name, "issuer": c.issuer, "not_after_unix": c.not_after, "expires_in_seconds": c.not_after - unix_now }))
        .collect();
    certificates.sort_by(|a, b| a["name"].as_str().cmp(&b["name"].as_str()));
    json!({
        "version": generation.version,
        "ready": live.is_ready(),
        "last_reload": last_reload,
        "fleet": *live.fleet.load_full(),
        "routes": routes,
        "pools": pools,
        "certificates": certificates,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_are_bearer_or_basic_passwords() {
        assert_eq!(presented("Bearer s3cret").as_deref(), Some("s3cret"));
        // "admin:s3cret"
        assert_eq!(
            presented("Basic YWRtaW46czNjcmV0").as_deref(),
            Some("s3cret")
        );
        assert_eq!(presented("Basic !!!"), None);
        assert_eq!(presented("Digest x"), None);
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
    }

    #[test]
    fn without_a_token_file_everything_is_open_and_with_one_it_is_required() {
        assert!(refusal(None, None).is_none());
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("token");
        std::fs::write(&file, "s3cret\n").unwrap();
        let refused = refusal(Some(&file), None).unwrap();
        assert_eq!(refused.status(), 401);
        assert!(refused
            .headers()
            .contains_key(http::header::WWW_AUTHENTICATE));
        let wrong = http::HeaderValue::from_static("Bearer nope");
        assert_eq!(refusal(Some(&file), Some(&wrong)).unwrap().status(), 401);
        let right = http::HeaderValue::from_static("Bearer s3cret");
        assert!(refusal(Some(&file), Some(&right)).is_none());
        std::fs::write(&file, "").unwrap();
        assert_eq!(refusal(Some(&file), Some(&right)).unwrap().status(), 503);
    }
}
