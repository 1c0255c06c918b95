//! wxgate as the forward-auth service of a real nginx: `deploy/forward-auth/nginx.conf`, run
//! as it ships with only its addresses filled in, in front of the test upstream, asking the
//! real gateway's `/auth/verify`.

mod common;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{APPID, Harness, echoed_header};
use tokio::net::TcpStream;

const EXAMPLE: &str = include_str!("../deploy/forward-auth/nginx.conf");

/// An nginx of the test's own, in a directory of its own; stopped and removed when dropped.
struct Nginx {
    addr: SocketAddr,
    dir: PathBuf,
    child: Child,
}

impl Nginx {
    /// Starts the example config with its listener on a free port, wxgate at the harness's
    /// gateway and the app at the harness's test upstream; returns once nginx accepts.
    async fn start(gw: &Harness) -> Nginx {
        let addr = common::closed_port_addr();
        let config = fill(
            EXAMPLE,
            &[
                ("listen 8000;", format!("listen {addr};")),
                ("server 127.0.0.1:8080;", format!("server {};", gw.addr)),
                (
                    "server 127.0.0.1:3000;",
                    format!("server {};", gw.upstream.addr),
                ),
            ],
        );
        let dir =
            std::env::temp_dir().join(format!("wxgate-nginx-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir(&dir).unwrap();
        let config_path = dir.join("nginx.conf");
        std::fs::write(&config_path, config).unwrap();
        let errors = std::fs::File::create(dir.join("stderr.log")).unwrap();
        let child = Command::new("nginx")
            .arg("-p")
            .arg(&dir)
            .arg("-c")
            .arg(&config_path)
            // master_process off: one process, so killing it leaves no worker behind holding
            // the port, whatever way the test ends.
            .args(["-g", "daemon off; master_process off;"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(errors)
            .spawn()
            .unwrap_or_else(|err| {
                panic!(
                    "cannot run nginx ({err}): this test needs it (.ci/run installs nginx-light)"
                )
            });
        let mut nginx = Nginx { addr, dir, child };
        nginx.wait_until_accepting().await;
        nginx
    }

    async fn wait_until_accepting(&mut self) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while TcpStream::connect(self.addr).await.is_err() {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!(
                    "nginx exited ({status}) before accepting:\n{}",
                    self.errors()
                );
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "nginx never accepted on {}:\n{}",
                self.addr,
                self.errors()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    fn errors(&self) -> String {
        std::fs::read_to_string(self.dir.join("stderr.log")).unwrap_or_default()
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `text` with each `(from, to)` replaced; each `from` must occur exactly once, so a change to
/// the example that this test does not know about fails here rather than testing something
/// else.
fn fill(text: &str, replacements: &[(&str, String)]) -> String {
    replacements
        .iter()
        .fold(text.to_string(), |text, (from, to)| {
            assert_eq!(
                text.matches(from).count(),
                1,
                "the nginx example should hold `{from}` exactly once"
            );
            text.replace(from, to)
        })
}

/// Sends `request`: (status, the answer's headers, JSON body or null).
async fn send(
    request: reqwest::RequestBuilder,
) -> (u16, reqwest::header::HeaderMap, serde_json::Value) {
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let body = response.text().await.unwrap();
    (
        status,
        headers,
        serde_json::from_str(&body).unwrap_or(serde_json::Value::Null),
    )
}

/// GET `url` with extra headers.
async fn get(
    gw: &Harness,
    url: &str,
    headers: &[(&str, &str)],
) -> (u16, reqwest::header::HeaderMap, serde_json::Value) {
    let mut request = gw.client.get(url);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    send(request).await
}

/// POST a JSON `body` to `url`.
async fn post(
    gw: &Harness,
    url: &str,
    body: &str,
) -> (u16, reqwest::header::HeaderMap, serde_json::Value) {
    send(
        gw.client
            .post(url)
            .header("content-type", "application/json")
            .body(body.to_string()),
    )
    .await
}

#[tokio::test]
async fn app_behind_nginx_receives_the_identity_wxgate_verified() {
    let gw = Harness::start().await;
    let nginx = Nginx::start(&gw).await;
    let login = gw.login("alice").await;
    let token = login["access_token"].as_str().unwrap();
    let bearer = format!("Bearer {token}");

    let (status, _, echo) = get(
        &gw,
        &nginx.url("/orders?page=2"),
        &[("authorization", &bearer)],
    )
    .await;

    assert_eq!(status, 200, "{echo}");
    assert_eq!(echo["uri"], "/orders?page=2");
    assert_eq!(
        echoed_header(&echo, "x-wx-openid"),
        [login["openid"].as_str().unwrap()]
    );
    assert_eq!(echoed_header(&echo, "x-wx-appid"), [APPID]);
    assert_eq!(
        echoed_header(&echo, "x-wx-unionid"),
        [login["unionid"].as_str().unwrap()]
    );
    assert!(
        echoed_header(&echo, "authorization").is_empty(),
        "the bearer token must stop at nginx: {echo}"
    );
}

#[tokio::test]
async fn request_without_a_valid_token_gets_wxgates_json_401_from_nginx() {
    let gw = Harness::start().await;
    let nginx = Nginx::start(&gw).await;

    let (status, headers, body) = get(&gw, &nginx.url("/orders"), &[]).await;
    assert_eq!(status, 401, "{body}");
    assert_eq!(body["error"], "missing_token");
    assert_eq!(headers["content-type"], "application/json");
    let challenges: Vec<_> = headers.get_all("www-authenticate").iter().collect();
    assert_eq!(challenges, [r#"Bearer realm="wxgate""#]);

    let (status, headers, body) = get(
        &gw,
        &nginx.url("/orders"),
        &[("authorization", "Bearer not-a-token")],
    )
    .await;
    assert_eq!(status, 401, "{body}");
    assert_eq!(body["error"], "invalid_token");
    let challenges: Vec<_> = headers.get_all("www-authenticate").iter().collect();
    assert_eq!(
        challenges,
        [r#"Bearer realm="wxgate", error="invalid_token""#]
    );

    // A refused POST answers the same, its body never read by wxgate.
    let (status, _, body) = post(&gw, &nginx.url("/orders"), r#"{"item": 1}"#).await;
    assert_eq!(status, 401, "{body}");
    assert_eq!(body["error"], "missing_token");
}

#[tokio::test]
async fn client_supplied_identity_headers_never_reach_the_app_through_nginx() {
    let gw = Harness::start().await;
    let nginx = Nginx::start(&gw).await;
    // A user without a unionid: wxgate sends no X-WX-UnionID, and the client's must not
    // slip through in its place.
    let login = gw.login("nounion-bob").await;
    assert!(login.get("unionid").is_none(), "{login}");
    let bearer = format!("Bearer {}", login["access_token"].as_str().unwrap());

    let (status, _, echo) = get(
        &gw,
        &nginx.url("/orders"),
        &[
            ("authorization", &bearer),
            ("x-wx-openid", "admin"),
            ("x-wx-unionid", "forged-unionid"),
            ("x-wx-appid", "wx-forged"),
            ("x_wx_openid", "admin"),
        ],
    )
    .await;

    assert_eq!(status, 200, "{echo}");
    assert_eq!(
        echoed_header(&echo, "x-wx-openid"),
        [login["openid"].as_str().unwrap()]
    );
    assert_eq!(echoed_header(&echo, "x-wx-appid"), [APPID]);
    assert!(echoed_header(&echo, "x-wx-unionid").is_empty(), "{echo}");
    assert!(echoed_header(&echo, "x_wx_openid").is_empty(), "{echo}");
}

#[tokio::test]
async fn login_through_nginx_reaches_wxgate_and_its_token_works() {
    let gw = Harness::start().await;
    let nginx = Nginx::start(&gw).await;

    let (status, _, login) = post(&gw, &nginx.url("/auth/login"), r#"{"code": "carol"}"#).await;
    assert_eq!(status, 200, "{login}");
    let bearer = format!("Bearer {}", login["access_token"].as_str().unwrap());

    let (status, _, echo) = get(&gw, &nginx.url("/orders"), &[("authorization", &bearer)]).await;
    assert_eq!(status, 200, "{echo}");
    assert_eq!(
        echoed_header(&echo, "x-wx-openid"),
        [login["openid"].as_str().unwrap()]
    );
}

#[tokio::test]
async fn verify_answers_under_its_path_as_envoy_asks() {
    // Envoy's ext_authz appends the checked request's path (and query) to its path_prefix.
    let gw = Harness::start().await;
    let login = gw.login("vik").await;
    let bearer = format!("Bearer {}", login["access_token"].as_str().unwrap());
    for path in [
        "/auth/verify/api/orders",
        "/auth/verify/api/orders/?page=2",
        "/auth/verify/",
    ] {
        let (status, headers, _) = get(&gw, &gw.url(path), &[("authorization", &bearer)]).await;
        assert_eq!(status, 200, "{path}");
        assert_eq!(headers["x-wx-openid"], login["openid"].as_str().unwrap());
        assert_eq!(headers["x-wx-appid"], APPID);
    }
    // With the original request's method.
    let (status, headers, _) = send(
        gw.client
            .delete(gw.url("/auth/verify/api/orders/7"))
            .header("authorization", &bearer),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(headers["x-wx-openid"], login["openid"].as_str().unwrap());

    let (status, _, body) = get(&gw, &gw.url("/auth/verify/api/orders"), &[]).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (401, Some("missing_token"))
    );
    // A sibling of the path is not under it.
    let (status, _, body) = get(&gw, &gw.url("/auth/verifyx"), &[("authorization", &bearer)]).await;
    assert_eq!((status, body["error"].as_str()), (404, Some("no_route")));
}
