//! The request's authority (RFC 9110 §7.2, RFC 3986 §3.2.2): one validated host and
//! optional port, taken from the absolute-form target or HTTP/2's `:authority` and the
//! `Host` header, which must agree. Routing, the upstream `Host`, `X-Forwarded-Host`
//! and `Forwarded` all use this one value, so a client cannot route on one name and
//! smuggle another (or a crafted `Forwarded` element) to the upstream.

use http::HeaderValue;

use crate::limits::Rejection;

/// A validated authority.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Authority {
    /// The host for routing: lowercase, without brackets, port or trailing dot.
    pub host: String,
    /// The value sent upstream as `Host` (and in `X-Forwarded-Host`): the client's
    /// spelling, which is known to contain only host characters, `[`, `]` and `:`.
    pub value: HeaderValue,
}

/// The authority of a request from its target's authority (absolute-form or
/// `:authority`) and its `Host` fields.
///
/// # Errors
/// [`Rejection::MissingHost`] without any (HTTP/1.1), [`Rejection::BadHost`] for a
/// value that is not `host[:port]`, [`Rejection::AuthorityMismatch`] when the target's
/// authority and `Host` name different hosts, or several `Host` fields.
pub fn of_request(req: &http::request::Parts, raw_target: &[u8]) -> Result<Authority, Rejection> {
    let mut hosts = req.headers.get_all(http::header::HOST).iter();
    let host_field = hosts.next();
    if hosts.next().is_some() {
        return Err(Rejection::AuthorityMismatch);
    }
    // Pingora keeps only the path of an absolute-form target in its URI: the raw
    // target is the one source for HTTP/1, `:authority` (in the URI) for HTTP/2.
    let target = match absolute_form_authority(raw_target) {
        Some(a) => Some(a),
        None => req.uri.authority().map(|a| a.as_str().as_bytes()),
    };
    match (target, host_field) {
        (Some(target), Some(field)) => {
            let from_target = parse(target)?;
            let from_field = of_field(field)?;
            // Same host and port, whatever the case (RFC 9113 §8.3.1 wants them equal).
            if !from_target
                .value
                .as_bytes()
                .eq_ignore_ascii_case(from_field.value.as_bytes())
            {
                return Err(Rejection::AuthorityMismatch);
            }
            Ok(from_target)
        }
        (Some(target), None) => parse(target),
        (None, Some(field)) => of_field(field),
        (None, None) if req.version == http::Version::HTTP_10 => Ok(Authority {
            host: String::new(),
            value: HeaderValue::from_static(""),
        }),
        (None, None) => Err(Rejection::MissingHost),
    }
}

/// The authority of a `Host` field: validated, and its value shared, not copied.
fn of_field(field: &HeaderValue) -> Result<Authority, Rejection> {
    let host = host_of(field.as_bytes())?;
    Ok(Authority {
        host,
        value: field.clone(),
    })
}

/// The authority of an absolute-form target (`http://a.test:8080/x` → `a.test:8080`).
#[must_use]
pub fn absolute_form_authority(target: &[u8]) -> Option<&[u8]> {
    let scheme_len = target.iter().position(|&b| b == b':')?;
    let scheme = &target[..scheme_len];
    let is_http = scheme.eq_ignore_ascii_case(b"http") || scheme.eq_ignore_ascii_case(b"https");
    let rest = target[scheme_len..]
        .strip_prefix(b"://")
        .filter(|_| is_http)?;
    let end = rest
        .iter()
        .position(|&b| b == b'/' || b == b'?')
        .unwrap_or(rest.len());
    Some(&rest[..end])
}

/// Parses `host[:port]` where host is a reg-name of letters, digits, `-`, `.` and `_`,
/// an IPv4 address, or an IPv6 literal in brackets; the port is 1–5 digits (or empty).
///
/// # Errors
/// [`Rejection::BadHost`] for anything else (userinfo, quotes, spaces, commas, …).
pub fn parse(raw: &[u8]) -> Result<Authority, Rejection> {
    let host = host_of(raw)?;
    let value = HeaderValue::from_bytes(raw).map_err(|_| Rejection::BadHost)?;
    Ok(Authority { host, value })
}

/// The routing host of a valid `host[:port]`.
fn host_of(raw: &[u8]) -> Result<String, Rejection> {
    let bad = Rejection::BadHost;
    let (host, port) = if let Some(rest) = raw.strip_prefix(b"[") {
        let end = rest.iter().position(|&b| b == b']').ok_or(bad)?;
        let literal = std::str::from_utf8(&rest[..end]).map_err(|_| bad)?;
        let ip: std::net::Ipv6Addr = literal.parse().map_err(|_| bad)?;
        let after = &rest[end + 1..];
        let port = match after {
            [] => None,
            [b':', port @ ..] => Some(port),
            _ => return Err(bad),
        };
        (ip.to_string(), port)
    } else {
        let (host, port) = match raw.iter().position(|&b| b == b':') {
            Some(i) => (&raw[..i], Some(&raw[i + 1..])),
            None => (raw, None),
        };
        let valid = !host.is_empty()
            && host
                .iter()
                .all(|&b| b.is_ascii_alphanumeric() || b"-._".contains(&b));
        if !valid {
            return Err(bad);
        }
        let host = std::str::from_utf8(host).map_err(|_| bad)?;
        (host.trim_end_matches('.').to_ascii_lowercase(), port)
    };
    if let Some(port) = port {
        let digits = port.len() <= 5 && port.iter().all(u8::is_ascii_digit);
        let in_range = port.is_empty()
            || std::str::from_utf8(port)
                .ok()
                .and_then(|p| p.parse::<u16>().ok())
                .is_some();
        if !(digits && in_range) {
            return Err(bad);
        }
    }
    Ok(host)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(raw: &str) -> Result<String, Rejection> {
        parse(raw.as_bytes()).map(|a| a.host)
    }

    #[test]
    fn hosts_ports_and_literals_parse() {
        assert_eq!(host("A.Test").unwrap(), "a.test");
        assert_eq!(host("a.test.").unwrap(), "a.test");
        assert_eq!(host("a.test:8443").unwrap(), "a.test");
        assert_eq!(host("a.test:").unwrap(), "a.test");
        assert_eq!(host("127.0.0.1:80").unwrap(), "127.0.0.1");
        assert_eq!(host("[::1]:443").unwrap(), "::1");
        assert_eq!(host("[::1]").unwrap(), "::1");
        assert_eq!(host("under_score.test").unwrap(), "under_score.test");
    }

    #[test]
    fn crafted_hosts_are_refused() {
        for raw in [
            "[a.test]\", for=6.6.6.6;host=\"a.test",
            "[a.test]",
            "[::1]x",
            "a.test:80:80",
            "a.test:99999",
            "a.test:8x",
            "user@a.test",
            "a test",
            "a.test,b.test",
            "\"a.test\"",
            "",
            ":80",
            "a.test;for=1.2.3.4",
        ] {
            assert_eq!(host(raw), Err(Rejection::BadHost), "{raw:?}");
        }
    }

    fn of(target: &str, hosts: &[&str], version: http::Version) -> Result<Authority, Rejection> {
        of_request(&parts(target, hosts, version), target.as_bytes())
    }

    fn parts(target: &str, hosts: &[&str], version: http::Version) -> http::request::Parts {
        let mut builder = http::Request::builder().uri(target).version(version);
        for h in hosts {
            builder = builder.header("host", *h);
        }
        builder.body(()).unwrap().into_parts().0
    }

    #[test]
    fn target_and_host_must_agree() {
        let v11 = http::Version::HTTP_11;
        let a = of("http://a.test/x", &["A.test"], v11).unwrap();
        assert_eq!(a.host, "a.test");
        assert_eq!(a.value, "a.test");
        assert_eq!(
            of("http://a.test/x", &["b.test"], v11),
            Err(Rejection::AuthorityMismatch)
        );
        assert_eq!(
            of("http://a.test:81/x", &["a.test"], v11),
            Err(Rejection::AuthorityMismatch)
        );
        assert_eq!(
            of("/x", &["a.test", "b.test"], v11),
            Err(Rejection::AuthorityMismatch)
        );
        assert_eq!(of("/x", &[], v11), Err(Rejection::MissingHost));
        assert_eq!(of("/x", &[], http::Version::HTTP_10).unwrap().host, "");
        let b = of("http://b.test/x", &[], v11).unwrap();
        assert_eq!(b.value, "b.test");
    }
}
