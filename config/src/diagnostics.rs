//! Configuration errors with a field path, a position in the file and a fix hint,
//! printed as `FILE:LINE:COL: path: message (hint: ...)`.
//!
//! Positions come from `toml_edit`'s spans: validation works on plain types and
//! reports a [`FieldPath`]; [`locate`] maps the path back to the source text.

use std::fmt;

/// One step of a path into the configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Seg {
    /// A table key.
    Key(String),
    /// An array index.
    Index(usize),
}

/// Path of a field, e.g. `pools.web.health_check.interval` or `routes[2].action`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FieldPath(Vec<Seg>);

impl FieldPath {
    /// The empty path (the whole document).
    #[must_use]
    pub fn root() -> Self {
        Self::default()
    }
    /// This path extended by a table key.
    #[must_use]
    pub fn key(&self, k: &str) -> Self {
        let mut v = self.0.clone();
        v.push(Seg::Key(k.to_string()));
        Self(v)
    }
    /// This path extended by an array index.
    #[must_use]
    pub fn index(&self, i: usize) -> Self {
        let mut v = self.0.clone();
        v.push(Seg::Index(i));
        Self(v)
    }
    /// The steps of the path.
    #[must_use]
    pub fn segments(&self) -> &[Seg] {
        &self.0
    }
}

impl fmt::Display for FieldPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (n, seg) in self.0.iter().enumerate() {
            match seg {
                Seg::Key(k) if n == 0 => write!(f, "{k}")?,
                Seg::Key(k)
                    if k.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-') =>
                {
                    write!(f, ".{k}")?;
                }
                Seg::Key(k) => write!(f, ".{k:?}")?,
                Seg::Index(i) => write!(f, "[{i}]")?,
            }
        }
        Ok(())
    }
}

/// A line and column in the configuration file, both starting at 1.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Position {
    /// Line, from 1.
    pub line: usize,
    /// Column in characters, from 1.
    pub col: usize,
}

impl Position {
    /// The position of byte `offset` in `src`.
    #[must_use]
    pub fn of_offset(src: &str, offset: usize) -> Self {
        let offset = offset.min(src.len());
        let before = &src[..src.floor_char_boundary(offset)];
        let line = before.matches('\n').count() + 1;
        let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
        Position { line, col }
    }
}

/// A problem with the configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Issue {
    /// The offending field.
    pub path: FieldPath,
    /// What is wrong.
    pub message: String,
    /// How to fix it.
    pub hint: String,
    /// Where in the file, when known.
    pub position: Option<Position>,
}

impl Issue {
    /// An issue without a position yet (see [`locate`]).
    pub fn new(path: FieldPath, message: impl Into<String>, hint: impl Into<String>) -> Self {
        Self {
            path,
            message: message.into(),
            hint: hint.into(),
            position: None,
        }
    }

    /// Formats the issue as `ORIGIN:LINE:COL: path: message (hint: ...)`.
    #[must_use]
    pub fn render(&self, origin: &str) -> String {
        let pos = self
            .position
            .map_or_else(|| "1:1".to_string(), |p| format!("{}:{}", p.line, p.col));
        let path = if self.path.segments().is_empty() {
            String::new()
        } else {
            format!("{}: ", self.path)
        };
        if self.hint.is_empty() {
            format!("{origin}:{pos}: {path}{}", self.message)
        } else {
            format!(
                "{origin}:{pos}: {path}{} (hint: {})",
                self.message, self.hint
            )
        }
    }
}

impl fmt::Display for Issue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.render("config"))
    }
}

/// Finds where `path` is written in `src`: the deepest existing part of the path (the
/// key itself when present; otherwise its table, for a missing field).
#[must_use]
pub fn locate(src: &str, path: &FieldPath) -> Option<Position> {
    let doc = toml_edit::Document::parse(src).ok()?;
    let mut item = doc.as_item();
    let mut span = None;
    for seg in path.segments() {
        let (next, key_span) = match seg {
            Seg::Key(k) => {
                let next = item.get(k.as_str());
                let key_span = item
                    .as_table_like()
                    .and_then(|t| t.get_key_value(k))
                    .and_then(|(key, _)| key.span());
                (next, key_span)
            }
            Seg::Index(i) => (index(item, *i), None),
        };
        let Some(next) = next else { break };
        span = key_span.or_else(|| next.span()).or(span);
        item = next;
    }
    span.map(|s| Position::of_offset(src, s.start))
}

fn index(item: &toml_edit::Item, i: usize) -> Option<&toml_edit::Item> {
    match item {
        toml_edit::Item::ArrayOfTables(a) => a.get(i).map(|_| &item[i]),
        toml_edit::Item::Value(toml_edit::Value::Array(a)) => a.get(i).map(|_| &item[i]),
        _ => None,
    }
}
