//! Request and response header rewriting: the client address behind trusted proxies,
//! X-Forwarded-For/-Proto/-Host and `Forwarded`, request ids, and hop-by-hop headers.
//!
//! Client-sent forwarding headers are believed only from peers in
//! `forwarding.trusted_proxies`; from anyone else they are replaced, so a client cannot
//! spoof its address to the upstream or to consistent hashing.

use std::net::IpAddr;

use http::header::{HeaderName, CONNECTION, UPGRADE};
use http::HeaderMap;
use ipnet::IpNet;

/// Headers that describe one connection and are never forwarded (RFC 9110 §7.6.1).
/// Transfer-Encoding and Content-Length are left to Pingora, which owns framing.
pub(crate) const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "upgrade",
];

/// Fields a `Connection` header cannot make hop-by-hop: the proxy routes on Host and
/// frames messages by Content-Length and Transfer-Encoding.
pub(crate) const PROTECTED: &[&str] = &["host", "content-length", "transfer-encoding"];

/// The forwarding fields the proxy sets, which a request's `Connection` may not name
/// either (nor those of [`PROTECTED`]; Pingora refuses both).
pub(crate) const FORWARDING: &[&str] =
    &["x-forwarded-for", "x-forwarded-host", "x-forwarded-proto"];

/// `text` with every byte outside printable ASCII, and `%`, written `%XX`: safe in a
/// header value whatever it held (gRPC's `grpc-message` encoding, RFC 3986 escapes).
pub(crate) fn printable(text: &str) -> String {
    const ESCAPED: &percent_encoding::AsciiSet = &percent_encoding::CONTROLS.add(b'%');
    percent_encoding::utf8_percent_encode(text, ESCAPED).to_string()
}

/// `text` with the bytes a URI cannot hold (controls, space, `"<>\\^`{|}`, non-ASCII)
/// written `%XX`. `%` and the reserved characters stay: the escapes a URL already has
/// are kept as they are, never escaped twice.
pub(crate) fn uri_escaped(text: &str) -> String {
    const ESCAPED: &percent_encoding::AsciiSet = &percent_encoding::CONTROLS
        .add(b' ')
        .add(b'"')
        .add(b'<')
        .add(b'>')
        .add(b'\\')
        .add(b'^')
        .add(b'`')
        .add(b'{')
        .add(b'|')
        .add(b'}');
    percent_encoding::utf8_percent_encode(text, ESCAPED).to_string()
}

/// The comma-separated tokens of a header value, as bytes (a value need not be UTF-8).
pub(crate) fn tokens(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    value
        .split(|&b| b == b',')
        .map(<[u8]>::trim_ascii)
        .filter(|t| !t.is_empty())
}

/// A route's `request_headers` or `response_headers`, parsed once per generation.
#[derive(Clone, Debug, Default)]
pub struct HeaderEdits {
    /// Set, replacing the message's own values.
    pub set: Vec<(HeaderName, http::HeaderValue)>,
    /// Removed.
    pub remove: Vec<HeaderName>,
}

impl HeaderEdits {
    /// The edits of `rules` (validation refused names and values that do not parse).
    #[must_use]
    pub fn new(rules: &rampart_config::HeaderRules) -> Self {
        Self {
            set: rules
                .set
                .iter()
                .filter_map(|(name, value)| {
                    Some((
                        HeaderName::from_bytes(name.as_bytes()).ok()?,
                        http::HeaderValue::from_str(value).ok()?,
                    ))
                })
                .collect(),
            remove: rules
                .remove
                .iter()
                .filter_map(|name| HeaderName::from_bytes(name.as_bytes()).ok())
                .collect(),
        }
    }

    /// Whether there is nothing to do.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.set.is_empty() && self.remove.is_empty()
    }

    /// Whether the message's own `name` fields go (removed, or replaced by a set).
    #[must_use]
    pub fn drops(&self, name: &str) -> bool {
        !self.is_empty()
            && (self
                .remove
                .iter()
                .any(|n| n.as_str().eq_ignore_ascii_case(name))
                || self
                    .set
                    .iter()
                    .any(|(n, _)| n.as_str().eq_ignore_ascii_case(name)))
    }
}

/// The forwarding settings of a generation, compiled.
#[derive(Clone, Debug)]
pub struct ForwardingPolicy {
    /// Peers whose forwarding headers are believed.
    pub trusted: Vec<IpNet>,
    /// Header carrying the request id.
    pub request_id: HeaderName,
}

impl ForwardingPolicy {
    /// Whether `ip` is a trusted proxy.
    #[must_use]
    pub fn is_trusted(&self, ip: IpAddr) -> bool {
        self.trusted.iter().any(|n| n.contains(&ip))
    }

    /// The client's address: the peer, or, when the peer is a trusted proxy, the
    /// right-most X-Forwarded-For entry that is not itself a trusted proxy.
    #[must_use]
    pub fn client_ip(&self, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
        if !self.is_trusted(peer) {
            return peer;
        }
        let chain: Vec<IpAddr> = headers
            .get_all("x-forwarded-for")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|s| s.trim().parse().ok())
            .collect();
        chain
            .into_iter()
            .rev()
            .find(|ip| !self.is_trusted(*ip))
            .unwrap_or(peer)
    }

    /// The X-Forwarded-For/-Proto/-Host and `Forwarded` values for an upstream
    /// request with these `headers`, as (name, value) pairs to set; and
    /// X-Forwarded-Prefix when the route strips `stripped` from the path (after the
    /// prefix a trusted proxy before us stripped).
    #[must_use]
    pub fn forwarded_headers(
        &self,
        peer: IpAddr,
        scheme: &str,
        host: &str,
        headers: &HeaderMap,
        stripped: Option<&str>,
    ) -> Vec<(HeaderName, String)> {
        let trusted = self.is_trusted(peer);
        let mut out = Vec::with_capacity(5);
        if let Some(prefix) = stripped {
            let value = match headers
                .get("x-forwarded-prefix")
                .and_then(|v| v.to_str().ok())
            {
                Some(prev) if trusted => format!("{}{prefix}", prev.trim_end_matches('/')),
                _ => prefix.to_string(),
            };
            out.push((HeaderName::from_static("x-forwarded-prefix"), value));
        }
        let xff = match headers.get("x-forwarded-for").and_then(|v| v.to_str().ok()) {
            Some(prev) if trusted => format!("{prev}, {peer}"),
            _ => peer.to_string(),
        };
        out.push((HeaderName::from_static("x-forwarded-for"), xff));
        if !(trusted && headers.contains_key("x-forwarded-proto")) {
            out.push((
                HeaderName::from_static("x-forwarded-proto"),
                scheme.to_string(),
            ));
        }
        if !(trusted && headers.contains_key("x-forwarded-host")) {
            out.push((
                HeaderName::from_static("x-forwarded-host"),
                host.to_string(),
            ));
        }
        let node = match peer {
            IpAddr::V4(v4) => v4.to_string(),
            IpAddr::V6(v6) => format!("\"[{v6}]\""),
        };
        let element = format!("for={node};proto={scheme};host=\"{host}\"");
        let forwarded = match headers.get("forwarded").and_then(|v| v.to_str().ok()) {
            Some(prev) if trusted => format!("{prev}, {element}"),
            _ => element,
        };
        out.push((http::header::FORWARDED, forwarded));
        out
    }
}

/// Whether a request asks for a protocol upgrade (e.g. WebSocket).
#[must_use]
pub fn is_upgrade(headers: &HeaderMap) -> bool {
    headers.contains_key(UPGRADE)
        && connection_tokens(headers).any(|t| t.eq_ignore_ascii_case("upgrade"))
}

fn connection_tokens(headers: &HeaderMap) -> impl Iterator<Item = &str> {
    headers
        .get_all(CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|t| !t.is_empty())
}

/// Whether the client sent `TE: trailers`: it takes trailers. The one hop-by-hop
/// field an HTTP/2 upstream request carries on (RFC 9113 §8.2.2; gRPC servers ask
/// for it), on every transport.
#[must_use]
pub fn te_trailers(headers: &HeaderMap) -> bool {
    headers
        .get(http::header::TE)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"trailers"))
}

/// Names of the hop-by-hop headers in `headers`: the fixed list plus every header
/// named in `Connection`. For an upgrade, `Connection: upgrade` and `Upgrade` stay.
#[must_use]
pub fn hop_by_hop(headers: &HeaderMap, keep_upgrade: bool) -> Vec<HeaderName> {
    let mut names: Vec<HeaderName> = connection_tokens(headers)
        .filter_map(|t| HeaderName::from_bytes(t.as_bytes()).ok())
        .chain(HOP_BY_HOP.iter().map(|h| HeaderName::from_static(h)))
        .filter(|n| headers.contains_key(n))
        .filter(|n| !(keep_upgrade && (n == CONNECTION || n == UPGRADE)))
        .filter(|n| !PROTECTED.contains(&n.as_str()))
        .collect();
    names.sort_by(|a, b| a.as_str().cmp(b.as_str()));
    names.dedup();
    names
}

/// The value of the request's cookie `name` as sent (the first one, in any `Cookie`
/// field).
#[must_use]
pub fn cookie<'h>(headers: &'h HeaderMap, name: &str) -> Option<&'h str> {
    headers
        .get_all(http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| c.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

/// The attributes after `name=value` of a cookie the proxy sets, for a response to an
/// HTTP request and to an HTTPS one: `Path=/`, `Max-Age` from `ttl` (absent: a
/// browser-session cookie), `Secure` as `secure` says (absent: over HTTPS only),
/// `HttpOnly` when `http_only`, and `SameSite`.
#[must_use]
pub fn cookie_attributes(
    ttl: Option<std::time::Duration>,
    secure: Option<bool>,
    http_only: bool,
    same_site: rampart_config::SameSite,
) -> [String; 2] {
    [false, true].map(|https| {
        let mut a = String::from("; Path=/");
        if let Some(ttl) = ttl {
            a.push_str(&format!("; Max-Age={}", ttl.as_secs()));
        }
        if secure.unwrap_or(https) {
            a.push_str("; Secure");
        }
        if http_only {
            a.push_str("; HttpOnly");
        }
        a.push_str("; SameSite=");
        a.push_str(same_site.as_str());
        a
    })
}

/// The request's `Cookie` fields as the one field an HTTP/1.1 upstream gets (RFC 9113
/// §8.2.3: HTTP/2 clients may split cookies into several); `None` without cookies.
#[must_use]
pub fn joined_cookies(headers: &HeaderMap) -> Option<Vec<u8>> {
    let cookies: Vec<&[u8]> = headers
        .get_all(http::header::COOKIE)
        .iter()
        .map(http::HeaderValue::as_bytes)
        .collect();
    (!cookies.is_empty()).then(|| cookies.join(&b"; "[..]))
}

/// A usable client-sent request id: 1–200 visible ASCII characters.
#[must_use]
pub fn valid_request_id(v: &[u8]) -> bool {
    (1..=200).contains(&v.len()) && v.iter().all(|b| b.is_ascii_graphic())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn printable_escapes_controls_percent_and_non_ascii_only() {
        assert_eq!(printable("CN=a b, O=x"), "CN=a b, O=x");
        assert_eq!(printable("a\r\nb%\u{e9}\u{7f}"), "a%0D%0Ab%25%C3%A9%7F");
    }

    #[test]
    fn uri_escaped_keeps_existing_escapes_and_reserved_characters() {
        assert_eq!(uri_escaped("/a%20b/c;d?e=f&g#h"), "/a%20b/c;d?e=f&g#h");
        assert_eq!(uri_escaped("/a b\"{}\u{e9}\r"), "/a%20b%22%7B%7D%C3%A9%0D");
    }

    fn policy(trusted: &[&str]) -> ForwardingPolicy {
        ForwardingPolicy {
            trusted: trusted.iter().map(|s| s.parse().unwrap()).collect(),
            request_id: HeaderName::from_static("x-request-id"),
        }
    }

    /// Sets the forwarded headers on a plain header map, as the proxy does upstream.
    fn apply(
        p: &ForwardingPolicy,
        peer: IpAddr,
        scheme: &str,
        host: &str,
        headers: &mut HeaderMap,
    ) {
        for (name, value) in p.forwarded_headers(peer, scheme, host, headers, None) {
            headers.insert(name, value.parse().unwrap());
        }
    }

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, v.parse().unwrap());
        }
        h
    }

    #[test]
    fn untrusted_peer_cannot_spoof_forwarding_headers() {
        let p = policy(&["10.0.0.0/8"]);
        let peer: IpAddr = "203.0.113.9".parse().unwrap();
        let mut h = headers(&[
            ("x-forwarded-for", "1.2.3.4"),
            ("x-forwarded-proto", "https"),
            ("forwarded", "for=1.2.3.4"),
        ]);
        assert_eq!(p.client_ip(peer, &h), peer);
        apply(&p, peer, "http", "example.com", &mut h);
        assert_eq!(h["x-forwarded-for"], "203.0.113.9");
        assert_eq!(h["x-forwarded-proto"], "http");
        assert_eq!(h["x-forwarded-host"], "example.com");
        assert_eq!(
            h["forwarded"],
            "for=203.0.113.9;proto=http;host=\"example.com\""
        );
    }

    #[test]
    fn trusted_peer_extends_the_chain() {
        let p = policy(&["10.0.0.0/8"]);
        let peer: IpAddr = "10.1.1.1".parse().unwrap();
        let mut h = headers(&[
            ("x-forwarded-for", "198.51.100.7, 10.2.2.2"),
            ("x-forwarded-proto", "https"),
        ]);
        assert_eq!(
            p.client_ip(peer, &h),
            "198.51.100.7".parse::<IpAddr>().unwrap()
        );
        apply(&p, peer, "http", "example.com", &mut h);
        assert_eq!(h["x-forwarded-for"], "198.51.100.7, 10.2.2.2, 10.1.1.1");
        assert_eq!(h["x-forwarded-proto"], "https");
    }

    #[test]
    fn hop_by_hop_includes_connection_listed_headers() {
        let h = headers(&[
            ("connection", "keep-alive, X-Secret"),
            ("x-secret", "1"),
            ("keep-alive", "timeout=5"),
            ("te", "trailers"),
            ("accept", "*/*"),
        ]);
        let names: Vec<_> = hop_by_hop(&h, false)
            .iter()
            .map(|n| n.as_str().to_string())
            .collect();
        assert_eq!(names, vec!["connection", "keep-alive", "te", "x-secret"]);
    }

    #[test]
    fn upgrade_keeps_its_headers() {
        let h = headers(&[("connection", "Upgrade"), ("upgrade", "websocket")]);
        assert!(is_upgrade(&h));
        assert!(hop_by_hop(&h, true).is_empty());
        assert_eq!(hop_by_hop(&h, false).len(), 2);
    }

    #[test]
    fn request_ids_are_checked() {
        assert!(valid_request_id(b"abc-123"));
        assert!(!valid_request_id(b""));
        assert!(!valid_request_id(b"a b"));
        assert!(!valid_request_id(&[b'a'; 201]));
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        fn ip() -> impl Strategy<Value = IpAddr> {
            prop_oneof![
                any::<[u8; 4]>().prop_map(IpAddr::from),
                any::<[u16; 8]>().prop_map(IpAddr::from),
            ]
        }

        /// Header values a client might send: addresses, junk, separators.
        fn value() -> impl Strategy<Value = String> {
            prop_oneof![
                proptest::collection::vec(ip(), 0..4).prop_map(|ips| ips
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")),
                "[ -~]{0,40}",
            ]
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(256))]

            /// An untrusted peer cannot choose the client address, whatever it sends.
            #[test]
            fn untrusted_peers_cannot_spoof_their_address(
                peer in ip(), xff in value(), fwd in value(), proto in value(),
            ) {
                let p = policy(&["10.0.0.0/8"]);
                prop_assume!(!p.is_trusted(peer));
                let mut h = HeaderMap::new();
                for (name, v) in [("x-forwarded-for", &xff), ("forwarded", &fwd), ("x-forwarded-proto", &proto)] {
                    if let Ok(v) = http::HeaderValue::from_str(v) {
                        h.insert(name, v);
                    }
                }
                prop_assert_eq!(p.client_ip(peer, &h), peer);
                let out = p.forwarded_headers(peer, "https", "a.test", &h, None);
                let get = |n: &str| out.iter().find(|(k, _)| *k == n).map(|(_, v)| v.clone());
                prop_assert_eq!(get("x-forwarded-for"), Some(peer.to_string()));
                prop_assert_eq!(get("x-forwarded-proto"), Some("https".to_string()));
                let forwarded = get("forwarded").unwrap();
                prop_assert!(!forwarded.contains(','), "client's Forwarded kept: {}", forwarded);
            }

            /// Behind a trusted proxy, the client is an address from the chain that is
            /// not itself trusted, or the peer.
            #[test]
            fn trusted_chains_yield_an_untrusted_hop(peer_octet in 0u8..=255, chain in proptest::collection::vec(ip(), 0..6)) {
                let p = policy(&["10.0.0.0/8"]);
                let peer = IpAddr::from([10, 0, 0, peer_octet]);
                let mut h = HeaderMap::new();
                let joined = chain.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ");
                h.insert("x-forwarded-for", http::HeaderValue::from_str(&joined).unwrap());
                let client = p.client_ip(peer, &h);
                prop_assert!(client == peer || (chain.contains(&client) && !p.is_trusted(client)));
                // It is the right-most untrusted one.
                if let Some(last) = chain.iter().rev().find(|ip| !p.is_trusted(**ip)) {
                    prop_assert_eq!(client, *last);
                }
            }

            /// Everything named in Connection is dropped (framing headers excepted), and
            /// only headers that are present are named.
            #[test]
            fn connection_named_headers_are_hop_by_hop(names in proptest::collection::vec("[a-z][a-z0-9-]{0,12}", 0..6)) {
                let mut h = HeaderMap::new();
                h.insert(CONNECTION, http::HeaderValue::from_str(&names.join(", ")).unwrap());
                for n in &names {
                    h.insert(HeaderName::from_bytes(n.as_bytes()).unwrap(), http::HeaderValue::from_static("1"));
                }
                h.insert("content-length", http::HeaderValue::from_static("0"));
                let dropped = hop_by_hop(&h, false);
                for n in &names {
                    let keep = n == "content-length" || n == "transfer-encoding";
                    prop_assert_eq!(dropped.iter().any(|d| d == n.as_str()), !keep, "{}", n);
                }
                prop_assert!(dropped.iter().all(|d| h.contains_key(d)));
                prop_assert!(!dropped.iter().any(|d| d == "content-length"));
            }
        }
    }
}
