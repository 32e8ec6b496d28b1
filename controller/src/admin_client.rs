//! The CLI's side of the controller admin API: fetching `/status` and the DNS plan,
//! and rendering them as tables.

use std::net::SocketAddr;

use anyhow::Context;
use bytes::Bytes;
use rampart_config::snapshot::ControllerStatus;

/// Reads `/status` from a controller's admin API.
///
/// # Errors
/// When the controller cannot be reached or answers garbage.
pub async fn fetch_status(admin: SocketAddr) -> anyhow::Result<ControllerStatus> {
    let body = admin_call(admin, http::Method::GET, "/status", Bytes::new()).await?;
    serde_json::from_slice(&body).context("the admin API's /status is not a controller status")
}

/// Asks the running controller at `admin` for the DNS plan of `settings` (the names,
/// owner and policies of a configuration file) against its live view of the fleet and
/// a fresh read of its DNS provider.
///
/// # Errors
/// When the controller cannot be reached, has no DNS automation, or its provider
/// cannot be read.
pub async fn fetch_dns_plan(
    admin: SocketAddr,
    settings: &rampart_config::DnsSettings,
) -> anyhow::Result<rampart_config::snapshot::DnsStatus> {
    let body = admin_call(
        admin,
        http::Method::POST,
        "/dns/plan",
        Bytes::from(serde_json::to_vec(settings)?),
    )
    .await?;
    serde_json::from_slice(&body).map_err(|_| {
        anyhow::anyhow!(
            "the controller at {admin} answered: {}",
            String::from_utf8_lossy(&body).trim()
        )
    })
}

async fn admin_call(
    admin: SocketAddr,
    method: http::Method,
    path: &str,
    body: Bytes,
) -> anyhow::Result<Bytes> {
    use http_body_util::BodyExt;
    let tcp = tokio::net::TcpStream::connect(admin)
        .await
        .with_context(|| {
            format!(
                "connecting to the controller's admin API at {admin}; is the controller running?"
            )
        })?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp)).await?;
    tokio::spawn(conn);
    let req = http::Request::builder()
        .method(method)
        .uri(path)
        .header(http::header::HOST, admin.to_string())
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(http_body_util::Full::new(body))?;
    let resp = sender.send_request(req).await?;
    Ok(resp.into_body().collect().await?.to_bytes())
}

/// A DNS plan for people: what would change, what is left alone and why.
#[must_use]
pub fn render_dns_plan(status: &rampart_config::snapshot::DnsStatus) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let ready = status.instances.iter().filter(|i| i.ready).count();
    let _ = writeln!(
        out,
        "DNS plan for zone {} ({}): {ready} of {} instances ready",
        status.zone,
        status.provider,
        status.instances.len()
    );
    for i in &status.instances {
        let probe = match (i.probe_ok, &i.probe_error) {
            (Some(true), _) => "probe ok".to_string(),
            (Some(false), Some(e)) => format!("probe failing: {e}"),
            (Some(false), None) => "probe failing".to_string(),
            (None, _) => "not probed".to_string(),
        };
        let addrs: Vec<String> = i.addrs.iter().map(ToString::to_string).collect();
        let _ = writeln!(
            out,
            "  instance {} {} heartbeat {}, {probe} -> {}",
            i.id,
            addrs.join(","),
            if i.heartbeat_ready {
                "ready"
            } else {
                "not ready"
            },
            if i.ready {
                "published"
            } else {
                "not published"
            }
        );
    }
    let plan = &status.plan;
    if plan.changes.is_empty() {
        out.push_str("No changes: the records match the ready instances.\n");
    } else {
        let _ = writeln!(out, "{} changes:", plan.changes.len());
        for c in &plan.changes {
            let _ = writeln!(out, "  {c}");
        }
    }
    for s in &plan.skipped {
        let _ = writeln!(out, "skipped (not owned by Rampart): {s}");
    }
    for s in &plan.floored {
        let _ = writeln!(out, "held at floor: {s}");
    }
    out
}

/// A table of the instances in `status`, for people.
#[must_use]
pub fn render_status(status: &ControllerStatus) -> String {
    use std::fmt::Write as _;
    let mut out = format!(
        "snapshot version {}{}\n\n{:<20} {:<10} {:<16} {:>8} {:>12}  {}\n",
        status.version,
        if status.leader { " (leader)" } else { "" },
        "INSTANCE",
        "STATE",
        "ADDRESS",
        "VERSION",
        "HEARTBEAT",
        "HOST"
    );
    for i in &status.instances {
        let _ = writeln!(
            out,
            "{:<20} {:<10} {:<16} {:>8} {:>12}  {}{}",
            i.id,
            i.state,
            i.peer.as_deref().unwrap_or("-"),
            i.version,
            i.last_heartbeat_secs
                .map_or_else(|| "never".to_string(), |s| format!("{s:.1}s ago")),
            i.hostname,
            i.last_error
                .as_ref()
                .map_or_else(String::new, |e| format!("  last error: {e}")),
        );
    }
    for p in &status.discovery {
        let _ = writeln!(out, "\ndiscovery {}: {} endpoints", p.name, p.endpoints);
        for e in &p.errors {
            let _ = writeln!(out, "  error: {e}");
        }
    }
    out
}
