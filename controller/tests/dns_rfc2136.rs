//! The DNS loop against a real BIND 9 (named), with dynamic updates and zone transfers
//! signed with TSIG.
#![allow(missing_docs, clippy::unwrap_used)]

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use hickory_proto::rr::RecordType;
use rampart_config::TsigAlgorithm;
use rampart_controller::dns::provider::ProviderError;
use rampart_controller::dns::rfc2136::Rfc2136;
use rampart_controller::dns::{Dns, DnsMetrics};

use common::{eventually, fleet, free_port, instance, query, settings};

const ZONE: &str = "example.test";
const WWW: &str = "www.example.test";

/// A named serving `example.test` on a loopback port, stopped on drop.
struct Bind {
    child: Child,
    addr: SocketAddr,
    dir: tempfile::TempDir,
}

impl Bind {
    async fn start(secret: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let d = dir.path().display();
        std::fs::write(
            dir.path().join("example.test.zone"),
            "$TTL 60\n@ IN SOA ns.example.test. hostmaster.example.test. 1 3600 600 86400 30\n@ IN NS ns.example.test.\nns IN A 127.0.0.1\nlegacy IN A 198.51.100.7\n",
        )
        .unwrap();
        std::fs::write(
            dir.path().join("named.conf"),
            format!(
                r#"options {{
  directory "{d}";
  pid-file "{d}/named.pid";
  listen-on port {port} {{ 127.0.0.1; }};
  listen-on-v6 {{ none; }};
  recursion no;
  dnssec-validation no;
}};
controls {{ }};
key "rampart" {{ algorithm hmac-sha256; secret "{secret}"; }};
zone "example.test" {{
  type primary;
  file "{d}/example.test.zone";
  allow-update {{ key "rampart"; }};
  allow-transfer {{ key "rampart"; }};
}};
"#
            ),
        )
        .unwrap();
        let child = Command::new("named")
            .args(["-g", "-4", "-c"])
            .arg(dir.path().join("named.conf"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("named.log")).unwrap())
            .spawn()
            .expect("starting named (scripts/setup installs bind9)");
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let log = dir.path().join("named.log");
        eventually(Duration::from_secs(30), "named to load the zone", || {
            let log = log.clone();
            async move {
                std::fs::read_to_string(&log).is_ok_and(|l| l.contains("all zones loaded"))
                    && tokio::net::TcpStream::connect(addr).await.is_ok()
            }
        })
        .await;
        Self { child, addr, dir }
    }

    fn key_file(&self, secret: &str) -> std::path::PathBuf {
        let path = self.dir.path().join("rampart.key");
        // The file `tsig-keygen rampart` writes.
        std::fs::write(
            &path,
            format!("key \"rampart\" {{\n\talgorithm hmac-sha256;\n\tsecret \"{secret}\";\n}};\n"),
        )
        .unwrap();
        path
    }
}

impl Drop for Bind {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn secret() -> String {
    let bytes: [u8; 32] = rand::random();
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

fn dns(bind: &Bind, key_file: &Path) -> Dns {
    let provider = Rfc2136::new(
        bind.addr,
        ZONE,
        "rampart",
        TsigAlgorithm::HmacSha256,
        key_file,
    )
    .unwrap();
    Dns::new(
        Arc::new(provider),
        ZONE,
        DnsMetrics::new(&prometheus::Registry::new()),
    )
}

fn ips(range: impl IntoIterator<Item = u8>) -> Vec<String> {
    let mut v: Vec<String> = range.into_iter().map(|n| format!("192.0.2.{n}")).collect();
    v.sort();
    v
}

#[tokio::test]
async fn bind_records_follow_the_fleet_with_tsig_signed_updates() {
    let secret = secret();
    let bind = Bind::start(&secret).await;
    let dns = dns(&bind, &bind.key_file(&secret));
    let s = settings(ZONE, &[WWW, "legacy.example.test"], "multivalue", "");
    for n in [1u8, 5, 2] {
        let out = dns.pass(&s, &fleet(n)).await.unwrap();
        assert!(out.failed.is_empty(), "{:?}", out.failed);
        assert_eq!(
            query(bind.addr, WWW, RecordType::A).await,
            ips(1..=n),
            "{n} instances"
        );
    }
    assert_eq!(
        query(bind.addr, WWW, RecordType::TXT).await,
        vec!["heritage=rampart,owner=test-owner".to_string()]
    );
    // The zone file's own record is not Rampart's: skipped, untouched.
    let plan = dns.plan(&s, &fleet(2)).await.unwrap();
    assert!(plan.changes.is_empty(), "{:?}", plan.changes);
    assert_eq!(plan.skipped.len(), 1);
    assert_eq!(
        query(bind.addr, "legacy.example.test", RecordType::A).await,
        vec!["198.51.100.7"]
    );

    dns.pass(&s, &[instance(1, false), instance(2, true)])
        .await
        .unwrap();
    assert_eq!(query(bind.addr, WWW, RecordType::A).await, ips([2]));

    let none = settings(ZONE, &["legacy.example.test"], "simple", "");
    dns.pass(&none, &fleet(2)).await.unwrap();
    assert!(query(bind.addr, WWW, RecordType::A).await.is_empty());
    assert!(query(bind.addr, WWW, RecordType::TXT).await.is_empty());
    assert_eq!(
        query(bind.addr, "legacy.example.test", RecordType::A).await,
        vec!["198.51.100.7"]
    );
}

#[tokio::test]
async fn a_wrong_tsig_key_is_a_clear_error() {
    let bind = Bind::start(&secret()).await;
    // Rampart holds another secret than the server.
    let wrong = bind.key_file(&secret());
    let dns = dns(&bind, &wrong);
    let s = settings(ZONE, &[WWW], "simple", "");
    let err = dns.pass(&s, &fleet(1)).await.unwrap_err();
    assert!(matches!(err, ProviderError::Fatal(_)), "{err:?}");
    let text = err.to_string();
    assert!(text.contains("TSIG"), "{text}");
    assert!(text.contains("rampart"), "names the key: {text}");
    assert!(query(bind.addr, WWW, RecordType::A).await.is_empty());

    // A key file without a secret is refused up front, naming the file.
    let empty = bind.dir.path().join("empty.key");
    std::fs::write(&empty, "").unwrap();
    let e = Rfc2136::new(
        bind.addr,
        ZONE,
        "rampart",
        TsigAlgorithm::HmacSha256,
        &empty,
    )
    .unwrap_err();
    assert!(format!("{e:#}").contains("empty.key"), "{e:#}");
}
