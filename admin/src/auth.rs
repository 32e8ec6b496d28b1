//! The admin listeners' optional token (proxy and controller dashboards and JSON APIs):
//! read from a file at each request, so replacing the file rotates it; presented as
//! `Authorization: Bearer <token>` or as the password of Basic auth (what a browser
//! prompts for); compared in constant time.

use std::path::Path;

/// What to do with an admin request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AdminAuth {
    /// No token is configured.
    Open,
    /// The request carries the token.
    Allowed,
    /// It does not: answer 401 with a Basic challenge.
    Refused,
    /// The token file cannot be read or is empty: refuse everything (503), say why.
    Unreadable(String),
}

/// Checks the `Authorization` header value `given` against the token in `token_file`.
#[must_use]
pub fn check(token_file: Option<&Path>, given: Option<&str>) -> AdminAuth {
    let Some(file) = token_file else {
        return AdminAuth::Open;
    };
    let token = match std::fs::read_to_string(file) {
        Ok(t) if !t.trim().is_empty() => t.trim().to_string(),
        Ok(_) => return AdminAuth::Unreadable(format!("{} is empty", file.display())),
        Err(e) => return AdminAuth::Unreadable(format!("{}: {e}", file.display())),
    };
    if given
        .and_then(presented)
        .is_some_and(|p| constant_time_eq(p.as_bytes(), token.as_bytes()))
    {
        AdminAuth::Allowed
    } else {
        AdminAuth::Refused
    }
}

/// The `WWW-Authenticate` value of a refusal.
pub const CHALLENGE: &str = "Basic realm=\"rampart\", charset=\"UTF-8\"";

/// The token in an Authorization value: Bearer, or the password of Basic.
fn presented(value: &str) -> Option<String> {
    let (scheme, rest) = value.trim().split_once(' ')?;
    if scheme.eq_ignore_ascii_case("bearer") {
        return Some(rest.trim().to_string());
    }
    basic_credentials(value).map(|(_, password)| password)
}

/// The user and password of a Basic `Authorization` value (RFC 7617), if it is one.
#[must_use]
pub fn basic_credentials(value: &str) -> Option<(String, String)> {
    use base64::Engine as _;
    let (scheme, rest) = value.trim().split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(rest.trim())
        .ok()?;
    let text = String::from_utf8(decoded).ok()?;
    let (user, password) = text.split_once(':')?;
    Some((user.to_string(), password.to_string()))
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_are_bearer_or_basic_passwords() {
        assert_eq!(presented("Bearer s3cret").as_deref(), Some("s3cret"));
        // "admin:s3cret"
        assert_eq!(
            presented("Basic YWRtaW46czNjcmV0").as_deref(),
            Some("s3cret")
        );
        assert_eq!(presented("Basic !!!"), None);
        assert_eq!(presented("Digest x"), None);
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
    }

    #[test]
    fn a_token_file_makes_the_token_required() {
        assert_eq!(check(None, None), AdminAuth::Open);
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("token");
        std::fs::write(&file, "s3cret\n").unwrap();
        assert_eq!(check(Some(&file), None), AdminAuth::Refused);
        assert_eq!(check(Some(&file), Some("Bearer nope")), AdminAuth::Refused);
        assert_eq!(
            check(Some(&file), Some("Bearer s3cret")),
            AdminAuth::Allowed
        );
        std::fs::write(&file, "").unwrap();
        assert!(matches!(
            check(Some(&file), Some("Bearer s3cret")),
            AdminAuth::Unreadable(_)
        ));
    }
}
