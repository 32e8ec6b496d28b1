//! Traffic mirroring (a route's `mirror`): the policy copies a share of the route's
//! forwarded requests to a shadow pool — the same method, target, `Host` and
//! forwarding headers, marked `X-Rampart-Mirror: 1` — on a task of its own, bounded in
//! number, whose answer is read and thrown away. The request itself never waits for
//! its copy; a copy that cannot start at once (the bound is reached) is skipped.
//! A request with a body is copied once its body has been read, by the transport that
//! reads it (the fast paths before forwarding, Pingora's path as the body passes), up
//! to `max_body`: a longer one is not copied (counted as `too_large`).

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use http::header::HeaderValue;
use rand::Rng;
use tokio::sync::Semaphore;

use crate::generation::{PickKey, PoolRt};
use crate::health::now_ms;
use crate::metrics::Metrics;

fn count(metrics: &Metrics, route: &str, o: Outcome) {
    metrics
        .mirrored
        .with_label_values(&[route, o.as_str()])
        .inc();
}

/// A copy that waits for its request's body (a place in `max_in_flight` is held).
pub struct PendingCopy {
    req: reqwest::RequestBuilder,
    /// The shadow pool and the endpoint the copy goes to (its passive health counts
    /// the copies' failures).
    pool: Arc<PoolRt>,
    idx: usize,
    permit: tokio::sync::OwnedSemaphorePermit,
    metrics: Arc<Metrics>,
    route: String,
    max_body: u64,
}

impl PendingCopy {
    /// Sends the copy with `body` (a body over `max_body` is counted, not sent).
    pub fn send(self, body: bytes::Bytes) {
        if body.len() as u64 > self.max_body {
            return self.too_large();
        }
        let PendingCopy {
            req,
            pool,
            idx,
            permit,
            metrics,
            route,
            ..
        } = self;
        let req = if body.is_empty() { req } else { req.body(body) };
        tokio::spawn(async move {
            let sent = async {
                let mut resp = req.send().await?;
                // Read to the end, a chunk at a time (the connection can then be
                // reused), and dropped.
                while resp.chunk().await?.is_some() {}
                Ok::<(), reqwest::Error>(())
            };
            let outcome = match sent.await {
                Ok(()) => {
                    pool.states[idx].record_success();
                    Outcome::Sent
                }
                Err(e) => {
                    use crate::fast::upstream::FailureKind;
                    let kind = if e.is_connect() {
                        FailureKind::Connect
                    } else if e.is_timeout() {
                        FailureKind::Timeout
                    } else {
                        FailureKind::Error
                    };
                    let mut recorded = false;
                    crate::edge::record_endpoint_failure(
                        &metrics,
                        &pool,
                        Some(idx),
                        kind,
                        &mut recorded,
                    );
                    Outcome::Failed
                }
            };
            count(&metrics, &route, outcome);
            drop(permit);
        });
    }

    /// The body turned out longer than `max_body`: counted, not sent.
    pub fn too_large(self) {
        count(&self.metrics, &self.route, Outcome::TooLarge);
    }

    /// The longest body this copy takes.
    #[must_use]
    pub fn max_body(&self) -> u64 {
        self.max_body
    }
}

/// Where a request's copy waits for the body, in its plan (taken once by the
/// transport that reads the body).
pub struct MirrorSlot(std::sync::Mutex<Option<PendingCopy>>);

impl MirrorSlot {
    /// The waiting copy, once.
    #[must_use]
    pub fn take(&self) -> Option<PendingCopy> {
        self.0.lock().ok()?.take()
    }
}

impl std::fmt::Debug for MirrorSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MirrorSlot")
    }
}

/// The header that marks a copy.
pub const MIRROR_HEADER: &str = "x-rampart-mirror";

/// A route's mirror, ready for serving.
#[derive(Debug)]
pub struct MirrorRt {
    /// The shadow pool.
    pub pool: Arc<PoolRt>,
    /// Share of the requests copied, 0–1.
    share: f64,
    /// Copies in flight (kept across reloads that keep the route's bound).
    slots: Arc<Semaphore>,
    /// The bound `slots` was made with.
    pub max_in_flight: u32,
    timeout: Duration,
    /// Longest body copied.
    max_body: u64,
    client: OnceLock<reqwest::Client>,
    metrics: Arc<Metrics>,
}

/// What became of a request the mirror could copy.
#[derive(Clone, Copy, Debug)]
enum Outcome {
    Sent,
    Failed,
    Busy,
    TooLarge,
    NoEndpoint,
}

impl Outcome {
    fn as_str(self) -> &'static str {
        match self {
            Outcome::Sent => "sent",
            Outcome::Failed => "failed",
            Outcome::Busy => "busy",
            Outcome::TooLarge => "too_large",
            Outcome::NoEndpoint => "no_endpoint",
        }
    }
}

impl MirrorRt {
    /// The mirror of `config` to `pool`; `prev` keeps its in-flight bound when the
    /// bound is the same.
    #[must_use]
    pub fn new(
        config: &rampart_config::Mirror,
        pool: Arc<PoolRt>,
        prev: Option<&MirrorRt>,
        metrics: Arc<Metrics>,
    ) -> Self {
        let slots = prev
            .filter(|p| p.max_in_flight == config.max_in_flight)
            .map_or_else(
                || Arc::new(Semaphore::new(config.max_in_flight as usize)),
                |p| p.slots.clone(),
            );
        Self {
            pool,
            share: config.percent / 100.0,
            slots,
            max_in_flight: config.max_in_flight,
            timeout: config.timeout.0,
            max_body: config.max_body.0,
            client: OnceLock::new(),
            metrics,
        }
    }

    /// Copies the request `parts` as `plan` forwards it (its `Host`, target and
    /// forwarding headers) with its request id to the shadow pool — or not, by the
    /// share. A request without a body is sent at once; for one with a body (or one
    /// declared longer than `max_body`, counted and skipped) the copy waits in the
    /// slot returned for its body.
    pub fn copy(
        &self,
        generation: &crate::generation::Generation,
        parts: &http::request::Parts,
        plan: &crate::policy::Forward,
        id: &HeaderValue,
    ) -> Option<Box<MirrorSlot>> {
        let edits = &generation.routes[plan.route].request_headers;
        let route_name = generation.routes[plan.route].name.as_str();
        let id_name = &generation.forwarding.request_id;
        let (has_body, host) = (plan.has_body, &plan.host);
        let target = plan.target.as_deref();
        let metrics = &self.metrics;
        if self.share < 1.0 && rand::rng().random::<f64>() >= self.share {
            return None;
        }
        let count = |o: Outcome| {
            count(metrics, route_name, o);
            None
        };
        let declared = crate::limits::content_length(&parts.headers).ok().flatten();
        if declared.is_some_and(|n| n > self.max_body) {
            return count(Outcome::TooLarge);
        }
        let Ok(permit) = self.slots.clone().try_acquire_owned() else {
            return count(Outcome::Busy);
        };
        // Unlike a pool's own requests, copies skip an ejected shadow even when none
        // is left (no panic mode): a dead shadow then costs nothing per request.
        let now = now_ms();
        let Some(idx) = self
            .pool
            .pick(PickKey::default(), &[], now)
            .filter(|&i| self.pool.states[i].is_available(now))
        else {
            return count(Outcome::NoEndpoint);
        };
        let client = match self.client() {
            Ok(c) => c.clone(),
            Err(e) => {
                tracing::warn!("mirror: building the HTTP client: {e}");
                return count(Outcome::Failed);
            }
        };
        let target =
            target.unwrap_or_else(|| parts.uri.path_and_query().map_or("/", |pq| pq.as_str()));
        let url = format!("http://{}{target}", self.pool.endpoints[idx].addr);
        let mut req = client.request(parts.method.clone(), url);
        // The headers the primary request is forwarded with: the client's as every
        // transport passes them, the forwarding ones, the route's edits.
        for (name, value) in &parts.headers {
            let n = name.as_str();
            if crate::headers::HOP_BY_HOP
                .iter()
                .any(|h| n.eq_ignore_ascii_case(h))
                || n == "host"
                || n == "content-length"
                || !generation.passes_header(plan, n)
            {
                continue;
            }
            req = req.header(name, value);
        }
        for (name, value) in crate::fast::added_headers(plan, edits, (id_name, id)) {
            req = req.header(name, value);
        }
        if !edits.drops("host") {
            req = req.header(http::header::HOST, host);
        }
        req = req.header(MIRROR_HEADER, "1");
        let pending = PendingCopy {
            req,
            pool: self.pool.clone(),
            idx,
            permit,
            metrics: metrics.clone(),
            route: route_name.to_string(),
            max_body: self.max_body,
        };
        if !has_body {
            pending.send(bytes::Bytes::new());
            return None;
        }
        Some(Box::new(MirrorSlot(std::sync::Mutex::new(Some(pending)))))
    }

    fn client(&self) -> Result<&reqwest::Client, reqwest::Error> {
        crate::forward_auth::lazy_client(&self.client, self.timeout)
    }
}
