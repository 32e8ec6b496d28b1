//! Docker discovery against the real engine: a backend image built FROM scratch with our
//! own binary (no registry), labelled containers on a network the test creates, a real
//! controller and a real fleet proxy routing to them as they come and go.
#![allow(missing_docs, clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::engine::{answered_by, docker, images, started_unix, unique_id, unix_now, Load};
use common::{eventually, Proxy};

/// A network and the containers on it, removed on drop (even when the test fails).
struct Scene {
    network: String,
    label: String,
}

impl Scene {
    fn new() -> Self {
        let id = &unique_id();
        let network = format!("rampart-test-{id}");
        docker(&["network", "create", &network]);
        Self {
            network,
            label: format!("rampart-test.scene={id}"),
        }
    }

    /// Starts a container of `image` with `labels`; returns its id.
    fn run(&self, name: &str, image: &str, labels: &[&str]) -> String {
        let mut args = vec![
            "run".to_string(),
            "-d".into(),
            "--network".into(),
            self.network.clone(),
            "--name".into(),
            format!("{}-{name}", self.network),
            "--label".into(),
            self.label.clone(),
        ];
        for l in labels {
            args.push("--label".into());
            args.push((*l).to_string());
        }
        args.push(image.to_string());
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        docker(&args)
    }
}

impl Drop for Scene {
    fn drop(&mut self) {
        let ids = Command::new("docker")
            .args(["ps", "-aq", "--filter", &format!("label={}", self.label)])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).to_string())
            .unwrap_or_default();
        for id in ids.split_whitespace() {
            let _ = Command::new("docker").args(["rm", "-f", id]).output();
        }
        let _ = Command::new("docker")
            .args(["network", "rm", &self.network])
            .output();
    }
}

/// Endpoints discovery sees now, over every provider.
fn endpoint_count(state: &rampart_controller::State) -> usize {
    state.status().discovery.iter().map(|p| p.endpoints).sum()
}

const WEB: &[&str] = &[
    "rampart.enable=true",
    "rampart.pool.web.port=8080",
    "rampart.route.site.host=web.rampart.test",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn labelled_containers_become_routes_and_follow_the_engine() {
    common::init();
    let image = images().backend;
    let scene = Scene::new();
    scene.run("web-1", &image, WEB);
    scene.run("web-2", &image, WEB);
    // A container with a bad label: reported, and it breaks nothing else.
    scene.run(
        "bad",
        &image,
        &["rampart.enable=true", "rampart.pool.api.port=eighty"],
    );

    let dir = tempfile::tempdir().unwrap();
    let (handle, proxy) = controller_and_proxy(&scene, dir.path()).await;
    let state = handle.state.clone();
    let endpoints = endpoint_count;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while endpoints(&state) != 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "not discovered: {:?}\n{}",
            state.status().discovery,
            docker(&["ps", "-a", "--filter", &format!("label={}", scene.label)])
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let errors = state.discovery_errors();
    assert!(
        errors
            .iter()
            .any(|e| e.contains("-bad") && e.contains("rampart.pool.api.port")),
        "{errors:?}"
    );

    let client = reqwest::Client::new();
    let get = || async {
        client
            .get(format!("http://{}/", proxy.http))
            .header("host", "web.rampart.test")
            .send()
            .await
            .ok()
            .map(|r| r.status().as_u16())
    };
    eventually("the proxy to route to the containers", || async {
        (get().await == Some(200)).then_some(())
    })
    .await;

    // One container goes: the route keeps answering from the other.
    docker(&["kill", &format!("{}-web-1", scene.network)]);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while endpoints(&state) != 1 {
        assert!(
            std::time::Instant::now() < deadline,
            "the killed container is still in the pool: {:?}",
            state.status().discovery
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for _ in 0..20 {
        assert_eq!(get().await, Some(200));
    }
    // A new one joins.
    scene.run("web-3", &image, WEB);
    eventually("the new container to join", || async {
        (endpoints(&state) == 2).then_some(())
    })
    .await;
    // Every container of the service goes (a redeploy): the route stays for a while
    // with an empty pool, and clients are told to come back.
    docker(&["kill", &format!("{}-web-2", scene.network)]);
    docker(&["kill", &format!("{}-web-3", scene.network)]);
    eventually("the pool to empty", || async {
        (endpoints(&state) == 0).then_some(())
    })
    .await;
    let r = eventually("a 503 for the emptied pool", || async {
        let r = client
            .get(format!("http://{}/", proxy.http))
            .header("host", "web.rampart.test")
            .send()
            .await
            .ok()?;
        (r.status() == 503).then_some(r)
    })
    .await;
    assert!(r.headers().contains_key("retry-after"), "{:?}", r.headers());
    drop(proxy);
    handle.shutdown().await;
}

/// A Unix socket forwarding to the real engine's, which the test can cut and restore
/// (the engine "goes away" without stopping the machine's Docker).
struct EngineLink {
    path: PathBuf,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl EngineLink {
    fn new(path: PathBuf) -> Self {
        let mut link = Self { path, task: None };
        link.up();
        link
    }

    fn up(&mut self) {
        let _ = std::fs::remove_file(&self.path);
        let listener = tokio::net::UnixListener::bind(&self.path).unwrap();
        self.task = Some(tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            while let Ok((mut client, _)) = listener.accept().await {
                conns.spawn(async move {
                    if let Ok(mut engine) =
                        tokio::net::UnixStream::connect("/var/run/docker.sock").await
                    {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut engine).await;
                    }
                });
            }
        }));
    }

    /// Closes the socket and every connection through it.
    fn down(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

impl Drop for EngineLink {
    fn drop(&mut self) {
        self.down();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_engine_that_goes_away_keeps_the_last_good_state_and_resyncs() {
    common::init();
    let image = images().backend;
    let scene = Scene::new();
    scene.run("web-1", &image, WEB);
    scene.run("web-2", &image, WEB);
    let dir = tempfile::tempdir().unwrap();
    let mut link = EngineLink::new(dir.path().join("engine.sock"));
    let text = format!(
        "[server]\ndata_dir = {:?}\n[controller]\nlisten = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\n\n[[discovery.docker]]\nsocket = \"unix://{}\"\nnetwork = \"{}\"\n",
        dir.path().join("data"),
        dir.path().join("engine.sock").display(),
        scene.network
    );
    let config = rampart_config::parse(&text, "docker-test.toml").unwrap();
    let handle = rampart_controller::start(config, None).await.unwrap();
    let state = handle.state.clone();
    let discovered = |state: &rampart_controller::State| {
        state
            .status()
            .discovery
            .first()
            .map(|p| (p.endpoints, p.errors.clone()))
            .unwrap_or_default()
    };
    eventually("both containers discovered", || async {
        (discovered(&state).0 == 2).then_some(())
    })
    .await;

    // The engine goes away: the last good containers stay, and the error says why.
    link.down();
    eventually("the provider to notice", || async {
        let (n, errors) = discovered(&state);
        (n == 2 && errors.iter().any(|e| e.starts_with("docker "))).then_some(())
    })
    .await;
    // Meanwhile a container dies, unseen.
    docker(&["kill", &format!("{}-web-1", scene.network)]);

    // It comes back: a resync sees the change and clears the error.
    link.up();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let (n, errors) = discovered(&state);
        if n == 1 && errors.is_empty() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no resync: {n} endpoints, errors {errors:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    handle.shutdown().await;
}

/// Starts a controller watching `scene`'s network and a fleet proxy it feeds.
async fn controller_and_proxy(scene: &Scene, dir: &Path) -> (rampart_controller::Handle, Proxy) {
    let text = format!(
        "[server]\ndata_dir = {:?}\n[controller]\nlisten = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\nwatch_timeout = \"2s\"\n\n[[discovery.docker]]\nnetwork = \"{}\"\n",
        dir.join("data"),
        scene.network
    );
    let config = rampart_config::parse(&text, "docker-test.toml").unwrap();
    let handle = rampart_controller::start(config.clone(), None)
        .await
        .unwrap();
    let token = rampart_controller::create_token(&config, Duration::from_secs(600), false)
        .await
        .unwrap();
    let proxy = Proxy::start_fleet(&format!("https://{}", handle.fleet_addr), Some(&token)).await;
    (handle, proxy)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_service_scales_1_4_1_under_load_without_a_failed_request() {
    common::init();
    let image = images().backend;
    let scene = Scene::new();
    let first = scene.run("web-1", &image, WEB);
    let dir = tempfile::tempdir().unwrap();
    let (handle, proxy) = controller_and_proxy(&scene, dir.path()).await;
    let client = reqwest::Client::new();
    // Who answers: the backend names itself (its container's host name = id prefix).
    let who = |client: reqwest::Client| {
        answered_by(
            client
                .get(format!("http://{}/", proxy.http))
                .header("host", "web.rampart.test"),
        )
    };
    eventually("the first backend to serve", || async {
        who(client.clone()).await.filter(|n| first.starts_with(n))
    })
    .await;

    let load = Load::start("http://web.rampart.test/", proxy.http, 8, 200);
    // 1 -> 4: each new container's first answer, from the time the engine started it.
    // A watcher asks "who answers?" all along and notes each name's first answer.
    let first_answer = std::sync::Arc::new(std::sync::Mutex::new(std::collections::HashMap::<
        String,
        f64,
    >::new()));
    let watcher = tokio::spawn({
        let first_answer = first_answer.clone();
        let client = client.clone();
        let url = format!("http://{}/", proxy.http);
        async move {
            loop {
                let name = answered_by(client.get(&url).header("host", "web.rampart.test")).await;
                if let Some(name) = name {
                    first_answer
                        .lock()
                        .unwrap()
                        .entry(name)
                        .or_insert_with(unix_now);
                }
            }
        }
    });
    let added: Vec<String> = (2..=4)
        .map(|i| scene.run(&format!("web-{i}"), &image, WEB))
        .collect();
    let seen = |id: &str| {
        first_answer
            .lock()
            .unwrap()
            .iter()
            .find(|(name, _)| id.starts_with(name.as_str()))
            .map(|(_, at)| *at)
    };
    eventually("every new container to get traffic", || async {
        added.iter().all(|id| seen(id).is_some()).then_some(())
    })
    .await;
    watcher.abort();
    let mut delays: Vec<f64> = added
        .iter()
        .map(|id| seen(id).unwrap() - started_unix(id))
        .collect();
    delays.sort_by(f64::total_cmp);
    eprintln!(
        "container started -> first request through the proxy: p50 {:.3}s, max {:.3}s ({} containers)",
        delays[delays.len() / 2],
        delays[delays.len() - 1],
        delays.len()
    );
    assert!(
        delays[delays.len() - 1] < 5.0,
        "{delays:?}; proxy log:\n{}",
        proxy.log()
    );

    // 4 -> 1, as a scale-down does it: stop (SIGTERM, then SIGKILL after 2 s). The
    // stopping containers get no new requests from the moment the engine signals them.
    let mut args = vec!["stop", "-t", "2"];
    args.extend(added.iter().map(String::as_str));
    docker(&args);
    eventually("the pool to shrink to one", || async {
        (endpoint_count(&handle.state) == 1).then_some(())
    })
    .await;
    let (requests, failed, errors) = load.stop();
    eprintln!("scale 1 -> 4 -> 1 under load: {requests} requests, {failed} failed ({errors})");
    assert!(requests > 400, "{requests}");
    assert_eq!(failed, 0, "{errors}; proxy log:\n{}", proxy.log());

    // SIGKILL one of two under load: only what was in flight on it may fail.
    let victim = scene.run("web-5", &image, WEB);
    eventually("the second backend to serve", || async {
        who(client.clone())
            .await
            .filter(|n| victim.starts_with(n))
            .map(|_| ())
    })
    .await;
    let connections = 8;
    let load = Load::start("http://web.rampart.test/", proxy.http, connections, 400);
    // The victim must carry load-generator traffic before it dies, or a test without
    // any failure would prove nothing: its endpoint's request count in /status.
    let victim_ip = docker(&[
        "inspect",
        "-f",
        "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}",
        &victim,
    ]);
    let served = |status: &serde_json::Value| -> u64 {
        status["pools"]["web"]["endpoints"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|e| {
                e["resolved"]
                    .as_str()
                    .is_some_and(|r| r.starts_with(&format!("{victim_ip}:")))
            })
            .filter_map(|e| e["requests"].as_u64())
            .sum()
    };
    let before_kill = eventually("the victim to serve load-generator traffic", || async {
        let n = served(&proxy.status().await);
        (n >= 50).then_some(n)
    })
    .await;
    docker(&["kill", &victim]);
    eventually("the pool to shrink to one", || async {
        (endpoint_count(&handle.state) == 1).then_some(())
    })
    .await;
    // A few more requests after the pool shrank, then stop.
    for _ in 0..20 {
        assert!(who(client.clone()).await.is_some());
    }
    let (requests, failed, errors) = load.stop();
    eprintln!(
        "SIGKILL of 1 of 2 backends under load: {failed} of {requests} requests failed ({errors}); the victim had served {before_kill}"
    );
    assert!(
        failed <= connections as u64,
        "more failures than requests in flight: {failed} > {connections}: {errors}"
    );
    drop(proxy);
    handle.shutdown().await;
}
