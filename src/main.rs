//! The `rampart` command: parses the command line and hands over to the crates.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use rampart_config::{Config, LoadError};

/// mimalloc: the proxy allocates many short-lived buffers per request; glibc malloc
/// showed up at ~7% of proxy CPU in profiles, mimalloc's thread-local pages avoid most of it.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The quickstart configuration `rampart up` runs when given no file.
const QUICKSTART: &str = include_str!("../examples/quickstart.toml");

/// Rampart: an edge load balancer with automatic TLS, routing and DNS.
#[derive(Debug, Parser)]
#[command(name = "rampart", version, about)]
struct Cli {
    /// Log format on stderr: plain text (coloured only on a terminal) or JSON, one
    /// object per line, for log shippers.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Plain, env = "RAMPART_LOG_FORMAT")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

/// How logs are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    /// Human-readable lines; ANSI colours only when stderr is a terminal.
    Plain,
    /// One JSON object per line.
    Json,
}

/// Set when logs are JSON: the banner lines for people then go through the log too.
static LOG_JSON: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// A line for the person who started Rampart (where to point a client, which CA to
/// trust): on stderr as it is, or as a log event when logs are JSON.
macro_rules! tell {
    ($($arg:tt)*) => {
        if LOG_JSON.load(std::sync::atomic::Ordering::Relaxed) {
            tracing::info!("{}", format!($($arg)*));
        } else {
            eprintln!($($arg)*);
        }
    };
}

/// Logs to stderr in `format`, filtered by RUST_LOG (default: info, Pingora's own
/// chatter at warn).
fn init_logging(format: LogFormat) {
    use std::io::IsTerminal as _;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| "info,pingora_core=warn,pingora_proxy=warn".into());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Plain => builder.with_ansi(std::io::stderr().is_terminal()).init(),
        LogFormat::Json => {
            LOG_JSON.store(true, std::sync::atomic::Ordering::Relaxed);
            builder.json().with_current_span(false).init();
        }
    }
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Validate a configuration file; print every error as FILE:LINE:COL: path: message.
    Check {
        /// The configuration file.
        file: PathBuf,
    },
    /// Print the JSON schema of the configuration file.
    Schema,
    /// Print the version, git commit, compiler and target of this binary.
    Version,
    /// Read a password from standard input (its first line) and print its bcrypt hash,
    /// for a route's basic_auth users.
    HashPassword {
        /// bcrypt cost (4-31): each step doubles the work of a check.
        #[arg(long, default_value_t = 12)]
        cost: u32,
    },
    /// Exit 0 when an admin endpoint answers 200 (a container HEALTHCHECK with no
    /// shell or curl in the image), 1 otherwise, saying why.
    Healthcheck {
        /// The admin address, e.g. 127.0.0.1:9900 (proxy) or 127.0.0.1:9901 (controller).
        #[arg(default_value = "127.0.0.1:9900")]
        addr: SocketAddr,
        /// The path to ask: /healthz (the process answers) or /ready (the proxy serves).
        #[arg(long, default_value = "/healthz")]
        path: String,
    },
    /// Run a proxy: standalone from a configuration file (reloaded on SIGHUP and on
    /// change), or in a fleet with --controller (snapshots pushed by the controller).
    Proxy {
        /// The configuration file (standalone), or this proxy's local settings
        /// ([server], [listeners]) in fleet mode.
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Take the listening sockets over from the running instance (graceful upgrade):
        /// start the new binary with --upgrade, then send SIGQUIT to the old one.
        #[arg(long, short)]
        upgrade: bool,
        #[command(flatten)]
        fleet: Box<FleetArgs>,
    },
    /// Run the controller, or manage it (tokens, instances, status).
    Controller {
        /// The controller's configuration file.
        #[arg(long, short, global = true)]
        config: Option<PathBuf>,
        #[command(subcommand)]
        action: Option<ControllerAction>,
    },
    /// DNS automation: preview what the controller would change.
    Dns {
        #[command(subcommand)]
        action: DnsAction,
    },
    /// Quickstart: HTTPS on :8443 for localhost with an internal-CA certificate, HTTP on
    /// :8080 redirecting to it, admin on 127.0.0.1:9900.
    Up {
        /// Use this configuration file instead of the built-in quickstart.
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Data directory (internal CA, state).
        #[arg(long, default_value = "./rampart-data")]
        data_dir: PathBuf,
        /// Take the listening sockets over from the running instance (graceful upgrade).
        #[arg(long, short)]
        upgrade: bool,
    },
}

/// Fleet-mode options of `rampart proxy`.
#[derive(Debug, clap::Args)]
struct FleetArgs {
    /// The controller's fleet API (https://HOST:PORT); enables fleet mode.
    #[arg(long)]
    controller: Option<String>,
    /// One-time join token from `rampart controller token create` (first start only).
    #[arg(long, env = "RAMPART_JOIN_TOKEN", hide_env_values = true)]
    join_token: Option<String>,
    /// Read the join token from this file instead (a volume the controller writes with
    /// controller.join_token_file); waits for it to appear.
    #[arg(long, env = "RAMPART_JOIN_TOKEN_FILE", conflicts_with = "join_token")]
    join_token_file: Option<PathBuf>,
    /// Data directory: identity, cached snapshot, upgrade socket.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// HTTP listener address (fleet mode; overrides the file).
    #[arg(long)]
    http: Option<SocketAddr>,
    /// HTTPS listener address (fleet mode; overrides the file).
    #[arg(long)]
    https: Option<SocketAddr>,
    /// Admin listener address (fleet mode; overrides the file).
    #[arg(long)]
    admin: Option<SocketAddr>,
    /// Public address of this proxy, announced to the controller for DNS (repeatable).
    #[arg(long = "public-addr")]
    public_addrs: Vec<IpAddr>,
    /// Heartbeat interval.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    heartbeat: Duration,
}

/// `rampart controller ...` subcommands.
#[derive(Debug, Subcommand)]
enum ControllerAction {
    /// Join tokens for new proxies.
    Token {
        #[command(subcommand)]
        action: TokenAction,
    },
    /// Enrolled proxy instances.
    Instance {
        #[command(subcommand)]
        action: InstanceAction,
    },
    /// List proxy instances with address, version and last heartbeat (from the admin API).
    Status,
}

/// `rampart dns ...`.
#[derive(Debug, Subcommand)]
enum DnsAction {
    /// Print the changes the running controller would make for this file's [dns]
    /// names (creates, updates, deletes, names skipped because Rampart does not own
    /// them), without applying them.
    Plan {
        /// The controller's configuration file.
        #[arg(long, short)]
        config: PathBuf,
        /// The controller's admin address (default: controller.admin from the file).
        #[arg(long)]
        admin: Option<SocketAddr>,
    },
}

/// `rampart controller token ...`.
#[derive(Debug, Subcommand)]
enum TokenAction {
    /// Print a new one-time join token.
    Create {
        /// How long the token stays valid.
        #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
        ttl: Duration,
        /// Usable by any number of proxies until it expires (for a scaled service whose
        /// replicas share one environment), instead of once.
        #[arg(long)]
        reusable: bool,
    },
}

/// `rampart controller instance ...`.
#[derive(Debug, Subcommand)]
enum InstanceAction {
    /// Refuse an instance's certificate from now on.
    Revoke {
        /// Instance id, as listed by `rampart controller status`.
        id: String,
    },
}

fn main() -> ExitCode {
    rampart_config::build::set(rampart_config::build::BuildInfo {
        version: env!("CARGO_PKG_VERSION"),
        git: env!("RAMPART_GIT"),
        rustc: env!("RAMPART_RUSTC"),
        target: env!("RAMPART_TARGET"),
        profile: env!("RAMPART_PROFILE"),
    });
    rampart_proxy::install_crypto_provider();
    let cli = Cli::parse();
    init_logging(cli.log_format);
    match run(cli.command) {
        Ok(code) => code,
        Err(e) => {
            if LOG_JSON.load(std::sync::atomic::Ordering::Relaxed) {
                tracing::error!("{e:#}");
            } else {
                eprintln!("error: {e:#}");
            }
            ExitCode::FAILURE
        }
    }
}

fn run(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Check { file } => Ok(check(&file)),
        Command::Healthcheck { addr, path } => Ok(healthcheck(addr, &path)),
        Command::Version => {
            println!("{}", rampart_config::build::get());
            Ok(ExitCode::SUCCESS)
        }
        Command::HashPassword { cost } => {
            let mut line = String::new();
            std::io::stdin()
                .read_line(&mut line)
                .context("reading the password from standard input")?;
            let password = line.trim_end_matches(['\r', '\n']);
            anyhow::ensure!(
                !password.is_empty(),
                "no password on standard input: echo it in, e.g. `printf %s 'pass' | rampart hash-password`"
            );
            println!("{}", rampart_proxy::auth::hash_password(password, cost)?);
            Ok(ExitCode::SUCCESS)
        }
        Command::Schema => {
            println!(
                "{}",
                serde_json::to_string_pretty(&rampart_config::json_schema())?
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Proxy {
            config,
            upgrade,
            fleet,
        } => match (&fleet.controller, config) {
            (Some(_), config) => serve_fleet(config.as_deref(), *fleet, upgrade),
            (None, Some(config)) => {
                let cfg = load_or_report(&config)?;
                serve(cfg, Some(config), upgrade)
            }
            (None, None) => anyhow::bail!(
                "give --config FILE for a standalone proxy, or --controller URL to join a fleet"
            ),
        },
        Command::Controller { config, action } => {
            let path = config.context(
                "--config FILE is required: the controller's configuration (see examples/controller.toml)",
            )?;
            let cfg = load_or_report(&path)?;
            controller(cfg, path, action)
        }
        Command::Dns {
            action: DnsAction::Plan { config, admin },
        } => {
            let cfg = load_or_report(&config)?;
            let dns = cfg.dns.clone().with_context(|| {
                format!("{} has no [dns] section: nothing to plan", config.display())
            })?;
            let admin = admin.or(rampart_controller::settings(&cfg).admin).context(
                "controller.admin is disabled; pass --admin ADDR of the running controller",
            )?;
            let status = runtime()?.block_on(rampart_controller::fetch_dns_plan(admin, &dns))?;
            print!("{}", rampart_controller::render_dns_plan(&status));
            Ok(ExitCode::SUCCESS)
        }
        Command::Up {
            config,
            data_dir,
            upgrade,
        } => {
            let cfg = match &config {
                Some(path) => load_or_report(path)?,
                None => {
                    let mut cfg = rampart_config::parse(QUICKSTART, "<quickstart>")
                        .context("the built-in quickstart configuration")?;
                    cfg.server.data_dir = data_dir;
                    cfg
                }
            };
            serve_up(cfg, config, upgrade)
        }
    }
}

fn check(file: &std::path::Path) -> ExitCode {
    match rampart_config::load(file) {
        Ok(_) => {
            println!("{}: ok", file.display());
            ExitCode::SUCCESS
        }
        Err(e) => {
            println!("{e}");
            ExitCode::FAILURE
        }
    }
}

fn load_or_report(path: &std::path::Path) -> anyhow::Result<Config> {
    rampart_config::load(path).map_err(|e| match e {
        LoadError::Invalid { .. } => anyhow::anyhow!("invalid configuration:\n{e}"),
        LoadError::Read { .. } => anyhow::Error::new(e),
    })
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

fn controller(
    config: Config,
    path: PathBuf,
    action: Option<ControllerAction>,
) -> anyhow::Result<ExitCode> {
    let rt = runtime()?;
    match action {
        None => rt.block_on(async {
            let mut handle = rampart_controller::start(config, Some(path)).await?;
            if let Some(admin) = handle.admin_addr {
                tell!("Controller admin API: http://{admin}/status  http://{admin}/metrics");
            }
            tell!("Fleet API: https://{}", handle.fleet_addr);
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
                () = handle.wait() => anyhow::bail!("a controller task stopped unexpectedly"),
            }
            handle.shutdown().await;
            Ok(ExitCode::SUCCESS)
        }),
        Some(ControllerAction::Token {
            action: TokenAction::Create { ttl, reusable },
        }) => {
            let token = rt.block_on(rampart_controller::create_token(&config, ttl, reusable))?;
            println!("{token}");
            Ok(ExitCode::SUCCESS)
        }
        Some(ControllerAction::Instance {
            action: InstanceAction::Revoke { id },
        }) => {
            rt.block_on(rampart_controller::revoke(&config, &id))?;
            eprintln!("instance {id} is revoked; its requests are refused from now on");
            Ok(ExitCode::SUCCESS)
        }
        Some(ControllerAction::Status) => {
            let admin = rampart_controller::settings(&config)
                .admin
                .context("controller.admin is disabled; status is read from the admin API")?;
            let status = rt.block_on(rampart_controller::fetch_status(admin))?;
            print!("{}", rampart_controller::render_status(&status));
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn serve_fleet(config: Option<&Path>, args: FleetArgs, upgrade: bool) -> anyhow::Result<ExitCode> {
    let controller = args
        .controller
        .context("--controller is required in fleet mode")?;
    rampart_proxy::fleet::client::check_url(&controller)?;
    let mut local = match config {
        Some(path) => {
            let cfg = load_or_report(path)?;
            if !cfg.routes.is_empty() || !cfg.pools.is_empty() {
                tracing::warn!(
                    "{}: routes and pools are ignored in fleet mode; the controller sends them",
                    path.display()
                );
            }
            cfg
        }
        None => {
            let mut cfg = Config::default();
            cfg.listeners.http = Some(SocketAddr::from(([0, 0, 0, 0], 80)));
            cfg.listeners.https = Some(SocketAddr::from(([0, 0, 0, 0], 443)));
            cfg
        }
    };
    if let Some(dir) = args.data_dir {
        local.server.data_dir = dir;
    }
    // Each flag overrides its own listener; the others keep the file's.
    if args.http.is_some() {
        local.listeners.http = args.http;
    }
    if args.https.is_some() {
        local.listeners.https = args.https;
    }
    if args.admin.is_some() {
        local.listeners.admin = args.admin;
    }
    serve_snapshots(
        local,
        upgrade,
        Some(rampart_proxy::fleet::FleetOptions {
            controller,
            join_token: args.join_token,
            join_token_file: args.join_token_file,
            heartbeat_every: args.heartbeat,
            public_addrs: args.public_addrs,
        }),
        None,
        None,
        None,
    )?;
    Ok(ExitCode::SUCCESS)
}

/// Runs a proxy whose configuration comes as snapshots (from a controller over the
/// network, or in process): it starts from its cached snapshot, if any.
fn serve_snapshots(
    local: Config,
    upgrade: bool,
    fleet: Option<rampart_proxy::fleet::FleetOptions>,
    local_feed: Option<rampart_proxy::fleet::LocalFeed>,
    admin_extra: Option<rampart_proxy::admin::AdminExtra>,
    on_demand: Option<rampart_proxy::AskController>,
) -> anyhow::Result<()> {
    let cached = rampart_proxy::fleet::load_cached(&local.server.data_dir);
    let live = rampart_proxy::live::Live::start_fleet(local, cached)?;
    rampart_proxy::run(
        live,
        rampart_proxy::ProxyOptions {
            config_path: None,
            upgrade,
            fleet,
            local_feed,
            admin_extra,
            on_demand,
        },
    )
}

/// `rampart up`: the controller and a proxy in one process. Snapshots go from one to
/// the other through a channel; the fleet API listens only if `[controller]` asks for
/// it (so that more proxies can join), on an ephemeral loopback port otherwise.
fn serve_up(config: Config, path: Option<PathBuf>, upgrade: bool) -> anyhow::Result<ExitCode> {
    let rt = runtime()?;
    let mut controller_config = config.clone();
    if controller_config.controller.is_none() {
        let mut settings = rampart_controller::settings(&controller_config);
        settings.listen = SocketAddr::from(([127, 0, 0, 1], 0));
        settings.admin = None;
        controller_config.controller = Some(settings);
    }
    let handle = rt.block_on(rampart_controller::start(controller_config, path))?;
    let mut published = handle.state.fleet.published.subscribe();
    let (feed_tx, feed) = tokio::sync::watch::channel((0, Default::default()));
    rt.spawn(async move {
        loop {
            let p = published.borrow_and_update().clone();
            feed_tx.send_replace((p.version, p.body));
            if published.changed().await.is_err() {
                return;
            }
        }
    });
    // DNS and ACME HTTP-01 need to know that this proxy is up.
    rt.spawn(local_heartbeats(
        handle.state.clone(),
        config.listeners.clone(),
    ));
    announce(
        &config.listeners,
        Some(&config.server.data_dir.join("ca").join("ca.pem")),
    );
    if let Some(dns) = handle.dns_addr {
        tell!("DNS: an embedded server answers on {dns} (udp and tcp)");
    }
    // The controller's dashboard beside the proxy's, on the same admin listener.
    let state = handle.state.clone();
    let controller_pages = rampart_proxy::admin::AdminExtra(std::sync::Arc::new(
        move |path: &str, query: Option<&str>| {
            let page = match path {
                "/controller" if query == Some("body") => rampart_controller::admin::Page::Body,
                "/controller" => rampart_controller::admin::Page::HtmlBesideProxy,
                "/controller/api/v1/dashboard" => rampart_controller::admin::Page::Json,
                _ => return None,
            };
            let (ctype, body) = rampart_controller::admin::render_dashboard(&state, page);
            Some((ctype, body.into_bytes()))
        },
    ));
    if let Some(admin) = config.listeners.admin {
        tell!("Controller dashboard (DNS, ACME, fleet): http://{admin}/controller");
    }
    // On-demand TLS: the proxy's handshakes ask the controller beside it.
    let on_demand = handle.state.on_demand.clone();
    let ask = rampart_proxy::AskController(std::sync::Arc::new(move |name: String| {
        let on_demand = on_demand.clone();
        Box::pin(async move { on_demand.request(&name).await })
    }));
    serve_snapshots(
        config,
        upgrade,
        None,
        Some(feed),
        Some(controller_pages),
        Some(ask),
    )?;
    rt.block_on(handle.shutdown());
    Ok(ExitCode::SUCCESS)
}

/// `rampart up`: the proxy runs in this process, so its heartbeats go straight into the
/// controller's registry (for DNS and ACME); the DNS probe still checks its real HTTPS
/// listener.
async fn local_heartbeats(
    state: std::sync::Arc<rampart_controller::State>,
    listeners: rampart_config::Listeners,
) {
    let addr = listeners
        .https
        .map(|a| a.ip())
        .filter(|ip| !ip.is_unspecified())
        .unwrap_or(IpAddr::from([127, 0, 0, 1]));
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    loop {
        tick.tick().await;
        let version = state.fleet.version();
        state.fleet.registry.heartbeat(
            "local",
            "in-process".into(),
            &rampart_config::snapshot::Heartbeat {
                public_addrs: vec![addr],
                ready: version > 0,
                version,
                https_port: listeners.https.map(|a| a.port()),
                traffic: None,
            },
        );
    }
}

/// Tells the user where to point a client (and which CA to trust, for the internal one).
fn announce(listeners: &rampart_config::Listeners, ca: Option<&Path>) {
    if let Some(https) = listeners.https {
        let port = https.port();
        match ca {
            Some(ca) => tell!(
                "Rampart is serving HTTPS on {https}; the internal CA certificate is {}\n  try: curl --cacert {} https://localhost:{port}/",
                ca.display(),
                ca.display()
            ),
            None => tell!("Rampart is serving HTTPS on {https}"),
        }
    }
    if let Some(admin) = listeners.admin {
        tell!("Dashboard: http://{admin}/   (JSON: http://{admin}/api/v1/dashboard)");
        tell!("Admin API: http://{admin}/status  http://{admin}/metrics");
    }
}

fn serve(config: Config, path: Option<PathBuf>, upgrade: bool) -> anyhow::Result<ExitCode> {
    if config.dns.is_some() {
        anyhow::bail!(
            "[dns] runs in the controller, which a standalone proxy does not start: use `rampart up --config FILE` (controller and proxy in one process) or `rampart controller`"
        );
    }
    if config.tls_on_demand.is_some() {
        anyhow::bail!(
            "[tls_on_demand] needs the controller, which orders the certificates: use `rampart up --config FILE` (controller and proxy in one process) or `rampart controller` with fleet proxies"
        );
    }
    let listeners = config.listeners.clone();
    let live = rampart_proxy::prepare(config)?;
    announce(&listeners, live.internal_ca_cert().as_deref());
    rampart_proxy::run(
        live,
        rampart_proxy::ProxyOptions {
            config_path: path,
            upgrade,
            fleet: None,
            local_feed: None,
            admin_extra: None,
            on_demand: None,
        },
    )?;
    Ok(ExitCode::SUCCESS)
}

/// `GET path` on `addr` with a short deadline; success on a 200.
fn healthcheck(addr: SocketAddr, path: &str) -> ExitCode {
    use std::io::{Read as _, Write as _};
    let timeout = Duration::from_secs(2);
    let result = (|| -> std::io::Result<String> {
        let mut conn = std::net::TcpStream::connect_timeout(&addr, timeout)?;
        conn.set_read_timeout(Some(timeout))?;
        conn.set_write_timeout(Some(timeout))?;
        write!(
            conn,
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
        )?;
        // The status line is all that matters: read until it is complete.
        let mut head = Vec::new();
        let mut buf = [0u8; 512];
        while !head.windows(2).any(|w| w == b"\r\n") && head.len() < 4096 {
            match conn.read(&mut buf)? {
                0 => break,
                n => head.extend_from_slice(&buf[..n]),
            }
        }
        let head = String::from_utf8_lossy(&head);
        Ok(head.lines().next().unwrap_or_default().to_string())
    })();
    match result {
        Ok(status) if status.split_whitespace().nth(1) == Some("200") => ExitCode::SUCCESS,
        Ok(status) => {
            eprintln!("http://{addr}{path} answered {status:?}");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("http://{addr}{path}: {e}");
            ExitCode::FAILURE
        }
    }
}
