//! Short smoke runs of every subcommand against the built-in backend and a real
//! `rampart` (built by `cargo test --workspace` next to this binary). Bounded in time;
//! nothing here asserts on speed.
#![allow(missing_docs, clippy::unwrap_used)]

use std::io::BufRead;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

fn exe() -> &'static str {
    env!("CARGO_BIN_EXE_rampart-loadtest")
}

fn rampart() -> PathBuf {
    let p = PathBuf::from(exe()).with_file_name("rampart");
    assert!(
        p.exists(),
        "{} is missing: run the tests with `cargo test --workspace`, which builds it",
        p.display()
    );
    p
}

struct Backend(Child, String);

impl Drop for Backend {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn backend(extra: &[&str]) -> Backend {
    let mut child = Command::new(exe())
        .args(["backend", "--listen", "127.0.0.1:0"])
        .args(extra)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap()
        .to_string();
    Backend(child, addr)
}

fn json(path: &std::path::Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

#[test]
fn run_closed_loop_reports_requests_latency_and_json() {
    let b = backend(&[]);
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run.json");
    let status = Command::new(exe())
        .args([
            "run",
            "--url",
            &format!("http://{}/", b.1),
            "-c",
            "4",
            "-d",
            "300ms",
            "--json",
        ])
        .arg(&out)
        .status()
        .unwrap();
    assert!(status.success());
    let r = json(&out);
    assert_eq!(r["mode"], "closed");
    assert!(r["ok"].as_u64().unwrap() > 0);
    assert_eq!(r["errors"]["reset"], 0);
    assert!(r["latency_ms"]["p99"].as_f64().unwrap() >= r["latency_ms"]["p50"].as_f64().unwrap());
}

#[test]
fn run_open_loop_keeps_the_rate_and_counts_errors_by_class() {
    let b = backend(&["--fail-rate", "1.0"]);
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run.json");
    let status = Command::new(exe())
        .args([
            "run",
            "--url",
            &format!("http://{}/", b.1),
            "-c",
            "2",
            "-r",
            "200",
            "-d",
            "500ms",
            "--json",
        ])
        .arg(&out)
        .status()
        .unwrap();
    assert!(status.success());
    let r = json(&out);
    assert_eq!(r["mode"], "open");
    let sent = r["requests"].as_u64().unwrap();
    assert!(
        (90..=110).contains(&sent),
        "200 req/s for 0.5 s sends about 100 requests, sent {sent}"
    );
    assert_eq!(
        r["errors"]["status_5xx"].as_u64().unwrap(),
        sent,
        "every answer was a 500"
    );
}

#[test]
fn https_without_trust_settings_is_refused_with_a_hint() {
    let out = Command::new(exe())
        .args(["run", "--url", "https://127.0.0.1:1/", "-d", "1s"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--cacert"));
}

#[test]
fn swap_under_load_scenario_runs() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("swap.json");
    let status = Command::new(exe())
        .args([
            "scenario",
            "swap-under-load",
            "--swaps",
            "6",
            "--connections",
            "2",
            "--rampart",
        ])
        .arg(rampart())
        .arg("--json")
        .arg(&out)
        .status()
        .unwrap();
    assert!(status.success());
    let r = json(&out);
    assert_eq!(r["swaps"], 6);
    assert_eq!(r["failed_requests"], 0);
    // Requests flowed during the swaps on both kinds of connection (zero requests
    // would also have zero failures).
    for kind in ["keepalive", "new_conn"] {
        let ok = r[kind]["ok"].as_u64().unwrap();
        assert!(
            ok > 0,
            "no {kind} request was answered during the swaps: {r}"
        );
    }
}

#[test]
fn backend_churn_scenario_runs() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("churn.json");
    let status = Command::new(exe())
        .args([
            "scenario",
            "backend-churn",
            "--cycles",
            "2",
            "--interval",
            "200ms",
            "--connections",
            "2",
            "--rampart",
        ])
        .arg(rampart())
        .arg("--json")
        .arg(&out)
        .status()
        .unwrap();
    assert!(status.success());
    let r = json(&out);
    assert_eq!(r["cycles"], 2);
    assert!(r["time_to_traffic_ms"][2].as_f64().unwrap() > 0.0);
}

#[test]
fn compare_against_the_direct_backend_writes_markdown_json_and_svg() {
    let dir = tempfile::tempdir().unwrap();
    let (md, js) = (dir.path().join("bench.md"), dir.path().join("bench.json"));
    let status = Command::new(exe())
        .args([
            "compare",
            "--peers",
            "",
            "--rounds",
            "1",
            "--duration",
            "200ms",
            "--connections",
            "4",
            "--rate",
            "200",
            "--idle-conns",
            "20",
            "--rampart",
        ])
        .arg(rampart())
        .arg("--json")
        .arg(&js)
        .arg("--markdown")
        .arg(&md)
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success());
    let text = std::fs::read_to_string(&md).unwrap();
    for test in [
        "http",
        "https-keepalive",
        "https-new-conn",
        "h2",
        "body-16k",
        "open-loop",
        "open-loop-http",
    ] {
        assert!(
            text.contains(&format!("| {test} | rampart |")),
            "{test} missing from\n{text}"
        );
    }
    assert!(text.contains("| http | direct |"));
    assert!(std::fs::read_to_string(dir.path().join("bench.svg"))
        .unwrap()
        .contains("<svg"));
    let r = json(&js);
    assert_eq!(
        r["idle_rss_kb"]["rampart"][1], 20,
        "20 idle connections were held open"
    );
    let errors: u64 = r["samples"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            s["report"]["errors"]
                .as_object()
                .unwrap()
                .values()
                .map(|v| v.as_u64().unwrap())
                .sum::<u64>()
        })
        .sum();
    assert_eq!(errors, 0);
}
