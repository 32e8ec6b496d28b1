//! A real etcd (Debian's etcd-server) on loopback ports, for the HA tests.

use std::process::{Child, Command, Stdio};

use super::{eventually, free_addr};

/// A real etcd server on loopback ports in a temp directory.
pub struct Etcd {
    child: Child,
    /// Client URL, `http://127.0.0.1:PORT`.
    pub url: String,
    _dir: tempfile::TempDir,
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Etcd {
    /// Starts etcd and waits until it answers.
    pub async fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let (client, peer) = (free_addr(), free_addr());
        let url = format!("http://{client}");
        let child = Command::new("etcd")
            .arg("--data-dir")
            .arg(dir.path().join("etcd"))
            .args(["--name", "test"])
            .args([
                "--listen-client-urls",
                &url,
                "--advertise-client-urls",
                &url,
            ])
            .args(["--listen-peer-urls", &format!("http://{peer}")])
            .args(["--initial-advertise-peer-urls", &format!("http://{peer}")])
            .args(["--initial-cluster", &format!("test=http://{peer}")])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("etcd.log")).unwrap())
            .spawn()
            .expect("etcd is installed (scripts/setup installs etcd-server)");
        eventually("etcd to answer", || async {
            let r = reqwest::get(format!("{url}/health")).await.ok()?;
            (r.status() == 200).then_some(())
        })
        .await;
        Self {
            child,
            url,
            _dir: dir,
        }
    }
}
