//! The controller's admin listener: `/metrics`, `/status` (JSON: snapshot version,
//! instances, discovery providers) and `/healthz`. Plain HTTP: bind it to a private
//! address.

use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::State;

/// Serves the admin API on `listener` until `shutdown` turns true.
pub async fn serve(state: Arc<State>, listener: TcpListener, mut shutdown: watch::Receiver<bool>) {
    loop {
        let Some((tcp, _)) = accept(&listener, &mut shutdown, "admin").await else {
            return;
        };
        let state = state.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let state = state.clone();
                async move {
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
        "/status" => (
            StatusCode::OK,
            "application/json",
            serde_json::to_string_pretty(&state.status()).unwrap_or_default(),
        ),
        _ => (
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found; try /status, /metrics or /healthz\n".to_string(),
        ),
    };
    Response::builder()
        .status(status)
        .header(http::header::CONTENT_TYPE, ctype)
        .body(Full::new(Bytes::from(body)))
        .expect("static response parts are valid")
}
