//! Rampart's data plane: a Pingora-based TLS-terminating reverse proxy that routes by
//! host, path and headers, balances across pools with health checks, and swaps its
//! whole configuration atomically without dropping requests.
//!
//! Flow of a change: config → [`generation::Builder::build`] → swap in [`live::Live`].
//! Flow of a request: [`listener`] (connection limit, TLS, header deadline) → a
//! transport: [`fast`] (the HTTP/1 and HTTP/2 fast paths, for the common request) or [`edge`]
//! (Pingora's `ProxyHttp` phases, for everything) → [`policy::decide`] (one decision
//! for every transport: [`limits`], [`routing`], [`headers`]; an [`policy::Answer`] or a
//! forward plan) → the upstream attempt ([`balance`], [`health`]) → [`access::finish`]
//! (metrics, recent errors, the access log: once, for every transport).

pub mod access;
pub mod admin;
pub mod auth;
pub mod balance;
pub mod clock;
pub mod compress;
pub mod dashboard;
pub mod edge;
pub mod fast;
pub mod fleet;
pub mod forward_auth;
pub mod generation;
pub mod headers;
pub mod health;
pub mod limits;
pub mod listener;
pub mod live;
pub mod metrics;
pub mod mirror;
pub mod peer;
pub mod policy;
pub mod proxy_protocol;
pub mod reload;
pub mod rolling;
pub mod routing;
pub mod server;
pub mod tls;

pub use server::{prepare, run, AskController, ProxyOptions};

/// Installs the one rustls crypto provider of the process (aws-lc-rs). Call it first
/// thing in `main` and in tests: with two providers compiled in, rustls cannot choose.
pub fn install_crypto_provider() {
    // Err means a provider is already installed, which is what we want.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}
