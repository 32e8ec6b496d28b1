//! `rampart-loadtest backend`: a fast upstream for benchmarks and scenarios (hyper,
//! HTTP/1.1 with keep-alive). Every response carries a fixed body; optional delay and
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
    let shared = Arc::new((config.clone(), Bytes::from(vec![b'x'; config.body_bytes])));
    let task = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            // Benchmarks measure latency; Nagle would add up to 40 ms to small responses.
            let _ = stream.set_nodelay(true);
            let shared = shared.clone();
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
        .header("content-type", "application/octet-stream")
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
        use anyhow::Context;
        use std::io::BufRead;
        let mut child = std::process::Command::new(std::env::current_exe()?)
            .args([
                "backend",
                "--listen",
                "127.0.0.1:0",
                "--threads",
                "1",
                "--body-bytes",
                &body_bytes.to_string(),
            ])
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
