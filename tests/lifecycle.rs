//! The `wxgate serve` process as an operator runs it: metrics on the admin listener only,
//! SIGHUP reloads (a bad file refused), SIGTERM draining an in-flight request.

mod common;

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{APP_SECRET, APPID, JWT_SECRET, Upstream, http_client};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use wxgate::mock::wechat::MockWechat;

/// A running `wxgate serve`, its log lines readable as they come.
struct Process {
    child: Child,
    lines: mpsc::UnboundedReceiver<serde_json::Value>,
    config: PathBuf,
    addr: String,
    admin: String,
}

impl Process {
    async fn start(config_text: &str) -> Process {
        let dir = std::env::temp_dir().join(format!(
            "wxgate-lifecycle-{}-{}",
            std::process::id(),
            uuid::Uuid::new_v4().simple()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let config = dir.join("config.toml");
        std::fs::write(&config, config_text).unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_wxgate"))
            .args(["--log-format", "json", "serve", "--config"])
            .arg(&config)
            .env("RUST_LOG", "info")
            // One worker, as a sidecar pinned to a core runs: the current-thread scheduler
            // (tests/logs.rs runs the multi-thread one).
            .env("TOKIO_WORKER_THREADS", "1")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let (sender, lines) = mpsc::unbounded_channel();
        let stderr = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Ok(event) = serde_json::from_str(&line) {
                    let _ = sender.send(event);
                }
            }
        });
        let mut process = Process {
            child,
            lines,
            config,
            addr: String::new(),
            admin: String::new(),
        };
        process.addr = process.wait_for("wxgate listening").await["addr"]
            .as_str()
            .unwrap()
            .to_string();
        process.admin = process.wait_for("admin listening").await["addr"]
            .as_str()
            .unwrap()
            .to_string();
        process
    }

    /// The next log line whose message contains `message`.
    async fn wait_for(&mut self, message: &str) -> serde_json::Value {
        let wanted = async {
            while let Some(event) = self.lines.recv().await {
                if event["message"]
                    .as_str()
                    .is_some_and(|m| m.contains(message))
                {
                    return event;
                }
            }
            panic!("wxgate exited before logging {message:?}");
        };
        tokio::time::timeout(Duration::from_secs(60), wanted)
            .await
            .unwrap_or_else(|_| panic!("wxgate never logged {message:?}"))
    }

    fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .args([&format!("-{name}"), &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(dir) = self.config.parent() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

fn config(
    mock: std::net::SocketAddr,
    upstream: std::net::SocketAddr,
    extra_routes: &str,
) -> String {
    format!(
        r#"
[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
shutdown_grace = "30s"
[wechat]
hosts = ["http://{mock}"]
[[wechat.apps]]
appid = "{APPID}"
secret = "{APP_SECRET}"
[token]
secret = "{JWT_SECRET}"
[store]
backend = "memory"
[[routes]]
path = "/api/"
upstream = "http://{upstream}"
auth = "required"
[[routes]]
path = "/api/public/"
upstream = "http://{upstream}"
auth = "public"
{extra_routes}
"#
    )
}

async fn world() -> (std::net::SocketAddr, Upstream) {
    let mock = MockWechat::new();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mock_addr = listener.local_addr().unwrap();
    tokio::spawn(mock.serve(listener));
    (mock_addr, Upstream::start().await)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_traffic_on_the_admin_listener_only() {
    let (mock, upstream) = world().await;
    let gw = Process::start(&config(mock, upstream.addr, "")).await;
    let client = http_client();
    let login: serde_json::Value = serde_json::from_str(
        &client
            .post(gw.url("/auth/login"))
            .body(r#"{"code": "mia"}"#)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap(),
    )
    .unwrap();
    let token = login["access_token"].as_str().unwrap();
    for _ in 0..3 {
        let response = client
            .get(gw.url("/api/x"))
            .bearer_auth(token)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
    }
    let refused = client
        .get(gw.url("/api/x"))
        .bearer_auth("garbage")
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 401);

    let metrics = client
        .get(format!("http://{}/metrics", gw.admin))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for line in [
        "wxgate_requests_total{route=\"/api/\",status=\"200\"} 3",
        "wxgate_requests_total{route=\"/api/\",status=\"401\"} 1",
        "wxgate_requests_total{route=\"auth\",status=\"200\"} 1",
        &format!("wxgate_logins_total{{appid=\"{APPID}\",result=\"ok\"}} 1"),
        "wxgate_wechat_requests_total{api=\"code2session\",result=\"ok\"} 1",
        "wxgate_token_verifications_total{result=\"ok\"} 3",
        "wxgate_token_verifications_total{result=\"invalid_token\"} 1",
        "wxgate_request_duration_seconds_count{route=\"/api/\"} 4",
        "wxgate_upstream_duration_seconds_count{route=\"/api/\"} 3",
        "wxgate_in_flight_requests",
    ] {
        assert!(metrics.contains(line), "{line} missing from:\n{metrics}");
    }
    for path in ["/healthz", "/readyz"] {
        let response = client
            .get(format!("http://{}{path}", gw.admin))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "{path}");
    }
    for path in ["/metrics", "/healthz", "/readyz"] {
        let response = client.get(gw.url(path)).send().await.unwrap();
        assert_eq!(response.status(), 404, "{path} must not be public");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_adds_a_route_and_a_bad_file_is_refused() {
    let (mock, upstream) = world().await;
    let mut gw = Process::start(&config(mock, upstream.addr, "")).await;
    let client = http_client();
    assert_eq!(
        client
            .get(gw.url("/extra/x"))
            .send()
            .await
            .unwrap()
            .status(),
        404
    );

    let added = format!(
        "[[routes]]\npath = \"/extra/\"\nupstream = \"http://{}\"\nauth = \"public\"\n",
        upstream.addr
    );
    std::fs::write(&gw.config, config(mock, upstream.addr, &added)).unwrap();
    gw.signal("HUP");
    gw.wait_for("config reloaded").await;
    assert_eq!(
        client
            .get(gw.url("/extra/x"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );

    std::fs::write(
        &gw.config,
        "[server]\nlisten = 42\n[[routes]]\npath = \"nope\"",
    )
    .unwrap();
    gw.signal("HUP");
    let refused = gw.wait_for("config reload refused").await;
    assert!(
        refused["problems"]
            .as_str()
            .unwrap()
            .contains("routes[0].path")
    );
    assert_eq!(
        client
            .get(gw.url("/extra/x"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(
        client
            .get(gw.url("/api/public/x"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    let metrics = client
        .get(format!("http://{}/metrics", gw.admin))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("wxgate_config_reloads_total{result=\"ok\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("wxgate_config_reloads_total{result=\"error\"} 1"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_the_request_in_flight_then_exits_0() {
    let (mock, upstream) = world().await;
    let mut gw = Process::start(&config(mock, upstream.addr, "")).await;
    let client = http_client();
    let in_flight = tokio::spawn(client.get(gw.url("/api/public/held")).send());
    upstream.held_arrived().await;

    gw.signal("TERM");
    gw.wait_for("draining in-flight requests").await;
    upstream.release_held();
    let response = in_flight.await.unwrap().unwrap();
    assert_eq!(response.status(), 200);

    gw.wait_for("wxgate stopped").await;
    let exit = tokio::task::spawn_blocking(move || {
        let status = gw.child.wait().unwrap();
        drop(gw);
        status
    })
    .await
    .unwrap();
    assert!(exit.success(), "wxgate exited with {exit}");
}

#[tokio::test]
async fn check_validates_beside_a_running_gateway_that_holds_the_embedded_store() {
    let (mock, upstream) = world().await;
    let text = config(mock, upstream.addr, "").replace(
        "backend = \"memory\"",
        "backend = \"embedded\"\npath = \"wxgate.redb\"",
    );
    let gateway = Process::start(&text).await;

    let output = Command::new(env!("CARGO_BIN_EXE_wxgate"))
        .args(["check", "--config"])
        .arg(&gateway.config)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("/api/public/"), "{stdout}");

    std::fs::write(
        &gateway.config,
        text.replace("auth = \"public\"", "auth = \"open\""),
    )
    .unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_wxgate"))
        .args(["check", "--config"])
        .arg(&gateway.config)
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("routes[1].auth"), "{stderr}");
}
