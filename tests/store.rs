//! One suite, every backend: each `suite!` instance runs the same checks against a fresh store.

mod common;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use common::RedisServer;
use wxgate::config::Secret;
use wxgate::store::{
    Digest, EmbeddedStore, ExchangeClaim, MemoryStore, RedisStore, Revoked, Rotation,
    SessionRecord, Store, StoreError, seal,
};

fn session(sid: &str, expires_at: u64) -> SessionRecord {
    let mut claims = serde_json::Map::new();
    claims.insert("uid".into(), 7.into());
    SessionRecord {
        sid: sid.into(),
        appid: "wx1".into(),
        openid: "o-1".into(),
        unionid: Some("u-1".into()),
        claims,
        expires_at,
    }
}

fn now() -> u64 {
    wxgate::token::unix_now()
}

fn name(token: &str) -> seal::Name {
    seal::name("refresh", token.as_bytes())
}

pub async fn newest_session_key_wins(store: Arc<dyn Store>) {
    assert!(store.session_key("wx1", "o1").await.unwrap().is_none());
    store
        .put_session_key("wx1", "o1", &Secret::new("old"))
        .await
        .unwrap();
    store
        .put_session_key("wx1", "o1", &Secret::new("new"))
        .await
        .unwrap();
    assert_eq!(
        store
            .session_key("wx1", "o1")
            .await
            .unwrap()
            .unwrap()
            .expose(),
        "new"
    );
    assert!(store.session_key("wx2", "o1").await.unwrap().is_none());
}

/// The access deadline passed with a session or a rotation when a test does not look at it.
fn access() -> u64 {
    now() + 60
}

pub async fn refresh_tokens_rotate_once(store: Arc<dyn Store>) {
    let record = session("s1", now() + 3600);
    store
        .create_session(&record, name("r1"), access())
        .await
        .unwrap();
    assert_eq!(
        store.refresh_session(name("r1"), now()).await.unwrap(),
        Some(record.clone())
    );
    assert_eq!(
        store.refresh_session(name("nope"), now()).await.unwrap(),
        None
    );

    let rotation = store
        .rotate_refresh(name("r1"), name("r2"), b"sealed-2", access(), now())
        .await
        .unwrap();
    assert_eq!(rotation, Rotation::Rotated);
    // The old token now reports its rotation and what was sealed with it.
    match store
        .rotate_refresh(name("r1"), name("r3"), b"sealed-3", access(), now())
        .await
        .unwrap()
    {
        Rotation::AlreadyRotated {
            session,
            age_secs,
            sealed_successor,
        } => {
            assert_eq!(session, record);
            assert!(age_secs <= 1, "{age_secs}");
            assert_eq!(sealed_successor, b"sealed-2");
        }
        other => panic!("expected AlreadyRotated, got {other:?}"),
    }
    // r3 was never made current.
    assert_eq!(
        store.refresh_session(name("r3"), now()).await.unwrap(),
        None
    );
    assert_eq!(
        store
            .rotate_refresh(name("r2"), name("r4"), b"sealed-4", access(), now())
            .await
            .unwrap(),
        Rotation::Rotated
    );
    assert_eq!(
        store
            .rotate_refresh(name("unknown"), name("r5"), b"", access(), now())
            .await
            .unwrap(),
        Rotation::Unknown
    );
}

pub async fn concurrent_rotations_let_exactly_one_win(store: Arc<dyn Store>) {
    store
        .create_session(&session("s-race", now() + 3600), name("race"), access())
        .await
        .unwrap();
    let attempts = (0..8).map(|i| {
        let store = store.clone();
        tokio::spawn(async move {
            store
                .rotate_refresh(
                    name("race"),
                    name(&format!("race-{i}")),
                    b"x",
                    access(),
                    now(),
                )
                .await
                .unwrap()
        })
    });
    let outcomes = futures_util::future::join_all(attempts).await;
    let winners = outcomes
        .into_iter()
        .filter(|outcome| outcome.as_ref().unwrap() == &Rotation::Rotated)
        .count();
    assert_eq!(winners, 1);
}

pub async fn expired_sessions_are_unknown(store: Arc<dyn Store>) {
    store
        .create_session(&session("s-old", now() - 1), name("old"), access())
        .await
        .unwrap();
    assert_eq!(
        store.refresh_session(name("old"), now()).await.unwrap(),
        None
    );
    assert_eq!(
        store
            .rotate_refresh(name("old"), name("old-2"), b"", access(), now())
            .await
            .unwrap(),
        Rotation::Unknown
    );
}

/// The sids of a listing.
fn sids(listed: &[Revoked]) -> Vec<&str> {
    listed.iter().map(|revoked| revoked.sid.as_str()).collect()
}

pub async fn revoked_sessions_stop_and_are_listed(store: Arc<dyn Store>) {
    let (_, start) = store.revoked_since(0).await.unwrap();
    store
        .create_session(&session("s-rev", now() + 3600), name("rev-1"), access())
        .await
        .unwrap();
    store
        .rotate_refresh(name("rev-1"), name("rev-2"), b"", access(), now())
        .await
        .unwrap();
    store.revoke_session("s-rev", now() + 60).await.unwrap();
    for token in ["rev-1", "rev-2"] {
        assert_eq!(
            store.refresh_session(name(token), now()).await.unwrap(),
            None
        );
        assert_eq!(
            store
                .rotate_refresh(name(token), name("rev-3"), b"", access(), now())
                .await
                .unwrap(),
            Rotation::Unknown
        );
    }
    let (listed, cursor) = store.revoked_since(start).await.unwrap();
    assert_eq!(sids(&listed), ["s-rev"]);
    let (listed, _) = store.revoked_since(cursor).await.unwrap();
    assert!(listed.is_empty());
    store.revoke_session("s-other", now() + 60).await.unwrap();
    let (listed, _) = store.revoked_since(cursor).await.unwrap();
    assert_eq!(sids(&listed), ["s-other"]);
}

pub async fn each_revocation_is_listed_until_its_sessions_last_token_ends(store: Arc<dyn Store>) {
    let (_, start) = store.revoked_since(0).await.unwrap();
    let at = now();
    // Listed as long as the caller says, when the store knows of no later token.
    assert_eq!(
        store.revoke_session("s-token", at + 864_000).await.unwrap(),
        at + 864_000
    );
    // Already over: not listed at all.
    store.revoke_session("s-over", at - 1).await.unwrap();
    // A session whose tokens outlive the one it is revoked with: its login's, then a
    // rotation's, which issued the longest-lived.
    store
        .create_session(&session("s-long", at + 3600), name("long-1"), at + 500)
        .await
        .unwrap();
    store
        .rotate_refresh(name("long-1"), name("long-2"), b"", at + 900, at)
        .await
        .unwrap();
    // A rotation never shortens it.
    store
        .rotate_refresh(name("long-2"), name("long-3"), b"", at + 100, at)
        .await
        .unwrap();
    assert_eq!(
        store.revoke_session("s-long", at + 10).await.unwrap(),
        at + 900
    );

    let (listed, _) = store.revoked_since(start).await.unwrap();
    assert_eq!(
        listed,
        [
            Revoked {
                sid: "s-token".into(),
                until: at + 864_000
            },
            Revoked {
                sid: "s-long".into(),
                until: at + 900
            },
        ]
    );
}

pub async fn a_code_exchange_is_claimed_once(store: Arc<dyn Store>) {
    let code = seal::name("code", b"wx1\0code-1");
    let ttl = Duration::from_secs(60);
    assert_eq!(
        store.claim_exchange(code, ttl).await.unwrap(),
        ExchangeClaim::Mine
    );
    assert_eq!(
        store.claim_exchange(code, ttl).await.unwrap(),
        ExchangeClaim::Theirs
    );
    store.finish_exchange(code, b"outcome", ttl).await.unwrap();
    assert_eq!(
        store.claim_exchange(code, ttl).await.unwrap(),
        ExchangeClaim::Done(b"outcome".to_vec())
    );
    let other = seal::name("code", b"wx1\0code-2");
    let claims = (0..8).map(|_| {
        let store = store.clone();
        tokio::spawn(async move { store.claim_exchange(other, ttl).await.unwrap() })
    });
    let mine = futures_util::future::join_all(claims)
        .await
        .into_iter()
        .filter(|claim| claim.as_ref().unwrap() == &ExchangeClaim::Mine)
        .count();
    assert_eq!(mine, 1);
}

pub async fn ping_answers(store: Arc<dyn Store>) {
    store.ping().await.unwrap();
}

/// Instantiates every check above for one backend; `$open` is an async expression giving a
/// fresh `Arc<dyn Store>`.
macro_rules! suite {
    ($backend:ident, $open:expr) => {
        mod $backend {
            use super::*;

            suite!(@check $open, newest_session_key_wins);
            suite!(@check $open, refresh_tokens_rotate_once);
            suite!(@check $open, concurrent_rotations_let_exactly_one_win);
            suite!(@check $open, expired_sessions_are_unknown);
            suite!(@check $open, revoked_sessions_stop_and_are_listed);
            suite!(@check $open, each_revocation_is_listed_until_its_sessions_last_token_ends);
            suite!(@check $open, a_code_exchange_is_claimed_once);
            suite!(@check $open, ping_answers);
        }
    };
    (@check $open:expr, $name:ident) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $name() {
            let store: Arc<dyn Store> = $open;
            super::$name(store).await;
        }
    };
}

suite!(memory, Arc::new(MemoryStore::default()));

/// A folder for one test's store files, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> TempDir {
        let path =
            std::env::temp_dir().join(format!("wxgate-store-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&path).unwrap();
        TempDir(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A fresh store file. Its folder goes as soon as the store has the file open: the file lives
/// on, unnamed, until the store closes it, so a test leaves nothing behind even when it fails.
fn embedded_store() -> Arc<dyn Store> {
    let dir = TempDir::new();
    Arc::new(EmbeddedStore::open(&dir.0.join("wxgate.redb")).unwrap())
}

suite!(embedded, embedded_store());

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_data_survives_closing_and_reopening() {
    let dir = TempDir::new();
    let path = dir.0.join("wxgate.redb");
    let kept = session("s-kept", now() + 3600);
    let code = seal::name("code", b"wx1\0code-kept");
    let ttl = Duration::from_secs(60);
    let cursor = {
        let store = EmbeddedStore::open(&path).unwrap();
        store
            .put_session_key("wx1", "o-1", &Secret::new("sk-kept"))
            .await
            .unwrap();
        store
            .create_session(&kept, name("kept-1"), access())
            .await
            .unwrap();
        store
            .rotate_refresh(
                name("kept-1"),
                name("kept-2"),
                b"sealed-kept",
                access(),
                now(),
            )
            .await
            .unwrap();
        store
            .create_session(&session("s-gone", now() + 3600), name("gone-1"), access())
            .await
            .unwrap();
        store.revoke_session("s-gone", now() + 60).await.unwrap();
        assert_eq!(
            store.claim_exchange(code, ttl).await.unwrap(),
            ExchangeClaim::Mine
        );
        store.finish_exchange(code, b"outcome", ttl).await.unwrap();
        store.revoked_since(0).await.unwrap().1
    };

    let store = EmbeddedStore::open(&path).unwrap();
    assert_eq!(
        store
            .session_key("wx1", "o-1")
            .await
            .unwrap()
            .unwrap()
            .expose(),
        "sk-kept"
    );
    assert_eq!(
        store.refresh_session(name("kept-2"), now()).await.unwrap(),
        Some(kept.clone())
    );
    match store
        .rotate_refresh(name("kept-1"), name("kept-3"), b"", access(), now())
        .await
        .unwrap()
    {
        Rotation::AlreadyRotated {
            session,
            sealed_successor,
            ..
        } => {
            assert_eq!(session, kept);
            assert_eq!(sealed_successor, b"sealed-kept");
        }
        other => panic!("expected AlreadyRotated, got {other:?}"),
    }
    assert_eq!(
        store.refresh_session(name("gone-1"), now()).await.unwrap(),
        None
    );
    let (listed, listed_cursor) = store.revoked_since(0).await.unwrap();
    assert_eq!((sids(&listed), listed_cursor), (vec!["s-gone"], cursor));
    assert_eq!(
        store.claim_exchange(code, ttl).await.unwrap(),
        ExchangeClaim::Done(b"outcome".to_vec())
    );
    // The cursor goes on from where it was: a replica's cursor never skips a revocation.
    store.revoke_session("s-next", now() + 60).await.unwrap();
    let (listed, next) = store.revoked_since(cursor).await.unwrap();
    assert_eq!(sids(&listed), ["s-next"]);
    assert!(next > cursor);
}

#[tokio::test]
async fn embedded_second_open_of_the_same_file_fails_at_once_and_clearly() {
    let dir = TempDir::new();
    let path = dir.0.join("wxgate.redb");
    let first = EmbeddedStore::open(&path).unwrap();
    let second = tokio::time::timeout(
        Duration::from_secs(10),
        tokio::task::spawn_blocking({
            let path = path.clone();
            move || EmbeddedStore::open(&path).map(drop)
        }),
    )
    .await
    .expect("a second open waited for the first to close instead of failing")
    .unwrap();
    let message = second.unwrap_err().to_string();
    assert!(message.contains("in use by another process"), "{message}");
    assert!(message.contains(&path.display().to_string()), "{message}");
    drop(first);
    EmbeddedStore::open(&path).unwrap();
}

fn redis_store_on(server: &RedisServer, key_prefix: &str) -> RedisStore {
    RedisStore::open(&Secret::new(server.url()), key_prefix).unwrap()
}

/// A redis store and its own server, which lives exactly as long as the store.
struct ServedRedis {
    store: RedisStore,
    _server: RedisServer,
}

async fn redis_store() -> Arc<dyn Store> {
    let server = RedisServer::start().await;
    Arc::new(ServedRedis {
        store: redis_store_on(&server, "wxgate-test:"),
        _server: server,
    })
}

#[async_trait::async_trait]
impl Store for ServedRedis {
    async fn put_session_key(
        &self,
        appid: &str,
        openid: &str,
        session_key: &Secret,
    ) -> Result<(), StoreError> {
        self.store.put_session_key(appid, openid, session_key).await
    }

    async fn session_key(&self, appid: &str, openid: &str) -> Result<Option<Secret>, StoreError> {
        self.store.session_key(appid, openid).await
    }

    async fn create_session(
        &self,
        session: &SessionRecord,
        refresh: Digest,
        access_until: u64,
    ) -> Result<(), StoreError> {
        self.store
            .create_session(session, refresh, access_until)
            .await
    }

    async fn refresh_session(
        &self,
        refresh: Digest,
        now: u64,
    ) -> Result<Option<SessionRecord>, StoreError> {
        self.store.refresh_session(refresh, now).await
    }

    async fn rotate_refresh(
        &self,
        old: Digest,
        new: Digest,
        sealed_successor: &[u8],
        access_until: u64,
        now: u64,
    ) -> Result<Rotation, StoreError> {
        self.store
            .rotate_refresh(old, new, sealed_successor, access_until, now)
            .await
    }

    async fn revoke_session(&self, sid: &str, until: u64) -> Result<u64, StoreError> {
        self.store.revoke_session(sid, until).await
    }

    async fn revoked_since(&self, cursor: u64) -> Result<(Vec<Revoked>, u64), StoreError> {
        self.store.revoked_since(cursor).await
    }

    async fn claim_exchange(
        &self,
        code: Digest,
        ttl: Duration,
    ) -> Result<ExchangeClaim, StoreError> {
        self.store.claim_exchange(code, ttl).await
    }

    async fn finish_exchange(
        &self,
        code: Digest,
        sealed_outcome: &[u8],
        ttl: Duration,
    ) -> Result<(), StoreError> {
        self.store.finish_exchange(code, sealed_outcome, ttl).await
    }

    fn shared(&self) -> bool {
        self.store.shared()
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.store.ping().await
    }
}

suite!(redis, redis_store().await);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_keys_all_carry_the_prefix_and_a_ttl_but_the_revocation_sequence() {
    let server = RedisServer::start().await;
    let store = redis_store_on(&server, "p1:");
    let ttl = Duration::from_secs(60);
    let days = 2 * 24 * 3600;
    store
        .put_session_key("wx1", "o-1", &Secret::new("sk"))
        .await
        .unwrap();
    store
        .create_session(&session("s-1", now() + days), name("t-1"), access())
        .await
        .unwrap();
    store
        .rotate_refresh(name("t-1"), name("t-2"), b"sealed", access(), now())
        .await
        .unwrap();
    store
        .create_session(&session("s-2", now() + 3600), name("u-1"), access())
        .await
        .unwrap();
    store.revoke_session("s-2", now() + 60).await.unwrap();
    let code = seal::name("code", b"wx1\0c");
    store.claim_exchange(code, ttl).await.unwrap();
    store.finish_exchange(code, b"outcome", ttl).await.unwrap();
    store
        .claim_exchange(seal::name("code", b"wx1\0d"), ttl)
        .await
        .unwrap();
    assert!(store.shared());

    let mut client = server.client().await;
    let keys: Vec<String> = ::redis::cmd("KEYS")
        .arg("*")
        .query_async(&mut client)
        .await
        .unwrap();
    assert!(keys.len() >= 10, "{keys:?}");
    for key in keys {
        assert!(key.starts_with("p1:"), "{key} is outside the prefix");
        let ttl: i64 = ::redis::cmd("PTTL")
            .arg(&key)
            .query_async(&mut client)
            .await
            .unwrap();
        // The sequence must not start again while replicas hold cursors into it; it is one
        // key, whatever the number of revocations.
        if key == "p1:revoked:seq" {
            assert_eq!(ttl, -1, "{key} must not expire");
        } else {
            assert!(ttl > 0, "{key} has no TTL ({ttl})");
        }
    }
    // The session_key is kept as long as its user's longest session.
    let ttl: i64 = ::redis::cmd("TTL")
        .arg("p1:sk:3:wx1:o-1")
        .query_async(&mut client)
        .await
        .unwrap();
    assert!(ttl.abs_diff(days as i64) <= 5, "session_key TTL {ttl}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_errors_never_show_the_url_or_its_password() {
    let server = RedisServer::start_with(Some("right-password-123")).await;
    let wrong = format!("redis://:wrong-password-456@127.0.0.1:{}/0", server.port);
    let store = RedisStore::open(&Secret::new(wrong.as_str()), "p:").unwrap();
    let message = store.ping().await.unwrap_err().to_string();
    assert!(!message.contains("wrong-password-456"), "{message}");
    assert!(!message.contains(&wrong), "{message}");
    assert!(message.contains("redis store"), "{message}");

    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let nowhere = format!("redis://:pw-789@127.0.0.1:{closed}/0");
    let store = RedisStore::open(&Secret::new(nowhere.as_str()), "p:").unwrap();
    let message = store.ping().await.unwrap_err().to_string();
    assert!(!message.contains("pw-789"), "{message}");

    let message = RedisStore::open(&Secret::new("redis://:pw-000@[bad"), "p:")
        .err()
        .unwrap()
        .to_string();
    assert!(!message.contains("pw-000"), "{message}");

    let right = redis_store_on(&server, "p:");
    right.ping().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_store_reconnects_and_keeps_listing_revocations_after_a_restart() {
    let mut server = RedisServer::start().await;
    let store = redis_store_on(&server, "p:");
    for sid in ["s-1", "s-2", "s-3"] {
        store.revoke_session(sid, now() + 60).await.unwrap();
    }
    let (_, cursor) = store.revoked_since(0).await.unwrap();

    server.restart().await;
    // The first command may meet the broken connection; the store reconnects on its own.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while store.ping().await.is_err() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the store did not reconnect"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The restarted server has lost the sequence: a cursor from before the restart must hide
    // none of the revocations after it, however many come before a replica next looks.
    let after = ["s-after-1", "s-after-2", "s-after-3", "s-after-4"];
    for sid in after {
        store.revoke_session(sid, now() + 60).await.unwrap();
    }
    let (listed, next) = store.revoked_since(cursor).await.unwrap();
    let mut listed = sids(&listed);
    listed.sort();
    assert_eq!(listed, after);
    let (listed, _) = store.revoked_since(next).await.unwrap();
    assert!(listed.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_times_a_rotation_by_its_own_clock_not_the_replicas() {
    let server = RedisServer::start().await;
    let store = redis_store_on(&server, "p:");
    store
        .create_session(&session("s-skew", now() + 7200), name("skew-1"), access())
        .await
        .unwrap();
    // A replica whose clock is an hour slow rotates the token, and one an hour fast sees the
    // same token again straight after: a client racing itself, whatever the replicas' clocks.
    store
        .rotate_refresh(name("skew-1"), name("skew-2"), b"", access(), now() - 3600)
        .await
        .unwrap();
    match store
        .rotate_refresh(name("skew-1"), name("skew-3"), b"", access(), now() + 3600)
        .await
        .unwrap()
    {
        Rotation::AlreadyRotated { age_secs, .. } => assert!(age_secs <= 1, "{age_secs}"),
        other => panic!("expected AlreadyRotated, got {other:?}"),
    }
}
