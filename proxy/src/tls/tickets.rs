//! TLS session tickets: the keys, shared by the fleet (from the controller's snapshot)
//! or made by this process, and the rustls ticketer that seals and opens tickets with
//! them.
//!
//! A ticket is `key id (4 bytes) ‖ nonce (12) ‖ AES-256-GCM(session state)`, the key
//! id (the first bytes of the key's SHA-256) as associated data. The first key of a
//! ring seals, every key opens: a controller sends the next key a rotation period
//! before it seals and keeps the previous one a period after, so a ticket from any
//! proxy opens on every other one whatever order they got the snapshot in.

use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use arc_swap::ArcSwap;
use aws_lc_rs::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use base64::Engine as _;
use rampart_config::snapshot::TicketKeys;
use rustls::server::ProducesTickets;

use crate::generation::Generation;

const ID_LEN: usize = 4;

/// Keys that seal (the first) and open (each) tickets.
pub struct TicketRing {
    lifetime: u32,
    keys: Vec<([u8; ID_LEN], LessSafeKey)>,
}

impl fmt::Debug for TicketRing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the keys.
        f.debug_struct("TicketRing")
            .field("lifetime", &self.lifetime)
            .field("keys", &self.keys.len())
            .finish()
    }
}

impl TicketRing {
    /// The ring of the fleet's keys in a snapshot.
    ///
    /// # Errors
    /// When there is no key or a key is not 32 bytes of base64url.
    pub fn from_snapshot(keys: &TicketKeys) -> anyhow::Result<Self> {
        let secrets = keys
            .keys
            .iter()
            .enumerate()
            .map(|(i, k)| {
                let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
                    .decode(k)
                    .with_context(|| format!("session ticket key {i} is not base64url"))?;
                <[u8; 32]>::try_from(bytes.as_slice())
                    .map_err(|_| anyhow::anyhow!("session ticket key {i} is not 32 bytes"))
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        anyhow::ensure!(!secrets.is_empty(), "session_tickets holds no key");
        Self::new(keys.lifetime, &secrets)
    }

    fn new(lifetime: u32, secrets: &[[u8; 32]]) -> anyhow::Result<Self> {
        let keys = secrets
            .iter()
            .map(|s| {
                let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, s);
                let mut id = [0u8; ID_LEN];
                id.copy_from_slice(&digest.as_ref()[..ID_LEN]);
                let key = UnboundKey::new(&AES_256_GCM, s)
                    .map_err(|_| anyhow::anyhow!("AES-256-GCM refused a session ticket key"))?;
                Ok((id, LessSafeKey::new(key)))
            })
            .collect::<anyhow::Result<_>>()?;
        Ok(Self { lifetime, keys })
    }

    fn seal(&self, plain: &[u8]) -> Option<Vec<u8>> {
        let (id, key) = self.keys.first()?;
        let mut nonce = [0u8; NONCE_LEN];
        aws_lc_rs::rand::fill(&mut nonce).ok()?;
        let mut out = Vec::with_capacity(ID_LEN + NONCE_LEN + plain.len() + 16);
        out.extend_from_slice(id);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(plain);
        let mut body = out.split_off(ID_LEN + NONCE_LEN);
        key.seal_in_place_append_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(id),
            &mut body,
        )
        .ok()?;
        out.extend_from_slice(&body);
        Some(out)
    }

    fn open(&self, ticket: &[u8]) -> Option<Vec<u8>> {
        let (id, rest) = ticket.split_first_chunk::<ID_LEN>()?;
        let (nonce, sealed) = rest.split_first_chunk::<NONCE_LEN>()?;
        let (_, key) = self.keys.iter().find(|(k, _)| k == id)?;
        let mut body = sealed.to_vec();
        let plain = key
            .open_in_place(
                Nonce::assume_unique_for_key(*nonce),
                Aad::from(id),
                &mut body,
            )
            .ok()?;
        let len = plain.len();
        body.truncate(len);
        Some(body)
    }
}

/// A random 32-byte key.
fn fresh_secret() -> Option<[u8; 32]> {
    let mut s = [0u8; 32];
    aws_lc_rs::rand::fill(&mut s).ok()?;
    Some(s)
}

/// The keys of a proxy without a controller's: a new one every rotation period, the
/// one before kept to open the tickets it sealed.
struct LocalKeys {
    made: Instant,
    secrets: Vec<[u8; 32]>,
    ring: Arc<TicketRing>,
}

/// The HTTPS listener's ticketer: the fleet's keys when the live generation has them,
/// else this process's own (when `session_tickets.enabled`).
pub struct Ticketer {
    current: Arc<ArcSwap<Generation>>,
    local: ArcSwap<Option<LocalKeys>>,
    rotating: Mutex<()>,
}

impl fmt::Debug for Ticketer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Ticketer")
    }
}

impl Ticketer {
    /// A ticketer over the live generation.
    #[must_use]
    pub fn new(current: Arc<ArcSwap<Generation>>) -> Self {
        Self {
            current,
            local: ArcSwap::from_pointee(None),
            rotating: Mutex::new(()),
        }
    }

    /// The ring in force, if tickets are on.
    fn ring(&self) -> Option<Arc<TicketRing>> {
        let generation = self.current.load();
        if let Some(ring) = &generation.fleet_tickets {
            return Some(ring.clone());
        }
        let settings = &generation.config.session_tickets;
        if !settings.enabled {
            return None;
        }
        let rotate = settings.rotate.0.max(Duration::from_secs(1));
        let local = self.local.load();
        if let Some(keys) = local.as_ref() {
            if keys.made.elapsed() < rotate {
                return Some(keys.ring.clone());
            }
        }
        self.rotate_local(rotate)
    }

    /// A new local key, sealing from now on; the one before still opens.
    fn rotate_local(&self, rotate: Duration) -> Option<Arc<TicketRing>> {
        let _one = self.rotating.lock().ok()?;
        let local = self.local.load();
        if let Some(keys) = local.as_ref() {
            if keys.made.elapsed() < rotate {
                return Some(keys.ring.clone());
            }
        }
        let mut secrets = vec![fresh_secret()?];
        if let Some(keys) = local.as_ref() {
            // The key before opens for one period more (unless it is older than that).
            if keys.made.elapsed() < 2 * rotate {
                secrets.push(keys.secrets[0]);
            }
        }
        let lifetime = u32::try_from(rotate.as_secs()).unwrap_or(u32::MAX);
        let ring = Arc::new(TicketRing::new(lifetime, &secrets).ok()?);
        self.local.store(Arc::new(Some(LocalKeys {
            made: Instant::now(),
            secrets,
            ring: ring.clone(),
        })));
        Some(ring)
    }
}

impl ProducesTickets for Ticketer {
    fn enabled(&self) -> bool {
        let generation = self.current.load();
        generation.fleet_tickets.is_some() || generation.config.session_tickets.enabled
    }

    fn lifetime(&self) -> u32 {
        self.ring().map_or(0, |r| r.lifetime)
    }

    fn encrypt(&self, plain: &[u8]) -> Option<Vec<u8>> {
        self.ring()?.seal(plain)
    }

    fn decrypt(&self, cipher: &[u8]) -> Option<Vec<u8>> {
        self.ring()?.open(cipher)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(b: u8) -> String {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode([b; 32])
    }

    #[test]
    fn a_ticket_opens_with_every_ring_that_holds_its_key() {
        let a = TicketRing::from_snapshot(&TicketKeys {
            lifetime: 3600,
            keys: vec![key(1), key(2)],
        })
        .unwrap();
        // Another proxy that got the next snapshot: key 2 seals, key 1 still opens.
        let b = TicketRing::from_snapshot(&TicketKeys {
            lifetime: 3600,
            keys: vec![key(2), key(3), key(1)],
        })
        .unwrap();
        let ticket = a.seal(b"session state").unwrap();
        assert_eq!(b.open(&ticket).unwrap(), b"session state");
        let back = b.seal(b"other state").unwrap();
        assert_eq!(a.open(&back).unwrap(), b"other state");
        // Two tickets of the same state differ (fresh nonces).
        assert_ne!(a.seal(b"x").unwrap(), a.seal(b"x").unwrap());
        // Without the key, or tampered with, a ticket does not open.
        let c = TicketRing::from_snapshot(&TicketKeys {
            lifetime: 3600,
            keys: vec![key(3)],
        })
        .unwrap();
        assert!(c.open(&ticket).is_none());
        let mut bent = ticket.clone();
        *bent.last_mut().unwrap() ^= 1;
        assert!(a.open(&bent).is_none());
        assert!(a.open(&ticket[..10]).is_none());
    }

    #[test]
    fn keys_that_are_not_32_bytes_of_base64url_are_refused() {
        for bad in [
            vec![],
            vec!["not base64!".to_string()],
            vec![key(1)[..20].to_string()],
        ] {
            assert!(TicketRing::from_snapshot(&TicketKeys {
                lifetime: 1,
                keys: bad
            })
            .is_err());
        }
    }
}
