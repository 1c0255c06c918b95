//! Two gateways sharing one `redis-server`, as replicas behind a load balancer, and an
//! embedded-store gateway restarted on its file.

mod common;

use std::time::Duration;

use common::{APPID, Harness, RedisServer, Setup};
use wxgate::mock::wechat::MockWechat;

async fn replicas(redis: &RedisServer) -> (Harness, Harness) {
    let store = format!(
        "backend = \"redis\"\nurl = \"{}\"\nkey_prefix = \"replicas:\"",
        redis.url
    );
    let first = Harness::start_with(Setup {
        store: store.clone(),
        ..Setup::default()
    })
    .await;
    let second = Harness::start_with(Setup {
        store,
        wechat_hosts: Some(vec![format!("http://{}", first.mock_addr)]),
        ..Setup::default()
    })
    .await;
    (first, second)
}

/// Polls `probe` until it answers true, for at most `limit`: how long another replica may take
/// to learn of a revocation is the property under test.
async fn within(limit: Duration, mut probe: impl AsyncFnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + limit;
    while tokio::time::Instant::now() < deadline {
        if probe().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_on_one_refresh_on_the_other_logout_reaches_both() {
    let redis = RedisServer::start().await;
    let (a, b) = replicas(&redis).await;
    let login = a.login("yuki").await;
    let (status, refreshed) = b
        .post(
            "/auth/refresh",
            None,
            serde_json::json!({"refresh_token": login["refresh_token"]}),
        )
        .await;
    assert_eq!(status, 200, "{refreshed}");
    let access = refreshed["access_token"].as_str().unwrap().to_string();
    let bearer = format!("Bearer {access}");
    assert_eq!(a.get("/api/x", &[("authorization", &bearer)]).await.0, 200);

    let (status, _) = b
        .post("/auth/logout", Some(&access), serde_json::json!({}))
        .await;
    assert_eq!(status, 204);
    let refused_on_a = within(Duration::from_secs(5), async || {
        a.get("/api/x", &[("authorization", &bearer)]).await.1["error"] == "token_revoked"
    })
    .await;
    assert!(
        refused_on_a,
        "the other replica still accepts a logged-out token after 5 s"
    );
    let (status, body) = a
        .post(
            "/auth/refresh",
            None,
            serde_json::json!({"refresh_token": refreshed["refresh_token"]}),
        )
        .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (401, Some("invalid_refresh_token"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_code_posted_to_both_replicas_at_once_is_exchanged_once() {
    let redis = RedisServer::start().await;
    let (a, b) = replicas(&redis).await;
    let body = serde_json::json!({"code": "zoe"});
    let (on_a, on_b) = tokio::join!(a.login_raw(body.clone()), b.login_raw(body));
    assert_eq!(on_a.0, 200, "{}", on_a.1);
    assert_eq!(on_b.0, 200, "{}", on_b.1);
    assert_eq!(a.mock.code2session_calls(), 1);
    assert_eq!(on_a.1["openid"], MockWechat::openid_for(APPID, "zoe"));
    assert_eq!(on_a.1["openid"], on_b.1["openid"]);
    assert_ne!(on_a.1["refresh_token"], on_b.1["refresh_token"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_embedded_store_keeps_sessions_and_revocations_across_a_restart() {
    let dir =
        std::env::temp_dir().join(format!("wxgate-restart-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    let store = format!(
        "backend = \"embedded\"\npath = \"{}\"",
        dir.join("wxgate.redb").display()
    );
    let setup = || Setup {
        store: store.clone(),
        ..Setup::default()
    };

    let before = Harness::start_with(setup()).await;
    let kept = before.login("ada").await;
    let revoked = before.login("ada-2").await;
    let revoked_access = revoked["access_token"].as_str().unwrap().to_string();
    let (status, _) = before
        .post("/auth/logout", Some(&revoked_access), serde_json::json!({}))
        .await;
    assert_eq!(status, 204);
    before.shutdown().await;

    let after = Harness::start_with(setup()).await;
    let (status, body) = after
        .post(
            "/auth/refresh",
            None,
            serde_json::json!({"refresh_token": kept["refresh_token"]}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = after
        .get(
            "/api/x",
            &[("authorization", &format!("Bearer {revoked_access}"))],
        )
        .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (401, Some("token_revoked"))
    );
    let (status, body) = after
        .post(
            "/auth/refresh",
            None,
            serde_json::json!({"refresh_token": revoked["refresh_token"]}),
        )
        .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (401, Some("invalid_refresh_token"))
    );
    drop(after);
    std::fs::remove_dir_all(&dir).ok();
}
