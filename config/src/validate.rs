//! Cross-field validation of a deserialised [`Config`]: collects every problem, each
//! with the path of the offending field and a hint on how to fix it.
//!
//! Pure: no I/O. Files named by the config (certificates) are checked when the proxy
//! builds a generation, where a failure keeps the previous one serving.

use std::collections::{BTreeSet, HashMap};

use crate::diagnostics::{FieldPath, Issue};
use crate::model::{
    AcmeChallenge, Action, Config, HealthCheck, Pool, Route, TlsEntry, TlsSource, UpstreamProtocol,
};
use crate::units::{is_token, HostPattern};
use crate::Balance;

/// Smallest `limits.max_header_bytes` accepted: real browsers send a few KiB.
const MIN_HEADER_BYTES: u64 = 1 << 10;
/// Largest `limits.max_header_bytes` accepted: Pingora itself stops reading at 1 MiB.
const MAX_HEADER_BYTES: u64 = (1 << 20) - 1;
/// Largest accepted endpoint weight, so that smooth weighted round robin cannot overflow.
const MAX_WEIGHT: u32 = 1000;

/// Where the configuration being checked comes from: the rules that depend on what a
/// file declares beside its routes differ for a snapshot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Origin {
    /// A configuration file.
    File,
    /// A controller's snapshot applied by a proxy: certificates come as bundles (not
    /// `[[tls]]` entries), pools may be empty until discovery finds endpoints, and the
    /// listeners are the proxy's own.
    Snapshot,
}

/// Every problem found in `config`; empty when it is valid.
#[must_use]
pub fn validate(config: &Config) -> Vec<Issue> {
    validate_from(config, Origin::File)
}

/// Every problem found in a configuration built from a controller's snapshot.
#[must_use]
pub fn validate_snapshot(config: &Config) -> Vec<Issue> {
    validate_from(config, Origin::Snapshot)
}

fn validate_from(config: &Config, origin: Origin) -> Vec<Issue> {
    let mut out = Vec::new();
    listeners(config, &mut out);
    limits(config, &mut out);
    forwarding(config, &mut out);
    access_log(config, &mut out);
    tracing(config, &mut out);
    let rotate = config.session_tickets.rotate.0;
    if rotate < std::time::Duration::from_secs(1)
        || rotate > std::time::Duration::from_secs(7 * 86_400)
    {
        out.push(Issue::new(
            FieldPath::root().key("session_tickets").key("rotate"),
            format!(
                "{} is not between 1s and 7d",
                humantime::format_duration(rotate)
            ),
            "keep the default (1h); TLS 1.3 allows tickets of at most 7 days",
        ));
    }
    let tls_hosts = tls(config, &mut out);
    tls_on_demand(config, &mut out);
    if let Some(pages) = &config.error_pages {
        error_pages(&FieldPath::root().key("error_pages"), pages, &mut out);
    }
    if let (Some(sni), Origin::File) = (&config.server.default_sni, origin) {
        if !tls_hosts.iter().any(|p| p.matches(sni.as_str())) {
            out.push(Issue::new(
                FieldPath::root().key("server").key("default_sni"),
                format!("no [[tls]] entry covers {sni}"),
                "add the host to the hosts of a [[tls]] entry, or remove default_sni",
            ));
        }
    }
    controller(config, &mut out);
    dns(config, &mut out);
    srv_discovery(config, &mut out);
    let mut names = HashMap::new();
    for (i, route) in config.routes.iter().enumerate() {
        let path = FieldPath::root().key("routes").index(i);
        if let Some(first) = names.insert(route.name.as_str(), i) {
            out.push(Issue::new(
                path.key("name"),
                format!(
                    "route name {:?} is also used by routes[{first}]",
                    route.name
                ),
                "give every route a unique name",
            ));
        }
        self::route(config, origin, route, &path, &mut out);
    }
    for (name, pool) in &config.pools {
        self::pool(
            name,
            pool,
            config.discovery.any() || origin == Origin::Snapshot,
            &FieldPath::root().key("pools").key(name),
            &mut out,
        );
    }
    out
}

fn srv_discovery(config: &Config, out: &mut Vec<Issue>) {
    for (i, swarm) in config.discovery.swarm.iter().enumerate() {
        if swarm.mode == crate::SwarmMode::Mesh && swarm.mesh_address.is_none() {
            out.push(Issue::new(
                FieldPath::root()
                    .key("discovery")
                    .key("swarm")
                    .index(i)
                    .key("mesh_address"),
                "mode = \"mesh\" needs the address proxies reach the routing mesh on",
                "set mesh_address = \"<a node's IP>\", or use mode = \"tasks\"",
            ));
        }
    }
    for (i, srv) in config.discovery.dns_srv.iter().enumerate() {
        let path = FieldPath::root().key("discovery").key("dns_srv").index(i);
        if !config.pools.contains_key(&srv.pool) {
            out.push(Issue::new(
                path.key("pool"),
                format!("pool {:?} is not defined", srv.pool),
                format!(
                    "define [pools.{}] (its endpoints come from the SRV records)",
                    srv.pool
                ),
            ));
        }
        if !srv.name.starts_with('_') || !srv.name.contains('.') {
            out.push(Issue::new(
                path.key("name"),
                format!("{:?} is not an SRV name", srv.name),
                "use the _service._proto.domain form, e.g. \"_web._tcp.service.consul\"",
            ));
        }
        if srv.interval.0 < std::time::Duration::from_secs(1) {
            out.push(Issue::new(
                path.key("interval"),
                "shorter than 1s",
                "use at least \"1s\"",
            ));
        }
    }
}

/// A bcrypt hash as `rampart hash-password` and htpasswd write it:
/// `$2b$12$` and 53 characters of bcrypt's base64.
fn bcrypt_hash(hash: &str) -> bool {
    let b = hash.as_bytes();
    b.len() == 60
        && b[0] == b'$'
        && b[1] == b'2'
        && matches!(b[2], b'a' | b'b' | b'x' | b'y')
        && b[3] == b'$'
        && hash[4..6]
            .parse::<u32>()
            .is_ok_and(|c| (4..=31).contains(&c))
        && b[6] == b'$'
        && b[7..]
            .iter()
            .all(|c| c.is_ascii_alphanumeric() || *c == b'.' || *c == b'/')
}

/// Whether `url` is an http:// or https:// URL with a host and no whitespace.
fn http_url(url: &str) -> bool {
    url.strip_prefix("http://")
        .or_else(|| url.strip_prefix("https://"))
        .is_some_and(|r| {
            !r.split('/').next().unwrap_or("").is_empty() && !r.contains(char::is_whitespace)
        })
}

/// The pools a forward action names: each defined; a split's weights with a share to
/// give, each pool once.
fn forward_to(config: &Config, at: &FieldPath, to: &crate::ForwardTo, out: &mut Vec<Issue>) {
    let undefined = |at: FieldPath, pool: &str, out: &mut Vec<Issue>| {
        let known: BTreeSet<_> = config.pools.keys().map(String::as_str).collect();
        out.push(Issue::new(
            at,
            format!("pool {pool:?} is not defined"),
            if known.is_empty() {
                "define it under [pools.<name>]".to_string()
            } else {
                format!(
                    "use one of {} or define [pools.{pool}]",
                    known
                        .iter()
                        .map(|k| format!("{k:?}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            },
        ));
    };
    let split = match to {
        crate::ForwardTo::Pool(pool) => {
            if !config.pools.contains_key(pool) {
                undefined(at.clone(), pool, out);
            }
            return;
        }
        crate::ForwardTo::Split(split) => split,
    };
    for (i, w) in split.iter().enumerate() {
        if !config.pools.contains_key(&w.pool) {
            undefined(at.index(i).key("pool"), &w.pool, out);
        }
    }
    split_weights(at, split, out);
}

/// A split's weights: a share to give, each pool once.
fn split_weights(at: &FieldPath, split: &[crate::WeightedPool], out: &mut Vec<Issue>) {
    if split.is_empty() {
        out.push(Issue::new(
            at.clone(),
            "a split needs at least one pool",
            "use forward = [{ pool = \"v1\", weight = 95 }, { pool = \"v2\", weight = 5 }], or forward = \"<pool>\"",
        ));
        return;
    }
    let mut seen = BTreeSet::new();
    for (i, w) in split.iter().enumerate() {
        let here = at.index(i);
        if !seen.insert(w.pool.as_str()) {
            out.push(Issue::new(
                here.key("pool"),
                format!("pool {:?} is in the split twice", w.pool),
                "list each pool once, with its whole weight",
            ));
        }
        if w.weight > 1_000_000 {
            out.push(Issue::new(
                here.key("weight"),
                format!("{} is more than 1000000", w.weight),
                "weights are relative: use e.g. 95 and 5",
            ));
        }
    }
    if split.iter().all(|w| w.weight == 0) {
        out.push(Issue::new(
            at.clone(),
            "every weight is 0: no request would be forwarded",
            "give at least one pool a weight above 0",
        ));
    }
}

/// A route's `split` settings: only beside a split, with valid cookie and header names.
fn split(path: &FieldPath, route: &crate::Route, out: &mut Vec<Issue>) {
    let Some(split) = &route.split else { return };
    let at = path.key("split");
    if !matches!(route.action, Action::Forward(crate::ForwardTo::Split(_))) {
        out.push(Issue::new(
            at.clone(),
            "split settings need a split between pools",
            "make the action { forward = [{ pool = \"v1\", weight = 95 }, { pool = \"v2\", weight = 5 }] }, or remove split",
        ));
    }
    if !split.cookie.is_empty() {
        cookie_name(&at.key("cookie"), &split.cookie, out);
    }
    if let Some(c) = &split.override_cookie {
        cookie_name(&at.key("override_cookie"), c, out);
    }
    if let Some(h) = &split.override_header {
        if !valid_header_name(h) {
            out.push(Issue::new(
                at.key("override_header"),
                format!("{h:?} is not a header name"),
                "use letters, digits and '-', e.g. \"X-Canary\"",
            ));
        }
    }
    if split
        .ttl
        .is_some_and(|t| t.0 < std::time::Duration::from_secs(1))
    {
        out.push(Issue::new(
            at.key("ttl"),
            "a cookie that lasts under a second keeps nobody on a pool",
            "use e.g. ttl = \"1d\", or leave it out for a browser-session cookie",
        ));
    }
}

/// Error pages: intercepted statuses that are errors, each once; inline pages under
/// 1 MiB (a file's size is checked when it is read).
fn error_pages(at: &FieldPath, pages: &crate::ErrorPages, out: &mut Vec<Issue>) {
    let mut seen = BTreeSet::new();
    for (i, status) in pages.intercept.iter().enumerate() {
        if !(400..=599).contains(status) {
            out.push(Issue::new(
                at.key("intercept").index(i),
                format!("{status} is not an error status"),
                "list 4xx and 5xx statuses, e.g. intercept = [502, 503, 504]",
            ));
        } else if !seen.insert(status) {
            out.push(Issue::new(
                at.key("intercept").index(i),
                format!("{status} is listed twice"),
                "list each status once",
            ));
        }
    }
    for (form, page) in [
        ("html", &pages.html),
        ("json", &pages.json),
        ("text", &pages.text),
    ] {
        match page {
            Some(crate::PageSource::Inline(text)) if text.len() > 1024 * 1024 => {
                out.push(Issue::new(
                    at.key(form).key("inline"),
                    format!("the page is {} bytes", text.len()),
                    "keep it under 1 MiB: link images and styles instead of inlining them",
                ));
            }
            Some(crate::PageSource::File(path)) if path.as_os_str().is_empty() => {
                out.push(Issue::new(
                    at.key(form).key("file"),
                    "the path is empty",
                    "name the page's file, e.g. file = \"/etc/rampart/error.html\"",
                ));
            }
            _ => {}
        }
    }
}

/// A route's compression: known codings, each once; levels in range; types that are
/// media types; a forward action.
fn compress(at: &FieldPath, c: &crate::Compress, action: &Action, out: &mut Vec<Issue>) {
    if !matches!(action, Action::Forward(_)) {
        out.push(Issue::new(
            at.clone(),
            "only a forward action has upstream responses to compress",
            "remove compress, or make the action { forward = \"<pool>\" }",
        ));
    }
    if c.algorithms.is_empty() {
        out.push(Issue::new(
            at.key("algorithms"),
            "no coding is offered",
            "list some of \"zstd\", \"br\", \"gzip\", or remove compress",
        ));
    }
    let mut seen = BTreeSet::new();
    for (i, a) in c.algorithms.iter().enumerate() {
        if !["zstd", "br", "gzip"].contains(&a.as_str()) {
            out.push(Issue::new(
                at.key("algorithms").index(i),
                format!("{a:?} is not a coding Rampart compresses with"),
                "use \"zstd\", \"br\" or \"gzip\"",
            ));
        } else if !seen.insert(a.as_str()) {
            out.push(Issue::new(
                at.key("algorithms").index(i),
                format!("{a:?} is listed twice"),
                "list each coding once",
            ));
        }
    }
    for (i, t) in c.types.iter().enumerate() {
        let ok = t
            .split_once('/')
            .is_some_and(|(a, b)| is_token(a) && (b == "*" || is_token(b)) && !t.contains(';'));
        if !ok {
            out.push(Issue::new(
                at.key("types").index(i),
                format!("{t:?} is not a media type"),
                "write it like \"text/html\" or \"text/*\", without parameters",
            ));
        }
    }
    let l = c.levels;
    for (key, level, range) in [
        ("gzip", l.gzip, 1..=9),
        ("br", l.br, 1..=11),
        ("zstd", l.zstd, 1..=19),
    ] {
        if !range.contains(&level) {
            out.push(Issue::new(
                at.key("levels").key(key),
                format!("{level} is not a {key} level"),
                format!("use {}–{}", range.start(), range.end()),
            ));
        }
    }
}

/// A route's mirror: a defined cleartext HTTP/1.1 pool, a share, bounds.
fn mirror(
    config: &Config,
    at: &FieldPath,
    m: &crate::Mirror,
    action: &Action,
    out: &mut Vec<Issue>,
) {
    if !matches!(action, Action::Forward(_)) {
        out.push(Issue::new(
            at.clone(),
            "only a forwarded request is mirrored",
            "remove mirror, or make the action { forward = \"<pool>\" }",
        ));
    }
    match config.pools.get(&m.pool) {
        None => out.push(Issue::new(
            at.key("pool"),
            format!("pool {:?} is not defined", m.pool),
            format!("define [pools.{}] with the shadow endpoints", m.pool),
        )),
        Some(p)
            if p.tls.is_some()
                || p.protocol != UpstreamProtocol::Http1
                || p.proxy_protocol.is_some() =>
        {
            out.push(Issue::new(
                at.key("pool"),
                format!("pool {:?} is not plain HTTP/1.1", m.pool),
                "mirror to a pool with protocol = \"http1\", no tls and no proxy_protocol",
            ));
        }
        Some(_) => {}
    }
    if !(m.percent > 0.0 && m.percent <= 100.0) {
        out.push(Issue::new(
            at.key("percent"),
            format!("{} is not a share between 0 and 100", m.percent),
            "use e.g. percent = 10",
        ));
    }
    if m.max_in_flight == 0 || m.max_in_flight > 100_000 {
        out.push(Issue::new(
            at.key("max_in_flight"),
            format!("{} is not between 1 and 100000", m.max_in_flight),
            "keep the default (100)",
        ));
    }
    if m.timeout.0 < std::time::Duration::from_millis(10)
        || m.timeout.0 > std::time::Duration::from_secs(300)
    {
        out.push(Issue::new(
            at.key("timeout"),
            format!("{} is not between 10ms and 5m", m.timeout),
            "keep the default (5s)",
        ));
    }
}

/// A cookie name (an HTTP token, RFC 6265 §4.1.1).
fn cookie_name(at: &FieldPath, name: &str, out: &mut Vec<Issue>) {
    if !is_token(name) {
        out.push(Issue::new(
            at.clone(),
            format!("{name:?} is not a cookie name"),
            "use letters, digits, '-' and '_', e.g. \"rp_s\"",
        ));
    }
}

/// A pool's `sticky` cookie.
fn sticky(at: &FieldPath, sticky: &crate::Sticky, out: &mut Vec<Issue>) {
    cookie_name(&at.key("cookie"), &sticky.cookie, out);
    if sticky
        .ttl
        .is_some_and(|t| t.0 < std::time::Duration::from_secs(1))
    {
        out.push(Issue::new(
            at.key("ttl"),
            "a cookie that lasts under a second keeps nobody on an endpoint",
            "use e.g. ttl = \"1h\", or leave it out for a browser-session cookie",
        ));
    }
    if sticky.same_site == crate::SameSite::None && sticky.secure == Some(false) {
        out.push(Issue::new(
            at.key("same_site"),
            "browsers drop a SameSite=None cookie that is not Secure",
            "remove secure = false, or use same_site = \"lax\"",
        ));
    }
}

fn forward_auth(
    path: &FieldPath,
    auth: &crate::ForwardAuth,
    action: &crate::Action,
    out: &mut Vec<Issue>,
) {
    if !http_url(&auth.url) {
        out.push(Issue::new(
            path.key("url"),
            format!("{:?} is not an http:// or https:// URL", auth.url),
            "give the auth service's check URL, e.g. \"http://oauth2-proxy:4180/oauth2/auth\"",
        ));
    }
    for (i, name) in auth.copy_headers.iter().enumerate() {
        let lower = name.to_ascii_lowercase();
        if !valid_header_name(name) {
            out.push(Issue::new(
                path.key("copy_headers").index(i),
                format!("{name:?} is not a valid header name"),
                "use letters, digits and hyphens, e.g. \"X-Auth-Request-User\"",
            ));
        } else if matches!(
            lower.as_str(),
            "host" | "connection" | "content-length" | "transfer-encoding" | "upgrade" | "te"
        ) {
            out.push(Issue::new(
                path.key("copy_headers").index(i),
                format!("{name} describes the message, not the user"),
                "copy only identity headers (user, e-mail, groups)",
            ));
        }
    }
    let t = auth.timeout.0;
    if t < std::time::Duration::from_millis(10) || t > std::time::Duration::from_secs(60) {
        out.push(Issue::new(
            path.key("timeout"),
            format!(
                "{} is not between 10ms and 60s",
                humantime::format_duration(t)
            ),
            "keep the default (5s)",
        ));
    }
    if !matches!(action, crate::Action::Forward(_)) {
        out.push(Issue::new(
            path.key("url"),
            "forward_auth guards requests that are forwarded; this route answers itself",
            "use it on a route whose action is forward",
        ));
    }
}

fn basic_auth(path: &FieldPath, auth: &crate::BasicAuth, out: &mut Vec<Issue>) {
    if auth.users.is_empty() {
        out.push(Issue::new(
            path.key("users"),
            "no users: nobody could sign in",
            "add users = { alice = \"<hash>\" } with a hash from `rampart hash-password`",
        ));
    }
    if auth.realm.is_empty()
        || auth
            .realm
            .bytes()
            .any(|b| b == b'"' || b == b'\\' || b < 0x20)
    {
        out.push(Issue::new(
            path.key("realm"),
            format!("{:?} cannot be a realm", auth.realm),
            "use a short text without quotes or backslashes, e.g. realm = \"Back office\"",
        ));
    }
    for (user, hash) in &auth.users {
        let at = path.key("users").key(user);
        if user.is_empty() || user.contains(':') || user.bytes().any(|b| b < 0x20) {
            out.push(Issue::new(
                at,
                format!("{user:?} cannot be a user name"),
                "use a name without ':' or control characters",
            ));
        } else if !bcrypt_hash(hash) {
            out.push(Issue::new(
                at,
                "is not a bcrypt hash (passwords are never written in clear)",
                "make one with `rampart hash-password` and paste what it prints",
            ));
        }
    }
}

/// Headers that frame a message or describe one connection: the proxy owns them.
const FRAMING_HEADERS: &[&str] = &[
    "connection",
    "content-length",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// A header name as RFC 9110 allows it (a token).
fn valid_header_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// A header value without control characters (CR and LF above all).
fn valid_header_value(value: &str) -> bool {
    value
        .bytes()
        .all(|b| b == b'\t' || (b >= 0x20 && b != 0x7f))
}

fn header_rules(
    path: &FieldPath,
    rules: &crate::HeaderRules,
    request: bool,
    action: &crate::Action,
    request_id: &str,
    out: &mut Vec<Issue>,
) {
    if rules.is_empty() {
        return;
    }
    if !matches!(action, crate::Action::Forward(_)) {
        out.push(Issue::new(
            path.clone(),
            "only a forward action passes messages on",
            "remove these header rules, or make the action { forward = \"<pool>\" }",
        ));
        return;
    }
    let names = rules
        .set
        .iter()
        .map(|(name, value)| (path.key("set").key(name), name, Some(value)))
        .chain(
            rules
                .remove
                .iter()
                .enumerate()
                .map(|(i, name)| (path.key("remove").index(i), name, None)),
        );
    for (at, name, value) in names {
        let lower = name.to_ascii_lowercase();
        if !valid_header_name(name) {
            out.push(Issue::new(
                at,
                format!("{name:?} is not a header name"),
                "use letters, digits and -, e.g. \"X-Env\"",
            ));
        } else if lower.eq_ignore_ascii_case(request_id) {
            out.push(Issue::new(
                at,
                format!("{name} carries the request id (forwarding.request_id_header): the proxy sets it"),
                "remove it from the rules",
            ));
        } else if FRAMING_HEADERS.contains(&lower.as_str()) {
            out.push(Issue::new(
                at,
                format!(
                    "{name} frames the message or belongs to one connection: the proxy sets it"
                ),
                "remove it from the rules",
            ));
        } else if lower == "host" && (!request || value.is_none()) {
            out.push(Issue::new(
                at,
                "Host can only be set, on requests",
                "move it to request_headers.set, or remove it",
            ));
        } else if value.is_some() && rules.remove.iter().any(|r| r.eq_ignore_ascii_case(name)) {
            out.push(Issue::new(
                at,
                format!("{name} is both set and removed"),
                "keep it in one of set and remove",
            ));
        } else if let Some(v) = value.filter(|v| !valid_header_value(v)) {
            out.push(Issue::new(
                at,
                format!("{v:?} has control characters, which a header value cannot hold"),
                "remove line breaks and other control characters",
            ));
        }
    }
}

fn controller(config: &Config, out: &mut Vec<Issue>) {
    let Some(c) = &config.controller else { return };
    let path = FieldPath::root().key("controller");
    if c.names.is_empty() {
        out.push(Issue::new(
            path.key("names"),
            "no names for the fleet API certificate",
            "list the names or IP addresses proxies use to reach the controller, e.g. names = [\"controller.internal\"]",
        ));
    }
    if c.watch_timeout.0.is_zero() || c.instance_timeout.0.is_zero() {
        out.push(Issue::new(
            path.key(if c.watch_timeout.0.is_zero() {
                "watch_timeout"
            } else {
                "instance_timeout"
            }),
            "must be longer than zero",
            "use a duration such as \"30s\"",
        ));
    }
    if c.forget_after.0 <= c.instance_timeout.0 {
        out.push(Issue::new(
            path.key("forget_after"),
            format!(
                "{} is not longer than instance_timeout ({}): an instance would be forgotten before it is even stale",
                c.forget_after, c.instance_timeout
            ),
            "use a duration well above instance_timeout, e.g. forget_after = \"24h\" (the default)",
        ));
    }
    if let crate::StoreSettings::Etcd(etcd) = &c.store {
        if etcd.endpoints.is_empty() {
            out.push(Issue::new(
                path.key("store").key("etcd").key("endpoints"),
                "no etcd endpoints",
                "list the etcd client URLs, e.g. endpoints = [\"http://10.0.0.2:2379\"]",
            ));
        }
        if etcd.lease_ttl.0 < std::time::Duration::from_secs(2) {
            out.push(Issue::new(
                path.key("store").key("etcd").key("lease_ttl"),
                format!(
                    "{} is shorter than etcd's minimum useful lease (2s)",
                    etcd.lease_ttl
                ),
                "use at least \"2s\"; 10s is a good default",
            ));
        }
    }
}

fn dns(config: &Config, out: &mut Vec<Issue>) {
    let Some(d) = &config.dns else { return };
    let path = FieldPath::root().key("dns");
    if d.owner_id.is_empty()
        || !d
            .owner_id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
    {
        out.push(Issue::new(
            path.key("owner_id"),
            format!("{:?} is not a valid owner id", d.owner_id),
            "use letters, digits, '-', '_' or '.', e.g. owner_id = \"rampart-prod\"",
        ));
    }
    if d.batch_size == 0 || d.batch_size > 1000 {
        out.push(Issue::new(
            path.key("batch_size"),
            format!("{} is outside 1..=1000", d.batch_size),
            "use at most 1000 (Route53's limit per change batch); 100 is the default",
        ));
    }
    if d.interval.0.is_zero() {
        out.push(Issue::new(
            path.key("interval"),
            "must be longer than zero",
            "use a duration such as \"10s\"",
        ));
    }
    let p = &d.probe;
    if p.enabled {
        let probe = path.key("probe");
        if p.interval.0.is_zero() || p.timeout.0.is_zero() {
            out.push(Issue::new(
                probe.key(if p.interval.0.is_zero() {
                    "interval"
                } else {
                    "timeout"
                }),
                "must be longer than zero",
                "use a duration such as \"2s\"",
            ));
        }
        if p.unhealthy_threshold == 0 || p.healthy_threshold == 0 {
            out.push(Issue::new(
                probe.key(if p.unhealthy_threshold == 0 {
                    "unhealthy_threshold"
                } else {
                    "healthy_threshold"
                }),
                "must be at least 1",
                "use 3 failures to take an instance out and 1 success to put it back",
            ));
        }
        if !p.path.starts_with('/') {
            out.push(Issue::new(
                probe.key("path"),
                format!("{:?} does not start with '/'", p.path),
                format!("use {:?}, which every proxy answers", crate::PROBE_PATH),
            ));
        }
    }
    let route53 = matches!(d.provider, crate::DnsProvider::Route53 { .. });
    let zone = d.zone.as_str();
    let mut seen = HashMap::new();
    for (i, n) in d.names.iter().enumerate() {
        let at = path.key("names").index(i);
        let name = n.name.as_str();
        if let Some(first) = seen.insert(name, i) {
            out.push(Issue::new(
                at.key("name"),
                format!("{name} is also managed by dns.names[{first}]"),
                "list every name once",
            ));
        }
        if name != zone && !name.ends_with(&format!(".{zone}")) {
            out.push(Issue::new(
                at.key("name"),
                format!("{name} is not inside the zone {zone}"),
                format!("use a name ending in .{zone}, or change dns.zone"),
            ));
        }
        if name.starts_with("*.") {
            out.push(Issue::new(
                at.key("name"),
                format!("{name} is a wildcard"),
                "manage the concrete names (wildcard records would also answer for names you do not serve)",
            ));
        }
        if n.policy == crate::DnsPolicy::Weighted && !route53 {
            out.push(Issue::new(
                at.key("policy"),
                "weighted record sets exist only in Route53",
                "use policy = \"multivalue\" or \"simple\" with this provider",
            ));
        }
        if n.ttl.0.as_secs() == 0 || n.ttl.0.as_secs() > 86_400 {
            out.push(Issue::new(
                at.key("ttl"),
                format!("{} is outside 1s..=1d", n.ttl),
                "use a short TTL such as \"60s\" so that clients follow the fleet",
            ));
        }
    }
}

fn listeners(config: &Config, out: &mut Vec<Issue>) {
    let l = &config.listeners;
    let path = FieldPath::root().key("listeners");
    // A controller-only file needs no client listeners.
    if l.http.is_none() && l.https.is_none() && config.controller.is_none() {
        out.push(Issue::new(
            path.clone(),
            "neither an http nor an https listener is set",
            "add http = \"0.0.0.0:80\" and/or https = \"0.0.0.0:443\" under [listeners]",
        ));
    }
    let mut seen: HashMap<std::net::SocketAddr, &str> = HashMap::new();
    for (name, addr) in [("http", l.http), ("https", l.https), ("admin", l.admin)] {
        let Some(addr) = addr else { continue };
        if let Some(other) = seen.insert(addr, name) {
            out.push(Issue::new(
                path.key(name),
                format!("{addr} is already used by listeners.{other}"),
                "use a different port for each listener",
            ));
        }
    }
}

fn limits(config: &Config, out: &mut Vec<Issue>) {
    let l = &config.limits;
    let path = FieldPath::root().key("limits");
    if !(MIN_HEADER_BYTES..=MAX_HEADER_BYTES).contains(&l.max_header_bytes.0) {
        out.push(Issue::new(
            path.key("max_header_bytes"),
            format!("{} is outside 1KiB..1MiB", l.max_header_bytes),
            "use a value such as \"32KiB\"",
        ));
    }
    if l.max_header_count == 0 || l.max_header_count > 256 {
        out.push(Issue::new(
            path.key("max_header_count"),
            format!("{} is outside 1..=256", l.max_header_count),
            "use a value such as 100",
        ));
    }
    for (name, d) in [
        ("header_read_timeout", l.header_read_timeout),
        ("keepalive_timeout", l.keepalive_timeout),
        ("body_read_timeout", l.body_read_timeout),
        ("send_timeout", l.send_timeout),
    ] {
        if d.0.is_zero() {
            out.push(Issue::new(
                path.key(name),
                "must be longer than zero",
                "use a value such as \"10s\"",
            ));
        }
    }
    if l.max_connections == 0 {
        out.push(Issue::new(
            path.key("max_connections"),
            "must be at least 1",
            "use a value such as 10000",
        ));
    }
    if l.max_connections_per_ip == 0 {
        out.push(Issue::new(
            path.key("max_connections_per_ip"),
            "must be at least 1",
            "use a value such as 1000 (set it to max_connections for no per-client limit)",
        ));
    }
}

fn forwarding(config: &Config, out: &mut Vec<Issue>) {
    let h = &config.forwarding.request_id_header;
    if !is_token(h) {
        out.push(Issue::new(
            FieldPath::root().key("forwarding").key("request_id_header"),
            format!("{h:?} is not a valid header name"),
            "use letters, digits and hyphens, e.g. \"x-request-id\"",
        ));
    }
}

fn access_log(config: &Config, out: &mut Vec<Issue>) {
    use crate::model::{ACCESS_LOG_FIELDS, ACCESS_LOG_SECRET_HEADERS};
    let Some(log) = &config.access_log else {
        return;
    };
    let path = FieldPath::root().key("access_log");
    if log.path.trim().is_empty() {
        out.push(Issue::new(
            path.key("path"),
            "no path given",
            "write to a file, e.g. path = \"/var/log/rampart/access.log\", or path = \"stdout\"",
        ));
    }
    if !(0.0..=1.0).contains(&log.sample) {
        out.push(Issue::new(
            path.key("sample"),
            format!("{} is not a share between 0.0 and 1.0", log.sample),
            "use e.g. 0.1 to log one successful request in ten (errors are always logged)",
        ));
    }
    if log.buffer == 0 || log.buffer > 1 << 20 {
        out.push(Issue::new(
            path.key("buffer"),
            format!("{} lines is not between 1 and 1048576", log.buffer),
            "keep the default (16384) unless lines are dropped under bursts",
        ));
    }
    for (key, names) in [("fields", &log.fields), ("drop_fields", &log.drop_fields)] {
        for (i, name) in names.iter().enumerate() {
            if !ACCESS_LOG_FIELDS.contains(&name.as_str()) {
                let hint = match crate::recover::closest(name, ACCESS_LOG_FIELDS) {
                    Some(close) => format!(
                        "did you mean {close:?}? Known fields: {}",
                        ACCESS_LOG_FIELDS.join(", ")
                    ),
                    None => format!("known fields: {}", ACCESS_LOG_FIELDS.join(", ")),
                };
                out.push(Issue::new(
                    path.key(key).index(i),
                    format!("{name:?} is not an access log field"),
                    hint,
                ));
            }
        }
    }
    for (i, name) in log.headers.iter().enumerate() {
        let lower = name.to_ascii_lowercase();
        if !is_token(name) {
            out.push(Issue::new(
                path.key("headers").index(i),
                format!("{name:?} is not a valid header name"),
                "use letters, digits and hyphens, e.g. \"user-agent\"",
            ));
        } else if ACCESS_LOG_SECRET_HEADERS.contains(&lower.as_str()) {
            out.push(Issue::new(
                path.key("headers").index(i),
                format!("{name} carries credentials and is never logged"),
                "remove it from the list",
            ));
        }
    }
}

fn tracing(config: &Config, out: &mut Vec<Issue>) {
    let Some(t) = &config.tracing else { return };
    let path = FieldPath::root().key("tracing");
    if !http_url(&t.otlp_endpoint) {
        out.push(Issue::new(
            path.key("otlp_endpoint"),
            format!("{:?} is not an http:// or https:// URL", t.otlp_endpoint),
            "give the collector's OTLP/HTTP traces URL, e.g. \"http://127.0.0.1:4318/v1/traces\"",
        ));
    }
    if !(0.0..=1.0).contains(&t.sample) {
        out.push(Issue::new(
            path.key("sample"),
            format!("{} is not a share between 0.0 and 1.0", t.sample),
            "use e.g. 0.05 to export one trace in twenty",
        ));
    }
    if t.queue == 0 || t.queue > 1 << 20 {
        out.push(Issue::new(
            path.key("queue"),
            format!("{} spans is not between 1 and 1048576", t.queue),
            "keep the default (8192)",
        ));
    }
}

/// Validates the `[[tls]]` entries and returns every host pattern they cover.
fn tls(config: &Config, out: &mut Vec<Issue>) -> Vec<HostPattern> {
    let mut all: HashMap<&HostPattern, usize> = HashMap::new();
    for (i, entry) in config.tls.iter().enumerate() {
        let path = FieldPath::root().key("tls").index(i);
        if entry.hosts.is_empty() {
            out.push(Issue::new(
                path.key("hosts"),
                "no hosts listed",
                "list the names this certificate is for, e.g. hosts = [\"example.com\"]",
            ));
        }
        for (j, host) in entry.hosts.iter().enumerate() {
            if let Some(first) = all.insert(host, i) {
                out.push(Issue::new(
                    path.key("hosts").index(j),
                    format!("{host} is already covered by tls[{first}]"),
                    "list each host in one [[tls]] entry only",
                ));
            }
        }
        tls_source(entry, &path, out);
        if let Some(auth) = &entry.client_auth {
            client_auth(auth, &path.key("client_auth"), out);
        }
    }
    all.into_keys().cloned().collect()
}

fn client_auth(auth: &crate::ClientAuth, path: &FieldPath, out: &mut Vec<Issue>) {
    if auth.ca_file.as_os_str().is_empty() {
        out.push(Issue::new(
            path.key("ca_file"),
            "no CA file given",
            "name the PEM file of the CA(s) that issue your clients' certificates",
        ));
    }
    let mut seen = HashMap::new();
    for (field, name) in auth.headers.named() {
        let at = path.key("headers").key(match field {
            crate::CertField::Subject => "subject",
            crate::CertField::Sans => "sans",
            crate::CertField::Fingerprint => "fingerprint",
            crate::CertField::Pem => "pem",
        });
        let lower = name.to_ascii_lowercase();
        if !valid_header_name(name) {
            out.push(Issue::new(
                at,
                format!("{name:?} is not a valid header name"),
                "use letters, digits and hyphens, or \"\" to send no such header",
            ));
        } else if FRAMING_HEADERS.contains(&lower.as_str())
            || [
                "host",
                "x-forwarded-for",
                "x-forwarded-proto",
                "x-forwarded-host",
                "forwarded",
            ]
            .contains(&lower.as_str())
        {
            out.push(Issue::new(
                at,
                format!("{name} is a header the proxy sets itself"),
                "choose a name of your own, e.g. x-client-cert-subject",
            ));
        } else if let Some(first) = seen.insert(lower, field) {
            out.push(Issue::new(
                at,
                format!("{name} also carries the {first:?} field"),
                "give each field a header of its own",
            ));
        }
    }
}

fn tls_source(entry: &TlsEntry, path: &FieldPath, out: &mut Vec<Issue>) {
    let TlsSource::Acme(acme) = &entry.source else {
        return;
    };
    let path = path.key("source").key("acme");
    acme_source(acme, &path, out);
    let wildcard = entry
        .hosts
        .iter()
        .any(|h| matches!(h, HostPattern::Wildcard(_)));
    if wildcard && acme.challenge != AcmeChallenge::Dns01 {
        out.push(Issue::new(
            path.key("challenge"),
            "wildcard certificates cannot be validated with http-01",
            "set challenge = \"dns-01\"",
        ));
    }
}

/// `[tls_on_demand]`: the ask URL, the caps and the ACME settings.
fn tls_on_demand(config: &Config, out: &mut Vec<Issue>) {
    let Some(od) = &config.tls_on_demand else {
        return;
    };
    let path = FieldPath::root().key("tls_on_demand");
    if !http_url(&od.ask) {
        out.push(Issue::new(
            path.key("ask"),
            format!("{:?} is not an http:// or https:// URL", od.ask),
            "give the application's approval endpoint, e.g. \"http://app.internal:8080/tls-ask\" (it gets ?domain=<name>)",
        ));
    }
    let counts = [
        (
            "asks_per_second",
            od.asks_per_second,
            1000,
            "keep the default (10)",
        ),
        (
            "max_per_hour",
            od.max_per_hour,
            1_000_000,
            "keep the default (100)",
        ),
        (
            "max_total",
            od.max_total,
            1_000_000,
            "keep the default (10000)",
        ),
    ];
    for (key, value, max, hint) in counts {
        if value == 0 || value > max {
            out.push(Issue::new(
                path.key(key),
                format!("{value} is not between 1 and {max}"),
                hint,
            ));
        }
    }
    if od.hold.0 > std::time::Duration::from_secs(60) {
        out.push(Issue::new(
            path.key("hold"),
            format!(
                "{} is longer than a client waits for a handshake",
                humantime::format_duration(od.hold.0)
            ),
            "keep the default (10s), or 0s to fail the first handshake at once",
        ));
    }
    if od.deny_for.0 < std::time::Duration::from_secs(1) {
        out.push(Issue::new(
            path.key("deny_for"),
            "a denial must be remembered for at least 1s",
            "keep the default (10m): a scanner then costs one ask per name per period",
        ));
    }
    let acme_path = path.key("acme");
    acme_source(&od.acme, &acme_path, out);
    if od.acme.challenge == AcmeChallenge::Dns01 {
        out.push(Issue::new(
            acme_path.key("challenge"),
            "on-demand names cannot be validated with dns-01: their zones are the customers'",
            "use challenge = \"http-01\" (port 80 reaches the proxies) or \"tls-alpn-01\"",
        ));
    }
}

/// The account, directories and EAB of ACME settings.
fn acme_source(acme: &crate::AcmeSource, path: &FieldPath, out: &mut Vec<Issue>) {
    if !acme.email.contains('@') {
        out.push(Issue::new(
            path.key("email"),
            format!("{:?} is not an e-mail address", acme.email),
            "use an address the CA can write to about expiring certificates",
        ));
    }
    if !acme.directory.starts_with("https://") {
        out.push(Issue::new(
            path.key("directory"),
            format!("{:?} is not an https:// URL", acme.directory),
            "use the CA's ACME directory URL",
        ));
    }
    for (i, f) in acme.fallback.iter().enumerate() {
        if !f.directory.starts_with("https://") {
            out.push(Issue::new(
                path.key("fallback").index(i).key("directory"),
                format!("{:?} is not an https:// URL", f.directory),
                "use the CA's ACME directory URL",
            ));
        }
    }
    let eabs = std::iter::once((path.key("eab"), &acme.eab)).chain(
        acme.fallback
            .iter()
            .enumerate()
            .map(|(i, f)| (path.key("fallback").index(i).key("eab"), &f.eab)),
    );
    for (eab_path, eab) in eabs {
        let Some(eab) = eab else { continue };
        if eab.kid.trim().is_empty() {
            out.push(Issue::new(
                eab_path.key("kid"),
                "the EAB key id is empty",
                "copy the \"EAB KID\" the CA shows with your account",
            ));
        }
        if eab.hmac_key_file.as_os_str().is_empty() {
            out.push(Issue::new(
                eab_path.key("hmac_key_file"),
                "no file named",
                "write the CA's \"EAB HMAC Key\" to a file readable by the controller and name it here",
            ));
        }
    }
}

fn route(config: &Config, origin: Origin, route: &Route, path: &FieldPath, out: &mut Vec<Issue>) {
    if route.name.is_empty()
        || !route
            .name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
    {
        out.push(Issue::new(
            path.key("name"),
            format!("{:?} is not a valid route name", route.name),
            "use letters, digits, '-', '_' or '.'",
        ));
    }
    if !route.path_prefix.starts_with('/') || route.path_prefix.contains(['?', '#', ' ']) {
        out.push(Issue::new(
            path.key("path_prefix"),
            format!("{:?} is not a path prefix", route.path_prefix),
            "start it with '/' and leave out query and fragment, e.g. \"/api\"",
        ));
    }
    for name in route.headers.keys() {
        if !is_token(name) {
            out.push(Issue::new(
                path.key("headers").key(name),
                format!("{name:?} is not a valid header name"),
                "use letters, digits and hyphens",
            ));
        }
    }
    if route.require_client_cert && origin == Origin::File {
        if route.hosts.is_empty() {
            out.push(Issue::new(
                path.key("require_client_cert"),
                "requires a client certificate but lists no hosts",
                "list the route's hosts; each must be in a [[tls]] entry with client_auth",
            ));
        }
        for host in &route.hosts {
            let authenticated = config.tls.iter().any(|t| {
                t.client_auth.is_some()
                    && t.hosts.iter().any(|p| {
                        p == host || matches!(host, HostPattern::Exact(h) if p.matches(h.as_str()))
                    })
            });
            if !authenticated {
                out.push(Issue::new(
                    path.key("require_client_cert"),
                    format!("{host} has no client_auth, so no request to it carries a verified client certificate"),
                    "add client_auth = { ca_file = \"...\", mode = \"optional\" } to the [[tls]] entry of this host",
                ));
            }
        }
    }
    // A controller's file has no listeners, and a snapshot meets each proxy's own: a
    // redirect from a proxy without an https listener is that proxy's local choice.
    let has_listeners = config.listeners.http.is_some() || config.listeners.https.is_some();
    if route.https_redirect
        && has_listeners
        && origin == Origin::File
        && config.listeners.https.is_none()
    {
        out.push(Issue::new(
            path.key("https_redirect"),
            "redirects to HTTPS but no https listener is configured",
            "set listeners.https or remove https_redirect",
        ));
    }
    for (key, rules, request) in [
        ("request_headers", &route.request_headers, true),
        ("response_headers", &route.response_headers, false),
    ] {
        let id = config.forwarding.request_id_header.as_str();
        header_rules(&path.key(key), rules, request, &route.action, id, out);
    }
    if let Some(auth) = &route.basic_auth {
        basic_auth(&path.key("basic_auth"), auth, out);
    }
    if let Some(auth) = &route.forward_auth {
        forward_auth(&path.key("forward_auth"), auth, &route.action, out);
    }
    regex_rules(route, path, out);
    if route.strip_prefix {
        if !matches!(route.action, crate::Action::Forward(_)) {
            out.push(Issue::new(
                path.key("strip_prefix"),
                "only a forward action sends a path upstream",
                "remove strip_prefix, or make the action { forward = \"<pool>\" }",
            ));
        } else if route.path_prefix.trim_end_matches('/').is_empty() {
            out.push(Issue::new(
                path.key("strip_prefix"),
                "path_prefix is \"/\": there is no prefix to strip",
                "set path_prefix, e.g. path_prefix = \"/api\", or remove strip_prefix",
            ));
        }
    }
    if let Some(limit) = &route.rate_limit {
        let at = path.key("rate_limit");
        if limit.requests == 0 {
            out.push(Issue::new(
                at.key("requests"),
                "a rate of 0 requests refuses every request",
                "allow at least 1, or use action = { respond = { status = 503 } } to close the route",
            ));
        }
        if limit.per.0.is_zero() {
            out.push(Issue::new(
                at.key("per"),
                "the period must be longer than 0",
                "use e.g. per = \"1s\" or \"1m\"",
            ));
        }
        if limit.burst == Some(0) {
            out.push(Issue::new(
                at.key("burst"),
                "a burst of 0 refuses every request",
                "allow at least 1, or leave it out to use `requests`",
            ));
        }
    }
    split(path, route, out);
    if let Some(pages) = &route.error_pages {
        error_pages(&path.key("error_pages"), pages, out);
    }
    if let Some(c) = &route.compress {
        compress(&path.key("compress"), c, &route.action, out);
    }
    if let Some(m) = &route.mirror {
        mirror(config, &path.key("mirror"), m, &route.action, out);
    }
    let action = path.key("action");
    match &route.action {
        Action::Forward(to) => forward_to(config, &action.key("forward"), to, out),
        Action::Redirect(r) => {
            if ![301, 302, 303, 307, 308].contains(&r.status) {
                out.push(Issue::new(
                    action.key("redirect").key("status"),
                    format!("{} is not a redirect status", r.status),
                    "use 301, 302, 303, 307 or 308",
                ));
            }
            if !(r.location.starts_with("https://")
                || r.location.starts_with("http://")
                || r.location.starts_with('/'))
                || r.location.contains(['\r', '\n'])
            {
                out.push(Issue::new(action.key("redirect").key("location"), format!("{:?} is not a URL", r.location), "use an absolute URL such as \"https://example.com\" or a path such as \"/new\""));
            }
        }
        Action::Respond(r) => {
            if !(100..=599).contains(&r.status) {
                out.push(Issue::new(
                    action.key("respond").key("status"),
                    format!("{} is not an HTTP status", r.status),
                    "use a status between 100 and 599",
                ));
            }
            if r.content_type.contains(['\r', '\n']) || r.content_type.is_empty() {
                out.push(Issue::new(
                    action.key("respond").key("content_type"),
                    "is not a valid header value",
                    "use a media type such as \"text/html; charset=utf-8\"",
                ));
            }
        }
    }
}

/// A route's `redirect` and `rewrite`: patterns that compile, a redirect status and a
/// location, and a rewrite only where a path goes upstream (not beside `strip_prefix`,
/// which a rewrite does itself).
fn regex_rules(route: &Route, path: &FieldPath, out: &mut Vec<Issue>) {
    let compile = |at: FieldPath, pattern: &str, out: &mut Vec<Issue>| {
        if let Err(e) = regex::Regex::new(pattern) {
            let detail = e.to_string();
            let last = detail.lines().last().unwrap_or("").trim().to_string();
            out.push(Issue::new(
                at,
                format!("{pattern:?} is not a regular expression: {last}"),
                "use Rust regex syntax (https://docs.rs/regex): escape '.' as \\. and group with (...)",
            ));
        }
    };
    if let Some(r) = &route.redirect {
        let at = path.key("redirect");
        compile(at.key("pattern"), &r.pattern, out);
        if ![301, 302, 303, 307, 308].contains(&r.status) {
            out.push(Issue::new(
                at.key("status"),
                format!("{} is not a redirect status", r.status),
                "use 301, 302, 303, 307 or 308",
            ));
        }
        if r.location.is_empty() || r.location.contains(['\r', '\n']) {
            out.push(Issue::new(
                at.key("location"),
                format!("{:?} is not a location", r.location),
                "use a URL such as \"https://$1\" (groups of the pattern as $1, ${name})",
            ));
        }
    }
    if let Some(r) = &route.rewrite {
        let at = path.key("rewrite");
        compile(at.key("pattern"), &r.pattern, out);
        if !matches!(route.action, crate::Action::Forward(_)) {
            out.push(Issue::new(
                at.clone(),
                "only a forward action sends a path upstream",
                "remove rewrite, or make the action { forward = \"<pool>\" }",
            ));
        }
        if route.strip_prefix {
            out.push(Issue::new(
                at.clone(),
                "rewrite and strip_prefix both change the path",
                "drop strip_prefix and let the rewrite remove the prefix: pattern = \"^/api(/.*)?$\", replacement = \"$1\"",
            ));
        }
        if r.replacement
            .contains(|c: char| c.is_whitespace() || c.is_control() || c == '#' || c == '?')
        {
            out.push(Issue::new(
                at.key("replacement"),
                format!("{:?} cannot be part of a path", r.replacement),
                "leave out spaces, control characters, '?' and '#' (the query is kept as it came)",
            ));
        }
    }
}

/// The problems of a route's split (its weights and `split` settings) as
/// `routes.<name>`, for routes a provider builds from labels, whose pools other
/// containers may define.
#[must_use]
pub fn route_split_issues(name: &str, route: &crate::Route) -> Vec<Issue> {
    let mut out = Vec::new();
    let at = FieldPath::root().key("routes").key(name);
    if let Action::Forward(crate::ForwardTo::Split(s)) = &route.action {
        split_weights(&at.key("action").key("forward"), s, &mut out);
    }
    split(&at, route, &mut out);
    out
}

/// Every problem of one pool as `pools.<name>` (for pools a provider builds from
/// labels); a pool without endpoints is not one.
#[must_use]
pub fn pool_issues(name: &str, p: &Pool) -> Vec<Issue> {
    let mut out = Vec::new();
    pool(
        name,
        p,
        true,
        &FieldPath::root().key("pools").key(name),
        &mut out,
    );
    out
}

fn pool(name: &str, pool: &Pool, discovered: bool, path: &FieldPath, out: &mut Vec<Issue>) {
    if let Some(s) = &pool.sticky {
        sticky(&path.key("sticky"), s, out);
    }
    if let Some(window) = pool.slow_start {
        if window.0 < std::time::Duration::from_secs(1)
            || window.0 > std::time::Duration::from_secs(3600)
        {
            out.push(Issue::new(
                path.key("slow_start"),
                format!(
                    "{} is not between 1s and 1h",
                    humantime::format_duration(window.0)
                ),
                "use the time a new endpoint needs to warm up (caches, JIT, connection pools), e.g. \"30s\"",
            ));
        }
    }
    if name.is_empty()
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
    {
        out.push(Issue::new(
            path.clone(),
            format!("{name:?} is not a valid pool name"),
            "use letters, digits, '-', '_' or '.'",
        ));
    }
    if pool.endpoints.is_empty() && !discovered {
        out.push(Issue::new(
            path.key("endpoints"),
            "the pool has no endpoints",
            "add endpoints = [{ address = \"10.0.0.5:8080\" }], or a [[discovery.files]] provider that lists them",
        ));
    }
    let mut seen = HashMap::new();
    for (i, ep) in pool.endpoints.iter().enumerate() {
        let ep_path = path.key("endpoints").index(i);
        if ep.weight == 0 || ep.weight > MAX_WEIGHT {
            out.push(Issue::new(
                ep_path.key("weight"),
                format!("{} is outside 1..={MAX_WEIGHT}", ep.weight),
                "use a weight between 1 and 1000, or remove the endpoint to stop its traffic",
            ));
        }
        if let Some(first) = seen.insert(&ep.address, i) {
            out.push(Issue::new(
                ep_path.key("address"),
                format!("{} is already endpoints[{first}]", ep.address),
                "list each address once; use weight to give it more traffic",
            ));
        }
    }
    if pool.hash_key.is_some() && pool.balance != Balance::ConsistentHash {
        out.push(Issue::new(
            path.key("hash_key"),
            "hash_key is only used by balance = \"consistent_hash\"",
            "remove hash_key or set balance = \"consistent_hash\"",
        ));
    }
    if let Some(hc) = &pool.health_check {
        health_check(hc, &path.key("health_check"), out);
        if matches!(hc.probe, crate::Probe::Grpc(_)) && pool.protocol == UpstreamProtocol::Http1 {
            out.push(Issue::new(
                path.key("health_check").key("probe"),
                "a gRPC health check needs HTTP/2, but the pool speaks HTTP/1.1",
                "set protocol = \"h2c\" (cleartext) or \"h2\" (with tls) on the pool",
            ));
        }
    }
    let ph = &pool.passive_health;
    if ph.consecutive_failures > 0 && (ph.eject_for.0.is_zero() || ph.max_eject_for < ph.eject_for)
    {
        out.push(Issue::new(
            path.key("passive_health").key("max_eject_for"),
            format!(
                "eject_for {} must be > 0 and <= max_eject_for {}",
                ph.eject_for, ph.max_eject_for
            ),
            "e.g. eject_for = \"10s\", max_eject_for = \"5m\"",
        ));
    }
    for (key, value) in [
        ("panic_threshold", ph.panic_threshold),
        ("max_ejected_percent", ph.max_ejected_percent),
    ] {
        if value > 100 {
            out.push(Issue::new(
                path.key("passive_health").key(key),
                format!("{key} is a percentage, got {value}"),
                "use a value from 0 to 100 (default 50)",
            ));
        }
    }
    let t = &pool.timeouts;
    for (field, d) in [
        ("connect", t.connect),
        ("first_byte", t.first_byte),
        ("idle", t.idle),
        ("total", t.total),
    ] {
        if d.0.is_zero() {
            out.push(Issue::new(
                path.key("timeouts").key(field),
                "must be longer than zero",
                "use a value such as \"5s\"",
            ));
        }
    }
    for (i, status) in pool.retries.on_status.iter().enumerate() {
        if ![502, 503].contains(status) {
            out.push(Issue::new(
                path.key("retries").key("on_status").index(i),
                format!("{status} cannot be retried safely"),
                "only 502 and 503 say that the upstream did not process the request",
            ));
        }
    }
    upstream_protocol(pool, path, out);
    if pool.retries.attempts > 10 {
        out.push(Issue::new(
            path.key("retries").key("attempts"),
            format!(
                "{} retries would multiply load on a failing upstream",
                pool.retries.attempts
            ),
            "use at most 10 (1-2 is typical)",
        ));
    }
    if pool.retries.budget_percent > 100 {
        out.push(Issue::new(
            path.key("retries").key("budget_percent"),
            format!(
                "{}% is more than every request in flight",
                pool.retries.budget_percent
            ),
            "use 0-100 (20 is Envoy's and Rampart's default)",
        ));
    }
    if let Some(cb) = &pool.circuit_breaker {
        circuit_breaker(&path.key("circuit_breaker"), cb, out);
    }
    if let Some(pages) = &pool.error_pages {
        error_pages(&path.key("error_pages"), pages, out);
    }
}

/// A pool's circuit breaker: a limit above 0, a ratio in (0, 1], sensible times.
fn circuit_breaker(at: &FieldPath, cb: &crate::CircuitBreaker, out: &mut Vec<Issue>) {
    if cb.max_in_flight == Some(0) {
        out.push(Issue::new(
            at.key("max_in_flight"),
            "0 requests in flight refuses every request",
            "allow at least 1, or leave it out for no limit",
        ));
    }
    if let Some(r) = cb.error_ratio {
        if !(r > 0.0 && r <= 1.0) {
            out.push(Issue::new(
                at.key("error_ratio"),
                format!("{r} is not a share between 0 and 1"),
                "use e.g. 0.5 (half the attempts failed)",
            ));
        }
    }
    if cb.min_requests == 0 {
        out.push(Issue::new(
            at.key("min_requests"),
            "with 0 attempts one failure would open the breaker",
            "use e.g. 20",
        ));
    }
    for (key, d) in [("window", cb.window), ("open_for", cb.open_for)] {
        if d.0 < std::time::Duration::from_millis(100) || d.0 > std::time::Duration::from_secs(3600)
        {
            out.push(Issue::new(
                at.key(key),
                format!("{d} is not between 100ms and 1h"),
                "use seconds: window = \"10s\", open_for = \"5s\"",
            ));
        }
    }
    if cb.max_in_flight.is_none() && cb.error_ratio.is_none() {
        out.push(Issue::new(
            at.clone(),
            "this breaker never refuses anything",
            "set max_in_flight, error_ratio or both",
        ));
    }
}

/// The pool's protocol, TLS and PROXY protocol settings agree with each other.
fn upstream_protocol(pool: &Pool, path: &FieldPath, out: &mut Vec<Issue>) {
    let needs_tls = matches!(pool.protocol, UpstreamProtocol::H2 | UpstreamProtocol::Auto);
    match (&pool.tls, pool.protocol) {
        (None, p) if needs_tls => out.push(Issue::new(
            path.key("protocol"),
            format!("protocol = \"{}\" negotiates HTTP/2 in the TLS handshake, but the pool has no tls", p.as_str()),
            "add tls = {} (system roots; or tls = { ca_file = \"ca.pem\" }), or use protocol = \"h2c\" for HTTP/2 in cleartext",
        )),
        (Some(_), UpstreamProtocol::H2c) => out.push(Issue::new(
            path.key("protocol"),
            "h2c is HTTP/2 in cleartext, but the pool has tls",
            "use protocol = \"h2\" for HTTP/2 over TLS, or remove tls",
        )),
        _ => {}
    }
    if pool.max_streams == 0 || pool.max_streams > 10_000 {
        out.push(Issue::new(
            path.key("max_streams"),
            format!("{} is outside 1..=10000", pool.max_streams),
            "use the endpoints' own limit (HTTP/2 servers commonly allow 100 to 250)",
        ));
    }
    let Some(tls) = &pool.tls else {
        return;
    };
    let tls_path = path.key("tls");
    match (&tls.client_cert, &tls.client_key) {
        (Some(_), None) => out.push(Issue::new(
            tls_path.key("client_key"),
            "client_cert is set but client_key is not",
            "add client_key = \"client.key\" (the PEM private key of client_cert)",
        )),
        (None, Some(_)) => out.push(Issue::new(
            tls_path.key("client_cert"),
            "client_key is set but client_cert is not",
            "add client_cert = \"client.pem\" (the PEM certificate chain of client_key)",
        )),
        _ => {}
    }
    if tls.insecure_skip_verify && !tls.i_understand_this_is_insecure {
        out.push(Issue::new(
            tls_path.key("insecure_skip_verify"),
            "skipping verification lets anyone on the network path read and change this pool's traffic",
            "give the endpoints' CA with ca_file = \"ca.pem\"; if you must, also set i_understand_this_is_insecure = true",
        ));
    }
    if tls.insecure_skip_verify && tls.ca_file.is_some() {
        out.push(Issue::new(
            tls_path.key("ca_file"),
            "ca_file is not used when insecure_skip_verify = true",
            "remove insecure_skip_verify so that ca_file is checked, or remove ca_file",
        ));
    }
    if let Some(name) = &tls.server_name {
        let valid = name.parse::<std::net::IpAddr>().is_ok()
            || (!name.is_empty()
                && name.len() <= 253
                && name.split('.').all(|l| {
                    !l.is_empty()
                        && l.len() <= 63
                        && l.bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
                }));
        if !valid {
            out.push(Issue::new(
                tls_path.key("server_name"),
                format!("{name:?} is not a host name or IP address"),
                "use the name in the endpoints' certificates, e.g. server_name = \"api.internal\"",
            ));
        }
    }
}

fn health_check(hc: &HealthCheck, path: &FieldPath, out: &mut Vec<Issue>) {
    if hc.interval.0.is_zero() {
        out.push(Issue::new(
            path.key("interval"),
            "must be longer than zero",
            "use a value such as \"5s\"",
        ));
    }
    if hc.timeout.0.is_zero() || hc.timeout > hc.interval {
        out.push(Issue::new(
            path.key("timeout"),
            format!(
                "{} must be > 0 and not longer than interval {}",
                hc.timeout, hc.interval
            ),
            "e.g. interval = \"5s\", timeout = \"2s\"",
        ));
    }
    for (field, n) in [
        ("healthy_threshold", hc.healthy_threshold),
        ("unhealthy_threshold", hc.unhealthy_threshold),
    ] {
        if n == 0 {
            out.push(Issue::new(
                path.key(field),
                "must be at least 1",
                "use a value such as 2",
            ));
        }
    }
    if let crate::Probe::Http(p) = &hc.probe {
        if !p.path.starts_with('/') {
            out.push(Issue::new(
                path.key("probe").key("http").key("path"),
                format!("{:?} does not start with '/'", p.path),
                "e.g. \"/healthz\"",
            ));
        }
        if !(100..=599).contains(&p.expect_status) {
            out.push(Issue::new(
                path.key("probe").key("http").key("expect_status"),
                format!("{} is not an HTTP status", p.expect_status),
                "e.g. 200",
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::{parse, LoadError};

    fn issues(src: &str) -> Vec<String> {
        match parse(src, "t.toml") {
            Ok(_) => Vec::new(),
            Err(LoadError::Invalid { issues, .. }) => issues
                .iter()
                .map(|i| format!("{}: {}", i.path, i.message))
                .collect(),
            Err(e) => panic!("{e}"),
        }
    }

    const BASE: &str = "[listeners]\nhttps = \"127.0.0.1:8443\"\n";

    #[test]
    fn redirect_and_rewrite_patterns_compile_and_fit_their_route() {
        let src = format!(
            "{BASE}[[routes]]\nname = \"a\"\nredirect = {{ pattern = \"^(www\", location = \"https://x\", status = 200 }}\naction = {{ forward = \"p\" }}\n\
             [[routes]]\nname = \"b\"\npath_prefix = \"/b\"\nstrip_prefix = true\nrewrite = {{ pattern = \"^/b(.*)\", replacement = \"/c d$1\" }}\naction = {{ forward = \"p\" }}\n\
             [[routes]]\nname = \"c\"\nrewrite = {{ pattern = \"^/x\", replacement = \"/y\" }}\naction = {{ respond = {{ body = \"x\" }} }}\n\
             [[routes]]\nname = \"ok\"\nredirect = {{ pattern = \"^https://www\\\\.(.+)$\", location = \"https://$1\" }}\nrewrite = {{ pattern = \"^/v1/(?P<rest>.*)$\", replacement = \"/${{rest}}\" }}\naction = {{ forward = \"p\" }}\n\
             [pools.p]\nendpoints = [{{ address = \"127.0.0.1:1\" }}]\n"
        );
        let got = issues(&src);
        assert!(
            got.iter().any(|i| i.starts_with(
                "routes[0].redirect.pattern: \"^(www\" is not a regular expression: "
            )),
            "{got:?}"
        );
        assert!(
            got.contains(&"routes[0].redirect.status: 200 is not a redirect status".to_string()),
            "{got:?}"
        );
        assert!(
            got.contains(
                &"routes[1].rewrite: rewrite and strip_prefix both change the path".to_string()
            ),
            "{got:?}"
        );
        assert!(
            got.contains(
                &"routes[1].rewrite.replacement: \"/c d$1\" cannot be part of a path".to_string()
            ),
            "{got:?}"
        );
        assert!(
            got.contains(
                &"routes[2].rewrite: only a forward action sends a path upstream".to_string()
            ),
            "{got:?}"
        );
        assert!(!got.iter().any(|i| i.starts_with("routes[3]")), "{got:?}");
        assert_eq!(got.len(), 5, "{got:?}");
    }

    #[test]
    fn client_auth_headers_and_routes_that_require_a_certificate_are_checked() {
        let src = format!(
            "{BASE}[[tls]]\nhosts = [\"a.test\"]\nsource = \"internal\"\n\
             client_auth = {{ ca_file = \"ca.pem\", mode = \"optional\", headers = {{ subject = \"X-Forwarded-For\", sans = \"x-c\", fingerprint = \"x-c\", pem = \"bad name\" }} }}\n\
             [[tls]]\nhosts = [\"b.test\"]\nsource = \"internal\"\n\
             [[routes]]\nname = \"ok\"\nhosts = [\"a.test\"]\nrequire_client_cert = true\naction = {{ respond = {{ body = \"x\" }} }}\n\
             [[routes]]\nname = \"b\"\nhosts = [\"b.test\"]\nrequire_client_cert = true\naction = {{ respond = {{ body = \"x\" }} }}\n\
             [[routes]]\nname = \"any\"\nrequire_client_cert = true\naction = {{ respond = {{ body = \"x\" }} }}\n"
        );
        assert_eq!(
            issues(&src),
            vec![
                "tls[0].client_auth.headers.subject: X-Forwarded-For is a header the proxy sets itself",
                "tls[0].client_auth.headers.fingerprint: x-c also carries the Sans field",
                "tls[0].client_auth.headers.pem: \"bad name\" is not a valid header name",
                "routes[1].require_client_cert: b.test has no client_auth, so no request to it carries a verified client certificate",
                "routes[2].require_client_cert: requires a client certificate but lists no hosts",
            ]
        );
    }

    #[test]
    fn forward_auth_needs_a_url_identity_headers_and_a_forwarding_route() {
        let src = format!(
            "{BASE}[[routes]]\nname = \"a\"\nforward_auth = {{ url = \"auth:4180/check\", copy_headers = [\"X-User\", \"bad name\", \"Content-Length\"], timeout = \"2m\" }}\naction = {{ respond = {{ body = \"x\" }} }}\n"
        );
        assert_eq!(
            issues(&src),
            vec![
                "routes[0].forward_auth.url: \"auth:4180/check\" is not an http:// or https:// URL",
                "routes[0].forward_auth.url: forward_auth guards requests that are forwarded; this route answers itself",
                "routes[0].forward_auth.copy_headers[1]: \"bad name\" is not a valid header name",
                "routes[0].forward_auth.copy_headers[2]: Content-Length describes the message, not the user",
                "routes[0].forward_auth.timeout: 2m is not between 10ms and 60s",
            ]
        );
    }

    #[test]
    fn slow_start_is_between_a_second_and_an_hour() {
        let pool = |v: &str| {
            format!("{BASE}[pools.a]\nslow_start = \"{v}\"\nendpoints = [{{ address = \"127.0.0.1:1\" }}]\n")
        };
        assert_eq!(
            issues(&pool("2h")),
            vec!["pools.a.slow_start: 2h is not between 1s and 1h"]
        );
        assert!(issues(&pool("30s")).is_empty());
    }

    #[test]
    fn on_demand_tls_needs_a_usable_ask_url_caps_and_no_dns01() {
        let src = format!(
            "{BASE}[tls_on_demand]\nask = \"app.internal/ask\"\nasks_per_second = 0\nmax_total = 0\nhold = \"2m\"\ndeny_for = \"0s\"\n\
             acme = {{ email = \"ops\", challenge = \"dns-01\" }}\n"
        );
        assert_eq!(
            issues(&src),
            vec![
                "tls_on_demand.ask: \"app.internal/ask\" is not an http:// or https:// URL",
                "tls_on_demand.asks_per_second: 0 is not between 1 and 1000",
                "tls_on_demand.max_total: 0 is not between 1 and 1000000",
                "tls_on_demand.hold: 2m is longer than a client waits for a handshake",
                "tls_on_demand.deny_for: a denial must be remembered for at least 1s",
                "tls_on_demand.acme.email: \"ops\" is not an e-mail address",
                "tls_on_demand.acme.challenge: on-demand names cannot be validated with dns-01: their zones are the customers'",
            ]
        );
        let ok = format!(
            "{BASE}[tls_on_demand]\nask = \"http://app.internal:8080/ask\"\nallow = [\"*.customers.example.com\"]\nacme = {{ email = \"ops@example.com\" }}\n"
        );
        assert!(issues(&ok).is_empty(), "{:?}", issues(&ok));
    }

    #[test]
    fn upstream_protocol_tls_and_proxy_protocol_settings_must_agree() {
        let pool = |name: &str, fields: &str| {
            format!("[pools.{name}]\nendpoints = [{{ address = \"127.0.0.1:1\" }}]\n{fields}\n")
        };
        let src = format!(
            "{BASE}{}{}{}{}{}{}{}",
            pool("a", "protocol = \"h2\""),
            pool("b", "protocol = \"h2c\"\ntls = {}"),
            pool("c", "tls = { client_cert = \"c.pem\" }"),
            pool("d", "tls = { insecure_skip_verify = true, ca_file = \"ca.pem\" }"),
            pool("e", "tls = { server_name = \"bad name\" }\nmax_streams = 0"),
            pool("f", "protocol = \"auto\"\ntls = { server_name = \"api.internal\", min_version = \"1.3\" }\nproxy_protocol = \"v2\""),
            pool("g", "protocol = \"h2c\"\ntls = { insecure_skip_verify = true, i_understand_this_is_insecure = true }"),
        ) + &pool("h", "health_check = { probe = { grpc = { service = \"\" } } }")
            + &pool("i", "protocol = \"h2c\"\nhealth_check = { probe = { grpc = {} } }");
        let got = issues(&src);
        let want = [
            "pools.a.protocol: protocol = \"h2\" negotiates HTTP/2 in the TLS handshake, but the pool has no tls",
            "pools.b.protocol: h2c is HTTP/2 in cleartext, but the pool has tls",
            "pools.c.tls.client_key: client_cert is set but client_key is not",
            "pools.d.tls.insecure_skip_verify: skipping verification lets anyone on the network path read and change this pool's traffic",
            "pools.d.tls.ca_file: ca_file is not used when insecure_skip_verify = true",
            "pools.e.tls.server_name: \"bad name\" is not a host name or IP address",
            "pools.e.max_streams: 0 is outside 1..=10000",
            "pools.g.protocol: h2c is HTTP/2 in cleartext, but the pool has tls",
            "pools.h.health_check.probe: a gRPC health check needs HTTP/2, but the pool speaks HTTP/1.1",
        ];
        for w in want {
            assert!(got.contains(&w.to_string()), "missing {w:?} in {got:#?}");
        }
        assert_eq!(got.len(), want.len(), "{got:#?}");
        let bad = format!("{BASE}{}", pool("a", "protocol = \"h3\""));
        let got = issues(&bad);
        assert!(
            got.iter().any(|g| g.contains("h3") && g.contains("h2c")),
            "{got:#?}"
        );
    }

    #[test]
    fn dns_names_must_be_in_the_zone_unique_and_weighted_only_on_route53() {
        let src = format!(
            "{BASE}[dns]\nzone = \"example.com\"\nowner_id = \"bad id\"\nbatch_size = 5000\n\
             [[dns.names]]\nname = \"www.example.org\"\n\
             [[dns.names]]\nname = \"api.example.com\"\npolicy = \"weighted\"\n\
             [[dns.names]]\nname = \"api.example.com\"\n"
        );
        let got = issues(&src);
        let want = [
            "dns.owner_id: \"bad id\" is not a valid owner id",
            "dns.batch_size: 5000 is outside 1..=1000",
            "dns.names[0].name: www.example.org is not inside the zone example.com",
            "dns.names[1].policy: weighted record sets exist only in Route53",
            "dns.names[2].name: api.example.com is also managed by dns.names[1]",
        ];
        for w in want {
            assert!(got.iter().any(|g| g == w), "missing {w:?} in {got:#?}");
        }
        assert_eq!(got.len(), want.len(), "{got:#?}");
        // Route53 takes weighted sets; the provider's fields are checked by serde.
        let ok = format!(
            "{BASE}[dns]\nzone = \"example.com\"\nprovider = {{ kind = \"route53\", hosted_zone_id = \"Z1\" }}\n\
             [[dns.names]]\nname = \"api.example.com\"\npolicy = \"weighted\"\n"
        );
        assert!(issues(&ok).is_empty(), "{:?}", issues(&ok));
    }

    #[test]
    fn a_complete_config_is_valid() {
        let src = format!(
            "{BASE}[server]\ndefault_sni = \"a.test\"\n[[tls]]\nhosts = [\"a.test\", \"*.b.test\"]\nsource = {{ acme = {{ email = \"o@a.test\", challenge = \"dns-01\" }} }}\n\
             [[routes]]\nname = \"r\"\nhosts = [\"a.test\"]\naction = {{ forward = \"p\" }}\n\
             [pools.p]\nbalance = \"consistent_hash\"\nhash_key = \"cookie:sid\"\nendpoints = [{{ address = \"127.0.0.1:1\", weight = 5 }}]\n\
             [pools.p.health_check]\nprobe = \"tcp\"\n"
        );
        assert_eq!(issues(&src), Vec::<String>::new());
    }

    #[test]
    fn listener_tls_and_acme_rules() {
        assert_eq!(
            issues("[listeners]\nadmin = \"127.0.0.1:1\"\n"),
            vec!["listeners: neither an http nor an https listener is set"]
        );
        let src = format!("{BASE}[server]\ndefault_sni = \"c.test\"\n[[tls]]\nhosts = [\"*.a.test\"]\nsource = {{ acme = {{ email = \"nope\" }} }}\n[[tls]]\nhosts = [\"*.a.test\"]\nsource = \"internal\"\n");
        let got = issues(&src);
        assert!(
            got.contains(&"server.default_sni: no [[tls]] entry covers c.test".to_string()),
            "{got:?}"
        );
        assert!(
            got.contains(
                &"tls[0].source.acme.email: \"nope\" is not an e-mail address".to_string()
            ),
            "{got:?}"
        );
        assert!(got.contains(&"tls[0].source.acme.challenge: wildcard certificates cannot be validated with http-01".to_string()), "{got:?}");
        assert!(
            got.contains(&"tls[1].hosts[0]: *.a.test is already covered by tls[0]".to_string()),
            "{got:?}"
        );
    }

    #[test]
    fn instances_are_forgotten_only_after_they_went_stale() {
        let src = "[controller]\ninstance_timeout = \"1m\"\nforget_after = \"30s\"\n";
        assert_eq!(
            issues(src),
            vec!["controller.forget_after: 30s is not longer than instance_timeout (1m): an instance would be forgotten before it is even stale"]
        );
        assert_eq!(
            issues("[controller]\ninstance_timeout = \"1m\"\nforget_after = \"2m\"\n"),
            Vec::<String>::new()
        );
    }

    #[test]
    fn header_rules_name_real_headers_the_proxy_does_not_own() {
        let src = format!(
            "{BASE}[[routes]]\nname = \"a\"\naction = {{ forward = \"p\" }}\n\
             request_headers = {{ set = {{ \"X-Env\" = \"prod\", \"Host\" = \"up.internal\", \"Bad Name\" = \"x\", \"X-Nl\" = \"a\\r\\nb\" }}, remove = [\"X-Env\", \"Content-Length\", \"x-request-id\", \"host\"] }}\n\
             response_headers = {{ set = {{ \"Strict-Transport-Security\" = \"max-age=60\", \"Host\" = \"h\" }}, remove = [\"Server\", \"Transfer-Encoding\"] }}\n\
             [[routes]]\nname = \"b\"\naction = {{ respond = {{ status = 204 }} }}\nresponse_headers = {{ remove = [\"Server\"] }}\n\
             [pools.p]\nendpoints = [{{ address = \"127.0.0.1:1\" }}]\n"
        );
        assert_eq!(
            issues(&src),
            vec![
                "routes[0].request_headers.set.X-Env: X-Env is both set and removed",
                "routes[0].request_headers.set.Host: Host is both set and removed",
                "routes[0].request_headers.set.\"Bad Name\": \"Bad Name\" is not a header name",
                "routes[0].request_headers.set.X-Nl: \"a\\r\\nb\" has control characters, which a header value cannot hold",
                "routes[0].request_headers.remove[1]: Content-Length frames the message or belongs to one connection: the proxy sets it",
                "routes[0].request_headers.remove[2]: x-request-id carries the request id (forwarding.request_id_header): the proxy sets it",
                "routes[0].request_headers.remove[3]: Host can only be set, on requests",
                "routes[0].response_headers.set.Host: Host can only be set, on requests",
                "routes[0].response_headers.remove[1]: Transfer-Encoding frames the message or belongs to one connection: the proxy sets it",
                "routes[1].response_headers: only a forward action passes messages on",
            ]
        );
    }

    #[test]
    fn basic_auth_takes_bcrypt_hashes_of_named_users() {
        let good = "$2b$04$Zo7L.HsWHw4aCtz.ZmFlVevF997bt5k/T5kg58mrTEJsfxyA8lR2m";
        let src = format!(
            "{BASE}[[routes]]\nname = \"a\"\naction = {{ respond = {{ status = 204 }} }}\n\
             basic_auth = {{ realm = \"say \\\"hi\\\"\", users = {{ alice = \"{good}\", bob = \"hunter2\", \"c:d\" = \"{good}\" }} }}\n\
             [[routes]]\nname = \"b\"\naction = {{ respond = {{ status = 204 }} }}\nbasic_auth = {{ users = {{}} }}\n\
             [[routes]]\nname = \"c\"\naction = {{ respond = {{ status = 204 }} }}\nbasic_auth = {{ users = {{ alice = \"{good}\" }} }}\n"
        );
        assert_eq!(
            issues(&src),
            vec![
                "routes[0].basic_auth.realm: \"say \\\"hi\\\"\" cannot be a realm",
                "routes[0].basic_auth.users.bob: is not a bcrypt hash (passwords are never written in clear)",
                "routes[0].basic_auth.users.\"c:d\": \"c:d\" cannot be a user name",
                "routes[1].basic_auth.users: no users: nobody could sign in",
            ]
        );
    }

    #[test]
    fn strip_prefix_needs_a_prefix_and_a_forward_action() {
        let src = format!(
            "{BASE}[[routes]]\nname = \"a\"\nstrip_prefix = true\naction = {{ forward = \"p\" }}\n\
             [[routes]]\nname = \"b\"\npath_prefix = \"/b\"\nstrip_prefix = true\naction = {{ respond = {{ status = 204 }} }}\n\
             [[routes]]\nname = \"c\"\npath_prefix = \"/c/\"\nstrip_prefix = true\naction = {{ forward = \"p\" }}\n\
             [pools.p]\nendpoints = [{{ address = \"127.0.0.1:1\" }}]\n"
        );
        assert_eq!(
            issues(&src),
            vec![
                "routes[0].strip_prefix: path_prefix is \"/\": there is no prefix to strip",
                "routes[1].strip_prefix: only a forward action sends a path upstream",
            ]
        );
    }

    #[test]
    fn https_redirect_needs_an_https_listener() {
        let got = issues("[listeners]\nhttp = \"127.0.0.1:80\"\n[[routes]]\nname = \"r\"\nhttps_redirect = true\naction = { respond = { status = 700 } }\n");
        assert_eq!(
            got,
            vec![
                "routes[0].https_redirect: redirects to HTTPS but no https listener is configured",
                "routes[0].action.respond.status: 700 is not an HTTP status"
            ]
        );
    }

    #[test]
    fn pool_rules() {
        let src = format!("{BASE}[pools.p]\nendpoints = [{{ address = \"127.0.0.1:1\" }}, {{ address = \"127.0.0.1:1\" }}]\nretries = {{ attempts = 50, on_status = [500] }}\n[pools.q]\n");
        let got = issues(&src);
        assert!(
            got.contains(
                &"pools.p.endpoints[1].address: 127.0.0.1:1 is already endpoints[0]".to_string()
            ),
            "{got:?}"
        );
        assert!(
            got.contains(&"pools.p.retries.on_status[0]: 500 cannot be retried safely".to_string()),
            "{got:?}"
        );
        assert!(
            got.iter()
                .any(|g| g.starts_with("pools.p.retries.attempts")),
            "{got:?}"
        );
        assert!(
            got.contains(&"pools.q.endpoints: the pool has no endpoints".to_string()),
            "{got:?}"
        );
    }

    #[test]
    fn issues_point_at_their_lines() {
        let err = parse(
            "[listeners]\nhttp = \"127.0.0.1:80\"\n\n[pools.p]\nendpoints = []\n",
            "t.toml",
        )
        .unwrap_err();
        assert_eq!(err.to_string(), "t.toml:5:1: pools.p.endpoints: the pool has no endpoints (hint: add endpoints = [{ address = \"10.0.0.5:8080\" }], or a [[discovery.files]] provider that lists them)");
    }

    proptest::proptest! {
        #[test]
        fn parsing_arbitrary_text_never_panics(src in "\\PC{0,300}") {
            let _ = parse(&src, "fuzz.toml");
        }

        #[test]
        fn parsing_arbitrary_toml_shapes_never_panics(key in "[a-z_]{1,12}", value in "[ -~]{0,40}") {
            for section in ["server", "listeners", "limits", "forwarding", "pools.p", "pools.p.health_check"] {
                let _ = parse(&format!("[{section}]\n{key} = {value}\n"), "fuzz.toml");
                let _ = parse(&format!("[{section}]\n{key} = \"{}\"\n", value.replace('"', "")), "fuzz.toml");
            }
        }
    }
}
