//! The DNS loop against the embedded server, asked with a real DNS client over UDP.
#![allow(missing_docs, clippy::unwrap_used)]

mod common;

use std::sync::Arc;

use hickory_proto::rr::RecordType;
use rampart_controller::dns::plan::{Change, Kind, RecordSet};
use rampart_controller::dns::{self, Dns, DnsMetrics};
use tokio::sync::watch;

use common::{fleet, instance, query, settings};

const ZONE: &str = "example.test";
const WWW: &str = "www.example.test";

async fn start() -> (Arc<Dns>, std::net::SocketAddr, watch::Sender<bool>) {
    let (stop, shutdown) = watch::channel(false);
    let s = settings(
        ZONE,
        &[WWW],
        "multivalue",
        "[provider]\nkind = \"embedded\"\nlisten = \"127.0.0.1:0\"",
    );
    let provider = dns::build_provider(&s, shutdown).await.unwrap();
    let addr = provider.addr().unwrap();
    let metrics = DnsMetrics::new(&prometheus::Registry::new());
    (Arc::new(Dns::new(provider, ZONE, metrics)), addr, stop)
}

fn ips(range: impl IntoIterator<Item = u8>) -> Vec<String> {
    let mut v: Vec<String> = range.into_iter().map(|n| format!("192.0.2.{n}")).collect();
    v.sort();
    v
}

#[tokio::test]
async fn names_follow_the_fleet_and_never_drop_below_the_floor() {
    let (dns, addr, _stop) = start().await;
    let s = settings(ZONE, &[WWW], "multivalue", "");

    // Converge from empty, scale 1 -> 5 -> 2.
    for n in [1u8, 5, 2] {
        let out = dns.pass(&s, &fleet(n)).await.unwrap();
        assert!(out.failed.is_empty(), "{:?}", out.failed);
        assert_eq!(
            query(addr, WWW, RecordType::A).await,
            ips(1..=n),
            "{n} instances"
        );
    }
    // The ownership TXT marks the name.
    assert_eq!(
        query(addr, WWW, RecordType::TXT).await,
        vec!["heritage=rampart,owner=test-owner".to_string()]
    );
    // Planning again changes nothing.
    let again = dns.plan(&s, &fleet(2)).await.unwrap();
    assert!(again.changes.is_empty(), "{:?}", again.changes);

    // One instance dies: its address goes.
    let view = vec![instance(1, true), instance(2, false)];
    dns.pass(&s, &view).await.unwrap();
    assert_eq!(query(addr, WWW, RecordType::A).await, ips([1]));

    // Every instance looks dead: the floor keeps the last value and says so.
    let out = dns
        .pass(&s, &[instance(1, false), instance(2, false)])
        .await
        .unwrap();
    assert_eq!(out.plan.floored, vec![WWW.to_string()]);
    assert_eq!(query(addr, WWW, RecordType::A).await, ips([1]));
    assert_eq!(dns.status().plan.floored.len(), 1);
}

#[tokio::test]
async fn records_it_does_not_own_are_left_alone_and_removed_names_are_cleaned_up() {
    let (dns, addr, _stop) = start().await;
    // Somebody else's record at legacy.example.test.
    let theirs = RecordSet {
        name: "legacy.example.test".into(),
        kind: Kind::A,
        set_id: None,
        ttl: 300,
        weight: None,
        values: ["198.51.100.7".to_string()].into(),
    };
    dns.provider()
        .apply(&[Change::Upsert(theirs)])
        .await
        .unwrap();

    let both = settings(ZONE, &[WWW, "legacy.example.test"], "simple", "");
    let out = dns.pass(&both, &fleet(3)).await.unwrap();
    assert_eq!(out.plan.skipped.len(), 1, "{:?}", out.plan);
    assert!(out.plan.skipped[0].1.contains("did not create"));
    assert_eq!(
        query(addr, "legacy.example.test", RecordType::A).await,
        vec!["198.51.100.7"]
    );
    assert_eq!(query(addr, WWW, RecordType::A).await, ips(1..=3));
    assert!(dns.status().plan.skipped[0].starts_with("legacy.example.test"));

    // www is removed from the configuration: its records and TXT go, legacy stays.
    let none = settings(ZONE, &["legacy.example.test"], "simple", "");
    dns.pass(&none, &fleet(3)).await.unwrap();
    assert!(query(addr, WWW, RecordType::A).await.is_empty());
    assert!(query(addr, WWW, RecordType::TXT).await.is_empty());
    assert_eq!(
        query(addr, "legacy.example.test", RecordType::A).await,
        vec!["198.51.100.7"]
    );
}

#[tokio::test]
async fn a_rejected_record_does_not_block_the_others() {
    let (dns, addr, _stop) = start().await;
    // A plan with a record outside the zone among good ones: the batch is rejected as a
    // whole, then applied name by name.
    let good = |name: &str| {
        Change::Upsert(RecordSet {
            name: name.into(),
            kind: Kind::A,
            set_id: None,
            ttl: 60,
            weight: None,
            values: ["192.0.2.10".to_string()].into(),
        })
    };
    let batch = vec![
        good("a.example.test"),
        good("www.elsewhere.test"),
        good("b.example.test"),
    ];
    assert!(dns.provider().apply(&batch).await.is_err());
    assert!(
        query(addr, "a.example.test", RecordType::A)
            .await
            .is_empty(),
        "all or none"
    );
    let outcome = dns.apply_batch(&batch).await.unwrap();
    assert_eq!(outcome.applied, 2);
    assert_eq!(outcome.failed.len(), 1);
    assert_eq!(outcome.failed[0].0, "www.elsewhere.test");
    assert_eq!(
        query(addr, "a.example.test", RecordType::A).await,
        vec!["192.0.2.10"]
    );
    assert_eq!(
        query(addr, "b.example.test", RecordType::A).await,
        vec!["192.0.2.10"]
    );
}
