//! Helpers shared by the DNS tests: instance views, settings, and a real DNS client.
#![allow(dead_code, missing_docs, clippy::unwrap_used)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use hickory_net::client::{Client, ClientHandle as _};
use hickory_net::runtime::TokioRuntimeProvider;
use hickory_net::udp::UdpClientStream;
use hickory_proto::rr::{DNSClass, Name, RData, RecordType};
use rampart_config::snapshot::DnsInstance;
use rampart_config::{DnsName, DnsSettings};
use rampart_controller::dns::view::Seen;

/// An instance `i-<n>` at 192.0.2.<n> (documentation addresses: never contacted).
pub fn instance(n: u8, ready: bool) -> Seen {
    let ip = format!("192.0.2.{n}").parse().unwrap();
    Seen {
        id: format!("i-{n}"),
        addrs: vec![ip],
        ready,
        since: Instant::now(),
        detail: DnsInstance {
            id: format!("i-{n}"),
            addrs: vec![ip],
            ready,
            ..DnsInstance::default()
        },
    }
}

/// Instances 1..=n, all ready.
pub fn fleet(n: u8) -> Vec<Seen> {
    (1..=n).map(|i| instance(i, true)).collect()
}

/// DNS settings for `zone` with `names` (policy from `policy`, TTL 60 s), given as TOML
/// so that the defaults are the configuration's own.
pub fn settings(zone: &str, names: &[&str], policy: &str, provider: &str) -> DnsSettings {
    let names: String = names
        .iter()
        .map(|n| format!("[[names]]\nname = \"{n}\"\npolicy = \"{policy}\"\n"))
        .collect();
    let text = format!("zone = \"{zone}\"\nowner_id = \"test-owner\"\n{provider}\n{names}");
    toml::from_str(&text).unwrap_or_else(|e| panic!("{e}\n{text}"))
}

/// A name entry.
pub fn name(n: &str) -> DnsName {
    toml::from_str(&format!("name = \"{n}\"")).unwrap()
}

/// The sorted values of `name`'s records of type `rtype`, asked of the server at `addr`
/// over UDP.
pub async fn query(addr: SocketAddr, name: &str, rtype: RecordType) -> Vec<String> {
    let stream = UdpClientStream::builder(addr, TokioRuntimeProvider::default()).build();
    let (mut client, bg) = Client::<TokioRuntimeProvider>::from_sender(stream);
    tokio::spawn(bg);
    let response = client
        .query(
            Name::from_ascii(format!("{name}.")).unwrap(),
            DNSClass::IN,
            rtype,
        )
        .await
        .unwrap();
    let mut out: Vec<String> = response
        .answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(a) => Some(a.0.to_string()),
            RData::AAAA(a) => Some(a.0.to_string()),
            RData::TXT(t) => Some(
                t.txt_data
                    .iter()
                    .map(|b| String::from_utf8_lossy(b).into_owned())
                    .collect::<Vec<_>>()
                    .join(""),
            ),
            _ => None,
        })
        .collect();
    out.sort();
    out
}

/// Polls `f` until it returns true or `deadline` passes.
pub async fn eventually<F, Fut>(deadline: Duration, what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let end = Instant::now() + deadline;
    while Instant::now() < end {
        if f().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out waiting for {what}");
}

/// A free loopback TCP port (for servers that cannot be told to pick one).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}
