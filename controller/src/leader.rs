//! Leader election over etcd, so that of several controllers only one writes external
//! state (ACME orders, DNS changes) and compiles snapshots; the others serve the fleet
//! API from the snapshot the leader stored. The leader holds a key bound to a lease it
//! keeps alive; when it dies the lease expires (within the TTL), etcd deletes the key,
//! and a follower watching it takes over. A leader that stops cleanly revokes its lease
//! so the hand-over is immediate. No home-made consensus: etcd decides.

use std::time::Duration;

use etcd_client::{Client, Compare, CompareOp, PutOptions, Txn, TxnOp};
use tokio::sync::watch;

/// Campaigns for leadership until `shutdown`; publishes whether this controller leads.
pub async fn campaign(
    client: Client,
    key: String,
    id: String,
    ttl: Duration,
    leader: watch::Sender<bool>,
    mut shutdown: watch::Receiver<bool>,
) {
    let ttl_secs = i64::try_from(ttl.as_secs().max(2)).unwrap_or(10);
    loop {
        // `term` watches `shutdown` itself, to release the lease on a clean stop.
        let result = term(&client, &key, &id, ttl_secs, &leader, &mut shutdown).await;
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
    key: &str,
    id: &str,
    ttl_secs: i64,
    leader: &watch::Sender<bool>,
    shutdown: &mut watch::Receiver<bool>,
) -> anyhow::Result<()> {
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
        if c.txn(txn).await?.succeeded() {
            tracing::info!("this controller ({id}) is the leader");
            leader.send_replace(true);
            let outcome = tokio::select! {
                r = &mut keep_alive => r,
                _ = shutdown.changed() => Ok(()),
            };
            // Hand over at once on a clean stop (or after losing the lease).
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
