//! Several controllers on one etcd: one leader at a time, followers serve the leader's
//! snapshot, and when the leader is killed a follower takes over within two lease TTLs
//! with versions that keep increasing.
#![allow(missing_docs, clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use common::etcd::Etcd;
use common::{eventually, free_addr};
use rampart_config::snapshot::Heartbeat;
use rampart_proxy::fleet::client::{self, FleetClient, WatchResult};

/// A `rampart controller` process on the shared etcd.
struct ControllerProc {
    child: Child,
    admin: std::net::SocketAddr,
    fleet: std::net::SocketAddr,
    config: std::path::PathBuf,
}

impl Drop for ControllerProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl ControllerProc {
    fn start(dir: &Path, name: &str, etcd: &str) -> Self {
        let (admin, fleet) = (free_addr(), free_addr());
        let config = dir.join(format!("{name}.toml"));
        std::fs::write(
            &config,
            format!(
                "[server]\ndata_dir = {:?}\n[controller]\nlisten = \"{fleet}\"\nadmin = \"{admin}\"\nwatch_timeout = \"2s\"\nstore = {{ etcd = {{ endpoints = [\"{etcd}\"], prefix = \"/rampart-test\", lease_ttl = \"2s\" }} }}\n\n[[routes]]\nname = \"hello\"\naction = {{ respond = {{ body = \"hi\" }} }}\n",
                dir.join(name)
            ),
        )
        .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_rampart"))
            .args(["controller", "--config"])
            .arg(&config)
            .stderr(std::fs::File::create(dir.join(format!("{name}.log"))).unwrap())
            .spawn()
            .unwrap();
        Self {
            child,
            admin,
            fleet,
            config,
        }
    }

    async fn status(&self) -> Option<serde_json::Value> {
        reqwest::get(format!("http://{}/status", self.admin))
            .await
            .ok()?
            .json()
            .await
            .ok()
    }

    async fn leads(&self) -> Option<bool> {
        Some(self.status().await?["leader"].as_bool().unwrap())
    }

    async fn version(&self) -> u64 {
        self.status().await.unwrap()["version"].as_u64().unwrap()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_leader_makes_a_follower_take_over_with_higher_versions() {
    common::init();
    let etcd = Etcd::start().await;
    let dir = tempfile::tempdir().unwrap();
    let a = ControllerProc::start(dir.path(), "a", &etcd.url);
    eventually("a to lead with a snapshot", || async {
        (a.leads().await? && a.version().await > 0).then_some(())
    })
    .await;
    let b = ControllerProc::start(dir.path(), "b", &etcd.url);
    let v_a = a.version().await;
    eventually("b to follow a's snapshot", || async {
        (!b.leads().await? && b.version().await == v_a).then_some(())
    })
    .await;

    // A proxy enrolled through a is known to b too (CA, tokens, instances in etcd).
    let token = common::join_token(&a.config);
    let identity = client::enroll(&format!("https://{}", a.fleet), &token, "p")
        .await
        .unwrap();
    let via_b = FleetClient::new(
        &format!("https://{}", b.fleet),
        identity,
        Duration::from_secs(5),
    )
    .unwrap();
    match via_b.watch(0).await.unwrap() {
        WatchResult::Snapshot { version, .. } => assert_eq!(version, v_a),
        WatchResult::NoChange => panic!("b has no snapshot"),
    }
    // A heartbeat received by one controller shows in the other's status.
    let via_a = FleetClient::new(
        &format!("https://{}", a.fleet),
        (*via_b.identity).clone(),
        Duration::from_secs(5),
    )
    .unwrap();
    via_a
        .heartbeat(&Heartbeat {
            public_addrs: vec!["127.0.0.9".parse().unwrap()],
            ready: true,
            version: v_a,
            https_port: None,
            traffic: Some(rampart_config::snapshot::TrafficSummary {
                seconds: 60,
                rate: 12.5,
                ..Default::default()
            }),
        })
        .await
        .unwrap();
    let instance = via_b.identity.instance.clone();
    eventually("b to list the instance as ready", || async {
        let s = b.status().await?;
        s["instances"]
            .as_array()?
            .iter()
            .any(|i| {
                i["id"] == instance.as_str()
                    && i["state"] == "ready"
                    && i["public_addrs"][0] == "127.0.0.9"
                    && i["traffic"]["rate"] == 12.5
            })
            .then_some(())
    })
    .await;

    // Kill a (no clean hand-over): b must take over once a's lease expires.
    let mut a = a;
    a.child.kill().unwrap();
    let killed = Instant::now();
    eventually("b to take over", || async {
        b.leads().await?.then_some(())
    })
    .await;
    let took = killed.elapsed();
    eprintln!("takeover after {took:?} (lease TTL 2s)");
    // The lease a held runs out at most one TTL after its last keep-alive, and b is
    // already campaigning: two TTLs bound the takeover (the 20 s deadline above is
    // only the harness's).
    assert!(
        took < Duration::from_secs(4),
        "b took over {took:?} after a died; the bound is two lease TTLs (4 s)"
    );
    let v_b = eventually("b to publish its own version", || async {
        let v = b.version().await;
        (v > v_a).then_some(v)
    })
    .await;
    assert!(v_b > v_a, "versions keep increasing: {v_a} then {v_b}");
    match via_b.watch(v_a).await.unwrap() {
        WatchResult::Snapshot { version, .. } => assert_eq!(version, v_b),
        WatchResult::NoChange => panic!("the new leader's snapshot did not reach the proxy"),
    }
}
