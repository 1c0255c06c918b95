//! The redis store: one redis server shared by every replica, the way to run more than one.
//!
//! Keys, all under `store.key_prefix` (`P`), each with a TTL so that nothing outlives its use:
//!
//! - `P sk:{len(appid)}:{appid}:{openid}`: the newest session_key (string); kept until the
//!   user's last session ends, and at least a day. (The appid's length keeps the names apart
//!   even for an appid with a `:` in it.)
//! - `P session:{sid}`: the [`SessionRecord`] as JSON, until `expires_at`; deleted on
//!   revocation.
//! - `P refresh:{hex digest}`: a hash of `sid` and `exp` (the session's `expires_at`), and once
//!   rotated `rotated_at` (by the redis server's clock) and the sealed `successor`; until `exp`.
//! - `P access:{sid}`: until when (unix s) the session's latest access token is accepted, for
//!   revocations to be listed that long; until then or the session's end, whichever is later.
//! - `P exchange:{hex digest}`: `c` while claimed, then `d` followed by the sealed outcome;
//!   for the claim's, then the outcome's, ttl.
//! - `P revoked` (sorted set: sid by revocation sequence number) and `P revoked:until` (sorted
//!   set: sid by the end of its listing, unix ms): as long as the longest listing in them.
//!   `P revoked:seq` (the last sequence number, from `INCR`) has no TTL: it is one small key,
//!   and a counter that started again from 0 while replicas hold cursors past it would hide
//!   new revocations from them until the count caught up.
//!
//! What must be atomic across replicas runs as one Lua script: creating a session, rotating a
//! refresh token, revoking a session, claiming a code exchange. A refresh token counts only
//! while its session's key exists, so a revocation stops all of a session's tokens by deleting
//! that one key, without looking for them. The revocation cursor is the server's own `INCR`
//! sequence, and the refresh race window is timed by the server's `TIME`, never by a replica's
//! clock: replicas whose clocks disagree still agree on both. The scripts use only commands of redis 4.0 and later, as
//! managed redis services often run older servers; and since a script reaches a session
//! through the sid in a refresh entry (a key it was not handed), they need a single redis
//! server, not a cluster.
//!
//! `rediss://` URLs connect with TLS, checking the server against the system's root
//! certificates.

use std::sync::LazyLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{ErrorKind, RedisError, Script};

use super::{Digest, ExchangeClaim, Revoked, Rotation, SessionRecord, Store, StoreError};
use crate::config::Secret;

/// How long a connection attempt may take, and how often one is retried before the commands
/// waiting on it fail: a store that is down fails requests within a few seconds rather than
/// holding them, and the next command tries again.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
const CONNECT_RETRIES: usize = 2;
const MAX_RETRY_DELAY: Duration = Duration::from_secs(1);
/// A store answer slower than this fails the request (redis answers in well under a
/// millisecond; anything this slow is an outage).
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(2);
/// The least time a session_key is kept: a login stores it just before creating the session,
/// which then keeps it as long as the session lives.
const SESSION_KEY_MIN_TTL: Duration = Duration::from_secs(24 * 3600);

pub struct RedisStore {
    /// One multiplexed connection, shared by every request, re-established when it breaks.
    connection: ConnectionManager,
    prefix: String,
    /// The URL and its password: removed from every error message, whatever the error.
    secrets: Vec<String>,
}

impl RedisStore {
    /// Prepares the connection without waiting for it: the first command (at the latest the
    /// revocation sync, a second after start) connects, and readiness reports the store down
    /// until it has. A replica started before its redis is up waits for it instead of failing.
    pub fn open(url: &Secret, key_prefix: &str) -> Result<RedisStore, StoreError> {
        let mut secrets = vec![url.expose().to_string()];
        let client = redis::Client::open(url.expose())
            .map_err(|err| redacted(&err, &secrets, "store.url is not a usable redis URL"))?;
        if let Some(password) = client.get_connection_info().redis_settings().password()
            && !password.is_empty()
        {
            secrets.push(password.to_string());
        }
        // rediss:// needs a rustls crypto provider. The process uses ring (see `wechat`);
        // installing it here too makes the order of start-up irrelevant (a second install is
        // refused, harmlessly).
        let _ = rustls::crypto::ring::default_provider().install_default();
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_response_timeout(Some(RESPONSE_TIMEOUT))
            .set_number_of_retries(CONNECT_RETRIES)
            .set_max_delay(MAX_RETRY_DELAY);
        let connection = ConnectionManager::new_lazy_with_config(client, config)
            .map_err(|err| redacted(&err, &secrets, "cannot set up the redis connection"))?;
        Ok(RedisStore {
            connection,
            prefix: key_prefix.to_string(),
            secrets,
        })
    }

    fn failed(&self, err: RedisError) -> StoreError {
        redacted(&err, &self.secrets, "redis store")
    }

    fn session_key_key(&self, appid: &str, openid: &str) -> String {
        format!("{}sk:{}:{appid}:{openid}", self.prefix, appid.len())
    }

    /// The session keys' common start: scripts append the sid they find in a refresh entry.
    fn session_prefix(&self) -> String {
        format!("{}session:", self.prefix)
    }

    /// Likewise for the keys that record how long a session's access tokens live.
    fn access_prefix(&self) -> String {
        format!("{}access:", self.prefix)
    }

    fn refresh_key(&self, digest: &Digest) -> String {
        format!("{}refresh:{}", self.prefix, hex::encode(digest))
    }

    fn exchange_key(&self, digest: &Digest) -> String {
        format!("{}exchange:{}", self.prefix, hex::encode(digest))
    }

    fn revocation_keys(&self) -> RevocationKeys {
        let revoked = format!("{}revoked", self.prefix);
        RevocationKeys {
            until: format!("{revoked}:until"),
            seq: format!("{revoked}:seq"),
            revoked,
        }
    }

    async fn run<T: redis::FromRedisValue>(
        &self,
        invocation: &redis::ScriptInvocation<'_>,
    ) -> Result<T, StoreError> {
        invocation
            .invoke_async(&mut self.connection.clone())
            .await
            .map_err(|err| self.failed(err))
    }
}

struct RevocationKeys {
    revoked: String,
    until: String,
    seq: String,
}

/// A redis error as a [`StoreError`], saying what failed without any secret in it. Errors of
/// the redis crate do not quote the URL, but the password is removed all the same, in case a
/// server or a future version does; and a reply of the wrong shape is not quoted at all, since
/// what it quotes is stored data.
fn redacted(err: &RedisError, secrets: &[String], context: &str) -> StoreError {
    let mut message = match err.kind() {
        ErrorKind::Parse | ErrorKind::UnexpectedReturnType => {
            "an unexpected reply (does something else write under store.key_prefix?)".to_string()
        }
        _ => err.to_string(),
    };
    for secret in secrets {
        message = message.replace(secret.as_str(), "[redacted]");
    }
    StoreError(format!("{context}: {message}"))
}

fn corrupt(what: &str) -> StoreError {
    StoreError(format!("redis store: a stored {what} is corrupt"))
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| {
            u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX)
        })
}

/// A TTL in milliseconds for `PX`/`PEXPIRE`, which refuse 0.
fn ttl_ms(period: Duration) -> u64 {
    u64::try_from(period.as_millis()).unwrap_or(u64::MAX).max(1)
}

/// KEYS: the session_key. ARGV: the session_key, the least time to keep it (ms).
/// A newer session_key keeps what was left of the older one's time, which covers the user's
/// other live sessions.
static PUT_SESSION_KEY: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local left = redis.call('PTTL', KEYS[1])
redis.call('SET', KEYS[1], ARGV[1])
if left < tonumber(ARGV[2]) then left = ARGV[2] end
redis.call('PEXPIRE', KEYS[1], left)
return 1
",
    )
});

/// KEYS: the session, its refresh entry, its user's session_key, its access deadline.
/// ARGV: the session as JSON, sid, expires_at (unix s), expires_at (unix ms), ms until then,
/// the access deadline (unix s), when to forget it (unix ms).
/// The session_key is kept as long as a session of its user lives: `/auth/decrypt` needs it.
static CREATE_SESSION: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
redis.call('SET', KEYS[1], ARGV[1])
redis.call('PEXPIREAT', KEYS[1], ARGV[4])
redis.call('DEL', KEYS[2])
redis.call('HSET', KEYS[2], 'sid', ARGV[2], 'exp', ARGV[3])
redis.call('PEXPIREAT', KEYS[2], ARGV[4])
redis.call('SET', KEYS[4], ARGV[6])
redis.call('PEXPIREAT', KEYS[4], ARGV[7])
local left = redis.call('PTTL', KEYS[3])
if left >= 0 and left < tonumber(ARGV[5]) then
  redis.call('PEXPIRE', KEYS[3], ARGV[5])
end
return 1
",
    )
});

/// KEYS: the refresh entry. ARGV: the session key prefix, now (unix s).
/// Answers the session's JSON, or nil.
static REFRESH_SESSION: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local entry = redis.call('HMGET', KEYS[1], 'sid', 'exp')
if not entry[1] or not entry[2] or tonumber(entry[2]) <= tonumber(ARGV[2]) then
  return false
end
return redis.call('GET', ARGV[1] .. entry[1])
",
    )
});

/// KEYS: the presented token's entry, the successor's. ARGV: the session key prefix, the
/// access deadline key prefix, the sealed successor, the new access deadline (unix s).
/// Answers nil (unknown), {session} (rotated now) or {session, seconds since the rotation,
/// successor}. Times are the server's (`TIME`), so that every replica reads the same age
/// whatever its own clock says; `replicate_commands` lets a script write after reading the
/// clock on redis before 5 (later versions always replicate a script's effects).
static ROTATE_REFRESH: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
redis.replicate_commands()
local now = tonumber(redis.call('TIME')[1])
local entry = redis.call('HMGET', KEYS[1], 'sid', 'exp', 'rotated_at', 'successor')
if not entry[1] or not entry[2] or tonumber(entry[2]) <= now then
  return false
end
local session = redis.call('GET', ARGV[1] .. entry[1])
if not session then
  return false
end
if entry[3] then
  return {session, tostring(math.max(now - tonumber(entry[3]), 0)), entry[4] or ''}
end
redis.call('HSET', KEYS[1], 'rotated_at', now, 'successor', ARGV[3])
redis.call('DEL', KEYS[2])
redis.call('HSET', KEYS[2], 'sid', entry[1], 'exp', entry[2])
redis.call('EXPIREAT', KEYS[2], entry[2])
local access = ARGV[2] .. entry[1]
if tonumber(redis.call('GET', access) or '0') < tonumber(ARGV[4]) then
  redis.call('SET', access, ARGV[4])
  redis.call('EXPIREAT', access, math.max(tonumber(entry[2]), tonumber(ARGV[4])))
end
return {session}
",
    )
});

/// KEYS: the session, its access deadline, `revoked:until`, `revoked:seq`, `revoked`.
/// ARGV: sid, listed until (unix ms), now (unix ms).
/// The listing lasts until the later of the given end and the session's access deadline.
/// Sids whose listing has ended leave both sets, a bounded number at a time (more than the one
/// added); the two sets live as long as the longest listing in them. Answers the listing's end.
/// The sequence goes by the redis server's clock in ms, or one past the last when the clock has
/// not moved on: a redis restarted without its data starts it again from the clock, past every
/// replica's cursor, where a count from 1 would give the first revocations after the restart
/// numbers the cursors have passed, and they would never reach the replicas. Reading the clock
/// before writing needs effects replication: the default from Redis 5 on, asked for by Redis 4.
static REVOKE_SESSION: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
redis.call('DEL', KEYS[1])
local listed_until = tonumber(ARGV[2])
local access = redis.call('GET', KEYS[2])
if access and tonumber(access) * 1000 > listed_until then
  listed_until = tonumber(access) * 1000
end
redis.call('DEL', KEYS[2])
redis.replicate_commands()
local clock = redis.call('TIME')
local seq = math.max(tonumber(redis.call('GET', KEYS[4]) or '0') + 1,
  tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000))
redis.call('SET', KEYS[4], seq)
redis.call('ZADD', KEYS[5], seq, ARGV[1])
local earlier = redis.call('ZSCORE', KEYS[3], ARGV[1])
if earlier and tonumber(earlier) > listed_until then
  listed_until = tonumber(earlier)
else
  redis.call('ZADD', KEYS[3], listed_until, ARGV[1])
end
local ended = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', ARGV[3], 'LIMIT', 0, 100)
if #ended > 0 then
  redis.call('ZREM', KEYS[5], unpack(ended))
  redis.call('ZREM', KEYS[3], unpack(ended))
end
local left = listed_until - tonumber(ARGV[3])
if left > 0 then
  for _, key in ipairs({KEYS[3], KEYS[5]}) do
    if redis.call('PTTL', key) < left then
      redis.call('PEXPIRE', key, left)
    end
  end
end
return listed_until
",
    )
});

/// KEYS: `revoked`, `revoked:until`, `revoked:seq`. ARGV: the cursor, now (unix ms).
/// Answers {the sequence number, {sid, listed until (unix ms), …} for the sessions revoked
/// after the cursor and still listed}. A cursor ahead of the sequence means the server lost
/// it (it restarted without persistence): then everything listed is new to the caller.
static REVOKED_SINCE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local seq = tonumber(redis.call('GET', KEYS[3]) or '0')
local from = '(' .. ARGV[1]
if tonumber(ARGV[1]) > seq then
  from = '-inf'
end
local listed = {}
for _, sid in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], from, '+inf')) do
  local listed_until = redis.call('ZSCORE', KEYS[2], sid)
  if listed_until and tonumber(listed_until) > tonumber(ARGV[2]) then
    listed[#listed + 1] = sid
    listed[#listed + 1] = tonumber(listed_until)
  end
end
return {seq, listed}
",
    )
});

/// KEYS: the exchange. ARGV: how long a claim lasts (ms).
/// Answers what is there (`c`, or `d` + outcome), or nil after claiming it.
static CLAIM_EXCHANGE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local state = redis.call('GET', KEYS[1])
if state then
  return state
end
redis.call('SET', KEYS[1], 'c', 'PX', ARGV[1])
return false
",
    )
});

#[async_trait]
impl Store for RedisStore {
    async fn put_session_key(
        &self,
        appid: &str,
        openid: &str,
        session_key: &Secret,
    ) -> Result<(), StoreError> {
        self.run(
            PUT_SESSION_KEY
                .key(self.session_key_key(appid, openid))
                .arg(session_key.expose())
                .arg(ttl_ms(SESSION_KEY_MIN_TTL)),
        )
        .await
    }

    async fn session_key(&self, appid: &str, openid: &str) -> Result<Option<Secret>, StoreError> {
        let session_key: Option<String> = redis::cmd("GET")
            .arg(self.session_key_key(appid, openid))
            .query_async(&mut self.connection.clone())
            .await
            .map_err(|err| self.failed(err))?;
        Ok(session_key.map(Secret::new))
    }

    async fn create_session(
        &self,
        session: &SessionRecord,
        refresh: Digest,
        access_until: u64,
    ) -> Result<(), StoreError> {
        let record = serde_json::to_string(session)
            .map_err(|err| StoreError(format!("redis store: cannot encode a session: {err}")))?;
        let expires_at_ms = session.expires_at.saturating_mul(1000);
        self.run(
            CREATE_SESSION
                .key(format!("{}{}", self.session_prefix(), session.sid))
                .key(self.refresh_key(&refresh))
                .key(self.session_key_key(&session.appid, &session.openid))
                .key(format!("{}{}", self.access_prefix(), session.sid))
                .arg(record)
                .arg(&session.sid)
                .arg(session.expires_at)
                .arg(expires_at_ms)
                .arg(expires_at_ms.saturating_sub(unix_ms()))
                .arg(access_until)
                .arg(session.expires_at.max(access_until).saturating_mul(1000)),
        )
        .await
    }

    async fn refresh_session(
        &self,
        refresh: Digest,
        now: u64,
    ) -> Result<Option<SessionRecord>, StoreError> {
        let record: Option<Vec<u8>> = self
            .run(
                REFRESH_SESSION
                    .key(self.refresh_key(&refresh))
                    .arg(self.session_prefix())
                    .arg(now),
            )
            .await?;
        record.map(|record| parse_session(&record)).transpose()
    }

    /// The caller's `now` is not used: the script reads the server's clock, which every
    /// replica shares.
    async fn rotate_refresh(
        &self,
        old: Digest,
        new: Digest,
        sealed_successor: &[u8],
        access_until: u64,
        _now: u64,
    ) -> Result<Rotation, StoreError> {
        let found: Option<Vec<Vec<u8>>> = self
            .run(
                ROTATE_REFRESH
                    .key(self.refresh_key(&old))
                    .key(self.refresh_key(&new))
                    .arg(self.session_prefix())
                    .arg(self.access_prefix())
                    .arg(sealed_successor)
                    .arg(access_until),
            )
            .await?;
        let Some(found) = found else {
            return Ok(Rotation::Unknown);
        };
        match found.as_slice() {
            [_] => Ok(Rotation::Rotated),
            [session, age_secs, sealed_successor] => Ok(Rotation::AlreadyRotated {
                session: parse_session(session)?,
                age_secs: std::str::from_utf8(age_secs)
                    .ok()
                    .and_then(|age_secs| age_secs.parse().ok())
                    .ok_or_else(|| corrupt("refresh token"))?,
                sealed_successor: sealed_successor.clone(),
            }),
            _ => Err(corrupt("refresh token")),
        }
    }

    async fn revoke_session(&self, sid: &str, until: u64) -> Result<u64, StoreError> {
        let keys = self.revocation_keys();
        let listed_until_ms: u64 = self
            .run(
                REVOKE_SESSION
                    .key(format!("{}{sid}", self.session_prefix()))
                    .key(format!("{}{sid}", self.access_prefix()))
                    .key(keys.until)
                    .key(keys.seq)
                    .key(keys.revoked)
                    .arg(sid)
                    .arg(until.saturating_mul(1000))
                    .arg(unix_ms()),
            )
            .await?;
        Ok(listed_until_ms.div_ceil(1000))
    }

    async fn revoked_since(&self, cursor: u64) -> Result<(Vec<Revoked>, u64), StoreError> {
        let keys = self.revocation_keys();
        let (next, listed): (u64, Vec<(String, u64)>) = self
            .run(
                REVOKED_SINCE
                    .key(keys.revoked)
                    .key(keys.until)
                    .key(keys.seq)
                    .arg(cursor)
                    .arg(unix_ms()),
            )
            .await?;
        let listed = listed
            .into_iter()
            .map(|(sid, until_ms)| Revoked {
                sid,
                until: until_ms.div_ceil(1000),
            })
            .collect();
        Ok((listed, next))
    }

    async fn claim_exchange(
        &self,
        code: Digest,
        ttl: Duration,
    ) -> Result<ExchangeClaim, StoreError> {
        let state: Option<Vec<u8>> = self
            .run(
                CLAIM_EXCHANGE
                    .key(self.exchange_key(&code))
                    .arg(ttl_ms(ttl)),
            )
            .await?;
        match state.as_deref() {
            None => Ok(ExchangeClaim::Mine),
            Some(b"c") => Ok(ExchangeClaim::Theirs),
            Some([b'd', outcome @ ..]) => Ok(ExchangeClaim::Done(outcome.to_vec())),
            Some(_) => Err(corrupt("code exchange")),
        }
    }

    async fn finish_exchange(
        &self,
        code: Digest,
        sealed_outcome: &[u8],
        ttl: Duration,
    ) -> Result<(), StoreError> {
        redis::cmd("SET")
            .arg(self.exchange_key(&code))
            .arg([b"d".as_slice(), sealed_outcome].concat())
            .arg("PX")
            .arg(ttl_ms(ttl))
            .query_async(&mut self.connection.clone())
            .await
            .map_err(|err| self.failed(err))
    }

    fn shared(&self) -> bool {
        true
    }

    async fn ping(&self) -> Result<(), StoreError> {
        redis::cmd("PING")
            .query_async::<String>(&mut self.connection.clone())
            .await
            .map(drop)
            .map_err(|err| self.failed(err))
    }
}

fn parse_session(record: &[u8]) -> Result<SessionRecord, StoreError> {
    serde_json::from_slice(record).map_err(|_| corrupt("session"))
}
