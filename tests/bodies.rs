//! Bodies stream through both ways; oversized ones are stopped; a broken or slow upstream gets
//! a clean JSON error and the gateway goes on serving.

mod common;

use std::convert::Infallible;
use std::time::Duration;

use bytes::Bytes;

use common::{BodySeen, Harness, MAX_BODY, Setup, bounded, pattern};
use futures_util::StreamExt;
use http_body::Frame;
use http_body_util::{BodyExt, Either, Empty, StreamBody};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

#[tokio::test]
async fn eight_megabyte_response_passes_byte_for_byte() {
    let gw = Harness::start().await;
    let len = 8 * 1024 * 1024;
    let response = gw
        .client
        .get(gw.url(&format!("/api/public/bytes/{len}")))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let body = response.bytes().await.unwrap();
    assert_eq!(body.len(), len);
    assert!(body[..] == pattern(len)[..]);
}

/// Writes a chunked POST head and `chunks` on a new connection, then reads the answer.
async fn send_chunked(gw: &Harness, path: &str, chunks: &[Vec<u8>]) -> (u16, Vec<u8>) {
    send_coded(gw, "POST", path, &["chunked"], chunks).await
}

/// Writes a request head with a `Transfer-Encoding` line for each of `codings`, then `chunks`
/// in chunked framing, on a new connection, and reads the answer.
async fn send_coded(
    gw: &Harness,
    method: &str,
    path: &str,
    codings: &[&str],
    chunks: &[Vec<u8>],
) -> (u16, Vec<u8>) {
    let mut stream = TcpStream::connect(gw.addr).await.unwrap();
    let coding_lines: String = codings
        .iter()
        .map(|coding| format!("Transfer-Encoding: {coding}\r\n"))
        .collect();
    let head =
        format!("{method} {path} HTTP/1.1\r\nHost: x\r\n{coding_lines}Connection: close\r\n\r\n");
    stream.write_all(head.as_bytes()).await.unwrap();
    for chunk in chunks {
        // The gateway may answer (and close) before the client is done writing: a failed
        // write is then expected, and the answer below is what counts.
        let framed = [
            format!("{:x}\r\n", chunk.len()).into_bytes(),
            chunk.clone(),
            b"\r\n".to_vec(),
        ]
        .concat();
        if stream.write_all(&framed).await.is_err() {
            break;
        }
    }
    let _ = stream.write_all(b"0\r\n\r\n").await;
    let mut answer = Vec::new();
    let _ = bounded(stream.read_to_end(&mut answer)).await;
    let head_end = answer
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("no answer head")
        + 4;
    let status = String::from_utf8_lossy(&answer[9..12]).parse().unwrap();
    (status, answer[head_end..].to_vec())
}

#[tokio::test]
async fn streamed_request_body_passes_byte_for_byte() {
    let gw = Harness::start().await;
    let body = pattern(60 * 1024);
    let chunks: Vec<Vec<u8>> = body.chunks(4096).map(<[u8]>::to_vec).collect();
    let (status, echoed) = send_chunked(&gw, "/api/public/echo-body", &chunks).await;
    assert_eq!(status, 200);
    assert!(echoed == body, "the echoed body differs from the one sent");
}

#[tokio::test]
async fn a_get_with_a_chunked_body_passes_it_on() {
    let gw = Harness::start().await;
    let chunks = [b"hello".to_vec(), b" world".to_vec()];
    let (status, echoed) =
        send_coded(&gw, "GET", "/api/public/echo-body", &["chunked"], &chunks).await;
    assert_eq!(status, 200);
    assert_eq!(echoed, b"hello world");
}

#[tokio::test]
async fn a_body_coded_past_chunked_is_400_and_never_reaches_the_upstream() {
    let gw = Harness::start().await;
    let chunks = [b"hello".to_vec()];
    let refused: [&[&str]; 4] = [
        &["gzip, chunked"],
        &["chunked, chunked"],
        &["chunked", "chunked"],
        &["identity, chunked"],
    ];
    for codings in refused {
        let (status, body) =
            send_coded(&gw, "POST", "/api/public/echo-body", codings, &chunks).await;
        assert_eq!(status, 400, "{codings:?}");
        let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(body["error"], "bad_request", "{codings:?}");
        assert!(
            body["message"]
                .as_str()
                .unwrap()
                .contains("Transfer-Encoding")
        );
    }
    assert_eq!(gw.upstream.requests_seen(), 0);
    // `chunked` alone passes, however it is spelled.
    let (status, echoed) = send_coded(
        &gw,
        "POST",
        "/api/public/echo-body",
        &[" Chunked "],
        &chunks,
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(echoed, b"hello");
}

#[tokio::test]
async fn framing_hyper_refuses_is_a_json_400_on_a_new_connection_too() {
    // The first request of a connection is read by the fast lane, which hands every request
    // with a body to hyper. hyper refuses these heads itself, with an empty 400 and no
    // access-log line; the lane refuses them first, as the gateway does every bad request.
    let gw = Harness::start().await;
    let post = "POST /api/public/echo-body HTTP/1.1\r\nHost: x\r\n";
    let heads = [
        format!("{post}Transfer-Encoding: gzip\r\n\r\n"),
        format!("{post}Transfer-Encoding: chunked, gzip\r\n\r\n"),
        format!("{post}Transfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n\r\n"),
        format!("{post}Content-Length: 1\r\nContent-Length: 2\r\n\r\nab"),
        format!("{post}Content-Length: 5, 5\r\n\r\nhello"),
        format!("{post}Content-Length: +5\r\n\r\nhello"),
        "POST /api/public/echo-body HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
            .to_string(),
    ];
    for head in &heads {
        let mut stream = TcpStream::connect(gw.addr).await.unwrap();
        stream.write_all(head.as_bytes()).await.unwrap();
        // Where the next request would start is unknown: the connection is closed.
        let mut answer = Vec::new();
        bounded(stream.read_to_end(&mut answer)).await.unwrap();
        let answer = String::from_utf8_lossy(&answer);
        assert!(answer.starts_with("HTTP/1.1 400 "), "{head:?}: {answer}");
        let (_, body) = answer.split_once("\r\n\r\n").unwrap();
        let body: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(body["error"], "bad_request", "{head:?}");
    }
    assert_eq!(gw.upstream.requests_seen(), 0);
    // What hyper takes, the lane does not refuse: two equal lengths are one.
    let mut stream = TcpStream::connect(gw.addr).await.unwrap();
    let twice = format!("{post}Content-Length: 2\r\nContent-Length: 2\r\n\r\nhi");
    stream.write_all(twice.as_bytes()).await.unwrap();
    let answer = common::read_until(&mut stream, b"\r\n\r\nhi").await;
    assert!(answer.starts_with("HTTP/1.1 200 "), "{answer}");
}

#[tokio::test]
async fn a_body_framed_two_ways_goes_by_its_chunks_and_then_the_connection_closes() {
    let gw = Harness::start().await;
    let mut stream = TcpStream::connect(gw.addr).await.unwrap();
    // Kept alive, the connection would let a front proxy that believed the length read the
    // rest of the chunks as a request of their own.
    stream
        .write_all(
            b"POST /api/public/echo-body HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\
              Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        )
        .await
        .unwrap();
    let mut answer = Vec::new();
    bounded(stream.read_to_end(&mut answer)).await.unwrap();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 200 OK"), "{answer}");
    assert!(answer.ends_with("\r\n\r\nhello"), "{answer}");
}

#[tokio::test]
async fn declared_oversized_body_is_413_and_never_reaches_the_upstream() {
    let gw = Harness::start().await;
    let response = gw
        .client
        .post(gw.url("/api/public/sink"))
        .body(vec![7u8; MAX_BODY as usize + 1])
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 413);
    let body: serde_json::Value = serde_json::from_str(&response.text().await.unwrap()).unwrap();
    assert_eq!(body["error"], "payload_too_large");

    // The first and only body the upstream reads is the next one: the oversized one never
    // arrived, not even in part.
    let response = gw
        .client
        .post(gw.url("/api/public/sink"))
        .body(vec![1u8; 10])
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(gw.upstream.next_body().await, BodySeen::Complete(10));
    assert_eq!(gw.upstream.bodies_seen(), 1);
}

#[tokio::test]
async fn chunked_body_growing_past_the_limit_is_413_and_aborted_upstream() {
    let gw = Harness::start().await;
    let chunks: Vec<Vec<u8>> = (0..(2 * MAX_BODY / 4096))
        .map(|_| vec![9u8; 4096])
        .collect();
    let (status, body) = send_chunked(&gw, "/api/public/sink", &chunks).await;
    assert_eq!(status, 413);
    let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(body["error"], "payload_too_large");
    match gw.upstream.next_body().await {
        BodySeen::Aborted(read) => assert!(read as u64 <= MAX_BODY),
        complete => panic!("the upstream saw the body end as if it were complete: {complete:?}"),
    }
    assert_eq!(gw.upstream.bodies_seen(), 1);
    let (status, _) = gw.get("/api/public/x", &[]).await;
    assert_eq!(status, 200);
}

/// A gateway whose clients must not go quiet for more than 300 ms, in their headers or bodies.
async fn impatient() -> Harness {
    Harness::start_with(Setup {
        server_extra: "header_timeout = \"300ms\"".into(),
        ..Setup::default()
    })
    .await
}

#[tokio::test]
async fn a_request_body_that_stops_arriving_is_400_and_aborted_upstream() {
    let gw = impatient().await;
    let mut stream = TcpStream::connect(gw.addr).await.unwrap();
    stream
        .write_all(
            b"POST /api/public/sink HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n0123456789",
        )
        .await
        .unwrap();
    // The route's timeout is the default 30 s: the answer comes from the body's stall, and
    // blames the client, not the upstream.
    let answer = common::read_until(&mut stream, b"}").await;
    assert!(answer.starts_with("HTTP/1.1 400 "), "{answer}");
    assert!(answer.contains(r#""error":"bad_request""#), "{answer}");
    match gw.upstream.next_body().await {
        BodySeen::Aborted(read) => assert!(read <= 10),
        complete => panic!("the upstream saw the body end as if it were complete: {complete:?}"),
    }
    let (status, _) = gw.get("/api/public/x", &[]).await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn an_h2c_request_body_that_stops_arriving_is_400_and_the_connection_serves_on() {
    let gw = impatient().await;
    let mut sender = common::h2c(gw.addr).await;
    let first = Ok::<_, Infallible>(Frame::data(Bytes::from_static(b"0123456789")));
    let stalled = futures_util::stream::iter([first]).chain(futures_util::stream::pending());
    let request = http::Request::post(gw.url("/api/public/sink"))
        .body(Either::Left(StreamBody::new(stalled)))
        .unwrap();
    let response = bounded(sender.send_request(request)).await.unwrap();
    assert_eq!(response.status(), 400);
    let body = bounded(response.into_body().collect()).await.unwrap();
    let body: serde_json::Value = serde_json::from_slice(&body.to_bytes()).unwrap();
    assert_eq!(body["error"], "bad_request");
    match gw.upstream.next_body().await {
        BodySeen::Aborted(read) => assert!(read <= 10),
        complete => panic!("the upstream saw the body end as if it were complete: {complete:?}"),
    }
    // Only the stream was given up on.
    let request = http::Request::get(gw.url("/api/public/x"))
        .body(Either::Right(Empty::new()))
        .unwrap();
    let response = bounded(sender.send_request(request)).await.unwrap();
    assert_eq!(response.status(), 200);
}

#[tokio::test]
async fn a_request_body_trickled_with_short_pauses_passes_whole() {
    let gw = Harness::start_with(Setup {
        server_extra: "header_timeout = \"1s\"".into(),
        ..Setup::default()
    })
    .await;
    let mut stream = TcpStream::connect(gw.addr).await.unwrap();
    stream
        .write_all(b"POST /api/public/sink HTTP/1.1\r\nHost: x\r\nContent-Length: 60\r\n\r\n")
        .await
        .unwrap();
    // Six pauses of a quarter of the limit: the body takes longer than `header_timeout` in
    // all, and is never quiet for that long.
    for _ in 0..6 {
        tokio::time::sleep(Duration::from_millis(250)).await;
        stream.write_all(&[5u8; 10]).await.unwrap();
    }
    let answer = common::read_until(&mut stream, b"\r\n\r\n").await;
    assert!(answer.starts_with("HTTP/1.1 200 "), "{answer}");
    assert_eq!(gw.upstream.next_body().await, BodySeen::Complete(60));
}

#[tokio::test]
async fn a_request_body_cut_short_or_malformed_is_400_and_aborted_upstream() {
    let gw = Harness::start().await;
    // A client whose upload broke off (it shut its side down), and one whose chunk size does
    // not parse: either is the client's doing, though the upstream request is what fails.
    let cut_short =
        b"POST /api/public/sink HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n0123456789";
    let malformed = b"POST /api/public/sink HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\nzz\r\n";
    for (request, shut_down) in [(&cut_short[..], true), (&malformed[..], false)] {
        let mut stream = TcpStream::connect(gw.addr).await.unwrap();
        stream.write_all(request).await.unwrap();
        if shut_down {
            stream.shutdown().await.unwrap();
        }
        let answer = common::read_until(&mut stream, b"}").await;
        assert!(answer.starts_with("HTTP/1.1 400 "), "{answer}");
        assert!(answer.contains(r#""error":"bad_request""#), "{answer}");
        match gw.upstream.next_body().await {
            BodySeen::Aborted(read) => assert!(read <= 10),
            complete => {
                panic!("the upstream saw the body end as if it were complete: {complete:?}")
            }
        }
    }
    let (status, _) = gw.get("/api/public/x", &[]).await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn upstream_down_is_502_and_slow_is_504() {
    let gw = Harness::start().await;
    let (status, body) = gw.get("/down/x", &[]).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (502, Some("upstream_unavailable"))
    );
    let (status, body) = gw.get("/hurry/slow", &[]).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (504, Some("upstream_timeout"))
    );
    let (status, _) = gw.get("/api/public/x", &[]).await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn an_upstream_that_never_completes_the_connection_is_502() {
    // A listener with a backlog of zero that never accepts: once one connection waits in its
    // queue, Linux leaves further connection attempts unanswered, as a firewall that drops
    // packets or a vanished host would.
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let blackhole = socket.listen(0).unwrap();
    let addr = blackhole.local_addr().unwrap();
    let _queued = TcpStream::connect(addr).await.unwrap();
    let gw = Harness::with_public_route("/blackhole/", addr).await;
    // The route's timeout is the default 30 s: the connect timeout, well within it, decides.
    let (status, body) = gw.get("/blackhole/x", &[]).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (502, Some("upstream_unavailable"))
    );
    let (status, _) = gw.get("/api/public/x", &[]).await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn shutdown_returns_once_drained() {
    let gw = Harness::start_with(Setup {
        server_extra: "header_timeout = \"10m\"\nshutdown_grace = \"10m\"".into(),
        ..Setup::default()
    })
    .await;
    let (status, _) = gw.get("/api/public/x", &[]).await;
    assert_eq!(status, 200);
    let _silent = TcpStream::connect(gw.addr).await.unwrap();
    // Connections are accepted in order: once a later one is served, the silent one is in.
    let (status, _) = gw
        .raw("GET /api/public/x HTTP/1.1\r\nHost: x\r\n\r\n")
        .await;
    assert_eq!(status, 200);
    // Neither the idle keep-alive connection the client holds nor one that never sent a byte
    // has a request to finish: neither keeps the drain waiting. The bound turns a hang into a
    // failure.
    tokio::time::timeout(Duration::from_secs(30), gw.shutdown())
        .await
        .expect("shutdown never returned");
}
