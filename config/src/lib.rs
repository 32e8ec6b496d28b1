//! Rampart's declarative configuration: the one source of truth for every type a user
//! writes. Parse a TOML file, validate it (every error, with its path, position and a
//! fix hint), print the JSON schema.
//!
//! Pure: no I/O beyond reading the file, no async. The proxy and (later) the controller
//! build their run-time state from a validated [`Config`].
//!
//! - [`build`]: version and build facts of the running binary
//! - [`model`]: the types and their defaults
//! - [`units`]: durations, sizes, host names, addresses, hash keys
//! - [`validate`]: cross-field rules
//! - [`diagnostics`]: issues and their positions in the file
//! - [`snapshot`]: what the controller pushes to proxies, and the fleet protocol messages

pub mod build;
pub mod diagnostics;
pub mod model;
mod recover;
pub mod snapshot;
pub mod units;
pub mod validate;

use std::path::Path;

pub use diagnostics::{FieldPath, Issue, Position};
pub use model::*;
pub use units::{
    unix_now, unix_now_signed, Address, ByteSize, Dur, HashKey, HostPattern, Hostname, IpRange,
};

/// Why a configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The file could not be read.
    #[error("reading {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file was read but is not a valid configuration.
    #[error("{}", render(origin, issues))]
    Invalid {
        /// Name of the file (or "<embedded>") used in messages.
        origin: String,
        /// Every problem found, in file order.
        issues: Vec<Issue>,
    },
}

fn render(origin: &str, issues: &[Issue]) -> String {
    issues
        .iter()
        .map(|i| i.render(origin))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Reads, parses and validates the configuration file at `path`.
///
/// # Errors
/// [`LoadError::Read`] when the file cannot be read, [`LoadError::Invalid`] with every
/// issue when it is not a valid configuration.
pub fn load(path: &Path) -> Result<Config, LoadError> {
    let src = std::fs::read_to_string(path).map_err(|source| LoadError::Read {
        path: path.display().to_string(),
        source,
    })?;
    parse(&src, &path.display().to_string())
}

/// Parses and validates configuration text; `origin` names it in messages.
///
/// # Errors
/// [`LoadError::Invalid`] with every issue found.
pub fn parse(src: &str, origin: &str) -> Result<Config, LoadError> {
    let invalid = |issues| LoadError::Invalid {
        origin: origin.to_string(),
        issues,
    };
    // Every deserialisation error (unknown fields, wrong types, invalid values), then
    // the semantic checks on what deserialised, in one pass.
    let (config, removed, mut issues) = recover::deserialize_all(src);
    let Some(config) = config else {
        if issues.is_empty() {
            // Not TOML: the TOML parser's error, with its position.
            let error = toml::from_str::<Config>(src).err();
            issues.extend(error.map(|e| syntax_issue(src, &e)));
        }
        return Err(invalid(issues));
    };
    for mut issue in validate::validate(&config) {
        issue.path = removed.original(&issue.path);
        issue.position = diagnostics::locate(src, &issue.path);
        issues.push(issue);
    }
    if issues.is_empty() {
        return Ok(config);
    }
    issues.sort_by_key(|i| i.position.map(|p| (p.line, p.col)));
    Err(invalid(issues))
}

fn syntax_issue(src: &str, e: &toml::de::Error) -> Issue {
    let message = e.message().trim().to_string();
    let hint = if message.contains("unknown field") {
        "check the spelling against `rampart schema` or the examples/ directory"
    } else if message.contains("missing field") {
        "add the field; see `rampart schema` for what it takes"
    } else {
        "fix the TOML at this position"
    };
    Issue {
        path: FieldPath::root(),
        message,
        hint: hint.to_string(),
        position: e.span().map(|s| Position::of_offset(src, s.start)),
    }
}

/// The JSON schema of the configuration file, for editors and validation tools.
#[must_use]
pub fn json_schema() -> serde_json::Value {
    serde_json::to_value(schemars::schema_for!(Config)).expect("a schema always serialises to JSON")
}
