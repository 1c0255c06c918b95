//! Connections to the upstream: a keep-alive client keeps one for itself, one the upstream
//! closes is replaced, and a request that has gone out is sent a second time only when it is
//! safe, bodiless, and the kept connection it went out on failed under it.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use common::{Harness, read_answer, read_answers, read_until};
use tokio::io::{AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

async fn get(stream: &mut TcpStream, path: &str) -> (u16, serde_json::Value) {
    let request = format!("GET {path} HTTP/1.1\r\nHost: gw\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    read_answer(stream).await
}

#[tokio::test]
async fn a_keep_alive_client_keeps_one_upstream_connection() {
    let gw = Harness::start().await;
    let mut stream = TcpStream::connect(gw.addr).await.unwrap();
    for round in 0..10 {
        let (status, echo) = get(&mut stream, &format!("/api/public/{round}")).await;
        assert_eq!(status, 200, "request {round}");
        assert_eq!(echo["uri"], format!("/api/public/{round}"));
    }
    assert_eq!(gw.upstream.requests_seen(), 10);
    assert_eq!(gw.upstream.connections_accepted(), 1);
}

#[tokio::test]
async fn a_connection_the_upstream_closes_is_replaced_for_the_next_request() {
    let gw = Harness::start().await;
    let mut stream = TcpStream::connect(gw.addr).await.unwrap();
    let (status, _) = get(&mut stream, "/api/public/close").await;
    assert_eq!(status, 200);
    // The upstream's `Connection: close` is its own connection's business: the client's
    // connection stays open, and its next request goes out on a new upstream connection.
    let (status, echo) = get(&mut stream, "/api/public/after").await;
    assert_eq!(status, 200);
    assert_eq!(echo["uri"], "/api/public/after");
    assert_eq!(gw.upstream.connections_accepted(), 2);
}

/// An upstream that answers the first `answered` requests on each connection, keeping it
/// open, and hangs up on the next one without answering, as an upstream closing an idle
/// connection at the moment a request arrives does. Keeps every request head it read.
struct HangingUp {
    addr: SocketAddr,
    heads: Arc<Mutex<Vec<String>>>,
    connections: Arc<AtomicUsize>,
}

/// How [`HangingUp`] ends a connection: with a FIN, or with a reset (a close with a zero
/// linger time), which the gateway reads as an error rather than as the end of the stream.
#[derive(Clone, Copy, PartialEq)]
enum HangUp {
    Close,
    Reset,
}

impl HangingUp {
    async fn start(answered: usize, how: HangUp) -> HangingUp {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let heads = Arc::new(Mutex::new(Vec::new()));
        let connections = Arc::new(AtomicUsize::new(0));
        let (kept, counted) = (heads.clone(), connections.clone());
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                counted.fetch_add(1, Ordering::SeqCst);
                let kept = kept.clone();
                tokio::spawn(async move {
                    let mut stream = BufReader::new(stream);
                    for request in 0..=answered {
                        let Some(head) = common::read_request(&mut stream).await else {
                            return;
                        };
                        kept.lock().unwrap().push(head);
                        if request < answered {
                            let answer = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
                            stream.get_mut().write_all(answer).await.unwrap();
                        } else if how == HangUp::Reset {
                            stream.get_ref().set_zero_linger().unwrap();
                        }
                    }
                });
            }
        });
        HangingUp {
            addr,
            heads,
            connections,
        }
    }

    async fn gateway(&self) -> Harness {
        Harness::with_public_route("/flaky/", self.addr).await
    }

    fn heads(&self) -> Vec<String> {
        self.heads.lock().unwrap().clone()
    }

    /// The request line of each request read, in order.
    fn requests(&self) -> Vec<String> {
        self.heads()
            .iter()
            .map(|head| head.lines().next().unwrap().to_owned())
            .collect()
    }

    fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }
}

async fn send(stream: &mut TcpStream, request: &str) -> (u16, serde_json::Value) {
    stream.write_all(request.as_bytes()).await.unwrap();
    read_answer(stream).await
}

#[tokio::test]
async fn a_safe_request_dropped_on_a_kept_connection_goes_again_once_on_a_new_one() {
    let upstream = HangingUp::start(1, HangUp::Close).await;
    let gw = upstream.gateway().await;
    let mut stream = TcpStream::connect(gw.addr).await.unwrap();
    let (status, _) = get(&mut stream, "/flaky/first").await;
    assert_eq!(status, 200);
    // Each goes out on the connection the last one was answered on, which the upstream drops.
    let (status, _) = get(&mut stream, "/flaky/second").await;
    assert_eq!(status, 200);
    let head = "HEAD /flaky/third HTTP/1.1\r\nHost: gw\r\n\r\n";
    stream.write_all(head.as_bytes()).await.unwrap();
    let answer = read_until(&mut stream, b"\r\n\r\n").await;
    assert!(answer.starts_with("HTTP/1.1 200 "), "{answer}");
    assert_eq!(
        upstream.requests(),
        [
            "GET /flaky/first HTTP/1.1",
            "GET /flaky/second HTTP/1.1",
            "GET /flaky/second HTTP/1.1",
            "HEAD /flaky/third HTTP/1.1",
            "HEAD /flaky/third HTTP/1.1",
        ]
    );
    // The same request, request id and all, went out twice.
    let heads = upstream.heads();
    assert_eq!(heads[1], heads[2]);
    assert_eq!(upstream.connections(), 3);
}

#[tokio::test]
async fn an_unsafe_request_the_upstream_read_and_dropped_is_never_sent_again() {
    let upstream = HangingUp::start(1, HangUp::Close).await;
    let gw = upstream.gateway().await;
    let mut stream = TcpStream::connect(gw.addr).await.unwrap();
    let (status, _) = get(&mut stream, "/flaky/first").await;
    assert_eq!(status, 200);
    // The upstream may have acted on it: sending it again could do the same thing twice.
    let post = "POST /flaky/second HTTP/1.1\r\nHost: gw\r\nContent-Length: 0\r\n\r\n";
    let (status, body) = send(&mut stream, post).await;
    assert_eq!(status, 502);
    assert_eq!(body["error"], "upstream_unavailable");
    assert_eq!(
        upstream.requests(),
        ["GET /flaky/first HTTP/1.1", "POST /flaky/second HTTP/1.1"]
    );
    // The gateway goes on: the next request gets a new connection.
    let (status, _) = get(&mut stream, "/flaky/third").await;
    assert_eq!(status, 200);
    assert_eq!(upstream.connections(), 2);
}

#[tokio::test]
async fn a_request_dropped_on_a_new_connection_is_not_sent_again() {
    let upstream = HangingUp::start(0, HangUp::Close).await;
    let gw = upstream.gateway().await;
    let mut stream = TcpStream::connect(gw.addr).await.unwrap();
    let (status, body) = get(&mut stream, "/flaky/first").await;
    assert_eq!(status, 502);
    assert_eq!(body["error"], "upstream_unavailable");
    assert_eq!(upstream.requests(), ["GET /flaky/first HTTP/1.1"]);
    assert_eq!(upstream.connections(), 1);
}

/// A request with a body, then `then`, in one write: the first is not the lane's, so hyper
/// serves both, the second on the upstream connection the first was answered on.
async fn after_a_body(gw: &Harness, then: &str) -> Vec<(u16, serde_json::Value)> {
    let mut stream = TcpStream::connect(gw.addr).await.unwrap();
    let posted = "POST /flaky/posted HTTP/1.1\r\nHost: gw\r\nContent-Length: 2\r\n\r\nhi";
    stream
        .write_all(format!("{posted}{then}").as_bytes())
        .await
        .unwrap();
    read_answers(&mut stream, 2).await
}

#[tokio::test]
async fn the_general_path_sends_a_dropped_safe_bodiless_request_again_once() {
    let upstream = HangingUp::start(1, HangUp::Close).await;
    let gw = upstream.gateway().await;
    let answers = after_a_body(&gw, "GET /flaky/got HTTP/1.1\r\nHost: gw\r\n\r\n").await;
    assert_eq!(answers[0].0, 200);
    assert_eq!(answers[1].0, 200);
    assert_eq!(
        upstream.requests(),
        [
            "POST /flaky/posted HTTP/1.1",
            "GET /flaky/got HTTP/1.1",
            "GET /flaky/got HTTP/1.1",
        ]
    );
    let heads = upstream.heads();
    // hyper, which lower-cases names, sent both.
    assert!(heads[1].contains("\r\nhost: gw\r\n"), "{}", heads[1]);
    assert_eq!(heads[1], heads[2]);
    assert_eq!(upstream.connections(), 2);
}

#[tokio::test]
async fn the_general_path_never_sends_a_dropped_request_with_a_body_again() {
    let upstream = HangingUp::start(1, HangUp::Close).await;
    let gw = upstream.gateway().await;
    // Safe, but its body was a stream, gone once sent.
    let with_body = "GET /flaky/got HTTP/1.1\r\nHost: gw\r\nContent-Length: 2\r\n\r\nhi";
    let answers = after_a_body(&gw, with_body).await;
    assert_eq!(answers[0].0, 200);
    assert_eq!(answers[1].0, 502);
    assert_eq!(answers[1].1["error"], "upstream_unavailable");
    assert_eq!(
        upstream.requests(),
        ["POST /flaky/posted HTTP/1.1", "GET /flaky/got HTTP/1.1"]
    );
}

#[tokio::test]
async fn a_kept_connection_reset_under_a_safe_request_is_replaced_on_both_paths() {
    let upstream = HangingUp::start(1, HangUp::Reset).await;
    let gw = upstream.gateway().await;
    let mut stream = TcpStream::connect(gw.addr).await.unwrap();
    assert_eq!(get(&mut stream, "/flaky/first").await.0, 200);
    assert_eq!(get(&mut stream, "/flaky/second").await.0, 200);
    let answers = after_a_body(&gw, "GET /flaky/got HTTP/1.1\r\nHost: gw\r\n\r\n").await;
    assert_eq!(answers[0].0, 200);
    assert_eq!(answers[1].0, 200);
    let requests = upstream.requests();
    assert_eq!(requests[1..3], ["GET /flaky/second HTTP/1.1"; 2]);
    assert_eq!(requests[4..], ["GET /flaky/got HTTP/1.1"; 2]);
}
