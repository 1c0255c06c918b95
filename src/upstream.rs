//! Keep-alive connections to the upstreams (HTTP/1.1), in two tiers: a client connection
//! speaking HTTP/1 keeps one upstream connection of its own while it is active ([`Affinity`]),
//! and gives it back to a pool shared by every client when it idles or ends.
//!
//! Built on hyper's connection API rather than hyper-util's pooled client, by measurement:
//! that client takes a lock, builds a key and wakes a task of its own to put the connection back
//! after every answer with a body. With a connection per client connection, none of that happens
//! on the way of a request: about 7,400 fewer instructions per proxied request, of 52,000 to
//! 61,000 before (`bench/instructions.py`; README "Performance").

use std::collections::HashMap;
use std::error::Error as StdError;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{CONTENT_LENGTH, TRANSFER_ENCODING};
use http::uri::Authority;
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode};
use http_body::Body;
use http_body_util::{Either, Empty, Limited};
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::proxy::ClientBody;

/// A request body, cut off with an error past `server.max_body_bytes` or when the client stops
/// sending it ([`ClientBody`]). Ending the stream with an error (not a clean end) makes the
/// client abort the upstream request, so the upstream never sees a truncated body as a
/// complete one. A request that came without a body goes with `Empty`, which, unlike the
/// client's stream, can be made again to send the request again ([`UpstreamClient::send`]).
pub type UpstreamBody = Either<Limited<ClientBody>, Empty<Bytes>>;

pub type SendError = Box<dyn StdError + Send + Sync>;

/// Idle connections kept per upstream. A burst of many concurrent clients opens as many
/// upstream connections; past the burst, keeping them all would hold their buffers for
/// nothing (nginx's `keepalive` directive makes the same trade).
const MAX_IDLE_PER_UPSTREAM: usize = 256;

/// How long an idle upstream connection in the shared pool is still taken for a request.
/// Older ones are closed when the pool is next used: most upstreams close theirs sooner
/// (nginx after 75 s), which the connection notices by itself.
const IDLE_TIMEOUT: Duration = Duration::from_secs(90);

/// How long connecting to an upstream may take. A loopback or in-cluster upstream connects in
/// well under a millisecond; one that drops the connection attempt (a host that is gone, a
/// firewall) is reported as unavailable after this, rather than as slow after the route's
/// whole `timeout`.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// The keep-alive connections to every upstream. Long-lived: kept across reloads.
#[derive(Default)]
pub struct UpstreamClient {
    pool: Arc<Pool>,
    /// Connections the fast lane speaks HTTP/1.1 on by itself (`server::fast_lane`): plain
    /// sockets, at a message boundary, that hyper has never seen.
    plain: IdleLists<TcpStream>,
}

/// Idle connections by upstream, most recently kept last.
type IdleLists<T> = Mutex<HashMap<Authority, Vec<Idle<T>>>>;

struct Idle<T> {
    connection: T,
    since: Instant,
}

/// Keeps `connection` as the most recent idle one of `authority`, giving up the oldest past
/// [`MAX_IDLE_PER_UPSTREAM`].
fn keep_idle<T>(lists: &IdleLists<T>, authority: Authority, connection: T) {
    let mut lists = lock(lists);
    let idle = lists.entry(authority).or_default();
    if idle.len() >= MAX_IDLE_PER_UPSTREAM {
        idle.remove(0);
    }
    idle.push(Idle {
        connection,
        since: Instant::now(),
    });
}

#[derive(Default)]
struct Pool {
    idle: IdleLists<SendRequest<UpstreamBody>>,
}

/// The upstream connection an HTTP/1 client connection keeps for itself. Its requests come
/// one after another, each only once the answer before it has gone out, so its upstream
/// connection is free again by the time the next request needs it. It goes back to the shared
/// pool when the client idles ([`Affinity::release`]) or goes away.
#[derive(Default)]
pub struct Affinity {
    held: Mutex<Option<Held>>,
}

struct Held {
    pool: Arc<Pool>,
    authority: Authority,
    sender: SendRequest<UpstreamBody>,
}

impl Affinity {
    /// Gives the upstream connection back to the shared pool, for other clients to use.
    pub fn release(&self) {
        if let Some(held) = lock(&self.held).take() {
            held.pool.keep(held.authority, held.sender);
        }
    }

    fn take(&self, authority: &Authority) -> Option<SendRequest<UpstreamBody>> {
        let mut held = lock(&self.held);
        match held.take() {
            Some(mine) if mine.authority == *authority => Some(mine.sender),
            // A request to another upstream: the connection goes where others can use it.
            Some(other) => {
                drop(held);
                other.pool.keep(other.authority, other.sender);
                None
            }
            None => None,
        }
    }
}

impl Drop for Affinity {
    fn drop(&mut self) {
        self.release();
    }
}

impl UpstreamClient {
    /// Sends `request` to `authority` on a kept-alive connection when there is one, on a new one
    /// otherwise. A kept connection the upstream closed before the request went out is replaced
    /// by a new one. Once the request has gone out it is sent again only when it is
    /// [`replayable`] and went out on a kept connection that the upstream closed or reset
    /// before answering: then once, on a new connection. The connection is kept for the next
    /// request once the answer's head has come, unless it switched protocols or the answer is
    /// refused for its framing ([`refused_framing`]), which is then the error.
    pub async fn send(
        &self,
        authority: &Authority,
        affinity: Option<&Affinity>,
        mut request: Request<UpstreamBody>,
    ) -> Result<Response<Incoming>, SendError> {
        let mut fresh_only = false;
        loop {
            let kept = if fresh_only {
                None
            } else {
                match affinity.and_then(|affinity| affinity.take(authority)) {
                    Some(mut sender) => {
                        // Its client's last answer has gone out, so this waits, if at all, only
                        // for hyper to see the end of it on the upstream side.
                        sender.ready().await.ok().map(|()| sender)
                    }
                    None => self.pool.take(authority),
                }
            };
            let reused = kept.is_some();
            let mut sender = match kept {
                Some(sender) => sender,
                None => connect(authority).await?,
            };
            // Copied only when it may be needed: a new connection that fails is not tried again.
            let copy = (reused && replayable(&request)).then(|| bodiless_copy(&request));
            match sender.try_send_request(request).await {
                Ok(response) => {
                    // Its connection goes with it: where hyper and the upstream may disagree
                    // on where an answer ends, the next one could be read from inside it.
                    if let Some(why) = refused_framing(response.headers()) {
                        return Err(why.into());
                    }
                    if response.status() != StatusCode::SWITCHING_PROTOCOLS {
                        self.keep(authority, affinity, sender);
                    }
                    return Ok(response);
                }
                Err(mut failed) => match (failed.take_message(), copy) {
                    (Some(unsent), _) if reused => request = unsent,
                    (None, Some(copy)) if dropped(failed.error()) => {
                        tracing::debug!(
                            "a kept upstream connection closed under a request; sending it again on a new one"
                        );
                        request = copy;
                        fresh_only = true;
                    }
                    _ => return Err(failed.into_error().into()),
                },
            }
        }
    }

    fn keep(
        &self,
        authority: &Authority,
        affinity: Option<&Affinity>,
        sender: SendRequest<UpstreamBody>,
    ) {
        match affinity {
            Some(affinity) => {
                let held = Held {
                    pool: self.pool.clone(),
                    authority: authority.clone(),
                    sender,
                };
                if let Some(displaced) = lock(&affinity.held).replace(held) {
                    displaced.pool.keep(displaced.authority, displaced.sender);
                }
            }
            None => self.pool.keep(authority.clone(), sender),
        }
    }
}

/// The longest answer head taken from an upstream, on both paths: a request's limit. hyper's
/// client would otherwise take one of up to 400 KiB (its `max_buf_size`, which it checks only
/// while a head is unfinished, so a larger head read in one go passes it too).
pub(crate) const MAX_RESPONSE_HEAD: usize = crate::server::MAX_HEADER_BYTES;

/// Why an upstream's answer is refused for its framing, as the fast lane refuses it
/// (`rewrite_response_head`). hyper's client decodes `chunked` alone and once: an answer with
/// another transfer coding would reach the client still coded that way, with the header that
/// said so removed as hop-by-hop. One with both `Transfer-Encoding` and `Content-Length` would
/// go out with a length its decoded body does not have.
fn refused_framing(headers: &HeaderMap) -> Option<&'static str> {
    if crate::proxy::coded_past_chunked(headers) {
        return Some("the upstream's answer has a Transfer-Encoding other than chunked");
    }
    if headers.contains_key(TRANSFER_ENCODING) && headers.contains_key(CONTENT_LENGTH) {
        return Some("the upstream's answer has both Transfer-Encoding and Content-Length");
    }
    // hyper reads `2, 2` as a length of 2 and passes the line on as it came; the lane, like
    // nginx, reads digits alone.
    let plain_length = |value: &HeaderValue| {
        let digits = value.as_bytes();
        !digits.is_empty() && digits.iter().all(u8::is_ascii_digit)
    };
    if !headers.get_all(CONTENT_LENGTH).iter().all(plain_length) {
        return Some("the upstream's answer has an unreadable Content-Length");
    }
    None
}

/// Whether a request may be sent a second time after the upstream may have read it: a safe
/// method (GET, HEAD, OPTIONS, TRACE; RFC 9110 §9.2.1) without a body, as Go's HTTP client
/// decides. RFC 9110 §9.2.2 allows it for every idempotent method, and nginx also sends PUT
/// and DELETE again; but a business API's DELETE of an order line, done twice, answers 404 to
/// a DELETE that worked.
fn replayable(request: &Request<UpstreamBody>) -> bool {
    request.method().is_safe() && request.body().is_end_stream()
}

fn bodiless_copy(request: &Request<UpstreamBody>) -> Request<UpstreamBody> {
    let mut copy = Request::new(Either::Right(Empty::new()));
    *copy.method_mut() = request.method().clone();
    *copy.uri_mut() = request.uri().clone();
    *copy.version_mut() = request.version();
    *copy.headers_mut() = request.headers().clone();
    copy
}

/// True when `error` says the connection closed or failed before the answer's head was in, as
/// a kept connection the upstream let go of at the moment it was used does; false for an
/// answer that came but did not parse.
fn dropped(error: &hyper::Error) -> bool {
    error.is_incomplete_message()
        || std::iter::successors(error.source(), |&cause| cause.source())
            .any(|cause| cause.is::<std::io::Error>())
}

impl UpstreamClient {
    /// A kept plain connection to `authority` that the upstream has not closed, if any.
    pub async fn kept_plain(&self, authority: &Authority) -> Option<TcpStream> {
        let kept = {
            let mut plain = lock(&self.plain);
            let now = Instant::now();
            let mut found = None;
            if let Some(sockets) = plain.get_mut(authority) {
                while let Some(idle) = sockets.pop() {
                    if now - idle.since < IDLE_TIMEOUT {
                        found = Some(idle.connection);
                        break;
                    }
                }
            }
            found
        };
        let stream = kept?;
        still_open(&stream).await.then_some(stream)
    }

    /// Keeps a plain connection, at a message boundary, for the next request to `authority`.
    pub fn keep_plain(&self, authority: Authority, stream: TcpStream) {
        keep_idle(&self.plain, authority, stream);
    }
}

/// True when a kept connection can take a request: the upstream has neither closed it nor
/// sent anything unasked. Costs no system call unless the socket has news: the runtime
/// already knows whether anything arrived since the last read that drained it.
pub async fn still_open(stream: &TcpStream) -> bool {
    let ready = std::future::poll_fn(|cx| std::task::Poll::Ready(stream.poll_read_ready(cx))).await;
    if ready.is_pending() {
        return true;
    }
    let mut probe = [0u8; 1];
    matches!(stream.try_read(&mut probe), Err(err) if err.kind() == std::io::ErrorKind::WouldBlock)
}

impl Pool {
    /// The most recently used connection that can take a request now. One still busy with an
    /// answer another client is reading stays for later; a closed or stale one goes.
    fn take(&self, authority: &Authority) -> Option<SendRequest<UpstreamBody>> {
        let mut idle = lock(&self.idle);
        let connections = idle.get_mut(authority)?;
        let now = Instant::now();
        connections.retain(|idle| !idle.connection.is_closed() && now - idle.since < IDLE_TIMEOUT);
        let ready = connections
            .iter()
            .rposition(|idle| idle.connection.is_ready())?;
        Some(connections.remove(ready).connection)
    }

    fn keep(&self, authority: Authority, sender: SendRequest<UpstreamBody>) {
        if !sender.is_closed() {
            keep_idle(&self.idle, authority, sender);
        }
    }
}

/// The pool's state stays consistent whatever panicked while holding the lock: each change is
/// a single push or remove.
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A new connection to `authority`.
pub async fn connect_socket(authority: &Authority) -> Result<TcpStream, SendError> {
    // An IPv6 literal comes bracketed in a URL, never in an address.
    let host = authority
        .host()
        .trim_start_matches('[')
        .trim_end_matches(']');
    let port = authority.port_u16().unwrap_or(80);
    let stream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect((host, port)))
        .await
        .map_err(|_| format!("connecting to {authority} timed out"))??;
    // Latency matters more than packet count for small API requests.
    stream.set_nodelay(true)?;
    Ok(stream)
}

async fn connect(authority: &Authority) -> Result<SendRequest<UpstreamBody>, SendError> {
    let stream = connect_socket(authority).await?;
    let (sender, connection) = http1::Builder::new()
        .max_header_size(MAX_RESPONSE_HEAD)
        .handshake(TokioIo::new(stream))
        .await?;
    tokio::spawn(async move {
        if let Err(err) = connection.with_upgrades().await {
            tracing::debug!(error = %err, "upstream connection ended");
        }
    });
    Ok(sender)
}
