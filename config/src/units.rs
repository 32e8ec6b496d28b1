//! Value types a user writes as strings: durations (`"5s"`), byte sizes (`"32KiB"`),
//! host names and host patterns (`"*.example.com"`), socket addresses and hash keys.
//!
//! Each type parses once at deserialisation time, so the rest of Rampart never sees
//! an unvalidated string. Errors say what was expected, which serde reports with the
//! position in the file.

use std::borrow::Cow;
use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use schemars::{json_schema, JsonSchema, Schema, SchemaGenerator};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Implements `Deserialize` (from a string through `FromStr`), `Serialize` (through
/// `Display`) and a string JSON schema with a description for a value type.
macro_rules! string_value {
    ($ty:ty, $desc:expr) => {
        impl<'de> Deserialize<'de> for $ty {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                s.parse().map_err(serde::de::Error::custom)
            }
        }
        impl Serialize for $ty {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }
        impl JsonSchema for $ty {
            fn schema_name() -> Cow<'static, str> {
                stringify!($ty).into()
            }
            fn json_schema(_: &mut SchemaGenerator) -> Schema {
                json_schema!({ "type": "string", "description": $desc })
            }
        }
    };
}

/// Client addresses written as a CIDR (`"10.0.0.0/8"`, `"2001:db8::/32"`) or one
/// address (`"192.0.2.7"`, the same as `/32`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct IpRange(pub ipnet::IpNet);

impl IpRange {
    /// Whether `ip` is in the range.
    #[must_use]
    pub fn contains(&self, ip: &std::net::IpAddr) -> bool {
        self.0.contains(ip)
    }
}

impl FromStr for IpRange {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        if let Ok(net) = s.parse::<ipnet::IpNet>() {
            return Ok(Self(net.trunc()));
        }
        s.parse::<std::net::IpAddr>()
            .map(|ip| Self(ipnet::IpNet::from(ip)))
            .map_err(|_| {
                format!("{s:?} is not an IP address or CIDR; write it like \"10.0.0.0/8\", \"192.0.2.7\" or \"2001:db8::/32\"")
            })
    }
}

impl fmt::Display for IpRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.prefix_len() == self.0.max_prefix_len() {
            write!(f, "{}", self.0.addr())
        } else {
            write!(f, "{}", self.0)
        }
    }
}
string_value!(
    IpRange,
    "An IP address (\"192.0.2.7\") or CIDR (\"10.0.0.0/8\")"
);

/// A duration written as `"250ms"`, `"5s"`, `"1m 30s"`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Dur(pub Duration);

impl Dur {
    /// A duration of `n` seconds.
    #[must_use]
    pub const fn secs(n: u64) -> Self {
        Self(Duration::from_secs(n))
    }
    /// A duration of `n` milliseconds.
    #[must_use]
    pub const fn millis(n: u64) -> Self {
        Self(Duration::from_millis(n))
    }
}

impl FromStr for Dur {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        humantime::parse_duration(s.trim()).map(Dur).map_err(|e| {
            format!("invalid duration {s:?}: {e}; write it like \"500ms\", \"5s\" or \"1m 30s\"")
        })
    }
}

impl fmt::Display for Dur {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", humantime::format_duration(self.0))
    }
}
string_value!(Dur, "A duration such as \"500ms\", \"5s\" or \"1m 30s\"");

/// A size in bytes written as `"32KiB"`, `"10MiB"`, `"512"` or a plain integer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ByteSize(pub u64);

impl FromStr for ByteSize {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let t = s.trim();
        let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        let bad = || {
            format!("invalid size {s:?}; write it like \"512\", \"32KiB\", \"10MiB\" or \"1GiB\"")
        };
        let n: u64 = num.parse().map_err(|_| bad())?;
        let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
            "" | "b" => 1,
            "kb" => 1_000,
            "kib" | "k" => 1 << 10,
            "mb" => 1_000_000,
            "mib" | "m" => 1 << 20,
            "gb" => 1_000_000_000,
            "gib" | "g" => 1 << 30,
            _ => return Err(bad()),
        };
        n.checked_mul(mult).map(ByteSize).ok_or_else(bad)
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.0;
        for (unit, size) in [("GiB", 1u64 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)] {
            if n >= size && n.is_multiple_of(size) {
                return write!(f, "{}{unit}", n / size);
            }
        }
        write!(f, "{n}")
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = ByteSize;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a size such as 4096 or \"32KiB\"")
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<ByteSize, E> {
                u64::try_from(v)
                    .map(ByteSize)
                    .map_err(|_| E::custom("a size cannot be negative"))
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<ByteSize, E> {
                Ok(ByteSize(v))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<ByteSize, E> {
                v.parse().map_err(E::custom)
            }
        }
        d.deserialize_any(V)
    }
}
impl Serialize for ByteSize {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}
impl JsonSchema for ByteSize {
    fn schema_name() -> Cow<'static, str> {
        "ByteSize".into()
    }
    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "type": ["string", "integer"],
            "description": "A size in bytes: an integer or a string such as \"32KiB\" or \"10MiB\""
        })
    }
}

/// A validated DNS host name: lowercase ASCII (IDNA-encoded), labels of 1–63 letters,
/// digits or hyphens, at most 253 characters.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Hostname(String);

impl Hostname {
    /// The host name as a lowercase ASCII string.
    #[must_use]
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for Hostname {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let trimmed = s.trim_end_matches('.');
        let ascii = idna::domain_to_ascii(trimmed)
            .map_err(|_| format!("{s:?} is not a valid host name (IDNA conversion failed)"))?;
        if ascii.is_empty() || ascii.len() > 253 {
            return Err(format!(
                "{s:?} is not a valid host name: it must have 1 to 253 characters"
            ));
        }
        for label in ascii.split('.') {
            let ok_chars = label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-');
            if label.is_empty()
                || label.len() > 63
                || !ok_chars
                || label.starts_with('-')
                || label.ends_with('-')
            {
                return Err(format!(
                    "{s:?} is not a valid host name: label {label:?} must be 1-63 letters, digits or inner hyphens"
                ));
            }
        }
        Ok(Hostname(ascii))
    }
}

impl fmt::Display for Hostname {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}
string_value!(Hostname, "A DNS host name such as \"example.com\"");

/// A host a route or certificate answers for: an exact name or `*.suffix`, where `*`
/// stands for exactly one label (as in TLS certificates).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum HostPattern {
    /// Matches this host name only.
    Exact(Hostname),
    /// Matches any host with exactly one more label in front of this suffix.
    Wildcard(Hostname),
}

impl HostPattern {
    /// Whether `host` (lowercase, without port) matches this pattern.
    #[must_use]
    pub fn matches(&self, host: &str) -> bool {
        match self {
            HostPattern::Exact(h) => h.as_str() == host,
            HostPattern::Wildcard(suffix) => host
                .split_once('.')
                .is_some_and(|(first, rest)| !first.is_empty() && rest == suffix.as_str()),
        }
    }
}

impl FromStr for HostPattern {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let lower = s.trim().to_lowercase();
        if let Some(suffix) = lower.strip_prefix("*.") {
            let h: Hostname = suffix.parse()?;
            if !h.as_str().contains('.') && h.as_str() != "localhost" {
                return Err(format!("{s:?}: a wildcard needs at least two labels after \"*.\" (e.g. \"*.example.com\")"));
            }
            return Ok(HostPattern::Wildcard(h));
        }
        if lower.contains('*') {
            return Err(format!(
                "{s:?}: \"*\" is only allowed as the whole first label, as in \"*.example.com\""
            ));
        }
        Ok(HostPattern::Exact(lower.parse()?))
    }
}

impl fmt::Display for HostPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HostPattern::Exact(h) => write!(f, "{h}"),
            HostPattern::Wildcard(h) => write!(f, "*.{h}"),
        }
    }
}
string_value!(
    HostPattern,
    "A host name (\"example.com\") or a one-label wildcard (\"*.example.com\")"
);

/// An upstream address: `host:port` or `ip:port` (IPv6 in brackets).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Address {
    host: String,
    port: u16,
}

impl Address {
    /// The host part (an IP literal or a DNS name), without brackets.
    #[must_use]
    pub fn host(&self) -> &str {
        &self.host
    }
    /// The port.
    #[must_use]
    pub fn port(&self) -> u16 {
        self.port
    }
}

impl FromStr for Address {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Ok(sa) = s.parse::<std::net::SocketAddr>() {
            return Ok(Address {
                host: sa.ip().to_string(),
                port: sa.port(),
            });
        }
        let hint = "write it as \"host:port\", e.g. \"10.0.0.5:8080\" or \"app.internal:8080\"";
        let (host, port) = s
            .rsplit_once(':')
            .ok_or_else(|| format!("{s:?} has no port; {hint}"))?;
        let port: u16 = port
            .parse()
            .map_err(|_| format!("{s:?} has an invalid port; {hint}"))?;
        if port == 0 {
            return Err(format!("{s:?}: port 0 cannot be connected to; {hint}"));
        }
        let host: Hostname = host.parse().map_err(|e| format!("{e}; {hint}"))?;
        Ok(Address {
            host: host.to_string(),
            port,
        })
    }
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}
string_value!(Address, "An upstream address \"host:port\"");

/// What a consistent-hash pool hashes to pick an endpoint.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum HashKey {
    /// The client's IP address (after trusted-proxy resolution).
    ClientIp,
    /// The value of a request header (lowercase name).
    Header(String),
    /// The value of a cookie.
    Cookie(String),
}

impl FromStr for HashKey {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let hint = "use \"client_ip\", \"header:<name>\" or \"cookie:<name>\"";
        match s.split_once(':') {
            None if s == "client_ip" => Ok(HashKey::ClientIp),
            Some(("header", name)) if is_token(name) => {
                Ok(HashKey::Header(name.to_ascii_lowercase()))
            }
            Some(("cookie", name)) if is_token(name) => Ok(HashKey::Cookie(name.to_string())),
            _ => Err(format!("invalid hash key {s:?}: {hint}")),
        }
    }
}

impl fmt::Display for HashKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HashKey::ClientIp => f.write_str("client_ip"),
            HashKey::Header(h) => write!(f, "header:{h}"),
            HashKey::Cookie(c) => write!(f, "cookie:{c}"),
        }
    }
}
string_value!(
    HashKey,
    "\"client_ip\", \"header:<name>\" or \"cookie:<name>\""
);

/// Whether `s` is a non-empty HTTP token (RFC 9110 `tchar`s): valid as a header name.
#[must_use]
pub fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// Seconds since the Unix epoch (0 if the clock is set before it).
#[must_use]
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// [`unix_now`] as the signed seconds that certificate validity times use.
#[must_use]
pub fn unix_now_signed() -> i64 {
    i64::try_from(unix_now()).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ip_ranges_are_cidrs_or_single_addresses() {
        let r: IpRange = "10.1.2.3/8".parse().unwrap();
        assert_eq!(r.to_string(), "10.0.0.0/8", "host bits are dropped");
        assert!(r.contains(&"10.200.0.1".parse().unwrap()));
        assert!(!r.contains(&"11.0.0.1".parse().unwrap()));
        let one: IpRange = " 192.0.2.7 ".parse().unwrap();
        assert_eq!(one.to_string(), "192.0.2.7");
        assert!(one.contains(&"192.0.2.7".parse().unwrap()));
        assert!(!one.contains(&"192.0.2.8".parse().unwrap()));
        let v6: IpRange = "2001:db8::/32".parse().unwrap();
        assert!(v6.contains(&"2001:db8::1".parse().unwrap()));
        let e = "10.0.0/8".parse::<IpRange>().unwrap_err();
        assert!(e.contains("is not an IP address or CIDR"), "{e}");
    }
    use proptest::prelude::*;

    #[test]
    fn durations_parse_human_forms() {
        assert_eq!("5s".parse::<Dur>().unwrap(), Dur::secs(5));
        assert_eq!("250ms".parse::<Dur>().unwrap(), Dur::millis(250));
        assert_eq!("1m 30s".parse::<Dur>().unwrap(), Dur::secs(90));
        assert!("5".parse::<Dur>().unwrap_err().contains("\"5s\""));
    }

    #[test]
    fn sizes_parse_units() {
        assert_eq!("32KiB".parse::<ByteSize>().unwrap(), ByteSize(32 * 1024));
        assert_eq!("10MiB".parse::<ByteSize>().unwrap(), ByteSize(10 << 20));
        assert_eq!("512".parse::<ByteSize>().unwrap(), ByteSize(512));
        assert!("ten".parse::<ByteSize>().is_err());
        assert!("99999999999999GiB".parse::<ByteSize>().is_err());
    }

    #[test]
    fn hostnames_are_lowercased_and_idna_encoded() {
        assert_eq!(
            "Example.COM".parse::<Hostname>().unwrap().as_str(),
            "example.com"
        );
        assert_eq!(
            "bücher.example".parse::<Hostname>().unwrap().as_str(),
            "xn--bcher-kva.example"
        );
        assert!("-bad.example".parse::<Hostname>().is_err());
        assert!("a..b".parse::<Hostname>().is_err());
        assert!("under_score.example".parse::<Hostname>().is_err());
    }

    #[test]
    fn wildcard_matches_exactly_one_label() {
        let p: HostPattern = "*.example.com".parse().unwrap();
        assert!(p.matches("a.example.com"));
        assert!(!p.matches("example.com"));
        assert!(!p.matches("a.b.example.com"));
        assert!("a.*.com".parse::<HostPattern>().is_err());
        assert!("*.com".parse::<HostPattern>().is_err());
    }

    #[test]
    fn addresses_need_a_port() {
        assert_eq!(
            "127.0.0.1:80".parse::<Address>().unwrap().to_string(),
            "127.0.0.1:80"
        );
        assert_eq!(
            "[::1]:80".parse::<Address>().unwrap().to_string(),
            "[::1]:80"
        );
        assert_eq!(
            "App.internal:8080".parse::<Address>().unwrap().host(),
            "app.internal"
        );
        assert!("app.internal".parse::<Address>().is_err());
        assert!("app:0".parse::<Address>().is_err());
    }

    #[test]
    fn hash_keys_parse() {
        assert_eq!("client_ip".parse::<HashKey>().unwrap(), HashKey::ClientIp);
        assert_eq!(
            "header:X-User".parse::<HashKey>().unwrap(),
            HashKey::Header("x-user".into())
        );
        assert_eq!(
            "cookie:sid".parse::<HashKey>().unwrap(),
            HashKey::Cookie("sid".into())
        );
        assert!("cookie:".parse::<HashKey>().is_err());
        assert!("ip".parse::<HashKey>().is_err());
    }

    proptest! {
        #[test]
        fn byte_size_display_roundtrips(n in 0u64..(1 << 40)) {
            let s = ByteSize(n).to_string();
            prop_assert_eq!(s.parse::<ByteSize>().unwrap(), ByteSize(n));
        }

        #[test]
        fn hostname_parse_never_panics(s in "\\PC{0,80}") {
            let _ = s.parse::<Hostname>();
            let _ = s.parse::<HostPattern>();
            let _ = s.parse::<Address>();
        }
    }
}
