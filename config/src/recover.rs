//! Every problem of a file in one pass: deserialisation stops at the first error it
//! meets (an unknown field, a wrong type, an invalid host name), so this records that
//! error with its path, takes the offending item out of the document and tries again,
//! until the rest deserialises; the semantic checks then run on what is left. A
//! newcomer sees a typo, a bad value and an undefined pool together, each located.
//!
//! Taking items out shifts the indices of the arrays they were in; [`Removed`] maps the
//! paths of later errors back to the file as it was written.

use std::collections::BTreeMap;

use crate::diagnostics::{locate, FieldPath, Issue, Seg};
use crate::model::Config;

/// At most this many deserialisation errors are collected (each costs one parse).
const MAX_ERRORS: usize = 50;

/// The configuration that deserialised once every offending item was taken out (if
/// the rest could), and the issues met on the way, located in `src`.
pub(crate) fn deserialize_all(src: &str) -> (Option<Config>, Removed, Vec<Issue>) {
    let mut removed = Removed::default();
    let mut issues = Vec::new();
    let Ok(mut doc) = src.parse::<toml_edit::DocumentMut>() else {
        // Not TOML at all: the TOML parser's own error is the one to show.
        return (None, removed, issues);
    };
    for _ in 0..MAX_ERRORS {
        let text = doc.to_string();
        let error = match toml::from_str::<Config>(&text) {
            Ok(config) => return (Some(config), removed, issues),
            Err(e) => e,
        };
        let here = error
            .span()
            .and_then(|s| {
                toml_edit::Document::parse(text.as_str())
                    .ok()
                    .map(|d| (d, s))
            })
            .map(|(d, s)| path_at(d.as_item(), s.start, &FieldPath::root()))
            .unwrap_or_default();
        let original = removed.original(&here);
        issues.push(issue(src, &error, &original));
        if here.segments().is_empty() || !remove(doc.as_item_mut(), here.segments()) {
            return (None, removed, issues);
        }
        removed.record(&original);
    }
    (None, removed, issues)
}

/// The issue of one deserialisation error at `path` of the file.
fn issue(src: &str, error: &toml::de::Error, path: &FieldPath) -> Issue {
    let message = error.message().trim().to_string();
    let hint = if let Some(unknown) = backticked(&message).first() {
        match closest(unknown, &expected(&message)) {
            Some(known) => format!("did you mean `{known}`?"),
            None => {
                "check the spelling against `rampart schema` or the examples/ directory".to_string()
            }
        }
    } else if message.contains("missing field") {
        "add the field; see `rampart schema` for what it takes".to_string()
    } else {
        "fix the value; see `rampart schema` for what it takes".to_string()
    };
    let mut issue = Issue::new(path.clone(), message, hint);
    // A bad value is shown where the value is; an unknown or missing field at its key
    // or table.
    issue.position = if backticked(&issue.message).is_empty() || !issue.message.contains("field") {
        locate_value(src, path).or_else(|| locate(src, path))
    } else {
        locate(src, path)
    };
    issue
}

/// Where the value at `path` is written in `src`.
fn locate_value(src: &str, path: &FieldPath) -> Option<crate::diagnostics::Position> {
    let doc = toml_edit::Document::parse(src).ok()?;
    let mut item = doc.as_item();
    for seg in path.segments() {
        item = match seg {
            Seg::Key(k) => item.get(k.as_str())?,
            Seg::Index(i) => item.get(*i)?,
        };
    }
    item.span()
        .map(|s| crate::diagnostics::Position::of_offset(src, s.start))
}

/// The words in backticks of a message.
fn backticked(message: &str) -> Vec<&str> {
    message.split('`').skip(1).step_by(2).collect()
}

/// The names an "unknown field `x`, expected one of `a`, `b`" message lists.
fn expected(message: &str) -> Vec<&str> {
    if !message.starts_with("unknown") {
        return Vec::new();
    }
    message
        .split_once("expected")
        .map_or_else(Vec::new, |(_, rest)| backticked(rest))
}

/// The known name nearest to `unknown` by edit distance, when it is near enough to be
/// a typo (a third of its length, at least 1, at most 3).
pub(crate) fn closest<'a>(unknown: &str, known: &[&'a str]) -> Option<&'a str> {
    let limit = (unknown.len() / 3).clamp(1, 3);
    known
        .iter()
        .map(|k| (strsim::levenshtein(unknown, k), *k))
        .filter(|(d, _)| *d <= limit)
        .min_by_key(|(d, _)| *d)
        .map(|(_, k)| k)
}

/// The path of the deepest key or value of `item` whose text contains `offset` (a key
/// itself when the offset is on it: an unknown field).
fn path_at(item: &toml_edit::Item, offset: usize, path: &FieldPath) -> FieldPath {
    let within = |span: Option<std::ops::Range<usize>>| span.is_some_and(|s| s.contains(&offset));
    if let Some(table) = item.as_table_like() {
        for (key, value) in table.iter() {
            let key_span = table.get_key_value(key).and_then(|(k, _)| k.span());
            let here = path.key(key);
            if within(key_span) {
                return here;
            }
            if within(value.span()) || contains(value, offset) {
                return path_at(value, offset, &here);
            }
        }
    }
    match item {
        toml_edit::Item::ArrayOfTables(array) => {
            // A table of the array holds the offset when it lies between its header
            // and the next one's.
            let starts: Vec<usize> = array
                .iter()
                .filter_map(|t| t.span().map(|s| s.start))
                .collect();
            if let Some(i) = starts.iter().rposition(|&s| s <= offset) {
                if let Some(t) = array.get(i) {
                    let inner = toml_edit::Item::Table(t.clone());
                    return path_at(&inner, offset, &path.index(i));
                }
            }
        }
        toml_edit::Item::Value(toml_edit::Value::Array(array)) => {
            for (i, v) in array.iter().enumerate() {
                if within(v.span()) {
                    let inner = toml_edit::Item::Value(v.clone());
                    return path_at(&inner, offset, &path.index(i));
                }
            }
        }
        _ => {}
    }
    path.clone()
}

/// Whether a table (whose own span is only its header) has a key or value at `offset`.
fn contains(item: &toml_edit::Item, offset: usize) -> bool {
    match item {
        toml_edit::Item::Table(t) => t.iter().any(|(k, v)| {
            t.key(k)
                .and_then(toml_edit::Key::span)
                .is_some_and(|s| s.contains(&offset))
                || v.span().is_some_and(|s| s.contains(&offset))
                || contains(v, offset)
        }),
        toml_edit::Item::ArrayOfTables(a) => a
            .iter()
            .any(|t| contains(&toml_edit::Item::Table(t.clone()), offset)),
        _ => false,
    }
}

/// Takes the item at `path` out of `item`; false when there is none.
fn remove(item: &mut toml_edit::Item, path: &[Seg]) -> bool {
    match path {
        [] => false,
        [Seg::Key(k)] => item
            .as_table_like_mut()
            .is_some_and(|t| t.remove(k).is_some()),
        [Seg::Index(i)] => match item {
            toml_edit::Item::ArrayOfTables(a) if *i < a.len() => {
                a.remove(*i);
                true
            }
            toml_edit::Item::Value(toml_edit::Value::Array(a)) if *i < a.len() => {
                a.remove(*i);
                true
            }
            _ => false,
        },
        [Seg::Key(k), rest @ ..] => item
            .as_table_like_mut()
            .and_then(|t| t.get_mut(k))
            .is_some_and(|next| remove(next, rest)),
        [Seg::Index(i), rest @ ..] => match item {
            toml_edit::Item::ArrayOfTables(a) => {
                a.get_mut(*i).is_some_and(|t| remove_in_table(t, rest))
            }
            toml_edit::Item::Value(toml_edit::Value::Array(a)) => match a.get_mut(*i) {
                Some(toml_edit::Value::InlineTable(t)) => match rest {
                    [Seg::Key(k)] => t.remove(k).is_some(),
                    _ => false,
                },
                _ => false,
            },
            _ => false,
        },
    }
}

fn remove_in_table(table: &mut toml_edit::Table, path: &[Seg]) -> bool {
    match path {
        [Seg::Key(k)] => table.remove(k).is_some(),
        [Seg::Key(k), rest @ ..] => table.get_mut(k).is_some_and(|next| remove(next, rest)),
        _ => false,
    }
}

/// The array elements taken out so far, by the array's path as written in the file,
/// so that paths into the edited document map back to the file.
#[derive(Debug, Default)]
pub(crate) struct Removed {
    by_array: BTreeMap<String, Vec<usize>>,
}

impl Removed {
    /// `path` (into the edited document) as a path into the file.
    pub(crate) fn original(&self, path: &FieldPath) -> FieldPath {
        let mut out = FieldPath::root();
        for seg in path.segments() {
            out = match seg {
                Seg::Key(k) => out.key(k),
                Seg::Index(i) => {
                    let mut index = *i;
                    if let Some(gone) = self.by_array.get(&out.to_string()) {
                        // `gone` is sorted: each element taken out at or before the
                        // index shifted it down by one.
                        for &g in gone {
                            if g <= index {
                                index += 1;
                            }
                        }
                    }
                    out.index(index)
                }
            };
        }
        out
    }

    /// Records that the item written at `original` was taken out.
    fn record(&mut self, original: &FieldPath) {
        if let Some(Seg::Index(i)) = original.segments().last() {
            let parent = &original.segments()[..original.segments().len() - 1];
            let mut array = FieldPath::root();
            for seg in parent {
                array = match seg {
                    Seg::Key(k) => array.key(k),
                    Seg::Index(j) => array.index(*j),
                };
            }
            let gone = self.by_array.entry(array.to_string()).or_default();
            gone.push(*i);
            gone.sort_unstable();
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::LoadError;

    /// Parse-level problems (an unknown table, an invalid host name, a typo in a pool)
    /// and semantic ones (an undefined pool, a duplicate name, a status of 99) in one
    /// file are all reported at once, each where it is written.
    #[test]
    fn every_error_of_a_file_is_reported_in_one_pass() {
        let src = "[listeners]\nhttp = \"127.0.0.1:80\"\n\n\
                   [[route]]\nname = \"typo\"\n\n\
                   [[routes]]\nname = \"web\"\nhosts = [\"bad host!\"]\naction = { forward = \"nowhere\" }\n\n\
                   [[routes]]\nname = \"web\"\naction = { respond = { status = 99, body = \"x\" } }\n\n\
                   [[routes]]\nname = \"after\"\naction = { forward = \"nowhere-either\" }\n\n\
                   [pools.app]\nendpoints = [{ address = \"127.0.0.1:1\" }]\nbalanse = \"round_robin\"\n";
        let Err(LoadError::Invalid { issues, .. }) = crate::parse(src, "mixed.toml") else {
            panic!("the file is invalid");
        };
        let found: Vec<(String, usize, &str)> = issues
            .iter()
            .map(|i| {
                (
                    i.path.to_string(),
                    i.position.map_or(0, |p| p.line),
                    i.hint.as_str(),
                )
            })
            .collect();
        let has = |path: &str, line: usize| found.iter().any(|(p, l, _)| p == path && *l == line);
        assert!(has("route", 4), "{found:?}");
        assert!(found
            .iter()
            .any(|(p, _, h)| p == "route" && h.contains("did you mean `routes`")));
        assert!(has("routes[0].hosts", 9), "{found:?}");
        assert!(has("routes[0].action.forward", 10), "{found:?}");
        assert!(has("routes[1].name", 13), "{found:?}");
        assert!(has("routes[1].action.respond.status", 14), "{found:?}");
        assert!(has("routes[2].action.forward", 18), "{found:?}");
        assert!(has("pools.app.balanse", 22), "{found:?}");
        assert!(found
            .iter()
            .any(|(p, _, h)| p == "pools.app.balanse" && h.contains("`balance`")));
        assert_eq!(issues.len(), 7, "{found:?}");
    }

    /// A route taken out (it lacks a required field) does not shift the paths of the
    /// routes after it.
    #[test]
    fn paths_after_a_removed_array_element_point_at_the_file() {
        let src = "[listeners]\nhttp = \"127.0.0.1:80\"\n\n\
                   [[routes]]\nname = \"no action\"\n\n\
                   [[routes]]\nname = \"b\"\naction = { forward = \"missing\" }\n";
        let Err(LoadError::Invalid { issues, .. }) = crate::parse(src, "f.toml") else {
            panic!("invalid");
        };
        let paths: Vec<String> = issues.iter().map(|i| i.path.to_string()).collect();
        assert!(paths.contains(&"routes[0]".to_string()), "{paths:?}");
        assert!(
            paths.contains(&"routes[1].action.forward".to_string()),
            "{paths:?}"
        );
    }

    #[test]
    fn a_typo_is_matched_to_the_nearest_known_name_only_when_near() {
        assert_eq!(
            super::closest("balanse", &["balance", "endpoints"]),
            Some("balance")
        );
        assert_eq!(
            super::closest("route", &["routes", "pools"]),
            Some("routes")
        );
        assert_eq!(super::closest("xyz", &["routes", "pools"]), None);
    }
}
