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
            }
        })
        .clone()
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
