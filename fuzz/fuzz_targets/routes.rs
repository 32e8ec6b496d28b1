//! Routing tables from arbitrary routes, asked about arbitrary requests: the matcher
//! never panics, and what it picks really matches the request.
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use rampart_proxy::routing::{RouteRequest, Router};

#[derive(Arbitrary, Debug)]
struct Input {
    routes: Vec<(Vec<String>, String, i32)>,
    host: String,
    path: String,
    header: Option<(String, String)>,
}

fuzz_target!(|input: Input| {
    let mut text = String::new();
    for (i, (hosts, prefix, priority)) in input.routes.iter().enumerate().take(16) {
        let hosts: Vec<String> = hosts.iter().take(4).map(|h| format!("{h:?}")).collect();
        text.push_str(&format!(
            "[[routes]]\nname = \"r{i}\"\nhosts = [{}]\npath_prefix = {prefix:?}\npriority = {priority}\naction = {{ respond = {{ status = 200 }} }}\n",
            hosts.join(", ")
        ));
    }
    // Only valid tables are ever built: invalid ones are rejected by validation.
    let Ok(config) = rampart_config::parse(&text, "fuzz.toml") else {
        return;
    };
    let router = Router::new(&config.routes);
    let mut headers = http::HeaderMap::new();
    if let Some((k, v)) = &input.header {
        if let (Ok(k), Ok(v)) = (
            http::HeaderName::from_bytes(k.as_bytes()),
            http::HeaderValue::from_str(v),
        ) {
            headers.insert(k, v);
        }
    }
    let host = input.host.to_ascii_lowercase();
    let req = RouteRequest {
        host: &host,
        path: &input.path,
        headers: &headers,
    };
    if let Some(i) = router.select(&req) {
        let route = &config.routes[i];
        let prefix = route.path_prefix.trim_end_matches('/');
        assert!(
            input.path == prefix
                || input.path.starts_with(&format!("{prefix}/"))
                || route.path_prefix == "/",
            "{:?} picked for path {:?}",
            route.path_prefix,
            input.path
        );
        assert!(
            route.hosts.is_empty() || route.hosts.iter().any(|h| h.matches(&host)),
            "{:?} picked for host {host:?}",
            route.hosts
        );
    }
});
