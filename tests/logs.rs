//! Runs the real `wxgate serve` binary with `RUST_LOG=trace` through a login and a proxied call,
//! then searches everything it printed for secrets.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use common::{APP_SECRET, APPID, JWT_SECRET, Upstream};
use tokio::net::TcpListener;
use wxgate::mock::wechat::MockWechat;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trace_logs_of_a_login_and_proxy_run_contain_no_secret() {
    let mock = MockWechat::new();
    let mock_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mock_addr = mock_listener.local_addr().unwrap();
    tokio::spawn(mock.clone().serve(mock_listener));
    let upstream = Upstream::start().await;

    let dir = std::env::temp_dir().join(format!("wxgate-logs-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("config.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[server]
listen = "127.0.0.1:0"
admin_listen = ""
[wechat]
hosts = ["http://{mock_addr}"]
[[wechat.apps]]
appid = "{APPID}"
secret = "${{TEST_APP_SECRET}}"
[token]
secret = "${{TEST_JWT_SECRET}}"
[store]
backend = "memory"
[[routes]]
path = "/api/"
upstream = "http://{upstream}"
auth = "required"
"#,
            upstream = upstream.addr
        ),
    )
    .unwrap();

    let mut child = Command::new(env!("CARGO_BIN_EXE_wxgate"))
        .args(["--log-format", "json", "serve", "--config"])
        .arg(&config)
        .env("RUST_LOG", "trace")
        .env("TEST_APP_SECRET", APP_SECRET)
        .env("TEST_JWT_SECRET", JWT_SECRET)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();

    // Every line the gateway prints is kept; the address it listens on is sent back as soon as
    // it is logged.
    let (addr_tx, addr_rx) = mpsc::channel();
    let stderr = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut lines = Vec::new();
        for line in BufReader::new(stderr).lines() {
            let line = line.unwrap();
            if line.contains("wxgate listening") {
                let event: serde_json::Value = serde_json::from_str(&line).unwrap();
                let _ = addr_tx.send(event["addr"].as_str().unwrap().to_string());
            }
            lines.push(line);
        }
        lines.join("\n")
    });
    let addr = tokio::task::spawn_blocking(move || addr_rx.recv_timeout(Duration::from_secs(60)))
        .await
        .unwrap()
        .expect("the gateway never said where it listens");

    let client = common::http_client();
    let code = "secretcode-7";
    let login: serde_json::Value = serde_json::from_str(
        &client
            .post(format!("http://{addr}/auth/login"))
            .body(serde_json::json!({ "code": code }).to_string())
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap(),
    )
    .unwrap();
    let access_token = login["access_token"]
        .as_str()
        .expect("login failed")
        .to_string();
    let refresh_token = login["refresh_token"].as_str().unwrap().to_string();
    let response = client
        .get(format!("http://{addr}/api/orders"))
        .header("authorization", format!("Bearer {access_token}"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    // A failing call too: error paths log differently.
    let response = client
        .get(format!("http://{addr}/api/orders"))
        .header("authorization", format!("Bearer {access_token}x"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 401);

    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let exit = tokio::task::spawn_blocking(move || child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(exit.success(), "wxgate exited with {exit}");
    let logs = reader.join().unwrap();

    assert!(
        logs.contains("wxgate::access"),
        "no access log line was written"
    );
    assert!(
        logs.contains("TRACE") || logs.contains("\"level\":\"TRACE\""),
        "trace level was not on"
    );
    let session_key = MockWechat::session_key_for(APPID, "secretcode");
    for (name, secret) in [
        ("app secret", APP_SECRET),
        ("JWT secret", JWT_SECRET),
        ("session_key", session_key.expose()),
        ("login code", code),
        ("access token", &access_token),
        (
            "access token signature",
            access_token.rsplit('.').next().unwrap(),
        ),
        ("refresh token", &refresh_token),
    ] {
        assert!(!logs.contains(secret), "the logs contain the {name}");
    }
    std::fs::remove_dir_all(&dir).ok();
}
