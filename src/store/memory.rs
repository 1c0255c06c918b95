//! The in-process store: for tests and throwaway runs; everything is gone on exit.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use async_trait::async_trait;

use super::{Digest, ExchangeClaim, Revoked, Rotation, SessionRecord, Store, StoreError};
use crate::config::Secret;
use crate::token::unix_now;

#[derive(Default)]
pub struct MemoryStore {
    // A std Mutex is right here: it is never held across an `.await`, and every critical
    // section is a few map operations.
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    session_keys: HashMap<(String, String), Secret>,
    sessions: HashMap<String, Session>,
    refresh_tokens: HashMap<Digest, RefreshEntry>,
    /// (sequence number, the revoked session listed until a unix second).
    revoked: Vec<(u64, Revoked)>,
    revocation_seq: u64,
    exchanges: HashMap<Digest, (Option<Vec<u8>>, Instant)>,
    /// Expired entries are swept when the maps reach this size, so a sweep's cost is spread
    /// over the inserts that grew them to it.
    sweep_at: usize,
}

struct Session {
    record: SessionRecord,
    /// Unix seconds: until then the latest access token issued for the session is accepted.
    access_until: u64,
}

struct RefreshEntry {
    sid: String,
    /// (rotated at, sealed successor) once rotated.
    rotated: Option<(u64, Vec<u8>)>,
}

const FIRST_SWEEP_AT: usize = 1024;

impl Inner {
    fn sweep_if_due(&mut self) {
        let size = self.refresh_tokens.len() + self.exchanges.len();
        if size < self.sweep_at {
            return;
        }
        let (now, unix) = (Instant::now(), unix_now());
        self.sessions
            .retain(|_, session| session.record.expires_at > unix || session.access_until > unix);
        let sessions = &self.sessions;
        self.refresh_tokens
            .retain(|_, entry| sessions.contains_key(&entry.sid));
        self.exchanges.retain(|_, (_, until)| *until > now);
        self.revoked.retain(|(_, revoked)| revoked.until > unix);
        self.sweep_at =
            ((self.refresh_tokens.len() + self.exchanges.len()) * 2).max(FIRST_SWEEP_AT);
    }

    fn live_session(&self, sid: &str, now: u64) -> Option<&SessionRecord> {
        self.sessions
            .get(sid)
            .map(|session| &session.record)
            .filter(|session| session.expires_at > now)
    }
}

impl MemoryStore {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().expect("store lock poisoned")
    }
}

#[async_trait]
impl Store for MemoryStore {
    async fn put_session_key(
        &self,
        appid: &str,
        openid: &str,
        session_key: &Secret,
    ) -> Result<(), StoreError> {
        self.lock()
            .session_keys
            .insert((appid.to_string(), openid.to_string()), session_key.clone());
        Ok(())
    }

    async fn session_key(&self, appid: &str, openid: &str) -> Result<Option<Secret>, StoreError> {
        Ok(self
            .lock()
            .session_keys
            .get(&(appid.to_string(), openid.to_string()))
            .cloned())
    }

    async fn create_session(
        &self,
        session: &SessionRecord,
        refresh: Digest,
        access_until: u64,
    ) -> Result<(), StoreError> {
        let mut inner = self.lock();
        inner.sweep_if_due();
        inner.sessions.insert(
            session.sid.clone(),
            Session {
                record: session.clone(),
                access_until,
            },
        );
        inner.refresh_tokens.insert(
            refresh,
            RefreshEntry {
                sid: session.sid.clone(),
                rotated: None,
            },
        );
        Ok(())
    }

    async fn refresh_session(
        &self,
        refresh: Digest,
        now: u64,
    ) -> Result<Option<SessionRecord>, StoreError> {
        let inner = self.lock();
        Ok(inner
            .refresh_tokens
            .get(&refresh)
            .and_then(|entry| inner.live_session(&entry.sid, now))
            .cloned())
    }

    async fn rotate_refresh(
        &self,
        old: Digest,
        new: Digest,
        sealed_successor: &[u8],
        access_until: u64,
        now: u64,
    ) -> Result<Rotation, StoreError> {
        let mut inner = self.lock();
        let Some(entry) = inner.refresh_tokens.get(&old) else {
            return Ok(Rotation::Unknown);
        };
        let Some(session) = inner.live_session(&entry.sid, now).cloned() else {
            return Ok(Rotation::Unknown);
        };
        if let Some((rotated_at, sealed)) = &entry.rotated {
            return Ok(Rotation::AlreadyRotated {
                session,
                age_secs: now.saturating_sub(*rotated_at),
                sealed_successor: sealed.clone(),
            });
        }
        let sid = entry.sid.clone();
        if let Some(entry) = inner.refresh_tokens.get_mut(&old) {
            entry.rotated = Some((now, sealed_successor.to_vec()));
        }
        if let Some(session) = inner.sessions.get_mut(&sid) {
            session.access_until = session.access_until.max(access_until);
        }
        inner
            .refresh_tokens
            .insert(new, RefreshEntry { sid, rotated: None });
        Ok(Rotation::Rotated)
    }

    async fn revoke_session(&self, sid: &str, until: u64) -> Result<u64, StoreError> {
        let mut inner = self.lock();
        let recorded = inner
            .sessions
            .remove(sid)
            .map_or(0, |session| session.access_until);
        inner.refresh_tokens.retain(|_, entry| entry.sid != sid);
        inner.revocation_seq += 1;
        let seq = inner.revocation_seq;
        let until = until.max(recorded);
        inner.revoked.push((
            seq,
            Revoked {
                sid: sid.to_string(),
                until,
            },
        ));
        Ok(until)
    }

    async fn revoked_since(&self, cursor: u64) -> Result<(Vec<Revoked>, u64), StoreError> {
        let inner = self.lock();
        let now = unix_now();
        let listed = inner
            .revoked
            .iter()
            .filter(|(seq, revoked)| *seq > cursor && revoked.until > now)
            .map(|(_, revoked)| revoked.clone())
            .collect();
        Ok((listed, inner.revocation_seq))
    }

    async fn claim_exchange(
        &self,
        code: Digest,
        ttl: Duration,
    ) -> Result<ExchangeClaim, StoreError> {
        let mut inner = self.lock();
        inner.sweep_if_due();
        let now = Instant::now();
        match inner.exchanges.get(&code) {
            Some((Some(outcome), until)) if *until > now => {
                Ok(ExchangeClaim::Done(outcome.clone()))
            }
            Some((None, until)) if *until > now => Ok(ExchangeClaim::Theirs),
            _ => {
                inner.exchanges.insert(code, (None, now + ttl));
                Ok(ExchangeClaim::Mine)
            }
        }
    }

    async fn finish_exchange(
        &self,
        code: Digest,
        sealed_outcome: &[u8],
        ttl: Duration,
    ) -> Result<(), StoreError> {
        self.lock()
            .exchanges
            .insert(code, (Some(sealed_outcome.to_vec()), Instant::now() + ttl));
        Ok(())
    }

    async fn ping(&self) -> Result<(), StoreError> {
        Ok(())
    }
}
