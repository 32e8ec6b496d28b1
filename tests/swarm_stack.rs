//! `deploy/swarm/stack.yaml` as an operator deploys it (`docker stack deploy`, on a swarm
//! made for the test when the engine is in none): the global proxy service serves HTTPS
//! on its host-mode port with the controller's internal-CA certificate, both web tasks
//! answer, a rolling update of the web service under load fails no request, and
//! `docker stack rm` leaves no service, container or network behind.
#![allow(missing_docs, clippy::unwrap_used)]

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::engine::{
    answered_by, container_logs, docker, images, remove_network, unique_id, Load, SwarmMember,
};

const NAME: &str = "www.rampart.test";

/// A deployed stack, removed with its volumes on drop (also when the test fails).
struct Stack {
    name: String,
    /// Dropped after the stack is removed.
    _swarm: SwarmMember,
}

impl Stack {
    fn label(&self) -> String {
        format!("label=com.docker.stack.namespace={}", self.name)
    }

    /// The running container of `service`'s (first) task.
    fn container(&self, service: &str) -> String {
        let filter = format!(
            "label=com.docker.swarm.service.name={}_{service}",
            self.name
        );
        let ids = docker(&["ps", "-q", "--filter", &filter]);
        ids.lines().next().unwrap_or_default().to_string()
    }

    fn controller_logs(&self) -> String {
        container_logs(&self.container("controller"))
    }

    /// Waits until no container of the stack is left.
    fn wait_gone(&self) -> bool {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !docker(&["ps", "-aq", "--filter", &self.label()]).is_empty() {
            if Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        true
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        let _ = Command::new("docker")
            .args(["stack", "rm", &self.name])
            .output();
        self.wait_gone();
        remove_network(&format!("{}_edge", self.name));
        let _ = Command::new("docker")
            .args(["secret", "rm", &format!("{}-join-token", self.name)])
            .output();
        for volume in ["controller-data", "join"] {
            let _ = Command::new("docker")
                .args(["volume", "rm", &format!("{}_{volume}", self.name)])
                .output();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_swarm_stack_serves_https_and_rolls_backends_without_failing_a_request() {
    common::init();
    let images = images();
    let stack = Stack {
        name: format!("rampart-st-{}", unique_id()),
        _swarm: SwarmMember::join(),
    };
    let (admin, http, https) = (
        common::free_addr().port(),
        common::free_addr().port(),
        common::free_addr().port(),
    );
    let file = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/swarm/stack.yaml");
    let gid = {
        use std::os::unix::fs::MetadataExt as _;
        std::fs::metadata("/var/run/docker.sock")
            .unwrap()
            .gid()
            .to_string()
    };
    let deployed = Instant::now();
    let out = Command::new("docker")
        .args(["stack", "deploy", "--resolve-image", "never", "-c"])
        .arg(&file)
        .arg(&stack.name)
        .env("RAMPART_IMAGE", &images.rampart)
        .env("RAMPART_BACKEND_IMAGE", &images.backend)
        .env("DOCKER_GID", gid)
        .env("RAMPART_ADMIN_PORT", admin.to_string())
        .env("RAMPART_HTTP_PORT", http.to_string())
        .env("RAMPART_HTTPS_PORT", https.to_string())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "stack deploy: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    // The clients trust only the controller's internal CA (from its data volume).
    let ca = common::eventually("the controller's internal CA", || async {
        let container = stack.container("controller");
        let dir = tempfile::tempdir().ok()?;
        let copied = Command::new("docker")
            .args(["cp", &format!("{container}:/var/lib/rampart/ca/ca.pem")])
            .arg(dir.path())
            .output()
            .ok()?;
        copied.status.success().then_some(())?;
        std::fs::read(dir.path().join("ca.pem")).ok()
    })
    .await;
    let client = reqwest::Client::builder()
        .tls_certs_only([reqwest::Certificate::from_pem(&ca).unwrap()])
        .resolve(NAME, ([127, 0, 0, 1], https).into())
        .build()
        .unwrap();
    let who = || answered_by(client.get(format!("https://{NAME}:{https}/")));

    // Both web tasks answer through the proxy's host-mode port.
    let answering = |want: usize, what: &'static str| {
        let who = &who;
        let stack = &stack;
        async move {
            let start = Instant::now();
            let mut seen = BTreeSet::new();
            while seen.len() < want {
                if let Some(name) = who().await {
                    seen.insert(name);
                }
                assert!(
                    start.elapsed() < Duration::from_secs(90),
                    "{what}: answered by {seen:?}, want {want}; controller log:\n{}",
                    stack.controller_logs()
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            seen
        }
    };
    let first = answering(2, "both web tasks").await;
    eprintln!(
        "swarm stack: HTTPS through the global proxy, both web tasks answering, {:.2}s after `stack deploy`",
        deployed.elapsed().as_secs_f64()
    );
    let status: serde_json::Value = reqwest::get(format!("http://127.0.0.1:{admin}/status"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let ready = status["instances"]
        .as_array()
        .map_or(0, |a| a.iter().filter(|i| i["state"] == "ready").count());
    assert_eq!(ready, 1, "one node, one global proxy: {status}");

    // A rolling update (start-first) replaces both tasks while requests flow.
    let load = Load::start(
        &format!("https://{NAME}/"),
        ([127, 0, 0, 1], https).into(),
        4,
        100,
    );
    let updated = Instant::now();
    let web = format!("{}_web", stack.name);
    docker(&["service", "update", "-d", "--force", &web]);
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut now_serving;
    loop {
        // Past the old tasks' stop grace period, the new ones alone answer.
        now_serving = BTreeSet::new();
        for _ in 0..20 {
            if let Some(name) = who().await {
                now_serving.insert(name);
            }
        }
        // Done when only the two new tasks' containers are left (the old ones ran out
        // their stop grace period while the load went on).
        let containers = docker(&[
            "ps",
            "-q",
            "--filter",
            &format!("label=com.docker.swarm.service.name={web}"),
        ])
        .lines()
        .count();
        if containers == 2 && now_serving.len() == 2 && now_serving.is_disjoint(&first) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "rolling update: answered by {now_serving:?} (before: {first:?})"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    eprintln!(
        "swarm stack: rolling update of web done in {:.2}s",
        updated.elapsed().as_secs_f64()
    );
    let (requests, failed, errors) = load.stop();
    eprintln!("swarm stack: rolling update under load: {failed} of {requests} requests failed");
    assert!(requests > 300, "{requests}");
    assert_eq!(failed, 0, "{errors}\n{}", stack.controller_logs());

    // The multi-node recipe of deploy/swarm/README.md: the join token as a Docker secret
    // instead of the node-local volume; the replaced proxy enrols with it and serves.
    let token = docker(&[
        "exec",
        &stack.container("controller"),
        "rampart",
        "controller",
        "--config",
        "/etc/rampart/controller.toml",
        "token",
        "create",
        "--reusable",
        "--ttl",
        "1h",
    ]);
    let secret = format!("{}-join-token", stack.name);
    let mut create = Command::new("docker")
        .args(["secret", "create", &secret, "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut create.stdin.take().unwrap(), token.as_bytes()).unwrap();
    assert!(create.wait().unwrap().success());
    let old_proxy = stack.container("proxy");
    docker(&[
        "service",
        "update",
        "-d",
        "--mount-rm",
        "/run/rampart",
        "--secret-add",
        &format!("source={secret},target=/run/rampart/join-token,uid=65532,mode=0400"),
        &format!("{}_proxy", stack.name),
    ]);
    let switched = Instant::now();
    // (The old proxy first drains for up to its stop grace period.)
    loop {
        let container = stack.container("proxy");
        if !container.is_empty() && container != old_proxy && who().await.is_some() {
            break;
        }
        assert!(
            switched.elapsed() < Duration::from_secs(60),
            "no proxy enrolled with the secret's token; controller log:\n{}",
            stack.controller_logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!(
        "swarm stack: proxy replaced to enrol with a Docker secret, serving again {:.2}s later",
        switched.elapsed().as_secs_f64()
    );

    // `stack rm` leaves no service, container or network (volumes stay, as Docker keeps
    // them: the controller's store survives a redeploy).
    docker(&["stack", "rm", &stack.name]);
    assert!(stack.wait_gone(), "containers left after stack rm");
    assert!(docker(&["service", "ls", "-q", "--filter", &stack.label()]).is_empty());
    let deadline = Instant::now() + Duration::from_secs(30);
    while !docker(&["network", "ls", "-q", "--filter", &stack.label()]).is_empty() {
        assert!(Instant::now() < deadline, "networks left after stack rm");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
