//! The deployment artefacts, tried with the tools operators run: the systemd units pass
//! `systemd-analyze verify` (and stay hardened), the Prometheus configuration and
//! rules pass `promtool check`, and the alert rules' unit tests pass `promtool test`.
//! (The images and the Compose stack are run for real in tests/compose.rs.)
#![allow(missing_docs, clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::Command;

fn deploy(dir: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("deploy")
        .join(dir)
}

/// Runs `cmd args` in `dir`; panics with its output unless it succeeds.
fn run(dir: &Path, cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd)
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("{cmd}: {e} (scripts/setup installs it)"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{cmd} {}:\n{text}", args.join(" "));
    text
}

#[test]
fn systemd_units_verify_and_are_hardened() {
    let dir = tempfile::tempdir().unwrap();
    for unit in ["rampart-proxy.service", "rampart-controller.service"] {
        let text = std::fs::read_to_string(deploy("systemd").join(unit)).unwrap();
        for option in [
            "NoNewPrivileges=yes",
            "ProtectSystem=strict",
            "User=rampart",
            "ExecReload=/bin/kill -HUP $MAINPID",
        ] {
            assert!(text.contains(option), "{unit} lacks {option}");
        }
        // verify checks that ExecStart's binary exists: point it at this build's.
        let text = text.replace("/usr/local/bin/rampart", env!("CARGO_BIN_EXE_rampart"));
        std::fs::write(dir.path().join(unit), text).unwrap();
    }
    let proxy = std::fs::read_to_string(deploy("systemd").join("rampart-proxy.service")).unwrap();
    assert!(proxy.contains("AmbientCapabilities=CAP_NET_BIND_SERVICE"));
    let out = run(
        dir.path(),
        "systemd-analyze",
        &[
            "verify",
            "rampart-proxy.service",
            "rampart-controller.service",
        ],
    );
    assert!(
        out.trim().is_empty(),
        "systemd-analyze verify warned:\n{out}"
    );
    // The offline security review rates both units at most 3.0 of 10 (lower is safer).
    for unit in ["rampart-proxy.service", "rampart-controller.service"] {
        let out = run(
            dir.path(),
            "systemd-analyze",
            &["security", "--offline=yes", "--threshold=30", unit],
        );
        eprintln!("{unit}: {}", out.lines().last().unwrap_or_default());
    }
}

#[test]
fn prometheus_configuration_and_rules_check_and_their_tests_pass() {
    let dir = deploy("prometheus");
    run(&dir, "promtool", &["check", "config", "prometheus.yml"]);
    run(&dir, "promtool", &["check", "rules", "rules.yml"]);
    let out = run(&dir, "promtool", &["test", "rules", "rules_test.yml"]);
    assert!(out.contains("SUCCESS"), "{out}");
}
