//! The fleet API (see DESIGN.md, "Fleet protocol"):
//! - `POST /v1/enroll` (no client certificate): join token + CSR → client certificate;
//! - `GET /v1/watch?after=V`: the current snapshot as soon as its version is not `V`,
//!   or `204 No Content` after the watch timeout;
//! - `POST /v1/ack`, `POST /v1/heartbeat`: what a proxy serves and that it is alive;
//! - `POST /v1/renew`: a new client certificate (same identity) for a new key;
//! - `POST /v1/on-demand`: a name seen in a handshake → whether its certificate is
//!   (being) obtained ([`crate::on_demand`]).
//!
//! Every route but enrolment needs a client certificate from the fleet CA whose
//! instance is enrolled and not revoked. Errors are JSON `{"error": "..."}` that say
//! what was wrong and how to fix it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use rampart_config::snapshot::{
    Ack, AckResult, EnrollRequest, EnrollResponse, Heartbeat, OnDemandRequest, RenewRequest,
};
use tokio::net::TcpListener;
use tokio::sync::watch;

use super::registry::InstanceRecord;
use super::tokens::{self, TokenError};
use super::{Fleet, CLIENT_CERT_LIFETIME, MAX_BODY};
use crate::on_demand::OnDemand;
use crate::store::{get_json, put_json};

type Resp = Response<Full<Bytes>>;

/// Serves the fleet API on `listener` until `shutdown` turns true.
pub async fn serve(
    fleet: Arc<Fleet>,
    on_demand: Arc<OnDemand>,
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    mut shutdown: watch::Receiver<bool>,
) {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    loop {
        let Some((tcp, peer)) = crate::admin::accept(&listener, &mut shutdown, "fleet API").await
        else {
            return;
        };
        let fleet = fleet.clone();
        let on_demand = on_demand.clone();
        let acceptor = acceptor.clone();
        let mut shutdown = shutdown.clone();
        tokio::spawn(async move {
            let tls =
                match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await {
                    Ok(Ok(s)) => s,
                    Ok(Err(e)) => {
                        tracing::debug!("fleet API handshake from {peer} failed: {e}");
                        return;
                    }
                    Err(_) => return,
                };
            let identity = tls
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .and_then(|c| rampart_pki::common_name(c));
            let service = hyper::service::service_fn(move |req| {
                let fleet = fleet.clone();
                let on_demand = on_demand.clone();
                let identity = identity.clone();
                async move {
                    Ok::<_, std::convert::Infallible>(
                        route(&fleet, &on_demand, req, peer, identity).await,
                    )
                }
            });
            let builder =
                hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
            let conn = builder.serve_connection(hyper_util::rt::TokioIo::new(tls), service);
            tokio::pin!(conn);
            tokio::select! {
                r = conn.as_mut() => if let Err(e) = r { tracing::debug!("fleet API connection from {peer}: {e}") },
                _ = shutdown.changed() => {}
            }
        });
    }
}

async fn route(
    fleet: &Fleet,
    on_demand: &OnDemand,
    req: Request<Incoming>,
    peer: SocketAddr,
    identity: Option<String>,
) -> Resp {
    let path = req.uri().path().to_string();
    match (req.method(), path.as_str()) {
        (&Method::POST, "/v1/enroll") => enroll(fleet, req).await,
        (_, "/v1/watch" | "/v1/ack" | "/v1/heartbeat" | "/v1/renew" | "/v1/on-demand") => {
            let id = match authorize(fleet, identity.as_deref()).await {
                Ok(id) => id,
                Err(resp) => return resp,
            };
            match (req.method(), path.as_str()) {
                (&Method::GET, "/v1/watch") => watch(fleet, &req).await,
                (&Method::POST, "/v1/ack") => ack(fleet, &id, req).await,
                (&Method::POST, "/v1/heartbeat") => heartbeat(fleet, &id, peer, req).await,
                (&Method::POST, "/v1/renew") => renew(fleet, &id, req).await,
                (&Method::POST, "/v1/on-demand") => match read_json::<OnDemandRequest>(req).await {
                    Ok(r) => json(StatusCode::OK, &on_demand.request(&r.name).await),
                    Err(resp) => resp,
                },
                _ => error(StatusCode::METHOD_NOT_ALLOWED, "wrong method for this path"),
            }
        }
        _ => error(StatusCode::NOT_FOUND, &format!("no fleet API route {path}")),
    }
}

fn error(status: StatusCode, message: &str) -> Resp {
    json(status, &serde_json::json!({ "error": message }))
}

fn json<T: serde::Serialize>(status: StatusCode, value: &T) -> Resp {
    let body = serde_json::to_vec(value).unwrap_or_default();
    Response::builder()
        .status(status)
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body)))
        .expect("static response parts are valid")
}

async fn read_json<T: serde::de::DeserializeOwned>(req: Request<Incoming>) -> Result<T, Resp> {
    let body = Limited::new(req.into_body(), MAX_BODY)
        .collect()
        .await
        .map_err(|e| {
            error(
                StatusCode::PAYLOAD_TOO_LARGE,
                &format!("reading the body: {e}"),
            )
        })?
        .to_bytes();
    serde_json::from_slice(&body)
        .map_err(|e| error(StatusCode::BAD_REQUEST, &format!("invalid JSON body: {e}")))
}

/// The enrolled, unrevoked instance behind a client certificate.
async fn authorize(fleet: &Fleet, identity: Option<&str>) -> Result<String, Resp> {
    let Some(id) = identity else {
        return Err(error(
            StatusCode::UNAUTHORIZED,
            "a client certificate is required; enrol first with `rampart proxy --controller URL --join-token T`",
        ));
    };
    match get_json::<InstanceRecord>(fleet.store.as_ref(), &format!("instances/{id}")).await {
        Ok(Some(r)) if !r.revoked => {
            fleet.registry.known(id, &r);
            Ok(id.to_string())
        }
        Ok(Some(r)) => {
            fleet.registry.known(id, &r);
            Err(error(
                StatusCode::FORBIDDEN,
                &format!("instance {id} is revoked; enrol again with a new join token"),
            ))
        }
        Ok(None) => Err(json(
            StatusCode::FORBIDDEN,
            &serde_json::json!({
                "error": format!("instance {id} is not enrolled with this controller (or was forgotten after controller.forget_after without a heartbeat); enrol again with a join token"),
                "code": rampart_config::snapshot::NOT_ENROLLED,
            }),
        )),
        Err(e) => Err(error(
            StatusCode::SERVICE_UNAVAILABLE,
            &format!("store: {e:#}"),
        )),
    }
}

async fn enroll(fleet: &Fleet, req: Request<Incoming>) -> Resp {
    let request: EnrollRequest = match read_json(req).await {
        Ok(r) => r,
        Err(resp) => return resp,
    };
    let result = match tokens::consume(fleet.store.as_ref(), &request.token).await {
        Ok(r) => r,
        Err(e) => return error(StatusCode::SERVICE_UNAVAILABLE, &format!("store: {e:#}")),
    };
    if let Err(e) = result {
        let label = match e {
            TokenError::Malformed => "malformed",
            TokenError::Unknown => "unknown",
            TokenError::Used => "used",
            TokenError::Expired(_) => "expired",
        };
        fleet.metrics.enrolments.with_label_values(&[label]).inc();
        tracing::warn!("enrolment refused: {e}");
        return error(StatusCode::UNAUTHORIZED, &e.to_string());
    }
    let id = format!("p-{}", &uuid::Uuid::new_v4().simple().to_string()[..16]);
    let cert_pem = match fleet
        .ca
        .sign_client(&request.csr_pem, &id, CLIENT_CERT_LIFETIME)
    {
        Ok(c) => c,
        Err(e) => {
            fleet
                .metrics
                .enrolments
                .with_label_values(&["bad_csr"])
                .inc();
            return error(StatusCode::BAD_REQUEST, &format!("{e:#}"));
        }
    };
    let record = InstanceRecord {
        hostname: request.hostname.chars().take(253).collect(),
        enrolled_at: rampart_config::unix_now(),
        revoked: false,
    };
    if let Err(e) = put_json(fleet.store.as_ref(), &format!("instances/{id}"), &record).await {
        return error(StatusCode::SERVICE_UNAVAILABLE, &format!("store: {e:#}"));
    }
    fleet.registry.known(&id, &record);
    fleet.metrics.enrolments.with_label_values(&["ok"]).inc();
    tracing::info!("enrolled proxy instance {id} ({})", record.hostname);
    json(
        StatusCode::OK,
        &EnrollResponse {
            instance: id,
            cert_pem,
            ca_pem: fleet.ca.cert_pem().to_string(),
        },
    )
}

/// Query parameter `name` of `req` parsed as a number.
fn query_u64(req: &Request<Incoming>, name: &str) -> Option<u64> {
    req.uri().query()?.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k == name).then(|| v.parse().ok()).flatten()
    })
}

async fn watch(fleet: &Fleet, req: &Request<Incoming>) -> Resp {
    let after = query_u64(req, "after").unwrap_or(0);
    let wait = query_u64(req, "wait_ms")
        .map_or(fleet.watch_timeout, Duration::from_millis)
        .min(fleet.watch_timeout);
    let mut rx = fleet.published.subscribe();
    fleet.metrics.watches_open.inc();
    let deadline = tokio::time::Instant::now() + wait;
    let result = loop {
        let current = rx.borrow_and_update().clone();
        // Any version other than the proxy's: the controller is the authority, also
        // after a restore that went back in time.
        if current.version != 0 && current.version != after {
            break Some(current);
        }
        match tokio::time::timeout_at(deadline, rx.changed()).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) | Err(_) => break None,
        }
    };
    fleet.metrics.watches_open.dec();
    match result {
        Some(p) => Response::builder()
            .status(StatusCode::OK)
            .header(http::header::CONTENT_TYPE, "application/json")
            .header("rampart-version", p.version)
            .body(Full::new(p.body))
            .expect("static response parts are valid"),
        None => Response::builder()
            .status(StatusCode::NO_CONTENT)
            .body(Full::new(Bytes::new()))
            .expect("static response parts are valid"),
    }
}

async fn ack(fleet: &Fleet, id: &str, req: Request<Incoming>) -> Resp {
    let ack: Ack = match read_json(req).await {
        Ok(a) => a,
        Err(resp) => return resp,
    };
    match ack.applied {
        AckResult::Ok => {
            fleet.metrics.acks.with_label_values(&["ok"]).inc();
            tracing::debug!("{id} serves version {}", ack.version);
        }
        AckResult::Error => {
            fleet.metrics.acks.with_label_values(&["error"]).inc();
            tracing::warn!("{id} refused version {}: {}", ack.version, ack.detail);
        }
    }
    fleet.registry.ack(id, &ack);
    json(StatusCode::OK, &serde_json::json!({}))
}

async fn heartbeat(fleet: &Fleet, id: &str, peer: SocketAddr, req: Request<Incoming>) -> Resp {
    let hb: Heartbeat = match read_json(req).await {
        Ok(h) => h,
        Err(resp) => return resp,
    };
    fleet.registry.heartbeat(id, peer.ip().to_string(), &hb);
    if fleet.shared {
        let stored = super::registry::StoredHeartbeat {
            peer: peer.ip().to_string(),
            heartbeat: hb,
            at_unix_ms: super::unix_ms(),
        };
        if let Err(e) = put_json(fleet.store.as_ref(), &format!("heartbeats/{id}"), &stored).await {
            tracing::warn!("sharing the heartbeat of {id}: {e:#}");
        }
    }
    json(
        StatusCode::OK,
        &serde_json::json!({ "version": fleet.version() }),
    )
}

/// A new client certificate for an enrolled instance, same identity, new key.
async fn renew(fleet: &Fleet, id: &str, req: Request<Incoming>) -> Resp {
    let body: RenewRequest = match read_json(req).await {
        Ok(r) => r,
        Err(resp) => return resp,
    };
    match fleet
        .ca
        .sign_client(&body.csr_pem, id, CLIENT_CERT_LIFETIME)
    {
        Ok(cert_pem) => {
            tracing::info!("renewed the client certificate of {id}");
            json(
                StatusCode::OK,
                &EnrollResponse {
                    instance: id.to_string(),
                    cert_pem,
                    ca_pem: fleet.ca.cert_pem().to_string(),
                },
            )
        }
        Err(e) => error(StatusCode::BAD_REQUEST, &format!("{e:#}")),
    }
}
