//! ACME Renewal Information (RFC 9773) in front of pebble: Debian's pebble 2.4 has no
//! ARI, so this HTTPS front adds it at the HTTP layer and passes everything else to
//! pebble unchanged. The directory gains `renewalInfo`; `renewal-info/<id>` answers a
//! window that is due now for the first certificate asked about (a month away
//! for the rest); a new order that names the
//! certificate it `replaces` gets that field reflected in pebble's answer, as an ARI CA
//! does (RFC 9773 §5). Every new-order payload is kept for the test to read.
//!
//! Pebble builds its URLs from the request's `Host`, which the front passes on, so the
//! client's signed URLs (the JWS `url`) match what pebble sees.

use std::collections::HashSet;
use std::convert::Infallible;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;

use super::pebble::Pebble;

/// The front; stops when dropped.
pub struct AriFront {
    /// The directory URL to configure instead of pebble's.
    pub directory: String,
    /// The payloads of the new-order requests, in order.
    pub orders: Arc<Mutex<Vec<serde_json::Value>>>,
    /// Certificate ids (`<AKI>.<serial>`, base64url) whose window is due now (the
    /// first one asked about); others are told to renew in a month.
    pub due: Arc<Mutex<HashSet<String>>>,
    /// The ids asked about at `renewal-info`.
    pub asked: Arc<Mutex<Vec<String>>>,
    /// Refuse every order that names a certificate it replaces, as a CA does when that
    /// certificate was replaced already (`alreadyReplaced`).
    pub refuse_replacing: Arc<std::sync::atomic::AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for AriFront {
    fn drop(&mut self) {
        self.task.abort();
    }
}

struct Shared {
    pebble: String,
    front: String,
    client: reqwest::Client,
    orders: Arc<Mutex<Vec<serde_json::Value>>>,
    due: Arc<Mutex<HashSet<String>>>,
    asked: Arc<Mutex<Vec<String>>>,
    refuse_replacing: Arc<std::sync::atomic::AtomicBool>,
}

impl AriFront {
    /// A front for `pebble`, whose API certificate (from `dir/pebble-ca`) it shares.
    pub async fn start(dir: &Path, pebble: &Pebble) -> AriFront {
        let ca =
            rampart_pki::Ca::load_or_create(&dir.join("pebble-ca"), "pebble API test CA").unwrap();
        let issued = ca
            .issue_server(&["127.0.0.1".into()], Duration::from_secs(3600))
            .unwrap();
        let certs = rustls_pemfile::certs(&mut issued.chain_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        let key = rustls_pemfile::private_key(&mut issued.key_pem.as_bytes())
            .unwrap()
            .unwrap();
        let config = rustls::ServerConfig::builder()
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let front = listener.local_addr().unwrap().to_string();
        let api_ca = std::fs::read(&pebble.api_ca).unwrap();
        let shared = Arc::new(Shared {
            pebble: pebble
                .directory
                .trim_start_matches("https://")
                .trim_end_matches("/dir")
                .to_string(),
            front: front.clone(),
            client: reqwest::Client::builder()
                .tls_certs_only([reqwest::Certificate::from_pem(&api_ca).unwrap()])
                .redirect(reqwest::redirect::Policy::none())
                .http1_only()
                .build()
                .unwrap(),
            orders: Arc::default(),
            due: Arc::default(),
            asked: Arc::default(),
            refuse_replacing: Arc::default(),
        });
        let (orders, due, asked, refuse_replacing) = (
            shared.orders.clone(),
            shared.due.clone(),
            shared.asked.clone(),
            shared.refuse_replacing.clone(),
        );
        let task = tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let (acceptor, shared) = (acceptor.clone(), shared.clone());
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let svc = hyper::service::service_fn(move |req| {
                        let shared = shared.clone();
                        async move { Ok::<_, Infallible>(shared.handle(req).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tls), svc)
                        .await;
                });
            }
        });
        AriFront {
            directory: format!("https://{front}/dir"),
            orders,
            due,
            asked,
            refuse_replacing,
            task,
        }
    }
}

impl Shared {
    async fn handle(&self, req: Request<hyper::body::Incoming>) -> Response<Full<Bytes>> {
        let path = req.uri().path().to_string();
        if let Some(id) = path.strip_prefix("/renewal-info/") {
            let mut asked = self.asked.lock().unwrap();
            if asked.is_empty() {
                // The first certificate asked about is due at once.
                self.due.lock().unwrap().insert(id.to_string());
            }
            asked.push(id.to_string());
            drop(asked);
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_secs();
            let (start, end) = if self.due.lock().unwrap().contains(id) {
                (now - 120, now - 60)
            } else {
                (now + 30 * 86_400, now + 31 * 86_400)
            };
            let body = serde_json::json!({
                "suggestedWindow": { "start": rfc3339(start), "end": rfc3339(end) }
            });
            return Response::builder()
                .header("content-type", "application/json")
                .header("retry-after", "60")
                .body(Full::new(Bytes::from(body.to_string())))
                .unwrap();
        }
        let (parts, body) = req.into_parts();
        let body = body.collect().await.unwrap().to_bytes();
        let payload = (path == "/order-plz").then(|| {
            use base64::Engine as _;
            let jws: serde_json::Value = serde_json::from_slice(&body).unwrap();
            let payload = base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(jws["payload"].as_str().unwrap())
                .unwrap();
            serde_json::from_slice::<serde_json::Value>(&payload).unwrap()
        });
        if let Some(p) = &payload {
            self.orders.lock().unwrap().push(p.clone());
            if p.get("replaces").is_some()
                && self
                    .refuse_replacing
                    .load(std::sync::atomic::Ordering::SeqCst)
            {
                let problem = serde_json::json!({
                    "type": "urn:ietf:params:acme:error:alreadyReplaced",
                    "detail": "the certificate was replaced already",
                    "status": 409
                });
                return Response::builder()
                    .status(409)
                    .header("content-type", "application/problem+json")
                    .body(Full::new(Bytes::from(problem.to_string())))
                    .unwrap();
            }
        }
        let mut out = self.client.request(
            parts.method.clone(),
            format!(
                "https://{}{}",
                self.pebble,
                parts.uri.path_and_query().unwrap()
            ),
        );
        for (name, value) in &parts.headers {
            out = out.header(name, value);
        }
        let answer = out.body(body.clone()).send().await.unwrap();
        let status = answer.status();
        let headers = answer.headers().clone();
        let mut bytes = answer.bytes().await.unwrap();
        if path == "/dir" {
            let mut dir: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
            dir["renewalInfo"] = format!("https://{}/renewal-info", self.front).into();
            bytes = Bytes::from(dir.to_string());
        }
        if let Some(replaces) = payload.as_ref().and_then(|p| p.get("replaces")) {
            if status.is_success() {
                let mut order: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
                order["replaces"] = replaces.clone();
                bytes = Bytes::from(order.to_string());
            }
        }
        let mut response = Response::builder().status(status);
        for (name, value) in &headers {
            if !["content-length", "transfer-encoding", "connection"].contains(&name.as_str()) {
                response = response.header(name, value);
            }
        }
        response.body(Full::new(bytes)).unwrap()
    }
}

/// `secs` since the epoch as RFC 3339 (UTC).
fn rfc3339(secs: u64) -> String {
    humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + Duration::from_secs(secs)).to_string()
}

/// The ARI identifier of a DER certificate (RFC 9773 §4.1): the base64url of its
/// authority key identifier, a dot, the base64url of its serial number's DER bytes.
pub fn identifier(der: &[u8]) -> String {
    use base64::Engine as _;
    let (_, cert) = x509_parser::parse_x509_certificate(der).unwrap();
    let aki = cert
        .extensions()
        .iter()
        .find_map(|e| match e.parsed_extension() {
            x509_parser::extensions::ParsedExtension::AuthorityKeyIdentifier(a) => {
                a.key_identifier.as_ref().map(|k| k.0.to_vec())
            }
            _ => None,
        })
        .unwrap();
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    format!("{}.{}", b64.encode(aki), b64.encode(cert.raw_serial()))
}
