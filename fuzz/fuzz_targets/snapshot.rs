//! Any bytes as a snapshot from the controller: decoded, then checked into a proxy's
//! configuration; errors, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rampart_config::snapshot::Snapshot;

fuzz_target!(|bytes: &[u8]| {
    let Ok(snapshot) = serde_json::from_slice::<Snapshot>(bytes) else {
        return;
    };
    // A proxy's own file: its listeners (the rest comes from the snapshot).
    let local = rampart_config::parse("[listeners]\nhttp = \"127.0.0.1:8080\"\n", "local.toml")
        .expect("a file with one listener is valid");
    if let Err(issues) = snapshot.into_config(&local) {
        for issue in issues {
            let _ = issue.to_string();
        }
    }
});
