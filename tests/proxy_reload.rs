//! End-to-end hot reload: bad files keep the old generation, file changes are picked
//! up, endpoint health survives a swap, and a stream of requests loses nothing.
#![allow(missing_docs, clippy::unwrap_used)]

mod common;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{eventually, forward_all, pool_toml, single_pool, Backend, Proxy};

#[tokio::test]
async fn reload_of_a_bad_file_keeps_serving() {
    common::init();
    let a = Backend::start("a").await;
    let good = format!(
        "{}{}",
        forward_all("p"),
        pool_toml("p", "round_robin", &[&a], "")
    );
    let proxy = Proxy::start(&good).await;
    let client = Proxy::http_client();
    for (bad, expect) in [
        ("[[routes]\nname = ", "TOML"),
        (
            "[[routes]]\nname = \"x\"\naction = { forward = \"missing\" }\n",
            "pool \"missing\" is not defined",
        ),
        (
            "[[routes]]\nname = \"x\"\nactoin = { respond = { body = \"typo\" } }\n",
            "unknown field",
        ),
    ] {
        let failures = proxy.metric("rampart_config_reload_failures_total").await;
        // Both the file watcher and SIGHUP may act on the change: wait for this error.
        proxy.reload(bad).await;
        let error = eventually("the reload error to be reported", || async {
            let status = proxy.status().await;
            let error = status["last_reload"]["error"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            (status["last_reload"]["ok"] == false
                && error.to_lowercase().contains(&expect.to_lowercase()))
            .then_some(error)
        })
        .await;
        assert!(
            error.contains(&proxy.config_path.display().to_string()),
            "the error names the file: {error}"
        );
        assert!(proxy.metric("rampart_config_reload_failures_total").await > failures);
        assert_eq!(proxy.version().await, 1, "the version does not move");
        let r = client.get(proxy.url("/")).send().await.unwrap();
        assert_eq!(
            r.text().await.unwrap(),
            "a",
            "the previous configuration still serves"
        );
    }
    assert!(proxy.reload(&good).await >= 2);
    assert_eq!(proxy.status().await["last_reload"]["ok"], true);
}

#[tokio::test]
async fn a_changed_file_is_reloaded_without_a_signal() {
    common::init();
    let (a, b) = (Backend::start("a").await, Backend::start("b").await);
    let proxy = Proxy::start(&single_pool("round_robin", &[&a], "")).await;
    proxy.write_config(&single_pool("round_robin", &[&b], ""));
    let client = Proxy::http_client();
    eventually("the edited file to take effect", || async {
        let body = client
            .get(proxy.url("/"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        (body == "b").then_some(())
    })
    .await;
}

#[tokio::test]
async fn endpoint_health_survives_a_reload() {
    common::init();
    let (a, b) = (Backend::start("a").await, Backend::start("b").await);
    let check = "[pools.p.health_check]\ninterval = \"100ms\"\ntimeout = \"100ms\"\nunhealthy_threshold = 3\n";
    let pool = format!("{}{check}", pool_toml("p", "round_robin", &[&a, &b], ""));
    let proxy = Proxy::start(&format!("{}{pool}", forward_all("p"))).await;
    b.health_status.store(500, Ordering::SeqCst);
    let b_healthy = |s: serde_json::Value| {
        s["pools"]["p"]["endpoints"][1]["active_healthy"]
            .as_bool()
            .unwrap()
    };
    eventually("b to go down", || async {
        (!b_healthy(proxy.status().await)).then_some(())
    })
    .await;
    let extra = "[[routes]]\nname = \"extra\"\nhosts = [\"extra.test\"]\naction = { respond = { body = \"x\" } }\n";
    let before = b.hits();
    proxy
        .reload(&format!("{}{extra}{pool}", forward_all("p")))
        .await;
    assert!(
        !b_healthy(proxy.status().await),
        "a reload does not forget that b is down"
    );
    let client = Proxy::http_client();
    for _ in 0..10 {
        assert_eq!(
            client
                .get(proxy.url("/"))
                .send()
                .await
                .unwrap()
                .text()
                .await
                .unwrap(),
            "a"
        );
    }
    assert_eq!(b.hits(), before);
}

/// Keeps `workers` keep-alive clients busy while the configuration is swapped `swaps`
/// times between two pools; every request must succeed.
#[tokio::test]
async fn reload_under_a_stream_of_requests_loses_none() {
    common::init();
    let (a1, a2, b1) = (
        Backend::start("a1").await,
        Backend::start("a2").await,
        Backend::start("b1").await,
    );
    let configs = [
        format!(
            "{}{}",
            forward_all("alpha"),
            pool_toml("alpha", "round_robin", &[&a1, &a2], "")
        ),
        format!(
            "{}{}{}",
            forward_all("beta"),
            pool_toml("beta", "least_conn", &[&b1, &a2], ""),
            pool_toml("alpha", "weighted", &[&a1], "")
        ),
    ];
    let proxy = Proxy::start(&configs[0]).await;
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut workers = Vec::new();
    for _ in 0..4 {
        let (stop, ok, failed, url) = (stop.clone(), ok.clone(), failed.clone(), proxy.url("/"));
        workers.push(tokio::spawn(async move {
            let client = Proxy::http_client();
            let started = Instant::now();
            // Bounded in count and time.
            for _ in 0..20_000 {
                if stop.load(Ordering::Relaxed) || started.elapsed() > Duration::from_secs(60) {
                    break;
                }
                match client.get(&url).send().await {
                    Ok(r) if r.status() == 200 => {
                        r.text().await.unwrap();
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(r) => failed
                        .lock()
                        .unwrap()
                        .push(format!("status {}", r.status())),
                    Err(e) => failed.lock().unwrap().push(format!("{e:?}")),
                }
            }
        }));
    }
    let swaps = 20;
    for i in 0..swaps {
        proxy.reload(&configs[(i + 1) % 2]).await;
    }
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.await.unwrap();
    }
    let failed = failed.lock().unwrap().clone();
    assert!(
        failed.is_empty(),
        "{} failed requests, e.g. {:?}",
        failed.len(),
        &failed[..failed.len().min(5)]
    );
    assert!(
        ok.load(Ordering::Relaxed) > 100,
        "the load ran during the swaps"
    );
    assert!(proxy.version().await > swaps as u64);
    eprintln!(
        "{} requests across {swaps} swaps, 0 failed",
        ok.load(Ordering::Relaxed)
    );
}

#[tokio::test]
async fn in_flight_requests_finish_on_the_generation_they_started_on() {
    common::init();
    let (old, new) = (Backend::start("old").await, Backend::start("new").await);
    let proxy = Proxy::start(&single_pool("round_robin", &[&old], "")).await;
    let url = proxy.url("/slow/1500");
    let slow = tokio::spawn(async move {
        Proxy::http_client()
            .get(url)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    });
    eventually("the slow request to reach the old backend", || async {
        (old.hits() == 1).then_some(())
    })
    .await;
    // Swap to a configuration where the old backend no longer exists.
    proxy
        .reload(&format!(
            "{}{}",
            forward_all("q"),
            pool_toml("q", "round_robin", &[&new], "")
        ))
        .await;
    assert_eq!(proxy.text("/").await, "new");
    assert_eq!(
        slow.await.unwrap(),
        "old",
        "the request in flight finished on the old generation"
    );
}

/// An upstream that answers every request with a chunked body, one chunk every 50 ms
/// for 20 s (a download, a server-sent event stream).
async fn streaming_backend() -> std::net::SocketAddr {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match conn.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = conn
                    .write_all(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
                    .await;
                for _ in 0..400 {
                    if conn.write_all(b"5\r\ntick\n\r\n").await.is_err() {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                let _ = conn.write_all(b"0\r\n\r\n").await;
            });
        }
    });
    addr
}

#[tokio::test]
async fn a_removed_endpoint_drains_then_its_streams_are_cut() {
    common::init();
    let streaming = streaming_backend().await;
    let other = Backend::start("other").await;
    let pool = |endpoint: &str| {
        format!(
            "{}[pools.p]\ndrain_timeout = \"1s\"\nendpoints = [{{ address = \"{endpoint}\" }}]\n",
            forward_all("p")
        )
    };
    let proxy = Proxy::start(&pool(&streaming.to_string())).await;
    let mut stream = Proxy::http_client()
        .get(proxy.url("/download"))
        .send()
        .await
        .unwrap();
    assert_eq!(stream.status(), 200);
    assert!(stream.chunk().await.unwrap().is_some());

    // The streaming endpoint leaves the pool: new requests go to the other one, the
    // stream in flight goes on for the drain timeout, then it is cut.
    proxy.reload(&pool(&other.addr.to_string())).await;
    let removed = Instant::now();
    assert_eq!(proxy.text("/").await, "other");
    let mut chunks_after = 0;
    let cut = loop {
        match stream.chunk().await {
            Ok(Some(_)) => chunks_after += 1,
            Ok(None) => panic!("the stream ended normally; it should have been cut"),
            Err(_) => break removed.elapsed(),
        }
        assert!(
            removed.elapsed() < Duration::from_secs(10),
            "still streaming 10s after the endpoint left the pool"
        );
    };
    eprintln!(
        "stream on the removed endpoint: {chunks_after} chunks after removal, cut {:.2}s after (drain_timeout 1s)",
        cut.as_secs_f64()
    );
    assert!(
        chunks_after >= 5,
        "the stream should go on while draining: {chunks_after} chunks"
    );
}
