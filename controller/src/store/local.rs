//! The default store: files under `<data_dir>/controller/`, one file per key, written
//! atomically and readable only by the controller's user. Another process (the
//! `rampart controller token create` command) may write while the controller runs:
//! every operation goes to the files, nothing is cached.

use std::path::{Path, PathBuf};

use anyhow::Context;
use async_trait::async_trait;
use rampart_pki::{write_atomic, Mode};

use super::Store;

/// A store in a local directory.
#[derive(Debug, Clone)]
pub struct LocalStore {
    root: PathBuf,
}

impl LocalStore {
    /// The store rooted at `root` (created on demand).
    ///
    /// # Errors
    /// When the directory cannot be created.
    pub fn open(root: &Path) -> anyhow::Result<Self> {
        std::fs::create_dir_all(root).with_context(|| format!("creating {}", root.display()))?;
        Ok(Self {
            root: root.to_path_buf(),
        })
    }

    fn path(&self, key: &str) -> anyhow::Result<PathBuf> {
        if key.is_empty()
            || key
                .split('/')
                .any(|part| part.is_empty() || part == "." || part == "..")
        {
            anyhow::bail!("invalid store key {key:?}");
        }
        Ok(self.root.join(key))
    }

    fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Self) -> anyhow::Result<T> + Send + 'static,
    ) -> impl std::future::Future<Output = anyhow::Result<T>> {
        let this = self.clone();
        async move { tokio::task::spawn_blocking(move || f(&this)).await? }
    }
}

fn ensure_parent(path: &Path) -> anyhow::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    Ok(())
}

#[async_trait]
impl Store for LocalStore {
    async fn get(&self, key: &str) -> anyhow::Result<Option<Vec<u8>>> {
        let path = self.path(key)?;
        self.blocking(move |_| match std::fs::read(&path) {
            Ok(v) => Ok(Some(v)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(anyhow::Error::new(e).context(format!("reading {}", path.display()))),
        })
        .await
    }

    async fn put(&self, key: &str, value: &[u8]) -> anyhow::Result<()> {
        let path = self.path(key)?;
        let value = value.to_vec();
        self.blocking(move |_| {
            ensure_parent(&path)?;
            write_atomic(&path, &value, Mode::Private)
        })
        .await
    }

    async fn put_leading(&self, key: &str, value: &[u8]) -> anyhow::Result<()> {
        // A local store has one controller, which always leads.
        self.put(key, value).await
    }

    async fn create(&self, key: &str, value: &[u8]) -> anyhow::Result<bool> {
        let path = self.path(key)?;
        let value = value.to_vec();
        self.blocking(move |_| {
            ensure_parent(&path)?;
            // Write a temp file, then hard-link it into place: link fails if the key
            // exists, so exactly one creator wins, and readers never see half a value.
            let tmp = path.with_extension(format!("new.{}", uuid::Uuid::new_v4().simple()));
            write_atomic(&tmp, &value, Mode::Private)?;
            let won = match std::fs::hard_link(&tmp, &path) {
                Ok(()) => true,
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => false,
                Err(e) => {
                    let _ = std::fs::remove_file(&tmp);
                    return Err(
                        anyhow::Error::new(e).context(format!("creating {}", path.display()))
                    );
                }
            };
            std::fs::remove_file(&tmp).with_context(|| format!("removing {}", tmp.display()))?;
            Ok(won)
        })
        .await
    }

    async fn delete(&self, key: &str) -> anyhow::Result<bool> {
        let path = self.path(key)?;
        self.blocking(move |_| match std::fs::remove_file(&path) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(anyhow::Error::new(e).context(format!("removing {}", path.display()))),
        })
        .await
    }

    async fn list(&self, prefix: &str) -> anyhow::Result<Vec<(String, Vec<u8>)>> {
        let dir = self.path(prefix)?;
        let prefix = prefix.to_string();
        self.blocking(move |_| {
            let entries = match std::fs::read_dir(&dir) {
                Ok(e) => e,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
                Err(e) => {
                    return Err(anyhow::Error::new(e).context(format!("listing {}", dir.display())))
                }
            };
            let mut out = Vec::new();
            for entry in entries {
                let entry = entry?;
                let name = entry.file_name().to_string_lossy().into_owned();
                if name.contains(".new.") || name.contains(".tmp.") || !entry.file_type()?.is_file()
                {
                    continue;
                }
                // A key deleted between listing and reading is simply not listed.
                if let Ok(value) = std::fs::read(entry.path()) {
                    out.push((format!("{prefix}/{name}"), value));
                }
            }
            out.sort();
            Ok(out)
        })
        .await
    }

    async fn next_version(&self) -> anyhow::Result<u64> {
        let path = self.path("version")?;
        self.blocking(move |_| {
            // One controller per local store: read, increment, write atomically. The
            // counter is persisted before the version is used, so a crash never reuses it.
            let current = match std::fs::read_to_string(&path) {
                Ok(s) => s
                    .trim()
                    .parse::<u64>()
                    .with_context(|| format!("{} is corrupt", path.display()))?,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
                Err(e) => {
                    return Err(anyhow::Error::new(e).context(format!("reading {}", path.display())))
                }
            };
            let next = current + 1;
            write_atomic(&path, next.to_string().as_bytes(), Mode::Private)?;
            Ok(next)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn create_and_delete_each_succeed_once() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::open(dir.path()).unwrap();
        assert!(store.create("tokens/a", b"1").await.unwrap());
        assert!(!store.create("tokens/a", b"2").await.unwrap());
        assert_eq!(store.get("tokens/a").await.unwrap().unwrap(), b"1");
        assert_eq!(store.list("tokens").await.unwrap().len(), 1);
        assert!(store.delete("tokens/a").await.unwrap());
        assert!(!store.delete("tokens/a").await.unwrap());
        assert!(store.get("../x").await.is_err());
    }

    #[tokio::test]
    async fn versions_increase_across_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let a = LocalStore::open(dir.path()).unwrap();
        assert_eq!(a.next_version().await.unwrap(), 1);
        assert_eq!(a.next_version().await.unwrap(), 2);
        let b = LocalStore::open(dir.path()).unwrap();
        assert_eq!(b.next_version().await.unwrap(), 3);
    }
}
