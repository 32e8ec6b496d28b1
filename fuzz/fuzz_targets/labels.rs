//! Any container labels through the label parser: routes and endpoints, or errors that
//! each name the container; never a panic.
#![no_main]

use std::collections::BTreeMap;

use libfuzzer_sys::fuzz_target;

// The parser's own source, compiled here: it needs only rampart-config, and depending on
// rampart-controller would build the AWS SDK, etcd and Docker clients for nothing.
#[path = "../../controller/src/discovery/labels.rs"]
#[allow(dead_code)]
mod labels;

fuzz_target!(|pairs: Vec<(String, String)>| {
    // Mostly rampart.* keys, so the parser gets past its first check.
    let labels: BTreeMap<String, String> = pairs
        .into_iter()
        .map(|(k, v)| {
            let k = if k.starts_with('!') {
                k
            } else {
                format!("rampart.{k}")
            };
            (k, v)
        })
        .chain([("rampart.enable".to_string(), "true".to_string())])
        .collect();
    match labels::parse("fuzz", &labels, [10, 0, 0, 1].into()) {
        Ok(_) => {}
        Err(errors) => assert!(errors.iter().all(|e| e.starts_with("fuzz"))),
    }
});
