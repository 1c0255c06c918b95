//! The client-facing listener: the accept loop, one task per connection (HTTP/1.1 and h2c),
//! the request path from path checks to proxying, the access log, and graceful shutdown.

use std::borrow::Cow;
use std::convert::Infallible;
use std::future::Future;
use std::io::Cursor;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{CONTENT_TYPE, HOST};
use http::{HeaderValue, Method, Request, Response, StatusCode, Version};
use http_body::{Body, Frame, SizeHint};
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use slab::Slab;
use socket2::{SockRef, TcpKeepalive};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio::task::JoinSet;
use tracing::Instrument;

use crate::auth;
use crate::error::Error;
use crate::metrics::{self, Metrics, RouteSeries};
use crate::proxy::{self, X_REQUEST_ID};
use crate::routes::{self, Route};
use crate::state::{SharedState, State};
use crate::upstream::Affinity;

mod fast_lane;
mod shedding;

use shedding::{Activity, InFlight, Shedding};

/// A proxied body streams through untouched; the gateway's own answers are small and whole.
pub type ResponseBody = Either<proxy::AnswerBody, Full<Bytes>>;

/// Longest client-sent `X-Request-Id` that is passed on; longer ones are replaced.
const MAX_REQUEST_ID_LEN: usize = 128;

/// Pause after a failed `accept` (most often out of file descriptors), so the loop does not
/// spin while the condition lasts.
pub(crate) const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);

/// The status logged and counted for a request whose client went away before its answer
/// (nginx's "client closed request").
const CLIENT_CLOSED_REQUEST: u16 = 499;

/// The status logged and counted for a request still unanswered when the shutdown's grace
/// period ran out: the gateway gave up on it, not its client.
const CUT_OFF_BY_SHUTDOWN: u16 = 503;

/// Serves `listener` until `shutdown` resolves, then stops accepting and gives in-flight
/// requests `server.shutdown_grace` to finish.
pub async fn run(
    listener: TcpListener,
    state: SharedState,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let grace_state = state.clone();
    // The services, metrics among them, are the process's and outlive reloads.
    let metrics = state.load().services.metrics.clone();
    let lane = state.clone();
    let handler = move |request, client| {
        let state = state.load_full();
        async move { handle(&state, request, client).await }
    };
    let limits = {
        let server = &grace_state.load().config.server;
        Limits {
            max_connections: server.max_connections,
            header_timeout: server.header_timeout,
        }
    };
    // The grace period is read at shutdown time: a reload may have changed it.
    let grace = move || grace_state.load().config.server.shutdown_grace;
    let cutting_off = move || metrics.grace_over.store(true, Ordering::Relaxed);
    serve_connections(
        listener,
        handler,
        Some(lane),
        limits,
        shutdown,
        grace,
        cutting_off,
    )
    .await;
    Ok(())
}

/// What one listener allows its clients. Fixed for the listener's life: changing them needs a
/// restart, like the listen address.
struct Limits {
    max_connections: usize,
    header_timeout: Duration,
}

/// The most a request's line and headers may take, whatever the protocol: enough for any
/// sane client, small enough that a flood of huge headers cannot eat memory.
pub(crate) const MAX_HEADER_BYTES: usize = 64 * 1024;

/// Where a listener is in its shutdown, as every connection it serves sees it.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Phase {
    Serving,
    /// Stop taking requests; finish the ones under way.
    Draining,
    /// The grace period is over: whatever still runs stops.
    Closed,
}

/// The client connection a request came on. Every clone keeps the connection's slot under
/// `server.max_connections` taken and the shutdown drain waiting for it: a WebSocket tunnel
/// keeps one for as long as it runs, so upgraded connections count against the cap and share
/// the grace period like any other.
#[derive(Clone)]
pub struct ClientConnection {
    pub peer: SocketAddr,
    /// The peer's address as a header value, written once for all the connection's requests.
    pub peer_ip: HeaderValue,
    /// The upstream connection an HTTP/1 client keeps while it is active; `None` for HTTP/2,
    /// whose requests run side by side and take from the shared pool.
    pub upstream: Option<Arc<Affinity>>,
    slot: Arc<Slot>,
}

struct Slot {
    _permit: OwnedSemaphorePermit,
    phase: watch::Receiver<Phase>,
}

impl ClientConnection {
    /// Resolves once the listener's shutdown grace period is over.
    pub async fn grace_over(&self) {
        let mut phase = self.slot.phase.clone();
        // An error means the listener is gone altogether: over as well.
        let _ = phase.wait_for(|phase| *phase == Phase::Closed).await;
    }
}

/// The HTTP/1.1 and HTTP/2 settings of one listener.
struct Protocols {
    http1: http1::Builder,
    http2: http2::Builder<TokioExecutor>,
    header_timeout: Duration,
}

impl Protocols {
    fn new(limits: &Limits) -> Protocols {
        let mut http1 = http1::Builder::new();
        // Also the keep-alive idle limit: hyper starts this timer as soon as a connection
        // waits for its next request.
        http1
            .timer(TokioTimer::new())
            .header_read_timeout(limits.header_timeout)
            // `max_buf_size` is checked only while a head is unfinished, so a longer head read
            // in one go would pass it; `max_header_size` is checked on every head.
            .max_buf_size(MAX_HEADER_BYTES)
            .max_header_size(MAX_HEADER_BYTES);
        let mut http2 = http2::Builder::new(TokioExecutor::new());
        http2
            .timer(TokioTimer::new())
            .max_header_list_size(MAX_HEADER_BYTES as u32)
            .keep_alive_interval(limits.header_timeout)
            .keep_alive_timeout(limits.header_timeout);
        Protocols {
            http1,
            http2,
            header_timeout: limits.header_timeout,
        }
    }
}

/// The accept loop shared by the gateway and the admin listener: one task per connection,
/// HTTP/1.1 or h2c, each holding a slot so that shutdown can wait for it to finish. With
/// `lane`, HTTP/1 connections take the fast lane for the requests it takes (see [`fast_lane`]).
/// `cutting_off` runs when the grace period is over, before the connections left are stopped.
// Each argument is a different part of the listener, and the two callers pass them as they are.
#[allow(clippy::too_many_arguments)]
async fn serve_connections<H, F>(
    listener: TcpListener,
    handler: H,
    lane: Option<SharedState>,
    limits: Limits,
    shutdown: impl Future<Output = ()>,
    grace: impl FnOnce() -> Duration,
    cutting_off: impl FnOnce(),
) where
    H: Fn(Request<Incoming>, ClientConnection) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<ResponseBody>> + Send + 'static,
{
    let protocols = Arc::new(Protocols::new(&limits));
    let connection_slots = Arc::new(Semaphore::new(limits.max_connections));
    let (phase, phase_seen) = watch::channel(Phase::Serving);
    // Kept so that the connections still open when the grace period runs out can be stopped
    // wherever they wait: the fast lane waits on its upstream up to the route's timeout.
    let mut connections = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        // Finished connections are reaped as new ones come, so the set holds the open ones.
        while connections.try_join_next().is_some() {}
        // Waiting for a free slot before accepting leaves further clients in the kernel's
        // backlog, where they cost the gateway nothing.
        let permit = tokio::select! {
            permit = connection_slots.clone().acquire_owned() => {
                permit.expect("the connection semaphore is never closed")
            }
            () = &mut shutdown => break,
        };
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(err) => {
                    tracing::warn!(error = %err, "accept failed");
                    tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        // Latency matters more than packet count for small API answers.
        let _ = stream.set_nodelay(true);
        probe_when_silent(&stream, limits.header_timeout);
        let client = ClientConnection {
            peer,
            peer_ip: HeaderValue::from_str(&peer.ip().to_string())
                .expect("an IP address is a valid header value"),
            upstream: None,
            slot: Arc::new(Slot {
                _permit: permit,
                phase: phase_seen.clone(),
            }),
        };
        connections.spawn(serve_connection(
            stream,
            client,
            handler.clone(),
            lane.clone(),
            protocols.clone(),
        ));
    }
    drop(listener);
    phase.send_replace(Phase::Draining);
    let grace = grace();
    tracing::info!(?grace, "draining in-flight requests");
    // Every slot back means every connection and tunnel has ended.
    let every_slot = u32::try_from(limits.max_connections)
        .expect("server.max_connections is validated to at most a million");
    let drained = tokio::time::timeout(grace, connection_slots.acquire_many(every_slot))
        .await
        .is_ok();
    if !drained {
        tracing::warn!("shutdown grace period over; closing the remaining connections");
        cutting_off();
    }
    phase.send_replace(Phase::Closed);
    if !drained {
        // Each connection ends where it waits, logging what it cut off, and each tunnel at its
        // next turn; waited for, so that those lines come before the gateway says it stopped.
        // Bounded all the same: nothing is worth a shutdown that does not end.
        connections.abort_all();
        let cut_off = async {
            while connections.join_next().await.is_some() {}
            let _ = connection_slots.acquire_many(every_slot).await;
        };
        let _ = tokio::time::timeout(CUTTING_OFF, cut_off).await;
    }
}

/// The most a shutdown waits, past its grace period, for the connections it cut off to end.
const CUTTING_OFF: Duration = Duration::from_secs(1);

/// Keep-alive probes a silent client's kernel must answer, `KEEPALIVE_INTERVAL` apart.
const KEEPALIVE_PROBES: u32 = 6;
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);

/// Has the kernel probe a client connection that has been silent for `silence`, and close it
/// when the client's side answers none of the probes. An upgraded connection (a WebSocket) has
/// no idle limit, so that a quiet but live one stays open (a live client's kernel answers the
/// probes whatever its application does); without probes, one whose client vanished without a
/// FIN (a phone that lost its network) while neither side had anything to say would hold its
/// connection slot and its upstream connection for ever. HTTP connections have an idle limit of
/// their own (`server.header_timeout`), so the probes matter to upgraded ones.
fn probe_when_silent(stream: &TcpStream, silence: Duration) {
    // The kernel counts the silence in whole seconds, from 1 to 32,767.
    let silence = silence.clamp(Duration::from_secs(1), Duration::from_secs(32_767));
    let probes = TcpKeepalive::new()
        .with_time(silence)
        .with_interval(KEEPALIVE_INTERVAL)
        .with_retries(KEEPALIVE_PROBES);
    // A connection the option cannot be set on is served all the same, as it was before.
    if let Err(err) = SockRef::from(stream).set_tcp_keepalive(&probes) {
        tracing::debug!(error = %err, "cannot set TCP keep-alive on a client connection");
    }
}

/// Which protocol a client speaks, told by its first bytes.
enum Protocol {
    Http1,
    Http2,
}

/// What every HTTP/2 connection starts with (RFC 9113 §3.4).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

async fn serve_connection<H, F>(
    mut stream: TcpStream,
    client: ClientConnection,
    handler: H,
    lane: Option<SharedState>,
    protocols: Arc<Protocols>,
) where
    H: Fn(Request<Incoming>, ClientConnection) -> F + Send + Sync + 'static,
    F: Future<Output = Response<ResponseBody>> + Send + 'static,
{
    let peer = client.peer;
    let mut phase = client.slot.phase.clone();
    // Until the protocol is known no hyper timer runs, so this deadline is what stops a client
    // that connects and sends nothing (or half a preface) from holding its slot for ever.
    let told = tokio::select! {
        told = tokio::time::timeout(protocols.header_timeout, tell_protocol(&mut stream)) => told,
        // No request has begun: nothing to drain.
        _ = phase.wait_for(|phase| *phase != Phase::Serving) => return,
    };
    let (protocol, first_bytes) = match told {
        Ok(Ok(Some(told))) => told,
        Ok(Ok(None)) => return,
        Ok(Err(err)) => {
            tracing::debug!(%peer, error = %err, "connection failed before its first request");
            return;
        }
        Err(_) => {
            tracing::debug!(%peer, "connection closed: no request began within header_timeout");
            return;
        }
    };
    match protocol {
        Protocol::Http1 => {
            serve_http1(
                stream,
                first_bytes,
                client,
                handler,
                lane.as_ref(),
                &protocols,
                phase,
            )
            .await;
        }
        Protocol::Http2 => {
            let streams = Arc::new(Streams::new());
            let counted = streams.clone();
            let handler = Arc::new(handler);
            let service = service_fn(move |request| {
                let stream = counted.open();
                let (handler, client) = (handler.clone(), client.clone());
                // The request's future is made inside the block, not before it: a block that
                // awaits a future it captured holds room for it twice (rust-lang/rust#62958),
                // and hyper moves the whole block into place for every request.
                async move {
                    let response = handler(request, client).await;
                    Ok::<_, Infallible>(response.map(|body| StreamAnswer::new(body, stream)))
                }
            });
            let io = TokioIo::new(replayed(first_bytes, stream));
            // Boxed like an HTTP/1 connection, whose task would otherwise have room for it.
            let mut connection = Box::pin(protocols.http2.serve_connection(io, service));
            drive(
                connection.as_mut(),
                |connection| connection.graceful_shutdown(),
                streams.watch(protocols.header_timeout),
                phase,
                peer,
            )
            .await;
        }
    }
}

/// An HTTP/1 connection: the fast lane while the requests are its own, else one hyper
/// connection after another on the same socket. Each ends once the client has idled for
/// [`shedding::SHED_AFTER`], and the next starts when the client sends again, so that an idle
/// client holds no buffers (see [`shedding`]).
async fn serve_http1<H, F>(
    mut stream: TcpStream,
    first_bytes: Vec<u8>,
    mut client: ClientConnection,
    handler: H,
    lane: Option<&SharedState>,
    protocols: &Protocols,
    mut phase: watch::Receiver<Phase>,
) where
    H: Fn(Request<Incoming>, ClientConnection) -> F + Send + Sync + 'static,
    F: Future<Output = Response<ResponseBody>> + Send + 'static,
{
    let peer = client.peer;
    let upstream = Arc::new(Affinity::default());
    client.upstream = Some(upstream.clone());
    let lane_client = client.clone();
    let activity = Arc::new(Activity::default());
    let counted = activity.clone();
    let handler = Arc::new(handler);
    let mut service = service_fn(move |request| {
        let in_flight = counted.begin();
        let (handler, client, activity) = (handler.clone(), client.clone(), counted.clone());
        // Made inside the block for the reason given for HTTP/2 above.
        async move {
            let response = handler(request, client).await;
            if response.status() == StatusCode::SWITCHING_PROTOCOLS {
                activity.upgraded();
            }
            Ok::<_, Infallible>(response.map(|body| GuardedBody {
                inner: body,
                _guard: in_flight,
            }))
        }
    });
    let mut replay = first_bytes;
    // Idle time left after shedding, up to the keep-alive limit that hyper itself keeps while
    // its connection waits.
    let idle_limit = protocols
        .header_timeout
        .saturating_sub(shedding::SHED_AFTER);
    loop {
        if let Some(shared) = lane {
            // Boxed, so that an idle connection's task does not keep room for the lane.
            let served = Box::pin(fast_lane::serve(
                &mut stream,
                replay,
                shared,
                &lane_client,
                &phase,
                protocols.header_timeout,
            ))
            .await;
            match served {
                fast_lane::Ended::Closed => return,
                fast_lane::Ended::Idle => {
                    tracing::debug!(%peer, "idle keep-alive connection shed its buffers");
                    if !next_request(&stream, idle_limit, &mut phase, peer).await {
                        return;
                    }
                    replay = Vec::new();
                    continue;
                }
                fast_lane::Ended::Handover(read) => replay = read,
            }
        }
        let io = Shedding::new(stream, replay, activity.clone(), protocols.header_timeout);
        // Boxed, so that the connection's task keeps only a pointer to it while it idles.
        let mut connection = Box::new(
            protocols
                .http1
                .serve_connection(TokioIo::new(io), service)
                .with_upgrades(),
        );
        let ended = drive(
            Pin::new(&mut *connection),
            |connection| connection.graceful_shutdown(),
            std::future::pending(),
            phase.clone(),
            peer,
        )
        .await;
        // `None` once upgraded: the socket belongs to the tunnel now.
        let Some(parts) = (*connection).into_parts().filter(|_| ended) else {
            return;
        };
        let http1::Parts {
            io,
            read_buf,
            service: returned,
            ..
        } = parts;
        // What hyper had read but not used: nothing, for a shed connection, which read nothing
        // since its last answer. Even empty it holds on to hyper's whole read buffer, so it
        // goes before the wait.
        if !read_buf.is_empty() {
            return;
        }
        drop(read_buf);
        let Some(shed) = io.into_inner().into_shed_stream() else {
            return;
        };
        // An idle client has no use for an upstream connection; another client may.
        upstream.release();
        tracing::debug!(%peer, "idle keep-alive connection shed its buffers");
        stream = shed;
        replay = Vec::new();
        service = returned;
        if !next_request(&stream, idle_limit, &mut phase, peer).await {
            return;
        }
    }
}

/// Waits, holding no buffer, for an idle client's next request: false when none began within
/// `idle_limit` or the listener is draining.
async fn next_request(
    stream: &TcpStream,
    idle_limit: Duration,
    phase: &mut watch::Receiver<Phase>,
    peer: SocketAddr,
) -> bool {
    let next_request = tokio::select! {
        readable = tokio::time::timeout(idle_limit, stream.readable()) => readable,
        _ = phase.wait_for(|phase| *phase != Phase::Serving) => return false,
    };
    if !matches!(next_request, Ok(Ok(()))) {
        tracing::debug!(%peer, "keep-alive connection closed: idle for header_timeout");
        return false;
    }
    true
}

/// Reads until the first bytes tell an HTTP/2 preface from an HTTP/1 request: as long as they
/// match the preface, until all of it has come. `None` when the client closed first.
async fn tell_protocol(stream: &mut TcpStream) -> std::io::Result<Option<(Protocol, Vec<u8>)>> {
    let mut first = Vec::with_capacity(H2_PREFACE.len());
    loop {
        // Reads at most the capacity left, so never past the preface.
        if stream.read_buf(&mut first).await? == 0 {
            return Ok(None);
        }
        if !H2_PREFACE.starts_with(&first) {
            return Ok(Some((Protocol::Http1, first)));
        }
        if first.len() == H2_PREFACE.len() {
            return Ok(Some((Protocol::Http2, first)));
        }
    }
}

/// The stream with the bytes already read put back in front, for hyper to read from the start
/// (what hyper-util's auto builder does with a type of its own, which it keeps private).
fn replayed(
    first_bytes: Vec<u8>,
    stream: TcpStream,
) -> impl AsyncRead + AsyncWrite + Send + Unpin + 'static {
    let (read, write) = stream.into_split();
    tokio::io::join(Cursor::new(first_bytes).chain(read), write)
}

/// Serves `connection` to its end. It is asked to finish what it has under way and take nothing
/// new once the listener drains or `unwanted` finds it idle, and is left unfinished when the
/// grace period is over or `unwanted` finds it stalled. True when it ended without an error.
async fn drive<C, E>(
    mut connection: Pin<&mut C>,
    graceful_shutdown: impl FnOnce(Pin<&mut C>),
    unwanted: impl Future<Output = Unwanted>,
    mut phase: watch::Receiver<Phase>,
    peer: SocketAddr,
) -> bool
where
    C: Future<Output = Result<(), E>>,
    E: std::fmt::Display,
{
    tokio::pin!(unwanted);
    let ended = tokio::select! {
        ended = connection.as_mut() => Some(ended),
        unwanted = &mut unwanted => match unwanted {
            Unwanted::Idle => {
                tracing::debug!(%peer, "closing an HTTP/2 connection idle for header_timeout");
                None
            }
            // Finishing gracefully would wait on the very answer the client does not take.
            Unwanted::Stalled => {
                tracing::debug!(
                    %peer,
                    "closing an HTTP/2 connection whose client took nothing of an answer for \
                     header_timeout"
                );
                return false;
            }
        },
        _ = phase.wait_for(|phase| *phase != Phase::Serving) => None,
    };
    let ended = match ended {
        Some(ended) => ended,
        None => {
            graceful_shutdown(connection.as_mut());
            tokio::select! {
                ended = connection.as_mut() => ended,
                _ = phase.wait_for(|phase| *phase == Phase::Closed) => return false,
            }
        }
    };
    if let Err(err) = &ended {
        tracing::debug!(%peer, error = %err, "connection ended with an error");
    }
    ended.is_ok()
}

/// The streams open on one HTTP/2 connection, and what each waits for. hyper's HTTP/2 server
/// has no idle limit and no send timeout of its own, and its keep-alive pings keep a client
/// that answers them connected for ever: even one that never opens its flow-control window,
/// which would hold each answer, and the upstream connection feeding it, for ever.
struct Streams {
    opened_at: tokio::time::Instant,
    state: Mutex<StreamsState>,
}

struct StreamsState {
    /// Per open stream, since when its answer has waited for the client to take some of it
    /// (milliseconds after `opened_at`), or [`NOT_WAITING`].
    open: Slab<u64>,
    /// Milliseconds after `opened_at` since which no stream has been open.
    idle_since: u64,
}

/// The stamp of a stream whose request is under way, or whose answer's next piece is awaited
/// from the upstream (which the route's `timeout` bounds).
const NOT_WAITING: u64 = u64::MAX;

/// Why [`Streams::watch`] would have its connection end.
enum Unwanted {
    /// No stream has been open for the period.
    Idle,
    /// An answer has waited the period for the client to take any of it.
    Stalled,
}

impl Streams {
    fn new() -> Streams {
        Streams {
            opened_at: tokio::time::Instant::now(),
            state: Mutex::new(StreamsState {
                open: Slab::new(),
                idle_since: 0,
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, StreamsState> {
        // Each critical section is a store or a scan, and leaves the state whole if it panics.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn now(&self) -> u64 {
        self.opened_at.elapsed().as_millis() as u64
    }

    fn open(self: &Arc<Self>) -> OpenStream {
        let key = self.lock().open.insert(NOT_WAITING);
        OpenStream {
            streams: self.clone(),
            key,
        }
    }

    /// Resolves once no stream has been open for `period`, or an answer has waited that long
    /// for the client.
    async fn watch(&self, period: Duration) -> Unwanted {
        loop {
            let now = self.now();
            let (since, unwanted) = {
                let state = self.lock();
                if state.open.is_empty() {
                    (state.idle_since, Unwanted::Idle)
                } else {
                    let oldest = state.open.iter().map(|(_, &since)| since).min();
                    (oldest.unwrap_or(NOT_WAITING), Unwanted::Stalled)
                }
            };
            let period_ms = period.as_millis() as u64;
            // A stream that begins to wait after this look is seen at the next, at most a
            // period from now, and then given its full period.
            let check_at = match since {
                NOT_WAITING => now + period_ms,
                since if now >= since + period_ms => return unwanted,
                since => since + period_ms,
            };
            tokio::time::sleep_until(self.opened_at + Duration::from_millis(check_at)).await;
        }
    }
}

/// One stream of [`Streams`], from its request until hyper drops its response body: once the
/// body is sent, or when the stream is reset.
struct OpenStream {
    streams: Arc<Streams>,
    key: usize,
}

impl OpenStream {
    /// The answer waits for the client from now: hyper has it, or a piece of its body, and
    /// asks for more only once the client's window has room.
    fn handed_over(&self) {
        let now = self.streams.now();
        self.streams.lock().open[self.key] = now;
    }

    fn taken(&self) {
        self.streams.lock().open[self.key] = NOT_WAITING;
    }
}

impl Drop for OpenStream {
    fn drop(&mut self) {
        let now = self.streams.now();
        let mut state = self.streams.lock();
        state.open.remove(self.key);
        if state.open.is_empty() {
            state.idle_since = now;
        }
    }
}

/// An HTTP/2 answer, marking its stream as waiting for the client while hyper holds a piece of
/// it that the client's window has no room for.
struct StreamAnswer {
    inner: ResponseBody,
    stream: OpenStream,
}

impl StreamAnswer {
    fn new(inner: ResponseBody, stream: OpenStream) -> StreamAnswer {
        stream.handed_over();
        StreamAnswer { inner, stream }
    }
}

impl Body for StreamAnswer {
    type Data = Bytes;
    type Error = <ResponseBody as Body>::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        self.stream.taken();
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(_))) = polled {
            self.stream.handed_over();
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// An HTTP/1 answer, keeping its request counted as in flight while hyper holds it.
struct GuardedBody {
    inner: ResponseBody,
    _guard: InFlight,
}

impl Body for GuardedBody {
    type Data = Bytes;
    type Error = <ResponseBody as Body>::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The admin listener's own content types: Prometheus scrapes OpenMetrics; the probes answer
/// a word.
const OPENMETRICS_TEXT: HeaderValue =
    HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8");
const PLAIN_TEXT: HeaderValue = HeaderValue::from_static("text/plain; charset=utf-8");

/// Probes and scrapers are few and quick.
const ADMIN_MAX_CONNECTIONS: usize = 64;
const ADMIN_HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// The admin listener: `/healthz` while the process runs, `/readyz` while the store answers,
/// `/metrics` for Prometheus.
pub async fn run_admin(
    listener: TcpListener,
    state: SharedState,
    shutdown: impl Future<Output = ()>,
) {
    let handler = move |request: Request<Incoming>, _client| {
        let state = state.load_full();
        async move {
            let (status, content_type, body) = match request.uri().path() {
                "/healthz" => (StatusCode::OK, PLAIN_TEXT, "ok".to_string()),
                "/metrics" => (
                    StatusCode::OK,
                    OPENMETRICS_TEXT,
                    state.services.metrics.encode(),
                ),
                "/readyz" => match state.services.store.ping().await {
                    Ok(()) => (StatusCode::OK, PLAIN_TEXT, "ready".to_string()),
                    Err(err) => {
                        tracing::warn!(error = %err, "not ready: the store does not answer");
                        (
                            StatusCode::SERVICE_UNAVAILABLE,
                            PLAIN_TEXT,
                            "store unavailable".to_string(),
                        )
                    }
                },
                _ => (StatusCode::NOT_FOUND, PLAIN_TEXT, "not found".to_string()),
            };
            let mut response = Response::new(Either::Right(Full::new(Bytes::from(body))));
            *response.status_mut() = status;
            response.headers_mut().insert(CONTENT_TYPE, content_type);
            response
        }
    };
    let limits = Limits {
        max_connections: ADMIN_MAX_CONNECTIONS,
        header_timeout: ADMIN_HEADER_TIMEOUT,
    };
    // Admin requests keep no access-log record to count as cut off.
    serve_connections(
        listener,
        handler,
        None,
        limits,
        shutdown,
        || Duration::from_secs(1),
        || {},
    )
    .await;
}

/// One request, start to finish: it never fails, errors become their JSON answer here.
async fn handle(
    state: &State,
    request: Request<Incoming>,
    client: ClientConnection,
) -> Response<ResponseBody> {
    let request_id = request_id(
        request
            .headers()
            .get(X_REQUEST_ID)
            .map(HeaderValue::as_bytes),
    );
    let mut record = Record::begin(
        &state.services.metrics,
        Instant::now(),
        Some(request.method().clone()),
        request.uri().path().to_owned().into(),
        &request_id,
    );
    let request_id = request_id.to_header_value();
    let result = dispatch(state, request, &client, &request_id, &mut record.route)
        .instrument(record.span.clone())
        .await;
    let mut response = match result {
        Ok(response) => response,
        Err(err) => err.into_response().map(Either::Right),
    };
    response.headers_mut().insert(X_REQUEST_ID, request_id);
    record.status = response.status().as_u16();
    response
}

/// A request's access-log line and metrics, written when it is dropped: at the answer, or
/// when the request is abandoned (the client went away, an HTTP/2 reset, the grace period
/// over), which the code after an `.await` would never see.
struct Record<'a> {
    metrics: &'a Metrics,
    started: Instant,
    /// `None` for a request whose head did not parse, logged as `-` like its path.
    method: Option<Method>,
    path: Cow<'a, str>,
    route: Arc<RouteSeries>,
    status: u16,
    span: tracing::Span,
}

impl Record<'_> {
    /// Counts the request, which arrived at `started`, in flight until the record is dropped.
    fn begin<'a>(
        metrics: &'a Metrics,
        started: Instant,
        method: Option<Method>,
        path: Cow<'a, str>,
        request_id: &RequestId<'_>,
    ) -> Record<'a> {
        metrics.in_flight.inc();
        Record {
            metrics,
            started,
            method,
            path,
            route: metrics.no_route.clone(),
            status: CLIENT_CLOSED_REQUEST,
            // Every line logged while answering carries the request id.
            span: tracing::info_span!("request", request_id = %request_id),
        }
    }
}

impl Drop for Record<'_> {
    fn drop(&mut self) {
        if self.status == CLIENT_CLOSED_REQUEST && self.metrics.grace_over.load(Ordering::Relaxed) {
            self.status = CUT_OFF_BY_SHUTDOWN;
        }
        let took = self.started.elapsed();
        let metrics = self.metrics;
        self.route.observe_request(metrics, self.status, took);
        metrics.in_flight.dec();
        // Last, so that whoever reads the line finds the request counted.
        self.span.in_scope(|| {
            tracing::info!(
                target: "wxgate::access",
                method = self.method.as_ref().map_or("-", Method::as_str),
                path = %self.path,
                route = self.route.label.as_str(),
                status = self.status,
                duration_us = took.as_micros() as u64,
            )
        });
    }
}

/// The checks in SPEC §4 order, after [`malformed`]: path, route, method, token, body size;
/// then the answer.
async fn dispatch(
    state: &State,
    request: Request<Incoming>,
    client: &ClientConnection,
    request_id: &HeaderValue,
    route_series: &mut Arc<RouteSeries>,
) -> Result<Response<ResponseBody>, Error> {
    if let Some(why) = malformed(&request) {
        return Err(Error::BadRequest(why.into()));
    }
    let path = request.uri().path();
    routes::check_path(path)?;
    if auth::owns_path(state, path) {
        *route_series = state.services.metrics.auth_route.clone();
        // Boxed: the login's future (WeChat calls, the exchange cache) is many times the size
        // of the proxy path's, and hyper allocates room for the largest request future once
        // per connection. Unboxed, every connection would carry it for every request.
        return Box::pin(auth::handle(state, request, client.peer))
            .await
            .map(|response| response.map(Either::Right));
    }
    let route: &Route = state.routes.find(path).ok_or(Error::NoRoute)?;
    *route_series = route.series.clone();
    if !route.allows_method(request.method()) {
        return Err(route.method_refused());
    }
    let identity = auth::authorize(state, route, request.headers())?;
    if proxy::declared_over(request.body(), state.config.server.max_body_bytes) {
        return Err(Error::PayloadTooLarge);
    }
    // Not boxed, unlike the gateway's own endpoints: hyper holds the request future in one
    // allocation per connection, and an idle connection sheds it (see `shedding`), so
    // boxing would cost an allocation on every proxied request to save nothing.
    let response = proxy::forward(
        state,
        route,
        request,
        client,
        identity.as_deref(),
        request_id,
    )
    .await?;
    Ok(response.map(Either::Left))
}

/// Why a request cannot go on as the client sent it, on any route. RFC 9112 has a server
/// refuse an HTTP/1.1 request without `Host`, and any with two: the upstream, or a proxy in
/// front, could take another host than the one passed on. A target that names a host of its
/// own (absolute form, or HTTP/2's `:authority`) other than `Host`'s is two hosts as well:
/// RFC 9112 §3.2.2 has a server go by the target's, the upstream would go by `Host`, and
/// RFC 9113 §8.3.1 calls such an HTTP/2 request malformed. A body in a transfer coding the
/// gateway would not pass on comes next. nginx answers these 400, and the coding 501; SPEC §4
/// has `bad_request` for them all.
fn malformed(request: &Request<Incoming>) -> Option<&'static str> {
    let mut hosts = request.headers().get_all(HOST).iter();
    let host = hosts.next();
    if hosts.next().is_some() || (host.is_none() && request.version() == Version::HTTP_11) {
        return Some(
            "an HTTP/1.1 request must carry one Host header, and no request may carry two",
        );
    }
    if let (Some(host), Some(authority)) = (host, request.uri().authority())
        && !host
            .as_bytes()
            .eq_ignore_ascii_case(authority.as_str().as_bytes())
    {
        return Some("the request's target names another host than its Host header");
    }
    if proxy::coded_past_chunked(request.headers()) {
        return Some(
            "the request's Transfer-Encoding is not chunked alone, and the gateway passes on no \
             other coding",
        );
    }
    None
}

/// The client's `X-Request-Id` (`sent`) when it is short and plain (so it can go into logs and
/// headers as is), else a new one.
fn request_id(sent: Option<&[u8]>) -> RequestId<'_> {
    if let Some(bytes) = sent {
        let sane = !bytes.is_empty()
            && bytes.len() <= MAX_REQUEST_ID_LEN
            && bytes
                .iter()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'));
        if sane {
            return RequestId::Sent(std::str::from_utf8(bytes).expect("checked to be ASCII"));
        }
    }
    let mut generated = [0; uuid::fmt::Simple::LENGTH];
    uuid::Uuid::new_v4().simple().encode_lower(&mut generated);
    RequestId::Generated(generated)
}

/// A request's id, borrowed from the request or made in place: the fast lane writes it into
/// both heads without an allocation.
enum RequestId<'a> {
    Sent(&'a str),
    Generated([u8; uuid::fmt::Simple::LENGTH]),
}

impl RequestId<'_> {
    fn as_bytes(&self) -> &[u8] {
        match self {
            RequestId::Sent(sent) => sent.as_bytes(),
            RequestId::Generated(hex) => hex,
        }
    }

    fn to_header_value(&self) -> HeaderValue {
        HeaderValue::from_bytes(self.as_bytes()).expect("a request id is plain ASCII")
    }
}

/// Written only where a log line takes the id: a generated one is never checked as text.
impl std::fmt::Display for RequestId<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RequestId::Sent(sent) => f.write_str(sent),
            RequestId::Generated(hex) => hex
                .iter()
                .try_for_each(|&digit| std::fmt::Write::write_char(f, char::from(digit))),
        }
    }
}

/// `wxgate serve`: loads the config, binds the listeners and runs until SIGTERM or SIGINT.
pub async fn serve(config_path: &std::path::Path) -> anyhow::Result<()> {
    // Before anything is bound or logged: until a handler is in place, a signal's default
    // action ends the process, and a SIGHUP sent as soon as the gateway says it listens
    // must reload it.
    let shutdown = ShutdownSignals::install()?;
    #[cfg(unix)]
    let hangups = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;

    let config = crate::Config::load(config_path)?;
    let (listen, admin_listen) = (config.server.listen, config.server.admin_listen);
    let state = State::shared(config).await?;
    let listener = bind(listen).await?;
    let admin_listener = match admin_listen {
        Some(addr) => Some(bind(addr).await?),
        None => None,
    };
    tracing::info!(addr = %listener.local_addr()?, "wxgate listening");

    let (stop, stopped) = watch::channel(false);
    let stop_requested = move || {
        let mut stopped = stopped.clone();
        async move {
            let _ = stopped.wait_for(|stop| *stop).await;
        }
    };
    let admin = match admin_listener {
        Some(admin_listener) => {
            tracing::info!(addr = %admin_listener.local_addr()?, "admin listening");
            Some(tokio::spawn(run_admin(
                admin_listener,
                state.clone(),
                stop_requested(),
            )))
        }
        None => None,
    };
    tokio::spawn(async move {
        shutdown.recv().await;
        let _ = stop.send(true);
    });
    #[cfg(unix)]
    tokio::spawn(reload_on_sighup(
        hangups,
        config_path.to_path_buf(),
        state.clone(),
    ));
    run(listener, state, stop_requested()).await?;
    if let Some(admin) = admin {
        let _ = admin.await;
    }
    tracing::info!("wxgate stopped");
    Ok(())
}

/// Re-reads the config file on every SIGHUP and swaps the state whole. A file that does not
/// load is refused and the running config keeps serving.
#[cfg(unix)]
async fn reload_on_sighup(
    mut hangups: tokio::signal::unix::Signal,
    path: std::path::PathBuf,
    state: SharedState,
) {
    while hangups.recv().await.is_some() {
        match reload(&path, &state) {
            Ok(()) => tracing::info!(path = %path.display(), "config reloaded"),
            Err(err) => tracing::error!(
                path = %path.display(),
                problems = %err,
                "config reload refused; the previous config keeps serving"
            ),
        }
    }
}

/// Loads `path` and makes it the state new requests see; requests under way finish on the
/// state they started with. A setting that differs from what the process started with is
/// named in a warning: it takes effect only after a restart.
pub fn reload(
    path: &std::path::Path,
    state: &SharedState,
) -> Result<(), crate::config::ConfigError> {
    let current = state.load_full();
    let outcome = crate::Config::load(path)
        .and_then(|config| State::new(config, current.services.clone()))
        .map(|next| {
            // Only for a config that is taken: one refused changes nothing, now or later.
            for key in current.services.restart_settings.changed_in(&next.config) {
                tracing::warn!(key, "this setting takes effect only after a restart");
            }
            state.store(Arc::new(next))
        });
    let result = if outcome.is_ok() { "ok" } else { "error" };
    current
        .services
        .metrics
        .config_reloads
        .get_or_create(&metrics::Outcome { result })
        .inc();
    outcome
}

async fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .map_err(|err| anyhow::anyhow!("cannot listen on {addr}: {err}"))
}

/// SIGTERM and SIGINT, caught from the moment this is made.
pub struct ShutdownSignals {
    #[cfg(unix)]
    terminate: tokio::signal::unix::Signal,
    #[cfg(unix)]
    interrupt: tokio::signal::unix::Signal,
}

impl ShutdownSignals {
    pub fn install() -> std::io::Result<ShutdownSignals> {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            Ok(ShutdownSignals {
                terminate: signal(SignalKind::terminate())?,
                interrupt: signal(SignalKind::interrupt())?,
            })
        }
        #[cfg(not(unix))]
        Ok(ShutdownSignals {})
    }

    /// Resolves on the first SIGTERM or SIGINT.
    pub async fn recv(mut self) {
        #[cfg(unix)]
        tokio::select! {
            _ = self.terminate.recv() => {}
            _ = self.interrupt.recv() => {}
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// Resolves on the first SIGTERM or SIGINT after it is first polled.
pub async fn shutdown_signal() {
    ShutdownSignals::install()
        .expect("installing SIGTERM and SIGINT handlers cannot fail")
        .recv()
        .await
}
