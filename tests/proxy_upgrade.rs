//! Graceful binary upgrade: a new process takes the listening sockets over from the
//! old one (Pingora's hand-over on SIGQUIT) while clients keep being served.
#![allow(missing_docs, clippy::unwrap_used)]

mod common;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{eventually, single_pool, Backend, Proxy};

#[tokio::test]
async fn upgrade_hands_the_sockets_over_without_refusing_a_request() {
    common::init();
    let b = Backend::start("b").await;
    // A grace period lets requests in flight at the hand-over finish in the old process
    // (without one, Pingora shuts its runtimes down at once and cuts them).
    let mut proxy = Proxy::start_with(
        "grace_period = \"1s\"",
        &single_pool("round_robin", &[&b], ""),
    )
    .await;

    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let load = {
        let (stop, ok, failed, url) = (stop.clone(), ok.clone(), failed.clone(), proxy.url("/"));
        tokio::spawn(async move {
            // New connections all along (no keep-alive), bounded in count.
            for _ in 0..20_000 {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let client = reqwest::Client::builder()
                    .pool_max_idle_per_host(0)
                    .timeout(Duration::from_secs(5))
                    .build()
                    .unwrap();
                match client.get(&url).send().await {
                    Ok(r) if r.status() == 200 => {
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                    other => failed.lock().unwrap().push(format!("{other:?}")),
                }
            }
        })
    };

    eventually("the load to run", || async {
        (ok.load(Ordering::Relaxed) > 20).then_some(())
    })
    .await;
    let mut new = proxy.spawn_upgrade();
    let sock = proxy.dir.path().join("data/upgrade.sock");
    eventually("the new process to wait on the upgrade socket", || async {
        sock.exists().then_some(())
    })
    .await;
    let before = ok.load(Ordering::Relaxed);
    proxy.signal("QUIT");
    let quit_at = std::time::Instant::now();
    while proxy.child.try_wait().unwrap().is_none() {
        assert!(
            quit_at.elapsed() < common::DEADLINE,
            "the old process did not exit after SIGQUIT"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let at_exit = ok.load(Ordering::Relaxed);
    eventually("requests to be served by the new process", || async {
        (ok.load(Ordering::Relaxed) > at_exit + 50).then_some(())
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    load.await.unwrap();

    assert!(new.try_wait().unwrap().is_none(), "the new process runs");
    let failed = failed.lock().unwrap().clone();
    assert!(
        failed.is_empty(),
        "requests failed during the upgrade ({} ok, {before} before SIGQUIT): {failed:?}",
        ok.load(Ordering::Relaxed)
    );
    let status: serde_json::Value = reqwest::get(format!("http://{}/status", proxy.admin))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(status["ready"], true, "the admin listener moved too");
    new.kill().unwrap();
    new.wait().unwrap();
}

/// At shutdown (and at a hand-over, which shuts the old process down the same way), a
/// connection waiting between requests is closed, but one accepted while the listener
/// was open gets its first request answered even when it arrives after that: the
/// client is already sending it, and closing the socket then resets its connection.
#[tokio::test]
async fn a_connection_accepted_before_shutdown_gets_its_first_request_answered() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    common::init();
    let b = Backend::start("b").await;
    let proxy = Proxy::start_with(
        "grace_period = \"5s\"",
        &single_pool("round_robin", &[&b], ""),
    )
    .await;
    let open = |m: &str| common::metric_value(m, "rampart_active_connections{listener=\"http\"}");

    // One kept-alive connection after a request, one that has sent nothing yet.
    let mut kept = tokio::net::TcpStream::connect(proxy.http).await.unwrap();
    kept.write_all(b"GET / HTTP/1.1\r\nHost: app.test\r\n\r\n")
        .await
        .unwrap();
    let mut buf = vec![0u8; 4096];
    let n = kept.read(&mut buf).await.unwrap();
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"), "{:?}", &buf[..n]);
    let mut fresh = tokio::net::TcpStream::connect(proxy.http).await.unwrap();
    eventually("both connections to be open at the proxy", || async {
        (open(&proxy.metrics().await) == Some(2.0)).then_some(())
    })
    .await;

    proxy.signal("TERM");
    // The kept-alive connection is closed once the listener has shut down...
    let n = tokio::time::timeout(common::DEADLINE, kept.read(&mut buf))
        .await
        .expect("the kept-alive connection to be closed at shutdown")
        .unwrap_or(0);
    assert_eq!(n, 0, "{:?}", &buf[..n]);
    // ...and the fresh one's request, sent after that, is answered, with the
    // connection closed after it.
    fresh
        .write_all(b"GET / HTTP/1.1\r\nHost: app.test\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(common::DEADLINE, fresh.read_to_end(&mut answer))
        .await
        .expect("an answer within the deadline")
        .expect("an answer, not a reset connection");
    let answer = String::from_utf8_lossy(&answer).to_ascii_lowercase();
    assert!(answer.starts_with("http/1.1 200"), "{answer}");
    assert!(answer.contains("connection: close"), "{answer}");
}
