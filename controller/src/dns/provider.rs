//! The one trait every DNS provider implements, and the errors they give.

use async_trait::async_trait;

use super::plan::{Change, Kind, RecordSet};

/// Where a zone's records live: Route53, an RFC 2136 server, the embedded server.
#[async_trait]
pub trait Provider: Send + Sync + std::fmt::Debug {
    /// Short name for logs and metrics ("route53", "rfc2136", "embedded").
    fn kind(&self) -> &'static str;

    /// Whether record sets carry set identifiers (Route53 multivalue and weighted).
    /// Without them, every value of a name and type is one record set.
    fn set_ids(&self) -> bool;

    /// The A, AAAA and TXT record sets of the zone.
    async fn records(&self) -> Result<Vec<RecordSet>, ProviderError>;

    /// Applies `changes` at once (one change batch, one UPDATE message): all or none.
    async fn apply(&self, changes: &[Change]) -> Result<(), ProviderError>;

    /// Where it answers queries itself (the embedded server).
    fn addr(&self) -> Option<std::net::SocketAddr> {
        None
    }
}

/// Why a provider call failed, which decides what the loop does next.
#[derive(Debug, thiserror::Error)]
pub enum ProviderError {
    /// The provider refused these changes (an invalid record, a conflict): split the
    /// batch to find the culprit; the rest can still be applied.
    #[error("rejected: {0}")]
    Rejected(String),
    /// Worth retrying later: the network, throttling that outlasted the back-off.
    #[error("{0}")]
    Transient(String),
    /// Retrying will not help until the operator acts: credentials, key, zone.
    #[error("{0}")]
    Fatal(String),
}

/// The character strings of a TXT value. TXT values are kept quoted in
/// [`RecordSet`]s, as Route53 presents them; plain DNS providers hold the strings.
pub fn unquote_txt(value: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut inside = false;
    let mut escaped = false;
    for c in value.chars() {
        match (inside, escaped, c) {
            (true, true, c) => {
                cur.push(c);
                escaped = false;
            }
            (true, false, '\\') => escaped = true,
            (true, false, '"') => {
                out.push(std::mem::take(&mut cur));
                inside = false;
            }
            (true, false, c) => cur.push(c),
            (false, _, '"') => inside = true,
            (false, _, _) => {}
        }
    }
    if out.is_empty() && !value.contains('"') {
        out.push(value.to_string());
    }
    out
}

/// The quoted presentation of TXT character strings.
#[must_use]
pub fn quote_txt<S: AsRef<str>>(strings: &[S]) -> String {
    strings
        .iter()
        .map(|s| {
            format!(
                "\"{}\"",
                s.as_ref().replace('\\', "\\\\").replace('"', "\\\"")
            )
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Whether `name` is `zone` or inside it.
pub(crate) fn in_zone(name: &str, zone: &str) -> bool {
    name == zone
        || name
            .strip_suffix(zone)
            .is_some_and(|rest| rest.ends_with('.'))
}

/// A record type's name as DNS writes it.
pub(crate) fn kind_str(kind: Kind) -> &'static str {
    match kind {
        Kind::A => "A",
        Kind::Aaaa => "AAAA",
        Kind::Txt => "TXT",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn txt_round_trip() {
        let v = quote_txt(&["heritage=rampart,owner=x", "a \"b\""]);
        assert_eq!(v, r#""heritage=rampart,owner=x" "a \"b\"""#);
        assert_eq!(
            unquote_txt(&v),
            vec![
                "heritage=rampart,owner=x".to_string(),
                "a \"b\"".to_string()
            ]
        );
        assert_eq!(unquote_txt("bare"), vec!["bare".to_string()]);
    }

    #[test]
    fn zones() {
        assert!(in_zone("www.example.com", "example.com"));
        assert!(in_zone("example.com", "example.com"));
        assert!(!in_zone("wwwexample.com", "example.com"));
        assert!(!in_zone("example.org", "example.com"));
    }
}
