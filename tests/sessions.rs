//! Refresh-token rotation, the race window, reuse detection and logout: how long a revocation
//! lasts, and what it ends (an open WebSocket among them).

mod common;

use std::time::Duration;

use common::{Harness, OTHER_APPID, Setup, assert_echoed, greeting};
use tokio::io::{AsyncReadExt, BufReader};
use tokio::net::TcpStream;
use wxgate::auth::refresh_name;
use wxgate::store::{Revoked, Rotation};
use wxgate::token::MintRequest;

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
            refresh_name(&stolen),
            refresh_name("successor-held-by-the-client"),
            b"",
            a_minute_ago + 7200,
            a_minute_ago,
        )
        .await
        .unwrap();
    assert_eq!(rotation, Rotation::Rotated);

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

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

#[tokio::test]
async fn a_revocation_lasts_as_long_as_the_token_whatever_the_ttl_at_start() {
    // Started with tokens of a second, reloaded to a minute: a revocation must last as long
    // as the tokens issued now, not as those of the config the gateway started with.
    let gw = Harness::start_with(Setup {
        access_ttl: "1s",
        leeway: "0s",
        ..Setup::default()
    })
    .await;
    gw.reload(Setup {
        access_ttl: "60s",
        leeway: "0s",
        ..Setup::default()
    });
    let access = field(&gw.login("ursa").await, "access_token").to_string();
    let (status, _) = gw
        .post("/auth/logout", Some(&access), serde_json::json!({}))
        .await;
    assert_eq!(status, 204);
    let refused = async || {
        gw.get("/api/x", &[("authorization", &bearer(&access))])
            .await
            .1["error"]
            == "token_revoked"
    };
    assert!(refused().await);
    // Past the end of a revocation sized by the config at start; nothing but time can show it.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert!(refused().await, "a logged-out token was accepted again");
}

#[tokio::test]
async fn a_logged_out_token_stays_refused_when_a_reload_raises_the_leeway() {
    let gw = Harness::start_with(Setup {
        access_ttl: "1s",
        leeway: "0s",
        ..Setup::default()
    })
    .await;
    let access = field(&gw.login("uma").await, "access_token").to_string();
    let (status, _) = gw
        .post("/auth/logout", Some(&access), serde_json::json!({}))
        .await;
    assert_eq!(status, 204);
    let refusal = async || {
        gw.get("/api/x", &[("authorization", &bearer(&access))])
            .await
            .1["error"]
            .as_str()
            .map(str::to_string)
    };
    // The gateway's own verdict says when the token has expired; the bound only keeps a
    // token that never expires from hanging the suite.
    tokio::time::timeout(Duration::from_secs(30), async {
        while refusal().await.as_deref() != Some("token_expired") {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("the one-second token never expired");

    // A minute of leeway puts the expired token back in its window: its revocation must still
    // be listed.
    gw.reload(Setup {
        access_ttl: "1s",
        leeway: "60s",
        ..Setup::default()
    });
    assert_eq!(refusal().await.as_deref(), Some("token_revoked"));
    let (status, body) = gw
        .get("/auth/me", &[("authorization", &bearer(&access))])
        .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (401, Some("token_revoked"))
    );
}

#[tokio::test]
async fn a_long_lived_token_is_listed_as_revoked_until_its_own_exp() {
    // What `wxgate token --ttl 10d` mints, logged out with.
    let gw = Harness::start().await;
    let ttl = Duration::from_secs(10 * 24 * 3600);
    let state = gw.state.load_full();
    let token = wxgate::token::mint(
        &state.config,
        &MintRequest {
            openid: "o-operator",
            appid: None,
            ttl: Some(ttl),
        },
    )
    .unwrap();
    let claims = state.keys.verify(&token).unwrap();
    let (status, _) = gw
        .post("/auth/logout", Some(&token), serde_json::json!({}))
        .await;
    assert_eq!(status, 204);
    let (listed, _) = state.services.store.revoked_since(0).await.unwrap();
    assert_eq!(
        listed,
        [Revoked {
            sid: claims.sid,
            // Past the harness's leeway, 5 s, to the most any reload could give it.
            until: claims.exp + wxgate::config::MAX_LEEWAY.as_secs(),
        }]
    );
}

#[tokio::test]
async fn refresh_of_an_app_a_reload_removed_is_refused() {
    let gw = Harness::start_with(Setup {
        extra_apps: true,
        ..Setup::default()
    })
    .await;
    let (status, login) = gw
        .login_raw(serde_json::json!({"code": "vera", "appid": OTHER_APPID}))
        .await;
    assert_eq!(status, 200, "{login}");
    gw.reload(Setup::default());
    let (status, body) = refresh(&gw, field(&login, "refresh_token")).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (401, Some("invalid_refresh_token"))
    );
}

#[tokio::test]
async fn a_refresh_body_that_never_arrives_is_answered_400() {
    let gw = Harness::start_with(Setup {
        server_extra: "header_timeout = \"300ms\"".into(),
        ..Setup::default()
    })
    .await;
    // One byte of the hundred announced, then nothing.
    let stalled = gw.raw(
        "POST /auth/refresh HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
         Content-Length: 100\r\n\r\n{",
    );
    // The bound only keeps a gateway that waits forever from hanging the suite.
    let (status, body) = tokio::time::timeout(Duration::from_secs(30), stalled)
        .await
        .expect("the gateway is still waiting for the body");
    assert_eq!((status, body["error"].as_str()), (400, Some("bad_request")));
    assert_eq!(body["message"], "the request body did not arrive in time");
    assert_eq!(gw.get("/api/public/x", &[]).await.0, 200);
}

/// Opens a WebSocket through the gateway with `token`; answers the open stream after the 101.
async fn websocket(gw: &Harness, path: &str, token: &str) -> BufReader<TcpStream> {
    let authorization = format!("Bearer {token}");
    let (status, reader) =
        common::websocket(gw.addr, path, &[("Authorization", &authorization)]).await;
    assert_eq!(status, 101);
    reader
}

#[tokio::test]
async fn logout_closes_the_sessions_websocket() {
    let gw = Harness::start().await;
    let token = gw.token("wes").await;
    let other = gw.token("wes-2").await;
    let mut stream = websocket(&gw, "/api/ws", &token).await;
    let mut untouched = websocket(&gw, "/api/ws", &other).await;
    for open in [&mut stream, &mut untouched] {
        greeting(open).await;
        assert_echoed(open, b"ping").await;
    }

    let (status, _) = gw
        .post("/auth/logout", Some(&token), serde_json::json!({}))
        .await;
    assert_eq!(status, 204);
    // The gateway ends the tunnel: reading reaches its end. The bound only keeps a tunnel that
    // stays open from hanging the suite.
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut rest))
        .await
        .expect("the WebSocket outlived its session's logout")
        .unwrap();
    // Another session's stays open.
    assert_echoed(&mut untouched, b"pong").await;
}
