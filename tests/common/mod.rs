//! The harness every integration test uses: the real gateway, the mock WeChat and a test
//! upstream, each on 127.0.0.1:0, spoken to over HTTP.

#![allow(dead_code)] // each test binary uses its own part of the harness

use std::collections::VecDeque;
use std::convert::Infallible;
use std::io::BufRead;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, oneshot};

use wxgate::mock::wechat::MockWechat;
use wxgate::{Config, State};

pub const APPID: &str = "wx0000000000000a01";
pub const OTHER_APPID: &str = "wx0000000000000b02";
pub const APP_SECRET: &str = "app-secret-never-in-logs-7f3a9c";
pub const JWT_SECRET: &str = "jwt-secret-never-in-logs-0123456789abcdef";
pub const MAX_BODY: u64 = 64 * 1024;

/// How long a test waits for a server under test to say something before it fails: one that
/// never answers fails its test rather than holding the whole run until the CI's limit.
pub const ANSWER_BOUND: Duration = Duration::from_secs(60);

/// WeChat's published open-data sample: appid `wx4f4bc4dec97d474b`, session_key
/// `tiihtNczf5v6AKRyjwEUhQ==`, iv `r7BXXKkLb8qrSNn05n0qiA==`; it decrypts to the user `Band`.
pub const OFFICIAL_SAMPLE_ENCRYPTED_DATA: &str = "CiyLU1Aw2KjvrjMdj8YKliAjtP4gsMZMQmRzooG2xrDcvSnxIMXFufNstNGTyaGS9uT5geRa0W4oTOb1WT7fJlAC+oNPdbB+3hVbJSRgv+4lGOETKUQz6OYStslQ142dNCuabNPGBzlooOmB231qMM85d2/fV6ChevvXvQP8Hkue1poOFtnEtpyxVLW1zAo6/1Xx1COxFvrc2d7UL/lmHInNlxuacJXwu0fjpXfz/YqYzBIBzD6WUfTIF9GRHpOn/Hz7saL8xz+W//FRAUid1OksQaQx4CMs8LOddcQhULW4ucetDf96JcR3g0gfRK4PC7E/r7Z6xNrXd2UIeorGj5Ef7b1pJAYB6Y5anaHqZ9J6nKEBvB4DnNLIVWSgARns/8wR2SiRS7MNACwTyrGvt9ts8p12PKFdlqYTopNHR1Vf7XjfhQlVsAJdNiKdYmYVoKlaRv85IfVunYzO0IKXsyl7JCUjCpoG20f0a04COwfneQAGGwd5oa+T8yO5hzuyDb/XcxxmK01EpqOyuxINew==";

/// What the test upstream saw of a request body.
#[derive(Debug, Clone, PartialEq)]
pub enum BodySeen {
    Complete(usize),
    Aborted(usize),
}

/// The upstream behind the gateway. Paths pick its behaviour: `/status/503…` answers 503,
/// `/hook/<verdict>` plays a login hook (`/hook/held` one that answers only once the test
/// releases it), `/…/slow` never answers in time, `/…/held` answers once the test releases it,
/// `/…/ws` accepts an upgrade and echoes bytes, `/…/close` answers and closes its connection, `/…/bytes/N` answers N bytes, `/…/echo-body`
/// answers the request body, `/…/sink` reads the body and records what it saw; anything else
/// answers the request line and headers as JSON.
pub struct Upstream {
    pub addr: SocketAddr,
    shared: Arc<UpstreamShared>,
}

#[derive(Default)]
struct UpstreamShared {
    /// Oldest first.
    bodies: Mutex<VecDeque<BodySeen>>,
    bodies_seen: AtomicUsize,
    requests_seen: AtomicUsize,
    connections_accepted: AtomicUsize,
    body_seen: Notify,
    held_arrived: Notify,
    release_held: Notify,
}

impl Upstream {
    pub async fn start() -> Upstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shared = Arc::new(UpstreamShared::default());
        let serving = shared.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                serving.connections_accepted.fetch_add(1, Ordering::SeqCst);
                let shared = serving.clone();
                tokio::spawn(async move {
                    let service =
                        service_fn(move |request| upstream_answer(request, shared.clone()));
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection_with_upgrades(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Upstream { addr, shared }
    }

    /// Waits until the upstream has finished reading a body not yet returned here, and returns
    /// what it saw of the oldest such body.
    pub async fn next_body(&self) -> BodySeen {
        loop {
            let notified = self.shared.body_seen.notified();
            if let Some(seen) = self.shared.bodies.lock().unwrap().pop_front() {
                return seen;
            }
            tokio::time::timeout(Duration::from_secs(10), notified)
                .await
                .expect("the upstream never finished reading a body");
        }
    }

    /// How many bodies a `/…/sink` request has read to their end or abort so far.
    pub fn bodies_seen(&self) -> usize {
        self.shared.bodies_seen.load(Ordering::SeqCst)
    }

    /// How many requests have reached the upstream so far.
    pub fn requests_seen(&self) -> usize {
        self.shared.requests_seen.load(Ordering::SeqCst)
    }

    /// How many connections the upstream has accepted so far.
    pub fn connections_accepted(&self) -> usize {
        self.shared.connections_accepted.load(Ordering::SeqCst)
    }

    /// Waits until a `/…/held` request has arrived.
    pub async fn held_arrived(&self) {
        tokio::time::timeout(Duration::from_secs(30), self.shared.held_arrived.notified())
            .await
            .expect("the held request never arrived");
    }

    /// Lets the `/…/held` request answer.
    pub fn release_held(&self) {
        self.shared.release_held.notify_one();
    }
}

type UpstreamBody = http_body_util::combinators::BoxBody<Bytes, Infallible>;

async fn upstream_answer(
    mut request: Request<Incoming>,
    shared: Arc<UpstreamShared>,
) -> Result<Response<UpstreamBody>, Infallible> {
    shared.requests_seen.fetch_add(1, Ordering::SeqCst);
    let path = request.uri().path().to_string();
    if path.ends_with("/held") {
        shared.held_arrived.notify_one();
        shared.release_held.notified().await;
    }
    if path.ends_with("/ws") && request.headers().contains_key("upgrade") {
        let openid = request
            .headers()
            .get("x-wx-openid")
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
            .unwrap_or_default();
        let upgraded = hyper::upgrade::on(&mut request);
        tokio::spawn(async move {
            let Ok(upgraded) = upgraded.await else { return };
            let mut io = TokioIo::new(upgraded);
            let _ = io.write_all(format!("openid={openid}\n").as_bytes()).await;
            let mut buffer = [0u8; 1024];
            while let Ok(read) = io.read(&mut buffer).await {
                if read == 0 || io.write_all(&buffer[..read]).await.is_err() {
                    break;
                }
            }
        });
        let mut response = Response::new(Full::new(Bytes::new()).boxed());
        *response.status_mut() = http::StatusCode::SWITCHING_PROTOCOLS;
        response
            .headers_mut()
            .insert("upgrade", "websocket".parse().unwrap());
        response
            .headers_mut()
            .insert("connection", "upgrade".parse().unwrap());
        return Ok(response);
    }
    if path.ends_with("/close") {
        let mut response = Response::new(Full::new(Bytes::from_static(b"closing")).boxed());
        response
            .headers_mut()
            .insert("connection", "close".parse().unwrap());
        return Ok(response);
    }
    if path.starts_with("/status/503") {
        let mut response = Response::new(Full::new(Bytes::from_static(b"unavailable")).boxed());
        *response.status_mut() = http::StatusCode::SERVICE_UNAVAILABLE;
        return Ok(response);
    }
    if let Some(verdict) = path.strip_prefix("/hook/") {
        return Ok(hook_answer(verdict, request).await);
    }
    if path.ends_with("/slow") {
        tokio::time::sleep(Duration::from_secs(60)).await;
    }
    if let Some(count) = path
        .rsplit_once("/bytes/")
        .and_then(|(_, n)| n.parse::<usize>().ok())
    {
        let chunks = pattern(count)
            .chunks(64 * 1024)
            .map(|chunk| Ok::<_, Infallible>(Frame::data(Bytes::copy_from_slice(chunk))))
            .collect::<Vec<_>>();
        let body = StreamBody::new(futures_util::stream::iter(chunks));
        return Ok(Response::new(BodyExt::boxed(body)));
    }
    if path.ends_with("/echo-body") {
        let body = request
            .into_body()
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        return Ok(Response::new(Full::new(body).boxed()));
    }
    if path.ends_with("/sink") {
        let mut body = request.into_body();
        let mut read = 0;
        let outcome = loop {
            match body.frame().await {
                None => break BodySeen::Complete(read),
                Some(Ok(frame)) => read += frame.data_ref().map_or(0, Bytes::len),
                Some(Err(_)) => break BodySeen::Aborted(read),
            }
        };
        shared.bodies.lock().unwrap().push_back(outcome);
        shared.bodies_seen.fetch_add(1, Ordering::SeqCst);
        shared.body_seen.notify_one();
        return Ok(Response::new(
            Full::new(Bytes::from_static(b"sunk")).boxed(),
        ));
    }
    let headers: Vec<(String, String)> = request
        .headers()
        .iter()
        .map(|(name, value)| {
            (
                name.to_string(),
                String::from_utf8_lossy(value.as_bytes()).into_owned(),
            )
        })
        .collect();
    let echo = serde_json::json!({
        "method": request.method().as_str(),
        "uri": request.uri().to_string(),
        "headers": headers,
    });
    let mut response = Response::new(Full::new(Bytes::from(echo.to_string())).boxed());
    response
        .headers_mut()
        .insert("content-type", "application/json".parse().unwrap());
    Ok(response)
}

/// A login hook: `allow` adds claims (one of them reserved, which must be dropped, and one
/// echoing the openid it was told), `deny` refuses, `garbage` answers what is not JSON.
async fn hook_answer(verdict: &str, request: Request<Incoming>) -> Response<UpstreamBody> {
    let body = request
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let told: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
    let (status, answer) = match verdict {
        "allow" => (
            200,
            serde_json::json!({"claims": {
                "uid": 42,
                "role": "admin",
                "seen_openid": told["openid"],
                "seen_nick": told["user"]["nickName"],
                "sub": "forged-subject",
            }})
            .to_string(),
        ),
        "deny" => (403, "{}".to_string()),
        // A business API whose handler failed but still answered 200.
        "claimless" => (200, r#"{"error": "db down"}"#.to_string()),
        // Sends the login, method and body kept (307), to the hook that would allow it.
        "redirect" => (307, String::new()),
        _ => (200, "<html>oops</html>".to_string()),
    };
    let mut response = Response::new(Full::new(Bytes::from(answer)).boxed());
    *response.status_mut() = http::StatusCode::from_u16(status).unwrap();
    if verdict == "redirect" {
        response
            .headers_mut()
            .insert("location", http::HeaderValue::from_static("/hook/allow"));
    }
    response
}

/// Deterministic bytes, so a body can be compared without keeping a copy.
pub fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i % 251) as u8).collect()
}

/// The whole system under test.
pub struct Harness {
    pub addr: SocketAddr,
    /// The gateway's state, for reaching its store directly.
    pub state: wxgate::SharedState,
    pub mock: Arc<MockWechat>,
    pub mock_addr: SocketAddr,
    pub upstream: Upstream,
    pub client: reqwest::Client,
    stop: Option<oneshot::Sender<()>>,
    stopped: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
    /// Harnesses whose mock this one borrowed, kept running as long as this one.
    lenders: Vec<Harness>,
}

/// Extra TOML appended to the default test config (more routes, or whole sections replacing
/// nothing the default sets).
pub struct Setup {
    pub server_extra: String,
    pub wechat_hosts: Option<Vec<String>>,
    pub wechat_timeout: &'static str,
    pub extra_apps: bool,
    /// One more app, by appid (the official open-data sample's).
    pub sample_app: Option<&'static str>,
    /// Whole sections appended to the file; `{upstream}` stands for the test upstream's
    /// address.
    pub sections: String,
    /// The body of `[store]`.
    pub store: String,
    /// `token.access_ttl` and `token.leeway`.
    pub access_ttl: &'static str,
    pub leeway: &'static str,
}

impl Default for Setup {
    fn default() -> Self {
        Setup {
            server_extra: String::new(),
            wechat_hosts: None,
            wechat_timeout: "2s",
            extra_apps: false,
            sample_app: None,
            sections: String::new(),
            store: "backend = \"memory\"".into(),
            access_ttl: "2h",
            leeway: "5s",
        }
    }
}

impl Harness {
    pub async fn start() -> Harness {
        Harness::start_with(Setup::default()).await
    }

    /// A gateway whose one more route, `path`, is a public one to `upstream`.
    pub async fn with_public_route(path: &str, upstream: SocketAddr) -> Harness {
        Harness::start_with(Setup {
            sections: format!(
                "[[routes]]\npath = \"{path}\"\nupstream = \"http://{upstream}\"\nauth = \"public\"\n"
            ),
            ..Setup::default()
        })
        .await
    }

    pub async fn start_with(setup: Setup) -> Harness {
        let mock = MockWechat::new();
        let mock_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mock_addr = mock_listener.local_addr().unwrap();
        tokio::spawn(mock.clone().serve(mock_listener));
        let upstream = Upstream::start().await;

        let text = config_text(&setup, mock_addr, upstream.addr);
        let config = Config::parse(&text, Path::new("/nonexistent/test.toml"), &|_| None)
            .unwrap_or_else(|err| panic!("test config invalid:\n{err}"));
        let state = State::shared(config).await.unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped_signal) = oneshot::channel::<()>();
        let stopped = tokio::spawn(wxgate::run(listener, state.clone(), async move {
            let _ = stopped_signal.await;
        }));
        Harness {
            addr,
            state,
            mock,
            mock_addr,
            upstream,
            client: http_client(),
            stop: Some(stop),
            stopped: Some(stopped),
            lenders: Vec::new(),
        }
    }

    /// Counts and answers through `lender`'s mock WeChat from now on (the config must point
    /// at it), so tests can count what reached one mock from several gateways or hosts.
    pub fn sharing_mock_of(mut self, lender: Harness) -> Harness {
        self.mock = lender.mock.clone();
        self.mock_addr = lender.mock_addr;
        self.lenders.push(lender);
        self
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// Logs in with `code` and returns the whole token response.
    pub async fn login(&self, code: &str) -> serde_json::Value {
        let response = self.login_raw(serde_json::json!({ "code": code })).await;
        assert_eq!(response.0, 200, "login failed: {}", response.1);
        response.1
    }

    /// Posts `body` to `/auth/login`: (status, JSON body).
    pub async fn login_raw(&self, body: serde_json::Value) -> (u16, serde_json::Value) {
        let response = self
            .client
            .post(self.url("/auth/login"))
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        let text = response.text().await.unwrap();
        (
            status,
            serde_json::from_str(&text).unwrap_or(serde_json::Value::Null),
        )
    }

    pub async fn token(&self, code: &str) -> String {
        self.login(code).await["access_token"]
            .as_str()
            .unwrap()
            .to_string()
    }

    /// POSTs a JSON `body` to `path`, with a bearer `token` when given: (status, JSON body or
    /// null).
    pub async fn post(
        &self,
        path: &str,
        token: Option<&str>,
        body: serde_json::Value,
    ) -> (u16, serde_json::Value) {
        post_json(&self.client, self.url(path), token, body).await
    }

    /// GET `path` with extra headers: (status, JSON body or null).
    pub async fn get(&self, path: &str, headers: &[(&str, &str)]) -> (u16, serde_json::Value) {
        let mut request = self.client.get(self.url(path));
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        let text = response.text().await.unwrap();
        (
            status,
            serde_json::from_str(&text).unwrap_or(serde_json::Value::Null),
        )
    }

    /// Sends `raw` as is on a new connection and returns the status and the body of the answer.
    /// For requests a well-behaved client would refuse to send (dot-segments, odd header
    /// spellings). Answers must carry a Content-Length, as the gateway's own and the upstream's
    /// JSON answers do.
    pub async fn raw(&self, raw: &str) -> (u16, serde_json::Value) {
        let mut stream = TcpStream::connect(self.addr).await.unwrap();
        stream.write_all(raw.as_bytes()).await.unwrap();
        read_answer(&mut stream).await
    }

    /// Reloads the gateway from `setup`, as SIGHUP does from the config file: the file is
    /// written, loaded and swapped in by `wxgate::server::reload`.
    pub fn reload(&self, setup: Setup) {
        let dir = TempDir::new("reload");
        let path = dir.path().join("config.toml");
        std::fs::write(
            &path,
            config_text(&setup, self.mock_addr, self.upstream.addr),
        )
        .unwrap();
        wxgate::server::reload(&path, &self.state)
            .unwrap_or_else(|err| panic!("reloaded test config invalid:\n{err}"));
    }

    /// Stops accepting, drains, and waits for `run` to return.
    pub async fn shutdown(mut self) {
        let _ = self.stop.take().unwrap().send(());
        self.stopped.take().unwrap().await.unwrap().unwrap();
    }
}

/// Reads one HTTP/1.1 answer from `stream`, leaving the connection open: its status and its
/// body as JSON (null when it is not). The answer must carry a Content-Length.
pub async fn read_answer(stream: &mut TcpStream) -> (u16, serde_json::Value) {
    read_answers(stream, 1).await.remove(0)
}

/// Reads the answers to `count` pipelined requests, in order, as [`read_answer`] does one.
/// They may arrive in one read, so none is read past until all are.
pub async fn read_answers(stream: &mut TcpStream, count: usize) -> Vec<(u16, serde_json::Value)> {
    let mut unread = Vec::new();
    let mut answers = Vec::new();
    let mut buffer = [0u8; 8192];
    while answers.len() < count {
        if let Some((answer, used)) = parse_answer(&unread) {
            answers.push(answer);
            unread.drain(..used);
            continue;
        }
        let read = bounded(stream.read(&mut buffer)).await.unwrap();
        assert!(
            read > 0,
            "connection closed before answer {}",
            answers.len() + 1
        );
        unread.extend_from_slice(&buffer[..read]);
    }
    answers
}

/// The first whole answer in `bytes`, and how many bytes it took; `None` until it has all come.
fn parse_answer(bytes: &[u8]) -> Option<((u16, serde_json::Value), usize)> {
    let head_end = bytes.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    let head = String::from_utf8_lossy(&bytes[..head_end]);
    let status: u16 = head[9..12].parse().unwrap();
    let length = content_length(&head).expect("answer without Content-Length");
    let body = bytes.get(head_end..head_end + length)?;
    let json = serde_json::from_slice(body).unwrap_or(serde_json::Value::Null);
    Some(((status, json), head_end + length))
}

/// The `Content-Length` a message head names, if any.
fn content_length(head: &str) -> Option<usize> {
    head.lines().find_map(|line| {
        let (name, value) = line.split_once(':')?;
        name.eq_ignore_ascii_case("content-length")
            .then(|| value.trim().parse().unwrap())
    })
}

/// Reads one request as a scripted upstream does: its head, to the empty line, which it
/// answers, and its `Content-Length` body, read and dropped. `None` once the connection ends.
pub async fn read_request(stream: &mut BufReader<TcpStream>) -> Option<String> {
    let mut head = String::new();
    loop {
        let mut line = String::new();
        if stream.read_line(&mut line).await.unwrap_or(0) == 0 {
            return None;
        }
        head.push_str(&line);
        if line == "\r\n" {
            break;
        }
    }
    let mut body = vec![0u8; content_length(&head).unwrap_or(0)];
    stream.read_exact(&mut body).await.ok()?;
    Some(head)
}

/// Sends a WebSocket handshake for `path` with extra header lines; answers the status and,
/// after the answer's head, the stream.
pub async fn websocket(
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
) -> (u16, BufReader<TcpStream>) {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let mut head = format!(
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    );
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).await.unwrap();
    let mut reader = BufReader::new(stream);
    let mut status_line = String::new();
    bounded(reader.read_line(&mut status_line)).await.unwrap();
    let status = status_line[9..12].parse().unwrap();
    loop {
        let mut line = String::new();
        bounded(reader.read_line(&mut line)).await.unwrap();
        if line == "\r\n" || line.is_empty() {
            break;
        }
    }
    (status, reader)
}

/// The line the test upstream greets an upgraded tunnel with, without its line end.
pub async fn greeting(tunnel: &mut BufReader<TcpStream>) -> String {
    let mut line = String::new();
    bounded(tunnel.read_line(&mut line)).await.unwrap();
    line.trim_end().to_owned()
}

/// Sends `bytes` through an upgraded tunnel and asserts that the test upstream echoes them.
pub async fn assert_echoed(tunnel: &mut BufReader<TcpStream>, bytes: &[u8]) {
    tunnel.get_mut().write_all(bytes).await.unwrap();
    let mut echoed = vec![0u8; bytes.len()];
    bounded(tunnel.read_exact(&mut echoed)).await.unwrap();
    assert_eq!(echoed, bytes);
}

/// POSTs a JSON `body` to `url`, with a bearer `token` when given: (status, JSON body or null).
pub async fn post_json(
    client: &reqwest::Client,
    url: String,
    token: Option<&str>,
    body: serde_json::Value,
) -> (u16, serde_json::Value) {
    let mut request = client
        .post(url)
        .header("content-type", "application/json")
        .body(body.to_string());
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    let text = response.text().await.unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or(serde_json::Value::Null),
    )
}

/// A plain HTTP client for talking to the servers under test.
pub fn http_client() -> reqwest::Client {
    // reqwest is built without a bundled TLS crypto provider (see wechat/mod.rs).
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .no_proxy()
        .timeout(ANSWER_BOUND)
        .build()
        .unwrap()
}

/// An HTTP/2 connection to `addr` without TLS (h2c, prior knowledge), driven in the background.
pub async fn h2c<B>(addr: SocketAddr) -> hyper::client::conn::http2::SendRequest<B>
where
    B: http_body::Body + Send + Unpin + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let stream = TcpStream::connect(addr).await.unwrap();
    let (sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(connection);
    sender
}

/// Reads from `stream` until `bytes` holds `end`; everything read.
pub async fn read_until(stream: &mut TcpStream, end: &[u8]) -> String {
    let mut bytes = Vec::new();
    let mut buffer = [0u8; 4096];
    while !bytes.windows(end.len()).any(|window| window == end) {
        let read = bounded(stream.read(&mut buffer)).await.unwrap();
        assert!(read > 0, "closed before {:?}", String::from_utf8_lossy(end));
        bytes.extend_from_slice(&buffer[..read]);
    }
    String::from_utf8(bytes).unwrap()
}

/// Awaits a read from one of the servers under test, failing the test after [`ANSWER_BOUND`].
pub async fn bounded<T>(read: impl Future<Output = T>) -> T {
    tokio::time::timeout(ANSWER_BOUND, read)
        .await
        .expect("nothing came within the answer bound")
}

/// The headers the echo upstream reported, lower-cased names.
pub fn echoed_header<'a>(echo: &'a serde_json::Value, name: &str) -> Vec<&'a str> {
    echo["headers"]
        .as_array()
        .map(|headers| {
            headers
                .iter()
                .filter(|pair| pair[0].as_str() == Some(name))
                .filter_map(|pair| pair[1].as_str())
                .collect()
        })
        .unwrap_or_default()
}

pub fn config_text(setup: &Setup, mock: SocketAddr, upstream: SocketAddr) -> String {
    let hosts = setup
        .wechat_hosts
        .clone()
        .unwrap_or_else(|| vec![format!("http://{mock}")]);
    let hosts = hosts
        .iter()
        .map(|h| format!("\"{h}\""))
        .collect::<Vec<_>>()
        .join(", ");
    let mut extra_app = String::new();
    if setup.extra_apps {
        extra_app +=
            &format!("\n[[wechat.apps]]\nappid = \"{OTHER_APPID}\"\nsecret = \"{APP_SECRET}-b\"\n");
    }
    if let Some(appid) = setup.sample_app {
        extra_app +=
            &format!("\n[[wechat.apps]]\nappid = \"{appid}\"\nsecret = \"{APP_SECRET}-s\"\n");
    }
    let server_extra = &setup.server_extra;
    let timeout = setup.wechat_timeout;
    let store = &setup.store;
    let (access_ttl, leeway) = (setup.access_ttl, setup.leeway);
    format!(
        r#"
[server]
listen = "127.0.0.1:0"
admin_listen = ""
max_body_bytes = {MAX_BODY}
{server_extra}

[wechat]
hosts = [{hosts}]
timeout = "{timeout}"

[[wechat.apps]]
appid = "{APPID}"
secret = "{APP_SECRET}"
{extra_app}
[token]
secret = "{JWT_SECRET}"
access_ttl = "{access_ttl}"
leeway = "{leeway}"

[store]
{store}

[[routes]]
path = "/api/"
upstream = "http://{upstream}"
auth = "required"

[[routes]]
path = "/api/public/"
upstream = "http://{upstream}"
auth = "public"

[[routes]]
path = "/api/optional/"
upstream = "http://{upstream}"
auth = "optional"

[[routes]]
path = "/api/get-only/"
upstream = "http://{upstream}"
auth = "required"
methods = ["GET"]

[[routes]]
path = "/api/app-a/"
upstream = "http://{upstream}"
auth = "required"
apps = ["{APPID}"]

[[routes]]
path = "/strip/"
upstream = "http://{upstream}"
auth = "public"
strip_prefix = true

[[routes]]
path = "/hurry/"
upstream = "http://{upstream}"
auth = "public"
timeout = "300ms"

[[routes]]
path = "/down/"
upstream = "http://{closed}"
auth = "public"
"#,
        closed = closed_port_addr(),
    ) + &setup.sections.replace("{upstream}", &upstream.to_string())
}

/// A WeChat stand-in whose code2Session answers wait until the test releases them: for what
/// becomes of a login while its exchange is in flight. Each code works once, as WeChat's do
/// (used as it arrives, answered or not), and every request is counted as it arrives. Users
/// are the mock WeChat's: the same openid and session_key for the same code.
pub struct HeldWechat {
    pub addr: SocketAddr,
    shared: Arc<HeldShared>,
}

struct HeldShared {
    arrivals: Mutex<Vec<String>>,
    arrived: Notify,
    released: tokio::sync::watch::Sender<bool>,
}

impl HeldWechat {
    pub async fn start() -> HeldWechat {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shared = Arc::new(HeldShared {
            arrivals: Mutex::new(Vec::new()),
            arrived: Notify::new(),
            released: tokio::sync::watch::Sender::new(false),
        });
        let serving = shared.clone();
        tokio::spawn(wxgate::mock::serve(listener, move |request| {
            held_answer(request, serving.clone())
        }));
        HeldWechat { addr, shared }
    }

    /// code2Session requests so far, answered or not.
    pub fn calls(&self) -> usize {
        self.shared.arrivals.lock().unwrap().len()
    }

    /// Waits until `count` code2Session requests have arrived.
    pub async fn arrived(&self, count: usize) {
        let arrived = async {
            loop {
                let notified = self.shared.arrived.notified();
                if self.calls() >= count {
                    return;
                }
                notified.await;
            }
        };
        tokio::time::timeout(Duration::from_secs(30), arrived)
            .await
            .expect("the code never reached WeChat");
    }

    /// Lets every held answer go, and every later one at once.
    pub fn release(&self) {
        self.shared.released.send_replace(true);
    }
}

async fn held_answer(request: Request<Incoming>, shared: Arc<HeldShared>) -> Response<Full<Bytes>> {
    let params: std::collections::HashMap<String, String> =
        form_urlencoded::parse(request.uri().query().unwrap_or("").as_bytes())
            .into_owned()
            .collect();
    let appid = params.get("appid").cloned().unwrap_or_default();
    let code = params.get("js_code").cloned().unwrap_or_default();
    let first_use = {
        let mut arrivals = shared.arrivals.lock().unwrap();
        let first_use = !arrivals.contains(&code);
        arrivals.push(code.clone());
        first_use
    };
    shared.arrived.notify_waiters();
    let _ = shared
        .released
        .subscribe()
        .wait_for(|released| *released)
        .await;
    let answer = if first_use {
        serde_json::json!({
            "openid": MockWechat::openid_for(&appid, &code),
            "session_key": MockWechat::session_key_for(&appid, &code).expose(),
        })
    } else {
        serde_json::json!({"errcode": 40163, "errmsg": "code been used"})
    };
    Response::new(Full::new(Bytes::from(answer.to_string())))
}

/// A `redis-server` of the test's own, on a free port, without persistence; killed when
/// dropped.
pub struct RedisServer {
    pub port: u16,
    password: Option<&'static str>,
    child: Child,
}

impl RedisServer {
    pub async fn start() -> RedisServer {
        RedisServer::start_with(None).await
    }

    pub async fn start_with(password: Option<&'static str>) -> RedisServer {
        // The port can be taken between finding it free and redis binding it; redis then
        // exits, and another port is tried.
        for _ in 0..5 {
            let port = closed_port_addr().port();
            if let Some(child) = RedisServer::spawn(port, password).await {
                return RedisServer {
                    port,
                    password,
                    child,
                };
            }
        }
        panic!("redis-server did not start (five ports tried)");
    }

    /// Starts redis on `port` and waits for it to say it accepts connections; `None` when it
    /// exits first (its port was taken).
    async fn spawn(port: u16, password: Option<&str>) -> Option<Child> {
        let port = port.to_string();
        let mut args = vec![
            "--port",
            &port,
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ];
        if let Some(password) = password {
            args.extend(["--requirepass", password]);
        }
        let mut child = match std::process::Command::new("redis-server")
            .args(args)
            .stdout(Stdio::piped())
            .spawn()
        {
            Ok(child) => child,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => panic!(
                "redis-server is not installed, and the redis tests need it: \
                 apt-get install redis-server (.ci/run installs it)"
            ),
            Err(err) => panic!("cannot start redis-server: {err}"),
        };
        let ready = log_line(child.stdout.take().unwrap(), "Ready to accept connections");
        // The bound only keeps a broken install from hanging the suite.
        match tokio::time::timeout(Duration::from_secs(30), ready).await {
            Ok(Ok(())) => Some(child),
            Ok(Err(_)) => {
                let _ = child.wait();
                None
            }
            Err(_) => panic!("redis-server never said it was ready"),
        }
    }

    /// Stops the server and starts an empty one on the same port: a redis restart without
    /// persistence.
    pub async fn restart(&mut self) {
        self.stop();
        self.start_again().await;
    }

    /// Starts an empty server on the port of one stopped: redis back after an outage.
    pub async fn start_again(&mut self) {
        self.child = RedisServer::spawn(self.port, self.password)
            .await
            .expect("redis-server did not restart on its port");
    }

    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn url(&self) -> String {
        match self.password {
            Some(password) => format!("redis://:{password}@127.0.0.1:{}/0", self.port),
            None => format!("redis://127.0.0.1:{}/0", self.port),
        }
    }

    /// A connection of the test's own, to look at what the gateway stored.
    pub async fn client(&self) -> redis::aio::MultiplexedConnection {
        redis::Client::open(self.url())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Resolves once a line of `output` contains `wanted`, and fails if the output ends first
/// (the process exited). The rest of the output is read on, and dropped, so that the process
/// never blocks on a full pipe.
fn log_line(
    output: impl std::io::Read + Send + 'static,
    wanted: &'static str,
) -> oneshot::Receiver<()> {
    let (seen, said) = oneshot::channel();
    std::thread::spawn(move || {
        let mut seen = Some(seen);
        for line in std::io::BufReader::new(output)
            .lines()
            .map_while(Result::ok)
        {
            if line.contains(wanted)
                && let Some(seen) = seen.take()
            {
                let _ = seen.send(());
            }
        }
    });
    said
}

/// `wxgate serve` as a process of its own: the real binary on a config file.
pub struct GatewayProcess {
    pub addr: SocketAddr,
    child: Child,
}

impl GatewayProcess {
    /// Starts the binary on `config` and returns once it listens.
    pub async fn start(config: &Path) -> GatewayProcess {
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_wxgate"))
            .args(["--log-format", "json", "serve", "--config"])
            .arg(config)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let (listening, said) = oneshot::channel::<SocketAddr>();
        let stderr = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            let mut listening = Some(listening);
            for line in std::io::BufReader::new(stderr)
                .lines()
                .map_while(Result::ok)
            {
                let Ok(event) = serde_json::from_str::<serde_json::Value>(&line) else {
                    continue;
                };
                if event["message"] == "wxgate listening"
                    && let Some(listening) = listening.take()
                    && let Some(addr) = event["addr"].as_str()
                {
                    let _ = listening.send(addr.parse().unwrap());
                }
            }
        });
        let addr = tokio::time::timeout(Duration::from_secs(60), said)
            .await
            .expect("wxgate never said it was listening")
            .expect("wxgate exited before listening");
        GatewayProcess { addr, child }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// Ends the process as a crash would: SIGKILL, with no chance to shut down.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for GatewayProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A fresh folder under the system temp dir, removed when dropped.
pub struct TempDir(std::path::PathBuf);

impl TempDir {
    pub fn new(purpose: &str) -> TempDir {
        let path = std::env::temp_dir().join(format!(
            "wxgate-{purpose}-{}",
            uuid::Uuid::new_v4().simple()
        ));
        std::fs::create_dir_all(&path).unwrap();
        TempDir(path)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The gateway's config as the harness writes it, with the embedded store at `store_path`: for
/// running the real binary on it.
pub fn embedded_config(store_path: &Path, mock: SocketAddr, upstream: SocketAddr) -> String {
    let setup = Setup {
        store: format!(
            "backend = \"embedded\"\npath = \"{}\"",
            store_path.display()
        ),
        ..Setup::default()
    };
    config_text(&setup, mock, upstream)
}

/// An address where nothing listens: bound once, then released.
pub fn closed_port_addr() -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap()
}

/// An upstream that answers every request with an endless body, and tells when a connection
/// it was writing to is closed under it.
pub async fn endless_upstream() -> (SocketAddr, Arc<Notify>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let closed = Arc::new(Notify::new());
    let told = closed.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let told = told.clone();
            tokio::spawn(async move {
                let mut stream = BufReader::new(stream);
                read_request(&mut stream).await.unwrap();
                let head = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", 1u64 << 40);
                let stream = stream.get_mut();
                let mut written = stream.write_all(head.as_bytes()).await;
                let piece = vec![b'x'; 64 * 1024];
                while written.is_ok() {
                    written = stream.write_all(&piece).await;
                }
                told.notify_one();
            });
        }
    });
    (addr, closed)
}
