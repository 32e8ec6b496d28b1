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
//! - [`on_demand`]: on-demand TLS, names approved by the application's ask endpoint
//! - [`leader`]: leader election over etcd (several controllers)
//! - [`admin`]: /metrics, /status, /healthz
//! - [`supervisor`]: starts and stops the named tasks; [`publish`]: the compile loop;
//!   [`config_watch`]: configuration reloads; [`bootstrap`]: store, CAs, tokens;
//!   [`admin_client`]: the CLI's view of a running controller

pub mod acme;
pub mod admin;
pub mod admin_client;
pub mod authority;
pub mod bootstrap;
pub mod compile;
pub mod config_watch;
pub mod dashboard;
pub mod discovery;
pub mod dns;
pub mod fleet;
pub mod leader;
pub mod metrics;
pub mod on_demand;
pub mod publish;
pub mod store;
pub mod supervisor;
mod tickets;

pub use admin_client::{fetch_dns_plan, fetch_status, render_dns_plan, render_status};
pub use bootstrap::{create_token, open_store, revoke, settings};
pub use supervisor::{start, Handle, State};
