//! Several controllers on one etcd: one leader at a time, followers serve the leader's
//! snapshot, and when the leader dies or freezes a follower takes over within two lease
//! TTLs with versions that keep increasing. Single writer: every write of the snapshot
//! in etcd's history was made by the controller holding the leader key at that
//! revision, including after a frozen leader wakes up believing it still leads.
#![allow(missing_docs, clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use common::etcd::Etcd;
use common::{eventually, free_addr};
use etcd_client::{EventType, GetOptions, WatchOptions};
use rampart_config::snapshot::Heartbeat;
use rampart_controller::leader::{self, Candidate};
use rampart_controller::store::etcd::{EtcdStore, LEADER_KEY};
use rampart_controller::store::Store;
use rampart_proxy::fleet::client::{self, FleetClient, WatchResult};
use tokio::sync::watch;

const PREFIX: &str = "/rampart-test";

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
    /// A controller whose one route answers `body` (so its snapshots can be told apart).
    fn start(dir: &Path, name: &str, etcd: &str, body: &str) -> Self {
        let (admin, fleet) = (free_addr(), free_addr());
        let config = dir.join(format!("{name}.toml"));
        std::fs::write(&config, Self::config(dir, name, etcd, body, admin, fleet)).unwrap();
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

    fn config(
        dir: &Path,
        name: &str,
        etcd: &str,
        body: &str,
        admin: std::net::SocketAddr,
        fleet: std::net::SocketAddr,
    ) -> String {
        format!(
            "[server]\ndata_dir = {:?}\n[controller]\nlisten = \"{fleet}\"\nadmin = \"{admin}\"\nwatch_timeout = \"2s\"\nstore = {{ etcd = {{ endpoints = [\"{etcd}\"], prefix = \"{PREFIX}\", lease_ttl = \"2s\" }} }}\n\n[[routes]]\nname = \"hello\"\naction = {{ respond = {{ body = \"{body}\" }} }}\n",
            dir.join(name)
        )
    }

    /// Sends `signal` (`STOP`, `CONT`) to the process.
    fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.child.id().to_string())
            .status()
            .unwrap();
        assert!(status.success(), "kill -{signal}");
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
async fn a_frozen_leader_is_replaced_within_two_ttls_and_never_writes_again() {
    common::init();
    let etcd = Etcd::start().await;
    let dir = tempfile::tempdir().unwrap();
    let a = ControllerProc::start(dir.path(), "a", &etcd.url, "body-a1");
    eventually("a to lead with a snapshot", || async {
        (a.leads().await? && a.version().await > 0).then_some(())
    })
    .await;
    let b = ControllerProc::start(dir.path(), "b", &etcd.url, "body-b1");
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

    // Freeze a (no clean hand-over, as with a long pause or a partition): b must take
    // over once a's lease expires.
    a.signal("STOP");
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
        // The newest snapshot: b may have published again since its version was read.
        WatchResult::Snapshot { version, .. } => assert!(version >= v_b, "{version} < {v_b}"),
        WatchResult::NoChange => panic!("the new leader's snapshot did not reach the proxy"),
    }

    // a's configuration changes while it is frozen: when it wakes it still believes it
    // leads and has a new snapshot to write. It must step down without writing it.
    std::fs::write(
        &a.config,
        ControllerProc::config(dir.path(), "a", &etcd.url, "body-a2", a.admin, a.fleet),
    )
    .unwrap();
    a.signal("CONT");
    eventually("a to step down after waking", || async {
        (!a.leads().await?).then_some(())
    })
    .await;
    eventually("a to follow b's snapshot", || async {
        (a.version().await >= v_b).then_some(())
    })
    .await;
    let writes = single_writer(&etcd.url).await;
    assert!(
        writes.iter().any(|w| w.contains("body-b1")),
        "b's snapshot is in etcd's history: {writes:?}"
    );
    assert!(
        !writes.iter().any(|w| w.contains("body-a2")),
        "a wrote a snapshot after its term ended"
    );
}

/// Reads etcd's whole history under the prefix and checks that every write of the
/// snapshot was made by the controller holding the leader key at that revision (the
/// writer is told by the route body its configuration answers: `body-a*` or
/// `body-b*`; the leader key's value is the holder's id, the first holder being a).
/// Returns the snapshot writes as `writer:body` strings.
async fn single_writer(url: &str) -> Vec<String> {
    let mut c = etcd_client::Client::connect([url], None).await.unwrap();
    let head = c
        .get(PREFIX, Some(GetOptions::new().with_prefix()))
        .await
        .unwrap()
        .header()
        .unwrap()
        .revision();
    let options = WatchOptions::new().with_prefix().with_start_revision(1);
    let mut stream = c.watch(PREFIX, Some(options)).await.unwrap();
    let (mut ids, mut holder, mut writes) = (Vec::<String>::new(), None::<String>, Vec::new());
    let (leader_key, snapshot_key) = (
        format!("{PREFIX}/{LEADER_KEY}"),
        format!("{PREFIX}/snapshot/current"),
    );
    let mut seen = 0;
    while seen < head {
        let msg = tokio::time::timeout(Duration::from_secs(10), stream.message())
            .await
            .expect("etcd's history arrives")
            .unwrap()
            .expect("the watch stays open");
        for e in msg.events() {
            let kv = e.kv().unwrap();
            seen = seen.max(kv.mod_revision());
            let value = String::from_utf8_lossy(kv.value()).to_string();
            if kv.key() == leader_key.as_bytes() {
                holder = match e.event_type() {
                    EventType::Put => {
                        if !ids.contains(&value) {
                            ids.push(value.clone());
                        }
                        Some(value)
                    }
                    EventType::Delete => None,
                };
            } else if kv.key() == snapshot_key.as_bytes() && e.event_type() == EventType::Put {
                let writer = if value.contains("body-a") { 0 } else { 1 };
                let writer = ids.get(writer).cloned();
                assert!(
                    writer.is_some() && writer == holder,
                    "the snapshot at revision {} was written by {writer:?} while {holder:?} \
                     held the leader key",
                    kv.mod_revision()
                );
                let body = ["body-a1", "body-a2", "body-b1"]
                    .into_iter()
                    .find(|b| value.contains(b))
                    .unwrap_or("?");
                writes.push(format!("{}:{body}", writer.unwrap_or_default()));
            }
        }
    }
    writes
}

/// The fence itself, without processes: a controller that still believes it holds a
/// term that etcd has ended (its lease alive, its key gone) cannot write what only the
/// leader writes, and its campaign steps down once the key goes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_controller_whose_term_ended_writes_nothing_only_the_leader_writes() {
    common::init();
    let etcd = Etcd::start().await;
    let (_stop, shutdown) = watch::channel(false);
    let connect = || EtcdStore::connect(std::slice::from_ref(&etcd.url), "/fence");
    let (a, b) = (connect().await.unwrap(), connect().await.unwrap());
    let campaign = |store: &EtcdStore, id: &str| {
        let (tx, rx) = watch::channel(false);
        let candidate = Candidate {
            key: store.key(LEADER_KEY),
            id: id.into(),
            ttl: Duration::from_secs(2),
            fence: store.fence(),
        };
        tokio::spawn(leader::campaign(
            store.client(),
            candidate,
            tx,
            shutdown.clone(),
        ));
        rx
    };
    let a_leads = campaign(&a, "a");
    eventually("a to lead", || async { (*a_leads.borrow()).then_some(()) }).await;
    let a_term = a.fence().revision().expect("a leading holds a term");
    a.put_leading("snapshot/current", b"a-1").await.unwrap();
    let b_leads = campaign(&b, "b");
    let refused = b.put_leading("snapshot/current", b"b-0").await;
    assert!(refused.is_err(), "a follower wrote the leader's key");

    // The key goes while a's lease lives on (etcdctl del; the same as etcd ending a
    // frozen leader's term): b takes over, a steps down.
    b.client().delete(a.key(LEADER_KEY), None).await.unwrap();
    eventually("b to lead", || async { (*b_leads.borrow()).then_some(()) }).await;
    eventually("a to step down", || async {
        (!*a_leads.borrow()).then_some(())
    })
    .await;
    b.put_leading("snapshot/current", b"b-1").await.unwrap();

    // a, as if it had not noticed (frozen between its check and its write), tries with
    // its old term: etcd refuses, nothing is written.
    a.fence().hold(a_term);
    let stale = a.put_leading("snapshot/current", b"a-2").await;
    let message = format!(
        "{:#}",
        stale.expect_err("a stale leader wrote the snapshot")
    );
    assert!(message.contains("term"), "{message}");
    assert_eq!(a.fence().revision(), None, "a refused write ends the term");
    assert_eq!(
        b.get("snapshot/current").await.unwrap().as_deref(),
        Some(&b"b-1"[..])
    );
}
