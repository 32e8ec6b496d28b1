//! The admin listener: `/metrics` (Prometheus text), `/healthz` (the process answers),
//! `/ready` (a configuration is serving and the process is not shutting down),
//! `/status` (JSON: version, reload outcome, routes, pools with endpoint health,
//! certificates), the dashboard (`/`) and its JSON (`/api/v1/status`,
//! `/api/v1/dashboard`, `/api/v1/errors`: the last failed requests, newest first). Bind it to a private address; with
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

/// Pages another part of the process serves on this admin listener: given the path
/// and query, the content type and body, or `None` when the path is not one of them.
/// They need the admin token like the dashboard.
#[derive(Clone)]
#[allow(clippy::type_complexity)]
pub struct AdminExtra(
    pub Arc<dyn Fn(&str, Option<&str>) -> Option<(&'static str, Vec<u8>)> + Send + Sync>,
);

impl std::fmt::Debug for AdminExtra {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AdminExtra")
    }
}

/// The admin HTTP application.
pub struct AdminApp {
    live: Arc<Live>,
    extra: Option<AdminExtra>,
}

impl AdminApp {
    /// Admin API over the live state.
    #[must_use]
    pub fn new(live: Arc<Live>) -> Self {
        Self { live, extra: None }
    }

    /// Admin API over the live state, with `extra` pages.
    #[must_use]
    pub fn with_extra(live: Arc<Live>, extra: Option<AdminExtra>) -> Self {
        Self { live, extra }
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
        if let Some(extra) = &self.extra {
            if let Some((ctype, body)) = (extra.0)(&path, session.req_header().uri.query()) {
                return reply(200, ctype, body);
            }
        }
        match path.as_str() {
            "/" => {
                let view = crate::dashboard::view(&self.live, &generation);
                let html = if session.req_header().uri.query() == Some("body") {
                    crate::dashboard::body(&view)
                } else {
                    // `rampart up`: the controller's dashboard is served beside this one.
                    let links: &[(&str, &str)] = if self.extra.is_some() {
                        &[("controller dashboard", "/controller")]
                    } else {
                        &[]
                    };
                    crate::dashboard::page(&view, links)
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
            "/api/v1/errors" => {
                let errors = self.live.metrics.recent_errors.newest_first();
                let body = serde_json::to_vec_pretty(&errors).expect("errors always serialise");
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
                b"not found: try /, /api/v1/dashboard, /api/v1/status, /api/v1/errors, /metrics, /healthz, /ready or /status\n".to_vec(),
            ),
        }
    }
}

/// The response refusing an admin request, if the token in `token_file` is required
/// and missing or wrong (see [`rampart_admin::auth`]).
fn refusal(
    token_file: Option<&std::path::Path>,
    given: Option<&http::HeaderValue>,
) -> Option<Response<Vec<u8>>> {
    use rampart_admin::auth::{check, AdminAuth, CHALLENGE};
    match check(token_file, given.and_then(|v| v.to_str().ok())) {
        AdminAuth::Open | AdminAuth::Allowed => None,
        AdminAuth::Unreadable(why) => {
            tracing::error!("admin token file: {why}; refusing every admin request");
            Some(reply(
                503,
                "text/plain",
                b"the admin token file is unreadable or empty; see the proxy's log\n".to_vec(),
            ))
        }
        AdminAuth::Refused => {
            let mut refused = reply(
                401,
                "text/plain",
                b"send the admin token: Authorization: Bearer <token> (or Basic, token as password)\n"
                    .to_vec(),
            );
            refused.headers_mut().insert(
                http::header::WWW_AUTHENTICATE,
                http::HeaderValue::from_static(CHALLENGE),
            );
            Some(refused)
        }
    }
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
            // Header names only: a value set for the upstream may be a credential.
            let rules = |h: &rampart_config::HeaderRules| {
                json!({ "set": h.set.keys().collect::<Vec<_>>(), "remove": h.remove })
            };
            json!({
                "name": r.name,
                "hosts": r.hosts.iter().map(ToString::to_string).collect::<Vec<_>>(),
                "path_prefix": r.path_prefix,
                "strip_prefix": r.strip_prefix,
                "allow_from": r.allow_from.iter().map(ToString::to_string).collect::<Vec<_>>(),
                "basic_auth": r.basic_auth.as_ref().map(|a| json!({ "realm": a.realm, "users": a.users.keys().collect::<Vec<_>>() })),
                "request_headers": rules(&r.request_headers),
                "response_headers": rules(&r.response_headers),
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
                        "last_error": e.state.last_error().map(|last| json!({
                            "ago_ms": now.saturating_sub(last.0),
                            "reason": &*last.1,
                        })),
                    })
                })
                .collect();
            let balance = generation.config.pools.get(&p.name).map(|c| c.balance);
            (
                p.name.clone(),
                json!({
                    "balance": balance,
                    "endpoints": endpoints,
                    // Below the panic threshold: ejections are ignored.
                    "panic": crate::balance::in_panic(&p.states, now, p.eject.panic_threshold),
                }),
            )
        })
        .collect();
    let unix_now = rampart_config::unix_now_signed();
    let mut certificates: Vec<Value> = generation
        .certs
        .entries()
        .map(|(name, c)| json!({ "name": name, "issuer": c.issuer, "not_after_unix": c.not_after, "expires_in_seconds": c.not_after - unix_now }))
        .collect();
    certificates.sort_by(|a, b| a["name"].as_str().cmp(&b["name"].as_str()));
    json!({
        "version": generation.version,
        "pid": std::process::id(),
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
    fn refusals_are_401_with_a_challenge_or_503_for_a_bad_token_file() {
        assert!(refusal(None, None).is_none());
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("token");
        std::fs::write(&file, "s3cret\n").unwrap();
        let refused = refusal(Some(&file), None).unwrap();
        assert_eq!(refused.status(), 401);
        assert!(refused
            .headers()
            .contains_key(http::header::WWW_AUTHENTICATE));
        let right = http::HeaderValue::from_static("Bearer s3cret");
        assert!(refusal(Some(&file), Some(&right)).is_none());
        std::fs::write(&file, "").unwrap();
        assert_eq!(refusal(Some(&file), Some(&right)).unwrap().status(), 503);
    }
}
