//! Conversions between the planner's [`RecordSet`]s and DNS wire records (hickory), for
//! the providers that speak DNS itself: the embedded server and RFC 2136.

use std::collections::BTreeMap;
use std::net::IpAddr;

use hickory_proto::rr::rdata::{A, AAAA, TXT};
use hickory_proto::rr::{Name, RData, Record, RecordType};

use super::plan::{Kind, RecordSet};
use super::provider::{quote_txt, unquote_txt, ProviderError};

/// The fully qualified wire name of `name` (no trailing dot in the planner).
pub(crate) fn fqdn(name: &str) -> Result<Name, ProviderError> {
    Name::from_ascii(format!("{name}."))
        .map_err(|e| ProviderError::Rejected(format!("{name} is not a valid DNS name: {e}")))
}

/// The wire type of a planner kind.
pub(crate) fn record_type(kind: Kind) -> RecordType {
    match kind {
        Kind::A => RecordType::A,
        Kind::Aaaa => RecordType::AAAA,
        Kind::Txt => RecordType::TXT,
    }
}

/// The wire records of one record set.
pub(crate) fn to_records(set: &RecordSet) -> Result<Vec<Record>, ProviderError> {
    let name = fqdn(&set.name)?;
    set.values
        .iter()
        .map(|v| {
            let data = match set.kind {
                Kind::A | Kind::Aaaa => match v.parse::<IpAddr>() {
                    Ok(IpAddr::V4(ip)) if set.kind == Kind::A => RData::A(A(ip)),
                    Ok(IpAddr::V6(ip)) if set.kind == Kind::Aaaa => RData::AAAA(AAAA(ip)),
                    _ => {
                        return Err(ProviderError::Rejected(format!(
                            "{} {}: {v:?} is not an address of that type",
                            set.name,
                            super::provider::kind_str(set.kind)
                        )))
                    }
                },
                Kind::Txt => RData::TXT(TXT::new(unquote_txt(v))),
            };
            Ok(Record::from_rdata(name.clone(), set.ttl, data))
        })
        .collect()
}

/// Groups wire records into the planner's record sets (A, AAAA and TXT only; every
/// value of a name and type is one set, plain DNS has no set identifiers).
pub(crate) fn to_sets<'a>(records: impl IntoIterator<Item = &'a Record>) -> Vec<RecordSet> {
    let mut sets: BTreeMap<(String, Kind), RecordSet> = BTreeMap::new();
    for r in records {
        let (kind, value) = match &r.data {
            RData::A(a) => (Kind::A, a.0.to_string()),
            RData::AAAA(a) => (Kind::Aaaa, a.0.to_string()),
            RData::TXT(t) => {
                let strings: Vec<String> = t
                    .txt_data
                    .iter()
                    .map(|b| String::from_utf8_lossy(b).into_owned())
                    .collect();
                (Kind::Txt, quote_txt(&strings))
            }
            _ => continue,
        };
        let name = r.name.to_ascii().trim_end_matches('.').to_ascii_lowercase();
        let set = sets
            .entry((name.clone(), kind))
            .or_insert_with(|| RecordSet {
                name,
                kind,
                set_id: None,
                ttl: r.ttl,
                weight: None,
                values: std::collections::BTreeSet::new(),
            });
        set.ttl = set.ttl.min(r.ttl);
        set.values.insert(value);
    }
    sets.into_values().collect()
}
