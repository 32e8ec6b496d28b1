//! On-demand TLS (`[tls_on_demand]`): names learnt from the proxies' handshakes.
//!
//! A proxy that sees a handshake for a name no certificate covers asks here
//! (`POST /v1/on-demand`, or in process under `rampart up`). The name is checked
//! against the allowed patterns, the denials remembered for `deny_for`, the caps
//! (per hour, in total) and a budget of ask calls per second for all names together;
//! then the application's `ask` endpoint decides. An approved name is kept in the
//! store (`acme/on_demand/<name>`) and the ACME loop orders its certificate once for
//! the whole fleet, like a configured name; at renewal the application is asked again,
//! and a name it no longer approves is dropped once its certificate expires.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rampart_config::snapshot::OnDemandAnswer;
use rampart_config::{Config, Hostname, TlsOnDemand};
use serde::{Deserialize, Serialize};
use tokio::sync::{watch, Notify, OnceCell};

use crate::store::Store;

/// Where approved names are kept, one key per name.
pub const PREFIX: &str = "acme/on_demand";
/// How long the application's ask endpoint may take.
const ASK_TIMEOUT: Duration = Duration::from_secs(5);
/// Denials remembered at most; beyond, the expired ones go, then all.
const MAX_DENIED: usize = 100_000;

/// An approved name as kept in the store.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Approved {
    /// The name.
    pub name: String,
    /// When the application approved it (Unix seconds).
    pub approved_at: u64,
    /// When the application stopped approving it (asked at renewal): the name is not
    /// renewed and goes when its certificate expires.
    #[serde(default)]
    pub denied_at: Option<u64>,
}

/// The on-demand side of a controller: answers the proxies' requests and asks the
/// application.
pub struct OnDemand {
    store: Arc<dyn Store>,
    config: watch::Receiver<Config>,
    http: reqwest::Client,
    inner: Mutex<Inner>,
    inflight: Mutex<HashMap<String, Arc<OnceCell<OnDemandAnswer>>>>,
    /// Woken when a name is approved: the ACME loop looks at once.
    pub approved: Notify,
    metrics: Metrics,
}

impl std::fmt::Debug for OnDemand {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OnDemand").finish_non_exhaustive()
    }
}

#[derive(Default)]
struct Inner {
    /// Denied names → until when (monotonic).
    denied: HashMap<String, Instant>,
    /// The ask budget: tokens left and when they were counted.
    tokens: f64,
    counted: Option<Instant>,
}

#[derive(Clone)]
struct Metrics {
    requests: prometheus::IntCounterVec,
    asks: prometheus::IntCounterVec,
}

fn now_unix() -> u64 {
    crate::fleet::unix_ms() / 1000
}

fn deny(detail: impl Into<String>, retry_after: Duration) -> OnDemandAnswer {
    OnDemandAnswer {
        approved: false,
        detail: detail.into(),
        retry_after_secs: retry_after.as_secs().max(1),
    }
}

fn approve(detail: impl Into<String>) -> OnDemandAnswer {
    OnDemandAnswer {
        approved: true,
        detail: detail.into(),
        retry_after_secs: 0,
    }
}

/// The store key of `name`'s record.
#[must_use]
pub fn key(name: &str) -> String {
    format!("{PREFIX}/{name}")
}

impl OnDemand {
    /// The on-demand side reading `[tls_on_demand]` from `config`, keeping names in
    /// `store`, with its metrics on `registry`.
    ///
    /// # Errors
    /// When the HTTP client for the ask endpoint cannot be built.
    pub fn new(
        store: Arc<dyn Store>,
        config: watch::Receiver<Config>,
        registry: &prometheus::Registry,
    ) -> anyhow::Result<Arc<Self>> {
        let r = crate::metrics::Registrar(registry);
        let metrics = Metrics {
            requests: r.counter_vec(
                "rampart_on_demand_requests_total",
                "Proxies' requests for on-demand certificates by answer (approved, held, denied, not_allowed, cached_denial, ask_budget, cap, off).",
                "answer",
            ),
            asks: r.counter_vec(
                "rampart_on_demand_asks_total",
                "Calls of the tls_on_demand.ask endpoint by result (approved, denied, error).",
                "result",
            ),
        };
        let http = reqwest::Client::builder()
            .timeout(ASK_TIMEOUT)
            .redirect(reqwest::redirect::Policy::none())
            .build()?;
        Ok(Arc::new(Self {
            store,
            config,
            http,
            inner: Mutex::new(Inner::default()),
            inflight: Mutex::new(HashMap::new()),
            approved: Notify::new(),
            metrics,
        }))
    }

    fn count(&self, answer: &str) {
        self.metrics.requests.with_label_values(&[answer]).inc();
    }

    /// A proxy's request for a certificate for `name`, seen in a handshake.
    pub async fn request(&self, name: &str) -> OnDemandAnswer {
        let Some(settings) = self.config.borrow().tls_on_demand.clone() else {
            self.count("off");
            return deny(
                "on-demand TLS is off at the controller ([tls_on_demand])",
                Duration::from_secs(60),
            );
        };
        let name = match normalise(name) {
            Ok(n) => n,
            Err(e) => {
                self.count("not_allowed");
                return deny(e, settings.deny_for.0);
            }
        };
        if !settings.allow.is_empty() && !settings.allow.iter().any(|p| p.matches(&name)) {
            self.count("not_allowed");
            return deny(
                format!("{name} matches no tls_on_demand.allow pattern"),
                settings.deny_for.0,
            );
        }
        match self.record(&name).await {
            Ok(Some(r)) if r.denied_at.is_none() => {
                self.count("held");
                return approve(format!("{name} is approved"));
            }
            Ok(_) => {}
            Err(e) => {
                return deny(format!("store: {e:#}"), Duration::from_secs(5));
            }
        }
        if let Some(left) = self.denied_for(&name) {
            self.count("cached_denial");
            return deny(format!("{name} was denied recently"), left);
        }
        // One decision per name at a time: concurrent handshakes share it.
        let cell = self
            .inflight
            .lock()
            .expect("inflight lock")
            .entry(name.clone())
            .or_default()
            .clone();
        let answer = cell
            .get_or_init(|| self.decide(&name, &settings))
            .await
            .clone();
        self.inflight.lock().expect("inflight lock").remove(&name);
        answer
    }

    async fn record(&self, name: &str) -> anyhow::Result<Option<Approved>> {
        crate::store::get_json(self.store.as_ref(), &key(name)).await
    }

    fn denied_for(&self, name: &str) -> Option<Duration> {
        let inner = self.inner.lock().expect("on-demand lock");
        let until = *inner.denied.get(name)?;
        until
            .checked_duration_since(Instant::now())
            .filter(|d| !d.is_zero())
    }

    fn remember_denial(&self, name: &str, deny_for: Duration) {
        let mut inner = self.inner.lock().expect("on-demand lock");
        if inner.denied.len() >= MAX_DENIED {
            let now = Instant::now();
            inner.denied.retain(|_, until| *until > now);
            if inner.denied.len() >= MAX_DENIED {
                tracing::warn!(
                    "on-demand TLS: {MAX_DENIED} names denied within tls_on_demand.deny_for; forgetting them"
                );
                inner.denied.clear();
            }
        }
        inner
            .denied
            .insert(name.to_string(), Instant::now() + deny_for);
    }

    /// Takes one ask from the budget of `per_second` (a bucket of as many tokens).
    fn take_ask(&self, per_second: u32) -> bool {
        let mut inner = self.inner.lock().expect("on-demand lock");
        let now = Instant::now();
        let rate = f64::from(per_second);
        inner.tokens = match inner.counted {
            Some(at) => (inner.tokens + now.duration_since(at).as_secs_f64() * rate).min(rate),
            None => rate,
        };
        inner.counted = Some(now);
        if inner.tokens >= 1.0 {
            inner.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Caps, budget, then the application's answer, for a name not held.
    async fn decide(&self, name: &str, settings: &TlsOnDemand) -> OnDemandAnswer {
        let records = match self.records().await {
            Ok(r) => r,
            Err(e) => return deny(format!("store: {e:#}"), Duration::from_secs(5)),
        };
        let now = now_unix();
        if records.len() >= settings.max_total as usize {
            self.count("cap");
            return deny(
                format!(
                    "{} on-demand names are held (tls_on_demand.max_total)",
                    records.len()
                ),
                Duration::from_secs(60),
            );
        }
        let mut last_hour: Vec<u64> = records
            .iter()
            .map(|r| r.approved_at)
            .filter(|t| t + 3600 > now)
            .collect();
        if last_hour.len() >= settings.max_per_hour as usize {
            last_hour.sort_unstable();
            let wait = last_hour[last_hour.len() - settings.max_per_hour as usize] + 3600 - now;
            self.count("cap");
            return deny(
                format!(
                    "{} names were approved in the last hour (tls_on_demand.max_per_hour)",
                    last_hour.len()
                ),
                Duration::from_secs(wait),
            );
        }
        if !self.take_ask(settings.asks_per_second) {
            self.count("ask_budget");
            return deny(
                "too many names asked about this second (tls_on_demand.asks_per_second)",
                Duration::from_secs(1),
            );
        }
        match self.ask(name, &settings.ask).await {
            Ok(true) => {
                let record = Approved {
                    name: name.to_string(),
                    approved_at: now,
                    denied_at: None,
                };
                if let Err(e) =
                    crate::store::put_json(self.store.as_ref(), &key(name), &record).await
                {
                    return deny(format!("store: {e:#}"), Duration::from_secs(5));
                }
                tracing::info!("on-demand TLS: {name} approved by the ask endpoint");
                self.count("approved");
                self.approved.notify_one();
                approve(format!("{name} approved; ordering its certificate"))
            }
            Ok(false) => {
                self.remember_denial(name, settings.deny_for.0);
                self.count("denied");
                deny(
                    format!("the ask endpoint denied {name}"),
                    settings.deny_for.0,
                )
            }
            Err(e) => {
                // Fail closed, and do not ask again for every handshake meanwhile.
                tracing::warn!("on-demand TLS: asking about {name}: {e:#}");
                self.remember_denial(name, settings.deny_for.0);
                self.count("denied");
                deny(
                    format!("the ask endpoint failed for {name}: {e:#}"),
                    settings.deny_for.0,
                )
            }
        }
    }

    /// Asks the application whether it serves `name` (200: yes; any other status: no).
    ///
    /// # Errors
    /// When the endpoint cannot be reached or does not answer in time.
    pub async fn ask(&self, name: &str, url: &str) -> anyhow::Result<bool> {
        // `name` is a validated host name (letters, digits, hyphens, dots): nothing to
        // escape.
        let sep = if url.contains('?') { '&' } else { '?' };
        let result = self
            .http
            .get(format!("{url}{sep}domain={name}"))
            .send()
            .await
            .map(|r| r.status() == reqwest::StatusCode::OK);
        let label = match &result {
            Ok(true) => "approved",
            Ok(false) => "denied",
            Err(_) => "error",
        };
        self.metrics.asks.with_label_values(&[label]).inc();
        Ok(result?)
    }

    /// Every approved name's record.
    ///
    /// # Errors
    /// When the store cannot be listed.
    pub async fn records(&self) -> anyhow::Result<Vec<Approved>> {
        let mut out = Vec::new();
        for (k, v) in self.store.list(PREFIX).await? {
            match serde_json::from_slice::<Approved>(&v) {
                Ok(r) => out.push(r),
                Err(e) => tracing::error!("{k}: unreadable on-demand record: {e}"),
            }
        }
        Ok(out)
    }

    /// Marks `name` as no longer approved (asked again at renewal).
    ///
    /// # Errors
    /// When the store cannot be written.
    pub async fn mark_denied(&self, record: &Approved) -> anyhow::Result<()> {
        let r = Approved {
            denied_at: Some(now_unix()),
            ..record.clone()
        };
        crate::store::put_json(self.store.as_ref(), &key(&record.name), &r).await
    }

    /// Forgets `name` (its certificate expired after the application stopped
    /// approving it).
    ///
    /// # Errors
    /// When the store cannot be written.
    pub async fn forget(&self, name: &str) -> anyhow::Result<()> {
        self.store.delete(&key(name)).await.map(|_| ())
    }
}

/// The name of a handshake as a certificate would carry it, or why it can have none.
fn normalise(name: &str) -> Result<String, String> {
    if name.parse::<std::net::IpAddr>().is_ok() {
        return Err(format!("{name} is an IP address, not a name"));
    }
    let host: Hostname = name.parse()?;
    if !host.as_str().contains('.') {
        return Err(format!(
            "{host} has a single label: no public CA issues for it"
        ));
    }
    Ok(host.as_str().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// An ask endpoint approving `ok.example.com` (after 50 ms, so that concurrent
    /// requests overlap), counting its calls.
    async fn ask_endpoint() -> (String, Arc<AtomicUsize>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let calls = Arc::new(AtomicUsize::new(0));
        let counted = calls.clone();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let calls = counted.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req: http::Request<_>| {
                        calls.fetch_add(1, Ordering::SeqCst);
                        let ok = req.uri().query() == Some("domain=ok.example.com");
                        async move {
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            let status = if ok { 200 } else { 403 };
                            Ok::<_, std::convert::Infallible>(
                                http::Response::builder()
                                    .status(status)
                                    .body(http_body_util::Full::new(bytes::Bytes::new()))
                                    .unwrap(),
                            )
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(tcp), svc)
                        .await;
                });
            }
        });
        (format!("http://{addr}/ask"), calls)
    }

    fn settings(ask: &str, extra: &str) -> Config {
        rampart_config::parse(
            &format!(
                "[listeners]\nhttp = \"127.0.0.1:8080\"\n[tls_on_demand]\nask = \"{ask}\"\n{extra}\nacme = {{ email = \"o@example.com\" }}\n"
            ),
            "t",
        )
        .unwrap()
    }

    fn on_demand(dir: &std::path::Path, config: Config) -> Arc<OnDemand> {
        // As the binary does at start.
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        let store = Arc::new(crate::store::local::LocalStore::open(dir).unwrap());
        let (_tx, rx) = watch::channel(config);
        // The sender may go: the receiver keeps the last value.
        OnDemand::new(store, rx, &prometheus::Registry::new()).unwrap()
    }

    #[tokio::test]
    async fn concurrent_handshakes_share_one_ask_and_approval_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let (ask, calls) = ask_endpoint().await;
        let od = on_demand(dir.path(), settings(&ask, ""));
        let answers =
            futures_util::future::join_all((0..10).map(|_| od.request("ok.example.com"))).await;
        assert!(answers.iter().all(|a| a.approved), "{answers:?}");
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        // Held from now on: no more asks.
        assert!(od.request("OK.example.com.").await.approved);
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        assert_eq!(od.records().await.unwrap().len(), 1);
    }

    #[tokio::test]
    async fn denials_are_remembered_and_caps_refuse_without_asking() {
        let dir = tempfile::tempdir().unwrap();
        let (ask, calls) = ask_endpoint().await;
        let od = on_demand(
            dir.path(),
            settings(&ask, "max_total = 1\nallow = [\"*.example.com\"]"),
        );
        for _ in 0..3 {
            let a = od.request("no.example.com").await;
            assert!(!a.approved);
            assert!(a.retry_after_secs >= 599, "{a:?}");
        }
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        // Outside `allow`, an address, a single label: never asked about.
        for name in ["ok.example.net", "192.0.2.7", "localhost"] {
            assert!(!od.request(name).await.approved, "{name}");
        }
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        assert!(od.request("ok.example.com").await.approved);
        assert_eq!(calls.load(Ordering::SeqCst), 2);
        // max_total = 1 is reached: refused before the application is asked.
        let a = od.request("new.example.com").await;
        assert!(!a.approved && a.detail.contains("max_total"), "{a:?}");
        assert_eq!(calls.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn the_ask_budget_bounds_calls_for_random_names() {
        let dir = tempfile::tempdir().unwrap();
        let (ask, calls) = ask_endpoint().await;
        let od = on_demand(dir.path(), settings(&ask, "asks_per_second = 3"));
        let started = Instant::now();
        let answers = futures_util::future::join_all((0..100).map(|i| {
            let od = od.clone();
            async move { od.request(&format!("scan{i}.example.com")).await }
        }))
        .await;
        let elapsed = started.elapsed().as_secs_f64();
        let asked = calls.load(Ordering::SeqCst);
        // A bucket of 3, refilled at 3 a second.
        assert!(asked >= 3, "{asked}");
        assert!(
            asked <= 3 + (3.0 * elapsed).ceil() as usize,
            "{asked} in {elapsed}s"
        );
        let budget = answers
            .iter()
            .filter(|a| a.detail.contains("asks_per_second"))
            .count();
        assert_eq!(budget + asked, 100, "{answers:?}");
    }

    #[test]
    fn names_are_normalised_and_addresses_refused() {
        assert_eq!(normalise("Shop.Example.COM.").unwrap(), "shop.example.com");
        assert!(normalise("192.0.2.1").is_err());
        assert!(normalise("localhost").is_err());
        assert!(normalise("a_b.example.com").is_err());
    }
}
