//! Open data and phone numbers: `/auth/decrypt` with the stored session_key, `rawData`
//! signatures, `/auth/phone` with cached stable access tokens.

mod common;

use std::time::Duration;

use common::{APPID, Harness, Setup};
use wxgate::mock::wechat::MockWechat;
use wxgate::wechat::crypto::encrypt_open_data;

/// A bearer token for `openid`, who never logged in: no session_key is stored for it.
fn token_without_login(gw: &Harness, openid: &str) -> String {
    gw.state
        .load()
        .keys
        .issue(
            &wxgate::token::Subject {
                appid: APPID,
                openid,
                unionid: None,
                sid: &format!("s-{openid}"),
            },
            Default::default(),
        )
        .unwrap()
        .0
}

fn base64_of(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// Waits until `done` holds, checking each millisecond: for a state that has no signal of its
/// own (a gauge).
async fn until(done: impl Fn() -> bool) {
    tokio::time::timeout(Duration::from_secs(30), async {
        while !done() {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    })
    .await
    .expect("the awaited state never came");
}

async fn mock_encrypt(gw: &Harness, openid: &str, data: serde_json::Value) -> serde_json::Value {
    let answer = gw
        .client
        .post(format!("http://{}/mock/encrypt", gw.mock_addr))
        .body(serde_json::json!({"appid": APPID, "openid": openid, "data": data}).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 200);
    serde_json::from_str(&answer.text().await.unwrap()).unwrap()
}

#[tokio::test]
async fn official_signature_sample_passes_at_login() {
    let gw = Harness::start().await;
    gw.mock
        .pin_session_key(APPID, "sig", "HyVFkGl5F5OQWJZZaNzBBg==");
    let raw_data = r#"{"nickName":"Band","gender":1,"language":"zh_CN","city":"Guangzhou","province":"Guangdong","country":"CN","avatarUrl":"http://wx.qlogo.cn/mmopen/vi_32/1vZvI39NWFQ9XM4LtQpFrQJ1xlgZxx3w7bQxKARol6503Iuswjjn6nIGBiaycAjAtpujxyzYsrztuuICqIM5ibXQ/0"}"#;
    let (status, body) = gw
        .login_raw(serde_json::json!({
            "code": "sig-1",
            "rawData": raw_data,
            "signature": "75e81ceda165f4ffa64f4068af58c64b8f54b88c",
        }))
        .await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = gw
        .login_raw(serde_json::json!({
            "code": "sig-2",
            "rawData": raw_data.replace("Band", "Bond"),
            "signature": "75e81ceda165f4ffa64f4068af58c64b8f54b88c",
        }))
        .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("invalid_signature"))
    );
}

#[tokio::test]
async fn decrypt_uses_the_newest_session_key_and_a_rotated_one_is_409() {
    let gw = Harness::start().await;
    gw.mock
        .pin_session_key(APPID, "rosa", "AAAAAAAAAAAAAAAAAAAAAA==");
    let first = gw.login("rosa-1").await;
    let openid = first["openid"].as_str().unwrap().to_string();
    let token = first["access_token"].as_str().unwrap().to_string();
    let old = mock_encrypt(
        &gw,
        &openid,
        serde_json::json!({"stepInfoList": [{"step": 42}]}),
    )
    .await;

    let (status, body) = gw.post("/auth/decrypt", Some(&token), old.clone()).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body["data"],
        serde_json::json!({"stepInfoList": [{"step": 42}]})
    );

    // WeChat rotates the key at a later login; the gateway keeps only the newest.
    gw.mock
        .pin_session_key(APPID, "rosa", "BBBBBBBBBBBBBBBBBBBBBA==");
    let second = gw.login("rosa-2").await;
    let token = second["access_token"].as_str().unwrap().to_string();
    let (status, body) = gw.post("/auth/decrypt", Some(&token), old).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (409, Some("session_key_stale")),
        "{body}"
    );

    let new = mock_encrypt(&gw, &openid, serde_json::json!({"step": 7})).await;
    let (status, body) = gw.post("/auth/decrypt", Some(&token), new).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["data"], serde_json::json!({"step": 7}));
    assert!(!body.to_string().contains("BBBBBBBBBBBBBBBBBBBBBA=="));
}

#[tokio::test]
async fn decrypt_refuses_a_foreign_watermark_and_malformed_input() {
    let gw = Harness::start().await;
    let token = gw.token("sam").await;
    let session_key = MockWechat::session_key_for(APPID, "sam");
    let foreign = serde_json::json!({"nickName": "Sam", "watermark": {"appid": "wxsomeoneelse", "timestamp": 1}});
    let (encrypted_data, iv) =
        encrypt_open_data(&session_key, foreign.to_string().as_bytes()).unwrap();
    let (status, body) = gw
        .post(
            "/auth/decrypt",
            Some(&token),
            serde_json::json!({"encryptedData": encrypted_data, "iv": iv}),
        )
        .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("invalid_encrypted_data"))
    );

    for bad in [
        serde_json::json!({"encryptedData": "not base64!", "iv": iv}),
        serde_json::json!({"encryptedData": encrypted_data, "iv": "AAAA"}),
        serde_json::json!({"encryptedData": encrypted_data}),
    ] {
        let (status, body) = gw.post("/auth/decrypt", Some(&token), bad.clone()).await;
        assert_eq!(
            (status, body["error"].as_str()),
            (400, Some("bad_request")),
            "{bad}"
        );
    }
    let (status, body) = gw
        .post(
            "/auth/decrypt",
            None,
            serde_json::json!({"encryptedData": encrypted_data, "iv": iv}),
        )
        .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (401, Some("missing_token"))
    );
}

#[tokio::test]
async fn decrypt_checks_the_input_before_looking_for_a_session_key() {
    let gw = Harness::start().await;
    let never_logged_in = token_without_login(&gw, "o-nobody");
    let logged_in = gw.token("wanda").await;
    let iv = "r7BXXKkLb8qrSNn05n0qiA==";
    let blocks = |n: usize| base64_of(&vec![7u8; n]);
    let malformed = [
        serde_json::json!({"encryptedData": "not base64!", "iv": iv}),
        serde_json::json!({"encryptedData": blocks(32), "iv": "AAAA"}),
        serde_json::json!({"encryptedData": blocks(32), "iv": base64_of(&[1u8; 17])}),
        serde_json::json!({"encryptedData": blocks(32), "iv": "r7BXXKkLb8qrSNn05n0qiA"}),
        serde_json::json!({"encryptedData": "", "iv": iv}),
        serde_json::json!({"encryptedData": blocks(15), "iv": iv}),
        serde_json::json!({"encryptedData": blocks(33), "iv": iv}),
    ];
    for token in [&never_logged_in, &logged_in] {
        for bad in &malformed {
            let (status, body) = gw.post("/auth/decrypt", Some(token), bad.clone()).await;
            assert_eq!(
                (status, body["error"].as_str()),
                (400, Some("bad_request")),
                "{bad}: {body}"
            );
        }
    }
    // Well-formed: only now does a missing key matter.
    let (status, body) = gw
        .post(
            "/auth/decrypt",
            Some(&never_logged_in),
            serde_json::json!({"encryptedData": blocks(32), "iv": iv}),
        )
        .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (409, Some("session_key_stale")),
        "{body}"
    );
}

#[tokio::test]
async fn concurrent_phone_calls_fetch_one_access_token() {
    let gw = Harness::start().await;
    let token = gw.token("tina").await;
    // The first stable-token request is held until all 16 calls are inside the gateway, so
    // every one of them finds no token cached.
    gw.mock.hold_stable_tokens();
    let calls = futures_util::future::join_all((0..16).map(|i| {
        gw.post(
            "/auth/phone",
            Some(&token),
            serde_json::json!({ "code": format!("phone-{i}") }),
        )
    }));
    let release = async {
        let metrics = gw.state.load().services.metrics.clone();
        until(|| metrics.in_flight.get() == 16 && gw.mock.stable_token_calls() >= 1).await;
        gw.mock.release_stable_tokens();
    };
    let (answers, ()) = tokio::join!(calls, release);
    for (status, body) in answers {
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["pure_phone_number"], MockWechat::phone_for("phone"));
        assert_eq!(body["country_code"], "86");
    }
    assert_eq!(gw.mock.stable_token_calls(), 1);
    assert_eq!(gw.mock.forced_refreshes(), 0);
}

#[tokio::test]
async fn a_dead_access_token_is_replaced_once_without_force_refresh() {
    let gw = Harness::start().await;
    let token = gw.token("uma").await;
    let (status, _) = gw
        .post(
            "/auth/phone",
            Some(&token),
            serde_json::json!({"code": "p-1"}),
        )
        .await;
    assert_eq!(status, 200);
    gw.mock.kill_access_token(APPID);
    let (status, body) = gw
        .post(
            "/auth/phone",
            Some(&token),
            serde_json::json!({"code": "p-2"}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(gw.mock.stable_token_calls(), 2);
    assert_eq!(gw.mock.forced_refreshes(), 0);
    assert_eq!(
        gw.mock.phone_calls(),
        3,
        "one call with the dead token, one retry, one before"
    );
}

#[tokio::test]
async fn an_expired_access_token_is_replaced_once_without_force_refresh() {
    let gw = Harness::start().await;
    let token = gw.token("ursula").await;
    let phone = |code: &'static str| {
        gw.post(
            "/auth/phone",
            Some(&token),
            serde_json::json!({ "code": code }),
        )
    };
    assert_eq!(phone("e-1").await.0, 200);
    // Through the mock's own endpoint, as a front-end team's script would.
    let expired = gw
        .client
        .post(format!("http://{}/mock/expire_token", gw.mock_addr))
        .body(serde_json::json!({ "appid": APPID }).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(expired.status(), 200);
    let (status, body) = phone("e-2").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["pure_phone_number"], MockWechat::phone_for("e"));
    assert_eq!(gw.mock.stable_token_calls(), 2);
    assert_eq!(gw.mock.phone_calls(), 3);
    assert_eq!(gw.mock.forced_refreshes(), 0);
    // The new token is kept: the next call fetches none.
    assert_eq!(phone("e-3").await.0, 200);
    assert_eq!(gw.mock.stable_token_calls(), 2);
}

#[tokio::test]
async fn a_refused_phone_code_is_invalid_code() {
    let gw = Harness::start().await;
    let token = gw.token("vera").await;
    let (status, body) = gw
        .post(
            "/auth/phone",
            Some(&token),
            serde_json::json!({"code": "invalid"}),
        )
        .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("invalid_code"))
    );
    let (status, _) = gw
        .post(
            "/auth/phone",
            Some(&token),
            serde_json::json!({"code": "once"}),
        )
        .await;
    assert_eq!(status, 200);
    let (status, body) = gw
        .post(
            "/auth/phone",
            Some(&token),
            serde_json::json!({"code": "once"}),
        )
        .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("invalid_code"))
    );
    assert_eq!(gw.mock.forced_refreshes(), 0);
}

#[tokio::test]
async fn a_5xx_host_is_skipped_for_the_stable_token_but_never_for_a_code() {
    let first = Harness::start().await;
    let failing_host = format!("http://{}/status/503", first.upstream.addr);
    let gw = Harness::start_with(Setup {
        wechat_hosts: Some(vec![failing_host, format!("http://{}", first.mock_addr)]),
        ..Setup::default()
    })
    .await
    .sharing_mock_of(first);

    // A login code may have been used by the host that failed: it is not sent on.
    let (status, body) = gw.login_raw(serde_json::json!({"code": "xena"})).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (502, Some("wechat_unavailable"))
    );
    assert_eq!(gw.mock.code2session_calls(), 0);

    // The stable token is safe to ask for again: it comes from the second host. The phone
    // code that follows is single-use like the login code, so the failing host ends it too.
    let token = token_without_login(&gw, "o-xena");
    let (status, body) = gw
        .post(
            "/auth/phone",
            Some(&token),
            serde_json::json!({"code": "x-1"}),
        )
        .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (502, Some("wechat_unavailable"))
    );
    assert_eq!(gw.mock.stable_token_calls(), 1);
    assert_eq!(gw.mock.phone_calls(), 0);
    assert_eq!(gw.mock.forced_refreshes(), 0);
}
