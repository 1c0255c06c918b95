//! The fast lane (`server::fast_lane`): plain keep-alive requests without a body are relayed
//! on plain sockets, with the upstream's framing checked; anything else on the same connection
//! is handed to hyper in order. The lane keeps header names as the client spelled them and
//! hyper lower-cases them, which is how these tests tell which of the two carried a request.

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use common::{Harness, Setup, bounded, read_answer, read_answers, read_until};
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

/// An upstream that answers each request with the canned answer its last path segment names,
/// and keeps every request head it read.
struct Scripted {
    addr: SocketAddr,
    heads: Arc<Mutex<Vec<String>>>,
    connections: Arc<Mutex<usize>>,
}

const BIG_LEN: usize = 200_000;

fn canned(name: &str) -> (Vec<u8>, bool) {
    let answer: &[u8] = match name {
        "chunked" => {
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n\
              5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nX-Trailer: t\r\n\r\n"
        }
        // HTTP/1.0 without a length: the body ends when the upstream closes.
        "close" => b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil the end",
        "te-and-cl" => {
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n"
        }
        "two-lengths" => b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nok!",
        // A transfer coding other than chunked: the body, "ok" under gzip, would reach the
        // client still coded, with nothing left to say so.
        "gzip-chunked" => {
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n\
              16\r\n\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\x03\xcb\xcf\x06\x00\x47\xdd\xdc\x79\x02\x00\x00\x00\r\n0\r\n\r\n"
        }
        "chunked-twice" => {
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n\
              2\r\nok\r\n0\r\n\r\n"
        }
        "equal-lengths" => b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\nok",
        "interim" => {
            b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\n\
              HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
        }
        "empty" => b"HTTP/1.1 204 No Content\r\n\r\n",
        "empty-with-length" => b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n",
        "not-modified" => {
            b"HTTP/1.1 304 Not Modified\r\nContent-Length: 5\r\nETag: \"v1\"\r\n\r\n"
        }
        "switch" => {
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n"
        }
        "hop" => {
            b"HTTP/1.1 200 OK\r\nConnection: X-Hop\r\nX-Hop: secret\r\n\
              X-Request-Id: upstream-chosen\r\nContent-Length: 2\r\n\r\nok"
        }
        "head-at-limit" => return (answer_with_head_of(HEAD_LIMIT), false),
        "head-over-limit" => return (answer_with_head_of(HEAD_LIMIT + 1), false),
        "listed-length" => b"HTTP/1.1 200 OK\r\nContent-Length: 2, 2\r\n\r\nok",
        "status-under-100" => b"HTTP/1.1 099 Early\r\nContent-Length: 2\r\n\r\nok",
        // An HTTP/1.0 answer without `keep-alive`: its connection ends with it, though this
        // upstream leaves it open.
        "http10" => b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok",
        // Part of an answer, and then nothing more on a connection left open, one of each
        // framing.
        "silent-length" => b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhalf",
        "silent-chunked" => b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nhalf\r\n",
        "silent-close" => b"HTTP/1.0 200 OK\r\n\r\nhalf",
        "big" => {
            let mut answer =
                format!("HTTP/1.1 200 OK\r\nContent-Length: {BIG_LEN}\r\n\r\n").into_bytes();
            answer.extend(common::pattern(BIG_LEN));
            return (answer, false);
        }
        _ => b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
    };
    (answer.to_vec(), name == "close")
}

/// The longest answer head the gateway takes from an upstream.
const HEAD_LIMIT: usize = 64 * 1024;

/// An answer `ok` whose head, its blank line included, is `len` bytes.
fn answer_with_head_of(len: usize) -> Vec<u8> {
    let bare = "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-Pad: \r\n\r\n";
    let pad = "p".repeat(len - bare.len());
    let mut answer = bare
        .replace("X-Pad: ", &format!("X-Pad: {pad}"))
        .into_bytes();
    answer.extend_from_slice(b"ok");
    answer
}

impl Scripted {
    async fn start() -> Scripted {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let heads = Arc::new(Mutex::new(Vec::new()));
        let connections = Arc::new(Mutex::new(0));
        let (kept, counted) = (heads.clone(), connections.clone());
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                *counted.lock().unwrap() += 1;
                let kept = kept.clone();
                tokio::spawn(async move {
                    let mut stream = BufReader::new(stream);
                    while let Some(head) = common::read_request(&mut stream).await {
                        let target = head.split(' ').nth(1).unwrap_or_default().to_string();
                        kept.lock().unwrap().push(head);
                        let (answer, close) = canned(target.rsplit('/').next().unwrap());
                        if stream.get_mut().write_all(&answer).await.is_err() || close {
                            return;
                        }
                    }
                });
            }
        });
        Scripted {
            addr,
            heads,
            connections,
        }
    }

    fn heads(&self) -> Vec<String> {
        self.heads.lock().unwrap().clone()
    }

    fn connections(&self) -> usize {
        *self.connections.lock().unwrap()
    }
}

async fn gateway_before(upstream: &Scripted) -> Harness {
    Harness::with_public_route("/s/", upstream.addr).await
}

fn get(path: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nHost: gw\r\nX-Spelled-So: 1\r\n\r\n")
}

/// A request with a body, which the lane hands to hyper with the rest of its connection.
fn post(path: &str) -> String {
    format!("POST {path} HTTP/1.1\r\nHost: gw\r\nContent-Length: 1\r\n\r\nx")
}

#[tokio::test]
async fn a_chunked_answer_passes_in_its_chunks_and_the_connections_go_on() {
    let upstream = Scripted::start().await;
    let gw = gateway_before(&upstream).await;
    let mut stream = TcpStream::connect(gw.addr).await.unwrap();
    for round in 0..2 {
        stream
            .write_all(get("/s/chunked").as_bytes())
            .await
            .unwrap();
        let answer = read_until(&mut stream, b"0\r\n\r\n").await;
        let (head, body) = answer.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
        assert!(head.contains("transfer-encoding: chunked"), "{head}");
        // Extensions and trailers stay with the upstream's connection.
        assert_eq!(
            body, "5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n",
            "round {round}"
        );
    }
    let heads = upstream.heads();
    assert_eq!(heads.len(), 2);
    assert!(heads[0].contains("X-Spelled-So: 1"), "{}", heads[0]);
    // One connection each way for both requests: the body's end was found exactly.
    assert_eq!(upstream.connections(), 1);
}

#[tokio::test]
async fn an_answer_ended_by_close_is_relayed_and_then_the_client_connection_closes() {
    let upstream = Scripted::start().await;
    let gw = gateway_before(&upstream).await;
    let mut stream = TcpStream::connect(gw.addr).await.unwrap();
    stream.write_all(get("/s/close").as_bytes()).await.unwrap();
    let mut answer = String::new();
    bounded(stream.read_to_string(&mut answer)).await.unwrap();
    let (head, body) = answer.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
    assert!(head.contains("connection: close"), "{head}");
    assert_eq!(body, "until the end");
}

/// Answers framed two ways, coded past what the gateway decodes, with a length that is not
/// plain digits or a status under 100, switching protocols for a request that asked for no
/// upgrade, or with a head over the limit.
#[tokio::test]
async fn answers_the_gateway_cannot_pass_on_are_a_502_on_both_paths() {
    let upstream = Scripted::start().await;
    let gw = gateway_before(&upstream).await;
    let refused = [
        "/s/te-and-cl",
        "/s/two-lengths",
        "/s/gzip-chunked",
        "/s/chunked-twice",
        "/s/listed-length",
        "/s/status-under-100",
        "/s/switch",
        "/s/head-over-limit",
    ];
    // The lane takes the GETs; a POST with a body is hyper's, and so is its connection then.
    let mut on_the_lane = TcpStream::connect(gw.addr).await.unwrap();
    let mut on_hyper = TcpStream::connect(gw.addr).await.unwrap();
    for path in refused {
        for (stream, request) in [(&mut on_the_lane, get(path)), (&mut on_hyper, post(path))] {
            stream.write_all(request.as_bytes()).await.unwrap();
            let (status, body) = read_answer(stream).await;
            assert_eq!(status, 502, "{request}");
            assert_eq!(body["error"], "upstream_unavailable", "{request}");
        }
    }
    for stream in [&mut on_the_lane, &mut on_hyper] {
        stream.write_all(get("/s/plain").as_bytes()).await.unwrap();
        let answer = read_until(stream, b"\r\n\r\nok").await;
        assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{answer}");
    }
    // No connection that carried a refused answer was used again: each client's last request
    // went on a new one.
    assert_eq!(upstream.connections(), 2 * refused.len() + 2);
}

#[tokio::test]
async fn interim_answers_are_skipped_and_head_and_204_answers_have_no_body() {
    let upstream = Scripted::start().await;
    let gw = gateway_before(&upstream).await;
    let mut stream = TcpStream::connect(gw.addr).await.unwrap();
    stream
        .write_all(get("/s/interim").as_bytes())
        .await
        .unwrap();
    let answer = read_until(&mut stream, b"\r\n\r\nok").await;
    assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{answer}");
    assert!(!answer.contains("103"), "{answer}");

    stream.write_all(get("/s/empty").as_bytes()).await.unwrap();
    let answer = read_until(&mut stream, b"\r\n\r\n").await;
    assert!(answer.starts_with("HTTP/1.1 204 "), "{answer}");
    // The answer to HEAD names a length and sends no body: the next answer follows at once.
    let head = "HEAD /s/plain HTTP/1.1\r\nHost: gw\r\n\r\n";
    stream
        .write_all(format!("{head}{}", get("/s/interim")).as_bytes())
        .await
        .unwrap();
    let both = read_until(&mut stream, b"\r\n\r\nok").await;
    assert_eq!(both.matches("HTTP/1.1 200 OK").count(), 2, "{both}");
    assert!(!both.contains("\r\n\r\nokHTTP"), "{both}");
}

#[tokio::test]
async fn headers_the_upstream_names_in_connection_are_dropped_and_the_request_id_is_ours() {
    let upstream = Scripted::start().await;
    let gw = gateway_before(&upstream).await;
    let mut stream = TcpStream::connect(gw.addr).await.unwrap();
    stream
        .write_all(b"GET /s/hop HTTP/1.1\r\nHost: gw\r\nX-Request-Id: mine-1\r\n\r\n")
        .await
        .unwrap();
    let answer = read_until(&mut stream, b"\r\n\r\nok").await;
    let head = answer
        .split("\r\n\r\n")
        .next()
        .unwrap()
        .to_ascii_lowercase();
    assert!(!head.contains("x-hop"), "{head}");
    assert!(!head.contains("upstream-chosen"), "{head}");
    assert!(head.contains("x-request-id: mine-1"), "{head}");
}

#[tokio::test]
async fn a_large_answer_streams_through_whole() {
    let upstream = Scripted::start().await;
    let gw = gateway_before(&upstream).await;
    let mut stream = TcpStream::connect(gw.addr).await.unwrap();
    stream.write_all(get("/s/big").as_bytes()).await.unwrap();
    let mut bytes = Vec::new();
    let head_end = loop {
        let mut buffer = [0u8; 65536];
        let read = bounded(stream.read(&mut buffer)).await.unwrap();
        assert!(read > 0);
        bytes.extend_from_slice(&buffer[..read]);
        if let Some(at) = bytes.windows(4).position(|w| w == b"\r\n\r\n") {
            break at + 4;
        }
    };
    while bytes.len() < head_end + BIG_LEN {
        let mut buffer = [0u8; 65536];
        let read = bounded(stream.read(&mut buffer)).await.unwrap();
        assert!(read > 0, "closed after {} bytes", bytes.len() - head_end);
        bytes.extend_from_slice(&buffer[..read]);
    }
    assert_eq!(bytes.len(), head_end + BIG_LEN);
    assert!(bytes[head_end..] == common::pattern(BIG_LEN)[..]);
    // The connection is still good for the next request.
    stream.write_all(get("/s/plain").as_bytes()).await.unwrap();
    read_until(&mut stream, b"\r\n\r\nok").await;
}

#[tokio::test]
async fn a_request_with_a_body_after_a_lane_request_goes_to_hyper_in_order() {
    let upstream = Scripted::start().await;
    let gw = gateway_before(&upstream).await;
    let mut stream = TcpStream::connect(gw.addr).await.unwrap();
    // The body looks like a request to the lane's eyes; only its framing says it is not one.
    let smuggled = "GET /s/smuggled HTTP/1.1\r\nHost: gw\r\n\r\n";
    let pipelined = format!(
        "{}POST /s/posted HTTP/1.1\r\nHost: gw\r\nX-Spelled-So: 1\r\nContent-Length: {}\r\n\r\n{smuggled}{}",
        get("/s/first"),
        smuggled.len(),
        get("/s/last"),
    );
    stream.write_all(pipelined.as_bytes()).await.unwrap();
    let answers = read_until(&mut stream, b"\r\n\r\nokHTTP/1.1 200 OK").await;
    let rest = read_until(&mut stream, b"\r\n\r\nok").await;
    assert_eq!(format!("{answers}{rest}").matches(" 200 OK").count(), 3);
    let heads = upstream.heads();
    let targets: Vec<&str> = heads
        .iter()
        .map(|head| head.split(' ').nth(1).unwrap())
        .collect();
    assert_eq!(targets, ["/s/first", "/s/posted", "/s/last"]);
    // The lane sent the first; hyper (which lower-cases names) the second and, once the
    // connection went to it, the third.
    assert!(heads[0].contains("X-Spelled-So: 1"), "{}", heads[0]);
    assert!(heads[1].contains("x-spelled-so: 1"), "{}", heads[1]);
}

#[tokio::test]
async fn identity_spoofed_in_every_spelling_never_passes_the_lane() {
    let gw = Harness::start().await;
    let token = gw.token("lane").await;
    let mut stream = TcpStream::connect(gw.addr).await.unwrap();
    let request = format!(
        "GET /api/me HTTP/1.1\r\nHost: gw\r\nConnection: keep-alive\r\n\
         X_WX_OPENID: spoof-1\r\nx-wx-openid: spoof-2\r\nX-Wx-OpenId: spoof-3\r\n\
         X-WX-UNIONID: spoof-4\r\nx_wx_appid: spoof-5\r\nX-Wx-Anything: spoof-6\r\n\
         Authorization: Bearer {token}\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let (status, echo) = read_answer(&mut stream).await;
    assert_eq!(status, 200);
    let text = echo.to_string();
    assert!(!text.contains("spoof"), "{text}");
    assert_eq!(
        common::echoed_header(&echo, "x-wx-openid"),
        [wxgate::mock::wechat::MockWechat::openid_for(common::APPID, "lane").as_str()]
    );
    // Refusals on the lane are the same JSON answers, and the connection goes on.
    stream
        .write_all(b"GET /api/me HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer nonsense\r\n\r\nGET /api/public/../me HTTP/1.1\r\nHost: gw\r\n\r\n")
        .await
        .unwrap();
    let answers = read_answers(&mut stream, 2).await;
    assert_eq!(answers[0].0, 401);
    assert_eq!(answers[0].1["error"], "invalid_token");
    assert_eq!(answers[1].0, 400);
    assert_eq!(answers[1].1["error"], "bad_path");
}

#[tokio::test]
async fn a_repeated_content_length_is_left_to_hyper_which_sends_it_once() {
    let upstream = Scripted::start().await;
    let gw = gateway_before(&upstream).await;
    let mut stream = TcpStream::connect(gw.addr).await.unwrap();
    stream
        .write_all(
            b"GET /s/twice HTTP/1.1\r\nHost: gw\r\nX-Spelled-So: 1\r\n\
              Content-Length: 0\r\nContent-Length: 0\r\n\r\n",
        )
        .await
        .unwrap();
    let answer = read_until(&mut stream, b"\r\n\r\nok").await;
    assert!(answer.starts_with("HTTP/1.1 200 OK"), "{answer}");
    // Passed on twice, the header would make some upstreams (nginx among them) refuse the
    // request that hyper, which keeps one of two equal lengths, gets answered.
    let heads = upstream.heads();
    assert!(heads[0].contains("x-spelled-so: 1"), "{}", heads[0]);
    let lengths = heads[0]
        .to_ascii_lowercase()
        .matches("content-length")
        .count();
    assert_eq!(lengths, 1, "{}", heads[0]);
}

#[tokio::test]
async fn a_204_or_304_answer_reaches_the_client_without_a_length_on_both_paths() {
    let upstream = Scripted::start().await;
    let gw = gateway_before(&upstream).await;
    for (path, status_line) in [
        ("/s/empty-with-length", "HTTP/1.1 204 No Content\r\n"),
        ("/s/not-modified", "HTTP/1.1 304 Not Modified\r\n"),
    ] {
        for request in [get(path), post(path)] {
            let mut stream = TcpStream::connect(gw.addr).await.unwrap();
            stream.write_all(request.as_bytes()).await.unwrap();
            let answer = read_until(&mut stream, b"\r\n\r\n").await;
            assert!(answer.starts_with(status_line), "{answer}");
            assert!(
                !answer.to_ascii_lowercase().contains("content-length"),
                "{answer}"
            );
        }
    }
}

#[tokio::test]
async fn an_answer_with_its_length_twice_reaches_the_client_with_it_once_on_both_paths() {
    let upstream = Scripted::start().await;
    let gw = gateway_before(&upstream).await;
    let mut stream = TcpStream::connect(gw.addr).await.unwrap();
    stream
        .write_all(get("/s/equal-lengths").as_bytes())
        .await
        .unwrap();
    let on_the_lane = read_until(&mut stream, b"\r\n\r\nok").await;
    stream
        .write_all(post("/s/equal-lengths").as_bytes())
        .await
        .unwrap();
    let on_hyper = read_until(&mut stream, b"\r\n\r\nok").await;
    for answer in [on_the_lane, on_hyper] {
        assert!(answer.starts_with("HTTP/1.1 200 OK"), "{answer}");
        let lengths = answer
            .to_ascii_lowercase()
            .matches("content-length: 2")
            .count();
        assert_eq!(lengths, 1, "{answer}");
    }
}

#[tokio::test]
async fn an_answer_head_at_the_limit_passes_on_both_paths() {
    let upstream = Scripted::start().await;
    let gw = gateway_before(&upstream).await;
    let mut stream = TcpStream::connect(gw.addr).await.unwrap();
    for request in [get("/s/head-at-limit"), post("/s/head-at-limit")] {
        stream.write_all(request.as_bytes()).await.unwrap();
        let answer = read_until(&mut stream, b"\r\n\r\nok").await;
        assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{request}");
        assert!(answer.contains(&"p".repeat(60_000)), "{request}");
    }
    // The lane kept the client's spelling; hyper lower-cased it.
    let heads = upstream.heads();
    assert!(heads[0].contains("X-Spelled-So: 1"), "{}", heads[0]);
    assert!(heads[1].contains("host: gw"), "{}", heads[1]);
}

#[tokio::test]
async fn an_http10_answer_goes_out_as_http11_on_both_paths_and_its_connection_is_not_kept() {
    let upstream = Scripted::start().await;
    let gw = gateway_before(&upstream).await;
    let mut stream = TcpStream::connect(gw.addr).await.unwrap();
    for request in [get("/s/http10"), post("/s/http10"), post("/s/http10")] {
        stream.write_all(request.as_bytes()).await.unwrap();
        let answer = read_until(&mut stream, b"\r\n\r\nok").await;
        // An HTTP/1.0 status line would tell the client its connection closes after it.
        assert!(
            answer.starts_with("HTTP/1.1 200 OK\r\n"),
            "{request}: {answer}"
        );
    }
    assert_eq!(upstream.connections(), 3);
}

#[tokio::test]
async fn a_head_that_does_not_parse_is_a_json_400_and_the_gateway_keeps_serving() {
    let upstream = Scripted::start().await;
    let gw = gateway_before(&upstream).await;
    let malformed: [&[u8]; 5] = [
        b"GET /s/x HTTP/1.1\r\nHost: gw\r\nBad Name: 1\r\n\r\n",
        b"GET /s/x HTTP/1.1\r\nHost: gw\r\nX-Folded: 1\r\n  more\r\n\r\n",
        b"GET /s/x HTTP/1.1\r\nHost: gw\r\nX-Nul: a\x00b\r\n\r\n",
        b"GET /s/x HTTP/2.0\r\nHost: gw\r\n\r\n",
        b"GET /s/x HTTP/1.1\r\nHost: gw\r\nX-Smuggled : 1\r\n\r\n",
    ];
    for head in malformed {
        let mut stream = TcpStream::connect(gw.addr).await.unwrap();
        stream.write_all(head).await.unwrap();
        let mut answer = Vec::new();
        let _ = bounded(stream.read_to_end(&mut answer)).await;
        let answer = String::from_utf8_lossy(&answer);
        let shown = String::from_utf8_lossy(head);
        assert!(
            answer.starts_with("HTTP/1.1 400 Bad Request\r\n"),
            "{shown}: {answer}"
        );
        assert!(
            answer.contains("connection: close\r\n"),
            "{shown}: {answer}"
        );
        let body = answer.split("\r\n\r\n").nth(1).unwrap();
        let body: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(body["error"], "bad_request", "{shown}");
    }
    // A hundred and one headers are too many, as hyper counts them.
    let many: String = (0..101).map(|i| format!("X-H{i}: v\r\n")).collect();
    let mut stream = TcpStream::connect(gw.addr).await.unwrap();
    let request = format!("GET /s/x HTTP/1.1\r\nHost: gw\r\n{many}\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let answer = read_until(&mut stream, b"\r\n\r\n").await;
    assert!(answer.starts_with("HTTP/1.1 431 "), "{answer}");
    assert!(upstream.heads().is_empty());
    let mut stream = TcpStream::connect(gw.addr).await.unwrap();
    stream.write_all(get("/s/x").as_bytes()).await.unwrap();
    let answer = read_until(&mut stream, b"\r\n\r\nok").await;
    assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{answer}");
}

/// Reads what the gateway sends until it closes the connection (or resets it).
async fn read_until_closed(stream: &mut TcpStream) -> String {
    let mut answer = Vec::new();
    let _ = bounded(stream.read_to_end(&mut answer)).await;
    String::from_utf8_lossy(&answer).into_owned()
}

#[tokio::test]
async fn an_upstream_silent_mid_answer_is_cut_off_after_the_route_timeout_on_both_paths() {
    let upstream = Scripted::start().await;
    let gw = Harness::start_with(Setup {
        sections: format!(
            "[[routes]]\npath = \"/s/\"\nupstream = \"http://{}\"\nauth = \"public\"\ntimeout = \"1s\"\n",
            upstream.addr
        ),
        ..Setup::default()
    })
    .await;
    let requests = ["silent-length", "silent-chunked", "silent-close"]
        .into_iter()
        .flat_map(|name| [get(&format!("/s/{name}")), post(&format!("/s/{name}"))]);
    let cut_off = requests.map(|request| async move {
        let mut stream = TcpStream::connect(gw.addr).await.unwrap();
        stream.write_all(request.as_bytes()).await.unwrap();
        (read_until_closed(&mut stream).await, request)
    });
    for (answer, request) in futures_util::future::join_all(cut_off).await {
        assert!(
            answer.starts_with("HTTP/1.1 200 OK\r\n"),
            "{request}: {answer}"
        );
        assert!(answer.contains("half"), "{request}: {answer}");
        // Never ended as if whole: a chunked answer lacks its last chunk.
        assert!(!answer.ends_with("0\r\n\r\n"), "{request}: {answer}");
    }
    // Each of the six went out on a connection of its own, closed once it went silent.
    assert_eq!(upstream.connections(), 6);
    // Over HTTP/2 the stream is reset, and the client sees its body fail.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let h2 = reqwest::Client::builder()
        .no_proxy()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    let answer = bounded(h2.get(gw.url("/s/silent-length")).send())
        .await
        .unwrap();
    assert_eq!(answer.status(), 200);
    assert!(bounded(answer.bytes()).await.is_err());
    let mut stream = TcpStream::connect(gw.addr).await.unwrap();
    stream.write_all(get("/s/x").as_bytes()).await.unwrap();
    let answer = read_until(&mut stream, b"\r\n\r\nok").await;
    assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{answer}");
}

#[tokio::test]
async fn a_client_that_stops_reading_is_cut_off_after_header_timeout_on_both_paths() {
    let (upstream, closed) = common::endless_upstream().await;
    let gw = Harness::start_with(Setup {
        server_extra: "header_timeout = \"1s\"".into(),
        sections: format!(
            "[[routes]]\npath = \"/s/\"\nupstream = \"http://{upstream}\"\nauth = \"public\"\n"
        ),
        ..Setup::default()
    })
    .await;
    for request in [get("/s/endless"), post("/s/endless")] {
        let mut stream = TcpStream::connect(gw.addr).await.unwrap();
        stream.write_all(request.as_bytes()).await.unwrap();
        let head = read_until(&mut stream, b"\r\n\r\n").await;
        assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{request}: {head}");
        // The client reads no more, and the gateway gives up on it and on the upstream
        // connection that feeds it.
        bounded(closed.notified()).await;
        let rest = read_until_closed(&mut stream).await;
        assert!(rest.len() < 1 << 30, "{request}");
    }
    let (status, _) = gw.get("/api/public/after", &[]).await;
    assert_eq!(status, 200);
}
