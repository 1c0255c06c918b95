//! The local copy of revoked sessions. Checking a token against the store on every proxied
//! request would put a store round trip on the hot path; instead each replica keeps the revoked
//! session ids in memory and pulls the ones other replicas revoked every
//! [`SYNC_INTERVAL`], which bounds how long a logout takes to reach every replica. A session
//! revoked here is known here at once.
//!
//! Each revocation carries its own end: the moment the last token of its session stops being
//! accepted. A fixed period taken from the config at start would be wrong after a reload that
//! lengthens `access_ttl`, and for tokens minted with a longer lifetime (`wxgate token --ttl`).

use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use foldhash::fast::RandomState;
use moka::Expiry;
use moka::ops::compute::Op;
use moka::sync::Cache;
use tokio::sync::watch;

use super::{Revoked, Store};
use crate::token::unix_now;

/// How often the store is asked for revocations; SPEC §6 allows 5 s.
pub const SYNC_INTERVAL: Duration = Duration::from_secs(1);

pub struct Revocations {
    /// Revoked sid → until when (unix seconds) a token of its session could be accepted.
    revoked: Cache<String, u64, RandomState>,
    /// Revocations made here that the store could not take, sent again at each sync until it
    /// does: the other replicas learn of them only from the store.
    unsent: Mutex<Vec<Revoked>>,
    /// Bumped at every revocation, for what must end with a session rather than ask about it
    /// on each request: upgraded connections (see [`Revocations::ended`]), and connections that
    /// remember their last token (see [`Revocations::watch`]).
    changes: watch::Sender<()>,
}

impl Default for Revocations {
    fn default() -> Self {
        Revocations {
            // Asked on every authenticated request. Only session ids the gateway made get in,
            // so the default SipHash's resistance to crafted collisions buys nothing here.
            revoked: Cache::builder()
                .expire_after(UntilListingEnds)
                .build_with_hasher(RandomState::default()),
            unsent: Mutex::default(),
            changes: watch::Sender::new(()),
        }
    }
}

impl Revocations {
    pub fn is_revoked(&self, sid: &str) -> bool {
        self.revoked.contains_key(sid)
    }

    /// Tells of every revocation made from now on. A session found not revoked after taking (or
    /// marking seen) what it tells is still not revoked while it tells of none: a listing
    /// only ends once its session's tokens are no longer accepted anyway.
    pub fn watch(&self) -> watch::Receiver<()> {
        self.changes.subscribe()
    }

    /// Refuses `sid`'s tokens until `until` (unix seconds), or longer if it already was.
    pub fn insert(&self, sid: &str, until: u64) {
        self.revoked
            .entry_by_ref(sid)
            .and_compute_with(|listed| match listed {
                Some(listed) if *listed.value() >= until => Op::Nop,
                _ => Op::Put(until),
            });
        self.changes.send_replace(());
    }

    /// Keeps a revocation made here, which the store failed to take, for the next syncs to
    /// send until it does. A client told its logout failed may not try again (a retry here is
    /// refused as already revoked), and the other replicas would otherwise never learn of it.
    pub fn keep_unsent(&self, sid: &str, until: u64) {
        self.unsent.lock().expect("never poisoned").push(Revoked {
            sid: sid.to_string(),
            until,
        });
    }

    /// Sends the revocations the store failed to take; those it fails again are kept.
    async fn send_unsent(&self, store: &dyn Store) {
        let unsent = std::mem::take(&mut *self.unsent.lock().expect("never poisoned"));
        for revoked in unsent {
            if let Err(err) = store.revoke_session(&revoked.sid, revoked.until).await {
                tracing::warn!(error = %err, sid = %revoked.sid, "a revocation is still not in the store");
                self.unsent.lock().expect("never poisoned").push(revoked);
            }
        }
    }

    /// Resolves once `sid` is revoked. Revocations are rare, so every waiter is woken at each
    /// one and looks for its own sid in the cache; a waiter costs nothing in between, where
    /// polling the cache would cost every open connection a timer.
    pub fn ended(self: &Arc<Self>, sid: String) -> impl Future<Output = ()> + Send + 'static {
        let revocations = self.clone();
        let mut changes = self.changes.subscribe();
        async move {
            // The receiver has seen the current version, so a revocation made between
            // subscribing and this check is caught by the check, and any later one by
            // `changed`.
            while !revocations.is_revoked(&sid) {
                if changes.changed().await.is_err() {
                    return;
                }
            }
        }
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
                revocations.send_unsent(store.as_ref()).await;
                cursor = revocations.pull(store.as_ref(), cursor).await;
            }
        });
    }

    /// Adds the sessions revoked after `cursor`; the cursor to pass next.
    async fn pull(&self, store: &dyn Store, cursor: u64) -> u64 {
        match store.revoked_since(cursor).await {
            Ok((listed, next)) => {
                for Revoked { sid, until } in listed {
                    self.insert(&sid, until);
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

/// Each revoked sid is kept exactly until its own listing ends.
struct UntilListingEnds;

impl UntilListingEnds {
    fn left(until: u64) -> Option<Duration> {
        Some(Duration::from_secs(until.saturating_sub(unix_now())))
    }
}

impl Expiry<String, u64> for UntilListingEnds {
    fn expire_after_create(&self, _sid: &String, until: &u64, _at: Instant) -> Option<Duration> {
        Self::left(*until)
    }

    fn expire_after_update(
        &self,
        _sid: &String,
        until: &u64,
        _at: Instant,
        _left: Option<Duration>,
    ) -> Option<Duration> {
        Self::left(*until)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_revocation_lasts_until_its_own_end_and_a_later_one_extends_it() {
        let revocations = Revocations::default();
        revocations.insert("past", unix_now() - 1);
        assert!(!revocations.is_revoked("past"));

        revocations.insert("s", unix_now() + 3600);
        assert!(revocations.is_revoked("s"));
        // An earlier end never shortens a listing.
        revocations.insert("s", unix_now() - 1);
        assert!(revocations.is_revoked("s"));
        assert!(!revocations.is_revoked("other"));
    }

    #[test]
    fn ended_resolves_when_its_session_is_revoked_and_not_before() {
        use futures_util::FutureExt;

        let revocations = Arc::new(Revocations::default());
        let mut mine = Box::pin(revocations.ended("mine".into()));
        assert!(mine.as_mut().now_or_never().is_none());
        // Woken by another session's revocation, it looks and waits on.
        revocations.insert("theirs", unix_now() + 60);
        assert!(mine.as_mut().now_or_never().is_none());
        revocations.insert("mine", unix_now() + 60);
        assert!(mine.as_mut().now_or_never().is_some());
        // Already revoked: resolves at once.
        assert!(revocations.ended("mine".into()).now_or_never().is_some());
    }
}
