//! The `rampart` command: parses the command line and hands over to the crates.

use std::path::PathBuf;
use std::process::ExitCode;

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
    #[command(subcommand)]
    command: Command,
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
    /// Run a standalone proxy from a configuration file (reloaded on SIGHUP and on change).
    Proxy {
        /// The configuration file.
        #[arg(long, short)]
        config: PathBuf,
        /// Take the listening sockets over from the running instance (graceful upgrade):
        /// start the new binary with --upgrade, then send SIGQUIT to the old one.
        #[arg(long, short)]
        upgrade: bool,
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

fn main() -> ExitCode {
    rampart_proxy::install_crypto_provider();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,pingora_core=warn,pingora_proxy=warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match run(cli.command) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Check { file } => Ok(check(&file)),
        Command::Schema => {
            println!(
                "{}",
                serde_json::to_string_pretty(&rampart_config::json_schema())?
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Proxy { config, upgrade } => {
            let cfg = load_or_report(&config)?;
            serve(cfg, Some(config), upgrade)
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
            serve(cfg, config, upgrade)
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

fn serve(config: Config, path: Option<PathBuf>, upgrade: bool) -> anyhow::Result<ExitCode> {
    let listeners = config.listeners.clone();
    let live = rampart_proxy::prepare(config)?;
    if let Some(https) = listeners.https {
        let port = https.port();
        match live.internal_ca_cert() {
            Some(ca) => eprintln!("Rampart is serving HTTPS on {https}; the internal CA certificate is {}\n  try: curl --cacert {} https://localhost:{port}/", ca.display(), ca.display()),
            None => eprintln!("Rampart is serving HTTPS on {https}"),
        }
    }
    if let Some(admin) = listeners.admin {
        eprintln!("Admin API: http://{admin}/status  http://{admin}/metrics");
    }
    rampart_proxy::run(
        live,
        rampart_proxy::ProxyOptions {
            config_path: path,
            upgrade,
        },
    )?;
    Ok(ExitCode::SUCCESS)
}
