//! One suite, every backend: each `suite!` instance runs the same checks against a fresh store.

use std::sync::Arc;
use std::time::Duration;

use wxgate::config::Secret;
use wxgate::store::{ExchangeClaim, MemoryStore, Rotation, SessionRecord, Store, seal};

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
