//! Swarm discovery on the real engine (`docker swarm init` when it is not in a swarm,
//! left again at the end): a labelled service on an attachable overlay network, a
//! controller and a proxy in containers on that overlay (task addresses are reachable
//! only from there), the service scaled 1 → 3 → 1 while requests flow through the proxy.
#![allow(missing_docs, clippy::unwrap_used)]

mod common;

use std::collections::BTreeSet;
use std::os::unix::fs::PermissionsExt as _;
use std::process::Command;
use std::time::{Duration, Instant};

use common::engine::{
    answered_by, container_logs, docker, images, remove_network, unique_id, Load, SwarmMember,
};

const HOST: &str = "swarm.rampart.test";

/// Everything the test made on the engine, removed on drop (also when it fails).
struct Scene {
    id: String,
    /// Dropped after the scene's own clean-up.
    _swarm: SwarmMember,
}

impl Scene {
    fn name(&self, what: &str) -> String {
        format!("rampart-sw-{}-{what}", self.id)
    }
}

impl Drop for Scene {
    fn drop(&mut self) {
        let run = |args: &[&str]| {
            let _ = Command::new("docker").args(args).output();
        };
        run(&["service", "rm", &self.name("web")]);
        run(&["rm", "-f", &self.name("controller"), &self.name("proxy")]);
        run(&["volume", "rm", &self.name("join")]);
        remove_network(&self.name("net"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_swarm_service_is_discovered_by_its_tasks_and_scales_under_load() {
    common::init();
    let images = images();
    let scene = Scene {
        id: unique_id(),
        _swarm: SwarmMember::join(),
    };
    let net = scene.name("net");
    docker(&["network", "create", "-d", "overlay", "--attachable", &net]);
    docker(&[
        "service",
        "create",
        "-d",
        "--no-resolve-image",
        "--name",
        &scene.name("web"),
        "--network",
        &net,
        "--replicas",
        "1",
        "--stop-grace-period",
        "2s",
        "--label",
        "rampart.enable=true",
        "--label",
        "rampart.pool.web.port=8080",
        "--label",
        &format!("rampart.route.web.host={HOST}"),
        &images.backend,
    ]);

    // The controller, in a container on the overlay, reads the swarm's services.
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let config = dir.path().join("controller.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\ndata_dir = \"/var/lib/rampart\"\n[controller]\nlisten = \"0.0.0.0:9443\"\nadmin = \"0.0.0.0:9901\"\nnames = [\"{}\"]\njoin_token_file = \"/run/rampart/join-token\"\nwatch_timeout = \"2s\"\n\n[[discovery.swarm]]\n",
            scene.name("controller")
        ),
    )
    .unwrap();
    std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o644)).unwrap();
    let gid = {
        use std::os::unix::fs::MetadataExt as _;
        std::fs::metadata("/var/run/docker.sock")
            .unwrap()
            .gid()
            .to_string()
    };
    let join = format!("{}:/run/rampart", scene.name("join"));
    docker(&[
        "run",
        "-d",
        "--name",
        &scene.name("controller"),
        "--network",
        &net,
        "--group-add",
        &gid,
        "-v",
        "/var/run/docker.sock:/var/run/docker.sock:ro",
        "-v",
        &format!("{}:/etc/rampart/controller.toml:ro", config.display()),
        "-v",
        &join,
        "-p",
        "127.0.0.1::9901",
        &images.rampart,
        "controller",
        "--config",
        "/etc/rampart/controller.toml",
    ]);
    docker(&[
        "run",
        "-d",
        "--name",
        &scene.name("proxy"),
        "--network",
        &net,
        "-v",
        &format!("{join}:ro"),
        "-p",
        "127.0.0.1::8080",
        &images.rampart,
        "proxy",
        &format!("--controller=https://{}:9443", scene.name("controller")),
        "--join-token-file=/run/rampart/join-token",
        "--data-dir=/var/lib/rampart",
        "--http=0.0.0.0:8080",
        "--https=0.0.0.0:8443",
        "--admin=0.0.0.0:9900",
    ]);
    let port = |container: &str, port: &str| -> u16 {
        docker(&["port", container, port])
            .lines()
            .next()
            .unwrap()
            .rsplit(':')
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    let proxy_port = port(&scene.name("proxy"), "8080");
    let admin = port(&scene.name("controller"), "9901");
    let logs = || container_logs(&scene.name("controller"));

    // Who answers through the proxy: each task names itself (its container's host name).
    let client = reqwest::Client::new();
    let who = || {
        answered_by(
            client
                .get(format!("http://127.0.0.1:{proxy_port}/"))
                .header("host", HOST),
        )
    };
    let answering = |want: usize, what: &'static str| {
        let who = &who;
        let logs = &logs;
        async move {
            let start = Instant::now();
            let mut seen = BTreeSet::new();
            let mut last = Instant::now();
            loop {
                if let Some(name) = who().await {
                    if seen.insert(name) {
                        last = Instant::now();
                    }
                }
                // All `want` tasks answered, and no new name for a while.
                if seen.len() == want && last.elapsed() > Duration::from_millis(500) {
                    return (seen, start.elapsed());
                }
                assert!(
                    start.elapsed() < Duration::from_secs(90),
                    "{what}: answered by {seen:?}, want {want} tasks; controller status: {}\n{}",
                    reqwest::get(format!("http://127.0.0.1:{admin}/status"))
                        .await
                        .map(|r| r.status().to_string())
                        .unwrap_or_default(),
                    logs()
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    let (first, t) = answering(1, "the first task").await;
    eprintln!(
        "swarm: 1 task serving through the proxy {:.2}s in",
        t.as_secs_f64()
    );

    let load = Load::start(
        &format!("http://{HOST}/"),
        ([127, 0, 0, 1], proxy_port).into(),
        4,
        100,
    );
    let scaled = Instant::now();
    docker(&[
        "service",
        "scale",
        "-d",
        &format!("{}=3", scene.name("web")),
    ]);
    let (three, _) = answering(3, "scaled to 3").await;
    eprintln!(
        "swarm: scaled 1 -> 3, all 3 tasks answered {:.2}s after `service scale`",
        scaled.elapsed().as_secs_f64()
    );
    assert!(three.is_superset(&first));

    // Back to 1: tasks told to shut down leave the pool before their containers stop.
    docker(&[
        "service",
        "scale",
        "-d",
        &format!("{}=1", scene.name("web")),
    ]);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let status: serde_json::Value = reqwest::get(format!("http://127.0.0.1:{admin}/status"))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let endpoints: u64 = status["discovery"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["endpoints"].as_u64().unwrap())
            .sum();
        if endpoints == 1 {
            break;
        }
        assert!(Instant::now() < deadline, "not scaled down: {status}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Past the stop grace period, so the stopped tasks are gone for good.
    let gone = Instant::now();
    while docker(&[
        "service",
        "ps",
        "-q",
        "--filter",
        "desired-state=running",
        &scene.name("web"),
    ])
    .lines()
    .count()
        > 1
        || gone.elapsed() < Duration::from_secs(3)
    {
        assert!(gone.elapsed() < Duration::from_secs(30));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (requests, failed, errors) = load.stop();
    eprintln!("swarm: scale 1 -> 3 -> 1 under load: {failed} of {requests} requests failed");
    assert!(requests > 300, "{requests}");
    assert_eq!(failed, 0, "{errors}\n{}", logs());
}
