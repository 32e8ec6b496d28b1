//! Endpoint discovery: providers watch some source (files, a Docker engine, DNS SRV
//! records; all behind one trait, as a Kubernetes one would be) and publish the endpoints they see by pool. The
//! compiler merges every provider's latest [`Found`] into the next snapshot.
//!
//! A provider never fails as a whole: a bad source is reported in [`Found::errors`] and
//! the provider keeps publishing the last good endpoints from it.

pub mod docker;
pub mod file;
pub mod labels;
pub mod srv;

use std::collections::BTreeMap;

use async_trait::async_trait;
use rampart_config::Endpoint;
use tokio::sync::watch;

/// What a provider currently sees.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Found {
    /// Endpoints by pool name.
    pub pools: BTreeMap<String, Vec<Endpoint>>,
    /// How the endpoints of a pool are reached, where labels say so (for pools the
    /// configuration file does not define).
    pub pool_settings: BTreeMap<String, rampart_config::PoolSettings>,
    /// Routes the provider defines (container labels), forwarding to its pools.
    pub routes: Vec<rampart_config::Route>,
    /// Problems of the last read, each naming its source and the fix.
    pub errors: Vec<String>,
    /// Proxy instances running as containers (`rampart.role=proxy`), for DNS.
    pub proxies: Vec<ProxyContainer>,
}

/// A proxy instance the cluster runs (a container labelled `rampart.role=proxy`). The
/// controller matches it to an enrolled instance by host name: its addresses stand in
/// when the instance announces none, and an instance whose container is gone leaves
/// DNS at once, without waiting for its heartbeat to go stale.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProxyContainer {
    /// Container name.
    pub name: String,
    /// Container id (a container's default host name is its first 12 characters).
    pub id: String,
    /// Addresses on the watched network.
    pub addrs: Vec<std::net::IpAddr>,
}

impl ProxyContainer {
    /// Whether an instance that enrolled as `hostname` runs in this container.
    #[must_use]
    pub fn is_host(&self, hostname: &str) -> bool {
        !hostname.is_empty()
            && (self.name == hostname || (hostname.len() >= 12 && self.id.starts_with(hostname)))
    }
}

impl Found {
    /// How many endpoints in all.
    #[must_use]
    pub fn endpoint_count(&self) -> usize {
        self.pools.values().map(Vec::len).sum()
    }
}

/// A source of endpoints.
#[async_trait]
pub trait Provider: Send + Sync {
    /// Name shown in `/status` and metrics, e.g. `file:endpoints.d`.
    fn name(&self) -> String;
    /// Publishes what it sees into `out` until `shutdown` turns true.
    async fn run(&self, out: watch::Sender<Found>, shutdown: watch::Receiver<bool>);
}
