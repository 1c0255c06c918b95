//! The login hook: claims from the business API reach the token and the upstream (as
//! `claim_headers`), never over the reserved claims, and a client cannot spoof them.

mod common;

use std::time::Duration;

use common::{APPID, Harness, Setup, echoed_header};
use wxgate::mock::wechat::MockWechat;

async fn with_hook(verdict: &str, timeout: &str) -> Harness {
    // The hook is played by the test upstream, which the harness starts before the config is
    // written: the section names it through a placeholder the harness fills in.
    Harness::start_with(Setup {
        sections: format!(
            "[login_hook]\nurl = \"http://{{upstream}}/hook/{verdict}\"\ntimeout = \"{timeout}\"\n\n\
             [identity]\nclaim_headers = {{ uid = \"X-User-Id\", role = \"X-User-Role\" }}\n"
        ),
        ..Setup::default()
    })
    .await
}

#[tokio::test]
async fn hook_claims_reach_the_token_and_the_upstream_but_never_replace_reserved_ones() {
    let gw = with_hook("allow", "2s").await;
    let login = gw.login("hana").await;
    let token = login["access_token"].as_str().unwrap();
    let openid = MockWechat::openid_for(APPID, "hana");

    let (_, me) = gw
        .get("/auth/me", &[("authorization", &format!("Bearer {token}"))])
        .await;
    assert_eq!(me["claims"]["uid"], 42);
    assert_eq!(me["claims"]["seen_openid"], openid.as_str());
    assert_eq!(me["claims"]["sub"], openid.as_str());

    let raw = format!(
        "GET /api/x HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\
         X-User-Id: 1\r\nx_user_id: 2\r\nX-User-Role: root\r\nConnection: X-User-Id\r\n\r\n"
    );
    let (status, echo) = gw.raw(&raw).await;
    assert_eq!(status, 200);
    assert_eq!(echoed_header(&echo, "x-user-id"), ["42"]);
    assert_eq!(echoed_header(&echo, "x-user-role"), ["admin"]);
    assert!(echoed_header(&echo, "x_user_id").is_empty());

    // Claims stay with the session through a refresh.
    let (status, refreshed) = gw
        .post(
            "/auth/refresh",
            None,
            serde_json::json!({"refresh_token": login["refresh_token"]}),
        )
        .await;
    assert_eq!(status, 200);
    let token = refreshed["access_token"].as_str().unwrap();
    let (_, me) = gw
        .get("/auth/me", &[("authorization", &format!("Bearer {token}"))])
        .await;
    assert_eq!(me["claims"]["uid"], 42);
}

#[tokio::test]
async fn a_hook_that_says_no_refuses_the_login() {
    let gw = with_hook("deny", "2s").await;
    let (status, body) = gw.login_raw(serde_json::json!({"code": "ines"})).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (403, Some("login_refused"))
    );
}

#[tokio::test]
async fn a_hook_that_is_down_slow_or_garbled_is_502() {
    for unclear in ["garbage", "claimless"] {
        let garbled = with_hook(unclear, "2s").await;
        let (status, body) = garbled.login_raw(serde_json::json!({"code": "jon"})).await;
        assert_eq!(
            (status, body["error"].as_str()),
            (502, Some("login_hook_unavailable")),
            "{unclear}"
        );
    }

    // A redirect is not a verdict, even towards a hook that would allow the login.
    let redirecting = with_hook("redirect", "2s").await;
    let (status, body) = redirecting
        .login_raw(serde_json::json!({"code": "jon"}))
        .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (502, Some("login_hook_unavailable"))
    );

    // A hook that holds its answer until the test lets it go: the login gives up at the hook's
    // timeout, having reached it.
    let slow = with_hook("held", "200ms").await;
    let login = slow.login_raw(serde_json::json!({"code": "jon"}));
    // The bound only keeps a login that waits on the hook forever from hanging the suite.
    let (status, body) = tokio::time::timeout(Duration::from_secs(30), login)
        .await
        .expect("the login waited on the hook past its timeout");
    assert_eq!(
        (status, body["error"].as_str()),
        (502, Some("login_hook_unavailable"))
    );
    slow.upstream.held_arrived().await;
    slow.upstream.release_held();

    let down = Harness::start_with(Setup {
        sections: format!(
            "[login_hook]\nurl = \"http://{}/hook/allow\"\n",
            common::closed_port_addr()
        ),
        ..Setup::default()
    })
    .await;
    let (status, body) = down.login_raw(serde_json::json!({"code": "kim"})).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (502, Some("login_hook_unavailable"))
    );
}
