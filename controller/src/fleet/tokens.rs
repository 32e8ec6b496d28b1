//! One-time join tokens. A token is `rmp1.<id>.<secret>.<ca>`: the id names the stored
//! record, the secret is checked against its SHA-256 (the store never holds it), and
//! `<ca>` is the SHA-256 of the fleet CA certificate, which the joining proxy pins to
//! trust the controller before it has any certificate of its own (as kubeadm's
//! discovery hash does).

use std::time::Duration;

use rand::RngCore;
use serde::{Deserialize, Serialize};

use rampart_config::snapshot::JoinToken;

use crate::store::{get_json, put_json, Store};

/// A stored token record.
#[derive(Debug, Serialize, Deserialize)]
struct Record {
    secret_sha256: String,
    expires_at: u64,
    /// Usable until it expires rather than once.
    #[serde(default)]
    reusable: bool,
}

/// Why a token was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TokenError {
    /// Not of the form `rmp1.<id>.<secret>.<ca>`.
    #[error("the join token is malformed (expected rmp1.<id>.<secret>.<ca-hash> as printed by `rampart controller token create`)")]
    Malformed,
    /// No such token (never created, or deleted).
    #[error("the join token is unknown to this controller; create one with `rampart controller token create`")]
    Unknown,
    /// Already used by another enrolment.
    #[error("the join token was already used; tokens are single-use, create a new one with `rampart controller token create`")]
    Used,
    /// Past its expiry.
    #[error("the join token expired {0} s ago; create a new one with `rampart controller token create --ttl 1h`")]
    Expired(u64),
}

/// Splits a token into its parts.
///
/// # Errors
/// [`TokenError::Malformed`].
pub fn parse(token: &str) -> Result<JoinToken, TokenError> {
    JoinToken::parse(token).ok_or(TokenError::Malformed)
}

fn now() -> u64 {
    rampart_config::unix_now()
}

fn random_hex(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    rand::rng().fill_bytes(&mut buf);
    buf.iter().map(|b| format!("{b:02x}")).collect()
}

/// Creates a token valid for `ttl`, pinned to the fleet CA with fingerprint `ca_sha256`;
/// a `reusable` one enrols any number of proxies until it expires.
///
/// # Errors
/// When the store fails.
pub async fn create(
    store: &dyn Store,
    ttl: Duration,
    ca_sha256: &str,
    reusable: bool,
) -> anyhow::Result<String> {
    let id = random_hex(8);
    let secret = random_hex(16);
    let record = Record {
        secret_sha256: rampart_pki::sha256_hex(secret.as_bytes()),
        expires_at: now() + ttl.as_secs(),
        reusable,
    };
    put_json(store, &format!("tokens/{id}"), &record).await?;
    Ok(JoinToken {
        id,
        secret,
        ca_sha256: ca_sha256.to_string(),
    }
    .to_string())
}

/// Checks `token` and uses it up. Exactly one of several concurrent enrolments with the
/// same token succeeds.
///
/// # Errors
/// Why the token is refused; store failures as `Err(Err(..))`-free anyhow errors.
pub async fn consume(store: &dyn Store, token: &str) -> anyhow::Result<Result<(), TokenError>> {
    let parsed = match parse(token) {
        Ok(p) => p,
        Err(e) => return Ok(Err(e)),
    };
    let key = format!("tokens/{}", parsed.id);
    let used_key = format!("tokens-used/{}", parsed.id);
    let Some(record) = get_json::<Record>(store, &key).await? else {
        return Ok(Err(if store.get(&used_key).await?.is_some() {
            TokenError::Used
        } else {
            TokenError::Unknown
        }));
    };
    if rampart_pki::sha256_hex(parsed.secret.as_bytes()) != record.secret_sha256 {
        return Ok(Err(TokenError::Unknown));
    }
    let now = now();
    if now >= record.expires_at {
        return Ok(Err(TokenError::Expired(now - record.expires_at)));
    }
    if record.reusable {
        return Ok(Ok(()));
    }
    // Mark as used before deleting, so a concurrent loser reports "used", not "unknown".
    store.put(&used_key, b"").await?;
    if !store.delete(&key).await? {
        return Ok(Err(TokenError::Used));
    }
    Ok(Ok(()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::local::LocalStore;

    const CA: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    #[tokio::test]
    async fn a_token_works_once() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::open(dir.path()).unwrap();
        let token = create(&store, Duration::from_secs(60), CA, false)
            .await
            .unwrap();
        assert_eq!(parse(&token).unwrap().ca_sha256, CA);
        assert_eq!(consume(&store, &token).await.unwrap(), Ok(()));
        assert_eq!(
            consume(&store, &token).await.unwrap(),
            Err(TokenError::Used)
        );
    }

    #[tokio::test]
    async fn a_reusable_token_enrols_many_until_it_expires() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::open(dir.path()).unwrap();
        let token = create(&store, Duration::from_secs(60), CA, true)
            .await
            .unwrap();
        for _ in 0..5 {
            assert_eq!(consume(&store, &token).await.unwrap(), Ok(()));
        }
    }

    #[tokio::test]
    async fn expired_wrong_and_malformed_tokens_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::open(dir.path()).unwrap();
        let token = create(&store, Duration::ZERO, CA, true).await.unwrap();
        // Expiry has one-second resolution: back-date the record instead of waiting.
        let id = parse(&token).unwrap().id;
        put_json(
            &store,
            &format!("tokens/{id}"),
            &Record {
                secret_sha256: rampart_pki::sha256_hex(parse(&token).unwrap().secret.as_bytes()),
                expires_at: now() - 5,
                reusable: true,
            },
        )
        .await
        .unwrap();
        assert!(matches!(
            consume(&store, &token).await.unwrap(),
            Err(TokenError::Expired(_))
        ));
        let mut wrong = parse(&token).unwrap();
        wrong.secret = "0".repeat(32);
        let forged = format!("rmp1.{}.{}.{CA}", wrong.id, wrong.secret);
        assert_eq!(
            consume(&store, &forged).await.unwrap(),
            Err(TokenError::Unknown)
        );
        assert_eq!(
            consume(&store, "hello").await.unwrap(),
            Err(TokenError::Malformed)
        );
    }
}
