//! The controller's supervisor: builds the shared state and starts each named task
//! (leader campaign, discovery providers, configuration watch, DNS, ACME, the compile
//! loop, the fleet API, the admin API, the join-token refresher), and stops them.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use rampart_config::snapshot::{ControllerStatus, ProviderStatus};
use rampart_config::{Config, StoreSettings};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::authority::Authority;
use crate::bootstrap::settings;
use crate::compile::Compiler;
use crate::discovery::{file::FileProvider, Found, Provider};
use crate::fleet::registry::{InstanceRecord, Registry};
use crate::fleet::{Fleet, Published};
use crate::metrics::Metrics;
use crate::store::Store;
use crate::{acme, admin, authority, discovery, dns, fleet, leader};

use crate::bootstrap::{open, serving_ca};
use crate::config_watch::spawn_config_watch;
use crate::publish::{compile_loop, Inputs, SNAPSHOT_KEY};

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
    /// On-demand TLS: the proxies' requests for names seen in handshakes.
    pub on_demand: Arc<crate::on_demand::OnDemand>,
    pub(crate) providers: Mutex<Vec<(String, Found)>>,
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
            let candidate = leader::Candidate {
                key: etcd.key(crate::store::etcd::LEADER_KEY),
                id,
                ttl: settings.lease_ttl.0,
                fence: etcd.fence(),
            };
            tasks.spawn(leader::campaign(
                etcd.client(),
                candidate,
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
    let on_demand =
        crate::on_demand::OnDemand::new(store.clone(), config_rx.clone(), &fleet.metrics.registry)?;
    let state = Arc::new(State {
        fleet: fleet.clone(),
        leader,
        dns: dns.clone(),
        acme: acme::Reports::default(),
        on_demand: on_demand.clone(),
        providers: Mutex::new(Vec::new()),
    });
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
        Some(on_demand.clone()),
    );
    tasks.spawn(acme::run(
        acme,
        config_rx.clone(),
        state.leader.clone(),
        shutdown_rx.clone(),
    ));
    let (tickets_tx, tickets_rx) = watch::channel(None);
    tasks.spawn(crate::tickets::run(
        store.clone(),
        config_rx.clone(),
        state.leader.clone(),
        tickets_tx,
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
            tickets: tickets_rx,
        },
        shutdown_rx.clone(),
    ));
    tasks.spawn(fleet::api::serve(
        fleet.clone(),
        on_demand,
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

pub(crate) type FoundRx = Vec<(String, watch::Receiver<Found>)>;

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
