//! Server-side state that outlives a request: the newest session_key per (appid, openid), the
//! sessions that refresh tokens stand for, revoked sessions, and code exchanges shared between
//! replicas. One trait, three backends, one test suite (`tests/store.rs`).
//!
//! Nothing stored is usable on its own: refresh tokens and login codes are known only by their
//! SHA-256, and what must be kept about them (a successor token pair, an exchange's outcome) is
//! sealed by the caller under a key derived from the token or code itself.

mod embedded;
mod memory;
mod redis;
mod revocations;
pub mod seal;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

pub use self::redis::RedisStore;
pub use embedded::EmbeddedStore;
pub use memory::MemoryStore;
pub use revocations::Revocations;

use crate::config::{Secret, StoreConfig};

#[derive(Debug, thiserror::Error)]
#[error("the store failed: {0}")]
pub struct StoreError(pub String);

/// A SHA-256 digest: how refresh tokens and codes are named in the store.
pub type Digest = [u8; 32];

/// A login session: what its refresh tokens stand for.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SessionRecord {
    pub sid: String,
    pub appid: String,
    pub openid: String,
    pub unionid: Option<String>,
    /// Claims the login hook added, carried into every token of the session.
    pub claims: serde_json::Map<String, serde_json::Value>,
    /// Unix seconds; the session and all its refresh tokens end then (`token.refresh_ttl`
    /// after login: rotation does not extend it).
    pub expires_at: u64,
}

/// What presenting a refresh token found.
#[derive(Debug, Clone, PartialEq)]
pub enum Rotation {
    /// It was the session's current token; now `new` is.
    Rotated,
    /// It had been rotated already, `age_secs` ago, leaving `sealed_successor`.
    AlreadyRotated {
        session: SessionRecord,
        age_secs: u64,
        sealed_successor: Vec<u8>,
    },
    /// Unknown, expired, or its session was revoked.
    Unknown,
}

/// A revoked session, as [`Store::revoked_since`] lists it.
#[derive(Debug, Clone, PartialEq)]
pub struct Revoked {
    pub sid: String,
    /// Unix seconds: until then a token of the session could still be accepted, so it must be
    /// refused.
    pub until: u64,
}

/// Who exchanges a login code with WeChat when several replicas receive it at once.
#[derive(Debug, Clone, PartialEq)]
pub enum ExchangeClaim {
    /// This caller: exchange it, then [`Store::finish_exchange`].
    Mine,
    /// Another caller got there first; its outcome appears under the same key, or the claim
    /// lapses if it dies.
    Theirs,
    /// Already exchanged: the sealed outcome.
    Done(Vec<u8>),
}

#[async_trait]
pub trait Store: Send + Sync {
    /// Keeps `session_key` as the one for (appid, openid), replacing an older one.
    async fn put_session_key(
        &self,
        appid: &str,
        openid: &str,
        session_key: &Secret,
    ) -> Result<(), StoreError>;

    async fn session_key(&self, appid: &str, openid: &str) -> Result<Option<Secret>, StoreError>;

    /// Records a new session whose current refresh token is `refresh`, and `access_until`
    /// (unix seconds): until then the access token issued with it is accepted.
    async fn create_session(
        &self,
        session: &SessionRecord,
        refresh: Digest,
        access_until: u64,
    ) -> Result<(), StoreError>;

    /// The live session a refresh token belongs to, rotated or not.
    async fn refresh_session(
        &self,
        refresh: Digest,
        now: u64,
    ) -> Result<Option<SessionRecord>, StoreError>;

    /// Atomically: if `old` is its session's current token, makes `new` current, keeps
    /// `sealed_successor` with `old` and records that the session's access tokens may now be
    /// accepted until `access_until` (unix seconds); otherwise reports what `old` is.
    ///
    /// `now` (unix seconds) is the caller's clock. A store shared by replicas times rotations
    /// by its own clock instead, so that the age it reports means the same on every replica
    /// whatever their clocks say.
    async fn rotate_refresh(
        &self,
        old: Digest,
        new: Digest,
        sealed_successor: &[u8],
        access_until: u64,
        now: u64,
    ) -> Result<Rotation, StoreError>;

    /// Ends the session: its refresh tokens stop working, and its sid is listed by
    /// [`Store::revoked_since`] until `until` (unix seconds) or, when later, until the last
    /// access token recorded for the session stops being accepted. Answers the listing's end.
    async fn revoke_session(&self, sid: &str, until: u64) -> Result<u64, StoreError>;

    /// Sessions revoked after `cursor` (0: all still listed), and the cursor to pass next.
    async fn revoked_since(&self, cursor: u64) -> Result<(Vec<Revoked>, u64), StoreError>;

    /// Claims the exchange of the code named `code` for `ttl`.
    async fn claim_exchange(
        &self,
        code: Digest,
        ttl: Duration,
    ) -> Result<ExchangeClaim, StoreError>;

    /// Publishes the sealed outcome of a claimed exchange for `ttl`.
    async fn finish_exchange(
        &self,
        code: Digest,
        sealed_outcome: &[u8],
        ttl: Duration,
    ) -> Result<(), StoreError>;

    /// True when other processes share this store (replicas), so that what must happen once
    /// across all of them (a code exchange) has to be agreed on through it.
    fn shared(&self) -> bool {
        false
    }

    /// Answers when the store can serve requests (readiness).
    async fn ping(&self) -> Result<(), StoreError>;
}

/// Opens the backend the config names. Call it inside the tokio runtime: the redis backend
/// starts its connection task there.
pub fn open(config: &StoreConfig) -> Result<Arc<dyn Store>, StoreError> {
    match config {
        StoreConfig::Memory => Ok(Arc::new(MemoryStore::default())),
        StoreConfig::Embedded { path } => Ok(Arc::new(EmbeddedStore::open(path)?)),
        StoreConfig::Redis { url, key_prefix } => Ok(Arc::new(RedisStore::open(url, key_prefix)?)),
    }
}
