//! The HTTP/1 fast path's request parsing and upstream head building, on arbitrary
//! bytes from a client: it never panics, and what it sends upstream is exactly one
//! unambiguous HTTP/1.1 request — one complete head, one Host, no Transfer-Encoding,
//! at most one Content-Length, and exactly that many body bytes after the head — or
//! nothing (declined to Pingora, or answered by the policy).
#![no_main]

use std::sync::LazyLock;

use libfuzzer_sys::fuzz_target;
use rampart_proxy::generation::{Builder, Generation};

/// A generation forwarding every host to one pool, built once.
static GENERATION: LazyLock<(Generation, std::path::PathBuf)> = LazyLock::new(|| {
    let dir = std::env::temp_dir().join(format!("rampart-fuzz-http1-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("a temporary directory");
    let text = format!(
        "[server]\ndata_dir = {dir:?}\n\n[listeners]\nhttp = \"127.0.0.1:0\"\n\n\
         [[routes]]\nname = \"all\"\naction = {{ forward = \"app\" }}\n\n\
         [[routes]]\nname = \"api\"\npath_prefix = \"/api\"\nstrip_prefix = true\naction = {{ forward = \"app\" }}\n\n\
         [pools.app]\nendpoints = [{{ address = \"127.0.0.1:9\" }}]\n"
    );
    let config = rampart_config::parse(&text, "fuzz.toml").expect("a valid configuration");
    let metrics = std::sync::Arc::new(rampart_proxy::metrics::Metrics::new());
    let generation = Builder::new(dir.clone(), metrics)
        .build(config, 1, None)
        .expect("a generation");
    (generation, dir)
});

fuzz_target!(|bytes: &[u8]| {
    let Some(up) = rampart_proxy::fast::h1::upstream_request_for(bytes, &GENERATION.0) else {
        return;
    };
    let mut headers = [httparse::EMPTY_HEADER; 128];
    let mut req = httparse::Request::new(&mut headers);
    let Ok(httparse::Status::Complete(head_len)) = req.parse(&up) else {
        panic!("the upstream head does not parse as one complete request: {up:?}");
    };
    assert_eq!(req.version, Some(1));
    let count = |name: &str| req.headers.iter().filter(|h| h.name.eq_ignore_ascii_case(name)).count();
    assert_eq!(count("host"), 1, "one Host: {up:?}");
    assert_eq!(count("transfer-encoding"), 0, "{up:?}");
    assert!(count("content-length") <= 1, "{up:?}");
    let length = req
        .headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case("content-length"))
        .map_or(0, |h| std::str::from_utf8(h.value).unwrap().trim().parse::<usize>().unwrap());
    let body = up.len() - head_len;
    // The fast path reads the rest of the body from the socket after this: what came
    // with the head is at most the declared length.
    assert!(body <= length, "{body} body bytes for Content-Length {length}: {up:?}");
    let host = req.headers.iter().find(|h| h.name.eq_ignore_ascii_case("host")).unwrap();
    assert!(
        !host.value.iter().any(|b| b"\",; ".contains(b)),
        "a Host the policy should have refused: {up:?}"
    );
});
