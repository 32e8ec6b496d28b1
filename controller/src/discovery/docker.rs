//! The Docker provider (bollard): running containers with `rampart.enable=true` become
//! routes and endpoints ([`super::labels`]). A full list at start and after every
//! container event (start, die, stop, kill, pause, unpause, health_status), and again
//! when the event stream breaks (engine restarted, socket gone), with back-off. Between
//! reads the last good state stays published.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::time::Duration;

use async_trait::async_trait;
use bollard::query_parameters::ListContainersOptionsBuilder;
use bollard::Docker;
use futures_util::StreamExt as _;
use rampart_config::{DockerDiscovery, Route};
use tokio::sync::watch;

use super::labels;
use super::{Found, Provider};

/// Events that change what the provider publishes.
const EVENTS: &[&str] = &[
    "start",
    "die",
    "stop",
    "kill",
    "pause",
    "unpause",
    "health_status",
    "destroy",
];
/// How long a route outlives its last container.
const ROUTE_GRACE: Duration = Duration::from_secs(300);
/// Longest pause between reconnection attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(10);
/// Events arriving together are read once.
const SETTLE: Duration = Duration::from_millis(50);
/// A second read this long after the last event.
const CONFIRM: Duration = Duration::from_millis(500);

/// A Docker engine as a source of routes and endpoints.
#[derive(Debug)]
pub struct DockerProvider {
    settings: DockerDiscovery,
    /// Routes seen lately, kept for [`ROUTE_GRACE`] after their last container went,
    /// so that a redeploy answers 503 + Retry-After rather than 404.
    remembered: std::sync::Mutex<BTreeMap<String, (Route, std::time::Instant)>>,
    /// Containers sent a stopping signal (`docker stop`, a scale-down: still running,
    /// finishing what they have, but given no new requests) or just dead.
    stopping: std::sync::Mutex<std::collections::HashSet<String>>,
}

/// Signals that mean "stop" in a `kill` event (SIGHUP and others mean reload or less).
const STOP_SIGNALS: &[&str] = &[
    "2", "3", "9", "15", "SIGINT", "SIGQUIT", "SIGKILL", "SIGTERM",
];

/// Updates the set of stopping containers from one event.
fn track_stopping(
    stopping: &mut std::collections::HashSet<String>,
    ev: &bollard::models::EventMessage,
) {
    let Some(actor) = &ev.actor else { return };
    let Some(id) = &actor.id else { return };
    match ev.action.as_deref().unwrap_or_default() {
        "kill" => {
            let signal = actor
                .attributes
                .as_ref()
                .and_then(|a| a.get("signal"))
                .map_or("", String::as_str);
            if STOP_SIGNALS.contains(&signal) {
                stopping.insert(id.clone());
            }
        }
        // The engine may still list a container as running for a moment after "die":
        // it stays out until it is listed no more, or starts again.
        "die" => {
            stopping.insert(id.clone());
        }
        "start" | "restart" => {
            stopping.remove(id);
        }
        _ => {}
    }
}

impl DockerProvider {
    /// A provider for the engine in `settings`.
    #[must_use]
    pub fn new(settings: DockerDiscovery) -> Self {
        Self {
            settings,
            remembered: std::sync::Mutex::new(BTreeMap::new()),
            stopping: std::sync::Mutex::new(std::collections::HashSet::new()),
        }
    }

    async fn connect(&self) -> Result<Docker, String> {
        let unix =
            self.settings.socket.starts_with("unix://") || self.settings.socket.starts_with('/');
        if unix {
            // The HTTP client's connect error hides the cause: ask the socket itself.
            let path = self
                .settings
                .socket
                .trim_start_matches("unix://")
                .to_string();
            let probe = tokio::net::UnixStream::connect(&path).await;
            if let Err(e) = probe {
                let hint = match e.kind() {
                    std::io::ErrorKind::PermissionDenied => format!(
                        "run the controller in the socket's group (`stat -c %g {path}`; Compose: group_add)"
                    ),
                    std::io::ErrorKind::NotFound => "is the engine running, and the socket mounted into the controller's container?".to_string(),
                    _ => "is the engine running?".to_string(),
                };
                return Err(format!("docker {}: {e}; {hint}", self.settings.socket));
            }
        }
        let docker = if unix {
            Docker::connect_with_unix(&self.settings.socket, 30, bollard::API_DEFAULT_VERSION)
        } else {
            Docker::connect_with_http(&self.settings.socket, 30, bollard::API_DEFAULT_VERSION)
        }
        .map_err(|e| format!("docker {}: {e}", self.settings.socket))?;
        docker
            .negotiate_version()
            .await
            .map_err(|e| format!("docker {}: {e}", self.settings.socket))
    }

    /// The networks to take addresses from: the configured one, or those of the
    /// controller's own container (found by its host name); `None`: any.
    async fn networks(&self, docker: &Docker) -> Option<Vec<String>> {
        if let Some(net) = &self.settings.network {
            return Some(vec![net.clone()]);
        }
        let hostname = std::fs::read_to_string("/etc/hostname").ok()?;
        let own = docker.inspect_container(hostname.trim(), None).await.ok()?;
        let mut nets: Vec<String> = own
            .network_settings?
            .networks?
            .into_keys()
            .filter(|n| n != "host" && n != "none")
            .collect();
        nets.sort();
        tracing::info!(
            "docker: the controller runs in container {}; using addresses on its networks {nets:?}",
            hostname.trim()
        );
        Some(nets)
    }

    /// Takes note of a container being stopped (or started again).
    fn note(&self, ev: &bollard::models::EventMessage) {
        track_stopping(
            &mut self
                .stopping
                .lock()
                .expect("stopping lock is never poisoned: no panics while held"),
            ev,
        );
    }

    /// Reads every enabled, running, not unhealthy container.
    async fn read(&self, docker: &Docker, networks: Option<&[String]>) -> Result<Found, String> {
        // Backends (rampart.enable) and proxies (rampart.role): label filters are ANDed,
        // so list the running containers and sort them here.
        let mut filters = HashMap::new();
        filters.insert("status".to_string(), vec!["running".to_string()]);
        let options = ListContainersOptionsBuilder::default()
            .filters(&filters)
            .build();
        let containers = docker
            .list_containers(Some(options))
            .await
            .map_err(|e| format!("docker {}: listing containers: {e}", self.settings.socket))?;
        // Stopping containers that are gone need no more tracking.
        self.stopping
            .lock()
            .expect("stopping lock is never poisoned: no panics while held")
            .retain(|id| containers.iter().any(|c| c.id.as_ref() == Some(id)));
        let mut found = Found::default();
        let mut routes: BTreeMap<String, (String, Route)> = BTreeMap::new();
        for c in containers {
            let name = c.names.as_ref().and_then(|n| n.first()).map_or_else(
                || c.id.clone().unwrap_or_default(),
                |n| n.trim_start_matches('/').to_string(),
            );
            let wanted = c.labels.as_ref().is_some_and(|l| {
                l.contains_key("rampart.enable") || l.contains_key("rampart.role")
            });
            let stopping = c.id.as_ref().is_some_and(|id| {
                self.stopping
                    .lock()
                    .expect("stopping lock is never poisoned: no panics while held")
                    .contains(id)
            });
            if !wanted || stopping {
                continue;
            }
            let status = c.status.clone().unwrap_or_default();
            // Docker's own HEALTHCHECK: only healthy (or unchecked) containers serve.
            if status.contains("(unhealthy)") || status.contains("(health: starting)") {
                continue;
            }
            let attached = c
                .network_settings
                .as_ref()
                .and_then(|n| n.networks.clone())
                .unwrap_or_default();
            let endpoint = match networks {
                Some(wanted) => wanted.iter().find_map(|n| attached.get(n)),
                None => attached.values().next(),
            };
            let ip = endpoint
                .and_then(|e| e.ip_address.as_deref())
                .filter(|ip| !ip.is_empty())
                .and_then(|ip| ip.parse::<IpAddr>().ok());
            let Some(ip) = ip else {
                if let Some(wanted) = networks {
                    // Not on our network: another project's (or another Rampart's).
                    tracing::debug!("{name}: not attached to {wanted:?}; ignored");
                    continue;
                }
                found.errors.push(format!(
                    "{name}: no IP address on any network; attach it to a network the controller reaches"
                ));
                continue;
            };
            let labels: BTreeMap<String, String> =
                c.labels.clone().unwrap_or_default().into_iter().collect();
            if labels.get("rampart.role").map(String::as_str) == Some("proxy") {
                found.proxies.push(super::ProxyContainer {
                    name: name.clone(),
                    id: c.id.clone().unwrap_or_default(),
                    addrs: vec![ip],
                });
            }
            match labels::parse(&name, &labels, ip) {
                Ok(Some(l)) => {
                    for (pool, ep) in l.endpoints {
                        found.pools.entry(pool).or_default().push(ep);
                    }
                    for r in l.routes {
                        match routes.get(&r.name) {
                            Some((first, existing)) if existing != &r => found.errors.push(format!(
                                "{name}: route {} differs from the one on {first}; give every container of a service the same route labels",
                                r.name
                            )),
                            Some(_) => {}
                            None => {
                                routes.insert(r.name.clone(), (name.clone(), r));
                            }
                        }
                    }
                }
                Ok(None) => {}
                Err(errors) => found.errors.extend(errors),
            }
        }
        found.routes = routes.into_values().map(|(_, r)| r).collect();
        // A service whose containers are all gone (a redeploy, a crash loop) keeps its
        // route for a while, with an empty pool: clients get 503 and Retry-After.
        let now = std::time::Instant::now();
        let mut remembered = self
            .remembered
            .lock()
            .expect("remembered routes lock is never poisoned: no panics while held");
        for r in &found.routes {
            remembered.insert(r.name.clone(), (r.clone(), now));
        }
        remembered.retain(|_, (_, seen)| now.duration_since(*seen) < ROUTE_GRACE);
        for (name, (route, _)) in remembered.iter() {
            if found.routes.iter().any(|r| &r.name == name) {
                continue;
            }
            if let rampart_config::Action::Forward(pool) = &route.action {
                found.pools.entry(pool.clone()).or_default();
            }
            found.routes.push(route.clone());
        }
        found.proxies.sort_by(|a, b| a.name.cmp(&b.name));
        for eps in found.pools.values_mut() {
            eps.sort_by_key(|e| e.address.to_string());
        }
        Ok(found)
    }
}

/// A container event that can change what is published.
fn relevant(ev: &bollard::models::EventMessage) -> bool {
    let container = ev
        .typ
        .as_ref()
        .is_some_and(|t| *t == bollard::models::EventMessageTypeEnum::CONTAINER);
    let action = ev.action.as_deref().unwrap_or_default();
    // health_status events read "health_status: healthy".
    container
        && EVENTS
            .iter()
            .any(|e| action == *e || action.starts_with(&format!("{e}:")))
}

#[async_trait]
impl Provider for DockerProvider {
    fn name(&self) -> String {
        format!("docker:{}", self.settings.socket)
    }

    async fn run(&self, out: watch::Sender<Found>, mut shutdown: watch::Receiver<bool>) {
        let mut backoff = Duration::from_millis(100);
        loop {
            let synced = std::sync::atomic::AtomicBool::new(false);
            let session = async {
                let docker = self.connect().await?;
                // The event stream only connects when first polled, after the list: ask
                // it to replay from a second before the list, so that nothing happens
                // unseen in between (a replayed event costs one more read).
                let since = (crate::fleet::unix_ms() / 1000)
                    .saturating_sub(1)
                    .to_string();
                let networks = self.networks(&docker).await;
                let networks = networks.as_deref();
                let found = self.read(&docker, networks).await?;
                // Unfiltered: engines before API 1.42 ignore list-style event filters.
                let mut events = docker.events(Some(
                    bollard::query_parameters::EventsOptionsBuilder::new()
                        .since(&since)
                        .build(),
                ));
                out.send_replace(found);
                synced.store(true, std::sync::atomic::Ordering::Relaxed);
                // After an event, read again a moment later: the engine may list a
                // container's new state (say, exited after "die") a little after the event.
                let mut confirm: Option<tokio::time::Instant> = None;
                loop {
                    let next = match confirm {
                        Some(at) => tokio::time::timeout_at(at, events.next()).await.ok(),
                        None => Some(events.next().await),
                    };
                    let refresh = match next {
                        None => {
                            confirm = None;
                            true
                        }
                        Some(Some(Ok(ev))) if !relevant(&ev) => false,
                        Some(Some(Ok(ev))) => {
                            self.note(&ev);
                            // Take the other events of the same moment, then read once.
                            while let Ok(Some(more)) =
                                tokio::time::timeout(SETTLE, events.next()).await
                            {
                                if let Ok(ev) = more {
                                    self.note(&ev);
                                }
                            }
                            confirm = Some(tokio::time::Instant::now() + CONFIRM);
                            true
                        }
                        Some(Some(Err(e))) => {
                            return Err::<(), String>(format!(
                                "docker {}: events: {e}",
                                self.settings.socket
                            ))
                        }
                        Some(None) => {
                            return Err(format!(
                                "docker {}: the event stream ended",
                                self.settings.socket
                            ))
                        }
                    };
                    if refresh {
                        let found = self.read(&docker, networks).await?;
                        out.send_if_modified(|old| {
                            let changed = *old != found;
                            *old = found;
                            changed
                        });
                    }
                }
            };
            let result = tokio::select! {
                r = session => r,
                _ = shutdown.wait_for(|s| *s) => return,
            };
            if synced.load(std::sync::atomic::Ordering::Relaxed) {
                // It worked until now: reconnect quickly.
                backoff = Duration::from_millis(100);
            }
            if let Err(e) = result {
                tracing::warn!("{e}; keeping the last good containers, retrying in {backoff:?}");
                out.send_modify(|f| {
                    f.errors.retain(|x| !x.starts_with("docker "));
                    f.errors.push(e);
                });
            }
            tokio::select! {
                () = tokio::time::sleep(backoff) => {}
                _ = shutdown.wait_for(|s| *s) => return,
            }
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }
}
