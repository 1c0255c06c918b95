//! Connections to the upstream: a keep-alive client keeps one for itself, one the upstream
//! closes is replaced, and a request that has gone out is never sent a second time.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use common::{Harness, Setup, read_answer};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
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

/// An upstream that answers the first request on each connection, keeping it open, and hangs
/// up on the second without answering. Counts the requests it read.
async fn hanging_up_upstream() -> (std::net::SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let requests = Arc::new(AtomicUsize::new(0));
    let counted = requests.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let counted = counted.clone();
            tokio::spawn(async move {
                let mut stream = BufReader::new(stream);
                for answered in [true, false] {
                    let mut line = String::new();
                    // The request head, to its empty line; these requests have no body.
                    loop {
                        line.clear();
                        if stream.read_line(&mut line).await.unwrap_or(0) == 0 {
                            return;
                        }
                        if line == "\r\n" {
                            break;
                        }
                    }
                    counted.fetch_add(1, Ordering::SeqCst);
                    if answered {
                        let answer = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
                        stream.get_mut().write_all(answer).await.unwrap();
                    }
                }
            });
        }
    });
    (addr, requests)
}

#[tokio::test]
async fn a_request_the_upstream_read_and_dropped_is_never_sent_again() {
    let (upstream, requests) = hanging_up_upstream().await;
    let gw = Harness::start_with(Setup {
        sections: format!(
            "[[routes]]\npath = \"/flaky/\"\nupstream = \"http://{upstream}\"\nauth = \"public\"\n"
        ),
        ..Setup::default()
    })
    .await;
    let mut stream = TcpStream::connect(gw.addr).await.unwrap();
    let (status, _) = get(&mut stream, "/flaky/first").await;
    assert_eq!(status, 200);
    // The upstream may have acted on it: sending it again, on a new connection, could do the
    // same thing twice.
    let (status, body) = get(&mut stream, "/flaky/second").await;
    assert_eq!(status, 502);
    assert_eq!(body["error"], "upstream_unavailable");
    assert_eq!(requests.load(Ordering::SeqCst), 2);
    // The gateway goes on: the next request gets a new connection.
    let (status, _) = get(&mut stream, "/flaky/third").await;
    assert_eq!(status, 200);
}
