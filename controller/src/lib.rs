//! Rampart's control plane: owns the desired state (configuration + discovered
//! endpoints + certificates), compiles it into versioned snapshots and pushes them to
//! every enrolled proxy over the fleet API.
//!
//! - [`store`]: where state is kept (local directory)
//! - [`authority`]: the fleet CA and the internal serving CA
//! - [`discovery`]: endpoint providers (files)
//! - [`dns`]: the DNS planner (desired vs actual records → changes)
//! - [`compile`]: configuration + discovery → snapshot
//! - [`fleet`]: enrolment, tokens, watch/ack/heartbeat, instance registry
//! - [`leader`]: leader election over etcd (several controllers)
//! - [`admin`]: /metrics, /status, /healthz

pub mod acme;
pub mod admin;
pub mod authority;
pub mod compile;
pub mod dashboard;
pub mod discovery;
pub mod dns;
pub mod fleet;
pub mod leader;
pub mod metrics;
pub mod store;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use rampart_config::snapshot::{ControllerStatus, ProviderStatus};
use rampart_config::{Config, ControllerSettings, StoreSettings};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::authority::Authority;
use crate::compile::Compiler;
use crate::discovery::{file::FileProvider, Found, Provider};
use crate::fleet::registry::{InstanceRecord, Registry};
use crate::fleet::{Fleet, Published};
use crate::metrics::Metrics;
use crate::store::{get_json, put_json, Store};

/// Opens the store `config` names.
///
/// # Errors
/// When the store cannot be opened.
pub async fn open_store(config: &Config) -> anyhow::Result<Arc<dyn Store>> {
    Ok(open(config).await?.0)
}

/// The store, and the etcd connection behind it when it is shared (for the leader
/// lease and following the leader), so that one connection serves both.
async fn open(config: &Config) -> anyhow::Result<(Arc<dyn Store>, Option<store::etcd::EtcdStore>)> {
    match &settings(config).store {
        StoreSettings::Local => Ok((
            Arc::new(store::local::LocalStore::open(
                &config.server.data_dir.join("controller"),
            )?),
            None,
        )),
        StoreSettings::Etcd(etcd) => {
            let shared = store::etcd::EtcdStore::connect(&etcd.endpoints, &etcd.prefix).await?;
            Ok((Arc::new(shared.clone()), Some(shared)))
        }
    }
}

/// The controller settings of `config` (defaults when the section is absent).
#[must_use]
pub fn settings(config: &Config) -> ControllerSettings {
    config
        .controller
        .clone()
        .unwrap_or_else(|| toml::from_str("").expect("every controller setting has a default"))
}

/// The CA behind `internal` certificates. With a local store it is the same one a
/// standalone proxy uses (`<data_dir>/ca/`), so clients trust one file in every mode.
async fn serving_ca(config: &Config, store: &dyn Store) -> anyhow::Result<rampart_pki::Ca> {
    match settings(config).store {
        StoreSettings::Local => {
            let dir = config.server.data_dir.join("ca");
            tokio::task::spawn_blocking(move || {
                rampart_pki::Ca::load_or_create(&dir, "Rampart internal CA")
            })
            .await?
        }
        StoreSettings::Etcd(_) => authority::load(store, Authority::Serving).await,
    }
}

/// Creates a join token valid for `ttl`: one-time, or usable until it expires.
///
/// # Errors
/// When the store fails.
pub async fn create_token(
    config: &Config,
    ttl: Duration,
    reusable: bool,
) -> anyhow::Result<String> {
    let store = open_store(config).await?;
    let ca = authority::load(store.as_ref(), Authority::Fleet).await?;
    fleet::tokens::create(store.as_ref(), ttl, &ca.fingerprint()?, reusable).await
}

/// Revokes an enrolled instance: its certificate is refused from now on.
///
/// # Errors
/// When there is no such instance or the store fails.
pub async fn revoke(config: &Config, id: &str) -> anyhow::Result<()> {
    let store = open_store(config).await?;
    let key = format!("instances/{id}");
    let mut record: InstanceRecord = get_json(store.as_ref(), &key).await?.with_context(|| {
        format!("no instance {id}; `rampart controller status` lists the enrolled instances")
    })?;
    record.revoked = true;
    put_json(store.as_ref(), &key, &record).await
}

/// Shared state of a running controller.
#[derive(Debug)]
pub struct State {
    /// The fleet API's state.
    pub fleet: Arc<Fleet>,
    /// Whether this controller leads (always, with a local store).
    pub leader: watch::Receiver<bool>,
    /// DNS automation, when configured.
    pub dns: Option<Arc<dns::Dns>>,
    /// ACME state of each certificate, for the dashboard.
    pub acme: acme::Reports,
    providers: Mutex<Vec<(String, Found)>>,
}

impl State {
    /// Every discovery provider's current problems.
    #[must_use]
    pub fn discovery_errors(&self) -> Vec<String> {
        self.providers
            .lock()
            .expect("providers lock is never poisoned: no panics while held")
            .iter()
            .flat_map(|(_, f)| f.errors.iter().cloned())
            .collect()
    }

    /// What `/status` shows.
    #[must_use]
    pub fn status(&self) -> ControllerStatus {
        let providers = self
            .providers
            .lock()
            .expect("providers lock is never poisoned: no panics while held");
        ControllerStatus {
            version: self.fleet.version(),
            leader: *self.leader.borrow(),
            instances: self.fleet.registry.status(),
            discovery: providers
                .iter()
                .map(|(name, f)| ProviderStatus {
                    name: name.clone(),
                    endpoints: f.endpoint_count(),
                    errors: f.errors.clone(),
                })
                .collect(),
            dns: self.dns.as_ref().map(|d| d.status()),
        }
    }
}

/// A running controller.
#[derive(Debug)]
pub struct Handle {
    /// Where the fleet API listens.
    pub fleet_addr: SocketAddr,
    /// Where the admin API listens, if enabled.
    pub admin_addr: Option<SocketAddr>,
    /// Where the embedded DNS server answers, if that is the DNS provider.
    pub dns_addr: Option<SocketAddr>,
    /// Shared state (for `rampart up` and tests).
    pub state: Arc<State>,
    shutdown: watch::Sender<bool>,
    tasks: JoinSet<()>,
}

impl Handle {
    /// Stops every task and waits for them.
    pub async fn shutdown(mut self) {
        self.shutdown.send_replace(true);
        while self.tasks.join_next().await.is_some() {}
    }

    /// Waits until a task ends (they run until shutdown, so this means one failed).
    pub async fn wait(&mut self) {
        self.tasks.join_next().await;
    }
}

/// Starts a controller for `config`, reloading it from `path` on SIGHUP or change.
///
/// # Errors
/// When the store, the CAs or the listeners cannot be set up.
pub async fn start(config: Config, path: Option<PathBuf>) -> anyhow::Result<Handle> {
    let settings = settings(&config);
    let (store, etcd) = open(&config).await?;
    let ca = authority::load(store.as_ref(), Authority::Fleet).await?;
    let ca_fingerprint = ca.fingerprint()?;
    let serving_ca = serving_ca(&config, store.as_ref()).await?;
    let tls = fleet::tls::server_config(&ca, &settings.names)?;
    let metrics = Metrics::new();
    let registry = Registry::new(settings.instance_timeout.0);
    for (key, value) in store.list("instances").await? {
        if let Ok(record) = serde_json::from_slice::<InstanceRecord>(&value) {
            registry.known(key.trim_start_matches("instances/"), &record);
        }
    }
    let (published, _) = watch::channel(Published::default());
    let fleet = Arc::new(Fleet {
        store: store.clone(),
        ca,
        registry,
        metrics,
        published,
        watch_timeout: settings.watch_timeout.0,
        shared: etcd.is_some(),
    });
    let (shutdown, shutdown_rx) = watch::channel(false);
    let mut tasks = JoinSet::new();
    let (leader_tx, leader) = watch::channel(false);
    // A shared store: campaign for leadership, and follow the leader's snapshots.
    let follow = match (&settings.store, etcd) {
        (StoreSettings::Etcd(settings), Some(etcd)) => {
            let id = format!(
                "{}-{}",
                std::fs::read_to_string("/etc/hostname")
                    .map_or_else(|_| "controller".into(), |h| h.trim().to_string()),
                &uuid::Uuid::new_v4().simple().to_string()[..8]
            );
            tasks.spawn(leader::campaign(
                etcd.client(),
                etcd.key("leader"),
                id,
                settings.lease_ttl.0,
                leader_tx,
                shutdown_rx.clone(),
            ));
            Some(etcd.subscribe(SNAPSHOT_KEY).await?)
        }
        _ => {
            leader_tx.send_replace(true);
            None
        }
    };
    let dns = match &config.dns {
        Some(settings) => {
            let provider = dns::build_provider(settings, shutdown_rx.clone()).await?;
            let metrics = dns::DnsMetrics::new(&fleet.metrics.registry);
            Some(Arc::new(dns::Dns::new(
                provider,
                settings.zone.as_str(),
                metrics,
            )))
        }
        None => None,
    };
    let state = Arc::new(State {
        fleet: fleet.clone(),
        leader,
        dns: dns.clone(),
        acme: acme::Reports::default(),
        providers: Mutex::new(Vec::new()),
    });

    let fleet_listener = TcpListener::bind(settings.listen).await.with_context(|| {
        format!(
            "binding the fleet API to {} (controller.listen)",
            settings.listen
        )
    })?;
    let fleet_addr = fleet_listener.local_addr()?;
    let admin_listener = match settings.admin {
        Some(addr) => Some(
            TcpListener::bind(addr)
                .await
                .with_context(|| format!("binding the admin API to {addr} (controller.admin)"))?,
        ),
        None => None,
    };
    let admin_addr = admin_listener
        .as_ref()
        .map(TcpListener::local_addr)
        .transpose()?;

    let found = spawn_providers(&config, &mut tasks, &shutdown_rx);
    let config_rx = match path {
        Some(p) => spawn_config_watch(p, config.clone(), &fleet.metrics, &mut tasks, &shutdown_rx),
        None => watch::channel(config).1,
    };
    let dns_addr = dns.as_ref().and_then(|d| d.provider().addr());
    if let (Some(dns), Some(settings)) = (dns, &config_rx.borrow().dns) {
        let (seen_tx, seen_rx) = watch::channel(Vec::new());
        let sni = settings
            .names
            .first()
            .map_or_else(|| settings.zone.to_string(), |n| n.name.to_string());
        tasks.spawn(dns::view::run(
            fleet.clone(),
            settings.probe.clone(),
            sni,
            seen_tx,
            shutdown_rx.clone(),
        ));
        tasks.spawn(dns::run(
            dns,
            config_rx.clone(),
            seen_rx,
            state.leader.clone(),
            fleet.clone(),
            shutdown_rx.clone(),
        ));
    }
    let (acme, acme_rx) = acme::Acme::new(
        store.clone(),
        fleet.clone(),
        state.dns.clone(),
        state.acme.clone(),
    );
    tasks.spawn(acme::run(
        acme,
        config_rx.clone(),
        state.leader.clone(),
        shutdown_rx.clone(),
    ));
    let compiler = Compiler::new(serving_ca);
    tasks.spawn(compile_loop(
        state.clone(),
        compiler,
        Inputs {
            config: config_rx,
            found,
            follow,
            acme: acme_rx,
        },
        shutdown_rx.clone(),
    ));
    tasks.spawn(fleet::api::serve(
        fleet.clone(),
        fleet_listener,
        tls,
        shutdown_rx.clone(),
    ));
    if fleet.shared {
        tasks.spawn(fleet::sync_heartbeats(fleet.clone(), shutdown_rx.clone()));
    }
    tasks.spawn(fleet::forget_silent(
        fleet.clone(),
        settings.forget_after.0,
        state.leader.clone(),
        shutdown_rx.clone(),
    ));
    if let Some(l) = admin_listener {
        tasks.spawn(admin::serve(
            state.clone(),
            l,
            settings.admin_token_file.clone(),
            shutdown_rx.clone(),
        ));
    }
    if let Some(file) = settings.join_token_file.clone() {
        // Written before start returns, so that proxies started next find it.
        let fingerprint = ca_fingerprint;
        write_join_token(store.as_ref(), &fingerprint, &file).await?;
        let store = store.clone();
        let mut shutdown = shutdown_rx.clone();
        tasks.spawn(async move {
            loop {
                tokio::select! {
                    () = tokio::time::sleep(JOIN_TOKEN_TTL / 2) => {}
                    _ = shutdown.wait_for(|s| *s) => return,
                }
                if let Err(e) = write_join_token(store.as_ref(), &fingerprint, &file).await {
                    tracing::error!("{e:#}; the previous token stays valid until it expires");
                }
            }
        });
    }
    tracing::info!("controller fleet API on https://{fleet_addr}");
    Ok(Handle {
        fleet_addr,
        admin_addr,
        dns_addr,
        state,
        shutdown,
        tasks,
    })
}

/// Lifetime of the join token kept in `controller.join_token_file`; replaced at half.
const JOIN_TOKEN_TTL: Duration = Duration::from_secs(24 * 3600);

/// Creates a reusable join token and writes it to `file` (atomically, owner-only).
async fn write_join_token(store: &dyn Store, ca_sha256: &str, file: &Path) -> anyhow::Result<()> {
    let token = fleet::tokens::create(store, JOIN_TOKEN_TTL, ca_sha256, true).await?;
    let tmp = file.with_extension("tmp");
    let write = || -> std::io::Result<()> {
        use std::io::Write as _;
        use std::os::unix::fs::OpenOptionsExt as _;
        if let Some(dir) = file.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(token.as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, file)
    };
    write().with_context(|| {
        format!(
            "writing the join token to {} (controller.join_token_file)",
            file.display()
        )
    })
}

type FoundRx = Vec<(String, watch::Receiver<Found>)>;

fn spawn_providers(
    config: &Config,
    tasks: &mut JoinSet<()>,
    shutdown: &watch::Receiver<bool>,
) -> FoundRx {
    let pools: std::collections::BTreeSet<String> = config.pools.keys().cloned().collect();
    let mut out = Vec::new();
    for f in &config.discovery.files {
        let provider = FileProvider::new(f.path.clone(), pools.clone());
        let (tx, rx) = watch::channel(Found::default());
        out.push((provider.name(), rx));
        let shutdown = shutdown.clone();
        tasks.spawn(async move { provider.run(tx, shutdown).await });
    }
    let mut providers: Vec<Box<dyn Provider>> = Vec::new();
    for d in &config.discovery.docker {
        providers.push(Box::new(discovery::docker::DockerProvider::new(d.clone())));
    }
    for s in &config.discovery.swarm {
        providers.push(Box::new(discovery::docker::DockerProvider::swarm(
            s.clone(),
        )));
    }
    for s in &config.discovery.dns_srv {
        providers.push(Box::new(discovery::srv::SrvProvider::new(s.clone())));
    }
    for provider in providers {
        let (tx, rx) = watch::channel(Found::default());
        out.push((provider.name(), rx));
        let shutdown = shutdown.clone();
        tasks.spawn(async move { provider.run(tx, shutdown).await });
    }
    out
}

/// Where the current snapshot is kept in a shared store, for followers.
const SNAPSHOT_KEY: &str = "snapshot/current";

/// What the compile loop reacts to.
struct Inputs {
    config: watch::Receiver<Config>,
    found: FoundRx,
    /// The leader's stored snapshot (shared store only).
    follow: Option<watch::Receiver<Option<Vec<u8>>>>,
    /// ACME certificates and challenge answers.
    acme: watch::Receiver<acme::Output>,
}

/// As leader: recompiles on every configuration or discovery change and publishes the
/// result (also to the shared store). As follower: publishes what the leader stored.
async fn compile_loop(
    state: Arc<State>,
    mut compiler: Compiler,
    mut inputs: Inputs,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut leader = state.leader.clone();
    let (mut config_open, mut leader_open, mut acme_open) = (true, true, true);
    // Give each provider a moment for its first read, so that the first snapshot
    // already holds the discovered endpoints.
    for (_, rx) in &mut inputs.found {
        let _ = tokio::time::timeout(Duration::from_secs(2), rx.changed()).await;
    }
    loop {
        let current: Vec<(String, Found)> = inputs
            .found
            .iter_mut()
            .map(|(n, rx)| (n.clone(), rx.borrow_and_update().clone()))
            .collect();
        let cfg = inputs.config.borrow_and_update().clone();
        compiler.acme = inputs.acme.borrow_and_update().clone();
        if *leader.borrow_and_update() {
            if let Some(body) = publish(&state, &mut compiler, &cfg, &current).await {
                if inputs.follow.is_some() {
                    if let Err(e) = state.fleet.store.put(SNAPSHOT_KEY, &body).await {
                        tracing::error!("storing the snapshot for followers: {e:#}");
                    }
                }
            }
        } else if let Some(follow) = inputs.follow.as_mut() {
            let stored = follow.borrow_and_update().clone();
            if let Some(body) = stored {
                follow_leader(&state, Bytes::from(body));
            }
        }
        state.fleet.registry.discovered(
            current
                .iter()
                .flat_map(|(_, f)| f.proxies.iter().cloned())
                .collect(),
        );
        *state
            .providers
            .lock()
            .expect("providers lock is never poisoned: no panics while held") = current;
        // Wait for a real change: a channel that closes (no file to reload, or a local
        // store whose leadership never changes) is not one.
        loop {
            let any_found = any_found(&mut inputs.found);
            // The leader's own writes come back through the store: only followers listen.
            let leading = *leader.borrow();
            let followed = async {
                match inputs.follow.as_mut() {
                    Some(f) if !leading => f.changed().await.is_ok(),
                    _ => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = shutdown.changed() => return,
                r = inputs.config.changed(), if config_open => match r {
                    Ok(()) => break,
                    Err(_) => config_open = false,
                },
                r = leader.changed(), if leader_open => match r {
                    Ok(()) => break,
                    Err(_) => leader_open = false,
                },
                true = followed => break,
                r = inputs.acme.changed(), if acme_open => match r {
                    Ok(()) => break,
                    Err(_) => acme_open = false,
                },
                () = any_found => break,
                // A long quiet spell must not let internal certificates expire.
                () = tokio::time::sleep(INTERNAL_RENEWAL_CHECK) => {
                    if compiler.internal_renewal_due() {
                        tracing::info!("renewing internal-CA certificates");
                        break;
                    }
                }
            }
        }
    }
}

/// How often the compile loop checks internal-CA certificates for renewal.
const INTERNAL_RENEWAL_CHECK: Duration = Duration::from_secs(3600);

/// Publishes the leader's snapshot to this follower's watchers.
fn follow_leader(state: &State, body: Bytes) {
    #[derive(serde::Deserialize)]
    struct Version {
        version: u64,
    }
    match serde_json::from_slice::<Version>(&body) {
        Ok(v) if v.version != state.fleet.version() => {
            tracing::info!("following the leader's snapshot version {}", v.version);
            state
                .fleet
                .metrics
                .snapshot_version
                .set(i64::try_from(v.version).unwrap_or(i64::MAX));
            state.fleet.published.send_replace(Published {
                version: v.version,
                body,
            });
        }
        Ok(_) => {}
        Err(e) => tracing::error!("the stored snapshot is unreadable: {e}"),
    }
}

/// Resolves when any provider publishes. A provider that stopped (at shutdown)
/// changes nothing any more.
async fn any_found(found: &mut FoundRx) {
    if found.is_empty() {
        return std::future::pending().await;
    }
    let waits = found.iter_mut().map(|(_, rx)| {
        Box::pin(async move {
            if rx.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        })
    });
    futures_util::future::select_all(waits).await;
}

/// Compiles and publishes the next version; returns its encoding.
async fn publish(
    state: &State,
    compiler: &mut Compiler,
    config: &Config,
    found: &[(String, Found)],
) -> Option<Bytes> {
    let fleet = &state.fleet;
    for (name, f) in found {
        fleet
            .metrics
            .discovery_errors
            .with_label_values(&[name])
            .set(i64::try_from(f.errors.len()).unwrap_or(i64::MAX));
        fleet
            .metrics
            .discovery_endpoints
            .with_label_values(&[name])
            .set(i64::try_from(f.endpoint_count()).unwrap_or(i64::MAX));
    }
    let found: Vec<Found> = found.iter().map(|(_, f)| f.clone()).collect();
    let started = Instant::now();
    // Compiled first at the current version: if that is what proxies serve already
    // (issued certificates are cached, so equal inputs compile equal), nothing is
    // published and no version is spent.
    let mut snapshot = match compiler.compile(config, &found, fleet.version()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(
                "next snapshot not built, proxies keep version {}: {e:#}",
                fleet.version()
            );
            return None;
        }
    };
    if compiler.last.as_ref() == Some(&snapshot) {
        return None;
    }
    // The build time excludes allocating the version (a store round trip with etcd).
    let compiled_in = started.elapsed();
    let version = match fleet.store.next_version().await {
        Ok(v) => v,
        Err(e) => {
            tracing::error!(
                "cannot allocate a snapshot version, keeping version {}: {e:#}",
                fleet.version()
            );
            return None;
        }
    };
    snapshot.version = version;
    let encoding = Instant::now();
    let body = match serde_json::to_vec(&snapshot) {
        Ok(b) => Bytes::from(b),
        Err(e) => {
            tracing::error!("snapshot {version} not encoded: {e}");
            return None;
        }
    };
    fleet
        .metrics
        .snapshot_build
        .observe((compiled_in + encoding.elapsed()).as_secs_f64());
    fleet
        .metrics
        .snapshot_bytes
        .set(i64::try_from(body.len()).unwrap_or(i64::MAX));
    fleet
        .metrics
        .snapshot_version
        .set(i64::try_from(version).unwrap_or(i64::MAX));
    tracing::info!(
        "snapshot version {version} published ({} bytes)",
        body.len()
    );
    fleet.published.send_replace(Published {
        version,
        body: body.clone(),
    });
    compiler.last = Some(snapshot);
    Some(body)
}

/// Reloads the configuration on SIGHUP or when its file changes; an invalid file is
/// reported and the last good configuration stays in use.
fn spawn_config_watch(
    path: PathBuf,
    initial: Config,
    metrics: &Metrics,
    tasks: &mut JoinSet<()>,
    shutdown: &watch::Receiver<bool>,
) -> watch::Receiver<Config> {
    let (tx, rx) = watch::channel(initial);
    let failures = metrics.config_reload_failures.clone();
    let mut shutdown = shutdown.clone();
    tasks.spawn(async move {
        let mut hup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!("cannot listen for SIGHUP: {e}");
                None
            }
        };
        let mut last = std::fs::read(&path).unwrap_or_default();
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        loop {
            let signalled = async {
                match hup.as_mut() {
                    Some(h) => {
                        h.recv().await;
                    }
                    None => std::future::pending().await,
                }
            };
            let forced = tokio::select! {
                _ = shutdown.changed() => return,
                () = signalled => true,
                _ = tick.tick() => false,
            };
            let text = std::fs::read(&path).unwrap_or_default();
            if text == last && !forced {
                continue;
            }
            last.clone_from(&text);
            match rampart_config::load(&path) {
                Ok(cfg) => {
                    tracing::info!("configuration {} reloaded", path.display());
                    tx.send_replace(cfg);
                }
                Err(e) => {
                    failures.inc();
                    tracing::error!("configuration reload failed, keeping the last good one:\n{e}");
                }
            }
        }
    });
    rx
}

/// Reads `/status` from a controller's admin API.
///
/// # Errors
/// When the controller cannot be reached or answers garbage.
pub async fn fetch_status(admin: SocketAddr) -> anyhow::Result<ControllerStatus> {
    let body = admin_call(admin, http::Method::GET, "/status", Bytes::new()).await?;
    serde_json::from_slice(&body).context("the admin API's /status is not a controller status")
}

/// Asks the running controller at `admin` for the DNS plan of `settings` (the names,
/// owner and policies of a configuration file) against its live view of the fleet and
/// a fresh read of its DNS provider.
///
/// # Errors
/// When the controller cannot be reached, has no DNS automation, or its provider
/// cannot be read.
pub async fn fetch_dns_plan(
    admin: SocketAddr,
    settings: &rampart_config::DnsSettings,
) -> anyhow::Result<rampart_config::snapshot::DnsStatus> {
    let body = admin_call(
        admin,
        http::Method::POST,
        "/dns/plan",
        Bytes::from(serde_json::to_vec(settings)?),
    )
    .await?;
    serde_json::from_slice(&body).map_err(|_| {
        anyhow::anyhow!(
            "the controller at {admin} answered: {}",
            String::from_utf8_lossy(&body).trim()
        )
    })
}

async fn admin_call(
    admin: SocketAddr,
    method: http::Method,
    path: &str,
    body: Bytes,
) -> anyhow::Result<Bytes> {
    use http_body_util::BodyExt;
    let tcp = tokio::net::TcpStream::connect(admin)
        .await
        .with_context(|| {
            format!(
                "connecting to the controller's admin API at {admin}; is the controller running?"
            )
        })?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp)).await?;
    tokio::spawn(conn);
    let req = http::Request::builder()
        .method(method)
        .uri(path)
        .header(http::header::HOST, admin.to_string())
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(http_body_util::Full::new(body))?;
    let resp = sender.send_request(req).await?;
    Ok(resp.into_body().collect().await?.to_bytes())
}

/// A DNS plan for people: what would change, what is left alone and why.
#[must_use]
pub fn render_dns_plan(status: &rampart_config::snapshot::DnsStatus) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let ready = status.instances.iter().filter(|i| i.ready).count();
    let _ = writeln!(
        out,
        "DNS plan for zone {} ({}): {ready} of {} instances ready",
        status.zone,
        status.provider,
        status.instances.len()
    );
    for i in &status.instances {
        let probe = match (i.probe_ok, &i.probe_error) {
            (Some(true), _) => "probe ok".to_string(),
            (Some(false), Some(e)) => format!("probe failing: {e}"),
            (Some(false), None) => "probe failing".to_string(),
            (None, _) => "not probed".to_string(),
        };
        let addrs: Vec<String> = i.addrs.iter().map(ToString::to_string).collect();
        let _ = writeln!(
            out,
            "  instance {} {} heartbeat {}, {probe} -> {}",
            i.id,
            addrs.join(","),
            if i.heartbeat_ready {
                "ready"
            } else {
                "not ready"
            },
            if i.ready {
                "published"
            } else {
                "not published"
            }
        );
    }
    let plan = &status.plan;
    if plan.changes.is_empty() {
        out.push_str("No changes: the records match the ready instances.\n");
    } else {
        let _ = writeln!(out, "{} changes:", plan.changes.len());
        for c in &plan.changes {
            let _ = writeln!(out, "  {c}");
        }
    }
    for s in &plan.skipped {
        let _ = writeln!(out, "skipped (not owned by Rampart): {s}");
    }
    for s in &plan.floored {
        let _ = writeln!(out, "held at floor: {s}");
    }
    out
}

/// A table of the instances in `status`, for people.
#[must_use]
pub fn render_status(status: &ControllerStatus) -> String {
    use std::fmt::Write as _;
    let mut out = format!(
        "snapshot version {}{}\n\n{:<20} {:<10} {:<16} {:>8} {:>12}  {}\n",
        status.version,
        if status.leader { " (leader)" } else { "" },
        "INSTANCE",
        "STATE",
        "ADDRESS",
        "VERSION",
        "HEARTBEAT",
        "HOST"
    );
    for i in &status.instances {
        let _ = writeln!(
            out,
            "{:<20} {:<10} {:<16} {:>8} {:>12}  {}{}",
            i.id,
            i.state,
            i.peer.as_deref().unwrap_or("-"),
            i.version,
            i.last_heartbeat_secs
                .map_or_else(|| "never".to_string(), |s| format!("{s:.1}s ago")),
            i.hostname,
            i.last_error
                .as_ref()
                .map_or_else(String::new, |e| format!("  last error: {e}")),
        );
    }
    for p in &status.discovery {
        let _ = writeln!(out, "\ndiscovery {}: {} endpoints", p.name, p.endpoints);
        for e in &p.errors {
            let _ = writeln!(out, "  error: {e}");
        }
    }
    out
}
