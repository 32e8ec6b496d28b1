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
use rampart_config::{DockerDiscovery, Route, SwarmDiscovery, SwarmMode};
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

/// A Swarm is re-read this often besides its events (tasks on other nodes send none).
const SWARM_RESYNC: Duration = Duration::from_secs(5);

/// One thing that may serve: a container, a Swarm task, or (mesh mode) a service.
#[derive(Debug, Clone, PartialEq)]
struct Unit {
    /// For messages: container name, `service.slot`, or service name.
    name: String,
    /// Container id (matched against proxies' host names).
    id: String,
    labels: BTreeMap<String, String>,
    ip: IpAddr,
}

/// Whether labels ask Rampart for anything.
fn wanted(labels: &BTreeMap<String, String>) -> bool {
    labels.contains_key("rampart.enable") || labels.contains_key("rampart.role")
}

/// A Docker engine (containers) or a Swarm (services) as a source of routes and
/// endpoints.
#[derive(Debug)]
pub struct DockerProvider {
    settings: DockerDiscovery,
    /// Set when this provider reads a Swarm's services rather than containers.
    swarm: Option<SwarmDiscovery>,
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
            swarm: None,
            remembered: std::sync::Mutex::new(BTreeMap::new()),
            stopping: std::sync::Mutex::new(std::collections::HashSet::new()),
        }
    }

    /// A provider for the Swarm whose manager's API is in `settings`.
    #[must_use]
    pub fn swarm(settings: SwarmDiscovery) -> Self {
        let mut provider = Self::new(DockerDiscovery {
            socket: settings.socket.clone(),
            network: settings.network.clone(),
        });
        provider.swarm = Some(settings);
        provider
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

    /// Reads what serves now: containers, or Swarm services and their tasks.
    async fn read(&self, docker: &Docker, networks: Option<&[String]>) -> Result<Found, String> {
        let mut found = Found::default();
        let units = match &self.swarm {
            None => self.containers(docker, networks, &mut found).await?,
            Some(swarm) => self.tasks(docker, swarm, networks, &mut found).await?,
        };
        Ok(self.assemble(units, found))
    }

    /// Every enabled, running, not unhealthy, not stopping container.
    async fn containers(
        &self,
        docker: &Docker,
        networks: Option<&[String]>,
        found: &mut Found,
    ) -> Result<Vec<Unit>, String> {
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
        let mut units = Vec::new();
        for c in containers {
            let name = c.names.as_ref().and_then(|n| n.first()).map_or_else(
                || c.id.clone().unwrap_or_default(),
                |n| n.trim_start_matches('/').to_string(),
            );
            let labels: BTreeMap<String, String> =
                c.labels.clone().unwrap_or_default().into_iter().collect();
            let stopping = c.id.as_ref().is_some_and(|id| {
                self.stopping
                    .lock()
                    .expect("stopping lock is never poisoned: no panics while held")
                    .contains(id)
            });
            if !wanted(&labels) || stopping {
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
            units.push(Unit {
                name,
                id: c.id.clone().unwrap_or_default(),
                labels,
                ip,
            });
        }
        Ok(units)
    }

    /// The running tasks of every enabled Swarm service (or, in mesh mode, each service
    /// once at the mesh address). Read as raw JSON: the API's task model carries the
    /// overlay addresses (`NetworksAttachments`) that bollard's does not.
    async fn tasks(
        &self,
        docker: &Docker,
        swarm: &SwarmDiscovery,
        networks: Option<&[String]>,
        found: &mut Found,
    ) -> Result<Vec<Unit>, String> {
        let version = docker.client_version();
        let prefix = format!("/v{}.{}", version.major_version, version.minor_version);
        let services = raw_get(&self.settings.socket, &format!("{prefix}/services")).await?;
        let tasks = match swarm.mode {
            SwarmMode::Tasks => raw_get(&self.settings.socket, &format!("{prefix}/tasks")).await?,
            SwarmMode::Mesh => serde_json::Value::Array(Vec::new()),
        };
        Ok(swarm_units(
            &services,
            &tasks,
            swarm,
            networks,
            &mut found.errors,
        ))
    }

    /// Routes, endpoints and proxies from `units`.
    fn assemble(&self, units: Vec<Unit>, mut found: Found) -> Found {
        let mut routes: BTreeMap<String, (String, Route)> = BTreeMap::new();
        // pool -> (the container whose settings were taken first, them)
        let mut settings: BTreeMap<String, (String, rampart_config::PoolSettings)> =
            BTreeMap::new();
        for Unit {
            name,
            id,
            labels,
            ip,
        } in units
        {
            if labels.get("rampart.role").map(String::as_str) == Some("proxy") {
                found.proxies.push(super::ProxyContainer {
                    name: name.clone(),
                    id,
                    addrs: vec![ip],
                });
            }
            match labels::parse(&name, &labels, ip) {
                Ok(Some(l)) => {
                    for (pool, ep) in l.endpoints {
                        // A container that names no settings for its pool takes the
                        // others' (it disagrees only by saying something else).
                        match (settings.get(&pool), l.settings.get(&pool)) {
                            (Some((first, existing)), Some(mine)) if existing != mine => {
                                found.errors.push(format!(
                                    "{name}: the labels of pool {pool} differ from those on {first}; give every container of a pool the same pool labels"
                                ));
                            }
                            (None, Some(mine)) => {
                                settings.insert(pool.clone(), (name.clone(), mine.clone()));
                            }
                            _ => {}
                        }
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
        // A split may name a pool no container joins (yet): it exists, empty, and gets
        // no clients until one does (a split skips a pool that cannot serve).
        for r in &found.routes {
            if let rampart_config::Action::Forward(to) = &r.action {
                for pool in to.pools() {
                    found.pools.entry(pool.to_string()).or_default();
                }
            }
        }
        found.pool_settings = settings.into_iter().map(|(p, (_, s))| (p, s)).collect();
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
            if let rampart_config::Action::Forward(to) = &route.action {
                for pool in to.pools() {
                    found.pools.entry(pool.to_string()).or_default();
                }
            }
            found.routes.push(route.clone());
        }
        found.proxies.sort_by(|a, b| a.name.cmp(&b.name));
        for eps in found.pools.values_mut() {
            eps.sort_by_key(|e| e.address.to_string());
        }
        found
    }
}

/// A container event (or a service one: create, update, remove) that can change what
/// is published.
fn relevant(ev: &bollard::models::EventMessage) -> bool {
    if ev
        .typ
        .as_ref()
        .is_some_and(|t| *t == bollard::models::EventMessageTypeEnum::SERVICE)
    {
        return true;
    }
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
        match self.swarm {
            None => format!("docker:{}", self.settings.socket),
            Some(_) => format!("swarm:{}", self.settings.socket),
        }
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
                // A Swarm is also re-read SWARM_RESYNC after its last read (other nodes'
                // tasks send no events); a deadline that events in between do not move.
                let resync_every = self.swarm.as_ref().map(|_| SWARM_RESYNC);
                let mut resync_at = resync_every.map(|d| tokio::time::Instant::now() + d);
                loop {
                    let wake = match (confirm, resync_at) {
                        (Some(a), Some(b)) => Some(a.min(b)),
                        (a, b) => a.or(b),
                    };
                    let next = match wake {
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
                        resync_at = resync_every.map(|d| tokio::time::Instant::now() + d);
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

/// Units of the Swarm's enabled services, from the API's `/services` and `/tasks`
/// answers: running tasks that should run (a task told to shut down leaves at once,
/// before its container stops), at their address on one of `networks`; or, in mesh
/// mode, each service at `mesh_address` with its pool ports mapped to the published ones.
fn swarm_units(
    services: &serde_json::Value,
    tasks: &serde_json::Value,
    swarm: &SwarmDiscovery,
    networks: Option<&[String]>,
    errors: &mut Vec<String>,
) -> Vec<Unit> {
    let empty = Vec::new();
    let mut units = Vec::new();
    for service in services.as_array().unwrap_or(&empty) {
        let id = service["ID"].as_str().unwrap_or_default();
        let name = service["Spec"]["Name"].as_str().unwrap_or(id).to_string();
        let labels: BTreeMap<String, String> = service["Spec"]["Labels"]
            .as_object()
            .map(|m| {
                m.iter()
                    .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
                    .collect()
            })
            .unwrap_or_default();
        if !wanted(&labels) {
            continue;
        }
        if swarm.mode == SwarmMode::Mesh {
            let Some(ip) = swarm.mesh_address else {
                continue;
            };
            let published: BTreeMap<String, String> = service["Endpoint"]["Ports"]
                .as_array()
                .unwrap_or(&empty)
                .iter()
                .filter_map(|p| {
                    Some((
                        p["TargetPort"].as_u64()?.to_string(),
                        p["PublishedPort"].as_u64()?.to_string(),
                    ))
                })
                .collect();
            let mut mapped = labels.clone();
            for (key, value) in &labels {
                if key.starts_with("rampart.pool.") && key.ends_with(".port") {
                    match published.get(value) {
                        Some(p) => {
                            mapped.insert(key.clone(), p.clone());
                        }
                        None => {
                            errors.push(format!(
                                "{name}: label {key}={value:?}: the service does not publish port {value}; publish it (--publish target={value}) or use mode = \"tasks\""
                            ));
                            mapped.remove(key);
                        }
                    }
                }
            }
            units.push(Unit {
                name,
                id: id.to_string(),
                labels: mapped,
                ip,
            });
            continue;
        }
        for task in tasks.as_array().unwrap_or(&empty) {
            if task["ServiceID"].as_str() != Some(id)
                || task["DesiredState"].as_str() != Some("running")
                || task["Status"]["State"].as_str() != Some("running")
            {
                continue;
            }
            let slot = task["Slot"].as_u64().map_or_else(
                || task["ID"].as_str().unwrap_or_default().to_string(),
                |s| s.to_string(),
            );
            let task_name = format!("{name}.{slot}");
            let ip = task["NetworksAttachments"]
                .as_array()
                .unwrap_or(&empty)
                .iter()
                .filter(|a| {
                    let net = a["Network"]["Spec"]["Name"].as_str().unwrap_or_default();
                    networks.is_none_or(|wanted| wanted.iter().any(|w| w == net))
                        && net != "ingress"
                })
                .find_map(|a| {
                    a["Addresses"]
                        .as_array()?
                        .iter()
                        .find_map(|cidr| cidr.as_str()?.split('/').next()?.parse::<IpAddr>().ok())
                });
            let Some(ip) = ip else {
                errors.push(format!(
                    "{task_name}: no address on {}; attach the service to that overlay network",
                    networks.map_or_else(|| "an overlay network".to_string(), |n| n.join(" or "))
                ));
                continue;
            };
            units.push(Unit {
                name: task_name,
                id: task["Status"]["ContainerStatus"]["ContainerID"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
                labels: labels.clone(),
                ip,
            });
        }
    }
    units
}

/// `GET path` on the engine's API, as JSON (unix sockets and plain http).
async fn raw_get(socket: &str, path: &str) -> Result<serde_json::Value, String> {
    use http_body_util::BodyExt as _;
    let what = format!("docker {socket}: GET {path}");
    let request = hyper::Request::get(path)
        .header("host", "docker")
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .map_err(|e| format!("{what}: {e}"))?;
    let response = if let Some(addr) = socket
        .strip_prefix("tcp://")
        .or_else(|| socket.strip_prefix("http://"))
    {
        let stream = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| format!("{what}: {e}"))?;
        send(hyper_util::rt::TokioIo::new(stream), request).await
    } else {
        let stream = tokio::net::UnixStream::connect(socket.trim_start_matches("unix://"))
            .await
            .map_err(|e| format!("{what}: {e}"))?;
        send(hyper_util::rt::TokioIo::new(stream), request).await
    }
    .map_err(|e| format!("{what}: {e}"))?;
    let status = response.status();
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(|e| format!("{what}: {e}"))?
        .to_bytes();
    if !status.is_success() {
        return Err(format!(
            "{what}: {status}: {}; is this engine a Swarm manager (docker swarm init)?",
            String::from_utf8_lossy(&body).trim()
        ));
    }
    serde_json::from_slice(&body).map_err(|e| format!("{what}: {e}"))
}

/// Sends one request on a fresh HTTP/1 connection.
async fn send<T>(
    io: T,
    request: hyper::Request<http_body_util::Empty<bytes::Bytes>>,
) -> hyper::Result<hyper::Response<hyper::body::Incoming>>
where
    T: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await?;
    tokio::spawn(conn);
    sender.send_request(request).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn swarm(mode: SwarmMode) -> SwarmDiscovery {
        SwarmDiscovery {
            socket: "unix:///var/run/docker.sock".into(),
            network: None,
            mode,
            mesh_address: Some("192.0.2.10".parse().unwrap()),
        }
    }

    fn fixtures() -> (serde_json::Value, serde_json::Value) {
        let services = serde_json::json!([
            {"ID": "s1", "Spec": {"Name": "web", "Labels": {
                "rampart.enable": "true", "rampart.pool.web.port": "8080",
                "rampart.route.web.host": "web.example.com"}},
             "Endpoint": {"Ports": [{"TargetPort": 8080, "PublishedPort": 30001}]}},
            {"ID": "s2", "Spec": {"Name": "other", "Labels": {}}}
        ]);
        let task = |id: &str, slot: u64, desired: &str, state: &str, ip: &str| {
            serde_json::json!({"ID": id, "ServiceID": "s1", "Slot": slot,
                "DesiredState": desired, "Status": {"State": state,
                    "ContainerStatus": {"ContainerID": format!("c-{id}")}},
                "NetworksAttachments": [
                    {"Network": {"Spec": {"Name": "ingress"}}, "Addresses": ["10.0.0.9/24"]},
                    {"Network": {"Spec": {"Name": "edge"}}, "Addresses": [format!("{ip}/24")]}]})
        };
        let tasks = serde_json::json!([
            task("t1", 1, "running", "running", "10.0.1.5"),
            task("t2", 2, "running", "starting", "10.0.1.6"),
            task("t3", 3, "shutdown", "running", "10.0.1.7"),
            task("t4", 4, "running", "running", "10.0.1.8"),
        ]);
        (services, tasks)
    }

    #[test]
    fn a_split_between_services_gives_every_pool_it_names_even_one_not_running_yet() {
        let unit = |name: &str, pool: &str, ip: &str| Unit {
            name: name.into(),
            id: name.into(),
            labels: [
                ("rampart.enable", "true"),
                (&*format!("rampart.pool.{pool}.port"), "8080"),
                ("rampart.route.site.host", "www.example.com"),
                ("rampart.route.site.split", "v1:90,v2:10,v3:0"),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
            ip: ip.parse().unwrap(),
        };
        let docker = DockerProvider::new(DockerDiscovery {
            socket: "unix:///var/run/docker.sock".into(),
            network: None,
        });
        let found = docker.assemble(
            vec![
                unit("web-v1", "v1", "10.0.0.2"),
                unit("web-v2", "v2", "10.0.0.3"),
            ],
            Found::default(),
        );
        assert!(found.errors.is_empty(), "{:?}", found.errors);
        assert_eq!(found.routes.len(), 1);
        let sizes: Vec<_> = found
            .pools
            .iter()
            .map(|(p, e)| (p.as_str(), e.len()))
            .collect();
        assert_eq!(sizes, [("v1", 1), ("v2", 1), ("v3", 0)]);
        // And the pools are made for the route, as the configuration's would be.
        let config = rampart_config::parse("[listeners]\nhttp = \"127.0.0.1:1\"\n", "t").unwrap();
        let pools = crate::compile::merge_pools(&config, &[found]);
        assert_eq!(pools.keys().collect::<Vec<_>>(), ["v1", "v2", "v3"]);
    }

    #[test]
    fn running_tasks_serve_at_their_overlay_address_and_shutdown_ones_leave_first() {
        let (services, tasks) = fixtures();
        let mut errors = Vec::new();
        let nets = vec!["edge".to_string()];
        let units = swarm_units(
            &services,
            &tasks,
            &swarm(SwarmMode::Tasks),
            Some(&nets),
            &mut errors,
        );
        let got: Vec<(String, String, String)> = units
            .iter()
            .map(|u| (u.name.clone(), u.id.clone(), u.ip.to_string()))
            .collect();
        assert_eq!(
            got,
            vec![
                ("web.1".into(), "c-t1".into(), "10.0.1.5".into()),
                ("web.4".into(), "c-t4".into(), "10.0.1.8".into())
            ]
        );
        assert!(errors.is_empty(), "{errors:?}");
        // Not attached to the wanted network: reported, not used.
        let other = vec!["backend".to_string()];
        let units = swarm_units(
            &services,
            &tasks,
            &swarm(SwarmMode::Tasks),
            Some(&other),
            &mut errors,
        );
        assert!(units.is_empty());
        assert!(
            errors[0].contains("web.1") && errors[0].contains("backend"),
            "{errors:?}"
        );
    }

    #[test]
    fn mesh_mode_reaches_each_service_on_its_published_port() {
        let (services, tasks) = fixtures();
        let mut errors = Vec::new();
        let units = swarm_units(
            &services,
            &tasks,
            &swarm(SwarmMode::Mesh),
            None,
            &mut errors,
        );
        assert_eq!(units.len(), 1);
        assert_eq!(units[0].ip.to_string(), "192.0.2.10");
        assert_eq!(units[0].labels["rampart.pool.web.port"], "30001");
        // A pool port the service does not publish is an error naming the fix.
        let mut unpublished = services.clone();
        unpublished[0]["Endpoint"]["Ports"] = serde_json::json!([]);
        let units = swarm_units(
            &unpublished,
            &tasks,
            &swarm(SwarmMode::Mesh),
            None,
            &mut errors,
        );
        assert!(!units[0].labels.contains_key("rampart.pool.web.port"));
        assert!(errors[0].contains("--publish target=8080"), "{errors:?}");
    }
}
