//! Endpoint discovery: providers watch some source (files here; Docker, Swarm and DNS
//! SRV later, behind the same trait) and publish the endpoints they see by pool. The
//! compiler merges every provider's latest [`Found`] into the next snapshot.
//!
//! A provider never fails as a whole: a bad source is reported in [`Found::errors`] and
//! the provider keeps publishing the last good endpoints from it.

pub mod docker;
pub mod file;
pub mod labels;

use std::collections::BTreeMap;

use async_trait::async_trait;
use rampart_config::Endpoint;
use tokio::sync::watch;

/// What a provider currently sees.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Found {
    /// Endpoints by pool name.
    pub pools: BTreeMap<String, Vec<Endpoint>>,
    /// Routes the provider defines (container labels), forwarding to its pools.
    pub routes: Vec<rampart_config::Route>,
    /// Problems of the last read, each naming its source and the fix.
    pub errors: Vec<String>,
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
