//! Container labels → routes and endpoints (the Docker and Swarm providers' pure core,
//! issue 8). Traefik users will recognise the shape:
//!
//! ```text
//! rampart.enable=true
//! rampart.pool.web.port=8080            # required for each pool
//! rampart.pool.web.weight=2             # optional, 1..=1000
//! rampart.route.site.host=www.example.com,example.com
//! rampart.route.site.path=/             # optional path prefix
//! rampart.route.site.pool=web           # optional when the container has one pool
//! rampart.route.site.priority=10        # optional
//! rampart.route.site.https_redirect=true
//! rampart.route.site.access_log=false
//! rampart.route.site.require_client_cert=true  # 403 without a verified client cert
//! rampart.route.site.strip_prefix=true  # forward /app/x as /x (needs a path)
//! rampart.route.site.allow_from=10.0.0.0/8,192.0.2.7  # others get 403
//! rampart.route.site.forward_auth=http://oauth2-proxy:4180/oauth2/auth  # 2xx lets a request through
//! rampart.route.site.forward_auth_headers=X-Auth-Request-User,X-Auth-Request-Email
//! rampart.route.site.compress=true      # gzip, brotli, zstd for text, JSON, JS, SVG…
//! rampart.route.site.split=v1:95,v2:5   # a canary: clients shared between pools by weight
//!                                       # (instead of pool; other containers may join
//!                                       # them); also split.cookie, split.ttl,
//!                                       # split.override_header, split.override_cookie
//! rampart.pool.api.protocol=h2c          # http1 (default), h2, h2c, auto
//! rampart.pool.api.tls=true              # TLS to the endpoints (system roots)
//! rampart.pool.api.tls.server_name=api.internal   # also tls.ca_file, tls.client_cert,
//!                                                 # tls.client_key, tls.min_version
//! rampart.pool.api.max_streams=100       # HTTP/2 streams per connection
//! rampart.pool.api.proxy_protocol=v2     # v1 or v2
//! rampart.pool.web.sticky=true           # sticky sessions (cookie rp_s); also
//!                                        # sticky.cookie=NAME, sticky.ttl=1h
//! rampart.pool.web.slow_start=30s        # ramp a new endpoint's share up over 30s
//! rampart.pool.web.max_in_flight=1000    # circuit breaker: more at once get 503
//! ```
//!
//! Pool settings apply to a pool the configuration file does not define (the file's
//! pool wins), and every container of a pool must give the same ones.
//!
//! A bad label is reported with the container and the fix, and only that container is
//! left out: it never breaks other routes.

// Self-contained (std and rampart-config only): fuzz/fuzz_targets/labels.rs compiles
// this file as is.
use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};

use rampart_config::{
    Action, Endpoint, HostPattern, Pool, PoolSettings, ProxyProtocol, Route, TlsVersion,
    UpstreamProtocol, UpstreamTls,
};

/// Label prefix.
const PREFIX: &str = "rampart.";

/// What one container's labels ask for.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Labelled {
    /// Routes, forwarding to this container's pools.
    pub routes: Vec<Route>,
    /// This container as an endpoint of each pool it joins.
    pub endpoints: BTreeMap<String, Endpoint>,
    /// How each pool's endpoints are reached, where labels say so.
    pub settings: BTreeMap<String, PoolSettings>,
}

/// Reads `labels` of the container `source` reachable at `ip`. `Ok(None)`: not enabled.
///
/// # Errors
/// Every problem, each naming the container, the label and the fix.
pub fn parse(
    source: &str,
    labels: &BTreeMap<String, String>,
    ip: IpAddr,
) -> Result<Option<Labelled>, Vec<String>> {
    match labels.get("rampart.enable").map(String::as_str) {
        Some("true") => {}
        Some("false") | None => return Ok(None),
        Some(other) => {
            return Err(vec![format!(
                "{source}: label rampart.enable={other:?}: use \"true\" or \"false\""
            )])
        }
    }
    let mut errors = Vec::new();
    let err = |errors: &mut Vec<String>, key: &str, value: &str, fix: &str| {
        errors.push(format!("{source}: label {key}={value:?}: {fix}"));
    };
    // pool name -> (port, weight)
    let mut pools: BTreeMap<String, (Option<u16>, u32)> = BTreeMap::new();
    let mut settings: BTreeMap<String, PoolSettings> = BTreeMap::new();
    // route name -> fields
    let mut routes: BTreeMap<String, BTreeMap<String, (String, String)>> = BTreeMap::new();
    for (key, value) in labels {
        let Some(rest) = key.strip_prefix(PREFIX) else {
            continue;
        };
        if rest == "enable" || rest == "role" {
            continue;
        }
        let parts: Vec<&str> = rest.splitn(3, '.').collect();
        match parts.as_slice() {
            ["pool", name, field] if valid_name(name) => {
                let entry = pools.entry((*name).to_string()).or_insert((None, 1));
                match *field {
                    "port" => match value.parse::<u16>() {
                        Ok(p) if p > 0 => entry.0 = Some(p),
                        _ => err(&mut errors, key, value, "use the port the container listens on, e.g. 8080"),
                    },
                    "weight" => match value.parse::<u32>() {
                        Ok(w) if (1..=1000).contains(&w) => entry.1 = w,
                        _ => err(&mut errors, key, value, "use a weight from 1 to 1000"),
                    },
                    field => {
                        let set = settings.entry((*name).to_string()).or_default();
                        if let Err(fix) = pool_setting(set, field, value) {
                            err(&mut errors, key, value, &fix);
                        }
                    }
                }
            }
            ["route", name, field] if valid_name(name) => {
                if matches!(
                    *field,
                    "host"
                        | "path"
                        | "pool"
                        | "priority"
                        | "https_redirect"
                        | "require_client_cert"
                        | "strip_prefix"
                        | "allow_from"
                        | "rate_limit"
                        | "access_log"
                        | "forward_auth"
                        | "forward_auth_headers"
                        | "compress"
                        | "split"
                        | "split.cookie"
                        | "split.ttl"
                        | "split.override_header"
                        | "split.override_cookie"
                ) {
                    routes
                        .entry((*name).to_string())
                        .or_default()
                        .insert((*field).to_string(), (key.clone(), value.clone()));
                } else {
                    err(
                        &mut errors,
                        key,
                        value,
                        "known route labels: host, path, pool, split, split.cookie, split.ttl, split.override_header, split.override_cookie, priority, https_redirect, require_client_cert, strip_prefix, allow_from, rate_limit, access_log, forward_auth, forward_auth_headers, compress",
                    );
                }
            }
            ["pool" | "route", name, _] => err(
                &mut errors,
                key,
                value,
                &format!("{name:?} is not a valid name: use letters, digits, '-' and '_'"),
            ),
            _ => err(
                &mut errors,
                key,
                value,
                "unknown label; rampart.enable, rampart.role, rampart.pool.<name>.<field> and rampart.route.<name>.<field> are known",
            ),
        }
    }
    let mut out = Labelled::default();
    for (name, (port, weight)) in &pools {
        match port {
            Some(port) => {
                out.endpoints.insert(
                    name.clone(),
                    Endpoint {
                        address: SocketAddr::new(ip, *port)
                            .to_string()
                            .parse()
                            .expect("a socket address is a valid endpoint address"),
                        weight: *weight,
                    },
                );
            }
            None => errors.push(format!(
                "{source}: pool {name} has no port: add the label rampart.pool.{name}.port=<port the container listens on>"
            )),
        }
    }
    for (name, set) in settings {
        let mut pool = Pool::default();
        set.apply(&mut pool);
        for issue in rampart_config::validate::pool_issues(&name, &pool) {
            errors.push(format!(
                "{source}: labels of pool {name}: {}: {} (fix: {})",
                issue.path, issue.message, issue.hint
            ));
        }
        out.settings.insert(name, set);
    }
    for (name, fields) in routes {
        match route(source, &name, &fields, &pools) {
            Ok(r) => out.routes.push(r),
            Err(e) => errors.push(e),
        }
    }
    if pools.is_empty() && errors.is_empty() {
        errors.push(format!(
            "{source}: rampart.enable=true but no pool: add rampart.pool.<name>.port=<port>"
        ));
    }
    if errors.is_empty() {
        Ok(Some(out))
    } else {
        Err(errors)
    }
}

/// Reads one pool setting label (`protocol`, `tls`, `tls.<field>`, `max_streams`,
/// `proxy_protocol`, `sticky`, `sticky.<field>`, `slow_start`) into `set`; the error is
/// the fix.
fn pool_setting(set: &mut PoolSettings, field: &str, value: &str) -> Result<(), String> {
    let path = || Some(std::path::PathBuf::from(value));
    match field {
        "protocol" => {
            set.protocol = Some(match value {
                "http1" => UpstreamProtocol::Http1,
                "h2" => UpstreamProtocol::H2,
                "h2c" => UpstreamProtocol::H2c,
                "auto" => UpstreamProtocol::Auto,
                _ => return Err("use http1, h2 (over TLS), h2c (cleartext) or auto".into()),
            });
        }
        "proxy_protocol" => {
            set.proxy_protocol = Some(match value {
                "v1" => ProxyProtocol::V1,
                "v2" => ProxyProtocol::V2,
                _ => return Err("use v1 or v2".into()),
            });
        }
        "max_streams" => match value.parse::<u32>() {
            Ok(n) => set.max_streams = Some(n),
            Err(_) => return Err("use a number of streams, e.g. 100".into()),
        },
        "tls" => match value {
            "true" => {
                tls(set);
            }
            "false" => set.tls = None,
            _ => return Err("use true or false".into()),
        },
        "sticky" => match value {
            "true" => {
                sticky(set);
            }
            "false" => set.sticky = None,
            _ => return Err("use true or false".into()),
        },
        "sticky.cookie" => {
            if value.is_empty()
                || !value
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
            {
                return Err("use a cookie name of letters, digits, '-' and '_', e.g. rp_s".into());
            }
            sticky(set).cookie = value.to_string();
        }
        "sticky.ttl" => {
            sticky(set).ttl = Some(value.parse().map_err(|_| "use a duration, e.g. 1h or 30m")?);
        }
        "slow_start" => {
            set.slow_start = Some(value.parse().map_err(|_| "use a duration, e.g. 30s")?);
        }
        "max_in_flight" => match value.parse::<u32>() {
            Ok(n) if n > 0 => {
                set.max_in_flight = Some(n);
            }
            _ => return Err("use a number of requests above 0, e.g. 1000".into()),
        },
        "tls.server_name" => tls(set).server_name = Some(value.to_string()),
        "tls.ca_file" => tls(set).ca_file = path(),
        "tls.client_cert" => tls(set).client_cert = path(),
        "tls.client_key" => tls(set).client_key = path(),
        "tls.min_version" => {
            tls(set).min_version = match value {
                "1.2" => TlsVersion::Tls12,
                "1.3" => TlsVersion::Tls13,
                _ => return Err("use 1.2 or 1.3".into()),
            };
        }
        _ => {
            return Err("known pool labels: port, weight, protocol, tls, tls.server_name, tls.ca_file, tls.client_cert, tls.client_key, tls.min_version, max_streams, proxy_protocol, sticky, sticky.cookie, sticky.ttl, slow_start, max_in_flight".into())
        }
    }
    Ok(())
}

fn sticky(set: &mut PoolSettings) -> &mut rampart_config::Sticky {
    set.sticky
        .get_or_insert_with(rampart_config::Sticky::default)
}

fn tls(set: &mut PoolSettings) -> &mut UpstreamTls {
    set.tls.get_or_insert_with(UpstreamTls::default)
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

fn route(
    source: &str,
    name: &str,
    fields: &BTreeMap<String, (String, String)>,
    pools: &BTreeMap<String, (Option<u16>, u32)>,
) -> Result<Route, String> {
    let bad = |(key, value): &(String, String), fix: &str| {
        format!("{source}: label {key}={value:?}: {fix}")
    };
    let hosts = match fields.get("host") {
        Some(kv) => {
            kv.1.split(',')
                .map(|h| h.trim().parse::<HostPattern>())
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| bad(kv, &format!("{e}; list host names separated by commas")))?
        }
        None => {
            return Err(format!(
                "{source}: route {name} has no host: add rampart.route.{name}.host=www.example.com"
            ))
        }
    };
    let path_prefix = match fields.get("path") {
        Some(kv) if kv.1.starts_with('/') => kv.1.clone(),
        Some(kv) => return Err(bad(kv, "a path prefix starts with '/'")),
        None => "/".to_string(),
    };
    let pool = match (fields.get("pool"), fields.get("split")) {
        (Some(kv), Some(_)) => {
            return Err(bad(
                kv,
                &format!("a route forwards to one pool or splits between several: remove rampart.route.{name}.pool or rampart.route.{name}.split"),
            ))
        }
        (None, Some(kv)) => split_pools(kv, &bad)?,
        (Some(kv), None) if pools.contains_key(&kv.1) => kv.1.clone().into(),
        (Some(kv), None) => {
            return Err(bad(
                kv,
                "name a pool this container joins with rampart.pool.<name>.port",
            ))
        }
        (None, None) if pools.len() == 1 => {
            pools.keys().next().cloned().unwrap_or_default().into()
        }
        (None, None) => {
            return Err(format!(
                "{source}: route {name} does not say which pool: add rampart.route.{name}.pool=<one of {}>",
                pools.keys().cloned().collect::<Vec<_>>().join(", ")
            ))
        }
    };
    let priority = match fields.get("priority") {
        Some(kv) => kv.1.parse().map_err(|_| bad(kv, "use an integer"))?,
        None => 0,
    };
    let https_redirect = match fields.get("https_redirect") {
        Some(kv) => kv.1.parse().map_err(|_| bad(kv, "use true or false"))?,
        None => false,
    };
    let require_client_cert = match fields.get("require_client_cert") {
        Some(kv) => kv.1.parse().map_err(|_| bad(kv, "use true or false"))?,
        None => false,
    };
    let access_log = match fields.get("access_log") {
        Some(kv) => kv.1.parse().map_err(|_| bad(kv, "use true or false"))?,
        None => true,
    };
    // `compress=true`: gzip, brotli and zstd with every default.
    let compress = match fields.get("compress") {
        Some(kv) => {
            kv.1.parse::<bool>()
                .map_err(|_| bad(kv, "use true or false"))?
                .then(rampart_config::Compress::default)
        }
        None => None,
    };
    let forward_auth = match (fields.get("forward_auth"), fields.get("forward_auth_headers")) {
        (Some(kv), headers) => Some(rampart_config::ForwardAuth {
            url: kv.1.clone(),
            copy_headers: headers
                .map(|h| {
                    h.1.split(',')
                        .map(|n| n.trim().to_string())
                        .filter(|n| !n.is_empty())
                        .collect()
                })
                .unwrap_or_default(),
            timeout: rampart_config::Dur::secs(5),
        }),
        (None, Some(kv)) => {
            return Err(bad(
                kv,
                &format!("headers to copy need the auth service: add rampart.route.{name}.forward_auth=http://auth:4180/check"),
            ))
        }
        (None, None) => None,
    };
    let allow_from = match fields.get("allow_from") {
        Some(kv) => {
            kv.1.split(',')
                .map(str::parse::<rampart_config::IpRange>)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| bad(kv, &format!("{e}; list them separated by commas")))?
        }
        None => Vec::new(),
    };
    let strip_prefix = match fields.get("strip_prefix") {
        Some(kv) => {
            let strip: bool = kv.1.parse().map_err(|_| bad(kv, "use true or false"))?;
            if strip && path_prefix.trim_end_matches('/').is_empty() {
                return Err(bad(
                    kv,
                    &format!("there is no prefix to strip: add rampart.route.{name}.path=/app"),
                ));
            }
            strip
        }
        None => false,
    };
    // `rate_limit=100/1s` or `100/1s burst 200`: requests per period per client IP.
    let rate_limit = match fields.get("rate_limit") {
        Some(kv) => Some(parse_rate(&kv.1).ok_or_else(|| {
            bad(kv, "use <requests>/<period>, optionally with a burst: \"100/1s\" or \"100/1m burst 20\"")
        })?),
        None => None,
    };
    let split = split_settings(fields, &bad)?;
    let route = Route {
        name: name.to_string(),
        hosts,
        path_prefix,
        headers: BTreeMap::new(),
        priority,
        https_redirect,
        redirect: None,
        rewrite: None,
        require_client_cert,
        strip_prefix,
        allow_from,
        basic_auth: None,
        forward_auth,
        request_headers: rampart_config::HeaderRules::default(),
        response_headers: rampart_config::HeaderRules::default(),
        access_log,
        max_body_bytes: None,
        rate_limit,
        split,
        error_pages: None,
        compress,
        mirror: None,
        action: Action::Forward(pool),
    };
    // The split's own checks (its pools may be other containers').
    if let Some(issue) = rampart_config::validate::route_split_issues(name, &route)
        .into_iter()
        .next()
    {
        return Err(format!(
            "{source}: labels of route {name}: {}: {} (fix: {})",
            issue.path, issue.message, issue.hint
        ));
    }
    Ok(route)
}

/// The `split.*` labels, if any: the split's cookie and overrides.
fn split_settings(
    fields: &BTreeMap<String, (String, String)>,
    bad: &impl Fn(&(String, String), &str) -> String,
) -> Result<Option<rampart_config::Split>, String> {
    let mut out: Option<rampart_config::Split> = None;
    for (field, kv) in fields {
        let Some(field) = field.strip_prefix("split.") else {
            continue;
        };
        let s = out.get_or_insert_with(rampart_config::Split::default);
        match field {
            "cookie" => s.cookie.clone_from(&kv.1),
            "ttl" => {
                s.ttl = Some(
                    kv.1.parse()
                        .map_err(|_| bad(kv, "use a duration such as 1d or 12h"))?,
                );
            }
            "override_header" => s.override_header = Some(kv.1.clone()),
            _ => s.override_cookie = Some(kv.1.clone()),
        }
    }
    Ok(out)
}

/// `v1:95,v2:5` as a weighted split between pools.
fn split_pools(
    kv: &(String, String),
    bad: &impl Fn(&(String, String), &str) -> String,
) -> Result<rampart_config::ForwardTo, String> {
    let fix = "list pools and weights separated by commas: v1:95,v2:5";
    kv.1.split(',')
        .map(|item| {
            let (pool, weight) = item.trim().split_once(':').ok_or_else(|| bad(kv, fix))?;
            if !valid_name(pool) {
                return Err(bad(
                    kv,
                    &format!("{pool:?} is not a pool name: use letters, digits, '-' and '_'"),
                ));
            }
            let weight = weight.trim().parse().map_err(|_| {
                bad(
                    kv,
                    &format!("{weight:?} is not a weight: use an integer from 0"),
                )
            })?;
            Ok(rampart_config::WeightedPool {
                pool: pool.to_string(),
                weight,
            })
        })
        .collect::<Result<Vec<_>, _>>()
        .map(rampart_config::ForwardTo::Split)
}

/// `"100/1s"` or `"100/1m burst 20"` as a client-IP rate limit.
fn parse_rate(s: &str) -> Option<rampart_config::RateLimit> {
    let mut words = s.split_whitespace();
    let (requests, per) = words.next()?.split_once('/')?;
    let burst = match (words.next(), words.next(), words.next()) {
        (None, _, _) => None,
        (Some("burst"), Some(n), None) => Some(n.parse().ok().filter(|&n| n > 0)?),
        _ => return None,
    };
    let requests: u32 = requests.parse().ok().filter(|&n| n > 0)?;
    let per: rampart_config::Dur = per.parse().ok()?;
    (!per.0.is_zero()).then_some(rampart_config::RateLimit {
        requests,
        per,
        burst,
        key: rampart_config::HashKey::ClientIp,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_labels_set_protocol_tls_and_proxy_protocol_or_say_what_is_wrong() {
        let l = parse(
            "c",
            &labels(&[
                ("rampart.enable", "true"),
                ("rampart.pool.api.port", "50051"),
                ("rampart.pool.api.protocol", "h2"),
                ("rampart.pool.api.tls.server_name", "api.internal"),
                ("rampart.pool.api.tls.ca_file", "/etc/ca.pem"),
                ("rampart.pool.api.max_streams", "50"),
                ("rampart.pool.api.proxy_protocol", "v2"),
                ("rampart.pool.api.sticky.ttl", "1h"),
                ("rampart.pool.api.slow_start", "30s"),
                ("rampart.pool.api.max_in_flight", "500"),
            ]),
            IP,
        )
        .unwrap()
        .unwrap();
        let set = &l.settings["api"];
        assert_eq!(set.protocol, Some(UpstreamProtocol::H2));
        let tls = set.tls.as_ref().unwrap();
        assert_eq!(tls.server_name.as_deref(), Some("api.internal"));
        assert_eq!(
            tls.ca_file.as_deref(),
            Some(std::path::Path::new("/etc/ca.pem"))
        );
        assert_eq!(
            (set.max_streams, set.proxy_protocol),
            (Some(50), Some(ProxyProtocol::V2))
        );
        let sticky = set.sticky.as_ref().unwrap();
        assert_eq!(
            (sticky.cookie.as_str(), sticky.ttl),
            ("rp_s", Some(rampart_config::Dur::secs(3600)))
        );
        assert_eq!(set.slow_start, Some(rampart_config::Dur::secs(30)));
        assert_eq!(set.max_in_flight, Some(500));
        let mut pool = rampart_config::Pool::default();
        set.apply(&mut pool);
        assert_eq!(
            pool.circuit_breaker.and_then(|c| c.max_in_flight),
            Some(500)
        );

        let e = parse(
            "c",
            &labels(&[
                ("rampart.enable", "true"),
                ("rampart.pool.api.port", "50051"),
                ("rampart.pool.api.protocol", "h3"),
                ("rampart.pool.web.port", "80"),
                ("rampart.pool.web.protocol", "h2"),
                ("rampart.pool.web.tlss", "true"),
                ("rampart.pool.web.slow_start", "soon"),
            ]),
            IP,
        )
        .unwrap_err();
        let text = e.join("\n");
        assert!(
            text.contains("rampart.pool.api.protocol=\"h3\": use http1, h2"),
            "{text}"
        );
        assert!(
            text.contains("rampart.pool.web.tlss=\"true\": known pool labels"),
            "{text}"
        );
        assert!(
            text.contains("rampart.pool.web.slow_start=\"soon\": use a duration"),
            "{text}"
        );
        assert!(
            text.contains("labels of pool web: pools.web.protocol"),
            "{text}"
        );
    }

    #[test]
    fn a_split_label_shares_a_route_between_pools_or_says_what_is_wrong() {
        let canary = |extra: &[(&str, &str)]| {
            let mut l = labels(&[
                ("rampart.enable", "true"),
                ("rampart.pool.v2.port", "8080"),
                ("rampart.route.site.host", "www.example.com"),
            ]);
            l.extend(labels(extra));
            parse("web-v2-1", &l, IP)
        };
        // The split may name pools other containers join (v1 here).
        let got = canary(&[
            ("rampart.route.site.split", "v1:95, v2:5"),
            ("rampart.route.site.split.cookie", "rp_canary"),
            ("rampart.route.site.split.ttl", "1d"),
            ("rampart.route.site.split.override_header", "X-Canary"),
        ])
        .unwrap()
        .unwrap();
        let r = &got.routes[0];
        let want: rampart_config::ForwardTo = rampart_config::ForwardTo::Split(vec![
            rampart_config::WeightedPool {
                pool: "v1".into(),
                weight: 95,
            },
            rampart_config::WeightedPool {
                pool: "v2".into(),
                weight: 5,
            },
        ]);
        assert_eq!(r.action, Action::Forward(want));
        let split = r.split.as_ref().unwrap();
        assert_eq!(
            (
                split.cookie.as_str(),
                split.ttl,
                split.override_header.as_deref()
            ),
            (
                "rp_canary",
                Some(rampart_config::Dur::secs(86_400)),
                Some("X-Canary")
            )
        );
        // Without split.* labels, the split's defaults.
        let got = canary(&[("rampart.route.site.split", "v1:1,v2:1")])
            .unwrap()
            .unwrap();
        assert_eq!(got.routes[0].split, None);

        for (extra, want) in [
            (
                &[
                    ("rampart.route.site.split", "v1:95,v2:5"),
                    ("rampart.route.site.pool", "v2"),
                ][..],
                "one pool or splits between several",
            ),
            (&[("rampart.route.site.split", "v1=95")][..], "v1:95,v2:5"),
            (
                &[("rampart.route.site.split", "v1:x,v2:5")][..],
                "\"x\" is not a weight",
            ),
            (
                &[("rampart.route.site.split", "v 1:1,v2:5")][..],
                "is not a pool name",
            ),
            (
                &[("rampart.route.site.split", "v1:0,v2:0")][..],
                "every weight is 0",
            ),
            (
                &[("rampart.route.site.split", "v2:1,v2:5")][..],
                "in the split twice",
            ),
            (
                &[
                    ("rampart.route.site.split", "v1:1,v2:5"),
                    ("rampart.route.site.split.cookie", "bad cookie"),
                ][..],
                "is not a cookie name",
            ),
            (
                &[("rampart.route.site.split.override_header", "X-Canary")][..],
                "split settings need a split",
            ),
            (
                &[
                    ("rampart.route.site.split", "v1:1,v2:5"),
                    ("rampart.route.site.split.ttl", "soon"),
                ][..],
                "use a duration",
            ),
        ] {
            let text = canary(extra).unwrap_err().join("\n");
            assert!(text.contains(want), "{extra:?}: {want:?} not in {text}");
        }
    }

    #[test]
    fn rate_limit_labels_parse_or_say_what_is_wrong() {
        let r = parse_rate("100/1s").unwrap();
        assert_eq!((r.requests, r.per.0.as_secs(), r.burst), (100, 1, None));
        let r = parse_rate("20/1m burst 5").unwrap();
        assert_eq!((r.requests, r.per.0.as_secs(), r.burst), (20, 60, Some(5)));
        for bad in [
            "100",
            "0/1s",
            "10/0s",
            "10/1s burst",
            "10/1s burst 0",
            "10/1s x 2",
            "a/1s",
        ] {
            assert!(parse_rate(bad).is_none(), "{bad}");
        }
    }

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_string(), (*v).to_string()))
            .collect()
    }

    const IP: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(172, 18, 0, 5));

    #[test]
    fn a_labelled_container_gives_a_route_and_an_endpoint() {
        let l = labels(&[
            ("rampart.enable", "true"),
            ("rampart.pool.web.port", "8080"),
            ("rampart.pool.web.weight", "3"),
            ("rampart.route.site.host", "www.example.com, example.com"),
            ("rampart.route.site.path", "/app"),
            ("rampart.route.site.https_redirect", "true"),
            ("rampart.route.site.require_client_cert", "true"),
            ("rampart.route.site.strip_prefix", "true"),
            ("rampart.route.site.allow_from", "10.0.0.0/8, 192.0.2.7"),
            ("rampart.route.site.forward_auth", "http://auth:4180/check"),
            ("rampart.route.site.forward_auth_headers", "X-User, X-Email"),
            ("rampart.route.site.compress", "true"),
            ("com.docker.compose.service", "web"),
        ]);
        let got = parse("web-1", &l, IP).unwrap().unwrap();
        assert_eq!(got.endpoints["web"].address.to_string(), "172.18.0.5:8080");
        assert_eq!(got.endpoints["web"].weight, 3);
        let r = &got.routes[0];
        assert_eq!(r.name, "site");
        assert_eq!(r.hosts.len(), 2);
        assert_eq!(r.path_prefix, "/app");
        assert!(r.https_redirect);
        assert!(r.require_client_cert);
        assert_eq!(r.compress, Some(rampart_config::Compress::default()));
        assert!(r.strip_prefix);
        assert_eq!(r.allow_from.len(), 2);
        assert_eq!(r.allow_from[1].to_string(), "192.0.2.7");
        let auth = r.forward_auth.as_ref().unwrap();
        assert_eq!(auth.url, "http://auth:4180/check");
        assert_eq!(auth.copy_headers, ["X-User", "X-Email"]);
        assert_eq!(r.action, Action::Forward("web".into()));
    }

    #[test]
    fn not_enabled_is_ignored() {
        assert_eq!(
            parse("c", &labels(&[("rampart.pool.web.port", "80")]), IP),
            Ok(None)
        );
        assert_eq!(
            parse("c", &labels(&[("rampart.enable", "false")]), IP),
            Ok(None)
        );
    }

    #[test]
    fn bad_labels_name_the_container_the_label_and_the_fix() {
        let l = labels(&[
            ("rampart.enable", "true"),
            ("rampart.pool.web.port", "eighty"),
            ("rampart.pool.api.port", "9000"),
            ("rampart.route.site.host", "www.example.com"),
            ("rampart.route.x.hots", "a.example.com"),
            ("rampart.tls", "yes"),
        ]);
        let errors = parse("shop-7", &l, IP).unwrap_err();
        let text = errors.join("\n");
        assert!(errors.iter().all(|e| e.starts_with("shop-7: ")), "{text}");
        assert!(
            text.contains("rampart.pool.web.port=\"eighty\": use the port"),
            "{text}"
        );
        assert!(text.contains("known route labels"), "{text}");
        assert!(
            text.contains("rampart.tls=\"yes\": unknown label"),
            "{text}"
        );
        assert!(
            text.contains("route site does not say which pool"),
            "{text}"
        );
        assert_eq!(errors.len(), 5, "{text}");
    }

    #[test]
    fn enabled_without_a_pool_or_a_host_is_explained() {
        let e = parse("c", &labels(&[("rampart.enable", "true")]), IP).unwrap_err();
        assert!(e[0].contains("add rampart.pool.<name>.port"), "{e:?}");
        let e = parse(
            "c",
            &labels(&[
                ("rampart.enable", "true"),
                ("rampart.pool.web.port", "80"),
                ("rampart.route.r.path", "/"),
            ]),
            IP,
        )
        .unwrap_err();
        assert!(e[0].contains("route r has no host"), "{e:?}");
        let e = parse(
            "c",
            &labels(&[
                ("rampart.enable", "true"),
                ("rampart.pool.web.port", "80"),
                ("rampart.route.r.host", "a.example.com"),
                ("rampart.route.r.strip_prefix", "true"),
            ]),
            IP,
        )
        .unwrap_err();
        assert!(
            e[0].contains("no prefix to strip: add rampart.route.r.path=/app"),
            "{e:?}"
        );
        let e = parse("c", &labels(&[("rampart.enable", "yes")]), IP).unwrap_err();
        assert!(e[0].contains("use \"true\" or \"false\""), "{e:?}");
    }
}
