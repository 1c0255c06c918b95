//! A login code's one exchange with WeChat, whatever becomes of the callers waiting for it;
//! where the session_key WeChat gave ends up; the login rate limit across reloads; and how
//! refused attempts are counted.

mod common;

use std::time::Duration;

use common::{APPID, Harness, HeldWechat, Setup};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use wxgate::mock::wechat::MockWechat;

/// session_keys WeChat might rotate a user to: 16 bytes in base64.
const ROTATED_KEY: &str = "MDEyMzQ1Njc4OWFiY2RlZg==";
const ROTATED_AGAIN: &str = "ZmVkY2JhOTg3NjU0MzIxMA==";

async fn stored_session_key(gw: &Harness, code: &str) -> String {
    let openid = MockWechat::openid_for(APPID, code);
    let store = gw.state.load().services.store.clone();
    store
        .session_key(APPID, &openid)
        .await
        .unwrap()
        .expect("no session_key stored")
        .expose()
        .to_string()
}

#[tokio::test]
async fn a_client_that_hangs_up_mid_exchange_leaves_the_exchange_to_its_retry() {
    let wechat = HeldWechat::start().await;
    let gw = Harness::start_with(Setup {
        wechat_hosts: Some(vec![format!("http://{}", wechat.addr)]),
        ..Setup::default()
    })
    .await;

    // The first attempt hangs up once its code is with WeChat, before WeChat answers.
    let mut first = TcpStream::connect(gw.addr).await.unwrap();
    let body = r#"{"code": "quinn"}"#;
    let request = format!(
        "POST /auth/login HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    );
    first.write_all(request.as_bytes()).await.unwrap();
    wechat.arrived(1).await;
    first.shutdown().await.unwrap();
    // The gateway has given up on that request once it closes the connection.
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), first.read_to_end(&mut rest))
        .await
        .expect("the gateway kept the hung-up connection open")
        .unwrap();
    assert!(rest.is_empty(), "{}", String::from_utf8_lossy(&rest));

    // The client retries with the same code, and WeChat answers the one exchange.
    let (retry, ()) = tokio::join!(gw.login_raw(serde_json::json!({"code": "quinn"})), async {
        wechat.release()
    });
    assert_eq!(retry.0, 200, "{}", retry.1);
    assert_eq!(retry.1["openid"], MockWechat::openid_for(APPID, "quinn"));
    assert_eq!(wechat.calls(), 1);
}

#[tokio::test]
async fn a_failed_exchange_whose_code_may_have_reached_wechat_is_not_resent() {
    let gw = Harness::start_with(Setup {
        wechat_timeout: "300ms",
        ..Setup::default()
    })
    .await;
    // No answer in time, and an answer that is not JSON: either way the code reached WeChat.
    for (code, error) in [
        ("slow", "wechat_timeout"),
        ("garbage", "wechat_unavailable"),
    ] {
        let calls = gw.mock.code2session_calls();
        for _ in 0..2 {
            let (_, body) = gw.login_raw(serde_json::json!({ "code": code })).await;
            assert_eq!(body["error"], error, "{code}: {body}");
        }
        assert_eq!(gw.mock.code2session_calls(), calls + 1, "{code}");
    }
    // WeChat busy did not use the code: a retry is sent (three calls each: two are retries).
    for _ in 0..2 {
        let (_, body) = gw.login_raw(serde_json::json!({"code": "busy"})).await;
        assert_eq!(body["error"], "wechat_busy");
    }
    assert_eq!(gw.mock.code2session_calls(), 2 + 2 * 3);
}

#[tokio::test]
async fn a_login_refused_after_the_exchange_still_keeps_the_rotated_session_key() {
    let gw = Harness::start().await;
    gw.login("rhea").await;
    let iv = "AAAAAAAAAAAAAAAAAAAAAA==";
    for (rejected, error, rotated) in [
        (
            serde_json::json!({"code": "rhea-2", "rawData": "{}", "signature": "00"}),
            "invalid_signature",
            ROTATED_KEY,
        ),
        (
            serde_json::json!({"code": "rhea-3", "encryptedData": iv, "iv": iv}),
            "invalid_encrypted_data",
            ROTATED_AGAIN,
        ),
    ] {
        // WeChat rotates the user's key as it answers this login's code.
        gw.mock.pin_session_key(APPID, "rhea", rotated);
        let (status, body) = gw.login_raw(rejected).await;
        assert_eq!((status, body["error"].as_str()), (400, Some(error)));
        assert_eq!(stored_session_key(&gw, "rhea").await, rotated, "{error}");
    }
}

#[tokio::test]
async fn a_replayed_older_code_never_overwrites_a_newer_session_key() {
    let gw = Harness::start().await;
    gw.login("sol").await;
    let original = MockWechat::session_key_for(APPID, "sol");
    assert_eq!(stored_session_key(&gw, "sol").await, original.expose());

    gw.mock.pin_session_key(APPID, "sol", ROTATED_KEY);
    gw.login("sol-2").await;
    assert_eq!(stored_session_key(&gw, "sol").await, ROTATED_KEY);

    // The first code again, within its five minutes: its exchange is remembered, with the key
    // WeChat has since replaced.
    gw.login("sol").await;
    assert_eq!(gw.mock.code2session_calls(), 2);
    assert_eq!(stored_session_key(&gw, "sol").await, ROTATED_KEY);
}

fn limited(per_minute: u32) -> Setup {
    Setup {
        sections: format!("[rate_limit]\nlogin_per_ip_per_minute = {per_minute}\n"),
        ..Setup::default()
    }
}

#[tokio::test]
async fn a_reload_keeps_the_login_buckets_unless_the_limit_changes() {
    let gw = Harness::start_with(limited(1)).await;
    gw.login("tia").await;
    let (status, body) = gw.login_raw(serde_json::json!({"code": "tia-2"})).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (429, Some("rate_limited"))
    );

    gw.reload(limited(1));
    let (status, body) = gw.login_raw(serde_json::json!({"code": "tia-3"})).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (429, Some("rate_limited")),
        "a reload emptied the buckets"
    );

    // A new limit starts afresh.
    gw.reload(limited(2));
    let (status, body) = gw.login_raw(serde_json::json!({"code": "tia-4"})).await;
    assert_eq!(status, 200, "{body}");
}

#[tokio::test]
async fn attempts_refused_before_their_app_is_known_are_counted_as_unknown() {
    let gw = Harness::start_with(Setup {
        extra_apps: true,
        ..Setup::default()
    })
    .await;
    for body in [
        serde_json::json!({"code": "uma"}),
        serde_json::json!({"code": "uma", "appid": "wx-not-configured"}),
    ] {
        let (status, answer) = gw.login_raw(body).await;
        assert_eq!(
            (status, answer["error"].as_str()),
            (400, Some("unknown_app"))
        );
    }
    let metrics = gw.state.load().services.metrics.encode();
    assert!(
        metrics.contains("wxgate_logins_total{appid=\"unknown\",result=\"unknown_app\"} 2"),
        "{metrics}"
    );
    assert!(!metrics.contains("appid=\"\""), "{metrics}");
    assert!(!metrics.contains("wx-not-configured"), "{metrics}");
}
