//! The DNS planner: for each managed name, the record sets it should have (from the
//! ready proxy instances) against the record sets the provider holds → changes.
//!
//! Rules, as operators of external-dns will expect them, plus a floor:
//! - **Ownership**: a TXT record at the name with `heritage=rampart,owner=<id>` marks
//!   what this Rampart created. Address records at a name without it are never touched;
//!   the plan says so.
//! - **Floor**: a name never drops below `min_records` values because instances look
//!   dead (health flapping, a partition): it keeps the values it has and raises an alert.
//! - **Clean-up**: an owned name no longer configured loses its records and its TXT.
//! - Changes are upserts and deletes of whole record sets, so applying a plan twice is
//!   harmless; [`Plan::batches`] keeps a name's changes in one batch.

// Self-contained (std only): fuzz/fuzz_targets/dns_plan.rs compiles this file as is.
use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

/// How a name's values are published.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Policy {
    /// One record set per instance (Route53 multivalue answers).
    Multivalue,
    /// One weighted record set per instance; the set id is the instance id.
    Weighted,
    /// All values in one record set.
    Simple,
}

/// A name Rampart manages.
#[derive(Clone, Debug)]
pub struct NameSpec {
    /// Fully qualified name, lowercase, without the trailing dot.
    pub name: String,
    /// How values are published.
    pub policy: Policy,
    /// Time to live of the records.
    pub ttl: u32,
    /// Never fewer values than this because instances look dead.
    pub min_records: usize,
}

/// A proxy instance as the DNS loop sees it.
#[derive(Clone, Debug)]
pub struct Instance {
    /// Instance id (set identifier of its record sets).
    pub id: String,
    /// Its public addresses.
    pub addrs: Vec<IpAddr>,
    /// Alive and ready (heartbeat, discovery and probe agree).
    pub ready: bool,
}

/// Record type.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    /// IPv4 address.
    A,
    /// IPv6 address.
    Aaaa,
    /// Text (ownership marker).
    Txt,
}

/// One record set as a provider holds it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct RecordSet {
    /// Fully qualified name, lowercase, no trailing dot.
    pub name: String,
    /// Type.
    pub kind: Kind,
    /// Set identifier (multivalue and weighted sets), if any.
    pub set_id: Option<String>,
    /// Time to live.
    pub ttl: u32,
    /// Weight of a weighted set.
    pub weight: Option<u8>,
    /// Values (addresses as text, or TXT strings).
    pub values: BTreeSet<String>,
}

/// One change.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    /// Create or replace this record set.
    Upsert(RecordSet),
    /// Delete this record set.
    Delete(RecordSet),
}

impl Change {
    fn name(&self) -> &str {
        match self {
            Self::Upsert(r) | Self::Delete(r) => &r.name,
        }
    }
}

/// What the planner decided.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// Changes, grouped by name; ownership TXT first when a name is taken over, last
    /// when it is given up.
    pub changes: Vec<Change>,
    /// Names left alone, and why.
    pub skipped: Vec<(String, String)>,
    /// Names held at their floor (alert).
    pub floored: Vec<String>,
}

impl Plan {
    /// The plan without its removals: deletes dropped, and an upsert that would drop
    /// values from a set keeps them too. Used while the view is still warming up (a
    /// controller that just started or just became leader has not heard every proxy
    /// yet, and must not take the unheard ones out of DNS). Returns how many changes
    /// were held back.
    #[must_use]
    pub fn hold_removals(self, actual: &[RecordSet]) -> (Plan, usize) {
        let mut held = 0;
        let mut changes = Vec::with_capacity(self.changes.len());
        for change in self.changes {
            match change {
                Change::Delete(_) => held += 1,
                Change::Upsert(mut set) => {
                    let old = actual.iter().find(|a| {
                        a.name == set.name && a.kind == set.kind && a.set_id == set.set_id
                    });
                    if let Some(old) =
                        old.filter(|o| set.kind != Kind::Txt && !o.values.is_subset(&set.values))
                    {
                        held += 1;
                        set.values.extend(old.values.iter().cloned());
                        if &set == old {
                            continue;
                        }
                    }
                    changes.push(Change::Upsert(set));
                }
            }
        }
        (Plan { changes, ..self }, held)
    }

    /// The changes in batches of at most `max` (Route53 allows 1000), never splitting
    /// one name's changes unless that name alone exceeds `max`.
    #[must_use]
    pub fn batches(&self, max: usize) -> Vec<Vec<Change>> {
        let max = max.max(1);
        let mut out: Vec<Vec<Change>> = Vec::new();
        let mut start = 0;
        while start < self.changes.len() {
            let name = self.changes[start].name();
            let end = self.changes[start..]
                .iter()
                .position(|c| c.name() != name)
                .map_or(self.changes.len(), |n| start + n);
            let group = &self.changes[start..end];
            match out.last_mut() {
                Some(last) if last.len() + group.len() <= max => last.extend_from_slice(group),
                _ => {
                    for chunk in group.chunks(max) {
                        out.push(chunk.to_vec());
                    }
                }
            }
            start = end;
        }
        out
    }
}

/// The ownership TXT value of `owner`.
#[must_use]
pub fn owner_value(owner: &str) -> String {
    format!("\"heritage=rampart,owner={owner}\"")
}

/// Plans the changes that make `actual` match the specs for `owner`'s names.
#[must_use]
pub fn plan(owner: &str, specs: &[NameSpec], instances: &[Instance], actual: &[RecordSet]) -> Plan {
    let marker = owner_value(owner);
    let mut by_name: BTreeMap<&str, Vec<&RecordSet>> = BTreeMap::new();
    for r in actual {
        by_name.entry(r.name.as_str()).or_default().push(r);
    }
    let owned = |name: &str| {
        by_name.get(name).is_some_and(|sets| {
            sets.iter()
                .any(|r| r.kind == Kind::Txt && r.values.contains(&marker))
        })
    };
    let mut out = Plan::default();
    for spec in specs {
        let current: Vec<&RecordSet> = by_name
            .get(spec.name.as_str())
            .map(|v| v.iter().copied().filter(|r| r.kind != Kind::Txt).collect())
            .unwrap_or_default();
        if !current.is_empty() && !owned(&spec.name) {
            out.skipped.push((
                spec.name.clone(),
                format!(
                    "{} has address records Rampart did not create; delete them or add the TXT {marker} to hand the name over",
                    spec.name
                ),
            ));
            continue;
        }
        let mut desired = desired_sets(spec, instances);
        let desired_values: usize = desired.iter().map(|r| r.values.len()).sum();
        if desired_values < spec.min_records && !current.is_empty() {
            out.floored.push(spec.name.clone());
            continue;
        }
        if desired.is_empty() && current.is_empty() {
            // Nothing to publish and nothing there: nothing to do.
            continue;
        }
        let mut changes = Vec::new();
        if !owned(&spec.name) {
            changes.push(Change::Upsert(txt(&spec.name, spec.ttl, &marker)));
        }
        desired.sort();
        for set in &desired {
            if !current.contains(&set) {
                changes.push(Change::Upsert(set.clone()));
            }
        }
        for cur in &current {
            let kept = desired
                .iter()
                .any(|d| d.kind == cur.kind && d.set_id == cur.set_id);
            if !kept {
                changes.push(Change::Delete((*cur).clone()));
            }
        }
        out.changes.extend(changes);
    }
    // Owned names that are no longer configured: records first, the TXT last.
    let configured: BTreeSet<&str> = specs.iter().map(|s| s.name.as_str()).collect();
    for (name, sets) in &by_name {
        if configured.contains(name) || !owned(name) {
            continue;
        }
        let (txts, others): (Vec<&&RecordSet>, Vec<&&RecordSet>) =
            sets.iter().partition(|r| r.kind == Kind::Txt);
        out.changes
            .extend(others.into_iter().map(|r| Change::Delete((*r).clone())));
        out.changes.extend(
            txts.into_iter()
                .filter(|r| r.values.contains(&marker))
                .map(|r| Change::Delete((*r).clone())),
        );
    }
    out
}

fn txt(name: &str, ttl: u32, value: &str) -> RecordSet {
    RecordSet {
        name: name.to_string(),
        kind: Kind::Txt,
        set_id: None,
        ttl,
        weight: None,
        values: [value.to_string()].into(),
    }
}

/// The record sets `spec` should have for the ready `instances`.
fn desired_sets(spec: &NameSpec, instances: &[Instance]) -> Vec<RecordSet> {
    let kind_of = |ip: &IpAddr| if ip.is_ipv4() { Kind::A } else { Kind::Aaaa };
    let set = |kind, set_id: Option<String>, weight, values: BTreeSet<String>| RecordSet {
        name: spec.name.clone(),
        kind,
        set_id,
        ttl: spec.ttl,
        weight,
        values,
    };
    let ready = instances.iter().filter(|i| i.ready);
    match spec.policy {
        Policy::Simple => {
            let mut by_kind: BTreeMap<Kind, BTreeSet<String>> = BTreeMap::new();
            for i in ready {
                for ip in &i.addrs {
                    by_kind
                        .entry(kind_of(ip))
                        .or_default()
                        .insert(ip.to_string());
                }
            }
            by_kind
                .into_iter()
                .map(|(k, v)| set(k, None, None, v))
                .collect()
        }
        Policy::Multivalue | Policy::Weighted => {
            let weight = (spec.policy == Policy::Weighted).then_some(1);
            let mut out = Vec::new();
            for i in ready {
                let mut by_kind: BTreeMap<Kind, BTreeSet<String>> = BTreeMap::new();
                for ip in &i.addrs {
                    by_kind
                        .entry(kind_of(ip))
                        .or_default()
                        .insert(ip.to_string());
                }
                for (k, v) in by_kind {
                    out.push(set(k, Some(i.id.clone()), weight, v));
                }
            }
            out
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OWNER: &str = "rampart-test";

    fn spec(policy: Policy) -> NameSpec {
        NameSpec {
            name: "www.example.com".into(),
            policy,
            ttl: 60,
            min_records: 1,
        }
    }

    fn inst(id: &str, ip: &str, ready: bool) -> Instance {
        Instance {
            id: id.into(),
            addrs: vec![ip.parse().unwrap()],
            ready,
        }
    }

    /// Applies a plan to a record list, as a provider with upsert semantics would.
    fn apply(actual: &[RecordSet], plan: &Plan) -> Vec<RecordSet> {
        let mut out: Vec<RecordSet> = actual.to_vec();
        for c in &plan.changes {
            match c {
                Change::Upsert(r) => {
                    out.retain(|x| !(x.name == r.name && x.kind == r.kind && x.set_id == r.set_id));
                    out.push(r.clone());
                }
                Change::Delete(r) => out.retain(|x| x != r),
            }
        }
        out.sort();
        out
    }

    #[test]
    fn a_new_name_gets_its_owner_txt_and_one_set_per_instance_and_converges() {
        let instances = [
            inst("p-1", "192.0.2.1", true),
            inst("p-2", "192.0.2.2", true),
        ];
        let p = plan(OWNER, &[spec(Policy::Multivalue)], &instances, &[]);
        assert_eq!(p.changes.len(), 3, "{p:?}");
        assert!(matches!(&p.changes[0], Change::Upsert(r) if r.kind == Kind::Txt));
        let after = apply(&[], &p);
        // Applying again changes nothing.
        let again = plan(OWNER, &[spec(Policy::Multivalue)], &instances, &after);
        assert!(again.changes.is_empty(), "{again:?}");

        // One instance goes away: only its set is deleted.
        let fewer = plan(OWNER, &[spec(Policy::Multivalue)], &instances[..1], &after);
        assert_eq!(fewer.changes.len(), 1);
        assert!(
            matches!(&fewer.changes[0], Change::Delete(r) if r.set_id.as_deref() == Some("p-2"))
        );
    }

    #[test]
    fn records_of_others_are_never_touched() {
        let foreign = RecordSet {
            name: "www.example.com".into(),
            kind: Kind::A,
            set_id: None,
            ttl: 300,
            weight: None,
            values: ["198.51.100.7".to_string()].into(),
        };
        let p = plan(
            OWNER,
            &[spec(Policy::Simple)],
            &[inst("p-1", "192.0.2.1", true)],
            std::slice::from_ref(&foreign),
        );
        assert!(p.changes.is_empty());
        assert!(p.skipped[0].1.contains("did not create"), "{p:?}");
        // Nor are unconfigured names without our TXT.
        let p = plan(OWNER, &[], &[], &[foreign]);
        assert!(p.changes.is_empty());
    }

    #[test]
    fn every_instance_looking_dead_keeps_the_last_values_and_alerts() {
        let up = [inst("p-1", "192.0.2.1", true)];
        let after = apply(&[], &plan(OWNER, &[spec(Policy::Simple)], &up, &[]));
        let down = [inst("p-1", "192.0.2.1", false)];
        let p = plan(OWNER, &[spec(Policy::Simple)], &down, &after);
        assert!(p.changes.is_empty(), "{p:?}");
        assert_eq!(p.floored, vec!["www.example.com".to_string()]);
    }

    #[test]
    fn a_removed_name_is_cleaned_up_txt_last() {
        let up = [
            inst("p-1", "192.0.2.1", true),
            inst("p-2", "2001:db8::2", true),
        ];
        let after = apply(&[], &plan(OWNER, &[spec(Policy::Weighted)], &up, &[]));
        let p = plan(OWNER, &[], &up, &after);
        assert_eq!(p.changes.len(), 3);
        assert!(matches!(p.changes.last(), Some(Change::Delete(r)) if r.kind == Kind::Txt));
        assert!(apply(&after, &p).is_empty());
    }

    #[test]
    fn while_warming_up_values_are_added_but_never_removed() {
        for policy in [Policy::Multivalue, Policy::Simple] {
            let before = [
                inst("p-1", "192.0.2.1", true),
                inst("p-2", "192.0.2.2", true),
            ];
            let after = apply(&[], &plan(OWNER, &[spec(policy)], &before, &[]));
            // Just restarted: p-1 not heard yet, a new p-3 already.
            let heard = [
                inst("p-2", "192.0.2.2", true),
                inst("p-3", "192.0.2.3", true),
            ];
            let full = plan(OWNER, &[spec(policy)], &heard, &after);
            let (held, n) = full.hold_removals(&after);
            assert_eq!(n, 1, "{policy:?}: {held:?}");
            let values: BTreeSet<String> = apply(&after, &held)
                .into_iter()
                .filter(|r| r.kind == Kind::A)
                .flat_map(|r| r.values)
                .collect();
            assert_eq!(
                values.len(),
                3,
                "{policy:?}: p-1 kept, p-3 added: {values:?}"
            );
        }
    }

    #[test]
    fn batches_keep_a_name_together() {
        let names: Vec<NameSpec> = (0..5)
            .map(|i| NameSpec {
                name: format!("n{i}.example.com"),
                ..spec(Policy::Multivalue)
            })
            .collect();
        let instances = [
            inst("p-1", "192.0.2.1", true),
            inst("p-2", "192.0.2.2", true),
        ];
        let p = plan(OWNER, &names, &instances, &[]);
        assert_eq!(p.changes.len(), 15);
        let batches = p.batches(7);
        assert_eq!(
            batches.iter().map(Vec::len).collect::<Vec<_>>(),
            vec![6, 6, 3]
        );
        for b in &batches {
            for name in b.iter().map(Change::name) {
                assert_eq!(b.iter().filter(|c| c.name() == name).count(), 3);
            }
        }
    }

    proptest::proptest! {
        #[test]
        fn applying_a_plan_reaches_a_fixed_point(
            ready in proptest::collection::vec(proptest::bool::ANY, 0..6),
            policy in 0..3u8,
        ) {
            let policy = [Policy::Multivalue, Policy::Weighted, Policy::Simple][usize::from(policy)];
            let instances: Vec<Instance> = ready
                .iter()
                .enumerate()
                .map(|(i, r)| inst(&format!("p-{i}"), &format!("192.0.2.{}", i + 1), *r))
                .collect();
            let s = [spec(policy)];
            let first = apply(&[], &plan(OWNER, &s, &instances, &[]));
            let second = plan(OWNER, &s, &instances, &first);
            proptest::prop_assert!(second.changes.is_empty(), "{:?}", second);
            let values: usize = first.iter().filter(|r| r.kind != Kind::Txt).map(|r| r.values.len()).sum();
            proptest::prop_assert_eq!(values, ready.iter().filter(|r| **r).count());
        }

        /// Over a run of fleet changes, with foreign records in the zone: foreign
        /// records never change, owned names hold exactly the ready instances' values
        /// after each apply unless held at their floor, and a published name never
        /// drops below its floor.
        #[test]
        fn fleets_change_foreign_records_stay_and_the_floor_holds(
            steps in proptest::collection::vec(proptest::collection::vec(proptest::bool::ANY, 4), 1..8),
            policy in 0..3u8,
            min_records in 0..3usize,
        ) {
            let policy = [Policy::Multivalue, Policy::Weighted, Policy::Simple][usize::from(policy)];
            let specs = [
                NameSpec { min_records, ..spec(policy) },
                NameSpec { name: "theirs.example.com".into(), min_records, ..spec(policy) },
            ];
            let foreign = vec![
                RecordSet {
                    name: "theirs.example.com".into(),
                    kind: Kind::A,
                    set_id: None,
                    ttl: 300,
                    weight: None,
                    values: ["198.51.100.1".to_string()].into(),
                },
                RecordSet {
                    name: "other.example.com".into(),
                    kind: Kind::Txt,
                    set_id: None,
                    ttl: 300,
                    weight: None,
                    values: ["\"v=spf1 -all\"".to_string()].into(),
                },
            ];
            let mut actual = foreign.clone();
            for ready in steps {
                let instances: Vec<Instance> = ready
                    .iter()
                    .enumerate()
                    .map(|(i, r)| inst(&format!("p-{i}"), &format!("192.0.2.{}", i + 1), *r))
                    .collect();
                let before = values_of(&actual, "www.example.com");
                let p = plan(OWNER, &specs, &instances, &actual);
                actual = apply(&actual, &p);
                for f in &foreign {
                    proptest::prop_assert!(actual.contains(f), "foreign record changed: {:?}", f);
                }
                let after = values_of(&actual, "www.example.com");
                let want = ready.iter().filter(|r| **r).count();
                if p.floored.is_empty() {
                    proptest::prop_assert_eq!(after, want);
                } else {
                    proptest::prop_assert!(want < min_records);
                    proptest::prop_assert_eq!(after, before);
                }
                if before >= min_records && before > 0 {
                    proptest::prop_assert!(after >= min_records.min(before));
                }
            }
        }
    }

    fn values_of(sets: &[RecordSet], name: &str) -> usize {
        sets.iter()
            .filter(|r| r.name == name && r.kind != Kind::Txt)
            .map(|r| r.values.len())
            .sum()
    }
}
