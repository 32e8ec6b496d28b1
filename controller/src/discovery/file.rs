//! The file provider: a file, or a directory of `*.toml` files, each listing endpoints
//! by pool (`[pools.web] endpoints = [{ address = "10.0.0.7:8080" }]`). Re-read when
//! anything in the directory changes (and every [`RESYNC`] in case an event was missed).
//! A file that does not parse, or names a pool the configuration lacks, is reported and
//! its last good content stays in use.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::time::Duration;

use async_trait::async_trait;
use rampart_config::{Endpoint, EndpointFile};
use tokio::sync::watch;

use super::{Found, Provider};

/// Full re-read interval, in case the file system dropped an event.
const RESYNC: Duration = Duration::from_secs(30);

/// Endpoints from files.
#[derive(Debug)]
pub struct FileProvider {
    path: PathBuf,
    pools: BTreeSet<String>,
}

impl FileProvider {
    /// A provider of `path` for the configured pool names `pools`.
    #[must_use]
    pub fn new(path: PathBuf, pools: BTreeSet<String>) -> Self {
        Self { path, pools }
    }

    /// The files to read: `path` itself, or the `*.toml` files in it, sorted.
    fn files(&self) -> std::io::Result<Vec<PathBuf>> {
        if !self.path.is_dir() {
            return Ok(vec![self.path.clone()]);
        }
        let mut files: Vec<PathBuf> = std::fs::read_dir(&self.path)?
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|e| e == "toml"))
            .collect();
        files.sort();
        Ok(files)
    }

    /// Reads every file, replacing the entries of `last_good` for files that parse.
    fn read(&self, last_good: &mut HashMap<PathBuf, BTreeMap<String, Vec<Endpoint>>>) -> Found {
        let mut errors = Vec::new();
        let files = match self.files() {
            Ok(f) => f,
            Err(e) => {
                errors.push(format!(
                    "{}: {e}; create it or fix [[discovery.files]] path",
                    self.path.display()
                ));
                Vec::new()
            }
        };
        // Files that were removed stop contributing; unreadable ones keep their last good.
        last_good.retain(|p, _| files.contains(p));
        for file in &files {
            match read_file(file, &self.pools) {
                Ok(pools) => {
                    last_good.insert(file.clone(), pools);
                }
                Err(e) => errors.push(e),
            }
        }
        let mut pools: BTreeMap<String, Vec<Endpoint>> = BTreeMap::new();
        for file in &files {
            for (pool, eps) in last_good.get(file).into_iter().flatten() {
                let list = pools.entry(pool.clone()).or_default();
                for ep in eps {
                    if !list.iter().any(|e| e.address == ep.address) {
                        list.push(ep.clone());
                    }
                }
            }
        }
        Found {
            pools,
            errors,
            ..Found::default()
        }
    }
}

/// One file's endpoints, or an error naming the file, the problem and the fix.
fn read_file(
    file: &Path,
    known: &BTreeSet<String>,
) -> Result<BTreeMap<String, Vec<Endpoint>>, String> {
    let shown = file.display();
    let text = std::fs::read_to_string(file).map_err(|e| format!("{shown}: {e}"))?;
    let parsed: EndpointFile = toml::from_str(&text).map_err(|e| {
        format!(
            "{shown}: {} (expected [pools.NAME] endpoints = [{{ address = \"host:port\" }}]; the last good content stays in use)",
            e.message().trim()
        )
    })?;
    let mut out = BTreeMap::new();
    for (pool, list) in parsed.pools {
        if !known.contains(&pool) {
            return Err(format!(
                "{shown}: pool {pool:?} is not in the configuration; add [pools.{pool}] or fix the name"
            ));
        }
        if let Some(ep) = list
            .endpoints
            .iter()
            .find(|e| e.weight == 0 || e.weight > 1000)
        {
            return Err(format!(
                "{shown}: pools.{pool}: weight {} of {} is outside 1..=1000",
                ep.weight, ep.address
            ));
        }
        out.insert(pool, list.endpoints);
    }
    Ok(out)
}

#[async_trait]
impl Provider for FileProvider {
    fn name(&self) -> String {
        format!("file:{}", self.path.display())
    }

    async fn run(&self, out: watch::Sender<Found>, mut shutdown: watch::Receiver<bool>) {
        let mut changes = rampart_watch::FileWatch::new(&self.path, Some(RESYNC));
        let mut last_good = HashMap::new();
        let mut first = true;
        loop {
            let found = self.read(&mut last_good);
            for e in &found.errors {
                tracing::warn!("discovery {}: {e}", self.name());
            }
            // The first read is announced even when it found nothing: the compile loop
            // waits (up to 2 s) for every provider's first read before the first
            // snapshot.
            out.send_if_modified(|cur| {
                let changed = first || *cur != found;
                *cur = found;
                changed
            });
            first = false;
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = changes.changed() => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn provider(path: &Path) -> FileProvider {
        FileProvider::new(path.to_path_buf(), ["web".to_string()].into())
    }

    #[test]
    fn the_shipped_example_directory_reads_cleanly() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/endpoints.d");
        let found = provider(&dir).read(&mut HashMap::new());
        assert!(found.errors.is_empty(), "{:?}", found.errors);
        assert_eq!(found.pools["web"].len(), 2);
    }

    #[test]
    fn reads_a_directory_and_keeps_the_last_good_content_of_a_broken_file() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("a.toml"),
            "[pools.web]\nendpoints = [{ address = \"127.0.0.1:1\" }, { address = \"127.0.0.1:2\", weight = 3 }]\n",
        )
        .unwrap();
        std::fs::write(dir.path().join("ignored.txt"), "junk").unwrap();
        let p = provider(dir.path());
        let mut good = HashMap::new();
        let found = p.read(&mut good);
        assert!(found.errors.is_empty(), "{:?}", found.errors);
        assert_eq!(found.pools["web"].len(), 2);

        std::fs::write(dir.path().join("a.toml"), "[pools.web\n").unwrap();
        let found = p.read(&mut good);
        assert_eq!(found.pools["web"].len(), 2, "last good content kept");
        assert!(found.errors[0].contains("a.toml"), "{:?}", found.errors);

        std::fs::write(
            dir.path().join("a.toml"),
            "[pools.nope]\nendpoints = [{ address = \"127.0.0.1:1\" }]\n",
        )
        .unwrap();
        let found = p.read(&mut good);
        assert!(
            found.errors[0].contains("not in the configuration"),
            "{:?}",
            found.errors
        );

        std::fs::remove_file(dir.path().join("a.toml")).unwrap();
        let found = p.read(&mut good);
        assert!(found.pools.is_empty() && found.errors.is_empty());
    }
}
