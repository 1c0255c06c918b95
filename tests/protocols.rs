//! HTTP/2 without TLS (h2c), upgrades (WebSocket) with the auth decision at upgrade time, and
//! clients that trickle their headers.

mod common;

use std::time::Duration;

use common::{APPID, Harness, Setup, echoed_header};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use wxgate::mock::wechat::MockWechat;

/// Sends a WebSocket handshake for `path`; answers the status and, on 101, the open stream.
async fn upgrade(gw: &Harness, path: &str, token: Option<&str>) -> (u16, BufReader<TcpStream>) {
    let mut stream = TcpStream::connect(gw.addr).await.unwrap();
    let mut head = format!(
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
         X-WX-OpenID: spoofed\r\n"
    );
    if let Some(token) = token {
        head.push_str(&format!("Authorization: Bearer {token}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).await.unwrap();
    let mut reader = BufReader::new(stream);
    let mut status_line = String::new();
    reader.read_line(&mut status_line).await.unwrap();
    let status = status_line[9..12].parse().unwrap();
    loop {
        let mut line = String::new();
        reader.read_line(&mut line).await.unwrap();
        if line == "\r\n" || line.is_empty() {
            break;
        }
    }
    (status, reader)
}

#[tokio::test]
async fn websocket_through_a_required_route_carries_the_identity() {
    let gw = Harness::start().await;
    let token = gw.token("wendy").await;
    let (status, mut stream) = upgrade(&gw, "/api/ws", Some(&token)).await;
    assert_eq!(status, 101);
    let mut greeting = String::new();
    stream.read_line(&mut greeting).await.unwrap();
    assert_eq!(
        greeting.trim_end(),
        format!("openid={}", MockWechat::openid_for(APPID, "wendy"))
    );
    stream.get_mut().write_all(b"ping").await.unwrap();
    let mut echoed = [0u8; 4];
    stream.read_exact(&mut echoed).await.unwrap();
    assert_eq!(&echoed, b"ping");
}

#[tokio::test]
async fn websocket_without_a_token_is_refused_on_a_required_route() {
    let gw = Harness::start().await;
    let (status, _) = upgrade(&gw, "/api/ws", None).await;
    assert_eq!(status, 401);
}

#[tokio::test]
async fn websocket_on_a_public_route_carries_no_identity() {
    let gw = Harness::start().await;
    let (status, mut stream) = upgrade(&gw, "/api/public/ws", None).await;
    assert_eq!(status, 101);
    let mut greeting = String::new();
    stream.read_line(&mut greeting).await.unwrap();
    assert_eq!(greeting.trim_end(), "openid=");
}

#[tokio::test]
async fn h2c_request_is_proxied_with_the_identity() {
    let gw = Harness::start().await;
    let token = gw.token("xavi").await;
    let _ = rustls::crypto::ring::default_provider().install_default();
    let h2 = reqwest::Client::builder()
        .no_proxy()
        .http2_prior_knowledge()
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
