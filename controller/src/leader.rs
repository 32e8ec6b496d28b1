//! Leader election over etcd, so that of several controllers only one writes external
//! state (ACME orders, DNS changes) and compiles snapshots; the others serve the fleet
//! API from the snapshot the leader stored. The leader holds a key bound to a lease it
//! keeps alive; when it dies the lease expires (within the TTL), etcd deletes the key,
//! and a follower watching it takes over. A leader that stops cleanly revokes its lease
//! so the hand-over is immediate. No home-made consensus: etcd decides.
//!
//! Believing it leads is not enough for a controller to write: one that was frozen or
//! cut off may still believe it after etcd gave the key to another. So the writes only
//! the leader makes (the snapshot, the ACME planner's state) carry a [`Fence`]: the
//! revision at which this controller created the leader key. etcd applies such a write
//! only while the key still has that revision (`Store::put_leading`), so two
//! controllers never write them in the same term, whatever either believes.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{Client, Compare, CompareOp, PutOptions, Txn, TxnOp};
use tokio::sync::watch;

/// The term this controller leads in, as the etcd revision at which it created the
/// leader key (a fencing token); shared by the campaign, which sets it, and the store,
/// whose leader-only writes are conditional on it.
#[derive(Clone, Debug, Default)]
pub struct Fence(Arc<AtomicI64>);

impl Fence {
    /// The revision of the term held, if this controller leads.
    #[must_use]
    pub fn revision(&self) -> Option<i64> {
        Some(self.0.load(Ordering::Acquire)).filter(|r| *r > 0)
    }

    /// Starts the term created at `revision` (the campaign, when it wins; a test that
    /// plays a controller which has not noticed its term ended).
    pub fn hold(&self, revision: i64) {
        self.0.store(revision, Ordering::Release);
    }

    /// Ends the term (only `revision`'s: a later term is left alone).
    pub fn release(&self, revision: i64) {
        let _ = self
            .0
            .compare_exchange(revision, 0, Ordering::AcqRel, Ordering::Acquire);
    }
}

/// What one controller campaigns with: the etcd key, its own id and the lease TTL.
#[derive(Clone, Debug)]
pub struct Candidate {
    /// The full etcd key of the leader (its value is the leader's id).
    pub key: String,
    /// This controller's id, written as the key's value.
    pub id: String,
    /// The lease TTL: how long a dead leader blocks the others.
    pub ttl: Duration,
    /// The term held, for fenced writes.
    pub fence: Fence,
}

/// Campaigns for leadership until `shutdown`; publishes whether this controller leads.
pub async fn campaign(
    client: Client,
    candidate: Candidate,
    leader: watch::Sender<bool>,
    mut shutdown: watch::Receiver<bool>,
) {
    let ttl_secs = i64::try_from(candidate.ttl.as_secs().max(2)).unwrap_or(10);
    loop {
        // `term` watches `shutdown` itself, to release the lease on a clean stop.
        let result = term(&client, &candidate, ttl_secs, &leader, &mut shutdown).await;
        leader.send_replace(false);
        match result {
            Ok(()) => return,
            Err(e) => tracing::warn!("leader election: {e:#}; retrying"),
        }
        tokio::select! {
            _ = shutdown.changed() => return,
            () = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
    }
}

/// One lease: campaign with it until it is lost (`Err`) or shutdown (`Ok`).
async fn term(
    client: &Client,
    candidate: &Candidate,
    ttl_secs: i64,
    leader: &watch::Sender<bool>,
    shutdown: &mut watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let (key, id) = (candidate.key.as_str(), candidate.id.as_str());
    let mut c = client.clone();
    let lease = c.lease_grant(ttl_secs, None).await?.id();
    let (mut keeper, mut acks) = c.lease_keep_alive(lease).await?;
    let every = Duration::from_secs(u64::try_from(ttl_secs).unwrap_or(10)) / 3;
    let keep_alive = async {
        loop {
            keeper.keep_alive().await?;
            match acks.message().await? {
                Some(r) if r.ttl() > 0 => {}
                _ => anyhow::bail!("lease {lease:x} expired"),
            }
            tokio::time::sleep(every).await;
        }
    };
    tokio::pin!(keep_alive);
    loop {
        let txn = Txn::new()
            .when([Compare::create_revision(key, CompareOp::Equal, 0)])
            .and_then([TxnOp::put(
                key,
                id,
                Some(PutOptions::new().with_lease(lease)),
            )]);
        let won = c.txn(txn).await?;
        if won.succeeded() {
            // The put in the transaction created the key at the response's revision.
            let revision = won
                .header()
                .map_or(0, etcd_client::ResponseHeader::revision);
            tracing::info!("this controller ({id}) is the leader (term {revision})");
            candidate.fence.hold(revision);
            leader.send_replace(true);
            let outcome = tokio::select! {
                r = &mut keep_alive => r,
                r = key_lost(&c, key, revision) => r,
                _ = shutdown.changed() => Ok(()),
            };
            // Stop writing before anything else, then hand over at once on a clean
            // stop (or after losing the lease or the key).
            candidate.fence.release(revision);
            leader.send_replace(false);
            let _ = c.lease_revoke(lease).await;
            if outcome.is_ok() {
                tracing::info!("leadership released");
            }
            return outcome;
        }
        // Someone else leads: wait for their key to go, keeping our lease alive.
        let mut stream = c.watch(key, None).await?;
        let gone = async {
            // The key may have gone between the txn and the watch.
            if c.clone().get(key, None).await?.kvs().is_empty() {
                return Ok::<(), anyhow::Error>(());
            }
            while let Some(msg) = stream.message().await? {
                if msg
                    .events()
                    .iter()
                    .any(|e| e.event_type() == etcd_client::EventType::Delete)
                {
                    return Ok(());
                }
            }
            anyhow::bail!("watch of {key} ended")
        };
        tokio::select! {
            r = gone => r?,
            r = &mut keep_alive => return r,
            _ = shutdown.changed() => {
                let _ = c.lease_revoke(lease).await;
                return Ok(());
            }
        }
    }
}

/// Returns (as an error) once the leader key no longer is the one created at
/// `revision`: deleted or replaced by someone else while the lease lives on (an
/// operator's `etcdctl del`, a restore). Without this the controller would believe it
/// leads forever while its fenced writes fail.
async fn key_lost(client: &Client, key: &str, revision: i64) -> anyhow::Result<()> {
    let mut c = client.clone();
    let options = etcd_client::WatchOptions::new().with_start_revision(revision + 1);
    let mut stream = c.watch(key, Some(options)).await?;
    while let Some(msg) = stream.message().await? {
        for e in msg.events() {
            let replaced = e.kv().is_some_and(|kv| kv.create_revision() != revision);
            if e.event_type() == etcd_client::EventType::Delete || replaced {
                anyhow::bail!("the leader key {key} was removed or replaced");
            }
        }
    }
    anyhow::bail!("watch of {key} ended")
}
