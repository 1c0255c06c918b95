//! HTTP/2 without TLS (h2c), upgrades (WebSocket) with the auth decision at upgrade time,
//! clients that trickle their headers, send nothing or take nothing of an answer, idle
//! connections, and the connection cap.

mod common;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use common::{
    ANSWER_BOUND, APPID, Harness, Setup, assert_echoed, bounded, echoed_header, greeting,
    read_answer, read_answers, websocket,
};
use http_body_util::{BodyExt, Empty, StreamBody};
use hyper::body::Frame;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use wxgate::mock::wechat::MockWechat;

/// How long a test waits for the gateway to close a connection before calling it a failure:
/// far past any `header_timeout` the tests set, only there to keep a broken gateway from
/// hanging the suite.
const CLOSE_BOUND: Duration = Duration::from_secs(20);

/// Reads until the gateway closes the connection; panics if it never does.
async fn closed_by_the_gateway(stream: &mut TcpStream, what: &str) {
    let mut rest = Vec::new();
    let read = tokio::time::timeout(CLOSE_BOUND, stream.read_to_end(&mut rest)).await;
    assert!(read.is_ok(), "{what}: the connection was not closed");
}

/// The status of `GET path`, bounded like [`closed_by_the_gateway`].
async fn served(gw: &Harness, path: &str) -> u16 {
    tokio::time::timeout(CLOSE_BOUND, gw.get(path, &[]))
        .await
        .expect("the request was never answered")
        .0
}

/// A gateway that gives clients 300 ms to start a request or to sit idle.
async fn impatient(extra: &str) -> Harness {
    Harness::start_with(Setup {
        server_extra: format!("header_timeout = \"300ms\"\n{extra}"),
        ..Setup::default()
    })
    .await
}

/// Sends a WebSocket handshake for `path`, with a spoofed identity header and the bearer
/// `token` if given.
async fn upgrade(gw: &Harness, path: &str, token: Option<&str>) -> (u16, BufReader<TcpStream>) {
    let authorization = token.map(|token| format!("Bearer {token}"));
    let mut headers = vec![("X-WX-OpenID", "spoofed")];
    if let Some(authorization) = &authorization {
        headers.push(("Authorization", authorization));
    }
    websocket(gw.addr, path, &headers).await
}

#[tokio::test]
async fn websocket_through_a_required_route_carries_the_identity() {
    let gw = Harness::start().await;
    let token = gw.token("wendy").await;
    let (status, mut stream) = upgrade(&gw, "/api/ws", Some(&token)).await;
    assert_eq!(status, 101);
    assert_eq!(
        greeting(&mut stream).await,
        format!("openid={}", MockWechat::openid_for(APPID, "wendy"))
    );
    assert_echoed(&mut stream, b"ping").await;
}

#[tokio::test]
async fn websocket_without_a_token_is_refused_on_a_required_route() {
    let gw = Harness::start().await;
    let (status, _) = upgrade(&gw, "/api/ws", None).await;
    assert_eq!(status, 401);
}

#[tokio::test]
async fn websocket_on_an_optional_route_carries_the_identity_when_a_token_is_sent() {
    let gw = Harness::start().await;
    let token = gw.token("yara").await;
    let (status, mut stream) = upgrade(&gw, "/api/optional/ws", Some(&token)).await;
    assert_eq!(status, 101);
    assert_eq!(
        greeting(&mut stream).await,
        format!("openid={}", MockWechat::openid_for(APPID, "yara"))
    );

    let (status, mut stream) = upgrade(&gw, "/api/optional/ws", None).await;
    assert_eq!(status, 101);
    assert_eq!(greeting(&mut stream).await, "openid=");

    let (status, _) = upgrade(&gw, "/api/optional/ws", Some("not-a-token")).await;
    assert_eq!(status, 401);
}

#[tokio::test]
async fn an_h2c_upgrade_is_never_asked_of_the_upstream() {
    let gw = Harness::start().await;
    // Were the upstream to switch, the client would speak HTTP/2 straight to it, past routes,
    // tokens and header rules. The second request does not even name HTTP2-Settings as
    // hop-by-hop.
    for connection in ["Upgrade, HTTP2-Settings", "Upgrade"] {
        let (status, echo) = gw
            .raw(&format!(
                "GET /api/public/x HTTP/1.1\r\nHost: x\r\nConnection: {connection}\r\n\
                 Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n"
            ))
            .await;
        assert_eq!(status, 200, "{connection}");
        for header in ["upgrade", "http2-settings", "connection"] {
            assert!(
                echoed_header(&echo, header).is_empty(),
                "{connection}: the upstream saw {header}"
            );
        }
    }
}

#[tokio::test]
async fn websocket_on_a_public_route_carries_no_identity() {
    let gw = Harness::start().await;
    let (status, mut stream) = upgrade(&gw, "/api/public/ws", None).await;
    assert_eq!(status, 101);
    assert_eq!(greeting(&mut stream).await, "openid=");
}

#[tokio::test]
async fn an_upgraded_client_that_stops_reading_is_cut_off_after_header_timeout() {
    let gw = impatient("").await;
    let (status, mut stream) = upgrade(&gw, "/api/public/ws", None).await;
    assert_eq!(status, 101);
    assert_eq!(greeting(&mut stream).await, "openid=");
    // The client sends and sends, and reads none of what the upstream echoes: once every
    // buffer on the way is full, the gateway gives up on it and closes the connection, which
    // the next write finds.
    let flood = vec![b'x'; 1 << 20];
    let cut_off = tokio::time::timeout(CLOSE_BOUND, async {
        loop {
            if let Err(err) = stream.get_mut().write_all(&flood).await {
                break err;
            }
        }
    })
    .await;
    assert!(cut_off.is_ok(), "the stalled tunnel was not closed");
    assert_eq!(served(&gw, "/api/public/after").await, 200);
}

/// The timer the kernel keeps for the gateway's side of the connection from `client`, as
/// `/proc/net/tcp` shows it: its kind (2 is keep-alive, on an established connection) and how
/// far off it is, in ticks of USER_HZ (100 a second).
fn gateway_side_timer(gateway: SocketAddr, client: SocketAddr) -> (u8, u64) {
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap();
    let port = |addr: SocketAddr| format!(":{:04X}", addr.port());
    for line in table.lines().skip(1) {
        // sl, local_address, rem_address, st, tx_queue:rx_queue, tr:tm->when, ...
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields[1].ends_with(&port(gateway)) && fields[2].ends_with(&port(client)) {
            let (kind, when) = fields[5].split_once(':').unwrap();
            return (
                u8::from_str_radix(kind, 16).unwrap(),
                u64::from_str_radix(when, 16).unwrap(),
            );
        }
    }
    panic!("no socket from {client} to {gateway} in /proc/net/tcp");
}

#[tokio::test]
async fn a_quiet_tunnel_has_its_client_probed_for_being_alive_and_stays_open() {
    let gw = Harness::start_with(Setup {
        server_extra: "header_timeout = \"2s\"".into(),
        ..Setup::default()
    })
    .await;
    let (status, mut tunnel) = upgrade(&gw, "/api/public/ws", None).await;
    assert_eq!(status, 101);
    assert_eq!(greeting(&mut tunnel).await, "openid=");
    let client = tunnel.get_ref().local_addr().unwrap();
    // On loopback the kernel answers for every socket, so a client that vanished without a FIN
    // cannot be made here; what can be seen is the kernel about to probe a silent client
    // after header_timeout (not the system's default of two hours).
    let (kind, ticks) = gateway_side_timer(gw.addr, client);
    assert_eq!(kind, 2, "no keep-alive timer on the gateway's side");
    assert!(
        ticks <= 200,
        "the first probe is {ticks} ticks away, not 2 s"
    );
    // Once a probe has gone out, the next is due a probe interval (10 s) later. The kernel
    // tells no one when it probes, so its timer is looked at until it moves.
    let probed = async {
        while gateway_side_timer(gw.addr, client).1 <= 200 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    assert!(
        tokio::time::timeout(CLOSE_BOUND, probed).await.is_ok(),
        "no probe went out"
    );
    // The client's kernel answered it: the tunnel, quiet for longer than header_timeout, is
    // as it was.
    assert_echoed(&mut tunnel, b"still here").await;
}

#[tokio::test]
async fn h2c_request_is_proxied_with_the_identity() {
    let gw = Harness::start().await;
    let token = gw.token("xavi").await;
    let _ = rustls::crypto::ring::default_provider().install_default();
    let h2 = reqwest::Client::builder()
        .no_proxy()
        .http2_prior_knowledge()
        .timeout(ANSWER_BOUND)
        .build()
        .unwrap();
    let response = h2
        .get(gw.url("/api/orders?x=1"))
        .bearer_auth(&token)
        .header("x-wx-openid", "spoofed")
        .send()
        .await
        .unwrap();
    assert_eq!(response.version(), reqwest::Version::HTTP_2);
    assert_eq!(response.status(), 200);
    let echo: serde_json::Value = serde_json::from_str(&response.text().await.unwrap()).unwrap();
    let openid = MockWechat::openid_for(APPID, "xavi");
    assert_eq!(echoed_header(&echo, "x-wx-openid"), [openid.as_str()]);
    assert_eq!(echo["uri"], "/api/orders?x=1");
    assert_eq!(echoed_header(&echo, "host"), [gw.addr.to_string().as_str()]);
}

#[tokio::test]
async fn an_h2c_get_with_a_body_of_unknown_length_passes_it_on() {
    let gw = Harness::start().await;
    let mut sender = common::h2c(gw.addr).await;
    let frames =
        ["hello", " world"].map(|part| Ok::<_, Infallible>(Frame::data(Bytes::from(part))));
    let request = http::Request::get(gw.url("/api/public/echo-body"))
        .body(StreamBody::new(futures_util::stream::iter(frames)))
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    assert_eq!(response.status(), 200);
    let echoed = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(echoed, "hello world");
}

#[tokio::test]
async fn a_client_trickling_its_headers_is_cut_off() {
    let gw = Harness::start_with(Setup {
        server_extra: "header_timeout = \"300ms\"".into(),
        ..Setup::default()
    })
    .await;
    let mut stream = TcpStream::connect(gw.addr).await.unwrap();
    stream
        .write_all(b"GET /api/public/x HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    // The gateway ends the connection: reading reaches its end. The outer timeout only keeps a
    // broken gateway from hanging the test suite.
    let mut rest = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(20), stream.read_to_end(&mut rest)).await;
    assert!(read.is_ok(), "the connection was not closed");
    // Other clients are served as usual.
    assert_eq!(gw.get("/api/public/x", &[]).await.0, 200);
}

#[tokio::test]
async fn a_client_that_sends_nothing_is_closed_and_frees_its_slot() {
    let gw = impatient("max_connections = 1").await;
    let mut silent = TcpStream::connect(gw.addr).await.unwrap();
    // With the only slot taken by a client that never speaks, this one is served only once
    // the gateway gives up on the first.
    assert_eq!(served(&gw, "/api/public/x").await, 200);
    closed_by_the_gateway(&mut silent, "silent client").await;
}

#[tokio::test]
async fn a_client_that_stops_inside_the_http2_preface_is_closed() {
    let gw = impatient("max_connections = 1").await;
    let mut stalled = TcpStream::connect(gw.addr).await.unwrap();
    stalled.write_all(b"PRI * HTTP").await.unwrap();
    assert_eq!(served(&gw, "/api/public/x").await, 200);
    closed_by_the_gateway(&mut stalled, "half a preface").await;
}

#[tokio::test]
async fn an_idle_h2c_connection_is_closed_though_it_answers_pings() {
    let gw = impatient("").await;
    let stream = TcpStream::connect(gw.addr).await.unwrap();
    let (mut sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    // The client side answers the gateway's keep-alive pings for as long as it runs.
    let connection = tokio::spawn(connection);
    let request = http::Request::get(gw.url("/api/public/x"))
        .body(Empty::<Bytes>::new())
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    assert_eq!(response.status(), 200);
    response.into_body().collect().await.unwrap();
    let ended = tokio::time::timeout(CLOSE_BOUND, connection).await;
    assert!(ended.is_ok(), "the idle h2c connection was not closed");
}

#[tokio::test]
async fn an_idle_http1_keep_alive_connection_is_closed() {
    let gw = impatient("").await;
    let mut stream = TcpStream::connect(gw.addr).await.unwrap();
    stream
        .write_all(b"GET /api/public/x HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    assert_eq!(read_answer(&mut stream).await.0, 200);
    closed_by_the_gateway(&mut stream, "idle keep-alive connection").await;
}

#[tokio::test]
async fn the_connection_cap_holds_further_clients_until_a_slot_frees() {
    let gw = Harness::start_with(Setup {
        server_extra: "max_connections = 1".into(),
        ..Setup::default()
    })
    .await;
    let request = b"GET /api/public/x HTTP/1.1\r\nHost: x\r\n\r\n";
    let mut first = TcpStream::connect(gw.addr).await.unwrap();
    first.write_all(request).await.unwrap();
    assert_eq!(read_answer(&mut first).await.0, 200);

    // The kernel completes the second connection, but the gateway leaves it in the backlog.
    let mut second = TcpStream::connect(gw.addr).await.unwrap();
    second.write_all(request).await.unwrap();
    // A round trip through the gateway and the upstream after the second client sent its
    // request: it was not served meanwhile.
    first.write_all(request).await.unwrap();
    assert_eq!(read_answer(&mut first).await.0, 200);
    assert_eq!(gw.upstream.requests_seen(), 2);
    let mut byte = [0u8; 1];
    assert!(
        matches!(second.try_read(&mut byte), Err(err) if err.kind() == std::io::ErrorKind::WouldBlock),
        "the second client was answered while the only slot was taken"
    );

    drop(first);
    let answered = tokio::time::timeout(CLOSE_BOUND, read_answer(&mut second)).await;
    assert_eq!(answered.expect("the freed slot was never used").0, 200);
    assert_eq!(gw.upstream.requests_seen(), 3);
}

#[tokio::test]
async fn a_request_head_over_64_kib_gets_431_on_both_paths_and_one_at_it_passes() {
    let gw = Harness::start().await;
    // A head of `len` bytes, its blank line included.
    let head_of = |len: usize| {
        let bare = "GET /api/public/x HTTP/1.1\r\nHost: x\r\nX-Pad: \r\n\r\n";
        bare.replace(
            "X-Pad: ",
            &format!("X-Pad: {}", "p".repeat(len - bare.len())),
        )
    };
    let limit = 64 * 1024;
    // The first request of a connection is read by the fast lane; after a request with a
    // body, hyper reads the connection.
    let to_hyper = "POST /api/public/x HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n\r\nx";
    for before in ["", to_hyper] {
        let mut stream = TcpStream::connect(gw.addr).await.unwrap();
        let request = format!("{before}{}", head_of(limit));
        stream.write_all(request.as_bytes()).await.unwrap();
        let answers = read_answers(&mut stream, 1 + usize::from(!before.is_empty())).await;
        assert_eq!(answers.last().unwrap().0, 200, "after {before:?}");

        let mut stream = TcpStream::connect(gw.addr).await.unwrap();
        let request = format!("{before}{}", head_of(limit + 1));
        stream.write_all(request.as_bytes()).await.unwrap();
        // The gateway closes with the rest of the head unread, which resets the connection
        // once the answer is in: what came before the reset is what counts.
        let mut answer = Vec::new();
        let _ = bounded(stream.read_to_end(&mut answer)).await;
        let answer = String::from_utf8_lossy(&answer);
        let last = answer.rsplit("HTTP/1.1 ").next().unwrap();
        assert!(last.starts_with("431 "), "after {before:?}: {answer}");
    }
}

#[tokio::test]
async fn oversized_request_headers_get_431() {
    let gw = Harness::start().await;
    let huge = "a".repeat(70 * 1024);
    let (status, _) = gw
        .raw(&format!(
            "GET /api/public/x HTTP/1.1\r\nHost: x\r\nX-Big: {huge}\r\n\r\n"
        ))
        .await;
    assert_eq!(status, 431);
    let (status, _) = gw.get("/api/public/x", &[]).await;
    assert_eq!(status, 200);
}

/// An upstream that answers `first`, is silent for `pause`, then answers `second` and ends.
async fn pausing_upstream(pause: Duration) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut stream = BufReader::new(stream);
                common::read_request(&mut stream).await.unwrap();
                let stream = stream.get_mut();
                let head = "HTTP/1.1 200 OK\r\nContent-Length: 11\r\n\r\nfirst";
                stream.write_all(head.as_bytes()).await.unwrap();
                tokio::time::sleep(pause).await;
                stream.write_all(b"second").await.unwrap();
            });
        }
    });
    addr
}

#[tokio::test]
async fn an_http2_client_that_never_opens_its_window_is_cut_off_after_header_timeout() {
    let (endless, closed) = common::endless_upstream().await;
    // Longer than header_timeout, shorter than the route's timeout: the upstream's silence is
    // the route's to judge, not the client's.
    let pausing = pausing_upstream(Duration::from_secs(1)).await;
    let gw = Harness::start_with(Setup {
        server_extra: "header_timeout = \"300ms\"".into(),
        sections: format!(
            "[[routes]]\npath = \"/s/\"\nupstream = \"http://{endless}\"\nauth = \"public\"\n\
             [[routes]]\npath = \"/p/\"\nupstream = \"http://{pausing}\"\nauth = \"public\"\n\
             timeout = \"10s\"\n"
        ),
        ..Setup::default()
    })
    .await;
    let stream = TcpStream::connect(gw.addr).await.unwrap();
    // The client answers the gateway's pings, so the connection stays alive, but it takes
    // nothing of the endless answer: its window, once the first 16 KiB have filled it, never
    // opens.
    let (mut sender, connection) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .initial_stream_window_size(16 * 1024)
        .handshake(TokioIo::new(stream))
        .await
        .unwrap();
    let connection = tokio::spawn(connection);
    let get = |path: &str| {
        http::Request::get(gw.url(path))
            .body(Empty::<Bytes>::new())
            .unwrap()
    };
    let paused = bounded(sender.send_request(get("/p/paused")))
        .await
        .unwrap();
    let paused = bounded(paused.into_body().collect()).await.unwrap();
    assert_eq!(paused.to_bytes(), "firstsecond");
    let endless = bounded(sender.send_request(get("/s/endless")))
        .await
        .unwrap();
    assert_eq!(endless.status(), 200);
    // The gateway gives up on the client, and on the upstream connection that feeds it.
    bounded(closed.notified()).await;
    bounded(connection).await.unwrap().unwrap_or_default();
    drop(endless);
    let (status, _) = gw.get("/api/public/after", &[]).await;
    assert_eq!(status, 200);
}

/// A client connection that stops reading from its socket once told to, and never wakes.
struct Deaf {
    stream: TcpStream,
    deaf: Arc<AtomicBool>,
}

impl AsyncRead for Deaf {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if self.deaf.load(Ordering::Relaxed) {
            return Poll::Pending;
        }
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Deaf {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

#[tokio::test]
async fn an_http2_client_that_stops_reading_its_socket_is_cut_off() {
    let (endless, closed) = common::endless_upstream().await;
    let gw = Harness::start_with(Setup {
        server_extra: "header_timeout = \"300ms\"".into(),
        sections: format!(
            "[[routes]]\npath = \"/s/\"\nupstream = \"http://{endless}\"\nauth = \"public\"\n"
        ),
        ..Setup::default()
    })
    .await;
    let deaf = Arc::new(AtomicBool::new(false));
    let stream = Deaf {
        stream: TcpStream::connect(gw.addr).await.unwrap(),
        deaf: deaf.clone(),
    };
    // Windows wide enough that the client's socket fills before they do.
    let (mut sender, connection) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .initial_stream_window_size(64 << 20)
        .initial_connection_window_size(64 << 20)
        .handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(connection);
    let request = http::Request::get(gw.url("/s/endless"))
        .body(Empty::<Bytes>::new())
        .unwrap();
    let answer = bounded(sender.send_request(request)).await.unwrap();
    assert_eq!(answer.status(), 200);
    deaf.store(true, Ordering::Relaxed);
    // The gateway gives up on the client, and on the upstream connection that feeds it.
    bounded(closed.notified()).await;
    drop(answer);
    let (status, _) = gw.get("/api/public/after", &[]).await;
    assert_eq!(status, 200);
}
