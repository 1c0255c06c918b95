//! Refresh-token rotation, the race window, reuse detection and logout.

mod common;

use common::Harness;
use wxgate::store::{Rotation, seal};

async fn refresh(gw: &Harness, token: &str) -> (u16, serde_json::Value) {
    gw.post(
        "/auth/refresh",
        None,
        serde_json::json!({ "refresh_token": token }),
    )
    .await
}

fn field<'a>(body: &'a serde_json::Value, name: &str) -> &'a str {
    body[name]
        .as_str()
        .unwrap_or_else(|| panic!("no {name} in {body}"))
}

#[tokio::test]
async fn refresh_rotates_and_a_racing_client_gets_the_same_successor() {
    let gw = Harness::start().await;
    let login = gw.login("alma").await;
    let first = field(&login, "refresh_token").to_string();

    let (status, next) = refresh(&gw, &first).await;
    assert_eq!(status, 200, "{next}");
    let second = field(&next, "refresh_token").to_string();
    assert_ne!(second, first);
    assert_eq!(next["openid"], login["openid"]);
    assert_eq!(next["token_type"], "Bearer");
    let access = field(&next, "access_token");
    assert_eq!(
        gw.get("/api/x", &[("authorization", &format!("Bearer {access}"))])
            .await
            .0,
        200
    );

    // The same rotated token again, within the race window: the very same pair.
    let (status, again) = refresh(&gw, &first).await;
    assert_eq!(status, 200, "{again}");
    assert_eq!(again, next);

    let (status, third) = refresh(&gw, &second).await;
    assert_eq!(status, 200, "{third}");
    assert_ne!(field(&third, "refresh_token"), second);
}

#[tokio::test]
async fn a_rotated_token_presented_after_the_window_revokes_the_session() {
    let gw = Harness::start().await;
    let login = gw.login("bea").await;
    let stolen = field(&login, "refresh_token").to_string();
    let access = field(&login, "access_token").to_string();
    // Rotate it as the legitimate client did a minute ago.
    let store = gw.state.load().services.store.clone();
    let a_minute_ago = wxgate::token::unix_now() - 60;
    let rotation = store
        .rotate_refresh(
            seal::name("refresh", stolen.as_bytes()),
            seal::name("refresh", b"successor-held-by-the-client"),
            b"",
            a_minute_ago,
        )
        .await
        .unwrap();
    assert!(matches!(rotation, Rotation::Rotated(_)));

    let (status, body) = refresh(&gw, &stolen).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (401, Some("refresh_token_reused"))
    );
    // The whole session is gone: its access tokens and its current refresh token.
    let (status, body) = gw
        .get("/api/x", &[("authorization", &format!("Bearer {access}"))])
        .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (401, Some("token_revoked"))
    );
    let (status, body) = refresh(&gw, "successor-held-by-the-client").await;
    assert_eq!(
        (status, body["error"].as_str()),
        (401, Some("invalid_refresh_token"))
    );
}

#[tokio::test]
async fn logout_stops_the_access_token_and_the_refresh_token() {
    let gw = Harness::start().await;
    let login = gw.login("cleo").await;
    let access = field(&login, "access_token").to_string();
    let refresh_token = field(&login, "refresh_token").to_string();
    let other = gw.login("cleo-2").await;

    let (status, _) = gw
        .post("/auth/logout", Some(&access), serde_json::json!({}))
        .await;
    assert_eq!(status, 204);
    let (status, body) = gw
        .get("/api/x", &[("authorization", &format!("Bearer {access}"))])
        .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (401, Some("token_revoked"))
    );
    let (status, body) = gw
        .get(
            "/auth/me",
            &[("authorization", &format!("Bearer {access}"))],
        )
        .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (401, Some("token_revoked"))
    );
    let (status, body) = refresh(&gw, &refresh_token).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (401, Some("invalid_refresh_token"))
    );

    // Another session of the same user is untouched.
    let other_access = field(&other, "access_token");
    assert_eq!(
        gw.get(
            "/api/x",
            &[("authorization", &format!("Bearer {other_access}"))]
        )
        .await
        .0,
        200
    );
}

#[tokio::test]
async fn unknown_and_malformed_refresh_tokens_are_refused() {
    let gw = Harness::start().await;
    let (status, body) = refresh(&gw, "never-issued").await;
    assert_eq!(
        (status, body["error"].as_str()),
        (401, Some("invalid_refresh_token"))
    );
    let (status, body) = gw.post("/auth/refresh", None, serde_json::json!({})).await;
    assert_eq!((status, body["error"].as_str()), (400, Some("bad_request")));
    let (status, body) = gw.post("/auth/logout", None, serde_json::json!({})).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (401, Some("missing_token"))
    );
}
