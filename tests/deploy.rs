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

/// Every metric name the code registers (string literals `"rampart_..."`).
fn exported_metrics() -> std::collections::BTreeSet<String> {
    let mut names = std::collections::BTreeSet::new();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut stack = vec![root.join("proxy/src"), root.join("controller/src")];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                let text = std::fs::read_to_string(&path).unwrap();
                for part in text.split("\"rampart_").skip(1) {
                    let name: String = part
                        .chars()
                        .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                        .collect();
                    if part[name.len()..].starts_with('"') {
                        names.insert(format!("rampart_{name}"));
                    }
                }
            }
        }
    }
    names
}

/// The metric names `text` refers to (histogram series reduced to their metric).
fn referenced_metrics(text: &str) -> std::collections::BTreeSet<String> {
    let mut out = std::collections::BTreeSet::new();
    for (i, _) in text.match_indices("rampart_") {
        // Not a recording rule (rampart:...) nor part of a longer word.
        if i > 0 && text.as_bytes()[i - 1].is_ascii_alphanumeric() {
            continue;
        }
        let name: String = text[i..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        let base = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .unwrap_or(&name);
        out.insert(base.to_string());
    }
    out
}

#[test]
fn the_alerts_and_the_dashboard_use_only_metrics_rampart_exports() {
    let exported = exported_metrics();
    assert!(exported.contains("rampart_requests_total"), "{exported:?}");
    let dashboard = std::fs::read_to_string(deploy("grafana").join("rampart.json")).unwrap();
    let json: serde_json::Value = serde_json::from_str(&dashboard).unwrap();
    assert!(json["panels"].as_array().unwrap().len() > 10);
    for (file, text) in [
        ("deploy/grafana/rampart.json", dashboard),
        (
            "deploy/prometheus/rules.yml",
            std::fs::read_to_string(deploy("prometheus").join("rules.yml")).unwrap(),
        ),
    ] {
        let missing: Vec<String> = referenced_metrics(&text)
            .into_iter()
            .filter(|m| !exported.contains(m))
            .collect();
        assert!(
            missing.is_empty(),
            "{file} uses metrics Rampart does not export: {missing:?}"
        );
    }
}

#[test]
fn kubernetes_manifests_validate_against_the_api_schema_and_carry_a_valid_config() {
    let dir = deploy("kubernetes");
    let venv = std::env::var("RAMPART_VENV")
        .unwrap_or_else(|_| format!("{}/.cache/rampart/venv", std::env::var("HOME").unwrap()));
    let tool = format!("{venv}/bin/kubernetes-validate");
    let mut files: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .filter(|f| f.ends_with(".yaml"))
        .collect();
    files.sort();
    assert!(files.len() >= 3, "{files:?}");
    let mut args = vec!["--strict"];
    args.extend(files.iter().map(String::as_str));
    let out = run(&dir, &tool, &args);
    assert!(!out.contains("ERROR"), "{out}");
    // The controller configuration in the ConfigMap passes `rampart check`.
    let manifest = std::fs::read_to_string(dir.join("controller.yaml")).unwrap();
    let block = manifest
        .split("controller.toml: |\n")
        .nth(1)
        .and_then(|rest| rest.split("\n---").next())
        .unwrap();
    let toml: String = block
        .lines()
        .map(|l| l.strip_prefix("    ").unwrap_or(l))
        .collect::<Vec<_>>()
        .join("\n");
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), toml).unwrap();
    let check = Command::new(env!("CARGO_BIN_EXE_rampart"))
        .arg("check")
        .arg(file.path())
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stderr)
    );
}
