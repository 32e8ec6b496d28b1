//! The `rampart` command line: check, schema, and the quickstart path of `up`.
#![allow(missing_docs, clippy::unwrap_used)]

mod common;

use std::process::Command;

fn rampart(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_rampart"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

#[test]
fn every_example_passes_check() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/examples");
    let mut n = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            let (code, out, err) = rampart(&["check", path.to_str().unwrap()]);
            assert_eq!(code, 0, "{}: {out}{err}", path.display());
            n += 1;
        }
    }
    assert!(
        n >= 4,
        "quickstart, multi-site, weighted canary and sticky sessions: found {n}"
    );
}

#[test]
fn check_reports_every_error_with_position_path_and_hint() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bad.toml");
    std::fs::write(
        &file,
        r#"[listeners]
http = "127.0.0.1:8080"

[[routes]]
name = "web"
hosts = ["example.com", "*.example.com"]
action = { forward = "wbe" }

[[routes]]
name = "web"
path_prefix = "api"
action = { redirect = { location = "https://example.net", status = 200 } }

[pools.web]
balance = "weighted"
hash_key = "cookie:sid"
endpoints = [{ address = "10.0.0.1:80", weight = 0 }]

[pools.web.health_check]
interval = "1s"
timeout = "5s"
"#,
    )
    .unwrap();
    let (code, out, _) = rampart(&["check", file.to_str().unwrap()]);
    assert_eq!(code, 1);
    let f = file.display();
    let expected = [
        format!("{f}:7:12: routes[0].action.forward: pool \"wbe\" is not defined (hint: use one of \"web\" or define [pools.wbe])"),
        format!("{f}:10:1: routes[1].name: route name \"web\" is also used by routes[0] (hint: give every route a unique name)"),
        format!("{f}:11:1: routes[1].path_prefix: \"api\" is not a path prefix (hint: start it with '/' and leave out query and fragment, e.g. \"/api\")"),
        format!("{f}:12:59: routes[1].action.redirect.status: 200 is not a redirect status (hint: use 301, 302, 303, 307 or 308)"),
        format!("{f}:16:1: pools.web.hash_key: hash_key is only used by balance = \"consistent_hash\" (hint: remove hash_key or set balance = \"consistent_hash\")"),
        format!("{f}:17:41: pools.web.endpoints[0].weight: 0 is outside 1..=1000 (hint: use a weight between 1 and 1000, or remove the endpoint to stop its traffic)"),
        format!("{f}:21:1: pools.web.health_check.timeout: 5s must be > 0 and not longer than interval 1s (hint: e.g. interval = \"5s\", timeout = \"2s\")"),
    ];
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(
        lines,
        expected.iter().map(String::as_str).collect::<Vec<_>>(),
        "\n{out}"
    );
}

#[test]
fn check_reports_syntax_and_type_errors_with_position() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bad.toml");
    std::fs::write(&file, "[limits]\nheader_read_timeout = \"ten seconds\"\n").unwrap();
    let (code, out, _) = rampart(&["check", file.to_str().unwrap()]);
    assert_eq!(code, 1);
    // The bad value where it is written, and the semantic problem of the same file
    // (no listener) in the same pass.
    assert!(
        out.contains(": listeners: neither an http nor an https listener"),
        "{out}"
    );
    assert!(
        out.contains(&format!(
            "{}:2:23: limits.header_read_timeout: invalid duration \"ten seconds\"",
            file.display()
        )),
        "{out}"
    );
    std::fs::write(&file, "[listeners]\nhtp = \"0.0.0.0:80\"\n").unwrap();
    let (_, out, _) = rampart(&["check", file.to_str().unwrap()]);
    assert!(
        out.contains(":2:1: listeners.htp: unknown field `htp`")
            && out.contains("hint: did you mean `http`?"),
        "{out}"
    );
}

#[test]
fn schema_describes_the_config() {
    let (code, out, _) = rampart(&["schema"]);
    assert_eq!(code, 0);
    let schema: serde_json::Value = serde_json::from_str(&out).unwrap();
    for section in [
        "server",
        "listeners",
        "limits",
        "forwarding",
        "tls",
        "routes",
        "pools",
    ] {
        assert!(
            schema["properties"][section].is_object(),
            "{section} is in the schema"
        );
    }
    assert!(out.contains("slowloris"), "field docs become descriptions");
}

#[tokio::test]
async fn up_serves_the_welcome_page_over_https_with_the_internal_ca() {
    common::init();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("quickstart.toml");
    let log = dir.path().join("up.log");
    // Fresh ports when one was taken before `rampart up` bound it.
    let (http, https, admin, dns, up) = 'up: {
        for _ in 0..3 {
            let (http, https, admin, dns) = (
                common::free_addr(),
                common::free_addr(),
                common::free_addr(),
                common::free_addr(),
            );
            // The quickstart as shipped, with free ports instead of 8080/8443/9900.
            let quickstart = std::fs::read_to_string(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/examples/quickstart.toml"
            ))
            .unwrap()
            .replace("0.0.0.0:8080", &http.to_string())
            .replace("0.0.0.0:8443", &https.to_string())
            .replace("127.0.0.1:9900", &admin.to_string())
            .replace("127.0.0.1:8053", &dns.to_string())
            .replace("./rampart-data", dir.path().join("data").to_str().unwrap());
            std::fs::write(&file, quickstart).unwrap();
            if let Some(up) = common::spawn_up(&file, &log, admin).await {
                break 'up (http, https, admin, dns, up);
            }
        }
        panic!("rampart up failed to start three times");
    };
    let ca = dir.path().join("data/ca/ca.pem");
    let body = common::eventually("the quickstart to answer over HTTPS", || async {
        let pem = std::fs::read(&ca).ok()?;
        let client = reqwest::Client::builder()
            .tls_certs_only([reqwest::Certificate::from_pem(&pem).unwrap()])
            .resolve("localhost", https)
            .build()
            .unwrap();
        let r = client
            .get(format!("https://localhost:{}/", https.port()))
            .send()
            .await
            .ok()?;
        r.text().await.ok()
    })
    .await;
    assert!(body.contains("Rampart is running"), "{body}");
    let r = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
        .get(format!("http://{http}/x"))
        .header("host", "localhost")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 308);
    assert_eq!(
        r.headers()["location"],
        format!("https://localhost:{}/x", https.port())
    );
    // The embedded DNS server publishes this proxy once the probe of its HTTPS
    // listener passes (asked with dig, a real resolver client).
    common::eventually("www.rampart.localhost in the embedded DNS", || async {
        let out = Command::new("dig")
            .args([
                "+short",
                "+time=1",
                "+tries=1",
                "-p",
                &dns.port().to_string(),
                "@127.0.0.1",
            ])
            .args(["www.rampart.localhost", "A"])
            .output()
            .expect("dig (bind9-dnsutils, installed by scripts/setup)");
        (String::from_utf8_lossy(&out.stdout).trim() == https.ip().to_string()).then_some(())
    })
    .await;
    // The metrics say which binary this is, as `rampart version` does.
    let metrics = common::fetch(&format!("http://{admin}/metrics")).await;
    // The container HEALTHCHECK's command, against this admin listener and a dead one.
    assert_eq!(rampart(&["healthcheck", &admin.to_string()]).0, 0);
    let (code, _, err) = rampart(&["healthcheck", &common::free_addr().to_string()]);
    assert_eq!(code, 1);
    assert!(err.contains("refused"), "{err}");
    let (code, version, _) = rampart(&["version"]);
    assert_eq!(code, 0);
    let git = version
        .split("git ")
        .nth(1)
        .and_then(|s| s.split(',').next())
        .unwrap();
    assert!(
        metrics.lines().any(|l| l.starts_with("rampart_build_info{")
            && l.contains(&format!("git=\"{git}\""))
            && l.ends_with(" 1")),
        "{version}\n{metrics}"
    );
    drop(up);
    let stderr = std::fs::read_to_string(&log).unwrap();
    assert!(
        stderr.contains(&format!("curl --cacert {}", ca.display())),
        "it says where the CA is: {stderr}"
    );
    // Written to a file, the log has no colour codes.
    assert!(
        !stderr.contains('\u{1b}'),
        "ANSI codes in a log file: {stderr:?}"
    );
}

#[tokio::test]
async fn log_format_json_writes_one_object_per_line() {
    common::init();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("rampart.toml");
    let config = format!(
        "[server]\ndata_dir = {:?}\n\n[listeners]\nhttp = \"{}\"\nadmin = \"{}\"\n\n\
         [[routes]]\nname = \"hello\"\naction = {{ respond = {{ status = 200, body = \"hi\" }} }}\n",
        dir.path().join("data"),
        common::free_addr(),
        common::free_addr()
    );
    std::fs::write(&file, config).unwrap();
    let log = dir.path().join("proxy.log");
    let child = Command::new(env!("CARGO_BIN_EXE_rampart"))
        .args([
            "proxy",
            "--log-format",
            "json",
            "--config",
            file.to_str().unwrap(),
        ])
        .env("RUST_LOG", "info")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    // Killed when the test ends, also when an assertion fails first.
    struct Running(std::process::Child);
    impl Drop for Running {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let running = Running(child);
    // The banner (where the dashboard is) is the last thing written at start.
    let text = common::eventually("the proxy to log its banner", || async {
        let text = std::fs::read_to_string(&log).ok()?;
        text.lines()
            .any(|l| l.contains("Admin API"))
            .then_some(text)
    })
    .await;
    drop(running);
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let v: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("not one JSON object per line ({e}): {line}"));
        assert!(v["level"].is_string() && v["fields"].is_object(), "{line}");
    }
}
