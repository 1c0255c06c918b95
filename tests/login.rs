//! `POST /auth/login` against the mock WeChat: app rules, WeChat's answers, double-posted codes,
//! WeChat down or slow, and open data.

mod common;

use common::{APPID, Harness, OTHER_APPID, Setup, closed_port_addr};
use sha1::{Digest, Sha1};
use wxgate::mock::wechat::MockWechat;

#[tokio::test]
async fn appid_may_be_left_out_only_with_one_app() {
    let gw = Harness::start().await;
    assert_eq!(gw.login_raw(serde_json::json!({"code": "a1"})).await.0, 200);
    let (status, body) = gw
        .login_raw(serde_json::json!({"code": "a2", "appid": APPID}))
        .await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = gw
        .login_raw(serde_json::json!({"code": "a3", "appid": "wxnotconfigured"}))
        .await;
    assert_eq!((status, body["error"].as_str()), (400, Some("unknown_app")));

    let several = Harness::start_with(Setup {
        extra_apps: true,
        ..Setup::default()
    })
    .await;
    let (status, body) = several.login_raw(serde_json::json!({"code": "b1"})).await;
    assert_eq!((status, body["error"].as_str()), (400, Some("unknown_app")));
    let (status, body) = several
        .login_raw(serde_json::json!({"code": "b2", "appid": OTHER_APPID}))
        .await;
    assert_eq!(status, 200);
    assert_eq!(body["openid"], MockWechat::openid_for(OTHER_APPID, "b2"));
    assert_ne!(body["openid"], MockWechat::openid_for(APPID, "b2"));
}

#[tokio::test]
async fn wechat_errors_map_to_the_spec_codes() {
    let gw = Harness::start().await;
    let cases = [
        ("invalid", 400, "invalid_code", Some(40029)),
        ("risky", 403, "wechat_risky_user", Some(40226)),
        ("limited", 429, "rate_limited", Some(45011)),
        ("busy", 503, "wechat_busy", Some(-1)),
        ("garbage", 502, "wechat_unavailable", None),
    ];
    for (code, status, error, errcode) in cases {
        let response = gw
            .client
            .post(gw.url("/auth/login"))
            .body(serde_json::json!({ "code": code }).to_string())
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), status, "{code}");
        if status == 429 || status == 503 {
            assert!(response.headers().contains_key("retry-after"), "{code}");
        }
        let body: serde_json::Value =
            serde_json::from_str(&response.text().await.unwrap()).unwrap();
        assert_eq!(body["error"], error, "{code}");
        assert_eq!(body["wechat_errcode"].as_i64(), errcode, "{code}");
    }
}

#[tokio::test]
async fn busy_is_retried_twice_then_answered_503() {
    let gw = Harness::start().await;
    let (status, _) = gw.login_raw(serde_json::json!({"code": "busy"})).await;
    assert_eq!(status, 503);
    assert_eq!(gw.mock.code2session_calls(), 3);

    let (status, _) = gw.login_raw(serde_json::json!({"code": "flaky"})).await;
    assert_eq!(status, 200);
    assert_eq!(gw.mock.code2session_calls(), 5);
}

#[tokio::test]
async fn a_used_code_from_another_client_is_invalid_code() {
    let gw = Harness::start().await;
    gw.login("ivan").await;
    // Another gateway (another cache) sending the same code meets WeChat's single use.
    let other = Harness::start_with(Setup {
        wechat_hosts: Some(vec![format!("http://{}", gw.mock_addr)]),
        ..Setup::default()
    })
    .await;
    let (status, body) = other.login_raw(serde_json::json!({"code": "ivan"})).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("invalid_code"))
    );
    assert_eq!(body["wechat_errcode"], 40163);
}

#[tokio::test]
async fn double_posted_code_reaches_wechat_once_sequentially() {
    let gw = Harness::start().await;
    let first = gw.login("judy").await;
    let second = gw.login("judy").await;
    assert_eq!(gw.mock.code2session_calls(), 1);
    assert_eq!(first["openid"], second["openid"]);
    assert_ne!(first["access_token"], second["access_token"]);
    assert_ne!(first["refresh_token"], second["refresh_token"]);
}

#[tokio::test]
async fn double_posted_code_reaches_wechat_once_concurrently() {
    let gw = Harness::start().await;
    let logins = (0..12).map(|_| gw.login_raw(serde_json::json!({"code": "mallory"})));
    let answers = futures_util::future::join_all(logins).await;
    assert_eq!(gw.mock.code2session_calls(), 1);
    let openid = MockWechat::openid_for(APPID, "mallory");
    let mut tokens = std::collections::HashSet::new();
    for (status, body) in answers {
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["openid"], openid);
        tokens.insert(body["access_token"].as_str().unwrap().to_string());
    }
    assert_eq!(tokens.len(), 12, "every caller gets its own session");
}

#[tokio::test]
async fn wechat_down_is_502_and_the_gateway_keeps_serving() {
    let gw = Harness::start_with(Setup {
        wechat_hosts: Some(vec![format!("http://{}", closed_port_addr())]),
        ..Setup::default()
    })
    .await;
    let (status, body) = gw.login_raw(serde_json::json!({"code": "nia"})).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (502, Some("wechat_unavailable"))
    );
    let (status, _) = gw.get("/api/public/x", &[]).await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn unreachable_first_host_fails_over_to_the_next() {
    let mut gw = Harness::start().await;
    let mock_addr = gw.mock_addr;
    gw = Harness::start_with(Setup {
        wechat_hosts: Some(vec![
            format!("http://{}", closed_port_addr()),
            format!("http://{mock_addr}"),
        ]),
        ..Setup::default()
    })
    .await
    .sharing_mock_of(gw);
    let (status, _) = gw.login_raw(serde_json::json!({"code": "olivia"})).await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn wechat_slow_is_504_and_the_code_is_not_resent() {
    let first = Harness::start().await;
    let mock = format!("http://{}", first.mock_addr);
    let gw = Harness::start_with(Setup {
        wechat_hosts: Some(vec![mock.clone(), mock]),
        wechat_timeout: "300ms",
        ..Setup::default()
    })
    .await
    .sharing_mock_of(first);
    let (status, body) = gw.login_raw(serde_json::json!({"code": "slow"})).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (504, Some("wechat_timeout"))
    );
    assert_eq!(gw.mock.code2session_calls(), 1);
    let (status, _) = gw.get("/api/public/x", &[]).await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn malformed_login_bodies_are_400_and_oversized_ones_413() {
    let gw = Harness::start().await;
    for (body, error) in [
        ("{not json", "bad_request"),
        ("{}", "bad_request"),
        (r#"{"code": 12345}"#, "bad_request"),
        (r#"{"code": ""}"#, "bad_request"),
        (r#"{"code": "x", "encryptedData": "abc"}"#, "bad_request"),
    ] {
        let response = gw
            .client
            .post(gw.url("/auth/login"))
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 400, "{body}");
        let answer: serde_json::Value =
            serde_json::from_str(&response.text().await.unwrap()).unwrap();
        assert_eq!(answer["error"], error, "{body}");
        assert!(!answer["message"].as_str().unwrap().contains("12345"));
    }
    let huge = format!(r#"{{"code": "{}"}}"#, "x".repeat(common::MAX_BODY as usize));
    let response = gw
        .client
        .post(gw.url("/auth/login"))
        .body(huge)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 413);
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
async fn open_data_that_no_key_could_open_is_refused_before_the_code_is_spent() {
    let gw = Harness::start().await;
    let malformed = [
        serde_json::json!({"code": "quinn-1", "encryptedData": "not base64!", "iv": "r7BXXKkLb8qrSNn05n0qiA=="}),
        serde_json::json!({"code": "quinn-1", "encryptedData": "AAAA", "iv": "r7BXXKkLb8qrSNn05n0qiA=="}),
        serde_json::json!({"code": "quinn-1", "encryptedData": "", "iv": "r7BXXKkLb8qrSNn05n0qiA=="}),
        serde_json::json!({"code": "quinn-1", "encryptedData": "AAAAAAAAAAAAAAAAAAAAAA==", "iv": "c2hvcnQ="}),
        serde_json::json!({"code": "quinn-1", "encryptedData": "AAAAAAAAAAAAAAAAAAAAAA=="}),
        serde_json::json!({"code": "quinn-1", "rawData": "{}"}),
    ];
    for body in malformed {
        let (status, answer) = gw.login_raw(body.clone()).await;
        assert_eq!(
            (status, answer["error"].as_str()),
            (400, Some("bad_request")),
            "{body}"
        );
    }
    assert_eq!(gw.mock.code2session_calls(), 0);
    // The code is still good: the front end fixes its request and logs in with it.
    let (status, answer) = gw.login_raw(serde_json::json!({"code": "quinn-1"})).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(gw.mock.code2session_calls(), 1);
}

#[tokio::test]
async fn encrypted_user_data_is_decrypted_at_login_and_tampering_is_refused() {
    let gw = Harness::start().await;
    let openid = gw.login("peggy-1").await["openid"]
        .as_str()
        .unwrap()
        .to_string();
    let sealed = mock_encrypt(
        &gw,
        &openid,
        serde_json::json!({"nickName": "Peggy", "gender": 2}),
    )
    .await;

    let (status, body) = gw
        .login_raw(serde_json::json!({
            "code": "peggy-2",
            "encryptedData": sealed["encryptedData"],
            "iv": sealed["iv"],
        }))
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body["user"],
        serde_json::json!({"nickName": "Peggy", "gender": 2})
    );

    let mut tampered = sealed["encryptedData"].as_str().unwrap().to_string();
    let flipped = if tampered.starts_with('A') { "B" } else { "A" };
    tampered.replace_range(0..1, flipped);
    let (status, body) = gw
        .login_raw(
            serde_json::json!({"code": "peggy-3", "encryptedData": tampered, "iv": sealed["iv"]}),
        )
        .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("invalid_encrypted_data"))
    );
}

#[tokio::test]
async fn official_open_data_sample_decrypts_at_login() {
    // WeChat's published sample belongs to this appid and session_key.
    let sample_appid = "wx4f4bc4dec97d474b";
    let gw = Harness::start_with(Setup {
        sample_app: Some(sample_appid),
        ..Setup::default()
    })
    .await;
    gw.mock
        .pin_session_key(sample_appid, "band", "tiihtNczf5v6AKRyjwEUhQ==");
    let (status, body) = gw
        .login_raw(serde_json::json!({
            "code": "band",
            "appid": sample_appid,
            "encryptedData": common::OFFICIAL_SAMPLE_ENCRYPTED_DATA,
            "iv": "r7BXXKkLb8qrSNn05n0qiA==",
        }))
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["user"]["nickName"], "Band");
    assert!(body["user"].get("watermark").is_none());
}

#[tokio::test]
async fn raw_data_signature_is_checked() {
    let gw = Harness::start().await;
    let raw_data = r#"{"nickName":"Quinn"}"#;
    let session_key = MockWechat::session_key_for(APPID, "quinn");
    let signature = hex::encode(Sha1::digest(format!("{raw_data}{}", session_key.expose())));
    let (status, body) = gw
        .login_raw(
            serde_json::json!({"code": "quinn-1", "rawData": raw_data, "signature": signature}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = gw
        .login_raw(serde_json::json!({"code": "quinn-2", "rawData": raw_data, "signature": "0".repeat(40)}))
        .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("invalid_signature"))
    );
}

#[tokio::test]
async fn logins_past_the_per_ip_limit_get_429_and_proxied_routes_are_not_limited() {
    let gw = Harness::start_with(Setup {
        sections: "[rate_limit]\nlogin_per_ip_per_minute = 5\n".into(),
        ..Setup::default()
    })
    .await;
    for attempt in 0..5 {
        // Failed attempts count too.
        let code = if attempt % 2 == 0 {
            format!("rita-{attempt}")
        } else {
            "invalid".into()
        };
        let (status, _) = gw.login_raw(serde_json::json!({ "code": code })).await;
        assert_ne!(status, 429, "attempt {attempt}");
    }
    let response = gw
        .client
        .post(gw.url("/auth/login"))
        .body(r#"{"code": "rita-9"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 429);
    let retry_after: u64 = response.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(retry_after >= 1);
    let body: serde_json::Value = serde_json::from_str(&response.text().await.unwrap()).unwrap();
    assert_eq!(body["error"], "rate_limited");
    assert!(body.get("wechat_errcode").is_none());
    for _ in 0..20 {
        let (status, _) = gw.get("/api/public/x", &[]).await;
        assert_eq!(status, 200);
    }
}
