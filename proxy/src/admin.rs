//! The admin listener: `/metrics` (Prometheus text), `/healthz` (the process answers),
//! `/ready` (a configuration is serving and the process is not shutting down) and
//! `/status` (JSON: version, reload outcome, routes, pools with endpoint health,
//! certificates). Bind it to a private address.

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
        match path.as_str() {
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
                b"not found: try /metrics, /healthz, /ready or /status\n".to_vec(),
            ),
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
