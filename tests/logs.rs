//! Runs the real `wxgate serve` binary with `RUST_LOG=trace` through every flow that handles a
//! secret (logins that succeed and fail, phone numbers, open data, refresh, logout, proxied
//! calls), then searches everything it printed for secrets, raw and percent-encoded, and checks
//! the access log and the request ids.

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{APP_SECRET, APPID, JWT_SECRET, Upstream};
use percent_encoding::{NON_ALPHANUMERIC, utf8_percent_encode};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use wxgate::mock::wechat::MockWechat;

/// The gateway as a child process, with every line it prints on stderr.
struct Gateway {
    child: Child,
    lines: mpsc::UnboundedReceiver<String>,
    seen: Vec<String>,
}

impl Gateway {
    fn start(config: &Path) -> Gateway {
        let mut child = Command::new(env!("CARGO_BIN_EXE_wxgate"))
            .args(["--log-format", "json", "serve", "--config"])
            .arg(config)
            .env("RUST_LOG", "trace")
            .env("TEST_APP_SECRET", APP_SECRET)
            .env("TEST_JWT_SECRET", JWT_SECRET)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let (sender, lines) = mpsc::unbounded_channel();
        let stderr = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let _ = sender.send(line.unwrap());
            }
        });
        Gateway {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// Waits for a line containing `text`, keeping every line read on the way.
    async fn line_with(&mut self, text: &str) -> String {
        let wait = async {
            loop {
                let line = self.lines.recv().await.expect("the gateway exited");
                self.seen.push(line.clone());
                if line.contains(text) {
                    return line;
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(60), wait)
            .await
            .unwrap_or_else(|_| panic!("the gateway never logged {text:?}"))
    }

    fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([signal, &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// SIGTERM, then every line up to the exit.
    async fn stop(mut self) -> Vec<String> {
        self.signal("-TERM");
        while let Some(line) = self.lines.recv().await {
            self.seen.push(line);
        }
        let mut child = self.child;
        let exit = tokio::task::spawn_blocking(move || child.wait())
            .await
            .unwrap()
            .unwrap();
        assert!(exit.success(), "wxgate exited with {exit}");
        self.seen
    }
}

fn write_config(path: &Path, hosts: &[String], upstream: &Upstream) {
    let hosts = hosts
        .iter()
        .map(|host| format!("\"{host}\""))
        .collect::<Vec<_>>()
        .join(", ");
    std::fs::write(
        path,
        format!(
            r#"
[server]
listen = "127.0.0.1:0"
admin_listen = ""
[wechat]
hosts = [{hosts}]
timeout = "1s"
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
}

/// A client that sends every request with the request id `id`.
struct Client {
    http: reqwest::Client,
    base: String,
}

impl Client {
    async fn send(
        &self,
        id: &str,
        method: reqwest::Method,
        path: &str,
        bearer: Option<&str>,
        body: Option<Value>,
    ) -> (u16, Value) {
        let mut request = self
            .http
            .request(method, format!("{}{path}", self.base))
            .header("x-request-id", id);
        if let Some(token) = bearer {
            request = request.bearer_auth(token);
        }
        if let Some(body) = body {
            request = request.body(body.to_string());
        }
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        let text = response.text().await.unwrap();
        (status, serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    async fn post(&self, id: &str, path: &str, bearer: Option<&str>, body: Value) -> (u16, Value) {
        self.send(id, reqwest::Method::POST, path, bearer, Some(body))
            .await
    }
}

/// The ways a secret could be written: as is, percent-encoded as a URL query carries it, and
/// form-encoded.
fn spellings(secret: &str) -> Vec<String> {
    vec![
        secret.to_string(),
        utf8_percent_encode(secret, NON_ALPHANUMERIC).to_string(),
        form_urlencoded::byte_serialize(secret.as_bytes()).collect(),
    ]
}

fn request_id(event: &Value) -> Option<&str> {
    event["span"]["request_id"].as_str()
}

/// Lines of the process rather than of a request.
const PROCESS_EVENTS: &[&str] = &[
    "wxgate listening",
    "config reloaded",
    "draining in-flight requests",
    "wxgate stopped",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trace_logs_hold_no_secret_and_tie_every_request_line_to_its_request_id() {
    let mock = MockWechat::new();
    let mock_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mock_addr = mock_listener.local_addr().unwrap();
    tokio::spawn(mock.clone().serve(mock_listener));
    let upstream = Upstream::start().await;
    let unreachable = format!("http://{}", common::closed_port_addr());
    let mock_host = format!("http://{mock_addr}");

    let dir = std::env::temp_dir().join(format!("wxgate-logs-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("config.toml");
    // An unreachable first host: every WeChat call also fails over, and logs that it did.
    write_config(
        &config,
        &[unreachable.clone(), mock_host.clone()],
        &upstream,
    );
    let mut gateway = Gateway::start(&config);
    let listening: Value =
        serde_json::from_str(&gateway.line_with("wxgate listening").await).unwrap();
    let client = Client {
        http: common::http_client(),
        base: format!("http://{}", listening["addr"].as_str().unwrap()),
    };

    let login_code = "secretcode-7";
    let (status, login) = client
        .post(
            "req-login",
            "/auth/login",
            None,
            json!({ "code": login_code }),
        )
        .await;
    assert_eq!(status, 200, "{login}");
    let access_token = login["access_token"].as_str().unwrap().to_string();
    let refresh_token = login["refresh_token"].as_str().unwrap().to_string();
    let openid = login["openid"].as_str().unwrap().to_string();

    for (id, code, status, error) in [
        ("req-login-timeout", "slow", 504, "wechat_timeout"),
        ("req-login-busy", "busy", 503, "wechat_busy"),
        ("req-login-garbage", "garbage", 502, "wechat_unavailable"),
    ] {
        let (got, body) = client
            .post(id, "/auth/login", None, json!({ "code": code }))
            .await;
        assert_eq!(
            (got, body["error"].as_str()),
            (status, Some(error)),
            "{code}"
        );
    }

    let phone_code = "phonesecret-3";
    let (status, body) = client
        .post(
            "req-phone",
            "/auth/phone",
            Some(&access_token),
            json!({ "code": phone_code }),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let wechat_access_token = mock
        .access_token(APPID)
        .expect("a stable token was fetched");

    let sealed: Value = serde_json::from_str(
        &client
            .http
            .post(format!("{mock_host}/mock/encrypt"))
            .body(json!({"appid": APPID, "openid": openid, "data": {"step": 9}}).to_string())
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap(),
    )
    .unwrap();
    let (status, body) = client
        .post("req-decrypt", "/auth/decrypt", Some(&access_token), sealed)
        .await;
    assert_eq!((status, &body["data"]), (200, &json!({"step": 9})));

    let (status, refreshed) = client
        .post(
            "req-refresh",
            "/auth/refresh",
            None,
            json!({ "refresh_token": refresh_token }),
        )
        .await;
    assert_eq!(status, 200, "{refreshed}");
    let new_access_token = refreshed["access_token"].as_str().unwrap().to_string();
    let new_refresh_token = refreshed["refresh_token"].as_str().unwrap().to_string();

    let (status, _) = client
        .send(
            "req-proxy",
            reqwest::Method::GET,
            "/api/orders?page=2",
            Some(&new_access_token),
            None,
        )
        .await;
    assert_eq!(status, 200);
    let (status, _) = client
        .send(
            "req-proxy-refused",
            reqwest::Method::GET,
            "/api/orders",
            Some(&format!("{new_access_token}x")),
            None,
        )
        .await;
    assert_eq!(status, 401);
    let (status, _) = client
        .post(
            "req-logout",
            "/auth/logout",
            Some(&new_access_token),
            json!({}),
        )
        .await;
    assert_eq!(status, 204);

    // WeChat down: no host can be reached.
    write_config(&config, &[unreachable], &upstream);
    gateway.signal("-HUP");
    gateway.line_with("config reloaded").await;
    let down_code = "downcode-9";
    let (status, body) = client
        .post(
            "req-login-down",
            "/auth/login",
            None,
            json!({ "code": down_code }),
        )
        .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (502, Some("wechat_unavailable"))
    );

    let lines = gateway.stop().await;
    std::fs::remove_dir_all(&dir).ok();
    let logs = lines.join("\n");
    assert!(
        logs.contains("\"level\":\"TRACE\""),
        "trace level was not on"
    );
    assert!(
        logs.contains("WeChat request failed"),
        "no failover was logged"
    );

    let session_key = MockWechat::session_key_for(APPID, "secretcode");
    let searched_logs = logs.to_lowercase();
    for (name, secret) in [
        ("app secret", APP_SECRET),
        ("JWT secret", JWT_SECRET),
        ("session_key", session_key.expose()),
        ("login code", login_code),
        ("login code sent while WeChat was down", down_code),
        ("phone code", phone_code),
        ("WeChat access token", &wechat_access_token),
        ("access token", &access_token),
        (
            "access token signature",
            access_token.rsplit('.').next().unwrap(),
        ),
        ("refreshed access token", &new_access_token),
        ("refresh token", &refresh_token),
        ("refreshed refresh token", &new_refresh_token),
    ] {
        for spelling in spellings(secret) {
            assert!(
                !searched_logs.contains(&spelling.to_lowercase()),
                "the logs contain the {name}, as {spelling}"
            );
        }
    }
    for parameter in ["secret=", "js_code", "access_token="] {
        assert!(!logs.contains(parameter), "the logs contain {parameter}");
    }

    let events: Vec<Value> = lines
        .iter()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|_| panic!("not JSON: {line}")))
        .collect();
    let ids = [
        "req-login",
        "req-login-timeout",
        "req-login-busy",
        "req-login-garbage",
        "req-phone",
        "req-decrypt",
        "req-refresh",
        "req-proxy",
        "req-proxy-refused",
        "req-logout",
        "req-login-down",
    ];
    let access: Vec<&Value> = events
        .iter()
        .filter(|event| event["target"] == "wxgate::access")
        .collect();
    for id in ids {
        let lines: Vec<_> = access
            .iter()
            .filter(|event| request_id(event) == Some(id))
            .collect();
        assert_eq!(lines.len(), 1, "one access-log line for {id}: {access:?}");
    }
    let proxied = access
        .iter()
        .find(|event| request_id(event) == Some("req-proxy"))
        .unwrap();
    assert_eq!(proxied["method"], "GET");
    assert_eq!(
        proxied["path"], "/api/orders",
        "the path, without its query"
    );
    assert_eq!(proxied["route"], "/api/");
    assert_eq!(proxied["status"], 200);
    assert!(proxied["duration_us"].is_u64(), "{proxied}");
    let down = access
        .iter()
        .find(|event| request_id(event) == Some("req-login-down"))
        .unwrap();
    assert_eq!(
        (
            &down["method"],
            &down["path"],
            &down["route"],
            &down["status"]
        ),
        (
            &json!("POST"),
            &json!("/auth/login"),
            &json!("auth"),
            &json!(502)
        )
    );

    // The gateway's own lines, but for those of the process, each name the request they
    // were written for.
    let own = events.iter().filter(|event| {
        event["target"]
            .as_str()
            .is_some_and(|target| target.starts_with("wxgate"))
    });
    let mut request_lines = 0;
    for event in own {
        if PROCESS_EVENTS.contains(&event["message"].as_str().unwrap_or_default()) {
            continue;
        }
        let id = request_id(event).unwrap_or_default();
        assert!(ids.contains(&id), "a line without its request id: {event}");
        request_lines += 1;
    }
    assert!(
        request_lines > access.len(),
        "WeChat calls and failures log lines of their own"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_head_refused_unread_has_its_access_log_line_under_the_request_id_it_was_given() {
    let upstream = Upstream::start().await;
    let dir = std::env::temp_dir().join(format!("wxgate-logs-refused-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("config.toml");
    write_config(&config, &["http://127.0.0.1:9".into()], &upstream);
    let mut gateway = Gateway::start(&config);
    let listening: Value =
        serde_json::from_str(&gateway.line_with("wxgate listening").await).unwrap();
    let addr = listening["addr"].as_str().unwrap();
    let too_many: String = (0..101).map(|i| format!("X-H{i}: v\r\n")).collect();
    let heads = [
        (
            "GET /api/x HTTP/1.1\r\nHost: gw\r\nBad Name: 1\r\n\r\n".to_string(),
            400,
        ),
        (
            format!("GET /api/x HTTP/1.1\r\nHost: gw\r\n{too_many}\r\n"),
            431,
        ),
    ];
    for (head, status) in heads {
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        tokio::io::AsyncWriteExt::write_all(&mut stream, head.as_bytes())
            .await
            .unwrap();
        let answer = common::read_until(&mut stream, b"\r\n\r\n").await;
        assert!(
            answer.starts_with(&format!("HTTP/1.1 {status} ")),
            "{answer}"
        );
        let id = answer
            .lines()
            .find_map(|line| line.strip_prefix("x-request-id: "))
            .unwrap_or_else(|| panic!("no request id in {answer}"));
        let access: Value = loop {
            let line = gateway.line_with(id).await;
            if line.contains("wxgate::access") {
                break serde_json::from_str(&line).unwrap();
            }
        };
        assert_eq!(
            (
                &access["method"],
                &access["path"],
                &access["route"],
                &access["status"]
            ),
            (&json!("-"), &json!("-"), &json!("none"), &json!(status)),
            "{access}"
        );
    }
    gateway.stop().await;
}
