//! Request records end to end: the access log (one line per request through every
//! transport — HTTP/1 on the fast path and on Pingora's, HTTP/2 over TLS —, each format
//! parsed back, redaction, per-route opt-out, sampling that keeps errors, a stalled
//! pipe that drops lines (counted) without slowing requests, reopening on SIGUSR1 after
//! a rotation, stdout), the recent errors at `/api/v1/errors`, W3C trace context, and
//! spans exported to an OTLP collector decoded with the official definitions.
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

    assert!(a["upstream_connect_ms"].as_f64().is_some(), "{a}");
    assert!(a.get("tls_sni").is_none(), "plain HTTP: {a}");

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
    assert_eq!(over_h2["tls_sni"], "a.test", "{over_h2}");
    assert_eq!(over_h2["tls_resumed"], false, "{over_h2}");

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

/// The TLS and upstream timing fields, on both paths and over both protocols: the
/// server name the client sent, whether its handshake resumed the session of its
/// previous connection, and the upstream connect time (0 on a reused connection).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_name_the_sni_a_resumed_session_and_the_upstream_connect() {
    common::init();
    let backend = Backend::start("b").await;
    // One worker thread: the fast paths keep idle upstream connections per thread, so
    // with one every request after the first reuses the first's connection.
    let both_paths = [
        ("threads = 1", true),
        (
            "threads = 1\nhttp1_fast_path = false\nhttp2_fast_path = false",
            false,
        ),
    ];
    for (server, fast) in both_paths {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("access.log");
        let settings = format!("path = {log:?}");
        let body = routes(&backend, closed_port(), &settings);
        let proxy = Proxy::start_with(server, &body).await;
        let base = format!("https://a.test:{}", proxy.https.port());
        let mut paths = Vec::new();
        for protocol in ["h2", "h1"] {
            // No idle connections kept: each request makes a new one, and the second
            // handshake resumes the first's session.
            let mut builder = proxy.client_builder(&["a.test"]).pool_max_idle_per_host(0);
            if protocol == "h1" {
                builder = builder.http1_only();
            }
            let client = builder.build().unwrap();
            for i in 0..2 {
                let path = format!("/app/{protocol}-{i}");
                let r = client.get(format!("{base}{path}")).send().await.unwrap();
                assert_eq!(r.status(), 200);
                paths.push(path);
            }
        }
        let records = json_lines(&lines(&log, paths.len()).await);
        let got: Vec<&str> = records
            .iter()
            .map(|r| r["path"].as_str().unwrap())
            .collect();
        assert_eq!(got, paths, "one line per request, in order");
        for (n, r) in records.iter().enumerate() {
            let what = format!("fast paths {fast}: {r}");
            assert_eq!(r["fast_path"], fast, "{what}");
            assert_eq!(r["tls_sni"], "a.test", "{what}");
            assert_eq!(r["tls_version"], "TLSv1.3", "{what}");
            let resumed = r["path"].as_str().unwrap().ends_with("-1");
            assert_eq!(r["tls_resumed"], resumed, "{what}");
            let connect = r["upstream_connect_ms"].as_f64().unwrap();
            if n == 0 {
                assert!(connect > 0.0, "a new upstream connection: {what}");
            } else {
                assert!(connect == 0.0, "a reused upstream connection: {what}");
            }
        }
    }
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

/// W3C trace context through every transport and both paths: a trusted peer's
/// `traceparent` is continued (same trace, the proxy's span as the upstream's parent),
/// an untrusted one's replaced by a new trace, `always` continues anyone's, `off`
/// passes it as sent; the access log's `trace_id` is the trace the upstream saw.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traceparent_is_continued_from_trusted_peers_and_started_otherwise() {
    const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
    const PARENT: &str = "00f067aa0ba902b7";
    common::init();
    let backend = Backend::start("b").await;
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (
            "trusted",
            "trusted_proxies = [\"127.0.0.1/32\"]",
            "",
            Some(true),
        ),
        (
            "trusted, Pingora's path",
            "trusted_proxies = [\"127.0.0.1/32\"]",
            "http1_fast_path = false\nhttp2_fast_path = false",
            Some(true),
        ),
        ("untrusted", "", "", Some(false)),
        ("always", "trace_context = \"always\"", "", Some(true)),
        ("off", "trace_context = \"off\"", "", None),
    ];
    for (i, (name, forwarding, server, continued)) in cases.into_iter().enumerate() {
        let log = dir.path().join(format!("access-{i}.log"));
        let body = format!(
            "[forwarding]\n{forwarding}\n\n[access_log]\npath = {log:?}\n\n\
             [[tls]]\nhosts = [\"a.test\"]\nsource = \"internal\"\n\n{}",
            common::single_pool("round_robin", &[&backend], "")
        );
        let proxy = Proxy::start_with(server, &body).await;
        let transports = [
            ("HTTP/1", Proxy::http_client(), proxy.url("/headers")),
            (
                "HTTP/2",
                proxy.client(&["a.test"]),
                format!("https://a.test:{}/headers", proxy.https.port()),
            ),
        ];
        let mut seen = Vec::new();
        for (transport, client, url) in transports {
            let sent = format!("00-{TRACE}-{PARENT}-01");
            let headers: BTreeMap<String, String> = client
                .get(url)
                .header("traceparent", &sent)
                .header("tracestate", "vendor=opaque")
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            let up = &headers["traceparent"];
            let what = format!("{name}, {transport}: upstream got {up}");
            assert_eq!(headers["tracestate"], "vendor=opaque", "{what}");
            assert_eq!(up.len(), 55, "{what}");
            let (trace, parent) = (&up[3..35], &up[36..52]);
            match continued {
                Some(true) => {
                    assert_eq!(trace, TRACE, "{what}");
                    assert_ne!(parent, PARENT, "the proxy's span is the parent: {what}");
                    assert!(up.ends_with("-01"), "{what}");
                }
                Some(false) => assert_ne!(trace, TRACE, "{what}"),
                None => assert_eq!(up, &sent, "{what}"),
            }
            seen.push(trace.to_string());
        }
        let records = json_lines(&lines(&log, 2).await);
        for (record, trace) in records.iter().zip(&seen) {
            match continued {
                Some(_) => assert_eq!(record["trace_id"], trace.as_str(), "{name}: {record}"),
                None => assert!(record.get("trace_id").is_none(), "{name}: {record}"),
            }
        }
    }
}

/// An OTLP/HTTP collector on loopback: every export decoded with the official
/// definitions; answers `status` (200: accepted).
struct Collector {
    addr: std::net::SocketAddr,
    spans: std::sync::Arc<std::sync::Mutex<Vec<Span>>>,
    task: tokio::task::JoinHandle<()>,
}

use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use opentelemetry_proto::tonic::trace::v1::Span;

impl Drop for Collector {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Collector {
    async fn start() -> Collector {
        use http_body_util::BodyExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let spans = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let kept = spans.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let kept = kept.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(
                        move |req: hyper::Request<hyper::body::Incoming>| {
                            let kept = kept.clone();
                            async move {
                                assert_eq!(req.uri().path(), "/v1/traces");
                                assert_eq!(req.headers()["content-type"], "application/x-protobuf");
                                let body = req.into_body().collect().await.unwrap().to_bytes();
                                let export =
                                    <ExportTraceServiceRequest as prost::Message>::decode(body)
                                        .unwrap();
                                for rs in export.resource_spans {
                                    let service = rs.resource.unwrap().attributes;
                                    assert!(service.iter().any(|a| a.key == "service.name"));
                                    for ss in rs.scope_spans {
                                        kept.lock().unwrap().extend(ss.spans);
                                    }
                                }
                                Ok::<_, std::convert::Infallible>(hyper::Response::new(
                                    http_body_util::Full::new(bytes::Bytes::new()),
                                ))
                            }
                        },
                    );
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Collector { addr, spans, task }
    }

    /// The spans of trace `trace_id` once there are at least `n`.
    async fn trace(&self, trace_id: &[u8], n: usize) -> Vec<Span> {
        eventually(
            &format!("{n} spans of a trace at the collector"),
            || async {
                let spans: Vec<Span> = self
                    .spans
                    .lock()
                    .unwrap()
                    .iter()
                    .filter(|s| s.trace_id == trace_id)
                    .cloned()
                    .collect();
                (spans.len() >= n).then_some(spans)
            },
        )
        .await
    }
}

fn attribute<'a>(span: &'a Span, key: &str) -> Option<&'a AnyValue> {
    span.attributes
        .iter()
        .find(|a| a.key == key)
        .and_then(|a| a.value.as_ref()?.value.as_ref())
}

fn hex_bytes(hex: &str) -> Vec<u8> {
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
        .collect()
}

/// OTLP export through every transport and both paths: one server span per request
/// (continuing the client's trace, its span the upstream's parent, HTTP semantic
/// convention attributes) and a client span per upstream attempt — two when the first
/// endpoint refuses the connection; an unreachable collector costs counted spans,
/// never requests.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_reach_an_otlp_collector_with_their_parents_and_attempts() {
    const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
    const PARENT: &str = "00f067aa0ba902b7";
    common::init();
    let backend = Backend::start("b").await;
    let collector = Collector::start().await;
    let dead = closed_port();
    let body = |endpoint: String| {
        format!(
            "[forwarding]\ntrusted_proxies = [\"127.0.0.1/32\"]\n\n\
             [tracing]\notlp_endpoint = \"{endpoint}\"\nservice_name = \"edge-test\"\n\n\
             [[tls]]\nhosts = [\"a.test\"]\nsource = \"internal\"\n\n\
             [[routes]]\nname = \"app\"\naction = {{ forward = \"p\" }}\n\n\
             [pools.p]\nbalance = \"round_robin\"\nendpoints = [{{ address = \"{dead}\" }}, {{ address = \"{}\" }}]\n\
             passive_health = {{ consecutive_failures = 1000 }}\n",
            backend.addr
        )
    };
    let endpoint = format!("http://{}/v1/traces", collector.addr);
    let fast = Proxy::start(&body(endpoint.clone())).await;
    let full = Proxy::start_with(
        "http1_fast_path = false\nhttp2_fast_path = false",
        &body(endpoint),
    )
    .await;
    let mut k = 0u128;
    for (path_name, proxy) in [("fast", &fast), ("full", &full)] {
        let transports = [
            ("HTTP/1", Proxy::http_client(), proxy.url("/headers")),
            (
                "HTTP/2",
                proxy.client(&["a.test"]),
                format!("https://a.test:{}/headers", proxy.https.port()),
            ),
        ];
        for (transport, client, url) in transports {
            // Round robin over [dead, live]: two requests, so that one of them tries
            // the dead endpoint first and retries on the live one.
            for n in 0..2 {
                k += 1;
                let trace = format!("{:032x}", u128::from_str_radix(TRACE, 16).unwrap() + k);
                let sent = format!("00-{trace}-{PARENT}-01");
                let r = client
                    .get(&url)
                    .header("traceparent", &sent)
                    .header("user-agent", "probe/2")
                    .send()
                    .await
                    .unwrap();
                let what = format!("{path_name} path, {transport}, request {n}");
                assert_eq!(r.status(), 200, "{what}");
                let seen: BTreeMap<String, String> = r.json().await.unwrap();
                let upstream_parent = seen["traceparent"][36..52].to_string();
                let spans_of = |spans: &[Span]| {
                    let server: Vec<&Span> = spans.iter().filter(|s| s.kind == 2).collect();
                    let clients: Vec<Span> =
                        spans.iter().filter(|s| s.kind == 3).cloned().collect();
                    (server.len() == 1).then(|| (server[0].clone(), clients))
                };
                let spans = collector.trace(&hex_bytes(&trace), 2).await;
                let (server, clients) =
                    spans_of(&spans).unwrap_or_else(|| panic!("{what}: {spans:?}"));
                assert_eq!(server.parent_span_id, hex_bytes(PARENT), "{what}");
                assert_eq!(
                    server.span_id,
                    hex_bytes(&upstream_parent),
                    "{what}: the upstream's parent is the server span"
                );
                assert_eq!(server.name, "GET", "{what}");
                assert_eq!(
                    attribute(&server, "http.request.method"),
                    Some(&AnyValue::StringValue("GET".into())),
                    "{what}"
                );
                assert_eq!(
                    attribute(&server, "url.path"),
                    Some(&AnyValue::StringValue("/headers".into()))
                );
                assert_eq!(
                    attribute(&server, "http.response.status_code"),
                    Some(&AnyValue::IntValue(200))
                );
                assert_eq!(
                    attribute(&server, "user_agent.original"),
                    Some(&AnyValue::StringValue("probe/2".into()))
                );
                assert_eq!(
                    attribute(&server, "rampart.route"),
                    Some(&AnyValue::StringValue("app".into()))
                );
                assert_eq!(
                    attribute(&server, "rampart.fast_path"),
                    Some(&AnyValue::BoolValue(path_name == "fast")),
                    "{what}"
                );
                assert!(server.end_time_unix_nano >= server.start_time_unix_nano);
                // Every attempt is a child of the server span; the last one answered 200.
                assert!(
                    !clients.is_empty() && clients.len() <= 2,
                    "{what}: {clients:?}"
                );
                for c in &clients {
                    assert_eq!(c.parent_span_id, server.span_id, "{what}");
                    assert!(
                        c.start_time_unix_nano >= server.start_time_unix_nano,
                        "{what}"
                    );
                }
                let last = clients
                    .iter()
                    .max_by_key(|c| c.start_time_unix_nano)
                    .unwrap();
                assert_eq!(
                    attribute(last, "http.response.status_code"),
                    Some(&AnyValue::IntValue(200)),
                    "{what}"
                );
                assert_eq!(
                    attribute(last, "server.port"),
                    Some(&AnyValue::IntValue(i64::from(backend.addr.port()))),
                    "{what}"
                );
                if clients.len() == 2 {
                    let first = clients
                        .iter()
                        .min_by_key(|c| c.start_time_unix_nano)
                        .unwrap();
                    assert_eq!(
                        attribute(first, "error.type"),
                        Some(&AnyValue::StringValue("upstream_connect".into())),
                        "{what}"
                    );
                    assert_eq!(
                        attribute(first, "server.port"),
                        Some(&AnyValue::IntValue(i64::from(dead.port()))),
                        "{what}"
                    );
                    assert_eq!(
                        attribute(last, "http.request.resend_count"),
                        Some(&AnyValue::IntValue(1)),
                        "{what}"
                    );
                }
            }
        }
        assert!(proxy.metric("rampart_otlp_spans_exported_total").await >= 8.0);
    }
    // Round robin sent one request of each pair to the dead endpoint first.
    let retried = collector
        .spans
        .lock()
        .unwrap()
        .iter()
        .filter(|s| attribute(s, "http.request.resend_count").is_some())
        .count();
    assert!(retried >= 4, "{retried} retried attempts among the spans");

    // A collector that is gone: requests go on, the spans are counted as dropped.
    let gone = Proxy::start(&body(format!("http://{}/v1/traces", closed_port()))).await;
    for _ in 0..5 {
        let r = Proxy::http_client()
            .get(gone.url("/x"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    eventually("dropped spans to be counted", || async {
        (gone
            .metric("rampart_otlp_spans_dropped_total{reason=\"export_failed\"}")
            .await
            > 0.0)
            .then_some(())
    })
    .await;
}
