//! The `wxgate serve` process as an operator runs it: metrics on the admin listener only,
//! SIGHUP reloads (a bad file refused, settings that need a restart named), SIGTERM draining
//! in-flight requests and upgraded connections, requests abandoned by their clients, tunnels
//! closed when their token expires.

mod common;

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

use common::{
    APP_SECRET, APPID, BodySeen, JWT_SECRET, RedisServer, Upstream, assert_echoed, greeting,
    http_client, read_answer, read_answers, websocket,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
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
        Process::start_logging(config_text, "info").await
    }

    /// [`Process::start`] with `RUST_LOG` set to `filter`.
    async fn start_logging(config_text: &str, filter: &str) -> Process {
        let mut process = Process::spawn_logging(config_text, filter);
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

    /// Waits for the process to say it stopped, then for it to exit 0.
    async fn stops_cleanly(mut self) {
        self.wait_for("wxgate stopped").await;
        let exit = tokio::task::spawn_blocking(move || {
            let status = self.child.wait().unwrap();
            drop(self);
            status
        })
        .await
        .unwrap();
        assert!(exit.success(), "wxgate exited with {exit}");
    }

    /// Starts the process without waiting for it to listen.
    fn spawn(config_text: &str) -> Process {
        Process::spawn_logging(config_text, "info")
    }

    fn spawn_logging(config_text: &str, filter: &str) -> Process {
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
            .env("RUST_LOG", filter)
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
        Process {
            child,
            lines,
            config,
            addr: String::new(),
            admin: String::new(),
        }
    }

    /// The next log line whose message contains `message`.
    async fn wait_for(&mut self, message: &str) -> serde_json::Value {
        self.wait_for_event(message, |event| {
            event["message"]
                .as_str()
                .is_some_and(|m| m.contains(message))
        })
        .await
        .0
    }

    /// The next log line that `wanted` accepts, and every line logged before it.
    async fn wait_for_event(
        &mut self,
        what: &str,
        wanted: impl Fn(&serde_json::Value) -> bool,
    ) -> (serde_json::Value, Vec<serde_json::Value>) {
        let mut before = Vec::new();
        let found = async {
            while let Some(event) = self.lines.recv().await {
                if wanted(&event) {
                    return event;
                }
                before.push(event);
            }
            panic!("wxgate exited before logging {what}");
        };
        let event = tokio::time::timeout(Duration::from_secs(60), found)
            .await
            .unwrap_or_else(|_| panic!("wxgate never logged {what}"));
        (event, before)
    }

    /// The admin listener's answer to `GET path`: status, Content-Type and body.
    async fn admin_get(&self, path: &str) -> (u16, String, String) {
        let response = http_client()
            .get(format!("http://{}{path}", self.admin))
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        let content_type = response.headers()["content-type"]
            .to_str()
            .unwrap()
            .to_string();
        (status, content_type, response.text().await.unwrap())
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
        "\nwxgate_in_flight_requests 0\n",
    ] {
        assert!(metrics.contains(line), "{line} missing from:\n{metrics}");
    }
    let (_, content_type, _) = gw.admin_get("/metrics").await;
    assert!(
        content_type.starts_with("application/openmetrics-text"),
        "{content_type}"
    );
    for (path, answer) in [("/healthz", "ok"), ("/readyz", "ready")] {
        let (status, content_type, body) = gw.admin_get(path).await;
        assert_eq!(status, 200, "{path}");
        assert!(
            content_type.starts_with("text/plain"),
            "{path}: {content_type}"
        );
        assert_eq!(body, answer, "{path}");
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

    gw.stops_cleanly().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_the_grace_period_cuts_off_are_logged_as_503_before_the_gateway_stops() {
    let (mock, upstream) = world().await;
    let text = config(mock, upstream.addr, "")
        .replace("shutdown_grace = \"30s\"", "shutdown_grace = \"200ms\"");
    let mut gw = Process::start(&text).await;
    // A GET takes the fast lane, a POST with a body the general path.
    let on_the_lane = tokio::spawn(
        http_client()
            .get(gw.url("/api/public/held"))
            .header("x-request-id", "cut-on-the-lane")
            .send(),
    );
    upstream.held_arrived().await;
    let on_the_general_path = tokio::spawn(
        http_client()
            .post(gw.url("/api/public/held"))
            .header("x-request-id", "cut-on-the-general-path")
            .body("x")
            .send(),
    );
    upstream.held_arrived().await;

    gw.signal("TERM");
    let (_, before) = gw
        .wait_for_event("wxgate stopped", |line| line["message"] == "wxgate stopped")
        .await;
    // Not 499: the clients did not go away, the gateway gave up on them.
    for id in ["cut-on-the-lane", "cut-on-the-general-path"] {
        let line = before
            .iter()
            .find(|line| line["target"] == "wxgate::access" && line["span"]["request_id"] == id)
            .unwrap_or_else(|| {
                panic!("no access line for {id} before the gateway stopped: {before:?}")
            });
        assert_eq!(line["status"], 503, "{line}");
    }
    for cut in [on_the_lane, on_the_general_path] {
        assert!(
            cut.await.unwrap().is_err(),
            "a cut-off request got an answer"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_in_flight_request_finishes_on_its_config_when_a_reload_removes_its_route() {
    let (mock, upstream) = world().await;
    let extra = format!(
        "[[routes]]\npath = \"/extra/\"\nupstream = \"http://{}\"\nauth = \"public\"\n",
        upstream.addr
    );
    let mut gw = Process::start(&config(mock, upstream.addr, &extra)).await;
    let client = http_client();
    let in_flight = tokio::spawn(client.get(gw.url("/extra/held")).send());
    upstream.held_arrived().await;

    std::fs::write(&gw.config, config(mock, upstream.addr, "")).unwrap();
    gw.signal("HUP");
    gw.wait_for("config reloaded").await;
    let response = client.get(gw.url("/extra/x")).send().await.unwrap();
    assert_eq!(response.status(), 404);

    upstream.release_held();
    let response = in_flight.await.unwrap().unwrap();
    assert_eq!(response.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_names_each_setting_that_needs_a_restart_and_a_revert_is_quiet() {
    let (mock, upstream) = world().await;
    let running = config(mock, upstream.addr, "");
    let mut gw = Process::start(&running).await;
    let restart_keys = |lines: &[serde_json::Value]| {
        let mut keys: Vec<String> = lines
            .iter()
            .filter(|line| {
                line["message"]
                    .as_str()
                    .is_some_and(|m| m.contains("only after a restart"))
            })
            .map(|line| line["key"].as_str().unwrap_or("(no key)").to_string())
            .collect();
        keys.sort();
        keys
    };

    // A file refused for a key that cannot sign changes nothing, now or after a restart: no
    // setting is named as waiting for one.
    std::fs::write(gw.config.with_file_name("es256.pem"), "not a key").unwrap();
    let refused = running
        .replace(
            "shutdown_grace = \"30s\"",
            "shutdown_grace = \"30s\"\nmax_connections = 100",
        )
        .replace(
            &format!("secret = \"{JWT_SECRET}\""),
            "algorithm = \"ES256\"\nsigning_key = \"es256.pem\"",
        );
    std::fs::write(&gw.config, refused).unwrap();
    gw.signal("HUP");
    let (refusal, before) = gw
        .wait_for_event("the refused reload", |line| {
            line["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("config reload refused"))
        })
        .await;
    assert!(
        refusal["problems"]
            .as_str()
            .unwrap()
            .contains("token.signing_key"),
        "{refusal}"
    );
    assert_eq!(restart_keys(&before), Vec::<String>::new());

    let changed = running.replace(
        "shutdown_grace = \"30s\"",
        "shutdown_grace = \"30s\"\nmax_connections = 100\nheader_timeout = \"10s\"",
    );
    std::fs::write(&gw.config, changed).unwrap();
    gw.signal("HUP");
    let (_, before) = gw
        .wait_for_event("the first reload", |line| {
            line["message"] == "config reloaded"
        })
        .await;
    assert_eq!(
        restart_keys(&before),
        ["server.header_timeout", "server.max_connections"]
    );

    // Back to what the listener runs with: nothing waits for a restart any more.
    std::fs::write(&gw.config, &running).unwrap();
    gw.signal("HUP");
    let (_, before) = gw
        .wait_for_event("the second reload", |line| {
            line["message"] == "config reloaded"
        })
        .await;
    assert_eq!(restart_keys(&before), Vec::<String>::new());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_as_soon_as_the_gateway_listens_reloads_it() {
    let (mock, upstream) = world().await;
    let mut gw = Process::spawn(&config(mock, upstream.addr, ""));
    gw.wait_for("wxgate listening").await;
    gw.signal("HUP");
    // Had the signal come before its handler, the process would have died of it.
    gw.wait_for("config reloaded").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_its_client_abandons_is_logged_and_counted_as_499() {
    let (mock, upstream) = world().await;
    let mut gw = Process::start(&config(mock, upstream.addr, "")).await;
    let abandoned = tokio::spawn(
        http_client()
            .get(gw.url("/api/public/held"))
            .header("x-request-id", "abandoned-1")
            .send(),
    );
    upstream.held_arrived().await;
    // Dropping the request closes its connection, as a client that gives up does.
    abandoned.abort();

    let (line, _) = gw
        .wait_for_event("the abandoned request's access line", |line| {
            line["target"] == "wxgate::access" && line["span"]["request_id"] == "abandoned-1"
        })
        .await;
    assert_eq!(line["status"], 499);
    assert_eq!(line["route"], "/api/public/");
    assert_eq!(line["path"], "/api/public/held");
    let (_, _, metrics) = gw.admin_get("/metrics").await;
    for line in [
        "\nwxgate_in_flight_requests 0\n",
        "wxgate_requests_total{route=\"/api/public/\",status=\"499\"} 1",
        "wxgate_request_duration_seconds_count{route=\"/api/public/\"} 1",
    ] {
        assert!(metrics.contains(line), "{line} missing from:\n{metrics}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_body_its_client_abandons_is_counted_as_400_and_never_blamed_on_the_upstream() {
    let (mock, upstream) = world().await;
    let mut gw = Process::start(&config(mock, upstream.addr, "")).await;
    let mut stream = TcpStream::connect(&gw.addr).await.unwrap();
    stream
        .write_all(
            b"POST /api/public/sink HTTP/1.1\r\nHost: x\r\nX-Request-Id: cut-1\r\n\
              Content-Length: 100\r\n\r\n0123456789",
        )
        .await
        .unwrap();
    // A phone that lost its network, or an app killed mid-upload.
    drop(stream);
    assert!(matches!(upstream.next_body().await, BodySeen::Aborted(_)));

    let (line, before) = gw
        .wait_for_event("the abandoned upload's access line", |line| {
            line["target"] == "wxgate::access" && line["span"]["request_id"] == "cut-1"
        })
        .await;
    assert_eq!(line["status"], 400);
    // Lines logged while answering come before the access line.
    let blamed: Vec<_> = before
        .iter()
        .filter(|line| line["message"] == "upstream request failed")
        .collect();
    assert!(blamed.is_empty(), "{blamed:?}");
    let (_, _, metrics) = gw.admin_get("/metrics").await;
    let counted = "wxgate_requests_total{route=\"/api/public/\",status=\"400\"} 1";
    assert!(
        metrics.contains(counted),
        "{counted} missing from:\n{metrics}"
    );
    assert!(!metrics.contains("status=\"502\""), "{metrics}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_opened_with_a_token_closes_when_the_token_expires() {
    let (mock, upstream) = world().await;
    let text = config(mock, upstream.addr, "").replace(
        &format!("secret = \"{JWT_SECRET}\""),
        &format!("secret = \"{JWT_SECRET}\"\nleeway = \"2s\""),
    );
    let mut gw = Process::start(&text).await;
    let loaded = wxgate::Config::load(&gw.config).unwrap();
    let token = wxgate::token::mint(
        &loaded,
        &wxgate::token::MintRequest {
            openid: "o-short-lived",
            appid: None,
            ttl: Some(Duration::from_secs(2)),
        },
    )
    .unwrap();
    let authorization = format!("Bearer {token}");
    let (status, mut stream) = websocket(
        gw.addr.parse().unwrap(),
        "/api/ws",
        &[
            ("Authorization", &authorization),
            ("X-Request-Id", "ws-expiry-1"),
        ],
    )
    .await;
    assert_eq!(status, 101);
    assert_eq!(greeting(&mut stream).await, "openid=o-short-lived");
    assert_echoed(&mut stream, b"ping").await;

    // The gateway ends the tunnel: reading reaches its end. The bound only keeps a broken
    // gateway from hanging the suite.
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(30), stream.read_to_end(&mut rest)).await;
    assert!(closed.is_ok(), "the tunnel outlived its token");
    // Not before the leeway is over: until then the token is accepted, and a client that
    // reconnected would be let in and cut off at once rather than told to refresh.
    let exp = {
        let payload = token.split('.').nth(1).unwrap();
        let claims: serde_json::Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).unwrap()).unwrap();
        claims["exp"].as_u64().unwrap()
    };
    assert!(
        wxgate::token::unix_now() >= exp + 2,
        "closed within the leeway"
    );
    let line = gw.wait_for("its token expired").await;
    assert_eq!(line["span"]["request_id"], "ws-expiry-1", "{line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_an_upgraded_connection_run_within_the_grace_period() {
    let (mock, upstream) = world().await;
    let mut gw = Process::start(&config(mock, upstream.addr, "")).await;
    let (status, mut stream) = websocket(gw.addr.parse().unwrap(), "/api/public/ws", &[]).await;
    assert_eq!(status, 101);
    greeting(&mut stream).await;

    gw.signal("TERM");
    gw.wait_for("draining in-flight requests").await;
    assert_echoed(&mut stream, b"still here").await;

    // The client leaves: nothing is left to drain.
    drop(stream);
    gw.stops_cleanly().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_is_503_while_the_redis_store_does_not_answer() {
    let (mock, upstream) = world().await;
    let redis = RedisServer::start().await;
    let text = config(mock, upstream.addr, "").replace(
        "backend = \"memory\"",
        &format!("backend = \"redis\"\nurl = \"{}\"", redis.url()),
    );
    let gw = Process::start(&text).await;
    assert_eq!(gw.admin_get("/readyz").await.0, 200);

    drop(redis);
    let (status, content_type, body) = gw.admin_get("/readyz").await;
    assert_eq!(status, 503);
    assert!(content_type.starts_with("text/plain"), "{content_type}");
    assert_eq!(body, "store unavailable");
    // The process itself is still alive.
    assert_eq!(gw.admin_get("/healthz").await.0, 200);
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_keep_alive_connection_sheds_its_buffers_and_serves_its_next_request() {
    let (mock, upstream) = world().await;
    let mut gw = Process::start_logging(
        &config(mock, upstream.addr, ""),
        "info,wxgate::server=debug",
    )
    .await;
    let mut stream = TcpStream::connect(&gw.addr).await.unwrap();
    for round in 0..3 {
        stream
            .write_all(b"GET /api/public/again HTTP/1.1\r\nHost: gw\r\n\r\n")
            .await
            .unwrap();
        let (status, _) = read_answer(&mut stream).await;
        assert_eq!(status, 200, "request {round} on the same connection");
        gw.wait_for("idle keep-alive connection shed its buffers")
            .await;
    }
    // Pipelined requests after a shed are all answered, in order.
    stream
        .write_all(b"GET /api/public/a HTTP/1.1\r\nHost: gw\r\n\r\nGET /api/public/b HTTP/1.1\r\nHost: gw\r\n\r\n")
        .await
        .unwrap();
    let mut answers = read_answers(&mut stream, 2).await;
    let (second, second_body) = answers.pop().unwrap();
    let (first, first_body) = answers.pop().unwrap();
    assert_eq!((first, second), (200, 200));
    assert_eq!(first_body["uri"], "/api/public/a");
    assert_eq!(second_body["uri"], "/api/public/b");
    assert_eq!(upstream.requests_seen(), 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_client_leaves_its_upstream_connection_to_the_next_client() {
    let (mock, upstream) = world().await;
    let mut gw = Process::start_logging(
        &config(mock, upstream.addr, ""),
        "info,wxgate::server=debug",
    )
    .await;
    let mut first = TcpStream::connect(&gw.addr).await.unwrap();
    first
        .write_all(b"GET /api/public/first HTTP/1.1\r\nHost: gw\r\n\r\n")
        .await
        .unwrap();
    assert_eq!(read_answer(&mut first).await.0, 200);
    gw.wait_for("idle keep-alive connection shed its buffers")
        .await;
    // The first client is still connected, idle; the second is served on the upstream
    // connection the first was using.
    let mut second = TcpStream::connect(&gw.addr).await.unwrap();
    second
        .write_all(b"GET /api/public/second HTTP/1.1\r\nHost: gw\r\n\r\n")
        .await
        .unwrap();
    assert_eq!(read_answer(&mut second).await.0, 200);
    assert_eq!(upstream.connections_accepted(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_idle_past_the_shedding_point_keeps_working() {
    let (mock, upstream) = world().await;
    let gw = Process::start(&config(mock, upstream.addr, "")).await;
    let addr: std::net::SocketAddr = gw.addr.parse().unwrap();
    let (status, mut tunnel) = websocket(addr, "/api/public/ws", &[]).await;
    assert_eq!(status, 101);
    greeting(&mut tunnel).await;
    // Time itself is what is tested: the tunnel idles well past the point where an HTTP/1
    // connection would shed its buffers, and must not be mistaken for one.
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_echoed(&mut tunnel, b"after idling").await;
}
