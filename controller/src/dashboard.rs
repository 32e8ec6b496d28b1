//! The controller's dashboard on its admin listener: the fleet (each proxy's address,
//! configuration version and whether it is current, last heartbeat), discovery
//! providers with their errors (bad labels name the container and the fix), DNS (the
//! instances as DNS sees them, the last sync, convergence and pending changes) and the
//! certificates the fleet serves. Server-rendered (maud), refreshed every few seconds;
//! the same data as JSON at `/api/v1/dashboard`.

use std::collections::BTreeMap;

use maud::{html, Markup};
use rampart_config::snapshot::{ControllerStatus, Snapshot};
use serde::Serialize;

use crate::acme::AcmeReport;

/// A certificate the fleet serves.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct CertificateView {
    /// Host names it covers.
    pub names: Vec<String>,
    /// Issuer.
    pub issuer: String,
    /// Not-after, Unix seconds.
    pub not_after_unix: u64,
    /// Whole days left (negative: expired).
    pub days_left: i64,
    /// Fewer than [`rampart_admin::page::WARN_DAYS`] left.
    pub expiring: bool,
    /// Its ACME state, for certificates from an ACME CA.
    pub acme: Option<AcmeReport>,
}

/// Everything on the page.
#[derive(Clone, Debug, Serialize)]
pub struct View {
    /// Version of the current snapshot.
    pub version: u64,
    /// Whether this controller leads.
    pub leader: bool,
    /// Proxies serving the current version, of all that are not stale.
    pub proxies_current: usize,
    /// Proxies that are not stale.
    pub proxies: usize,
    /// The fleet's traffic over the last minute, from the proxies' heartbeats: rates
    /// summed, the 5xx ratio weighted by rate, the worst proxy's p50 and p99.
    pub traffic: rampart_config::snapshot::TrafficSummary,
    /// The status document (fleet, discovery, DNS).
    pub status: ControllerStatus,
    /// Certificates in the current snapshot.
    pub certificates: Vec<CertificateView>,
    /// When the view was made (Unix seconds).
    pub now: u64,
}

/// The view of `status`, the current snapshot `body` (JSON) and the ACME `reports` at
/// `now` (Unix seconds).
#[must_use]
pub fn view(
    status: ControllerStatus,
    snapshot: &[u8],
    reports: &BTreeMap<String, AcmeReport>,
    now: u64,
) -> View {
    let mut certificates: Vec<CertificateView> = serde_json::from_slice::<Snapshot>(snapshot)
        .map(|s| s.certificates)
        .unwrap_or_default()
        .iter()
        .filter_map(|c| {
            let (_, not_after) = rampart_pki::validity_pem(&c.chain_pem).ok()?;
            let (days_left, expiring) = rampart_admin::page::days_left(
                i64::try_from(not_after).unwrap_or(i64::MAX),
                i64::try_from(now).unwrap_or(0),
            );
            let mut names: Vec<String> = c.hosts.iter().map(ToString::to_string).collect();
            names.sort();
            Some(CertificateView {
                acme: reports.get(&names.join(",")).cloned(),
                issuer: rampart_pki::issuer_pem(&c.chain_pem).unwrap_or_default(),
                names,
                not_after_unix: not_after,
                days_left,
                expiring,
            })
        })
        .collect();
    certificates.sort_by(|a, b| a.names.cmp(&b.names));
    let live: Vec<_> = status
        .instances
        .iter()
        .filter(|i| i.state != "stale")
        .collect();
    let traffic = fleet_traffic(live.iter().filter_map(|i| i.traffic));
    View {
        traffic,
        version: status.version,
        leader: status.leader,
        proxies_current: live.iter().filter(|i| i.version == status.version).count(),
        proxies: live.len(),
        certificates,
        status,
        now,
    }
}

/// The fleet's traffic from each proxy's.
fn fleet_traffic(
    each: impl Iterator<Item = rampart_config::snapshot::TrafficSummary>,
) -> rampart_config::snapshot::TrafficSummary {
    each.fold(Default::default(), |mut sum, t| {
        let rate = sum.rate + t.rate;
        sum.error_ratio = if rate > 0.0 {
            (sum.error_ratio * sum.rate + t.error_ratio * t.rate) / rate
        } else {
            0.0
        };
        sum.rate = rate;
        sum.seconds = sum.seconds.max(t.seconds);
        sum.p50_ms = sum.p50_ms.max(t.p50_ms);
        sum.p99_ms = sum.p99_ms.max(t.p99_ms);
        sum
    })
}

/// What the ACME column says: last order, next renewal, back-off and the last error.
fn acme_cell(report: Option<&AcmeReport>, now: u64) -> Markup {
    let days = |at: u64| format!("{:.1} days", (at as f64 - now as f64) / 86_400.0);
    html! {
        @if let Some(r) = report {
            @if let Some(result) = &r.last_result { "last order: " (result) ". " }
            @if let Some(at) = r.renew_at { "renews in " (days(at)) ". " }
            @if let Some(until) = r.waiting_until {
                span class="bad" {
                    @if r.rate_limited { "rate-limited" } @else { "backing off" }
                    " for " (days(until)) " after " (r.failures) " failures. "
                }
            }
            @if let Some(e) = &r.last_error { span class="bad" { (e) } }
        } @else {
            span class="note" { "not from ACME" }
        }
    }
}

/// The page body (also served alone at `/?body` for the refresh).
#[must_use]
pub fn body(v: &View) -> Markup {
    let s = &v.status;
    html! {
        section id="overview" {
            h2 { "Overview" }
            p {
                "Snapshot version " strong { (v.version) } " · "
                @if v.leader { "leader" } @else { "follower" } " · "
                span class=@if v.proxies_current == v.proxies { "ok" } @else { "bad" } {
                    (v.proxies_current) " of " (v.proxies) " proxies serve it"
                }
            }
            p {
                "Fleet, last minute: " strong { (format!("{:.1}", v.traffic.rate)) } " requests/s, "
                span class=@if v.traffic.error_ratio > 0.01 { "bad" } { (format!("{:.2}%", v.traffic.error_ratio * 100.0)) " 5xx" }
                ", p50 " (format!("{:.1} ms", v.traffic.p50_ms)) ", p99 " (format!("{:.1} ms", v.traffic.p99_ms))
                " (slowest proxy)"
            }
        }
        section id="fleet" {
            h2 { "Fleet" }
            table {
                tr { th { "proxy" } th { "host" } th { "public addresses" } th { "version" } th { "last heartbeat" } th { "requests/s" } th { "5xx" } th { "p99" } th { "state" } }
                @for i in &s.instances {
                    tr data-instance=(i.id) class=@if i.state == "ready" { "ok" } @else { "bad" } {
                        td { (i.id) }
                        td { (i.hostname) }
                        td { (i.public_addrs.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")) }
                        td { (i.version) @if i.version != v.version { " (behind)" } }
                        td { @if let Some(secs) = i.last_heartbeat_secs { (format!("{secs:.1} s ago")) } @else { "never" } }
                        @if let Some(t) = i.traffic {
                            td { (format!("{:.1}", t.rate)) }
                            td { (format!("{:.2}%", t.error_ratio * 100.0)) }
                            td { (format!("{:.1} ms", t.p99_ms)) }
                        } @else {
                            td { "–" } td { "–" } td { "–" }
                        }
                        td { (i.state) @if let Some(e) = &i.last_error { " — " (e) } }
                    }
                }
            }
            @if s.instances.is_empty() { p class="note" { "No proxy has enrolled yet." } }
        }
        section id="discovery" {
            h2 { "Discovery" }
            table {
                tr { th { "provider" } th { "endpoints" } th { "problems" } }
                @for p in &s.discovery {
                    tr data-provider=(p.name) {
                        td { (p.name) }
                        td { (p.endpoints) }
                        td class=@if p.errors.is_empty() { "ok" } @else { "bad" } {
                            @if p.errors.is_empty() { "none" }
                            ul { @for e in &p.errors { li { (e) } } }
                        }
                    }
                }
            }
        }
        section id="dns" {
            h2 { "DNS" }
            @if let Some(d) = &s.dns {
                p {
                    (d.provider) ", zone " strong { (d.zone) } " · last sync "
                    @if let Some(at) = d.last_sync_unix { (rampart_admin::page::when(at * 1000)) } @else { "not yet" }
                    @if let Some(c) = d.last_convergence_secs { " · last convergence " (format!("{c:.1} s")) }
                    @if let Some(e) = &d.last_error { " · " span class="bad" { (e) } }
                }
                table {
                    tr { th { "name" } th { "owner" } th { "in DNS" } th { "wanted" } th { "" } }
                    @for n in &d.names {
                        tr data-name=(n.name) class=@if n.drift { "bad" } {
                            td { (n.name) }
                            td { (n.owners.join(" ")) }
                            td { (n.actual.join(", ")) }
                            td { (n.desired.join(", ")) }
                            td { @if n.drift { "drift" } @else { "in sync" } }
                        }
                    }
                }
                table {
                    tr { th { "instance" } th { "addresses" } th { "heartbeat" } th { "probe" } }
                    @for i in &d.instances {
                        tr {
                            td { (i.id) }
                            td { (i.addrs.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")) }
                            td { @if i.heartbeat_ready { "ready" } @else { "not ready" } }
                            td { @match i.probe_ok { Some(true) => "ok", Some(false) => "failing", None => "not probed" } }
                        }
                    }
                }
                @let pending = d.plan.changes.len() + d.plan.skipped.len() + d.plan.floored.len() + d.plan.failed.len();
                @if pending == 0 { p class="ok" { "DNS matches the fleet." } } @else {
                    h3 { "Last plan" }
                    ul class="plan" {
                        @for c in &d.plan.changes { li { "change: " (c) } }
                        @for c in &d.plan.skipped { li class="bad" { "skipped: " (c) } }
                        @for c in &d.plan.floored { li class="bad" { "held at its floor: " (c) } }
                        @for c in &d.plan.failed { li class="bad" { "failed: " (c) } }
                    }
                }
            } @else {
                p class="note" { "No [dns] section: DNS is not managed." }
            }
        }
        section id="certificates" {
            h2 { "Certificates" }
            table {
                tr { th { "names" } th { "issuer" } th { "days left" } th { "ACME" } }
                @for c in &v.certificates {
                    tr class=@if c.expiring { "bad" } data-certificate=(c.names.join(",")) {
                        td { (c.names.join(", ")) }
                        td { (c.issuer) }
                        td class="days-left" { (c.days_left) }
                        td { (acme_cell(c.acme.as_ref(), v.now)) }
                    }
                }
            }
        }
    }
}

/// The whole page.
#[must_use]
pub fn page(v: &View, links: &[(&str, &str)]) -> Markup {
    rampart_admin::page::page(
        "Rampart controller",
        "fleet, DNS and certificates",
        links,
        &body(v),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use rampart_config::snapshot::{InstanceStatus, ProviderStatus};

    fn instance(id: &str, version: u64, state: &str) -> InstanceStatus {
        InstanceStatus {
            id: id.into(),
            hostname: "h".into(),
            peer: None,
            public_addrs: vec![],
            version,
            ready: state == "ready",
            last_heartbeat_secs: Some(1.0),
            last_error: None,
            state: state.into(),
            traffic: Some(rampart_config::snapshot::TrafficSummary {
                seconds: 60,
                rate: 10.0,
                error_ratio: if id == "p-2" { 0.1 } else { 0.0 },
                p50_ms: 1.0,
                p99_ms: if id == "p-2" { 8.0 } else { 4.0 },
            }),
        }
    }

    #[test]
    fn the_overview_counts_current_proxies_and_the_page_lists_problems() {
        let status = ControllerStatus {
            version: 7,
            leader: true,
            instances: vec![
                instance("p-1", 7, "ready"),
                instance("p-2", 6, "ready"),
                instance("p-3", 1, "stale"),
            ],
            discovery: vec![ProviderStatus {
                name: "docker".into(),
                endpoints: 2,
                errors: vec!["web-1: label rampart.pool.web.port=\"x\": use a port".into()],
            }],
            dns: None,
        };
        let v = view(status, b"not a snapshot", &BTreeMap::new(), 0);
        assert_eq!((v.proxies_current, v.proxies), (1, 2));
        // The stale p-3 does not count; p-2's errors weigh by its rate.
        assert_eq!(v.traffic.rate, 20.0);
        assert!((v.traffic.error_ratio - 0.05).abs() < 1e-9);
        assert_eq!(v.traffic.p99_ms, 8.0);
        assert!(v.certificates.is_empty());
        let html = page(&v, &[]).into_string();
        assert!(html.contains("1 of 2 proxies serve it"));
        assert!(html.contains("6 (behind)"));
        assert!(html.contains("rampart.pool.web.port=&quot;x&quot;"));
        assert!(html.contains("DNS is not managed"));
    }

    #[test]
    fn the_acme_column_says_how_renewal_goes() {
        let day = 86_400;
        let ok = AcmeReport {
            not_after: Some(90 * day),
            renew_at: Some(60 * day),
            last_result: Some("ok".into()),
            ..AcmeReport::default()
        };
        let text = acme_cell(Some(&ok), 0).into_string();
        assert!(
            text.contains("last order: ok") && text.contains("renews in 60.0 days"),
            "{text}"
        );
        let failing = AcmeReport {
            failures: 3,
            last_error: Some("CA said no".into()),
            waiting_until: Some(day / 2),
            rate_limited: false,
            ..AcmeReport::default()
        };
        let text = acme_cell(Some(&failing), 0).into_string();
        assert!(
            text.contains("backing off for 0.5 days after 3 failures"),
            "{text}"
        );
        assert!(text.contains("CA said no"));
        assert!(acme_cell(None, 0).into_string().contains("not from ACME"));
    }
}
