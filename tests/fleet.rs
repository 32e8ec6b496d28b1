//! The controller and the fleet protocol end to end: enrolment with one-time tokens,
//! mutual TLS, watch/ack with many proxies, static stability from the cached snapshot,
//! refused snapshots, and endpoint changes reaching real proxies under load.
#![allow(missing_docs, clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{eventually, free_addr, Backend, Proxy};
use rampart_config::snapshot::{Ack, AckResult, Heartbeat, Snapshot};
use rampart_proxy::fleet::client::{self, CallError, FleetClient, WatchResult};

/// A controller running in this test process, with its own data directory and an
/// endpoint directory for the file provider.
struct Controller {
    handle: Option<rampart_controller::Handle>,
    dir: tempfile::TempDir,
    listen: std::net::SocketAddr,
    /// Whether the controller watches its file (as `rampart controller`) or was
    /// given the configuration only (as `rampart up` without a file).
    reloads: bool,
    /// Lines of the `[controller]` section besides `listen`, `admin` and
    /// `watch_timeout`.
    settings: String,
}

impl Controller {
    /// `body` holds routes and pools; `[[discovery.files]]` points at `endpoints/`.
    async fn start(body: &str) -> Self {
        Self::start_with(body, true).await
    }

    async fn start_with(body: &str, reloads: bool) -> Self {
        Self::start_with_settings(body, reloads, "instance_timeout = \"5s\"\n").await
    }

    async fn start_with_settings(body: &str, reloads: bool, settings: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("endpoints")).unwrap();
        let mut c = Self {
            handle: None,
            dir,
            listen: "127.0.0.1:0".parse().unwrap(),
            reloads,
            settings: settings.to_string(),
        };
        c.write_config(body);
        c.restart().await;
        c
    }

    fn config_path(&self) -> PathBuf {
        self.dir.path().join("controller.toml")
    }

    fn write_config(&self, body: &str) {
        let text = format!(
            "[server]\ndata_dir = {:?}\n\n[controller]\nlisten = \"{}\"\nadmin = \"127.0.0.1:0\"\nwatch_timeout = \"2s\"\n{}\n[[discovery.files]]\npath = {:?}\n\n{body}\n",
            self.dir.path().join("data"),
            self.listen,
            self.settings,
            self.dir.path().join("endpoints"),
        );
        let tmp = self.dir.path().join("controller.toml.tmp");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, self.config_path()).unwrap();
    }

    fn config(&self) -> rampart_config::Config {
        rampart_config::load(&self.config_path()).unwrap()
    }

    /// Starts (again) on the same fleet port, so proxies find it where it was.
    async fn restart(&mut self) {
        let path = self.reloads.then(|| self.config_path());
        let handle = rampart_controller::start(self.config(), path)
            .await
            .unwrap();
        self.listen = handle.fleet_addr;
        // Later restarts bind the same port.
        self.write_config(&self.body());
        self.handle = Some(handle);
    }

    fn body(&self) -> String {
        let text = std::fs::read_to_string(self.config_path()).unwrap();
        let start = text
            .find(&format!("path = {:?}\n", self.dir.path().join("endpoints")))
            .unwrap();
        text[start..]
            .split_once('\n')
            .unwrap()
            .1
            .trim_start()
            .to_string()
    }

    async fn stop(&mut self) {
        if let Some(h) = self.handle.take() {
            h.shutdown().await;
        }
    }

    fn url(&self) -> String {
        format!("https://{}", self.listen)
    }

    async fn token(&self) -> String {
        rampart_controller::create_token(&self.config(), Duration::from_secs(600), false)
            .await
            .unwrap()
    }

    fn state(&self) -> &rampart_controller::State {
        &self.handle.as_ref().unwrap().state
    }

    fn version(&self) -> u64 {
        self.state().fleet.version()
    }

    /// Writes `endpoints/NAME.toml` atomically.
    fn endpoints(&self, name: &str, pool: &str, backends: &[&Arc<Backend>]) {
        let list: Vec<String> = backends
            .iter()
            .map(|b| format!("{{ address = \"{}\" }}", b.addr))
            .collect();
        write_atomically(
            &self
                .dir
                .path()
                .join("endpoints")
                .join(format!("{name}.toml")),
            &format!("[pools.{pool}]\nendpoints = [{}]\n", list.join(", ")),
        );
    }
}

fn write_atomically(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

const WEB: &str = "[[routes]]\nname = \"all\"\naction = { forward = \"web\" }\n\n[pools.web]\n";

async fn enrolled(c: &Controller) -> FleetClient {
    let id = client::enroll(&c.url(), &c.token().await, "test")
        .await
        .unwrap();
    FleetClient::new(&c.url(), id, Duration::from_secs(5)).unwrap()
}

async fn next_snapshot(client: &FleetClient, after: u64) -> Snapshot {
    let started = std::time::Instant::now();
    loop {
        assert!(
            started.elapsed() < common::DEADLINE,
            "no snapshot after version {after}"
        );
        match client.watch(after).await.unwrap() {
            WatchResult::Snapshot { body, .. } => return serde_json::from_slice(&body).unwrap(),
            WatchResult::NoChange => {}
        }
    }
}

fn refused_status(e: &CallError) -> u16 {
    match e {
        CallError::Refused { status, .. } => *status,
        CallError::Unreachable(e) => panic!("expected a refusal, got unreachable: {e:#}"),
    }
}

#[tokio::test]
async fn join_tokens_work_once_and_expired_or_forged_ones_are_refused() {
    common::init();
    let mut c = Controller::start(WEB).await;
    let token = c.token().await;
    let id = client::enroll(&c.url(), &token, "a").await.unwrap();
    assert!(id.instance.starts_with("p-"));

    let again = client::enroll(&c.url(), &token, "b").await.unwrap_err();
    assert_eq!(refused_status(&again), 401);
    assert!(again.to_string().contains("already used"), "{again}");

    let expired = rampart_controller::create_token(&c.config(), Duration::ZERO, false)
        .await
        .unwrap();
    let e = client::enroll(&c.url(), &expired, "c").await.unwrap_err();
    assert!(e.to_string().contains("expired"), "{e}");

    // A token naming another CA: the proxy refuses to talk to this controller at all.
    let other = format!("{}{}", &token[..token.len() - 64], "0".repeat(64));
    let e = client::enroll(&c.url(), &other, "d").await.unwrap_err();
    assert!(matches!(e, CallError::Unreachable(_)), "{e}");

    let status = c.state().status();
    assert_eq!(status.instances.len(), 1, "{status:?}");
    c.stop().await;
}

#[tokio::test]
async fn fifty_proxies_watch_and_ack_every_version() {
    common::init();
    let mut c = Controller::start_with(WEB, false).await;
    let a = Backend::start("a").await;
    let b = Backend::start("b").await;
    c.endpoints("web", "web", &[&a]);
    let v1 = eventually("a snapshot with the discovered endpoint", || async {
        let v = c.version();
        (v > 0 && c.state().status().discovery[0].endpoints == 1).then_some(v)
    })
    .await;

    let mut clients = Vec::new();
    for _ in 0..50 {
        clients.push(enrolled(&c).await);
    }
    let round = |after: u64| {
        let clients = clients.clone();
        async move {
            let tasks: Vec<_> = clients
                .into_iter()
                .map(|cl| {
                    tokio::spawn(async move {
                        let snap = next_snapshot(&cl, after).await;
                        cl.ack(&Ack {
                            version: snap.version,
                            applied: AckResult::Ok,
                            detail: String::new(),
                        })
                        .await
                        .unwrap();
                        cl.heartbeat(&Heartbeat {
                            public_addrs: vec![],
                            ready: true,
                            version: snap.version,
                            https_port: None,
                            traffic: None,
                        })
                        .await
                        .unwrap();
                        snap
                    })
                })
                .collect();
            let mut out = Vec::new();
            for t in tasks {
                out.push(t.await.unwrap());
            }
            out
        }
    };
    let first = round(0).await;
    assert!(first
        .iter()
        .all(|s| s.version >= v1 && s.pools["web"].endpoints.len() == 1));
    let seen = first[0].version;

    // An endpoint change reaches every watcher as the next version.
    let watching = tokio::spawn(round(seen));
    c.endpoints("web", "web", &[&a, &b]);
    let second = watching.await.unwrap();
    assert!(second
        .iter()
        .all(|s| s.version > seen && s.pools["web"].endpoints.len() == 2));

    let status = c.state().status();
    assert_eq!(status.instances.len(), 50);
    assert!(
        status
            .instances
            .iter()
            .all(|i| i.state == "ready" && i.version == second[0].version),
        "{status:?}"
    );
    c.stop().await;
}

#[tokio::test]
async fn certificates_renew_and_those_of_another_ca_or_revoked_instances_are_refused() {
    common::init();
    let mut c = Controller::start(WEB).await;
    let mut other = Controller::start(WEB).await;
    let good = enrolled(&c).await;
    let first = good.watch(0).await;
    assert!(
        matches!(first, Ok(WatchResult::Snapshot { .. })),
        "{:?}",
        first.map(|_| ()).map_err(|e| e.to_string())
    );

    // A proxy of the other controller presents a certificate of the other CA (while
    // trusting this controller's CA, to isolate the client-side check).
    let foreign = client::enroll(&other.url(), &other.token().await, "x")
        .await
        .unwrap();
    let mut forged = foreign.clone();
    forged.ca_pem = good.identity.ca_pem.clone();
    let intruder = FleetClient::new(&c.url(), forged, Duration::from_secs(5)).unwrap();
    match intruder.watch(0).await {
        Err(CallError::Unreachable(e)) => {
            let chain = format!("{e:?}");
            assert!(
                chain.to_lowercase().contains("certificate") || chain.contains("alert"),
                "{chain}"
            );
        }
        other => panic!("a foreign certificate was not refused: {other:?}"),
    }

    // Renewal: same identity, new key, and the new certificate works.
    let renewed = good.renew().await.unwrap();
    assert_eq!(renewed.instance, good.identity.instance);
    assert_ne!(renewed.key_pem, good.identity.key_pem);
    assert!(!renewed.renewal_due());
    let good = FleetClient::new(&c.url(), renewed, Duration::from_secs(5)).unwrap();
    assert!(matches!(
        good.watch(0).await,
        Ok(WatchResult::Snapshot { .. })
    ));

    rampart_controller::revoke(&c.config(), &good.identity.instance)
        .await
        .unwrap();
    let e = good.watch(0).await.unwrap_err();
    assert_eq!(refused_status(&e), 403);
    assert!(e.to_string().contains("revoked"), "{e}");
    assert!(c
        .state()
        .status()
        .instances
        .iter()
        .any(|i| i.state == "revoked"));
    c.stop().await;
    other.stop().await;
}

#[tokio::test]
async fn a_snapshot_that_does_not_build_is_acked_as_error_and_the_old_one_keeps_serving() {
    common::init();
    let mut c = Controller::start(WEB).await;
    let a = Backend::start("a").await;
    c.endpoints("web", "web", &[&a]);
    let proxy = Proxy::start_fleet(&c.url(), Some(&c.token().await)).await;
    let client = Proxy::http_client();
    let body = eventually("the proxy to forward to a", || async {
        let r = client.get(proxy.url("/")).send().await.ok()?;
        (r.status() == 200).then_some(r.text().await.ok()?)
    })
    .await;
    assert_eq!(body, "a");
    let good = proxy.version().await;

    // A certificate file that is not PEM: the controller passes it on, the proxy
    // cannot load it.
    let bad = c.dir.path().join("bad.pem");
    std::fs::write(&bad, "not a certificate").unwrap();
    c.write_config(&format!(
        "{WEB}\n[[tls]]\nhosts = [\"bad.test\"]\nsource = {{ files = {{ cert = {bad:?}, key = {bad:?} }} }}\n"
    ));
    let err = eventually("the proxy to refuse the snapshot", || async {
        c.state()
            .status()
            .instances
            .into_iter()
            .find_map(|i| i.last_error)
    })
    .await;
    assert!(
        err.contains("certificates[0]") && err.contains("bad.test"),
        "{err}"
    );
    assert_eq!(
        proxy.version().await,
        good,
        "the old snapshot keeps serving"
    );
    let r = client.get(proxy.url("/")).send().await.unwrap();
    assert_eq!(r.text().await.unwrap(), "a");
    assert!(proxy.metric("rampart_config_reload_failures_total").await >= 1.0);
    c.stop().await;
}

#[tokio::test]
async fn a_proxy_restarted_while_the_controller_is_down_serves_its_cached_snapshot() {
    common::init();
    let mut c = Controller::start(WEB).await;
    let a = Backend::start("a").await;
    let b = Backend::start("b").await;
    c.endpoints("web", "web", &[&a]);
    let mut proxy = Proxy::start_fleet(&c.url(), Some(&c.token().await)).await;
    let client = Proxy::http_client();
    eventually("traffic to a", || async {
        let r = client.get(proxy.url("/")).send().await.ok()?;
        (r.text().await.ok()? == "a").then_some(())
    })
    .await;

    c.stop().await;
    assert!(
        proxy.restart_fleet(&c.url(), None).await,
        "log:\n{}",
        proxy.log()
    );
    let fleet = eventually("/status to say the controller is unreachable", || async {
        let s = proxy.status().await;
        (s["fleet"]["connected"] == false).then(|| s["fleet"].clone())
    })
    .await;
    assert!(
        fleet["instance"].as_str().unwrap().starts_with("p-"),
        "{fleet}"
    );
    let r = client.get(proxy.url("/")).send().await.unwrap();
    assert_eq!(
        r.text().await.unwrap(),
        "a",
        "served from the cached snapshot"
    );
    assert!(proxy.log().contains("cached snapshot"), "{}", proxy.log());

    // The controller comes back with another endpoint: the proxy converges.
    c.endpoints("web", "web", &[&b]);
    c.restart().await;
    eventually("the proxy to converge on b", || async {
        let r = client.get(proxy.url("/")).send().await.ok()?;
        (r.text().await.ok()? == "b").then_some(())
    })
    .await;
    c.stop().await;
}

/// `rampart controller` as a process, with tokens and status from the CLI, two
/// `rampart proxy` processes, and endpoint changes under load: no request fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoint_changes_reach_two_proxies_under_load_without_a_failed_request() {
    common::init();
    let dir = tempfile::tempdir().unwrap();
    let endpoints = dir.path().join("endpoints");
    std::fs::create_dir_all(&endpoints).unwrap();
    let backends = [
        Backend::start("a").await,
        Backend::start("b").await,
        Backend::start("c").await,
    ];
    let write_endpoints = |which: &[usize]| {
        let list: Vec<String> = which
            .iter()
            .map(|&i| format!("{{ address = \"{}\" }}", backends[i].addr))
            .collect();
        write_atomically(
            &endpoints.join("web.toml"),
            &format!("[pools.web]\nendpoints = [{}]\n", list.join(", ")),
        );
    };
    write_endpoints(&[0]);
    let (fleet, admin) = (free_addr(), free_addr());
    let config = dir.path().join("controller.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\ndata_dir = {:?}\n[controller]\nlisten = \"{fleet}\"\nadmin = \"{admin}\"\nwatch_timeout = \"5s\"\n[[discovery.files]]\npath = {endpoints:?}\n{WEB}",
            dir.path().join("data")
        ),
    )
    .unwrap();
    let cli = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_rampart"))
            .arg("controller")
            .arg("--config")
            .arg(&config)
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let log = std::fs::File::create(dir.path().join("controller.log")).unwrap();
    let mut controller = std::process::Command::new(env!("CARGO_BIN_EXE_rampart"))
        .args(["controller", "--config"])
        .arg(&config)
        .stderr(log)
        .spawn()
        .unwrap();
    let url = format!("https://{fleet}");
    common::wait_controller(admin).await;
    let p1 = Proxy::start_fleet(&url, Some(cli(&["token", "create"]).trim())).await;
    let p2 = Proxy::start_fleet(&url, Some(cli(&["token", "create", "--ttl", "5m"]).trim())).await;
    eventually("both proxies to report ready", || async {
        (cli(&["status"]).matches(" ready ").count() == 2).then_some(())
    })
    .await;

    let stop = Arc::new(AtomicBool::new(false));
    let failures = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicUsize::new(0));
    let mut load = Vec::new();
    for proxy_url in [p1.url("/"), p2.url("/")] {
        for _ in 0..2 {
            let (stop, failures, done, proxy_url) = (
                stop.clone(),
                failures.clone(),
                done.clone(),
                proxy_url.clone(),
            );
            load.push(tokio::spawn(async move {
                let client = Proxy::http_client();
                let started = std::time::Instant::now();
                // Bounded in time and count.
                while !stop.load(Ordering::Relaxed)
                    && started.elapsed() < Duration::from_secs(60)
                    && done.load(Ordering::Relaxed) < 200_000
                {
                    match client.get(&proxy_url).send().await {
                        Ok(r) if r.status() == 200 => {}
                        Ok(r) => {
                            eprintln!("status {}", r.status());
                            failures.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) => {
                            eprintln!("error {e}");
                            failures.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    done.fetch_add(1, Ordering::Relaxed);
                }
            }));
        }
    }
    eventually("the load to run", || async {
        (done.load(Ordering::Relaxed) > 500).then_some(())
    })
    .await;
    // Add b and c, then drop a: each change must reach both proxies.
    for (step, set) in [vec![0, 1], vec![0, 1, 2], vec![1, 2]]
        .into_iter()
        .enumerate()
    {
        let before: Vec<usize> = backends.iter().map(|b| b.hits()).collect();
        write_endpoints(&set);
        eventually(
            &format!("step {step}: traffic to exactly {set:?}"),
            || async {
                let now: Vec<usize> = backends.iter().map(|b| b.hits()).collect();
                let moved: Vec<usize> = (0..3).filter(|&i| now[i] > before[i]).collect();
                (set.iter().all(|i| moved.contains(i))).then_some(())
            },
        )
        .await;
    }
    // Once both proxies serve the controller's version without a, a gets nothing more.
    let current = eventually("the controller to publish the last change", || async {
        let s: serde_json::Value = reqwest::get(format!("http://{admin}/status"))
            .await
            .ok()?
            .json()
            .await
            .ok()?;
        (s["discovery"][0]["endpoints"] == 2).then(|| s["version"].as_u64().unwrap())
    })
    .await;
    for p in [&p1, &p2] {
        eventually("the proxy to serve the current version", || async {
            (p.version().await == current).then_some(())
        })
        .await;
    }
    let hits_a = backends[0].hits();
    let before_bc = backends[1].hits() + backends[2].hits();
    eventually("more traffic to b and c", || async {
        (backends[1].hits() + backends[2].hits() > before_bc + 100).then_some(())
    })
    .await;
    assert_eq!(
        backends[0].hits(),
        hits_a,
        "a was removed but still gets traffic"
    );
    let at_end = done.load(Ordering::Relaxed);
    eventually("more load after the last change", || async {
        (done.load(Ordering::Relaxed) > at_end + 500).then_some(())
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    for t in load {
        t.await.unwrap();
    }
    let total = done.load(Ordering::Relaxed);
    assert!(total > 100, "load ran: {total}");
    assert_eq!(failures.load(Ordering::Relaxed), 0, "of {total} requests");
    eprintln!("{total} requests through two fleet proxies during 3 endpoint changes, 0 failed");
    let status = cli(&["status"]);
    assert_eq!(status.matches(" ready ").count(), 2, "{status}");
    controller.kill().unwrap();
    controller.wait().unwrap();
}

/// A proxy silent for longer than `controller.forget_after` leaves the registry, the
/// store and the metrics, while live and revoked instances stay; when it comes back
/// with a join token it enrols again by itself and serves the current snapshot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_proxy_is_forgotten_and_enrols_again_when_it_comes_back() {
    common::init();
    let c = Controller::start_with_settings(
        WEB,
        true,
        "instance_timeout = \"1s\"\nforget_after = \"2s\"\n",
    )
    .await;
    let a = Backend::start("a").await;
    c.endpoints("web", "web", &[&a]);
    let token = rampart_controller::create_token(&c.config(), Duration::from_secs(600), true)
        .await
        .unwrap();
    let mut proxy = Proxy::start_fleet(&c.url(), Some(&token)).await;
    let first = proxy.status().await["fleet"]["instance"]
        .as_str()
        .unwrap()
        .to_string();

    // A live instance (heartbeats every 200 ms) and a revoked one, for contrast.
    let live = enrolled(&c).await;
    let live_id = live.identity.instance.clone();
    let beating = tokio::spawn(async move {
        let hb = Heartbeat {
            public_addrs: vec![],
            ready: true,
            version: 0,
            https_port: None,
            traffic: None,
        };
        loop {
            let _ = live.heartbeat(&hb).await;
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
    let revoked = enrolled(&c).await.identity.instance.clone();
    rampart_controller::revoke(&c.config(), &revoked)
        .await
        .unwrap();
    let known = |id: &str| c.state().fleet.registry.status().iter().any(|i| i.id == id);
    eventually("the controller to know the proxy", || async {
        known(&first).then_some(())
    })
    .await;

    // The proxy goes away for longer than forget_after.
    proxy.kill();
    eventually("the silent proxy to be forgotten", || async {
        (!known(&first)).then_some(())
    })
    .await;
    let store = c.dir.path().join("data");
    let stored = |id: &str| {
        walkdir(&store)
            .iter()
            .any(|p| p.ends_with(format!("instances/{id}")))
    };
    assert!(!stored(&first), "the record of {first} left the store");
    assert!(known(&live_id), "an instance that sends heartbeats is kept");
    assert!(stored(&live_id), "and so is its record");
    assert!(known(&revoked), "revoked instances are kept");
    assert_eq!(c.state().fleet.metrics.instances_forgotten.get(), 1);

    // It comes back with its old identity, is told it is not enrolled, and enrols
    // again with the (reusable) token it was started with.
    assert!(
        proxy.restart_fleet(&c.url(), Some(&token)).await,
        "log:\n{}",
        proxy.log()
    );
    let second = eventually("the proxy to enrol again", || async {
        let s = proxy.status().await;
        let id = s["fleet"]["instance"].as_str()?.to_string();
        (id != first && s["fleet"]["connected"] == true).then_some(id)
    })
    .await;
    eventually("the controller to hear from it", || async {
        known(&second).then_some(())
    })
    .await;
    assert!(
        proxy.log().contains("enrolling again with the join token"),
        "{}",
        proxy.log()
    );
    let client = Proxy::http_client();
    let r = client.get(proxy.url("/")).send().await.unwrap();
    assert_eq!(r.text().await.unwrap(), "a");
    beating.abort();
}

/// Every file under `dir`, recursively.
fn walkdir(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out
}

#[tokio::test]
async fn a_hosts_client_auth_reaches_fleet_proxies_in_the_snapshot() {
    common::init();
    let clients = common::pki::Pki::new("clients");
    clients.leaf("alice", &["alice.clients.test"], 1);
    let tls = format!(
        "[[tls]]\nhosts = [\"mtls.test\"]\nsource = \"internal\"\nclient_auth = {{ ca_file = {:?} }}\n",
        clients.ca_file()
    );
    let c = Controller::start(&format!("{tls}\n{WEB}")).await;
    let a = Backend::start("a").await;
    c.endpoints("web", "web", &[&a]);
    let proxy = Proxy::start_fleet(&c.url(), Some(&c.token().await)).await;
    let ca = std::fs::read(c.dir.path().join("data/ca/ca.pem")).unwrap();
    let client = |identity: bool| {
        let mut b = reqwest::Client::builder()
            .tls_certs_only([reqwest::Certificate::from_pem(&ca).unwrap()])
            .resolve("mtls.test", proxy.https);
        if identity {
            let dir = clients.dir.path();
            let mut pem = std::fs::read(dir.join("alice.pem")).unwrap();
            pem.extend(std::fs::read(dir.join("alice.key")).unwrap());
            b = b.identity(reqwest::Identity::from_pem(&pem).unwrap());
        }
        b.build().unwrap()
    };
    let url = format!("https://mtls.test:{}/headers", proxy.https.port());
    let alice = client(true);
    let headers: std::collections::HashMap<String, String> =
        eventually("the proxy to serve mtls.test", || async {
            alice.get(&url).send().await.ok()?.json().await.ok()
        })
        .await;
    assert_eq!(headers["x-client-cert-subject"], "CN=alice.clients.test");
    // The CA came in the snapshot: the proxy holds no such file of its own.
    assert!(
        client(false).get(&url).send().await.is_err(),
        "a client without a certificate was served"
    );
}

#[tokio::test]
async fn a_client_resumes_its_tls_session_on_another_proxy_of_the_fleet() {
    common::init();
    let c = Controller::start(&format!(
        "[[tls]]\nhosts = [\"a.test\"]\nsource = \"internal\"\n\n{WEB}"
    ))
    .await;
    let a = Backend::start("a").await;
    c.endpoints("web", "web", &[&a]);
    let token = || async {
        rampart_controller::create_token(&c.config(), Duration::from_secs(600), false)
            .await
            .unwrap()
    };
    let one = Proxy::start_fleet(&c.url(), Some(&token().await)).await;
    let two = Proxy::start_fleet(&c.url(), Some(&token().await)).await;
    let ca = std::fs::read(c.dir.path().join("data/ca/ca.pem")).unwrap();
    // Both proxies serve the snapshot with the keys.
    for p in [&one, &two] {
        eventually("the proxy to serve a.test over TLS", || async {
            let client = reqwest::Client::builder()
                .tls_certs_only([reqwest::Certificate::from_pem(&ca).unwrap()])
                .resolve("a.test", p.https)
                .build()
                .unwrap();
            client
                .get(format!("https://a.test:{}/", p.https.port()))
                .send()
                .await
                .ok()
                .filter(|r| r.status() == 200)
                .map(drop)
        })
        .await;
    }
    // 100 clients, each with its own session store: a full handshake on one proxy,
    // then a resumed one on the other, and back.
    let mut resumed = 0;
    for i in 0..100 {
        let client = common::resuming_client(&ca);
        let (first, second) = if i % 2 == 0 {
            (&one, &two)
        } else {
            (&two, &one)
        };
        assert!(!common::handshake_resumed(&client, first.https, "a.test").await);
        resumed += usize::from(common::handshake_resumed(&client, second.https, "a.test").await);
        resumed += usize::from(common::handshake_resumed(&client, first.https, "a.test").await);
    }
    assert_eq!(resumed, 200, "handshakes resumed across the fleet, of 200");

    // The keys are never shown: not in either /status, not in any log.
    let snapshot = rampart_proxy::fleet::load_cached(&one.dir.path().join("data")).unwrap();
    let keys = snapshot
        .session_tickets
        .expect("the snapshot carries ticket keys")
        .keys;
    assert_eq!(keys.len(), 3);
    let controller_status = reqwest::get(format!(
        "http://{}/status",
        c.handle.as_ref().unwrap().admin_addr.unwrap()
    ))
    .await
    .unwrap()
    .text()
    .await
    .unwrap();
    let shown = [
        controller_status,
        one.status().await.to_string(),
        one.log(),
        two.log(),
    ];
    for key in &keys {
        for text in &shown {
            assert!(!text.contains(key.as_str()), "a ticket key is shown");
        }
    }
}
