//! Test harness: real backends (hyper) and real `rampart` processes on loopback ports,
//! with readiness polled on the admin API (never sleeps as synchronisation).
#![allow(dead_code, missing_docs, clippy::unwrap_used)]

pub mod ari;
pub mod engine;
pub mod etcd;
pub mod h2;
pub mod pebble;
pub mod pki;

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::atomic::{AtomicU16, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};

pub const DEADLINE: Duration = Duration::from_secs(20);

pub fn init() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}

/// A loopback address with a port the OS just handed out (the proxy binds it next;
/// [`Proxy::start`] retries with new ports if another process took it meanwhile).
pub fn free_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// Waits until the controller admin API at `admin` answers `/healthz`.
pub async fn wait_controller(admin: SocketAddr) {
    eventually("the controller's admin API", || async {
        reqwest::get(format!("http://{admin}/healthz"))
            .await
            .ok()
            .map(drop)
    })
    .await;
}

/// A one-time join token from `rampart controller --config <config> token create`.
pub fn join_token(config: &Path) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_rampart"))
        .args(["controller", "--config"])
        .arg(config)
        .args(["token", "create"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "token create: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// The value of the first line of Prometheus text `metrics` that starts with `prefix`.
pub fn metric_value(metrics: &str, prefix: &str) -> Option<f64> {
    metrics
        .lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// Polls `f` until it returns `Some`, or panics with `what` after [`DEADLINE`].
pub async fn eventually<T, F, Fut>(what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(start.elapsed() < DEADLINE, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The body of `GET url` (an admin API: /metrics, /status).
pub async fn fetch(url: &str) -> String {
    reqwest::get(url).await.unwrap().text().await.unwrap()
}

/// A real HTTP/1.1 upstream on 127.0.0.1:0.
///
/// - `/healthz` answers `health_status` (200 by default)
/// - `/status/NNN` answers NNN
/// - `/bytes/N` answers N bytes (N ≤ 16 MiB)
/// - `/slow/MS` answers after MS milliseconds
/// - `/held` answers once `release()` is called (requests held in flight for as long as
///   a test needs, however slow the machine)
/// - `/headers` answers the request headers as JSON, and under `:path` the request
///   target it was sent
/// - `/ws` is a WebSocket echo
/// - anything else answers 200 with the backend's name; `fail_status` != 0 overrides it
pub struct Backend {
    pub name: String,
    pub addr: SocketAddr,
    pub hits: AtomicUsize,
    /// TCP connections accepted (to see upstream keep-alive reuse).
    pub connections: AtomicUsize,
    pub health_status: AtomicU16,
    pub fail_status: AtomicU16,
    pub methods: Mutex<Vec<String>>,
    /// `true` while `/held` requests wait.
    held: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Backend {
    pub async fn start(name: &str) -> Arc<Backend> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<Arc<Backend>>();
        let task = tokio::spawn(async move {
            let backend = rx.await.unwrap();
            let weak = Arc::downgrade(&backend);
            drop(backend);
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let Some(b) = weak.upgrade() else { return };
                b.connections.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| {
                        let b = b.clone();
                        async move { Ok::<_, Infallible>(b.handle(req).await) }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection_with_upgrades(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        let backend = Arc::new(Backend {
            name: name.to_string(),
            addr,
            hits: AtomicUsize::new(0),
            connections: AtomicUsize::new(0),
            health_status: AtomicU16::new(200),
            fail_status: AtomicU16::new(0),
            methods: Mutex::new(Vec::new()),
            held: tokio::sync::watch::Sender::new(true),
            task,
        });
        tx.send(backend.clone()).ok().unwrap();
        backend
    }

    pub fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }

    /// Answers the `/held` requests waiting and those to come.
    pub fn release(&self) {
        self.held.send_replace(false);
    }

    async fn handle(&self, mut req: Request<Incoming>) -> Response<Full<Bytes>> {
        let path = req.uri().path().to_string();
        if path == "/healthz" {
            return reply(self.health_status.load(Ordering::SeqCst), "health");
        }
        self.hits.fetch_add(1, Ordering::SeqCst);
        self.methods.lock().unwrap().push(req.method().to_string());
        if path == "/ws" {
            return websocket_echo(&mut req);
        }
        if path == "/headers" {
            let mut map: HashMap<String, String> = req
                .headers()
                .iter()
                .map(|(k, v)| (k.as_str().to_string(), v.to_str().unwrap_or("").to_string()))
                .collect();
            let target = req.uri().path_and_query().map_or("", |p| p.as_str());
            map.insert(":path".into(), target.to_string());
            return reply(200, &serde_json::to_string(&map).unwrap());
        }
        if let Some(n) = path.strip_prefix("/bytes/") {
            // One shared buffer, sliced: many slow readers hold no copies.
            static BIG: std::sync::OnceLock<Bytes> = std::sync::OnceLock::new();
            let big = BIG.get_or_init(|| Bytes::from(vec![b'x'; 16 << 20]));
            return Response::builder()
                .status(200)
                .body(Full::new(big.slice(..n.parse::<usize>().unwrap())))
                .unwrap();
        }
        if let Some(code) = path.strip_prefix("/status/") {
            return reply(code.parse().unwrap(), &self.name);
        }
        if let Some(ms) = path.strip_prefix("/slow/") {
            tokio::time::sleep(Duration::from_millis(ms.parse().unwrap())).await;
        }
        if path == "/held" {
            let _ = self.held.subscribe().wait_for(|held| !held).await;
        }
        let _ = req.into_body().collect().await;
        match self.fail_status.load(Ordering::SeqCst) {
            0 => reply(200, &self.name),
            code => reply(code, &self.name),
        }
    }
}

fn reply(status: u16, body: &str) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("x-backend", body.len().to_string())
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap()
}

fn websocket_echo(req: &mut Request<Incoming>) -> Response<Full<Bytes>> {
    use futures_util::{SinkExt, StreamExt};
    let key = req.headers().get("sec-websocket-key").cloned().unwrap();
    let upgrade = hyper::upgrade::on(req);
    tokio::spawn(async move {
        let upgraded = upgrade.await.unwrap();
        let mut ws = tokio_tungstenite::WebSocketStream::from_raw_socket(
            TokioIo::new(upgraded),
            tokio_tungstenite::tungstenite::protocol::Role::Server,
            None,
        )
        .await;
        while let Some(Ok(msg)) = ws.next().await {
            if msg.is_text() || msg.is_binary() {
                ws.send(msg).await.unwrap();
            }
        }
    });
    Response::builder()
        .status(101)
        .header("connection", "upgrade")
        .header("upgrade", "websocket")
        .header(
            "sec-websocket-accept",
            tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes()),
        )
        .body(Full::new(Bytes::new()))
        .unwrap()
}

/// Whether the admin API at `admin` is process `pid`'s (`/status` names its pid; behind
/// an admin token it cannot tell, and says yes).
async fn answered_by(client: &reqwest::Client, admin: SocketAddr, pid: u32) -> bool {
    let status: Option<serde_json::Value> =
        match client.get(format!("http://{admin}/status")).send().await {
            Ok(r) if r.status() == 401 => return true,
            Ok(r) => r.json().await.ok(),
            Err(_) => None,
        };
    let ours = status.is_some_and(|s| s["pid"] == pid);
    if !ours {
        eprintln!("the admin API at {admin} is another process's: starting again on fresh ports");
    }
    ours
}

/// Whether the log at `log` says a listening port was taken (Pingora then retries the
/// bind for half a minute before it gives up).
fn port_taken(log: &Path) -> bool {
    std::fs::read_to_string(log).is_ok_and(|l| l.contains(" is in use, will try again"))
}

/// Spawns `rampart up --config <config>` (stderr to `log`) and waits until the admin
/// API at `admin` says ready. `None` when the process exits first: a port that
/// [`free_addr`] picked was taken by another process before `rampart up` bound it, and
/// the caller starts again on fresh ports (as [`Proxy::start`] does).
pub async fn spawn_up(config: &Path, log: &Path, admin: SocketAddr) -> Option<pebble::Killed> {
    let mut child = pebble::Killed(
        Command::new(env!("CARGO_BIN_EXE_rampart"))
            .args(["up", "--config"])
            .arg(config)
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(log).unwrap())
            .spawn()
            .unwrap(),
    );
    let start = Instant::now();
    let client = reqwest::Client::new();
    while start.elapsed() < DEADLINE {
        let exited = child.0.try_wait().ok().flatten();
        if exited.is_some() || port_taken(log) {
            eprintln!(
                "rampart up did not start ({exited:?}; port taken?), log:\n{}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
            return None;
        }
        if let Ok(r) = client.get(format!("http://{admin}/ready")).send().await {
            if r.status() == 200 {
                return answered_by(&client, admin, child.0.id())
                    .await
                    .then_some(child);
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!(
        "rampart up did not become ready in {DEADLINE:?}, log:\n{}",
        std::fs::read_to_string(log).unwrap_or_default()
    );
}

/// A `rampart proxy` process with its own data directory and loopback ports.
pub struct Proxy {
    pub child: Child,
    pub dir: tempfile::TempDir,
    pub config_path: PathBuf,
    pub http: SocketAddr,
    pub https: SocketAddr,
    pub admin: SocketAddr,
    server_extra: String,
    /// Extra arguments of `rampart proxy` in fleet mode (e.g. --public-addr).
    fleet_extra: Vec<String>,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Proxy {
    /// Starts a proxy with `body` (routes, pools, tls, limits...) and waits until ready.
    pub async fn start(body: &str) -> Proxy {
        Self::start_with("", body).await
    }

    /// Like [`Proxy::start`], with extra lines in `[server]`.
    pub async fn start_with(server_extra: &str, body: &str) -> Proxy {
        for _ in 0..3 {
            let dir = tempfile::tempdir().unwrap();
            let config_path = dir.path().join("rampart.toml");
            let (http, https, admin) = (free_addr(), free_addr(), free_addr());
            write_config(
                dir.path(),
                &config_text(dir.path(), server_extra, [http, https, admin], body),
            );
            let child = spawn_rampart(&config_path, &dir.path().join("rampart.log"), &[]);
            let mut proxy = Proxy {
                child,
                dir,
                config_path,
                http,
                https,
                admin,
                server_extra: server_extra.to_string(),
                fleet_extra: Vec::new(),
            };
            if proxy.wait_ready().await {
                return proxy;
            }
            eprintln!("proxy did not start (port taken?), log:\n{}", proxy.log());
        }
        panic!("the proxy failed to start three times");
    }

    /// Starts a proxy in fleet mode: local settings in its file, everything else from
    /// the controller at `controller`; enrols with `token` when given. Waits until it
    /// is ready, which in fleet mode means serving a snapshot.
    pub async fn start_fleet(controller: &str, token: Option<&str>) -> Proxy {
        Self::start_fleet_with(controller, token, &[]).await
    }

    /// [`Proxy::start_fleet`] with extra arguments.
    pub async fn start_fleet_with(controller: &str, token: Option<&str>, extra: &[&str]) -> Proxy {
        let dir = tempfile::tempdir().unwrap();
        let config_path = dir.path().join("rampart.toml");
        let (http, https, admin) = (free_addr(), free_addr(), free_addr());
        write_config(
            dir.path(),
            &config_text(dir.path(), "", [http, https, admin], ""),
        );
        let mut proxy = Proxy {
            child: Command::new("true").spawn().unwrap(),
            dir,
            config_path,
            http,
            https,
            admin,
            server_extra: String::new(),
            fleet_extra: extra.iter().map(ToString::to_string).collect(),
        };
        proxy.spawn_fleet(controller, token);
        assert!(
            proxy.wait_ready().await,
            "fleet proxy did not become ready, log:\n{}",
            proxy.log()
        );
        proxy
    }

    /// (Re)starts this proxy's process in fleet mode without waiting.
    pub fn spawn_fleet(&mut self, controller: &str, token: Option<&str>) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let mut args = vec!["--controller", controller, "--heartbeat", "200ms"];
        if let Some(t) = token {
            args.extend(["--join-token", t]);
        }
        args.extend(self.fleet_extra.iter().map(String::as_str));
        let log = self.dir.path().join("rampart.log");
        let mut old = std::fs::read_to_string(&log).unwrap_or_default();
        old.push_str("\n--- restart ---\n");
        std::fs::write(self.dir.path().join("rampart-previous.log"), old).unwrap();
        self.child = spawn_rampart(&self.config_path, &log, &args);
    }

    /// Restarts this proxy in fleet mode (same data directory, so the same identity)
    /// and waits until ready. While it was down another process may have bound one of
    /// its ports (a `free_addr` elsewhere): it then starts again on fresh ones.
    pub async fn restart_fleet(&mut self, controller: &str, token: Option<&str>) -> bool {
        for _ in 0..3 {
            self.spawn_fleet(controller, token);
            if self.wait_ready().await {
                return true;
            }
            if !port_taken(&self.dir.path().join("rampart.log")) {
                return false;
            }
            eprintln!("a port of the restarted proxy was taken meanwhile; moving to fresh ones");
            (self.http, self.https, self.admin) = (free_addr(), free_addr(), free_addr());
            write_config(self.dir.path(), &self.config_text(""));
        }
        false
    }

    /// Kills the process at once (no graceful shutdown), as a crash or power loss would.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Whether the admin API says ready.
    pub async fn is_ready(&self) -> bool {
        reqwest::get(format!("http://{}/ready", self.admin))
            .await
            .is_ok_and(|r| r.status() == 200)
    }

    pub async fn wait_until_ready(&mut self) -> bool {
        self.wait_ready().await
    }

    pub fn config_text(&self, body: &str) -> String {
        config_text(
            self.dir.path(),
            &self.server_extra,
            [self.http, self.https, self.admin],
            body,
        )
    }

    /// Writes the config atomically (temp file + rename), as deployment tools do.
    pub fn write_config(&self, body: &str) {
        write_config(self.dir.path(), &self.config_text(body));
    }

    /// Starts a second process on the same configuration with `--upgrade`: it takes
    /// the listening sockets once this one gets SIGQUIT.
    pub fn spawn_upgrade(&self) -> Child {
        spawn_rampart(
            &self.config_path,
            &self.dir.path().join("rampart-upgrade.log"),
            &["--upgrade"],
        )
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("rampart.log")).unwrap_or_default()
    }

    async fn wait_ready(&mut self) -> bool {
        let start = Instant::now();
        let client = reqwest::Client::new();
        while start.elapsed() < DEADLINE {
            if let Ok(Some(_)) = self.child.try_wait() {
                return false;
            }
            if port_taken(&self.dir.path().join("rampart.log")) {
                return false;
            }
            if let Ok(r) = client
                .get(format!("http://{}/ready", self.admin))
                .send()
                .await
            {
                if r.status() == 200 {
                    // Ready, and this process: another one may hold the admin port
                    // that free_addr picked while Pingora retries binding it.
                    return answered_by(&client, self.admin, self.child.id()).await;
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        false
    }

    pub fn ca_path(&self) -> PathBuf {
        self.dir.path().join("data/ca/ca.pem")
    }

    /// An HTTPS client trusting the internal CA, resolving `hosts` to the HTTPS listener.
    pub fn client(&self, hosts: &[&str]) -> reqwest::Client {
        self.client_builder(hosts).build().unwrap()
    }

    /// [`Proxy::client`] before it is built, for more settings.
    pub fn client_builder(&self, hosts: &[&str]) -> reqwest::ClientBuilder {
        let mut b = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .redirect(reqwest::redirect::Policy::none());
        if let Ok(pem) = std::fs::read(self.ca_path()) {
            b = b.tls_certs_only([reqwest::Certificate::from_pem(&pem).unwrap()]);
        }
        for h in hosts {
            b = b.resolve(h, self.https);
        }
        b
    }

    /// A plain-HTTP client (no redirects followed).
    pub fn http_client() -> reqwest::Client {
        reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .unwrap()
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.http)
    }

    /// The body of `GET path` on the HTTP listener.
    pub async fn text(&self, path: &str) -> String {
        Self::http_client()
            .get(self.url(path))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    pub async fn status(&self) -> serde_json::Value {
        reqwest::get(format!("http://{}/status", self.admin))
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    /// The dashboard's view (`/api/v1/dashboard`), on an admin listener without a token.
    pub async fn dashboard(&self) -> serde_json::Value {
        reqwest::get(format!("http://{}/api/v1/dashboard", self.admin))
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    pub async fn metrics(&self) -> String {
        reqwest::get(format!("http://{}/metrics", self.admin))
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// The value of a metric line that starts with `prefix` (0 when absent).
    pub async fn metric(&self, prefix: &str) -> f64 {
        metric_value(&self.metrics().await, prefix).unwrap_or(0.0)
    }

    pub async fn version(&self) -> u64 {
        self.status().await["version"].as_u64().unwrap()
    }

    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([&format!("-{sig}"), &self.child.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -{sig} failed");
    }

    /// Rewrites the config, sends SIGHUP, waits until the version moved past `before`
    /// or a reload failure was recorded. Returns the new version.
    /// Waits until /status shows the endpoint `addr` of `pool` failing its active
    /// health check.
    pub async fn wait_actively_unhealthy(&self, pool: &str, addr: SocketAddr) {
        eventually(
            &format!("{addr} in {pool} to be marked unhealthy"),
            || async {
                let s = self.status().await;
                let eps = s["pools"][pool]["endpoints"].as_array()?.clone();
                eps.iter()
                    .any(|e| e["address"] == addr.to_string() && e["active_healthy"] == false)
                    .then_some(())
            },
        )
        .await;
    }

    pub async fn reload(&self, body: &str) -> u64 {
        let before = self.version().await;
        let failures_before = self.metric("rampart_config_reload_failures_total").await;
        self.write_config(body);
        self.signal("HUP");
        eventually("the reload to be applied or refused", || async {
            let v = self.version().await;
            let failures = self.metric("rampart_config_reload_failures_total").await;
            (v > before || failures > failures_before).then_some(v)
        })
        .await
    }
}

/// The configuration text of a test proxy in `dir` with the `[http, https, admin]` listeners.
fn config_text(
    dir: &Path,
    server_extra: &str,
    [http, https, admin]: [SocketAddr; 3],
    body: &str,
) -> String {
    // No grace period unless a test asks for one (shutdown tests stay fast); note that
    // without one, requests in flight at the stop are cut when Pingora shuts down its
    // runtimes.
    let grace = if server_extra.contains("grace_period") {
        ""
    } else {
        "grace_period = \"0s\"\n"
    };
    let threads = if server_extra.contains("threads") {
        ""
    } else {
        "threads = 2\n"
    };
    format!(
        "[server]\ndata_dir = {:?}\n{grace}shutdown_timeout = \"5s\"\n{threads}{server_extra}\n\n[listeners]\nhttp = \"{http}\"\nhttps = \"{https}\"\nadmin = \"{admin}\"\n\n{body}\n",
        dir.join("data"),
    )
}

/// Writes `dir/rampart.toml` atomically (temp file + rename), as deployment tools do.
fn write_config(dir: &Path, text: &str) {
    let tmp = dir.join("rampart.toml.tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, dir.join("rampart.toml")).unwrap();
}

/// Starts `rampart proxy [extra] --config CONFIG` with its stderr in `log` and its
/// stdout beside it (`.out`: an access log may go there).
fn spawn_rampart(config: &Path, log: &Path, extra: &[&str]) -> Child {
    let out = std::fs::File::create(log.with_extension("out")).unwrap();
    let log = std::fs::File::create(log).unwrap();
    Command::new(env!("CARGO_BIN_EXE_rampart"))
        .arg("proxy")
        .args(extra)
        .arg("--config")
        .arg(config)
        .env("RUST_LOG", "info")
        .stdout(out)
        .stderr(log)
        .spawn()
        .unwrap()
}

/// A catch-all route forwarding to `pool`.
pub fn forward_all(pool: &str) -> String {
    format!("[[routes]]\nname = \"all\"\naction = {{ forward = \"{pool}\" }}\n")
}

/// A catch-all route to a pool "p" of `backends`.
pub fn single_pool(balance: &str, backends: &[&Arc<Backend>], extra: &str) -> String {
    format!(
        "{}{}",
        forward_all("p"),
        pool_toml("p", balance, backends, extra)
    )
}

/// A pool `name` of `backends` with `extra` lines in its table.
pub fn pool_toml(name: &str, balance: &str, backends: &[&Arc<Backend>], extra: &str) -> String {
    let endpoints: Vec<String> = backends
        .iter()
        .map(|b| format!("{{ address = \"{}\" }}", b.addr))
        .collect();
    format!(
        "[pools.{name}]\nbalance = \"{balance}\"\nendpoints = [{}]\n{extra}\n",
        endpoints.join(", ")
    )
}

/// Replaces the `traceparent` a proxy started (random ids) in the headers an upstream
/// got by `<trace>` after checking its shape, so that two answers compare equal.
pub fn started_trace(headers: &mut std::collections::BTreeMap<String, String>) {
    if let Some(v) = headers.get_mut("traceparent") {
        let ids = v.get(3..52).unwrap_or("");
        assert!(
            v.len() == 55
                && v.starts_with("00-")
                && v.ends_with("-01")
                && ids.bytes().all(|b| b == b'-' || b.is_ascii_hexdigit()),
            "not a traceparent the proxy started: {v}"
        );
        *v = "<trace>".into();
    }
}

pub fn write_file(path: &Path, contents: &str) {
    std::fs::write(path, contents).unwrap();
}

/// A TLS client whose sessions (and tickets) are kept for resumption, trusting the
/// PEM CA `ca`: one per simulated client.
pub fn resuming_client(ca: &[u8]) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pemfile::certs(&mut &ca[..]) {
        roots.add(c.unwrap()).unwrap();
    }
    Arc::new(
        rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth(),
    )
}

/// Connects to `addr` for `sni` with `config`, sends one HTTP/1.1 request and reads
/// the answer (so that the session tickets that follow the handshake arrive), and
/// says whether the handshake resumed a session.
pub async fn handshake_resumed(
    config: &Arc<rustls::ClientConfig>,
    addr: SocketAddr,
    sni: &str,
) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(config.clone())
        .connect(sni.to_string().try_into().unwrap(), tcp)
        .await
        .unwrap();
    let resumed = tls.get_ref().1.handshake_kind() == Some(rustls::HandshakeKind::Resumed);
    tls.write_all(format!("GET / HTTP/1.1\r\nhost: {sni}\r\nconnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    tls.flush().await.unwrap();
    let mut out = Vec::new();
    let _ = tls.read_to_end(&mut out).await;
    assert!(
        out.starts_with(b"HTTP/1.1 "),
        "{}",
        String::from_utf8_lossy(&out)
    );
    resumed
}
