//! One suite, every backend: each `suite!` instance runs the same checks against a fresh store.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use wxgate::config::Secret;
use wxgate::store::{
    Digest, EmbeddedStore, ExchangeClaim, MemoryStore, RedisStore, Rotation, SessionRecord, Store,
    StoreError, seal,
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

pub async fn refresh_tokens_rotate_once(store: Arc<dyn Store>) {
    let record = session("s1", now() + 3600);
    store.create_session(&record, name("r1")).await.unwrap();
    assert_eq!(
        store.refresh_session(name("r1"), now()).await.unwrap(),
        Some(record.clone())
    );
    assert_eq!(
        store.refresh_session(name("nope"), now()).await.unwrap(),
        None
    );

    let rotation = store
        .rotate_refresh(name("r1"), name("r2"), b"sealed-2", now())
        .await
        .unwrap();
    assert_eq!(rotation, Rotation::Rotated(record.clone()));
    // The old token now reports its rotation and what was sealed with it.
    match store
        .rotate_refresh(name("r1"), name("r3"), b"sealed-3", now())
        .await
        .unwrap()
    {
        Rotation::AlreadyRotated {
            session,
            rotated_at,
            sealed_successor,
        } => {
            assert_eq!(session, record);
            assert!(rotated_at.abs_diff(now()) <= 1);
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
            .rotate_refresh(name("r2"), name("r4"), b"sealed-4", now())
            .await
            .unwrap(),
        Rotation::Rotated(record)
    );
    assert_eq!(
        store
            .rotate_refresh(name("unknown"), name("r5"), b"", now())
            .await
            .unwrap(),
        Rotation::Unknown
    );
}

pub async fn concurrent_rotations_let_exactly_one_win(store: Arc<dyn Store>) {
    store
        .create_session(&session("s-race", now() + 3600), name("race"))
        .await
        .unwrap();
    let attempts = (0..8).map(|i| {
        let store = store.clone();
        tokio::spawn(async move {
            store
                .rotate_refresh(name("race"), name(&format!("race-{i}")), b"x", now())
                .await
                .unwrap()
        })
    });
    let outcomes = futures_util::future::join_all(attempts).await;
    let winners = outcomes
        .into_iter()
        .filter(|outcome| matches!(outcome.as_ref().unwrap(), Rotation::Rotated(_)))
        .count();
    assert_eq!(winners, 1);
}

pub async fn expired_sessions_are_unknown(store: Arc<dyn Store>) {
    store
        .create_session(&session("s-old", now() - 1), name("old"))
        .await
        .unwrap();
    assert_eq!(
        store.refresh_session(name("old"), now()).await.unwrap(),
        None
    );
    assert_eq!(
        store
            .rotate_refresh(name("old"), name("old-2"), b"", now())
            .await
            .unwrap(),
        Rotation::Unknown
    );
}

pub async fn revoked_sessions_stop_and_are_listed(store: Arc<dyn Store>) {
    let (_, start) = store.revoked_since(0).await.unwrap();
    store
        .create_session(&session("s-rev", now() + 3600), name("rev-1"))
        .await
        .unwrap();
    store
        .rotate_refresh(name("rev-1"), name("rev-2"), b"", now())
        .await
        .unwrap();
    store
        .revoke_session("s-rev", Duration::from_secs(60))
        .await
        .unwrap();
    for token in ["rev-1", "rev-2"] {
        assert_eq!(
            store.refresh_session(name(token), now()).await.unwrap(),
            None
        );
        assert_eq!(
            store
                .rotate_refresh(name(token), name("rev-3"), b"", now())
                .await
                .unwrap(),
            Rotation::Unknown
        );
    }
    let (sids, cursor) = store.revoked_since(start).await.unwrap();
    assert_eq!(sids, ["s-rev"]);
    let (sids, _) = store.revoked_since(cursor).await.unwrap();
    assert!(sids.is_empty());
    store
        .revoke_session("s-other", Duration::from_secs(60))
        .await
        .unwrap();
    let (sids, _) = store.revoked_since(cursor).await.unwrap();
    assert_eq!(sids, ["s-other"]);
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
        store.create_session(&kept, name("kept-1")).await.unwrap();
        store
            .rotate_refresh(name("kept-1"), name("kept-2"), b"sealed-kept", now())
            .await
            .unwrap();
        store
            .create_session(&session("s-gone", now() + 3600), name("gone-1"))
            .await
            .unwrap();
        store.revoke_session("s-gone", ttl).await.unwrap();
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
        .rotate_refresh(name("kept-1"), name("kept-3"), b"", now())
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
    assert_eq!(
        store.revoked_since(0).await.unwrap(),
        (vec!["s-gone".to_string()], cursor)
    );
    assert_eq!(
        store.claim_exchange(code, ttl).await.unwrap(),
        ExchangeClaim::Done(b"outcome".to_vec())
    );
    // The cursor goes on from where it was: a replica's cursor never skips a revocation.
    store.revoke_session("s-next", ttl).await.unwrap();
    let (sids, next) = store.revoked_since(cursor).await.unwrap();
    assert_eq!(sids, ["s-next"]);
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

/// A `redis-server` of the test's own, on a free port, without persistence; killed when
/// dropped.
struct RedisServer {
    port: u16,
    password: Option<&'static str>,
    child: Child,
}

impl RedisServer {
    async fn start() -> RedisServer {
        RedisServer::start_with(None).await
    }

    async fn start_with(password: Option<&'static str>) -> RedisServer {
        // The port can be taken between finding it free and redis binding it; redis then
        // exits, and another port is tried.
        for _ in 0..5 {
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            let mut server = RedisServer {
                port,
                password,
                child: RedisServer::spawn(port, password),
            };
            if server.answers().await {
                return server;
            }
        }
        panic!("redis-server did not start (five ports tried)");
    }

    fn spawn(port: u16, password: Option<&str>) -> Child {
        let port = port.to_string();
        let mut args = vec![
            "--port",
            &port,
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ];
        if let Some(password) = password {
            args.extend(["--requirepass", password]);
        }
        match Command::new("redis-server")
            .args(args)
            .stdout(Stdio::null())
            .spawn()
        {
            Ok(child) => child,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => panic!(
                "redis-server is not installed, and the redis store tests need it: \
                 apt-get install redis-server (.ci/run installs it)"
            ),
            Err(err) => panic!("cannot start redis-server: {err}"),
        }
    }

    /// Polls with PING until redis answers; false when the process exits first (its port was
    /// taken) or after 10 s.
    async fn answers(&mut self) -> bool {
        let client = ::redis::Client::open(self.url()).unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while tokio::time::Instant::now() < deadline {
            if self.child.try_wait().unwrap().is_some() {
                return false;
            }
            if let Ok(mut connection) = client.get_multiplexed_async_connection().await
                && ::redis::cmd("PING")
                    .query_async::<String>(&mut connection)
                    .await
                    .is_ok()
            {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        false
    }

    /// Stops the server and starts an empty one on the same port: a redis restart without
    /// persistence.
    async fn restart(&mut self) {
        self.stop();
        self.child = RedisServer::spawn(self.port, self.password);
        assert!(self.answers().await, "redis-server did not restart");
    }

    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    fn url(&self) -> String {
        match self.password {
            Some(password) => format!("redis://:{password}@127.0.0.1:{}/0", self.port),
            None => format!("redis://127.0.0.1:{}/0", self.port),
        }
    }

    fn store(&self, key_prefix: &str) -> RedisStore {
        RedisStore::open(&Secret::new(self.url()), key_prefix).unwrap()
    }

    async fn client(&self) -> ::redis::aio::MultiplexedConnection {
        ::redis::Client::open(self.url())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A redis store and its own server, which lives exactly as long as the store.
struct ServedRedis {
    store: RedisStore,
    _server: RedisServer,
}

async fn redis_store() -> Arc<dyn Store> {
    let server = RedisServer::start().await;
    Arc::new(ServedRedis {
        store: server.store("wxgate-test:"),
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
    ) -> Result<(), StoreError> {
        self.store.create_session(session, refresh).await
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
        now: u64,
    ) -> Result<Rotation, StoreError> {
        self.store
            .rotate_refresh(old, new, sealed_successor, now)
            .await
    }

    async fn revoke_session(&self, sid: &str, listed_for: Duration) -> Result<(), StoreError> {
        self.store.revoke_session(sid, listed_for).await
    }

    async fn revoked_since(&self, cursor: u64) -> Result<(Vec<String>, u64), StoreError> {
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
async fn redis_keys_all_carry_the_prefix_and_a_ttl() {
    let server = RedisServer::start().await;
    let store = server.store("p1:");
    let ttl = Duration::from_secs(60);
    let days = 2 * 24 * 3600;
    store
        .put_session_key("wx1", "o-1", &Secret::new("sk"))
        .await
        .unwrap();
    store
        .create_session(&session("s-1", now() + days), name("t-1"))
        .await
        .unwrap();
    store
        .rotate_refresh(name("t-1"), name("t-2"), b"sealed", now())
        .await
        .unwrap();
    store
        .create_session(&session("s-2", now() + 3600), name("u-1"))
        .await
        .unwrap();
    store.revoke_session("s-2", ttl).await.unwrap();
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
    assert!(keys.len() >= 8, "{keys:?}");
    for key in keys {
        assert!(key.starts_with("p1:"), "{key} is outside the prefix");
        let ttl: i64 = ::redis::cmd("PTTL")
            .arg(&key)
            .query_async(&mut client)
            .await
            .unwrap();
        assert!(ttl > 0, "{key} has no TTL ({ttl})");
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

    let right = server.store("p:");
    right.ping().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_store_reconnects_and_keeps_listing_revocations_after_a_restart() {
    let mut server = RedisServer::start().await;
    let store = server.store("p:");
    let ttl = Duration::from_secs(60);
    for sid in ["s-1", "s-2", "s-3"] {
        store.revoke_session(sid, ttl).await.unwrap();
    }
    let (_, cursor) = store.revoked_since(0).await.unwrap();
    assert_eq!(cursor, 3);

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
    // The restarted server counts revocations from 1 again: a cursor from before the restart
    // must not hide them.
    store.revoke_session("s-after", ttl).await.unwrap();
    let (sids, next) = store.revoked_since(cursor).await.unwrap();
    assert_eq!(sids, ["s-after"]);
    let (sids, _) = store.revoked_since(next).await.unwrap();
    assert!(sids.is_empty());
}
