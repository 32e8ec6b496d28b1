//! The Docker engine in tests: the `docker` CLI, Compose (v2 plugin or v1), and the
//! FROM-scratch images that `deploy/docker/build-images` makes from this build's binaries
//! (once per test process; content-tagged, so reruns build nothing).

use std::path::Path;
use std::process::Command;
use std::sync::OnceLock;

/// Runs `docker args`, returning stdout; panics with stderr on failure.
pub fn docker(args: &[&str]) -> String {
    let out = Command::new("docker")
        .args(args)
        .output()
        .expect("docker (the engine runs on every development and CI machine)");
    assert!(
        out.status.success(),
        "docker {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// The Compose command: `docker compose` (v2) when present, else `docker-compose` (v1,
/// Debian's package).
pub fn compose() -> Command {
    let v2 = Command::new("docker")
        .args(["compose", "version"])
        .output()
        .is_ok_and(|o| o.status.success());
    if v2 {
        let mut c = Command::new("docker");
        c.arg("compose");
        c
    } else {
        Command::new("docker-compose")
    }
}

/// Image tags made by `deploy/docker/build-images`.
#[derive(Debug, Clone)]
pub struct Images {
    /// `rampart` (proxy and controller).
    pub rampart: String,
    /// `rampart-loadtest backend`.
    pub backend: String,
    /// moto's Route53.
    pub moto: String,
    /// Prometheus (Debian's binary).
    pub prometheus: String,
    /// pebble (Debian's binary, the Compose stack's ACME CA).
    pub pebble: String,
    /// The CA of pebble's API certificate in that image.
    pub pebble_api_ca: std::path::PathBuf,
}

/// Builds (or finds) the images for this build's binaries.
pub fn images() -> Images {
    static IMAGES: OnceLock<Images> = OnceLock::new();
    IMAGES
        .get_or_init(|| {
            let bin = Path::new(env!("CARGO_BIN_EXE_rampart"));
            let profile_dir = bin.parent().unwrap();
            let profile = profile_dir.file_name().unwrap().to_str().unwrap();
            let target = profile_dir.parent().unwrap();
            let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/docker/build-images");
            let out = Command::new(&script)
                .args(["--profile", profile, "--target-dir"])
                .arg(target)
                .output()
                .unwrap_or_else(|e| panic!("{}: {e}", script.display()));
            assert!(
                out.status.success(),
                "{}: {}",
                script.display(),
                String::from_utf8_lossy(&out.stderr)
            );
            let text = String::from_utf8(out.stdout).unwrap();
            let tag = |name: &str| {
                text.lines()
                    .find_map(|l| l.strip_prefix(&format!("{name} ")))
                    .unwrap_or_else(|| panic!("build-images printed no {name} image: {text}"))
                    .to_string()
            };
            Images {
                rampart: tag("rampart"),
                backend: tag("backend"),
                moto: tag("moto"),
                prometheus: tag("prometheus"),
                pebble: tag("pebble"),
                pebble_api_ca: target.join("rampart-images/pebble-tls/ca.pem"),
            }
        })
        .clone()
}

/// Who answered `request` with a 200: the `x-backend` name the test backend sends (its
/// container's host name, i.e. the first 12 characters of its id).
pub async fn answered_by(request: reqwest::RequestBuilder) -> Option<String> {
    let r = request.send().await.ok()?;
    if r.status() != 200 {
        return None;
    }
    Some(r.headers().get("x-backend")?.to_str().ok()?.to_string())
}

/// A short random id for names of networks, projects and containers.
pub fn unique_id() -> String {
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    rampart_pki::sha256_hex(format!("{nanos}-{}-{n}", std::process::id()).as_bytes())[..10]
        .to_string()
}

/// The address of `container` on its (first) network.
pub fn container_ip(container: &str) -> std::net::IpAddr {
    docker(&[
        "inspect",
        "-f",
        "{{range .NetworkSettings.Networks}}{{.IPAddress}} {{end}}",
        container,
    ])
    .split_whitespace()
    .next()
    .unwrap_or_else(|| panic!("{container} has no address"))
    .parse()
    .unwrap()
}

/// `rampart-loadtest run` of `url` through `connect_to` at `rate` requests/s until
/// stopped (`--insecure` for https).
pub struct Load {
    child: std::process::Child,
    report: tempfile::NamedTempFile,
}

impl Load {
    pub fn start(
        url: &str,
        connect_to: std::net::SocketAddr,
        connections: usize,
        rate: u32,
    ) -> Self {
        let report = tempfile::NamedTempFile::new().unwrap();
        let bin = Path::new(env!("CARGO_BIN_EXE_rampart")).with_file_name("rampart-loadtest");
        let child = Command::new(bin)
            .args(["run", "--insecure", "--url", url])
            .args(["--connect-to", &connect_to.to_string()])
            .args(["--connections", &connections.to_string()])
            .args(["--rate", &rate.to_string(), "--duration", "300s"])
            .arg("--json")
            .arg(report.path())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        Self { child, report }
    }

    /// Stops the load; returns (requests, failed, the errors by class).
    pub fn stop(mut self) -> (u64, u64, serde_json::Value) {
        let _ = Command::new("kill")
            .args(["-INT", &self.child.id().to_string()])
            .status();
        assert!(self.child.wait().unwrap().success());
        let r: serde_json::Value =
            serde_json::from_slice(&std::fs::read(self.report.path()).unwrap()).unwrap();
        let requests = r["requests"].as_u64().unwrap();
        (
            requests,
            requests - r["ok"].as_u64().unwrap(),
            r["errors"].clone(),
        )
    }
}

/// When the engine started `container` (Unix seconds).
pub fn started_unix(container: &str) -> f64 {
    let at = docker(&["inspect", "-f", "{{.State.StartedAt}}", container]);
    let out = Command::new("date")
        .args(["-d", &at, "+%s.%N"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
}

pub fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// This engine as a swarm manager for a test: `docker swarm init` when it is in no swarm,
/// and `swarm leave` again on drop (nothing is left when the engine was already in one).
pub struct SwarmMember {
    left: bool,
}

impl SwarmMember {
    /// Joins (initialises) a swarm on loopback unless the engine is in one already.
    pub fn join() -> Self {
        let state = docker(&["info", "-f", "{{.Swarm.LocalNodeState}}"]);
        let left = state == "inactive";
        if left {
            docker(&["swarm", "init", "--advertise-addr", "127.0.0.1"]);
        }
        Self { left }
    }
}

impl Drop for SwarmMember {
    fn drop(&mut self) {
        if self.left {
            for args in [
                &["swarm", "leave", "--force"][..],
                &["network", "rm", "docker_gwbridge"],
            ] {
                let _ = Command::new("docker").args(args).output();
            }
        }
    }
}

/// Removes a network, retrying while the engine still detaches containers from it
/// (task containers go away asynchronously).
pub fn remove_network(name: &str) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while Command::new("docker")
        .args(["network", "rm", name])
        .output()
        .is_ok_and(|o| !o.status.success())
        && std::time::Instant::now() < deadline
    {
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

/// The last 30 lines `container` logged (stdout and stderr), for failure messages.
pub fn container_logs(container: &str) -> String {
    let out = Command::new("docker")
        .args(["logs", "--tail", "30", container])
        .output()
        .unwrap();
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}
