//! Where the controller keeps what must survive it: the fleet CA, the internal serving
//! CA, join tokens, enrolled instances, the snapshot version counter and the current
//! snapshot. A small key-value interface so that the local directory ([`local`]) and a
//! shared store for several controllers implement the same operations, including the
//! two that must be atomic: create-if-absent and delete-once.

pub mod etcd;
pub mod local;

use async_trait::async_trait;

/// A key-value store of small values. Keys are `/`-separated paths such as
/// `tokens/abc`.
#[async_trait]
pub trait Store: Send + Sync + std::fmt::Debug {
    /// The value at `key`, if any.
    async fn get(&self, key: &str) -> anyhow::Result<Option<Vec<u8>>>;
    /// Sets `key` to `value`.
    async fn put(&self, key: &str, value: &[u8]) -> anyhow::Result<()>;
    /// Sets `key` only while this controller leads: with several controllers, a write
    /// from one whose term has ended (even if it does not know yet) is refused and
    /// nothing is written (see [`crate::leader::Fence`]). With one controller, `put`.
    async fn put_leading(&self, key: &str, value: &[u8]) -> anyhow::Result<()>;
    /// Sets `key` only if it does not exist; `false` when it did (nothing written).
    async fn create(&self, key: &str, value: &[u8]) -> anyhow::Result<bool>;
    /// Deletes `key`; `true` only for the one caller that actually removed it.
    async fn delete(&self, key: &str) -> anyhow::Result<bool>;
    /// Every key and value under `prefix/`.
    async fn list(&self, prefix: &str) -> anyhow::Result<Vec<(String, Vec<u8>)>>;
    /// The next snapshot version: strictly greater than every version handed out
    /// before by any controller using this store.
    async fn next_version(&self) -> anyhow::Result<u64>;
}

/// Reads and decodes a JSON value.
///
/// # Errors
/// When the store fails or the value is not valid JSON of type `T`.
pub async fn get_json<T: serde::de::DeserializeOwned>(
    store: &dyn Store,
    key: &str,
) -> anyhow::Result<Option<T>> {
    match store.get(key).await? {
        None => Ok(None),
        Some(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| anyhow::anyhow!("store key {key} holds invalid data: {e}")),
    }
}

/// Encodes and writes a JSON value.
///
/// # Errors
/// When the store fails.
pub async fn put_json<T: serde::Serialize + Sync>(
    store: &dyn Store,
    key: &str,
    value: &T,
) -> anyhow::Result<()> {
    store.put(key, &serde_json::to_vec(value)?).await
}
