//! Assembles and runs the Pingora server: the HTTP, HTTPS and admin listeners, the
//! reloader, the health checker and readiness; shutdown timing and graceful upgrade
//! settings come from the configuration.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use async_trait::async_trait;
use pingora::apps::http_app::HttpServer;
use pingora::listeners::ListenerConfig;
use pingora::protocols::l4::stream::L4BufferSettings;
use pingora::server::configuration::{Opt, ServerConf};
use pingora::server::{RunArgs, Server, ShutdownWatch};
use pingora::services::background::{background_service, BackgroundService};
use pingora::services::listening::Service;
use rampart_config::Config;

use crate::admin::AdminApp;
use crate::edge::{Edge, Scheme};
use crate::fleet::{FleetOptions, FleetService, LocalFeed, LocalFeedService};
use crate::health::checker::HealthChecker;
use crate::listener::EdgeApp;
use crate::live::Live;
use crate::reload::ReloadService;
use crate::tls::Acceptor;

/// How to run a proxy.
#[derive(Debug)]
pub struct ProxyOptions {
    /// The file to reload it from (SIGHUP, changes); `None` for an embedded config.
    pub config_path: Option<PathBuf>,
    /// Take the listening sockets over from a running instance (graceful upgrade).
    pub upgrade: bool,
    /// Take snapshots from a controller (fleet mode) instead of a file.
    pub fleet: Option<FleetOptions>,
    /// Take snapshots from a controller in this process (`rampart up`).
    pub local_feed: Option<LocalFeed>,
    /// More pages on the admin listener (`rampart up`: the controller's dashboard).
    pub admin_extra: Option<crate::admin::AdminExtra>,
    /// The controller in this process, asked for on-demand certificates (`rampart up`).
    pub on_demand: Option<AskController>,
}

/// The answer to an on-demand request, when it comes.
pub type OnDemandReply = std::pin::Pin<
    Box<dyn std::future::Future<Output = rampart_config::snapshot::OnDemandAnswer> + Send>,
>;

/// Asks a controller in this process for a name's certificate (on-demand TLS).
#[derive(Clone)]
pub struct AskController(pub Arc<dyn Fn(String) -> OnDemandReply + Send + Sync>);

impl std::fmt::Debug for AskController {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AskController")
    }
}

/// Hands the handshakes' on-demand requests to the controller in this process.
struct LocalOnDemand(std::sync::Mutex<Option<(AskController, crate::tls::on_demand::Requests)>>);

#[async_trait]
impl BackgroundService for LocalOnDemand {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let Some((ask, mut requests)) = self.0.lock().expect("taken once").take() else {
            return;
        };
        loop {
            tokio::select! {
                wanted = requests.recv() => {
                    let Some(wanted) = wanted else { return };
                    let ask = ask.clone();
                    tokio::spawn(async move {
                        let answer = (ask.0)(wanted.name).await;
                        // The handshake may have stopped waiting.
                        let _ = wanted.reply.send(answer);
                    });
                }
                _ = shutdown.changed() => return,
            }
        }
    }
}

/// Builds the first generation (so that a bad config fails before anything listens).
///
/// # Errors
/// When the configuration cannot be built.
pub fn prepare(config: Config) -> anyhow::Result<Arc<Live>> {
    Live::start(config)
}

/// Runs the proxy until a stop signal (SIGTERM: graceful, SIGINT: fast, SIGQUIT: hand
/// the sockets to an upgrading process, then drain).
///
/// # Errors
/// When the state directory cannot be created.
pub fn run(live: Arc<Live>, options: ProxyOptions) -> anyhow::Result<()> {
    let config = live.current.load().config.clone();
    let data_dir = &config.server.data_dir;
    std::fs::create_dir_all(data_dir)
        .with_context(|| format!("creating data directory {}", data_dir.display()))?;

    let conf = ServerConf {
        grace_period_seconds: Some(ceil_secs(config.server.grace_period.0)),
        graceful_shutdown_timeout_seconds: Some(ceil_secs(config.server.shutdown_timeout.0)),
        threads: config
            .server
            .threads
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, usize::from)),
        upgrade_sock: config
            .server
            .upgrade_socket
            .clone()
            .unwrap_or_else(|| data_dir.join("upgrade.sock"))
            .display()
            .to_string(),
        pid_file: data_dir.join("rampart.pid").display().to_string(),
        // Our own retry policy decides; this is only Pingora's upper bound.
        max_retries: 11,
        work_stealing: config.server.work_stealing,
        // Idle upstream connections Pingora's path keeps (all endpoints together; 128
        // by default): as for the fast paths' pool (`fast::pool`), fewer than the
        // requests in flight makes most requests open a new connection.
        upstream_keepalive_pool_size: 1024,
        ..ServerConf::default()
    };
    let opt = Opt {
        upgrade: options.upgrade,
        ..Opt::default()
    };
    let mut server = Server::new_with_opt_and_conf(opt, conf);
    server.bootstrap();
    let server_conf = server.configuration.clone();

    if let Some(addr) = config.listeners.http {
        server.add_service(edge_service(&server_conf, &live, Scheme::Http, None, addr));
    }
    // On-demand TLS: the handshakes' requests go to the controller (fleet mode or
    // `rampart up`); a proxy without one has nobody to ask.
    let (on_demand, requests) = if options.fleet.is_some() || options.on_demand.is_some() {
        let (od, requests) =
            crate::tls::on_demand::OnDemand::new(live.subscribe(), live.metrics.clone());
        (Some(Arc::new(od)), Some(requests))
    } else {
        (None, None)
    };
    if let Some(addr) = config.listeners.https {
        let acceptor = Acceptor::new(live.current.clone(), live.metrics.clone(), on_demand)?;
        server.add_service(edge_service(
            &server_conf,
            &live,
            Scheme::Https,
            Some(acceptor),
            addr,
        ));
    }
    if let Some(addr) = config.listeners.admin {
        let mut svc = Service::new(
            "admin".to_string(),
            HttpServer::new_app(AdminApp::with_extra(
                live.clone(),
                options.admin_extra.clone(),
            )),
        );
        svc.add_tcp(&addr.to_string());
        server.add_service(svc);
    }
    if let Some(path) = options.config_path {
        server.add_service(background_service(
            "reload",
            ReloadService::new(live.clone(), path),
        ));
    }
    if let Some(feed) = options.local_feed {
        server.add_service(background_service(
            "controller feed",
            LocalFeedService::new(live.clone(), feed, data_dir.clone()),
        ));
    }
    if let Some(fleet) = options.fleet {
        server.add_service(background_service(
            "fleet",
            FleetService::new(live.clone(), fleet, data_dir.clone(), requests),
        ));
    } else if let (Some(ask), Some(requests)) = (options.on_demand, requests) {
        server.add_service(background_service(
            "on-demand TLS",
            LocalOnDemand(std::sync::Mutex::new(Some((ask, requests)))),
        ));
    }
    server.add_service(background_service(
        "health checks",
        HealthChecker::new(live.clone()),
    ));
    server.add_service(background_service("readiness", Readiness(live)));
    server.add_service(background_service("log reopen", ReopenLogs));
    server.run(RunArgs::default());
    Ok(())
}

/// A client-facing listener: the connection layer ([`EdgeApp`]) over Pingora's HTTP
/// proxy running [`Edge`].
fn edge_service(
    conf: &Arc<ServerConf>,
    live: &Live,
    scheme: Scheme,
    tls: Option<crate::tls::Acceptor>,
    addr: std::net::SocketAddr,
) -> Service<EdgeApp> {
    let name = scheme.as_str();
    let proxy = pingora::proxy::http_proxy(
        conf,
        Edge::new(scheme, live.current.clone(), live.metrics.clone()),
    );
    let app = EdgeApp::new(name, proxy, tls, live.current.clone(), live.metrics.clone());
    let mut svc = Service::new(name.to_string(), app);
    let buffers = L4BufferSettings::new(CLIENT_READ_BUFFER, CLIENT_WRITE_BUFFER);
    svc.add_listener(ListenerConfig::tcp(addr.to_string()).l4_buffer(buffers));
    svc
}

/// Read buffer under each client connection: none. Pingora's default (64 KiB) made an
/// idle keep-alive connection cost ~110 KB (massif: 60% of the heap with 300 idle
/// connections). The HTTP/1 parser and rustls read into buffers of their own, so
/// without it each idle connection costs ~45 KB and plain HTTP got ~10% faster (one
/// copy less).
const CLIENT_READ_BUFFER: usize = 0;
/// Write buffer under each client connection (Pingora's default, one MSS).
const CLIENT_WRITE_BUFFER: usize = 1460;

/// Whole seconds, rounded up (Pingora's shutdown settings are in seconds).
fn ceil_secs(d: std::time::Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

/// SIGUSR1 reopens the access log file (after logrotate moved it), as nginx does.
struct ReopenLogs;

#[async_trait]
impl BackgroundService for ReopenLogs {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        use tokio::signal::unix::{signal, SignalKind};
        let mut usr1 = match signal(SignalKind::user_defined1()) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(
                    "cannot listen for SIGUSR1, the access log cannot be reopened: {e}"
                );
                return;
            }
        };
        loop {
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = usr1.recv() => {
                    tracing::info!("SIGUSR1: reopening the access log");
                    crate::access::request_reopen();
                }
            }
        }
    }
}

/// Ready once every client listener accepts connections and a configuration serves; not ready as soon as shutdown
/// starts, so that load balancers polling /ready stop sending traffic during the grace
/// period. (Pingora starts services concurrently: a background service running says
/// nothing about the listeners being bound yet.)
struct Readiness(Arc<Live>);

#[async_trait]
impl BackgroundService for Readiness {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let listeners = self.0.current.load().config.listeners.clone();
        let addrs: Vec<std::net::SocketAddr> = [listeners.http, listeners.https]
            .into_iter()
            .flatten()
            .collect();
        // In fleet mode version 0 means "no snapshot yet": nothing to serve.
        let mut changes = self.0.subscribe();
        let serving = async {
            while *changes.borrow_and_update() == 0 {
                if changes.changed().await.is_err() {
                    std::future::pending::<()>().await;
                }
            }
        };
        tokio::select! {
            ((), ()) = async { tokio::join!(wait_accepting(&addrs), serving) } => self.0.set_ready(true),
            _ = shutdown.changed() => return,
        }
        // An error means the sender is gone, which is also shutdown.
        let _ = shutdown.changed().await;
        self.0.set_ready(false);
    }
}

/// The address to connect to for a listener bound to `addr` (loopback for a wildcard).
fn reachable(addr: std::net::SocketAddr) -> std::net::SocketAddr {
    let ip = match addr.ip() {
        std::net::IpAddr::V4(v4) if v4.is_unspecified() => std::net::Ipv4Addr::LOCALHOST.into(),
        std::net::IpAddr::V6(v6) if v6.is_unspecified() => std::net::Ipv6Addr::LOCALHOST.into(),
        ip => ip,
    };
    std::net::SocketAddr::new(ip, addr.port())
}

/// Returns once this process listens on every address (polling every 10 ms). A
/// connection that succeeds does not say that much: another process may hold the
/// address while Pingora retries binding it, so where `/proc` tells (Linux), the
/// listening socket must be one of ours; elsewhere a successful connection counts.
async fn wait_accepting(addrs: &[std::net::SocketAddr]) {
    for &addr in addrs {
        loop {
            let ours = match listening_here(addr) {
                Some(ours) => ours,
                None => tokio::net::TcpStream::connect(reachable(addr))
                    .await
                    .is_ok(),
            };
            if ours {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    }
}

/// Whether a socket of this process listens on `addr`, from the kernel's TCP table and
/// this process's descriptors; `None` where `/proc` cannot tell.
fn listening_here(addr: std::net::SocketAddr) -> Option<bool> {
    let table = if addr.is_ipv4() { "tcp" } else { "tcp6" };
    let table = std::fs::read_to_string(format!("/proc/self/net/{table}")).ok()?;
    let ours: std::collections::HashSet<String> = std::fs::read_dir("/proc/self/fd")
        .ok()?
        .filter_map(|fd| std::fs::read_link(fd.ok()?.path()).ok())
        .filter_map(|target| {
            let target = target.to_str()?;
            Some(
                target
                    .strip_prefix("socket:[")?
                    .strip_suffix(']')?
                    .to_string(),
            )
        })
        .collect();
    Some(table.lines().skip(1).any(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        // sl local_address rem_address st tx:rx tr:when retrnsmt uid timeout inode
        fields.len() > 9
            && fields[3] == "0A"
            && parse_proc_addr(fields[1]) == Some(addr)
            && ours.contains(fields[9])
    }))
}

/// An address as `/proc/net/tcp{,6}` prints it: the IP as 32-bit words in host byte
/// order, then the port, in hex.
fn parse_proc_addr(text: &str) -> Option<std::net::SocketAddr> {
    let (ip, port) = text.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let words: Option<Vec<[u8; 4]>> = (0..ip.len() / 8)
        .map(|i| {
            let word = u32::from_str_radix(ip.get(i * 8..i * 8 + 8)?, 16).ok()?;
            Some(word.to_ne_bytes())
        })
        .collect();
    let bytes: Vec<u8> = words?.concat();
    let ip = match bytes.len() {
        4 => std::net::IpAddr::from(<[u8; 4]>::try_from(bytes).ok()?),
        16 => std::net::IpAddr::from(<[u8; 16]>::try_from(bytes).ok()?),
        _ => return None,
    };
    Some(std::net::SocketAddr::new(ip, port))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::BufRead;
    use std::net::SocketAddr;

    #[test]
    #[cfg(target_endian = "little")]
    fn addresses_parse_as_proc_net_tcp_prints_them() {
        let v4: SocketAddr = "127.0.0.1:8080".parse().unwrap();
        assert_eq!(parse_proc_addr("0100007F:1F90"), Some(v4));
        let v6: SocketAddr = "[::1]:443".parse().unwrap();
        assert_eq!(
            parse_proc_addr("00000000000000000000000001000000:01BB"),
            Some(v6)
        );
        assert_eq!(parse_proc_addr("0100007F"), None);
        assert_eq!(parse_proc_addr("01007F:1F90"), None);
    }

    /// Readiness must not take another process's listener for ours (Pingora retries a
    /// bind that failed, and /ready said ready because a connection succeeded).
    #[test]
    fn only_listening_sockets_of_this_process_count() {
        let own = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let own_addr = own.local_addr().unwrap();
        assert_eq!(listening_here(own_addr), Some(true));

        let mut other = std::process::Command::new("python3")
            .args([
                "-c",
                "import socket,time\ns=socket.socket()\ns.bind(('127.0.0.1',0))\ns.listen()\n\
                 print(s.getsockname()[1],flush=True)\ntime.sleep(60)",
            ])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("python3");
        let mut line = String::new();
        std::io::BufReader::new(other.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let theirs: SocketAddr = format!("127.0.0.1:{}", line.trim()).parse().unwrap();
        let reachable = std::net::TcpStream::connect(theirs).is_ok();
        let seen = listening_here(theirs);
        let _ = other.kill();
        let _ = other.wait();
        assert!(reachable, "the other process listens");
        assert_eq!(
            seen,
            Some(false),
            "another process's listener counted as ours"
        );

        drop(own);
        assert_eq!(listening_here(own_addr), Some(false));
    }
}
