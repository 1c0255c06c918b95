//! Open data and phone numbers: `/auth/decrypt` with the stored session_key, `rawData`
//! signatures, `/auth/phone` with cached stable access tokens.

mod common;

use common::{APPID, Harness, Setup};
use wxgate::mock::wechat::MockWechat;
use wxgate::wechat::crypto::encrypt_open_data;

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
async fn concurrent_phone_calls_fetch_one_access_token() {
    let gw = Harness::start().await;
    let token = gw.token("tina").await;
    let calls = (0..16).map(|i| {
        gw.post(
            "/auth/phone",
            Some(&token),
            serde_json::json!({ "code": format!("phone-{i}") }),
        )
    });
    let answers = futures_util::future::join_all(calls).await;
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
    let (token, _) = gw
        .state
        .load()
        .keys
        .issue(
            &wxgate::token::Subject {
                appid: APPID,
                openid: "o-xena",
                unionid: None,
                sid: "s-xena",
            },
            Default::default(),
        )
        .unwrap();
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
}
