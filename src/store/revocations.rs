//! The local copy of revoked sessions. Checking a token against the store on every proxied
//! request would put a store round trip on the hot path; instead each replica keeps the revoked
//! session ids in memory and pulls the ones other replicas revoked every
//! [`SYNC_INTERVAL`], which bounds how long a logout takes to reach every replica. A session
//! revoked here is known here at once.

use std::sync::{Arc, Weak};
use std::time::Duration;

use moka::sync::Cache;

use super::Store;

/// How often the store is asked for revocations; SPEC §6 allows 5 s.
pub const SYNC_INTERVAL: Duration = Duration::from_secs(1);

pub struct Revocations {
    /// Revoked sids, each kept as long as a token of its session could still be valid.
    revoked: Cache<String, ()>,
}

impl Revocations {
    /// `keep_for`: the longest an access token lives, leeway included.
    pub fn new(keep_for: Duration) -> Revocations {
        Revocations {
            revoked: Cache::builder().time_to_live(keep_for).build(),
        }
    }

    pub fn is_revoked(&self, sid: &str) -> bool {
        self.revoked.contains_key(sid)
    }

    pub fn insert(&self, sid: &str) {
        self.revoked.insert(sid.to_string(), ());
    }

    /// Pulls every revocation still listed in `store`, then keeps pulling new ones in the
    /// background for as long as both are in use. The first pull is awaited so that a
    /// restarted gateway never serves a token of a session revoked before it stopped; when the
    /// store cannot answer yet, the background pulls catch up and readiness reports the store.
    /// Holding neither strongly lets the store close (an embedded file be released) as soon as
    /// its owner drops it.
    pub async fn start_sync(self: &Arc<Self>, store: &Arc<dyn Store>) {
        let mut cursor = self.pull(store.as_ref(), 0).await;
        let revocations: Weak<Revocations> = Arc::downgrade(self);
        let store = Arc::downgrade(store);
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval(SYNC_INTERVAL);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            // The first tick is immediate, and the first pull is done.
            ticks.tick().await;
            loop {
                ticks.tick().await;
                let (Some(revocations), Some(store)) = (revocations.upgrade(), store.upgrade())
                else {
                    return;
                };
                cursor = revocations.pull(store.as_ref(), cursor).await;
            }
        });
    }

    /// Adds the sessions revoked after `cursor`; the cursor to pass next.
    async fn pull(&self, store: &dyn Store, cursor: u64) -> u64 {
        match store.revoked_since(cursor).await {
            Ok((sids, next)) => {
                for sid in sids {
                    self.insert(&sid);
                }
                next
            }
            Err(err) => {
                tracing::warn!(error = %err, "syncing revoked sessions failed");
                cursor
            }
        }
    }
}
