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
