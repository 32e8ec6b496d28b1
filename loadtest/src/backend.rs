//! `rampart-loadtest backend`: a fast upstream for benchmarks and scenarios (hyper,
//! HTTP/1.1 with keep-alive, or with `--h2c` HTTP/2 in cleartext, where a gRPC call
//! gets a gRPC answer: one message and `grpc-status: 0` in trailers). Every response carries a fixed body; optional delay and
//! a random failure rate (answered 500) simulate slow and flaky services. `/healthz`
//! always answers 200 so health checks see the process, not the failure rate.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use rand::Rng;
use tokio::net::TcpListener;

/// How the backend answers.
#[derive(Clone, Debug)]
pub struct BackendConfig {
    /// Response body size.
    pub body_bytes: usize,
    /// Delay before answering.
    pub delay: Duration,
    /// Fraction of requests answered 500 (0.0–1.0).
    pub fail_rate: f64,
    /// Name sent in `x-backend` (tells scenarios which endpoint answered).
    pub name: String,
    /// Serve HTTP/2 with prior knowledge instead of HTTP/1.1.
    pub h2c: bool,
    /// Serve an HTML page of `body_bytes` (varied, compressible text) as
    /// `text/html` instead of `x` bytes as `application/octet-stream`.
    pub html: bool,
}

/// An HTML page of `n` bytes: table rows of order data, as compressible as a real
/// page (about 5–6× with gzip at level 1), not a run of one byte.
#[must_use]
pub fn html_page(n: usize) -> Vec<u8> {
    let mut s =
        String::from("<!DOCTYPE html><html><head><title>Orders</title></head><body><table>\n");
    let mut i = 0u64;
    while s.len() < n {
        s.push_str(&format!(
            "<tr class=\"row-{}\"><td>{}</td><td>customer {}</td><td>{}.{:02} EUR</td><td>day {}</td></tr>\n",
            i % 5,
            100_000 + i,
            (i * 7919) % 10_007,
            (i * 37) % 1000,
            i % 100,
            i % 365
        ));
        i += 1;
    }
    s.truncate(n);
    s.into_bytes()
}

/// Binds `listen` and serves until the task is dropped; returns the bound address.
///
/// # Errors
/// When the address cannot be bound.
pub async fn spawn(
    listen: SocketAddr,
    config: BackendConfig,
) -> anyhow::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = TcpListener::bind(listen).await?;
    let addr = listener.local_addr()?;
    let body = if config.html {
        html_page(config.body_bytes)
    } else {
        vec![b'x'; config.body_bytes]
    };
    let shared = Arc::new((config.clone(), Bytes::from(body)));
    let task = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            // Benchmarks measure latency; Nagle would add up to 40 ms to small responses.
            let _ = stream.set_nodelay(true);
            let shared = shared.clone();
            if shared.0.h2c {
                tokio::spawn(serve_h2c(stream, shared));
                continue;
            }
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req| {
                    let shared = shared.clone();
                    async move { Ok::<_, Infallible>(answer(&req, &shared.0, &shared.1).await) }
                });
                // A client that goes away mid-request is normal under load.
                let _ = hyper::server::conn::http1::Builder::new()
                    .keep_alive(true)
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    Ok((addr, task))
}

/// One HTTP/2 (prior knowledge) connection: plain requests get [`answer`]'s response,
/// gRPC calls (`Content-Type: application/grpc`) a gRPC one.
async fn serve_h2c(stream: tokio::net::TcpStream, shared: Arc<(BackendConfig, Bytes)>) {
    use http_body_util::BodyExt;
    let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
        let shared = shared.clone();
        async move {
            let grpc = req
                .headers()
                .get("content-type")
                .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
            if !grpc {
                let resp = answer(&req, &shared.0, &shared.1).await;
                return Ok::<_, Infallible>(resp.map(|b| b.map_err(|e| match e {}).boxed()));
            }
            // Read the call's message, then answer one of the configured size.
            let _ = req.into_body().collect().await;
            let mut message = Vec::with_capacity(5 + shared.1.len());
            message.push(0);
            message.extend_from_slice(&u32::try_from(shared.1.len()).unwrap_or(0).to_be_bytes());
            message.extend_from_slice(&shared.1);
            let mut trailers = http::HeaderMap::new();
            trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
            let frames = [
                Ok::<_, Infallible>(hyper::body::Frame::data(Bytes::from(message))),
                Ok(hyper::body::Frame::trailers(trailers)),
            ];
            let body = http_body_util::StreamBody::new(futures_util::stream::iter(frames));
            let resp = Response::builder()
                .header("content-type", "application/grpc")
                .body(body.boxed())
                .expect("static status and headers are valid");
            Ok(resp)
        }
    });
    // A client that goes away mid-request is normal under load.
    let _ = hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
        .max_concurrent_streams(1000)
        .serve_connection(TokioIo::new(stream), svc)
        .await;
}

async fn answer(
    req: &Request<Incoming>,
    config: &BackendConfig,
    body: &Bytes,
) -> Response<Full<Bytes>> {
    if req.uri().path() == "/healthz" {
        return Response::new(Full::new(Bytes::from_static(b"ok")));
    }
    if !config.delay.is_zero() {
        tokio::time::sleep(config.delay).await;
    }
    let fail = config.fail_rate > 0.0 && rand::rng().random_bool(config.fail_rate.min(1.0));
    Response::builder()
        .status(if fail { 500 } else { 200 })
        .header(
            "content-type",
            if config.html {
                "text/html; charset=utf-8"
            } else {
                "application/octet-stream"
            },
        )
        .header("x-backend", config.name.as_str())
        .body(Full::new(body.clone()))
        .expect("static status and headers are valid")
}

/// A `rampart-loadtest backend` running as its own process (so that its CPU is
/// measured apart from the load generator's, and so that scenarios can kill it).
pub struct BackendProcess {
    /// The process.
    pub child: std::process::Child,
    /// Where it listens.
    pub addr: SocketAddr,
}

impl Drop for BackendProcess {
    fn drop(&mut self) {
        // Best effort: it may have been killed already.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl BackendProcess {
    /// Starts this executable as `backend` with `body_bytes` and one thread, on a free
    /// loopback port read back from its first line of output.
    ///
    /// # Errors
    /// When the process cannot start or does not say where it listens.
    pub fn spawn(body_bytes: usize) -> anyhow::Result<Self> {
        Self::spawn_with(body_bytes, false)
    }

    /// [`BackendProcess::spawn`], serving HTTP/2 in cleartext when `h2c`.
    ///
    /// # Errors
    /// When the process cannot start or does not say where it listens.
    pub fn spawn_with(body_bytes: usize, h2c: bool) -> anyhow::Result<Self> {
        Self::spawn_args(body_bytes, if h2c { &["--h2c"] } else { &[] })
    }

    /// [`BackendProcess::spawn`] of an HTML page (`--html`).
    ///
    /// # Errors
    /// When the process cannot start or does not say where it listens.
    pub fn spawn_html(body_bytes: usize) -> anyhow::Result<Self> {
        Self::spawn_args(body_bytes, &["--html"])
    }

    fn spawn_args(body_bytes: usize, extra: &[&str]) -> anyhow::Result<Self> {
        use anyhow::Context;
        use std::io::BufRead;
        let body_bytes = body_bytes.to_string();
        let mut args = vec![
            "backend",
            "--listen",
            "127.0.0.1:0",
            "--threads",
            "1",
            "--body-bytes",
            &body_bytes,
        ];
        args.extend_from_slice(extra);
        let mut child = std::process::Command::new(std::env::current_exe()?)
            .args(args)
            .stdout(std::process::Stdio::piped())
            .spawn()?;
        let stdout = child.stdout.take().context("backend stdout")?;
        let mut process = BackendProcess {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
        };
        let mut line = String::new();
        std::io::BufReader::new(stdout).read_line(&mut line)?;
        process.addr = line
            .trim()
            .strip_prefix("listening on ")
            .context("the backend did not say where it listens")?
            .parse()?;
        Ok(process)
    }
}
