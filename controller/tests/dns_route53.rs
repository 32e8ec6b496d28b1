//! The DNS loop against a real Route53 API (moto_server), with a small HTTP shim in
//! front of it for what moto does not do: throttling and PriorRequestNotComplete.
#![allow(missing_docs, clippy::unwrap_used)]

mod common;
#[path = "support/moto.rs"]
mod moto;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use aws_sdk_route53::types::{
    Change as AwsChange, ChangeAction, ChangeBatch, ResourceRecord, ResourceRecordSet, RrType,
};
use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use rampart_controller::dns::plan::{Change, Kind, RecordSet};
use rampart_controller::dns::route53::Route53;
use rampart_controller::dns::{Dns, DnsMetrics};

use common::{fleet, instance, settings};
use moto::Moto;

const ZONE: &str = "example.test";
const WWW: &str = "www.example.test";

async fn sdk_config() -> aws_config::SdkConfig {
    aws_config::defaults(aws_config::BehaviorVersion::latest())
        .region(aws_config::Region::new("us-east-1"))
        .credentials_provider(aws_sdk_route53::config::Credentials::new(
            "testing", "testing", None, None, "static",
        ))
        .load()
        .await
}

/// `(name, type, set id) -> values` of the zone's A and TXT sets.
async fn zone_sets(
    client: &aws_sdk_route53::Client,
    zone_id: &str,
) -> Vec<(String, String, Option<String>, BTreeSet<String>)> {
    let out = client
        .list_resource_record_sets()
        .hosted_zone_id(zone_id)
        .send()
        .await
        .unwrap();
    out.resource_record_sets()
        .iter()
        .filter(|r| matches!(r.r#type(), RrType::A | RrType::Txt))
        .map(|r| {
            (
                r.name().trim_end_matches('.').to_string(),
                r.r#type().as_str().to_string(),
                r.set_identifier().map(str::to_string),
                r.resource_records()
                    .iter()
                    .map(|v| v.value().to_string())
                    .collect(),
            )
        })
        .collect()
}

/// The A values published for `name`, over all its sets.
async fn a_values(client: &aws_sdk_route53::Client, zone_id: &str, name: &str) -> Vec<String> {
    let mut v: Vec<String> = zone_sets(client, zone_id)
        .await
        .into_iter()
        .filter(|(n, t, _, _)| n == name && t == "A")
        .flat_map(|(_, _, _, values)| values)
        .collect();
    v.sort();
    v
}

fn ips(range: impl IntoIterator<Item = u8>) -> Vec<String> {
    let mut v: Vec<String> = range.into_iter().map(|n| format!("192.0.2.{n}")).collect();
    v.sort();
    v
}

async fn dns_for(url: &str, zone_id: Option<String>) -> Dns {
    let provider =
        Route53::from_sdk_config(&sdk_config().await, ZONE, zone_id, Some(url.into()), false);
    Dns::new(
        Arc::new(provider),
        ZONE,
        DnsMetrics::new(&prometheus::Registry::new()),
    )
}

#[tokio::test]
async fn route53_records_follow_the_fleet_and_leave_foreign_records_alone() {
    let moto = Moto::start().await;
    let aws = moto.client().await;
    let zone_id = moto.create_zone(ZONE).await;
    // A record somebody else made, at a name Rampart is also asked to manage.
    aws.change_resource_record_sets()
        .hosted_zone_id(&zone_id)
        .change_batch(
            ChangeBatch::builder()
                .changes(
                    AwsChange::builder()
                        .action(ChangeAction::Create)
                        .resource_record_set(
                            ResourceRecordSet::builder()
                                .name("legacy.example.test.")
                                .r#type(RrType::A)
                                .ttl(300)
                                .resource_records(
                                    ResourceRecord::builder()
                                        .value("198.51.100.7")
                                        .build()
                                        .unwrap(),
                                )
                                .build()
                                .unwrap(),
                        )
                        .build()
                        .unwrap(),
                )
                .build()
                .unwrap(),
        )
        .send()
        .await
        .unwrap();

    // The zone id is looked up by name.
    let dns = dns_for(&moto.url, None).await;
    let s = settings(ZONE, &[WWW, "legacy.example.test"], "multivalue", "");
    for n in [1u8, 5, 2] {
        let out = dns.pass(&s, &fleet(n)).await.unwrap();
        assert!(out.failed.is_empty(), "{:?}", out.failed);
        assert_eq!(
            a_values(&aws, &zone_id, WWW).await,
            ips(1..=n),
            "{n} instances"
        );
    }
    // Multivalue: one set per instance, the instance id as set identifier.
    let sets = zone_sets(&aws, &zone_id).await;
    let ids: BTreeSet<Option<String>> = sets
        .iter()
        .filter(|(n, t, _, _)| n == WWW && t == "A")
        .map(|(_, _, id, _)| id.clone())
        .collect();
    assert_eq!(
        ids,
        [Some("i-1".to_string()), Some("i-2".to_string())].into()
    );
    assert!(sets.iter().any(|(n, t, _, v)| n == WWW
        && t == "TXT"
        && v.contains("\"heritage=rampart,owner=test-owner\"")));
    // Not ours: untouched, and the plan says so.
    assert_eq!(
        a_values(&aws, &zone_id, "legacy.example.test").await,
        vec!["198.51.100.7"]
    );
    let plan = dns.plan(&s, &fleet(2)).await.unwrap();
    assert!(
        plan.changes.is_empty(),
        "re-planning changes nothing: {:?}",
        plan.changes
    );
    assert_eq!(plan.skipped.len(), 1);

    // An instance dies.
    dns.pass(&s, &[instance(1, true), instance(2, false)])
        .await
        .unwrap();
    assert_eq!(a_values(&aws, &zone_id, WWW).await, ips([1]));

    // The name leaves the configuration: its records and TXT go.
    let none = settings(ZONE, &["legacy.example.test"], "multivalue", "");
    dns.pass(&none, &fleet(1)).await.unwrap();
    assert!(zone_sets(&aws, &zone_id)
        .await
        .iter()
        .all(|(n, _, _, _)| n != WWW));
    assert_eq!(
        a_values(&aws, &zone_id, "legacy.example.test").await,
        vec!["198.51.100.7"]
    );
}

#[tokio::test]
async fn route53_weighted_sets_and_an_invalid_record_isolated() {
    let moto = Moto::start().await;
    let aws = moto.client().await;
    let zone_id = moto.create_zone(ZONE).await;
    let dns = dns_for(&moto.url, Some(zone_id.clone())).await;
    let s = settings(ZONE, &["api.example.test"], "weighted", "");
    dns.pass(&s, &fleet(3)).await.unwrap();
    let out = aws
        .list_resource_record_sets()
        .hosted_zone_id(&zone_id)
        .send()
        .await
        .unwrap();
    let weighted: Vec<_> = out
        .resource_record_sets()
        .iter()
        .filter(|r| r.r#type() == &RrType::A)
        .collect();
    assert_eq!(weighted.len(), 3);
    assert!(weighted
        .iter()
        .all(|r| r.weight() == Some(1) && r.set_identifier().is_some()));

    // One bad change (deleting a set that does not exist) among good ones: the rest land.
    let set = |name: &str| RecordSet {
        name: name.into(),
        kind: Kind::A,
        set_id: None,
        ttl: 60,
        weight: None,
        values: ["192.0.2.50".to_string()].into(),
    };
    let batch = vec![
        Change::Upsert(set("a.example.test")),
        Change::Delete(set("missing.example.test")),
        Change::Upsert(set("b.example.test")),
    ];
    let outcome = dns.apply_batch(&batch).await.unwrap();
    assert_eq!(outcome.applied, 2, "{:?}", outcome.failed);
    assert_eq!(outcome.failed.len(), 1);
    assert_eq!(outcome.failed[0].0, "missing.example.test");
    assert_eq!(
        a_values(&aws, &zone_id, "a.example.test").await,
        vec!["192.0.2.50"]
    );
    assert_eq!(
        a_values(&aws, &zone_id, "b.example.test").await,
        vec!["192.0.2.50"]
    );
}

/// What the shim in front of moto does and saw.
#[derive(Default)]
struct Faults {
    /// Answer this many change requests with Throttling...
    throttle: usize,
    /// ...then this many with PriorRequestNotComplete.
    prior: usize,
    /// Answer this many GetChange calls with PENDING.
    pending: usize,
    /// Change requests refused so far.
    refused: AtomicUsize,
    /// GetChange calls so far.
    get_changes: AtomicUsize,
}

fn error_response(code: &str) -> hyper::Response<Full<Bytes>> {
    let body = format!(
        "<?xml version=\"1.0\"?>\n<ErrorResponse xmlns=\"https://route53.amazonaws.com/doc/2013-04-01/\"><Error><Type>Sender</Type><Code>{code}</Code><Message>Rate exceeded</Message></Error><RequestId>shim</RequestId></ErrorResponse>"
    );
    hyper::Response::builder()
        .status(400)
        .header("content-type", "text/xml")
        .body(Full::new(Bytes::from(body)))
        .unwrap()
}

async fn forward(
    upstream: SocketAddr,
    req: hyper::Request<hyper::body::Incoming>,
) -> Result<(http::response::Parts, Bytes), hyper::Error> {
    let (parts, body) = req.into_parts();
    let body = body.collect().await?.to_bytes();
    let tcp = tokio::net::TcpStream::connect(upstream).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp)).await?;
    tokio::spawn(conn);
    let resp = sender
        .send_request(hyper::Request::from_parts(parts, Full::new(body)))
        .await?;
    let (parts, body) = resp.into_parts();
    Ok((parts, body.collect().await?.to_bytes()))
}

async fn handle(
    upstream: SocketAddr,
    faults: Arc<Faults>,
    req: hyper::Request<hyper::body::Incoming>,
) -> Result<hyper::Response<Full<Bytes>>, hyper::Error> {
    let change = req.method() == hyper::Method::POST && req.uri().path().ends_with("/rrset");
    if change {
        let n = faults.refused.load(Ordering::SeqCst);
        let code = if n < faults.throttle {
            Some("Throttling")
        } else if n < faults.throttle + faults.prior {
            Some("PriorRequestNotComplete")
        } else {
            None
        };
        if let Some(code) = code {
            faults.refused.fetch_add(1, Ordering::SeqCst);
            return Ok(error_response(code));
        }
    }
    let get_change = req.method() == hyper::Method::GET && req.uri().path().contains("/change/");
    let (mut parts, mut body) = forward(upstream, req).await?;
    if get_change && faults.get_changes.fetch_add(1, Ordering::SeqCst) < faults.pending {
        body = Bytes::from(String::from_utf8_lossy(&body).replace("INSYNC", "PENDING"));
        parts.headers.remove(http::header::CONTENT_LENGTH);
    }
    Ok(hyper::Response::from_parts(parts, Full::new(body)))
}

/// An HTTP shim in front of moto that injects `faults`, as Route53 behaves under load.
async fn shim(upstream: SocketAddr, faults: Faults) -> (String, Arc<Faults>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let faults = Arc::new(faults);
    let shared = faults.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let faults = shared.clone();
            tokio::spawn(async move {
                let service =
                    hyper::service::service_fn(move |req| handle(upstream, faults.clone(), req));
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    (format!("http://{addr}"), faults)
}

#[tokio::test]
async fn route53_throttling_is_retried_with_back_off() {
    let moto = Moto::start().await;
    let aws = moto.client().await;
    let zone_id = moto.create_zone(ZONE).await;
    let upstream: SocketAddr = moto.url.trim_start_matches("http://").parse().unwrap();
    let (url, faults) = shim(
        upstream,
        Faults {
            throttle: 2,
            prior: 2,
            ..Faults::default()
        },
    )
    .await;
    let dns = dns_for(&url, Some(zone_id.clone())).await;
    let s = settings(ZONE, &[WWW], "multivalue", "");
    let out = dns.pass(&s, &fleet(2)).await.unwrap();
    assert!(out.failed.is_empty());
    assert_eq!(
        faults.refused.load(Ordering::SeqCst),
        4,
        "two Throttling, two PriorRequestNotComplete"
    );
    assert_eq!(a_values(&aws, &zone_id, WWW).await, ips(1..=2));

    // Throttled for longer than the back-off lasts: the pass fails as transient (the
    // next pass retries) and nothing is half-applied.
    let (url, _) = shim(
        upstream,
        Faults {
            throttle: 100,
            ..Faults::default()
        },
    )
    .await;
    let dns = dns_for(&url, Some(zone_id.clone())).await;
    let err = dns.pass(&s, &fleet(3)).await.unwrap_err();
    assert!(err.to_string().contains("Throttling"), "{err}");
    assert_eq!(a_values(&aws, &zone_id, WWW).await, ips(1..=2));
    assert!(dns.status().last_error.unwrap().contains("Throttling"));
}

#[tokio::test]
async fn route53_waits_for_insync_when_asked() {
    let moto = Moto::start().await;
    let aws = moto.client().await;
    let zone_id = moto.create_zone(ZONE).await;
    let upstream: SocketAddr = moto.url.trim_start_matches("http://").parse().unwrap();
    let (url, faults) = shim(
        upstream,
        Faults {
            pending: 1,
            ..Faults::default()
        },
    )
    .await;
    let provider = Route53::from_sdk_config(
        &sdk_config().await,
        ZONE,
        Some(zone_id.clone()),
        Some(url),
        true,
    );
    let dns = Dns::new(
        Arc::new(provider),
        ZONE,
        DnsMetrics::new(&prometheus::Registry::new()),
    );
    let s = settings(ZONE, &[WWW], "simple", "");
    dns.pass(&s, &fleet(1)).await.unwrap();
    // One PENDING answer, then INSYNC: the pass asked twice before returning.
    assert_eq!(faults.get_changes.load(Ordering::SeqCst), 2);
    assert_eq!(a_values(&aws, &zone_id, WWW).await, ips([1]));
}
