//! The controller's admin listener: `/metrics`, `/status` (JSON: snapshot version,
//! instances, discovery providers, DNS), `/healthz`, the dashboard (`/`) and its JSON
//! (`/api/v1/dashboard`, `/api/v1/status`). Plain HTTP: bind it to a private address;
//! with `controller.admin_token_file`, all but `/healthz` and `/metrics` need the token.

use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::State;

/// Serves the admin API on `listener` until `shutdown` turns true; `token_file` holds
/// the token required for everything but `/healthz` and `/metrics`.
pub async fn serve(
    state: Arc<State>,
    listener: TcpListener,
    token_file: Option<std::path::PathBuf>,
    mut shutdown: watch::Receiver<bool>,
) {
    let token_file = Arc::new(token_file);
    loop {
        let Some((tcp, _)) = accept(&listener, &mut shutdown, "admin").await else {
            return;
        };
        let state = state.clone();
        let token_file = token_file.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let state = state.clone();
                let token_file = token_file.clone();
                async move {
                    if !matches!(req.uri().path(), "/healthz" | "/metrics") {
                        if let Some(refused) = refusal(token_file.as_deref(), &req) {
                            return Ok(refused);
                        }
                    }
                    if req.uri().path() == "/" || req.uri().path() == "/api/v1/dashboard" {
                        return Ok(dashboard(&state, &req));
                    }
                    if req.uri().path() == "/dns/plan" {
                        return Ok::<_, std::convert::Infallible>(dns_plan(&state, req).await);
                    }
                    Ok(respond(&state, req.uri().path()))
                }
            });
            let io = hyper_util::rt::TokioIo::new(tcp);
            // A client that goes away mid-request is not worth a log line.
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(io, service)
                .await;
        });
    }
}

/// The next connection on `listener`, or `None` once `shutdown` turns true. Accept
/// errors (say, out of file descriptors) are logged and retried after a pause.
pub(crate) async fn accept(
    listener: &TcpListener,
    shutdown: &mut watch::Receiver<bool>,
    what: &str,
) -> Option<(tokio::net::TcpStream, std::net::SocketAddr)> {
    loop {
        tokio::select! {
            _ = shutdown.changed() => return None,
            r = listener.accept() => match r {
                Ok(c) => return Some(c),
                Err(e) => {
                    tracing::warn!("{what} accept: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            },
        }
    }
}

/// `POST /dns/plan` with DNS settings as JSON (the CLI sends its file's), or `GET` for
/// the running ones: the plan against the live view, without applying it.
async fn dns_plan(state: &State, req: Request<hyper::body::Incoming>) -> Response<Full<Bytes>> {
    use http_body_util::BodyExt as _;
    let reply = |status: StatusCode, body: String| {
        Response::builder()
            .status(status)
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body)))
            .expect("static response parts are valid")
    };
    let Some(dns) = &state.dns else {
        return reply(
            StatusCode::NOT_FOUND,
            "this controller has no [dns] section".into(),
        );
    };
    let settings = if req.method() == http::Method::POST {
        let body = match req.into_body().collect().await {
            Ok(b) => b.to_bytes(),
            Err(e) => return reply(StatusCode::BAD_REQUEST, format!("reading the body: {e}")),
        };
        match serde_json::from_slice::<rampart_config::DnsSettings>(&body) {
            Ok(s) => s,
            Err(e) => return reply(StatusCode::BAD_REQUEST, format!("not DNS settings: {e}")),
        }
    } else if let Some(s) = dns.settings() {
        s
    } else {
        return reply(
            StatusCode::SERVICE_UNAVAILABLE,
            "the DNS loop has not run yet".into(),
        );
    };
    let zone = dns.status().zone;
    if settings.zone.as_str() != zone {
        return reply(
            StatusCode::BAD_REQUEST,
            format!(
                "this controller manages the zone {zone}, not {}",
                settings.zone
            ),
        );
    }
    match dns.preview(&settings).await {
        Ok(status) => reply(
            StatusCode::OK,
            serde_json::to_string_pretty(&status).unwrap_or_default(),
        ),
        Err(e) => reply(
            StatusCode::BAD_GATEWAY,
            format!("reading the DNS provider: {e}"),
        ),
    }
}

/// The response refusing `req` when the admin token is required and missing or wrong.
fn refusal(
    token_file: Option<&std::path::Path>,
    req: &Request<hyper::body::Incoming>,
) -> Option<Response<Full<Bytes>>> {
    use rampart_admin::auth::{check, AdminAuth, CHALLENGE};
    let given = req
        .headers()
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    let (status, body) = match check(token_file, given) {
        AdminAuth::Open | AdminAuth::Allowed => return None,
        AdminAuth::Unreadable(why) => {
            tracing::error!("admin token file: {why}; refusing every admin request");
            (
                StatusCode::SERVICE_UNAVAILABLE,
                "the admin token file is unreadable or empty; see the controller's log\n",
            )
        }
        AdminAuth::Refused => (
            StatusCode::UNAUTHORIZED,
            "send the admin token: Authorization: Bearer <token> (or Basic, token as password)\n",
        ),
    };
    Some(
        Response::builder()
            .status(status)
            .header(http::header::CONTENT_TYPE, "text/plain")
            .header(http::header::WWW_AUTHENTICATE, CHALLENGE)
            .body(Full::new(Bytes::from_static(body.as_bytes())))
            .expect("static response parts are valid"),
    )
}

/// Which rendering of the dashboard.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Page {
    /// The whole HTML page.
    Html,
    /// The whole HTML page beside the proxy's dashboard (`rampart up`), linking to it.
    HtmlBesideProxy,
    /// The page's body alone (its refresh).
    Body,
    /// The data as JSON.
    Json,
}

/// The dashboard of `state` as `page`: content type and body. Also served by
/// `rampart up` on its proxy's admin listener.
#[must_use]
pub fn render_dashboard(state: &State, page: Page) -> (&'static str, String) {
    let now = rampart_config::unix_now();
    let snapshot = state.fleet.published.borrow().body.clone();
    let reports = state.acme.lock().expect("reports lock").clone();
    let view = crate::dashboard::view(state.status(), &snapshot, &reports, now);
    match page {
        Page::Json => (
            "application/json",
            serde_json::to_string_pretty(&view).unwrap_or_default(),
        ),
        Page::Body => (
            "text/html; charset=utf-8",
            crate::dashboard::body(&view).into_string(),
        ),
        Page::Html => (
            "text/html; charset=utf-8",
            crate::dashboard::page(&view, &[]).into_string(),
        ),
        Page::HtmlBesideProxy => (
            "text/html; charset=utf-8",
            crate::dashboard::page(&view, &[("proxy dashboard", "/")]).into_string(),
        ),
    }
}

/// The dashboard page (`/`), its body alone (`/?body`) or its JSON.
fn dashboard(state: &State, req: &Request<hyper::body::Incoming>) -> Response<Full<Bytes>> {
    let page = if req.uri().path() == "/api/v1/dashboard" {
        Page::Json
    } else if req.uri().query() == Some("body") {
        Page::Body
    } else {
        Page::Html
    };
    let (ctype, body) = render_dashboard(state, page);
    Response::builder()
        .header(http::header::CONTENT_TYPE, ctype)
        .header(http::header::CACHE_CONTROL, "no-store")
        .body(Full::new(Bytes::from(body)))
        .expect("static response parts are valid")
}

fn respond(state: &State, path: &str) -> Response<Full<Bytes>> {
    let (status, ctype, body) = match path {
        "/healthz" => (StatusCode::OK, "text/plain", "ok\n".to_string()),
        "/metrics" => {
            state
                .fleet
                .registry
                .export(&state.fleet.metrics, state.fleet.version());
            (
                StatusCode::OK,
                "text/plain; version=0.0.4",
                state.fleet.metrics.render(),
            )
        }
        "/status" | "/api/v1/status" => (
            StatusCode::OK,
            "application/json",
            serde_json::to_string_pretty(&state.status()).unwrap_or_default(),
        ),
        _ => (
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found; try /, /api/v1/dashboard, /status, /metrics or /healthz\n".to_string(),
        ),
    };
    Response::builder()
        .status(status)
        .header(http::header::CONTENT_TYPE, ctype)
        .body(Full::new(Bytes::from(body)))
        .expect("static response parts are valid")
}
