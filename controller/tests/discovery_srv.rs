//! DNS SRV discovery against a real UDP DNS server on loopback (a small responder whose
//! answers the test changes), through a real controller: endpoints follow the records,
//! re-resolved on their TTL; only the best priority serves; a server that stops
//! answering keeps the last good endpoints and says why.
#![allow(missing_docs, clippy::unwrap_used)]

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hickory_proto::op::{Message, MessageType, ResponseCode};
use hickory_proto::rr::rdata::{A, SRV};
use hickory_proto::rr::{Name, RData, Record};

/// (priority, weight, port, target host, its address)
type Srv = (u16, u16, u16, &'static str, Ipv4Addr);

/// Answers SRV questions with `records` (TTL 1 s, addresses in the additional section);
/// answers nothing while `records` is `None`.
async fn responder(records: Arc<Mutex<Option<Vec<Srv>>>>) -> SocketAddr {
    let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = socket.local_addr().unwrap();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 4096];
        loop {
            let Ok((n, peer)) = socket.recv_from(&mut buf).await else {
                return;
            };
            let Ok(query) = Message::from_vec(&buf[..n]) else {
                continue;
            };
            let Some(current) = records.lock().unwrap().clone() else {
                continue;
            };
            let mut response = Message::new(query.id, MessageType::Response, query.op_code);
            response.metadata.response_code = ResponseCode::NoError;
            response.add_queries(query.queries.clone());
            let qname = query.queries[0].name().clone();
            for (priority, weight, port, host, ip) in current {
                let target = Name::from_ascii(format!("{host}.")).unwrap();
                response.add_answer(Record::from_rdata(
                    qname.clone(),
                    1,
                    RData::SRV(SRV::new(priority, weight, port, target.clone())),
                ));
                response.add_additional(Record::from_rdata(target, 1, RData::A(A(ip))));
            }
            let _ = socket.send_to(&response.to_vec().unwrap(), peer).await;
        }
    });
    addr
}

/// The endpoints of pool `web` in the controller's current snapshot.
fn endpoints(state: &rampart_controller::State) -> Vec<(String, u64)> {
    let body = state.fleet.published.borrow().body.clone();
    if body.is_empty() {
        return Vec::new();
    }
    let snap: serde_json::Value = serde_json::from_slice(&body).unwrap();
    let mut out: Vec<(String, u64)> = snap["pools"]["web"]["endpoints"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|e| {
                    (
                        e["address"].as_str().unwrap().to_string(),
                        e["weight"].as_u64().unwrap_or(1),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out
}

async fn until(state: &rampart_controller::State, want: &[(&str, u64)], what: &str) {
    let want: Vec<(String, u64)> = want.iter().map(|(a, w)| ((*a).to_string(), *w)).collect();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let got = endpoints(state);
        if got == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: pool web is {got:?}, want {want:?}; status {:?}",
            state.status().discovery
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn srv_records_become_endpoints_and_follow_their_ttl() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let records = Arc::new(Mutex::new(Some(vec![
        (
            10,
            5,
            8080,
            "web-1.service.test",
            Ipv4Addr::new(127, 0, 0, 11),
        ),
        (
            10,
            1,
            8081,
            "web-2.service.test",
            Ipv4Addr::new(127, 0, 0, 12),
        ),
        // A backup: used only when no record of priority 10 is left.
        (
            20,
            1,
            9000,
            "backup.service.test",
            Ipv4Addr::new(127, 0, 0, 13),
        ),
    ])));
    let server = responder(records.clone()).await;
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        r#"[server]
data_dir = {:?}
[controller]
listen = "127.0.0.1:0"
admin = "127.0.0.1:0"

[pools.web]

[[routes]]
name = "web"
action = {{ forward = "web" }}

[[discovery.dns_srv]]
name = "_web._tcp.service.test"
pool = "web"
server = "{server}"
"#,
        dir.path().join("data")
    );
    let config = rampart_config::parse(&text, "srv-test.toml").unwrap();
    let handle = rampart_controller::start(config, None).await.unwrap();
    let state = handle.state.clone();
    until(
        &state,
        &[("127.0.0.11:8080", 5), ("127.0.0.12:8081", 1)],
        "first lookup",
    )
    .await;

    // The records change: seen within the TTL (1 s) plus a lookup.
    let changed = Instant::now();
    *records.lock().unwrap() = Some(vec![
        (
            10,
            1,
            8081,
            "web-2.service.test",
            Ipv4Addr::new(127, 0, 0, 12),
        ),
        (
            10,
            3,
            8082,
            "web-3.service.test",
            Ipv4Addr::new(127, 0, 0, 14),
        ),
    ]);
    until(
        &state,
        &[("127.0.0.12:8081", 1), ("127.0.0.14:8082", 3)],
        "after a change",
    )
    .await;
    eprintln!(
        "SRV change reflected in the snapshot after {:.2}s (TTL 1s)",
        changed.elapsed().as_secs_f64()
    );

    // The server stops answering: the last good endpoints stay, the error says why.
    *records.lock().unwrap() = None;
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let errors = state.discovery_errors();
        if errors.iter().any(|e| e.contains("_web._tcp.service.test")) {
            break;
        }
        assert!(Instant::now() < deadline, "no error reported");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(endpoints(&state).len(), 2);
    handle.shutdown().await;
}
