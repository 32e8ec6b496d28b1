//! Any text through the configuration parser and validator: an error or a config,
//! never a panic; a config that parses also prints its errors' positions in range.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|text: &str| {
    if let Err(e) = rampart_config::parse(text, "fuzz.toml") {
        // Rendering the errors (with line and column) must not panic either.
        let _ = e.to_string();
    }
});
