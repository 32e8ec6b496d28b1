//! HTTP Basic authentication of routes (`basic_auth`): bcrypt hashes verified off the
//! event loop, with credentials that passed remembered so that a signed-in browser
//! does not cost a bcrypt per request.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use sha2::{Digest, Sha256};

/// Most remembered credentials per route; the memory is emptied when it is full.
const REMEMBERED: usize = 1024;

/// A route's `basic_auth`, ready for requests.
#[derive(Debug)]
pub struct BasicAuthRt {
    /// The `WWW-Authenticate` value of a refusal.
    pub challenge: String,
    /// User name → bcrypt hash.
    users: HashMap<String, Arc<str>>,
    /// Digests of (user, password, hash) that verified.
    passed: Mutex<HashSet<[u8; 32]>>,
    /// The users' bcrypt cost: an unknown user's password is hashed at it, so that a
    /// refusal takes as long whether or not the user exists.
    cost: u32,
}

impl BasicAuthRt {
    /// The runtime form of `auth` (validated: every hash is a bcrypt hash).
    #[must_use]
    pub fn new(auth: &rampart_config::BasicAuth) -> Self {
        Self {
            challenge: format!("Basic realm=\"{}\", charset=\"UTF-8\"", auth.realm),
            users: auth
                .users
                .iter()
                .map(|(u, h)| (u.clone(), Arc::from(h.as_str())))
                .collect(),
            passed: Mutex::new(HashSet::new()),
            cost: auth
                .users
                .values()
                .next()
                .and_then(|h| h.get(4..6)?.parse().ok())
                .unwrap_or(bcrypt::DEFAULT_COST),
        }
    }

    /// Whether the request's `Authorization` value names a user and the right
    /// password. A bcrypt check runs on the blocking pool, never on the worker.
    pub async fn admits(&self, authorization: Option<&[u8]>) -> bool {
        let Some((user, password)) = authorization
            .and_then(|v| std::str::from_utf8(v).ok())
            .and_then(rampart_admin::auth::basic_credentials)
        else {
            return false;
        };
        let Some(hash) = self.users.get(&user).cloned() else {
            // As much bcrypt work as a wrong password, on the blocking pool too.
            let cost = self.cost;
            let _ = tokio::task::spawn_blocking(move || bcrypt::hash(password, cost)).await;
            return false;
        };
        let key: [u8; 32] = Sha256::new()
            .chain_update(user.as_bytes())
            .chain_update([0])
            .chain_update(password.as_bytes())
            .chain_update([0])
            .chain_update(hash.as_bytes())
            .finalize()
            .into();
        let remembered = self
            .passed
            .lock()
            .expect("never poisoned: no panics while held")
            .contains(&key);
        if remembered {
            return true;
        }
        let ok =
            tokio::task::spawn_blocking(move || bcrypt::verify(password, &hash).unwrap_or(false))
                .await
                .unwrap_or(false);
        if !ok {
            return false;
        }
        let mut passed = self
            .passed
            .lock()
            .expect("never poisoned: no panics while held");
        if passed.len() >= REMEMBERED {
            passed.clear();
        }
        passed.insert(key);
        true
    }
}

/// A bcrypt hash of `password` at `cost` (4–31), for `basic_auth` users.
///
/// # Errors
/// When the cost is out of range.
pub fn hash_password(password: &str, cost: u32) -> anyhow::Result<String> {
    Ok(bcrypt::hash(password, cost)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(user: &str, password: &str) -> Vec<u8> {
        use base64::Engine as _;
        let text = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
        format!("Basic {text}").into_bytes()
    }

    #[tokio::test]
    async fn only_a_known_user_with_the_right_password_is_admitted() {
        let mut users = std::collections::BTreeMap::new();
        users.insert("alice".to_string(), hash_password("s3cret", 4).unwrap());
        let auth = BasicAuthRt::new(&rampart_config::BasicAuth {
            realm: "ops".into(),
            users,
        });
        assert_eq!(auth.challenge, "Basic realm=\"ops\", charset=\"UTF-8\"");
        assert!(auth.admits(Some(&header("alice", "s3cret"))).await);
        // Remembered: the second time needs no bcrypt (and gives the same answer).
        assert!(auth.admits(Some(&header("alice", "s3cret"))).await);
        assert!(!auth.admits(Some(&header("alice", "wrong"))).await);
        assert!(!auth.admits(Some(&header("bob", "s3cret"))).await);
        assert!(!auth.admits(Some(b"Bearer s3cret")).await);
        assert!(!auth.admits(Some(b"Basic !!!")).await);
        assert!(!auth.admits(None).await);
    }
}
