//! DNS planner on a large zone: 2,000 managed names with four instances each (10,000
//! record sets with the ownership TXTs), one instance dying. Prints the median plan
//! time and the batches Route53 would get (at most 1,000 changes each).

use std::collections::BTreeSet;
use std::time::Instant;

use rampart_controller::dns::plan::{plan, Instance, Kind, NameSpec, Policy, RecordSet};

const NAMES: usize = 2_000;
const INSTANCES: u8 = 4;
const RUNS: usize = 21;

fn main() {
    let specs: Vec<NameSpec> = (0..NAMES)
        .map(|i| NameSpec {
            name: format!("site{i}.example.com"),
            policy: Policy::Multivalue,
            ttl: 60,
            min_records: 1,
        })
        .collect();
    let instances = |dead: Option<u8>| -> Vec<Instance> {
        (1..=INSTANCES)
            .map(|n| Instance {
                id: format!("i-{n}"),
                addrs: vec![std::net::IpAddr::from([192, 0, 2, n])],
                ready: Some(n) != dead,
            })
            .collect()
    };
    // The zone as Rampart left it with every instance up.
    let mut actual = Vec::new();
    for s in &specs {
        actual.push(RecordSet {
            name: s.name.clone(),
            kind: Kind::Txt,
            set_id: None,
            ttl: 60,
            weight: None,
            values: [rampart_controller::dns::plan::owner_value("bench")].into(),
        });
        for n in 1..=INSTANCES {
            actual.push(RecordSet {
                name: s.name.clone(),
                kind: Kind::A,
                set_id: Some(format!("i-{n}")),
                ttl: 60,
                weight: None,
                values: BTreeSet::from([format!("192.0.2.{n}")]),
            });
        }
    }
    let sets = actual.len();
    let view = instances(Some(3));
    let mut times = Vec::with_capacity(RUNS);
    let mut last = None;
    for _ in 0..RUNS {
        let t = Instant::now();
        let p = plan("bench", &specs, &view, &actual);
        times.push(t.elapsed());
        last = Some(p);
    }
    times.sort();
    let p = last.expect("RUNS > 0");
    let batches = p.batches(1000);
    let biggest = batches.iter().map(Vec::len).max().unwrap_or(0);
    println!(
        "dns plan: {sets} record sets ({NAMES} names x {INSTANCES} instances + owner TXTs), one instance dies"
    );
    println!(
        "  plan: median {:.1} ms, max {:.1} ms over {RUNS} runs; {} changes",
        times[RUNS / 2].as_secs_f64() * 1e3,
        times[RUNS - 1].as_secs_f64() * 1e3,
        p.changes.len()
    );
    println!(
        "  Route53 batches of <= 1000: {} batches, largest {biggest}",
        batches.len()
    );
    assert!(biggest <= 1000);
    let unchanged = plan("bench", &specs, &instances(None), &actual);
    println!("  steady state: {} changes", unchanged.changes.len());
}
