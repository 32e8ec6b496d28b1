//! The access log, end to end: one line per request through every transport (HTTP/1
//! on the fast path and on Pingora's, HTTP/2 over TLS), each format parsed back,
//! redaction, per-route opt-out, sampling that keeps errors, a stalled pipe that
//! drops lines (counted) without slowing requests, reopening on SIGUSR1 after a
//! rotation, stdout, and the recent errors at `/api/v1/errors`.
#![allow(missing_docs, clippy::unwrap_used)]

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use common::{eventually, Backend, Proxy};
use serde_json::Value;

/// Routes: `app` (forwards to the backend), `dead` (a pool whose one endpoint refuses
/// connections: 502), `quiet` (not logged), and the rest 404.
fn routes(backend: &Backend, dead: std::net::SocketAddr, access_log: &str) -> String {
    format!(
        "[access_log]\n{access_log}\n\n\
         [[tls]]\nhosts = [\"a.test\"]\nsource = \"internal\"\n\n\
         [[routes]]\nname = \"quiet\"\npath_prefix = \"/quiet\"\naccess_log = false\naction = {{ forward = \"p\" }}\n\n\
         [[routes]]\nname = \"dead\"\npath_prefix = \"/dead\"\naction = {{ forward = \"dead\" }}\n\n\
         [[routes]]\nname = \"app\"\npath_prefix = \"/app\"\naction = {{ forward = \"p\" }}\n\n\
         [pools.p]\nendpoints = [{{ address = \"{}\" }}]\n\n\
         [pools.dead]\nendpoints = [{{ address = \"{dead}\" }}]\nretries = {{ attempts = 0 }}\n",
        backend.addr
    )
}

/// An address nothing listens on (bound, then closed).
fn closed_port() -> std::net::SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

/// The log's lines once there are at least `n`.
async fn lines(path: &Path, n: usize) -> Vec<String> {
    eventually(
        &format!("{n} access log lines in {}", path.display()),
        || async {
            let text = std::fs::read_to_string(path).ok()?;
            let lines: Vec<String> = text.lines().map(str::to_string).collect();
            (lines.len() >= n).then_some(lines)
        },
    )
    .await
}

fn json_lines(lines: &[String]) -> Vec<Value> {
    lines
        .iter()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_request_is_logged_once_whichever_transport_served_it() {
    common::init();
    let backend = Backend::start("b").await;
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("access.log");
    let settings = format!("path = {log:?}\nheaders = [\"user-agent\"]");
    let proxy = Proxy::start(&routes(&backend, closed_port(), &settings)).await;
    let http = Proxy::http_client();
    let h2 = proxy.client(&["a.test"]);
    let h2_base = format!("https://a.test:{}", proxy.https.port());

    let mut ids = Vec::new();
    let cases: [(&reqwest::Client, String); 5] = [
        (&http, proxy.url("/app/a?token=s3cret-query&x=1")),
        (&h2, format!("{h2_base}/app/h2")),
        (&http, proxy.url("/nowhere")),
        (&http, proxy.url("/dead/x")),
        (&http, proxy.url("/quiet/x")),
    ];
    for (client, url) in cases {
        let r = client
            .get(url)
            .header("user-agent", "probe/1.0")
            .header("authorization", "Bearer s3cret-token")
            .header("cookie", "session=s3cret-cookie")
            .send()
            .await
            .unwrap();
        ids.push(r.headers()["x-request-id"].to_str().unwrap().to_string());
    }
    // A chunked body, which the HTTP/1 fast path leaves to Pingora's.
    ids.push(chunked_post(proxy.http, "/app/chunked").await);
    // One more on the same keep-alive connection as the unlogged one: once it is in
    // the log, the unlogged request's turn has passed.
    http.get(proxy.url("/app/last")).send().await.unwrap();
    let lines = lines(&log, 6).await;
    let text = lines.join("\n");
    for secret in ["s3cret-token", "s3cret-cookie", "s3cret-query"] {
        assert!(!text.contains(secret), "{secret} reached the log:\n{text}");
    }
    let records = json_lines(&lines);
    let by_path: BTreeMap<&str, &Value> = records
        .iter()
        .map(|r| (r["path"].as_str().unwrap(), r))
        .collect();
    assert_eq!(records.len(), 6, "one line per logged request:\n{text}");
    assert!(!by_path.contains_key("/quiet/x"), "access_log = false");

    let a = by_path["/app/a"];
    assert_eq!(a["method"], "GET");
    assert_eq!(a["query"], "token=REDACTED&x=REDACTED");
    assert_eq!(a["status"], 200);
    assert_eq!(a["route"], "app");
    assert_eq!(a["pool"], "p");
    assert_eq!(a["upstream"], backend.addr.to_string());
    assert_eq!(a["upstream_status"], 200);
    assert_eq!(a["fast_path"], true);
    assert_eq!(a["protocol"], "HTTP/1.1");
    assert_eq!(a["scheme"], "http");
    assert_eq!(a["client"], "127.0.0.1");
    assert_eq!(a["header_user_agent"], "probe/1.0");
    assert_eq!(a["request_id"], ids[0].as_str());
    assert_eq!(a["attempts"], 1);
    assert!(a["duration_ms"].as_f64().unwrap() >= 0.0);
    assert!(a["upstream_ttfb_ms"].as_f64().is_some(), "{a}");
    assert!(a["bytes_sent"].as_u64().unwrap() > 0, "{a}");
    assert!(a["time"].as_str().unwrap().ends_with('Z'), "{a}");

    let chunked = by_path["/app/chunked"];
    assert_eq!(
        chunked["fast_path"], false,
        "chunked bodies go to Pingora: {chunked}"
    );
    assert_eq!(chunked["status"], 200);
    assert_eq!(chunked["request_id"], ids[5].as_str());

    let over_h2 = by_path["/app/h2"];
    assert_eq!(over_h2["protocol"], "HTTP/2", "{over_h2}");
    assert_eq!(over_h2["scheme"], "https");
    assert_eq!(over_h2["fast_path"], true);
    assert_eq!(over_h2["host"], format!("a.test:{}", proxy.https.port()));
    assert_eq!(over_h2["tls_version"], "TLSv1.3", "{over_h2}");
    assert!(over_h2["tls_cipher"].as_str().is_some(), "{over_h2}");

    let missing = by_path["/nowhere"];
    assert_eq!(missing["status"], 404);
    assert_eq!(missing["error"], "no_route");
    assert!(missing.get("route").is_none(), "{missing}");

    let dead = by_path["/dead/x"];
    assert_eq!(dead["status"], 502);
    assert_eq!(dead["error"], "upstream_connect", "{dead}");
    assert_eq!(dead["route"], "dead");

    // The failures are among the recent errors, newest first, with their request ids.
    let errors: Value = reqwest::get(format!("http://{}/api/v1/errors", proxy.admin))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let errors = errors.as_array().unwrap();
    assert_eq!(errors[0]["request_id"], ids[3].as_str(), "{errors:?}");
    assert_eq!(errors[0]["status"], 502);
    assert_eq!(errors[0]["route"], "dead");
    assert_eq!(errors[0]["request"], "GET /dead/x");
    assert_eq!(errors[1]["error"], "no_route");
    assert_eq!(proxy.metric("rampart_access_log_lines_total").await, 6.0);
    assert_eq!(proxy.metric("rampart_access_log_dropped_total").await, 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logfmt_and_combined_parse_back_and_sampling_keeps_every_error() {
    common::init();
    let backend = Backend::start("b").await;
    let dead = closed_port();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("access.log");
    let proxy = Proxy::start(&routes(
        &backend,
        dead,
        &format!("path = {log:?}\nformat = \"logfmt\"\ndrop_fields = [\"time\", \"peer\"]"),
    ))
    .await;
    let http = Proxy::http_client();
    http.get(proxy.url("/app/a b?q=1")).send().await.unwrap();
    let line = &lines(&log, 1).await[0];
    let fields = logfmt(line);
    assert_eq!(fields["path"], "/app/a%20b", "{line}");
    assert_eq!(fields["query"], "q=REDACTED");
    assert_eq!(fields["status"], "200");
    assert_eq!(fields["fast_path"], "true");
    assert!(
        !fields.contains_key("time") && !fields.contains_key("peer"),
        "{line}"
    );

    // The same file in the combined format (the writer and its file are kept).
    let v = proxy
        .reload(&routes(
            &backend,
            dead,
            &format!("path = {log:?}\nformat = \"combined\"\nredact_query = false"),
        ))
        .await;
    assert!(v > 1);
    http.get(proxy.url("/app/c?q=1"))
        .header("referer", "https://ref.test/")
        .header("user-agent", "agent \"quoted\"")
        .send()
        .await
        .unwrap();
    let line = lines(&log, 2).await[1].clone();
    let c = combined(&line).unwrap_or_else(|| panic!("not the combined format: {line}"));
    assert_eq!(c.client, "127.0.0.1");
    assert_eq!(c.request, "GET /app/c?q=1 HTTP/1.1");
    assert_eq!(c.status, 200);
    assert_eq!(c.bytes, "1", "the backend's body is its name: {line}");
    assert_eq!(c.referer, "https://ref.test/");
    assert_eq!(c.agent, r"agent \x22quoted\x22");

    // Sampling 0: successes are not logged, every error is.
    proxy
        .reload(&routes(
            &backend,
            dead,
            &format!("path = {log:?}\nsample = 0.0"),
        ))
        .await;
    for _ in 0..20 {
        http.get(proxy.url("/app/s")).send().await.unwrap();
    }
    for path in ["/nowhere", "/dead/x"] {
        http.get(proxy.url(path)).send().await.unwrap();
    }
    let all = lines(&log, 4).await;
    let sampled = json_lines(&all[2..]);
    let statuses: Vec<u64> = sampled
        .iter()
        .map(|r| r["status"].as_u64().unwrap())
        .collect();
    assert_eq!(statuses, vec![404, 502], "{all:?}");
}

/// POSTs a chunked body on a raw connection; returns the answer's request id.
async fn chunked_post(addr: std::net::SocketAddr, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let req = format!(
        "POST {path} HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out))
        .await
        .unwrap()
        .unwrap();
    let text = String::from_utf8_lossy(&out);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    text.lines()
        .find_map(|l| l.strip_prefix("x-request-id: "))
        .unwrap_or_else(|| panic!("no request id: {text}"))
        .to_string()
}

/// `key=value key="quoted value"` as a map.
fn logfmt(line: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut rest = line.trim();
    while !rest.is_empty() {
        let (key, after) = rest.split_once('=').unwrap();
        let (value, next) = if let Some(quoted) = after.strip_prefix('"') {
            let mut end = 0;
            let bytes = quoted.as_bytes();
            while bytes[end] != b'"' {
                end += if bytes[end] == b'\\' { 2 } else { 1 };
            }
            (
                serde_json::from_str::<String>(&after[..end + 2]).unwrap(),
                &quoted[end + 1..],
            )
        } else {
            let end = after.find(' ').unwrap_or(after.len());
            (after[..end].to_string(), &after[end..])
        };
        out.insert(key.to_string(), value);
        rest = next.trim_start();
    }
    out
}

struct Combined {
    client: String,
    request: String,
    status: u16,
    bytes: String,
    referer: String,
    agent: String,
}

/// `client - - [time] "request" status bytes "referer" "agent"`.
fn combined(line: &str) -> Option<Combined> {
    let (client, rest) = line.split_once(" - - [")?;
    let (time, rest) = rest.split_once("] \"")?;
    // 06/Dec/2026:22:23:00 +0000
    if time.len() != 26 || !time.ends_with(" +0000") {
        return None;
    }
    let (request, rest) = rest.split_once("\" ")?;
    let mut words = rest.splitn(3, ' ');
    let status = words.next()?.parse().ok()?;
    let bytes = words.next()?.to_string();
    let quoted = words.next()?;
    let (referer, agent) = quoted
        .strip_prefix('"')?
        .strip_suffix('"')?
        .split_once("\" \"")?;
    Some(Combined {
        client: client.to_string(),
        request: request.to_string(),
        status,
        bytes,
        referer: referer.to_string(),
        agent: agent.to_string(),
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_pipe_costs_log_lines_never_requests() {
    common::init();
    let backend = Backend::start("b").await;
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("access.fifo");
    assert!(std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap()
        .success());
    // A reader that never reads: the pipe fills (64 KiB), then the writer blocks.
    let _reader = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags_nonblocking()
        .open(&fifo)
        .unwrap();
    let proxy = Proxy::start(&routes(
        &backend,
        closed_port(),
        &format!("path = {fifo:?}\nbuffer = 64"),
    ))
    .await;
    let http = Proxy::http_client();
    let started = Instant::now();
    let mut sent = 0;
    // Bounded: at most 5,000 requests or 60 s; a few hundred fill the pipe and queue.
    while proxy.metric("rampart_access_log_dropped_total").await == 0.0 {
        assert!(
            sent < 5_000 && started.elapsed() < Duration::from_secs(60),
            "no line dropped after {sent} requests"
        );
        for _ in 0..50 {
            let r = http.get(proxy.url("/app/x")).send().await.unwrap();
            assert_eq!(r.status(), 200, "requests go on while the log is stalled");
            sent += 1;
        }
    }
    let dropped = proxy.metric("rampart_access_log_dropped_total").await;
    let written = proxy.metric("rampart_access_log_lines_total").await;
    assert!(
        dropped > 0.0 && written < f64::from(sent),
        "{dropped} dropped, {written} written of {sent}"
    );
    assert!(proxy.text("/app/y").await == "b", "still serving");
}

/// `OpenOptions` with `O_NONBLOCK`, so that opening a FIFO for reading does not wait
/// for a writer.
trait NonBlocking {
    fn custom_flags_nonblocking(&mut self) -> &mut Self;
}

impl NonBlocking for std::fs::OpenOptions {
    fn custom_flags_nonblocking(&mut self) -> &mut Self {
        use std::os::unix::fs::OpenOptionsExt;
        const O_NONBLOCK: i32 = 0o4000;
        self.custom_flags(O_NONBLOCK)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigusr1_reopens_the_file_after_logrotate_moved_it() {
    common::init();
    let backend = Backend::start("b").await;
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("access.log");
    let proxy = Proxy::start(&routes(&backend, closed_port(), &format!("path = {log:?}"))).await;
    let http = Proxy::http_client();
    http.get(proxy.url("/app/before")).send().await.unwrap();
    lines(&log, 1).await;
    let rotated = dir.path().join("access.log.1");
    std::fs::rename(&log, &rotated).unwrap();
    proxy.signal("USR1");
    // Until the writer has reopened, lines still go to the moved file: keep sending.
    let after = eventually("a new access.log after SIGUSR1", || async {
        http.get(proxy.url("/app/after")).send().await.ok()?;
        let text = std::fs::read_to_string(&log).ok()?;
        (!text.is_empty()).then_some(text)
    })
    .await;
    assert!(after.contains("/app/after"), "{after}");
    assert!(!after.contains("/app/before"));
    let old = std::fs::read_to_string(&rotated).unwrap();
    assert!(old.contains("/app/before"), "{old}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stdout_gets_one_json_object_per_request() {
    common::init();
    let backend = Backend::start("b").await;
    let proxy = Proxy::start(&routes(&backend, closed_port(), "path = \"stdout\"")).await;
    let http = Proxy::http_client();
    for i in 0..3 {
        http.get(proxy.url(&format!("/app/{i}")))
            .send()
            .await
            .unwrap();
    }
    let out = proxy.dir.path().join("rampart.out");
    let records = json_lines(&lines(&out, 3).await);
    let paths: Vec<&str> = records
        .iter()
        .map(|r| r["path"].as_str().unwrap())
        .collect();
    assert_eq!(paths, ["/app/0", "/app/1", "/app/2"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_access_log_keeps_the_last_good_configuration() {
    common::init();
    let backend = Backend::start("b").await;
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("access.log");
    let dead = closed_port();
    let proxy = Proxy::start(&routes(&backend, dead, &format!("path = {log:?}"))).await;
    let v = proxy.version().await;
    let missing_dir = dir.path().join("no/such/dir/access.log");
    let after = proxy
        .reload(&routes(&backend, dead, &format!("path = {missing_dir:?}")))
        .await;
    assert_eq!(after, v, "the reload was refused");
    let why = proxy.status().await["last_reload"]["error"].to_string();
    assert!(why.contains("access_log.path"), "{why}");
    let after = proxy
        .reload(&routes(
            &backend,
            dead,
            &format!("path = {log:?}\nfields = [\"stauts\"]"),
        ))
        .await;
    assert_eq!(after, v);
    let why = proxy.status().await["last_reload"]["error"].to_string();
    assert!(why.contains("did you mean \\\"status\\\""), "{why}");
    Proxy::http_client()
        .get(proxy.url("/app/x"))
        .send()
        .await
        .unwrap();
    lines(&log, 1).await;
}
