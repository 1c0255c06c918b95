//! Two gateways sharing one `redis-server`, as replicas behind a load balancer; an
//! embedded-store gateway restarted on its file, and one killed; and what each store holds.

mod common;

use std::time::Duration;

use common::{
    APPID, GatewayProcess, Harness, RedisServer, Setup, TempDir, Upstream, embedded_config,
    http_client,
};
use wxgate::mock::wechat::MockWechat;

async fn replicas(redis: &RedisServer) -> (Harness, Harness) {
    let store = format!(
        "backend = \"redis\"\nurl = \"{}\"\nkey_prefix = \"replicas:\"",
        redis.url()
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
async fn a_logout_the_store_failed_to_take_still_reaches_the_other_replica_once_it_is_back() {
    let mut redis = RedisServer::start().await;
    let (a, b) = replicas(&redis).await;
    let login = a.login("uli").await;
    let bearer = format!("Bearer {}", login["access_token"].as_str().unwrap());
    assert_eq!(b.get("/api/x", &[("authorization", &bearer)]).await.0, 200);

    redis.stop();
    let (status, body) = b
        .post(
            "/auth/logout",
            login["access_token"].as_str(),
            serde_json::json!({}),
        )
        .await;
    assert_eq!((status, body["error"].as_str()), (500, Some("internal")));
    // Ended here at once all the same; a retry is refused as already revoked.
    let (_, body) = b.get("/api/x", &[("authorization", &bearer)]).await;
    assert_eq!(body["error"], "token_revoked");

    // Back, and empty: the replica that took the logout sends it again.
    redis.start_again().await;
    let refused_on_a = within(Duration::from_secs(10), async || {
        a.get("/api/x", &[("authorization", &bearer)]).await.1["error"] == "token_revoked"
    })
    .await;
    assert!(
        refused_on_a,
        "the other replica never learned of a logout the store failed to take"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_code_whose_claimant_died_with_it_at_wechat_is_never_sent_again() {
    let redis = RedisServer::start().await;
    let mock = MockWechat::new();
    let mock_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mock_addr = mock_listener.local_addr().unwrap();
    tokio::spawn(mock.clone().serve(mock_listener));
    let upstream = Upstream::start().await;
    let dir = TempDir::new("claimant");
    let setup = Setup {
        store: format!("backend = \"redis\"\nurl = \"{}\"", redis.url()),
        wechat_timeout: "1s",
        ..Setup::default()
    };
    let config = dir.path().join("config.toml");
    std::fs::write(
        &config,
        common::config_text(&setup, mock_addr, upstream.addr),
    )
    .unwrap();
    let claimant = GatewayProcess::start(&config).await;
    let other = GatewayProcess::start(&config).await;

    // `slow`: WeChat holds its answer. The claimant dies with the code at WeChat.
    let url = claimant.url("/auth/login");
    // Its client hears nothing back once the claimant dies: the answer is not waited for.
    let posted = http_client()
        .post(url)
        .header("content-type", "application/json")
        .body(r#"{"code": "slow"}"#)
        .send();
    tokio::spawn(posted);
    let at_wechat = within(Duration::from_secs(10), async || {
        mock.code2session_calls() == 1
    })
    .await;
    assert!(at_wechat, "the code never reached WeChat");
    claimant.kill();

    // Once the dead claimant's claim runs out, the code is still not sent again: WeChat may
    // have taken it.
    let (status, body) = post_to(
        &other,
        "/auth/login",
        None,
        serde_json::json!({"code": "slow"}),
    )
    .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (504, Some("wechat_timeout"))
    );
    assert_eq!(mock.code2session_calls(), 1);
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

/// POSTs a JSON `body` to the process: (status, JSON body or null).
async fn post_to(
    gw: &GatewayProcess,
    path: &str,
    token: Option<&str>,
    body: serde_json::Value,
) -> (u16, serde_json::Value) {
    common::post_json(&http_client(), gw.url(path), token, body).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_embedded_store_keeps_what_it_acknowledged_through_a_crash() {
    let mock = MockWechat::new();
    let mock_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mock_addr = mock_listener.local_addr().unwrap();
    tokio::spawn(mock.serve(mock_listener));
    let upstream = Upstream::start().await;
    let dir = TempDir::new("crash");
    let config = dir.path().join("config.toml");
    let store = dir.path().join("wxgate.redb");
    std::fs::write(&config, embedded_config(&store, mock_addr, upstream.addr)).unwrap();

    let gw = GatewayProcess::start(&config).await;
    let (status, kept) =
        post_to(&gw, "/auth/login", None, serde_json::json!({"code": "ida"})).await;
    assert_eq!(status, 200, "{kept}");
    let (status, kept) = post_to(
        &gw,
        "/auth/refresh",
        None,
        serde_json::json!({"refresh_token": kept["refresh_token"]}),
    )
    .await;
    assert_eq!(status, 200, "{kept}");
    let (status, revoked) = post_to(
        &gw,
        "/auth/login",
        None,
        serde_json::json!({"code": "ida-2"}),
    )
    .await;
    assert_eq!(status, 200, "{revoked}");
    let revoked_access = revoked["access_token"].as_str().unwrap();
    let (status, _) = post_to(
        &gw,
        "/auth/logout",
        Some(revoked_access),
        serde_json::json!({}),
    )
    .await;
    assert_eq!(status, 204);
    // No shutdown, no flush: what was answered must already be on disk.
    gw.kill();

    let gw = GatewayProcess::start(&config).await;
    let (status, body) = post_to(
        &gw,
        "/auth/refresh",
        None,
        serde_json::json!({"refresh_token": kept["refresh_token"]}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let response = http_client()
        .get(gw.url("/api/x"))
        .bearer_auth(revoked_access)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 401);
    let body: serde_json::Value = serde_json::from_str(&response.text().await.unwrap()).unwrap();
    assert_eq!(body["error"], "token_revoked");
    let (status, body) = post_to(
        &gw,
        "/auth/refresh",
        None,
        serde_json::json!({"refresh_token": revoked["refresh_token"]}),
    )
    .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (401, Some("invalid_refresh_token"))
    );
}

/// Logs in and refreshes once (so that a rotated token and its sealed successor are stored):
/// the secrets the store must not hold as they are, and the session_key it must keep.
async fn secrets_after_a_login(gw: &Harness, code: &str) -> (Vec<String>, String) {
    let login = gw.login(code).await;
    let (status, refreshed) = gw
        .post(
            "/auth/refresh",
            None,
            serde_json::json!({"refresh_token": login["refresh_token"]}),
        )
        .await;
    assert_eq!(status, 200, "{refreshed}");
    let secrets = [&login, &refreshed]
        .iter()
        .flat_map(|answer| [&answer["refresh_token"], &answer["access_token"]])
        .map(|token| token.as_str().unwrap().to_string())
        .chain([code.to_string()])
        .collect();
    let session_key = MockWechat::session_key_for(APPID, code)
        .expose()
        .to_string();
    (secrets, session_key)
}

fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack
        .windows(needle.len())
        .any(|window| window == needle.as_bytes())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_embedded_file_holds_no_token_or_code_as_it_is() {
    let dir = TempDir::new("at-rest");
    let path = dir.path().join("wxgate.redb");
    let gw = Harness::start_with(Setup {
        store: format!("backend = \"embedded\"\npath = \"{}\"", path.display()),
        ..Setup::default()
    })
    .await;
    let (secrets, session_key) = secrets_after_a_login(&gw, "hashcheck-9f3e1c7a").await;
    let file = std::fs::read(&path).unwrap();
    // The check can see what is in the file: the session_key is kept there, for decrypt.
    assert!(contains(&file, &session_key));
    for secret in &secrets {
        assert!(!contains(&file, secret), "the store file holds {secret}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_holds_no_token_or_code_as_it_is_and_the_session_key_once() {
    let redis = RedisServer::start().await;
    let gw = Harness::start_with(Setup {
        store: format!(
            "backend = \"redis\"\nurl = \"{}\"\nkey_prefix = \"at-rest:\"",
            redis.url()
        ),
        ..Setup::default()
    })
    .await;
    let code = "hashcheck-2b8d4e6f";
    let (secrets, session_key) = secrets_after_a_login(&gw, code).await;

    let mut client = redis.client().await;
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("*")
        .query_async(&mut client)
        .await
        .unwrap();
    let mut holding_the_session_key = Vec::new();
    for key in keys {
        let kind: String = redis::cmd("TYPE")
            .arg(&key)
            .query_async(&mut client)
            .await
            .unwrap();
        let parts: Vec<Vec<u8>> = match kind.as_str() {
            "string" => vec![
                redis::cmd("GET")
                    .arg(&key)
                    .query_async(&mut client)
                    .await
                    .unwrap(),
            ],
            "hash" => redis::cmd("HGETALL")
                .arg(&key)
                .query_async(&mut client)
                .await
                .unwrap(),
            "zset" => redis::cmd("ZRANGE")
                .arg(&key)
                .arg(0)
                .arg(-1)
                .arg("WITHSCORES")
                .query_async(&mut client)
                .await
                .unwrap(),
            other => panic!("{key} is a {other}, which this check does not read"),
        };
        let value = parts.concat();
        for secret in &secrets {
            assert!(!contains(&value, secret), "{key} holds {secret}");
        }
        assert!(!contains(key.as_bytes(), &session_key), "{key}");
        if contains(&value, &session_key) {
            holding_the_session_key.push(key);
        }
    }
    let openid = MockWechat::openid_for(APPID, code);
    assert_eq!(
        holding_the_session_key,
        [format!("at-rest:sk:{}:{APPID}:{openid}", APPID.len())]
    );
}
