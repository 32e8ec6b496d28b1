//! The proxy's dashboard on the admin listener: one server-rendered page (maud) with the
//! traffic of the last minutes, routes → pools → endpoints with their health, and the
//! certificates served; a few lines of JavaScript refresh its body every few seconds.
//! The same data is JSON under `/api/v1/`. Nothing is fetched from elsewhere.

use maud::{html, Markup};
use serde::Serialize;

use crate::generation::Generation;
use crate::health::now_ms;
use crate::live::Live;
use crate::rolling::{Point, Summary};

/// What the overview shows.
#[derive(Clone, Debug, Serialize)]
pub struct Overview {
    /// Configuration version being served.
    pub version: u64,
    /// Serving a configuration and not shutting down.
    pub ready: bool,
    /// The last minute.
    pub last_minute: Summary,
    /// The last five minutes.
    pub last_5_minutes: Summary,
    /// Requests and 5xx per second, oldest first.
    pub series: Vec<Point>,
}

/// One endpoint as the dashboard shows it.
#[derive(Clone, Debug, Serialize)]
pub struct EndpointView {
    /// Address as configured.
    pub address: String,
    /// Weight.
    pub weight: u32,
    /// Gets traffic now.
    pub available: bool,
    /// The active health check's verdict.
    pub active_healthy: bool,
    /// Ejected by passive health for this much longer.
    pub ejected_for_ms: Option<u64>,
    /// Left the pool at a reload; its requests in flight may still finish.
    pub draining: bool,
    /// Requests in flight.
    pub inflight: u64,
}

/// A pool and its endpoints.
#[derive(Clone, Debug, Serialize)]
pub struct PoolView {
    /// Pool name.
    pub name: String,
    /// Balancing policy.
    pub balance: String,
    /// Its weight in the route's split (none: the route forwards to it alone).
    pub weight: Option<u32>,
    /// Its endpoints.
    pub endpoints: Vec<EndpointView>,
}

/// A route and where it sends requests.
#[derive(Clone, Debug, Serialize)]
pub struct RouteView {
    /// Route name.
    pub name: String,
    /// Hosts (empty: any).
    pub hosts: Vec<String>,
    /// Path prefix.
    pub path_prefix: String,
    /// What it does: `forward → pool`, `redirect → URL`, `respond 503`.
    pub action: String,
    /// Its other rules, one phrase each: `strips /api`, `only from 10.0.0.0/8`,
    /// `login: 2 users`, `request: sets X-Env`, `response: removes Server`.
    pub rules: Vec<String>,
    /// The pool of a forward route (of a split: the first; all are in `pools`).
    pub pool: Option<PoolView>,
    /// Every pool of a forward route, with its weight when the route splits.
    pub pools: Vec<PoolView>,
}

/// The phrases of [`RouteView::rules`] for `r`.
fn route_rules(r: &rampart_config::Route) -> Vec<String> {
    let mut rules = Vec::new();
    if r.strip_prefix {
        rules.push(format!("strips {}", r.path_prefix.trim_end_matches('/')));
    }
    if !r.allow_from.is_empty() {
        let list: Vec<String> = r.allow_from.iter().map(ToString::to_string).collect();
        rules.push(format!("only from {}", list.join(", ")));
    }
    if let Some(auth) = &r.basic_auth {
        rules.push(format!("login: {} users", auth.users.len()));
    }
    for (side, h) in [
        ("request", &r.request_headers),
        ("response", &r.response_headers),
    ] {
        if !h.set.is_empty() {
            let names: Vec<&str> = h.set.keys().map(String::as_str).collect();
            rules.push(format!("{side}: sets {}", names.join(", ")));
        }
        if !h.remove.is_empty() {
            rules.push(format!("{side}: removes {}", h.remove.join(", ")));
        }
    }
    rules
}

/// A certificate being served.
#[derive(Clone, Debug, Serialize)]
pub struct CertificateView {
    /// Name it is served for.
    pub name: String,
    /// Issuer.
    pub issuer: String,
    /// Not-after, Unix seconds.
    pub not_after_unix: i64,
    /// Whole days left (negative: expired).
    pub days_left: i64,
    /// Fewer than [`rampart_admin::page::WARN_DAYS`] left.
    pub expiring: bool,
}

/// Everything on the page.
#[derive(Clone, Debug, Serialize)]
pub struct View {
    /// Traffic and version.
    pub overview: Overview,
    /// Routes with their pools.
    pub routes: Vec<RouteView>,
    /// Certificates.
    pub certificates: Vec<CertificateView>,
    /// The last failed requests, newest first (at most [`RECENT_SHOWN`]).
    pub recent_errors: Vec<crate::access::RecentError>,
}

/// Failed requests the page lists (`/api/v1/errors` has more).
pub const RECENT_SHOWN: usize = 20;

/// The view of the live state.
#[must_use]
pub fn view(live: &Live, generation: &Generation) -> View {
    let now = now_ms();
    let rolling = &live.metrics.rolling;
    let overview = Overview {
        version: generation.version,
        ready: live.is_ready(),
        last_minute: rolling.summary(60),
        last_5_minutes: rolling.summary(crate::rolling::WINDOW),
        series: rolling.series(120),
    };
    let pool_view = |name: &str, weight: Option<u32>| {
        let p = generation.pools.get(name)?;
        let balance = generation
            .config
            .pools
            .get(name)
            .and_then(|c| serde_json::to_value(c.balance).ok())
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default();
        Some(PoolView {
            name: p.name.clone(),
            balance,
            weight,
            endpoints: p
                .endpoints
                .iter()
                .map(|e| EndpointView {
                    address: e.id.clone(),
                    weight: e.weight,
                    available: e.state.is_available(now),
                    active_healthy: e.state.active_healthy(),
                    ejected_for_ms: e.state.ejected_until(now).map(|u| u - now),
                    draining: false,
                    inflight: e.state.inflight(),
                })
                .chain(draining(live, name))
                .collect(),
        })
    };
    let routes = generation
        .config
        .routes
        .iter()
        .map(|r| {
            let (action, pools) = match &r.action {
                rampart_config::Action::Forward(to) => {
                    let pools = match to {
                        rampart_config::ForwardTo::Pool(p) => {
                            pool_view(p, None).into_iter().collect()
                        }
                        rampart_config::ForwardTo::Split(s) => s
                            .iter()
                            .filter_map(|w| pool_view(&w.pool, Some(w.weight)))
                            .collect(),
                    };
                    (format!("forward → {to}"), pools)
                }
                rampart_config::Action::Redirect(x) => (
                    format!("redirect {} → {}", x.status, x.location),
                    Vec::new(),
                ),
                rampart_config::Action::Respond(x) => (format!("respond {}", x.status), Vec::new()),
            };
            RouteView {
                name: r.name.clone(),
                hosts: r.hosts.iter().map(ToString::to_string).collect(),
                path_prefix: r.path_prefix.clone(),
                action,
                rules: route_rules(r),
                pool: pools.first().cloned(),
                pools,
            }
        })
        .collect();
    let unix_now = rampart_config::unix_now_signed();
    let mut certificates: Vec<CertificateView> = generation
        .certs
        .entries()
        .map(|(name, c)| certificate_view(&name, &c.issuer, c.not_after, unix_now))
        .collect();
    certificates.sort_by(|a, b| a.name.cmp(&b.name));
    let mut recent_errors = live.metrics.recent_errors.newest_first();
    recent_errors.truncate(RECENT_SHOWN);
    View {
        overview,
        routes,
        certificates,
        recent_errors,
    }
}

/// Endpoints that left pool `pool` at a reload and still have requests in flight
/// (within the pool's drain timeout).
fn draining(live: &Live, pool: &str) -> Vec<EndpointView> {
    let replaced: Vec<_> = live
        .replaced
        .lock()
        .expect("never poisoned: no panics while held")
        .iter()
        .filter_map(std::sync::Weak::upgrade)
        .collect();
    let mut out: Vec<EndpointView> = Vec::new();
    for generation in replaced {
        let Some(p) = generation.pools.get(pool) else {
            continue;
        };
        for e in &p.endpoints {
            if e.state.is_removed()
                && !e.state.drained(p.drain_timeout)
                && e.state.inflight() > 0
                && !out.iter().any(|o| o.address == e.id)
            {
                out.push(EndpointView {
                    address: e.id.clone(),
                    weight: e.weight,
                    available: false,
                    active_healthy: e.state.active_healthy(),
                    ejected_for_ms: None,
                    draining: true,
                    inflight: e.state.inflight(),
                });
            }
        }
    }
    out
}

fn certificate_view(name: &str, issuer: &str, not_after: i64, now: i64) -> CertificateView {
    let (days_left, expiring) = rampart_admin::page::days_left(not_after, now);
    CertificateView {
        name: name.to_string(),
        issuer: issuer.to_string(),
        not_after_unix: not_after,
        days_left,
        expiring,
    }
}

/// A small line chart of requests (and 5xx, in red) per second.
fn chart(series: &[Point]) -> Markup {
    let (w, h) = (360.0, 60.0);
    let max = series.iter().map(|p| p.requests).max().unwrap_or(0).max(1) as f64;
    let step = if series.len() > 1 {
        w / (series.len() - 1) as f64
    } else {
        w
    };
    let line = |f: fn(&Point) -> u64| {
        series
            .iter()
            .enumerate()
            .map(|(i, p)| format!("{:.1},{:.1}", i as f64 * step, h - f(p) as f64 / max * h))
            .collect::<Vec<_>>()
            .join(" ")
    };
    html! {
        svg class="chart" viewBox=(format!("0 0 {w} {h}")) width="360" height="60" role="img" aria-label="requests per second" {
            polyline points=(line(|p| p.requests)) fill="none" stroke="#2563eb" stroke-width="1.5" {}
            polyline points=(line(|p| p.errors)) fill="none" stroke="#dc2626" stroke-width="1.5" {}
        }
    }
}

/// Renderings of the body since start: each carries its number (`data-rendering`), so
/// a page that refreshed itself shows a higher one than it was loaded with.
static RENDERINGS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// The page body (also served alone at `/?body` for the refresh).
#[must_use]
pub fn body(v: &View) -> Markup {
    let o = &v.overview;
    let rendering = RENDERINGS.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
    html! {
        span hidden data-rendering=(rendering) {}
        section id="overview" {
            h2 { "Overview" }
            p {
                "Configuration version " strong { (o.version) } " — "
                @if o.ready { span class="ok" { "ready" } } @else { span class="bad" { "not ready" } }
            }
            table {
                tr { th { "" } th { "requests/s" } th { "5xx ratio" } th { "p50" } th { "p99" } }
                @for (label, s) in [("last minute", &o.last_minute), ("last 5 minutes", &o.last_5_minutes)] {
                    tr {
                        td { (label) }
                        td { (format!("{:.1}", s.rate)) }
                        td class=@if s.error_ratio > 0.01 { "bad" } { (format!("{:.2}%", s.error_ratio * 100.0)) }
                        td { (format!("{:.1} ms", s.p50_ms)) }
                        td { (format!("{:.1} ms", s.p99_ms)) }
                    }
                }
            }
            (chart(&o.series))
            p class="note" { "Requests per second over the last two minutes; 5xx in red." }
        }
        section id="routes" {
            h2 { "Routes, pools and endpoints" }
            table {
                tr { th { "route" } th { "hosts" } th { "path" } th { "action" } th { "endpoints" } }
                @for r in &v.routes {
                    tr {
                        td { (r.name) }
                        td { @if r.hosts.is_empty() { "any" } @else { (r.hosts.join(", ")) } }
                        td {
                            code { (r.path_prefix) }
                            @for rule in &r.rules { br; span class="rule" { (rule) } }
                        }
                        td { (r.action) @if let [p] = &r.pools[..] { " (" (p.balance) ")" } }
                        td {
                            @for p in &r.pools {
                                @if let Some(w) = p.weight {
                                    div class="split" { "pool " (p.name) " · weight " (w) " (" (p.balance) ")" }
                                }
                                @if p.endpoints.is_empty() { span class="bad" { "no endpoints" } }
                                ul {
                                    @for e in &p.endpoints {
                                        li class=(endpoint_class(e)) data-endpoint=(e.address) {
                                            (e.address) " "
                                            span class="state" { (endpoint_state(e)) }
                                            " · weight " (e.weight) " · in flight " (e.inflight)
                                        }
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
        section id="recent-errors" {
            h2 { "Recent errors" }
            @if v.recent_errors.is_empty() {
                p class="note" { "No failed request since the proxy started." }
            } @else {
                table {
                    tr { th { "when" } th { "status" } th { "error" } th { "route" } th { "upstream" } th { "duration" } th { "request id" } }
                    @for e in &v.recent_errors {
                        tr class="bad" data-request-id=(e.request_id) {
                            td { (rampart_admin::page::when(e.time_ms)) }
                            td { (e.status) }
                            td { (e.error.unwrap_or("-")) @if let Some(r) = &e.request { br; code { (r) } } }
                            td { (e.route.as_deref().unwrap_or("-")) }
                            td { (e.upstream.as_deref().unwrap_or("-")) }
                            td { (format!("{:.1} ms", e.duration_ms)) }
                            td { code { (e.request_id) } }
                        }
                    }
                }
            }
        }
        section id="certificates" {
            h2 { "Certificates" }
            table {
                tr { th { "name" } th { "issuer" } th { "days left" } }
                @for c in &v.certificates {
                    tr class=@if c.expiring { "bad" } data-certificate=(c.name) {
                        td { (c.name) }
                        td { (c.issuer) }
                        td class="days-left" { (c.days_left) }
                    }
                }
            }
        }
    }
}

fn endpoint_state(e: &EndpointView) -> String {
    if e.draining {
        "draining".into()
    } else if let Some(ms) = e.ejected_for_ms {
        format!("ejected for {:.0} s", ms as f64 / 1000.0)
    } else if !e.active_healthy {
        "unhealthy".into()
    } else if e.available {
        "healthy".into()
    } else {
        "unavailable".into()
    }
}

fn endpoint_class(e: &EndpointView) -> &'static str {
    if e.draining {
        "draining"
    } else if e.available {
        "ok"
    } else {
        "bad"
    }
}

/// The whole page, with `links` to the dashboards beside it.
#[must_use]
pub fn page(v: &View, links: &[(&str, &str)]) -> Markup {
    rampart_admin::page::page("Rampart", "proxy dashboard", links, &body(v))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn certificates_count_whole_days_and_warn_under_two_weeks() {
        let now = 1_000_000_000;
        let c = certificate_view("a.test", "CA", now + 20 * 86_400 + 5, now);
        assert_eq!((c.days_left, c.expiring), (20, false));
        let c = certificate_view("a.test", "CA", now + 13 * 86_400 + 86_399, now);
        assert_eq!((c.days_left, c.expiring), (13, true));
        let c = certificate_view("a.test", "CA", now - 1, now);
        assert_eq!((c.days_left, c.expiring), (-1, true));
    }

    #[test]
    fn endpoint_states_read_as_words() {
        let e = EndpointView {
            address: "10.0.0.1:80".into(),
            weight: 1,
            available: false,
            active_healthy: false,
            ejected_for_ms: None,
            draining: false,
            inflight: 0,
        };
        assert_eq!(endpoint_state(&e), "unhealthy");
        assert_eq!(endpoint_class(&e), "bad");
        let e = EndpointView {
            ejected_for_ms: Some(2500),
            ..e
        };
        assert_eq!(endpoint_state(&e), "ejected for 2 s");
        let e = EndpointView {
            ejected_for_ms: None,
            active_healthy: true,
            available: true,
            ..e
        };
        assert_eq!(
            (endpoint_state(&e).as_str(), endpoint_class(&e)),
            ("healthy", "ok")
        );
        let e = EndpointView {
            draining: true,
            ..e
        };
        assert_eq!(
            (endpoint_state(&e).as_str(), endpoint_class(&e)),
            ("draining", "draining")
        );
    }

    #[test]
    fn the_page_escapes_what_it_shows() {
        let v = View {
            overview: Overview {
                version: 3,
                ready: true,
                last_minute: Summary::default(),
                last_5_minutes: Summary::default(),
                series: vec![Point::default(); 3],
            },
            routes: vec![RouteView {
                name: "<script>".into(),
                hosts: vec![],
                path_prefix: "/".into(),
                action: "respond 200".into(),
                rules: vec!["only from <10.0.0.0/8>".into()],
                pool: None,
                pools: vec![],
            }],
            certificates: vec![],
            recent_errors: vec![crate::access::RecentError {
                time_ms: 0,
                request_id: "<id>".into(),
                request: Some("GET /<x>".into()),
                status: 502,
                error: Some("upstream_error"),
                route: Some("r".into()),
                upstream: Some("127.0.0.1:1".into()),
                duration_ms: 1.5,
            }],
        };
        let html = page(&v, &[("controller dashboard", "/controller")]).into_string();
        assert!(html.contains("&lt;script&gt;"));
        assert!(html.contains("<a href=\"/controller\">controller dashboard</a>"));
        assert!(
            html.contains("GET /&lt;x&gt;"),
            "recent errors are escaped too"
        );
        assert!(
            html.contains("data-unix-ms=\"0\""),
            "times carry their instant for local display"
        );
        assert!(html.contains("<span class=\"rule\">only from &lt;10.0.0.0/8&gt;</span>"));
        assert!(html.contains("Configuration version <strong>3</strong>"));
        assert!(html.contains("<svg"));
    }
}
