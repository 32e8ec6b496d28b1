//! The etcd store: every key under a prefix in etcd, so that several controllers share
//! certificates, tokens, instances, the version counter and the current snapshot. The
//! atomic operations are etcd transactions (create = "create revision is 0", version =
//! compare-and-swap on the counter's mod revision).
//!
//! etcd refuses requests over `--max-request-bytes` (1.5 MiB by default): very large
//! configurations need that raised on the etcd servers.

use std::time::Duration;

use anyhow::Context;
use async_trait::async_trait;
use etcd_client::{Client, Compare, CompareOp, ConnectOptions, GetOptions, Txn, TxnOp};
use tokio::sync::watch;

use super::Store;
use crate::leader::Fence;

/// The leader's key under the prefix (see [`crate::leader`]).
pub const LEADER_KEY: &str = "leader";

/// Every call to etcd is bounded by this.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// A store in etcd under a key prefix.
#[derive(Clone)]
pub struct EtcdStore {
    client: Client,
    prefix: String,
    /// The term this controller leads in, if it does (set by the campaign).
    fence: Fence,
}

impl std::fmt::Debug for EtcdStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdStore")
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

impl EtcdStore {
    /// Connects to `endpoints`; keys live under `prefix`.
    ///
    /// # Errors
    /// When no endpoint answers.
    pub async fn connect(endpoints: &[String], prefix: &str) -> anyhow::Result<Self> {
        let options = ConnectOptions::new()
            .with_connect_timeout(CALL_TIMEOUT)
            .with_timeout(CALL_TIMEOUT)
            .with_keep_alive(Duration::from_secs(5), Duration::from_secs(5));
        let client = Client::connect(endpoints, Some(options))
            .await
            .with_context(|| format!("connecting to etcd at {}", endpoints.join(", ")))?;
        Ok(Self {
            client,
            prefix: prefix.trim_end_matches('/').to_string(),
            fence: Fence::default(),
        })
    }

    /// The full etcd key of `key`.
    #[must_use]
    pub fn key(&self, key: &str) -> String {
        format!("{}/{key}", self.prefix)
    }

    /// The value of `key`, kept current as other controllers change it (etcd watch,
    /// re-established after errors).
    ///
    /// # Errors
    /// When the first read fails.
    pub async fn subscribe(&self, key: &str) -> anyhow::Result<watch::Receiver<Option<Vec<u8>>>> {
        let full = self.key(key);
        let (tx, rx) = watch::channel(self.get(key).await?);
        let client = self.client.clone();
        tokio::spawn(async move {
            // Re-established after errors; ends when every receiver is gone.
            while !tx.is_closed() {
                let mut c = client.clone();
                match c.watch(full.clone(), None).await {
                    Ok(mut stream) => {
                        // Catch up on what changed while not watching.
                        if let Ok(r) = c.get(full.clone(), None).await {
                            tx.send_replace(r.kvs().first().map(|kv| kv.value().to_vec()));
                        }
                        while let Ok(Some(msg)) = stream.message().await {
                            for ev in msg.events() {
                                let value = match ev.event_type() {
                                    etcd_client::EventType::Put => {
                                        ev.kv().map(|kv| kv.value().to_vec())
                                    }
                                    etcd_client::EventType::Delete => None,
                                };
                                tx.send_replace(value);
                            }
                        }
                    }
                    Err(e) => tracing::warn!("etcd watch {full}: {e}"),
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        });
        Ok(rx)
    }

    /// The term this controller leads in: the campaign sets it, `put_leading` checks it.
    #[must_use]
    pub fn fence(&self) -> Fence {
        self.fence.clone()
    }

    /// A client sharing this store's connection (for leases and elections).
    #[must_use]
    pub fn client(&self) -> Client {
        self.client.clone()
    }
}

#[async_trait]
impl Store for EtcdStore {
    async fn get(&self, key: &str) -> anyhow::Result<Option<Vec<u8>>> {
        let resp = self
            .client
            .clone()
            .get(self.key(key), None)
            .await
            .with_context(|| format!("etcd get {key}"))?;
        Ok(resp.kvs().first().map(|kv| kv.value().to_vec()))
    }

    async fn put(&self, key: &str, value: &[u8]) -> anyhow::Result<()> {
        self.client
            .clone()
            .put(self.key(key), value, None)
            .await
            .with_context(|| format!("etcd put {key}"))?;
        Ok(())
    }

    async fn put_leading(&self, key: &str, value: &[u8]) -> anyhow::Result<()> {
        let Some(term) = self.fence.revision() else {
            anyhow::bail!(
                "not written: {key} is written by the leader, and this controller does not lead"
            );
        };
        // Applied only if the leader key is still the one this controller created.
        let leader = self.key(LEADER_KEY);
        let txn = Txn::new()
            .when([Compare::create_revision(leader, CompareOp::Equal, term)])
            .and_then([TxnOp::put(self.key(key), value, None)]);
        let resp = self
            .client
            .clone()
            .txn(txn)
            .await
            .with_context(|| format!("etcd put {key}"))?;
        if !resp.succeeded() {
            // Stop at once; the campaign sees the key go and steps down too.
            self.fence.release(term);
            anyhow::bail!(
                "not written: {key} is written by the leader, and this controller's term \
                 ({term}) has ended (another controller leads now)"
            );
        }
        Ok(())
    }

    async fn create(&self, key: &str, value: &[u8]) -> anyhow::Result<bool> {
        let k = self.key(key);
        let txn = Txn::new()
            .when([Compare::create_revision(k.clone(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(k, value, None)]);
        let resp = self
            .client
            .clone()
            .txn(txn)
            .await
            .with_context(|| format!("etcd create {key}"))?;
        Ok(resp.succeeded())
    }

    async fn delete(&self, key: &str) -> anyhow::Result<bool> {
        let resp = self
            .client
            .clone()
            .delete(self.key(key), None)
            .await
            .with_context(|| format!("etcd delete {key}"))?;
        Ok(resp.deleted() == 1)
    }

    async fn list(&self, prefix: &str) -> anyhow::Result<Vec<(String, Vec<u8>)>> {
        let full = self.key(&format!("{prefix}/"));
        let resp = self
            .client
            .clone()
            .get(full.clone(), Some(GetOptions::new().with_prefix()))
            .await
            .with_context(|| format!("etcd list {prefix}"))?;
        let strip = format!("{}/", self.prefix);
        Ok(resp
            .kvs()
            .iter()
            .filter_map(|kv| {
                let k = kv.key_str().ok()?.strip_prefix(&strip)?.to_string();
                Some((k, kv.value().to_vec()))
            })
            .collect())
    }

    async fn next_version(&self) -> anyhow::Result<u64> {
        let k = self.key("version");
        for _ in 0..100 {
            let resp = self.client.clone().get(k.clone(), None).await?;
            let (current, compare) = match resp.kvs().first() {
                Some(kv) => (
                    std::str::from_utf8(kv.value())
                        .ok()
                        .and_then(|s| s.parse::<u64>().ok())
                        .with_context(|| format!("etcd key {k} is corrupt"))?,
                    Compare::mod_revision(k.clone(), CompareOp::Equal, kv.mod_revision()),
                ),
                None => (0, Compare::create_revision(k.clone(), CompareOp::Equal, 0)),
            };
            let next = current + 1;
            let txn = Txn::new().when([compare]).and_then([TxnOp::put(
                k.clone(),
                next.to_string(),
                None,
            )]);
            if self.client.clone().txn(txn).await?.succeeded() {
                return Ok(next);
            }
        }
        anyhow::bail!("etcd key {k}: too much contention allocating a version")
    }
}
