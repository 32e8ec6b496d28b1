//! The DNS planner on arbitrary names, instances and provider records: it never panics,
//! never touches a name it neither manages nor owns nor one with another owner's
//! records, and converges — applying its plan and planning again changes nothing more.
#![no_main]

use std::collections::BTreeSet;
use std::net::IpAddr;

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;

// The planner's own source, compiled here: it needs only std, and depending on
// rampart-controller would build the AWS SDK, etcd and Docker clients for nothing.
#[path = "../../controller/src/dns/plan.rs"]
#[allow(dead_code)]
mod planner;

use planner::{owner_value, plan, Change, Instance, Kind, NameSpec, Policy, RecordSet};

#[derive(Arbitrary, Debug)]
struct Input {
    names: Vec<(u8, u8, u8)>,
    instances: Vec<(u8, Vec<IpAddr>, bool)>,
    records: Vec<(u8, u8, Option<u8>, Vec<u8>, bool)>,
}

const NAMES: [&str; 4] = [
    "a.example.com",
    "b.example.com",
    "c.example.com",
    "d.example.com",
];

fn apply(actual: &mut Vec<RecordSet>, changes: &[Change]) {
    for change in changes {
        match change {
            Change::Upsert(r) | Change::Delete(r) => {
                actual.retain(|x| (&x.name, x.kind, &x.set_id) != (&r.name, r.kind, &r.set_id))
            }
        }
        if let Change::Upsert(r) = change {
            actual.push(r.clone());
        }
    }
}

fuzz_target!(|input: Input| {
    let specs: Vec<NameSpec> = input
        .names
        .iter()
        .take(3)
        .map(|&(n, policy, min)| NameSpec {
            name: NAMES[usize::from(n) % 3].to_string(),
            policy: match policy % 3 {
                0 => Policy::Multivalue,
                1 => Policy::Weighted,
                _ => Policy::Simple,
            },
            ttl: 60,
            min_records: usize::from(min % 3),
        })
        .collect();
    let mut seen = BTreeSet::new();
    let specs: Vec<NameSpec> = specs
        .into_iter()
        .filter(|s| seen.insert(s.name.clone()))
        .collect();
    let instances: Vec<Instance> = input
        .instances
        .iter()
        .take(6)
        .map(|(id, addrs, ready)| Instance {
            id: format!("p{}", id % 8),
            addrs: addrs.iter().take(3).copied().collect(),
            ready: *ready,
        })
        .collect();
    // Instance ids are unique (the registry is keyed by them).
    let mut ids = BTreeSet::new();
    let instances: Vec<Instance> = instances
        .into_iter()
        .filter(|i| ids.insert(i.id.clone()))
        .collect();
    let mut actual: Vec<RecordSet> = input
        .records
        .iter()
        .take(8)
        .map(|&(n, kind, set, ref octets, ours)| {
            let kind = match kind % 3 {
                0 => Kind::A,
                1 => Kind::Aaaa,
                _ => Kind::Txt,
            };
            let values = match kind {
                Kind::Txt if ours => [owner_value("me")].into(),
                Kind::Txt => ["\"heritage=rampart,owner=other\"".to_string()].into(),
                Kind::A => octets.iter().map(|o| format!("192.0.2.{o}")).collect(),
                Kind::Aaaa => octets.iter().map(|o| format!("2001:db8::{o:x}")).collect(),
            };
            RecordSet {
                name: NAMES[usize::from(n) % 4].to_string(),
                kind,
                set_id: set.map(|s| format!("p{}", s % 8)),
                ttl: 60,
                weight: None,
                values,
            }
        })
        .collect();
    let marker = owner_value("me");
    let owned = |name: &str| {
        actual
            .iter()
            .any(|r| r.name == name && r.kind == Kind::Txt && r.values.contains(&marker))
    };
    let foreign =
        |name: &str| !owned(name) && actual.iter().any(|r| r.name == name && r.kind != Kind::Txt);
    let first = plan("me", &specs, &instances, &actual);
    for change in &first.changes {
        let (Change::Upsert(r) | Change::Delete(r)) = change;
        // It manages the names in its specs, and cleans up names it owns that left
        // them; anything else is someone else's.
        assert!(
            specs.iter().any(|s| s.name == r.name) || owned(&r.name),
            "touched {:?}, which it neither manages nor owns",
            r.name
        );
        assert!(
            !foreign(&r.name),
            "touched {:?}, whose records are not its own",
            r.name
        );
    }
    apply(&mut actual, &first.changes);
    let second = plan("me", &specs, &instances, &actual);
    assert!(
        second.changes.is_empty(),
        "did not converge: after {:?} it wants {:?}",
        first.changes,
        second.changes
    );
});
