//! Route matching: host (exact, `*.wildcard`, any), path prefix at segment boundaries,
//! header equality, then priority and specificity.
//!
//! Routes are indexed by host so a request only looks at the routes that can match its
//! host: the exact-host bucket, the wildcard bucket of its parent domain and the
//! any-host bucket. Each bucket is pre-sorted by rank, so the first match in a bucket is
//! its best; the best of the (at most three) bucket winners is the answer.

use std::cmp::Reverse;
use std::collections::HashMap;

use http::HeaderMap;
use rampart_config::{HostPattern, Route};

/// A request's routing inputs.
#[derive(Clone, Copy, Debug)]
pub struct RouteRequest<'a> {
    /// Host, lowercase, without port or trailing dot.
    pub host: &'a str,
    /// Path, without the query.
    pub path: &'a str,
    /// Request headers.
    pub headers: &'a HeaderMap,
}

/// How specific a route's host match is (higher wins a priority tie).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum HostRank {
    Any = 0,
    Wildcard = 1,
    Exact = 2,
}

/// Sort key: priority, then host specificity, then prefix length, then the number of
/// header conditions, then file order.
type Rank = (
    Reverse<i32>,
    Reverse<HostRank>,
    Reverse<usize>,
    Reverse<usize>,
    usize,
);

#[derive(Debug)]
struct Candidate {
    rank: Rank,
    route: usize,
}

/// The compiled route table of a generation.
#[derive(Debug, Default)]
pub struct Router {
    exact: HashMap<String, Vec<Candidate>>,
    wildcard: HashMap<String, Vec<Candidate>>,
    any: Vec<Candidate>,
    routes: Vec<CompiledMatch>,
}

#[derive(Debug)]
struct CompiledMatch {
    prefix: String,
    headers: Vec<(http::HeaderName, String)>,
}

impl Router {
    /// Compiles the routes of a validated configuration; returned indexes refer to `routes`.
    #[must_use]
    pub fn new(routes: &[Route]) -> Self {
        let mut r = Router::default();
        for (i, route) in routes.iter().enumerate() {
            let prefix_len = route.path_prefix.trim_end_matches('/').len();
            let rank = |h| {
                (
                    Reverse(route.priority),
                    Reverse(h),
                    Reverse(prefix_len),
                    Reverse(route.headers.len()),
                    i,
                )
            };
            if route.hosts.is_empty() {
                r.any.push(Candidate {
                    rank: rank(HostRank::Any),
                    route: i,
                });
            }
            for host in &route.hosts {
                match host {
                    HostPattern::Exact(h) => {
                        r.exact.entry(h.to_string()).or_default().push(Candidate {
                            rank: rank(HostRank::Exact),
                            route: i,
                        })
                    }
                    HostPattern::Wildcard(s) => {
                        r.wildcard
                            .entry(s.to_string())
                            .or_default()
                            .push(Candidate {
                                rank: rank(HostRank::Wildcard),
                                route: i,
                            })
                    }
                }
            }
            let headers = route
                .headers
                .iter()
                .filter_map(|(k, v)| {
                    Some((http::HeaderName::from_bytes(k.as_bytes()).ok()?, v.clone()))
                })
                .collect();
            r.routes.push(CompiledMatch {
                prefix: route.path_prefix.clone(),
                headers,
            });
        }
        for bucket in r
            .exact
            .values_mut()
            .chain(r.wildcard.values_mut())
            .chain(std::iter::once(&mut r.any))
        {
            bucket.sort_by_key(|c| c.rank);
        }
        r
    }

    /// The index of the best route for `req`, if any matches.
    #[must_use]
    pub fn select(&self, req: &RouteRequest<'_>) -> Option<usize> {
        let exact = self.exact.get(req.host);
        let wildcard = req
            .host
            .split_once('.')
            .and_then(|(_, parent)| self.wildcard.get(parent));
        [
            exact.map(Vec::as_slice),
            wildcard.map(Vec::as_slice),
            Some(self.any.as_slice()),
        ]
        .into_iter()
        .flatten()
        .filter_map(|bucket| bucket.iter().find(|c| self.matches(c.route, req)))
        .min_by_key(|c| c.rank)
        .map(|c| c.route)
    }

    fn matches(&self, route: usize, req: &RouteRequest<'_>) -> bool {
        let m = &self.routes[route];
        path_matches(&m.prefix, req.path)
            && m.headers.iter().all(|(name, want)| {
                req.headers
                    .get_all(name)
                    .iter()
                    .any(|v| v.as_bytes() == want.as_bytes())
            })
    }
}

/// The request target a route that strips `prefix` (no trailing slash) sends
/// upstream for `uri`: its path without the prefix, at least `/`, and its query as it
/// came (`/api/users?x=1` → `/users?x=1`, `/api` → `/`). Always origin-form, also for
/// an absolute-form request.
#[must_use]
pub fn stripped_target(prefix: &str, uri: &http::Uri) -> String {
    let path = uri.path();
    let rest = path.strip_prefix(prefix).unwrap_or(path);
    let query = uri.query();
    let mut out = String::with_capacity(rest.len() + query.map_or(0, |q| q.len() + 1) + 1);
    if !rest.starts_with('/') {
        out.push('/');
    }
    out.push_str(rest);
    if let Some(q) = query {
        out.push('?');
        out.push_str(q);
    }
    out
}

/// Whether `prefix` matches `path` at a segment boundary: "/api" matches "/api" and
/// "/api/x" but not "/apix"; "/" and "/api/" match anything that starts with them.
#[must_use]
pub fn path_matches(prefix: &str, path: &str) -> bool {
    if prefix.ends_with('/') {
        return path.starts_with(prefix) || path == prefix.trim_end_matches('/');
    }
    path.strip_prefix(prefix)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stripped_prefix_leaves_the_rest_of_the_path_and_the_query() {
        let strip = |prefix: &str, target: &str| {
            stripped_target(
                prefix,
                &target.parse::<http::Uri>().expect("a valid target"),
            )
        };
        assert_eq!(strip("/api", "/api/users?x=1"), "/users?x=1");
        assert_eq!(strip("/api", "/api"), "/");
        assert_eq!(strip("/api", "/api?x=1"), "/?x=1");
        assert_eq!(strip("/api", "/api/"), "/");
        assert_eq!(strip("/api/v1", "/api/v1/a/b/"), "/a/b/");
        assert_eq!(strip("/api", "http://a.test/api/x?q"), "/x?q");
        // Percent-encoded bytes are passed on as they came.
        assert_eq!(strip("/api", "/api/a%2Fb"), "/a%2Fb");
    }

    fn routes(src: &str) -> Vec<Route> {
        #[derive(serde::Deserialize)]
        struct R {
            routes: Vec<Route>,
        }
        toml::from_str::<R>(src).unwrap().routes
    }

    fn select(router: &Router, host: &str, path: &str, headers: &[(&str, &str)]) -> Option<usize> {
        let mut map = HeaderMap::new();
        for (k, v) in headers {
            map.append(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        router.select(&RouteRequest {
            host,
            path,
            headers: &map,
        })
    }

    const TABLE: &str = r#"
        [[routes]]
        name = "catch-all"
        action = { forward = "p" }
        [[routes]]
        name = "example"
        hosts = ["example.com"]
        action = { forward = "p" }
        [[routes]]
        name = "example-api"
        hosts = ["example.com"]
        path_prefix = "/api"
        action = { forward = "p" }
        [[routes]]
        name = "wild"
        hosts = ["*.example.com"]
        action = { forward = "p" }
        [[routes]]
        name = "canary"
        hosts = ["example.com"]
        path_prefix = "/api"
        headers = { "X-Canary" = "1" }
        action = { forward = "p" }
        [[routes]]
        name = "maintenance"
        hosts = ["down.example.com"]
        priority = -1
        action = { forward = "p" }
        [[routes]]
        name = "urgent"
        path_prefix = "/urgent"
        priority = 10
        action = { forward = "p" }
    "#;

    #[test]
    fn routing_matrix() {
        let r = Router::new(&routes(TABLE));
        type Case<'a> = (&'a str, &'a str, &'a [(&'a str, &'a str)], Option<usize>);
        let cases: &[Case<'_>] = &[
            ("other.org", "/", &[], Some(0)),
            ("example.com", "/", &[], Some(1)),
            ("example.com", "/api", &[], Some(2)),
            ("example.com", "/api/users", &[], Some(2)),
            ("example.com", "/apix", &[], Some(1)),
            ("example.com", "/api/x", &[("x-canary", "1")], Some(4)),
            ("example.com", "/api/x", &[("x-canary", "2")], Some(2)),
            ("a.example.com", "/", &[], Some(3)),
            ("a.b.example.com", "/", &[], Some(0)),
            // exact host with a lower priority loses to a wildcard with the default priority
            ("down.example.com", "/", &[], Some(3)),
            ("example.com", "/urgent/now", &[], Some(6)),
        ];
        for (host, path, headers, want) in cases {
            assert_eq!(
                select(&r, host, path, headers),
                *want,
                "{host}{path} {headers:?}"
            );
        }
    }

    #[test]
    fn no_route_without_catch_all() {
        let r = Router::new(&routes(
            r#"
            [[routes]]
            name = "only"
            hosts = ["a.test"]
            action = { forward = "p" }
        "#,
        ));
        assert_eq!(select(&r, "b.test", "/", &[]), None);
        assert_eq!(select(&r, "a.test", "/", &[]), Some(0));
    }

    #[test]
    fn prefix_boundaries() {
        assert!(path_matches("/", "/anything"));
        assert!(path_matches("/api", "/api"));
        assert!(path_matches("/api", "/api/"));
        assert!(!path_matches("/api", "/apiv2"));
        assert!(path_matches("/api/", "/api/x"));
        assert!(path_matches("/api/", "/api"));
        assert!(!path_matches("/api/", "/apix"));
    }
}
