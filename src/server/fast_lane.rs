//! The fast lane: the common request (HTTP/1.1, keep-alive, no body, to a route) answered
//! without hyper, on plain sockets at both ends.
//!
//! hyper's general machinery (a header map per message on both sides, a dispatcher task per
//! upstream connection, the futures it moves from place to place) costs more per request than
//! the system calls that carry it; the bench (README, "Performance") measured it. This lane
//! parses the request head once with `httparse`, the parser hyper itself uses, makes every
//! decision the hyper path makes with the same functions (`check_path`, the route table,
//! `auth::authorize_bearer`, the identity rules), writes the upstream request head in one
//! buffer and relays the answer with its framing checked.
//!
//! It takes only what it is sure of. Anything else (a body, `Transfer-Encoding`, `Expect`,
//! `Connection` other than `keep-alive` (so any upgrade), `CONNECT`, a repeated `Host`,
//! `Content-Length` or `Authorization`, HTTP/1.0, a target that is not in origin form, the
//! gateway's own endpoints) is handed to hyper with the bytes read so far, and hyper serves
//! the connection from there until it next idles. So a request that could be read two ways is
//! never read by the lane at all. A head that does not parse is refused here, as hyper would
//! refuse it, but with the gateway's JSON answer rather than hyper's empty one.

use std::borrow::Cow;
use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::uri::Authority;
use http::{Method, Response, Uri};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::Sleep;

use super::shedding::SHED_AFTER;
use super::{ClientConnection, Phase, Record, RequestId};
use crate::auth::{self, LastToken};
use crate::config::AuthMode;
use crate::error::Error;
use crate::proxy;
use crate::routes::{self, Route};
use crate::state::{SharedState, State};
use crate::upstream;

/// How much room a request head is read into at a time. Real API requests have heads of a few
/// hundred bytes, a token being the longest part; the limit is `MAX_HEADER_BYTES`.
const HEAD_BUFFER: usize = 8 * 1024;

/// hyper's own limit on the number of headers in a message.
const MAX_HEADERS: usize = 100;

/// How much of a response body is read from the upstream at a time.
const BODY_BUFFER: usize = 16 * 1024;

/// The longest chunk-size line (with its extensions) or trailer line taken in a chunked body.
const MAX_CHUNK_LINE: usize = 4 * 1024;

/// Why the lane stopped serving a connection.
pub(super) enum Ended {
    /// The connection is over: the client closed it, it failed, or it may not go on.
    Closed,
    /// The client sent nothing for [`SHED_AFTER`]: it holds no request and no buffer.
    Idle,
    /// The request at the front of these bytes is not one the lane takes.
    Handover(Vec<u8>),
}

/// Serves requests from `stream` while they are the lane's, starting with those in `pending`.
pub(super) async fn serve(
    stream: &mut TcpStream,
    mut pending: Vec<u8>,
    shared: &SharedState,
    client: &ClientConnection,
    phase: &watch::Receiver<Phase>,
    header_timeout: Duration,
) -> Ended {
    let mut lane = Lane {
        upstream: None,
        out: Vec::new(),
        from_upstream: Vec::new(),
        last_token: LastToken::default(),
        header_timeout,
    };
    // Two timers for the whole connection: one for the client's head, one for the upstream's
    // answer. One timer moved back and forth between the two would be taken out of the timer
    // wheel and put back on every request.
    let head_timer = tokio::time::sleep(SHED_AFTER);
    tokio::pin!(head_timer);
    let mut deadline = Deadline::of(head_timer);
    let upstream_timer = tokio::time::sleep(SHED_AFTER);
    tokio::pin!(upstream_timer);
    let mut upstream_deadline = Deadline::of(upstream_timer);
    let mut head_started = tokio::time::Instant::now();
    let ended = loop {
        // Loaded once a whole head is in, not on each turn that waits for bytes: a request
        // runs start to finish on the state it began with.
        let mut loaded = None;
        // The plan borrows the head from `pending`, so the request is answered within this
        // block, and only what it came to leaves it: `pending` can then take more bytes.
        let step = {
            let step = {
                let mut headers = [const { MaybeUninit::uninit() }; MAX_HEADERS];
                let mut request = httparse::Request::new(&mut []);
                match request.parse_with_uninit_headers(&pending, &mut headers) {
                    Ok(httparse::Status::Complete(head_len)) => {
                        let state: &Arc<State> = loaded.insert(shared.load_full());
                        match plan(
                            state,
                            &request,
                            &pending,
                            client,
                            &mut lane.out,
                            &mut lane.last_token,
                        ) {
                            Some(plan) => Step::Answer(head_len, plan),
                            None => match framing_refused(&request) {
                                Some(why) => Step::Malformed(why),
                                None => Step::Handover,
                            },
                        }
                    }
                    Ok(httparse::Status::Partial) if pending.len() < super::MAX_HEADER_BYTES => {
                        Step::ReadMore
                    }
                    Ok(httparse::Status::Partial) => Step::TooLarge,
                    // hyper answers too many headers 431, as the lane does a head too long.
                    Err(httparse::Error::TooManyHeaders) => Step::TooLarge,
                    Err(_) => {
                        Step::Malformed("the request line or headers do not parse as HTTP/1.1")
                    }
                }
            };
            match step {
                Step::Answer(head_len, plan) => {
                    let draining = *phase.borrow() != Phase::Serving;
                    let answered = lane
                        .answer(plan, stream, draining, &mut upstream_deadline)
                        .await;
                    Step::Answer(head_len, answered && !draining)
                }
                Step::ReadMore => Step::ReadMore,
                Step::TooLarge => Step::TooLarge,
                Step::Malformed(why) => Step::Malformed(why),
                Step::Handover => Step::Handover,
            }
        };
        match step {
            Step::Handover => break Ended::Handover(pending),
            Step::Malformed(_) | Step::TooLarge => {
                // A head refused unread still has its access-log line and its count, with no
                // method or path to give.
                let state = shared.load_full();
                let request_id = super::request_id(None);
                let mut record = Record::begin(
                    &state.services.metrics,
                    head_started.into_std(),
                    None,
                    Cow::Borrowed("-"),
                    &request_id,
                );
                let request_id = request_id.as_bytes();
                record.status = if let Step::Malformed(why) = step {
                    // hyper, which parses with httparse too, would refuse the head with an
                    // empty 400; the gateway's refusals are JSON.
                    write_error(
                        &mut lane.out,
                        Error::BadRequest(why.into()),
                        request_id,
                        true,
                    )
                } else {
                    // What hyper answers past its `max_header_size` or its header count. The
                    // lane's buffer stops at the same size, so it answers here rather than
                    // hand hyper a head that hyper would refuse.
                    write_head_too_large(&mut lane.out, request_id)
                };
                // Either way the connection cannot go on: where the next request would
                // start is unknown.
                let _ = send(stream, &lane.out, &mut deadline, header_timeout).await;
                break Ended::Closed;
            }
            Step::ReadMore => {
                let idle = pending.is_empty();
                if idle {
                    head_started = tokio::time::Instant::now();
                }
                let wait_until = if idle {
                    head_started + SHED_AFTER.min(header_timeout)
                } else {
                    head_started + header_timeout
                };
                deadline.set(wait_until);
                pending.reserve(HEAD_BUFFER);
                // `reserve` may make more room than asked: the read stops at the limit.
                let room = super::MAX_HEADER_BYTES - pending.len();
                let mut within_limit = bytes::BufMut::limit(&mut pending, room);
                // The drain is not watched here, which would cost every request a poll of
                // it: an idle client is back in the connection loop, which does watch it,
                // within `SHED_AFTER`, and a head under way is an arriving request, answered
                // with `Connection: close`.
                let read = tokio::select! {
                    biased;
                    read = stream.read_buf(&mut within_limit) => read,
                    () = deadline.passed() => {
                        // An idle client goes back to the connection loop, which sheds and
                        // keeps waiting up to `header_timeout`; a stalled head is closed.
                        break if idle { Ended::Idle } else { Ended::Closed };
                    }
                };
                match read {
                    Ok(0) | Err(_) => break Ended::Closed,
                    Ok(_) => {}
                }
            }
            Step::Answer(head_len, goes_on) => {
                pending.drain(..head_len);
                if !goes_on {
                    break Ended::Closed;
                }
                // An empty buffer waits as an idle connection, which takes its own reading.
                if !pending.is_empty() {
                    head_started = tokio::time::Instant::now();
                }
            }
        }
    };
    if let Some((authority, socket)) = lane.upstream.take() {
        shared
            .load()
            .services
            .upstream
            .keep_plain(authority, socket);
    }
    ended
}

/// A deadline moved on every request whose timer is touched only when it fires. Moving a
/// runtime timer later costs a conversion of the instant into the timer's ticks and an atomic
/// write; here it is a store. The timer, still armed with an earlier deadline, finds the
/// current one when it fires and is armed again with it: under load it fires once per
/// `SHED_AFTER` or route timeout, not once per request.
struct Deadline<'t> {
    timer: Pin<&'t mut Sleep>,
    due: tokio::time::Instant,
}

impl<'t> Deadline<'t> {
    fn of(timer: Pin<&'t mut Sleep>) -> Deadline<'t> {
        let due = timer.deadline();
        Deadline { timer, due }
    }

    fn set(&mut self, due: tokio::time::Instant) {
        // A timer armed later than the new deadline would fire too late, so it is moved
        // now; one armed earlier fires early, and `passed` arms it again.
        if due < self.timer.deadline() {
            self.timer.as_mut().reset(due);
        }
        self.due = due;
    }

    /// Resolves once the deadline last set has passed.
    async fn passed(&mut self) {
        loop {
            self.timer.as_mut().await;
            if self.timer.deadline() >= self.due {
                return;
            }
            let due = self.due;
            self.timer.as_mut().reset(due);
        }
    }
}

/// What a turn of the loop does with the bytes in: answer the request of the first `usize`
/// of them (with its plan, then with whether the connection goes on), or one of the rest.
// A step lives on the stack for one turn of the loop; boxing its plan would cost an allocation
// per request to save nothing.
#[allow(clippy::large_enum_variant)]
enum Step<A> {
    Answer(usize, A),
    ReadMore,
    TooLarge,
    /// A head refused, and why.
    Malformed(&'static str),
    Handover,
}

/// Why hyper would refuse a head's framing, which it does with an empty 400 and no log line:
/// the lane, which hands hyper every request with a body, refuses it first with the gateway's
/// JSON answer. hyper's reading (1.x, `Server::parse` in `proto/h1/role.rs`) in its order, so
/// that nothing hyper would take is refused: `Transfer-Encoding` on HTTP/1.0, a last coding
/// other than `chunked`, a `Content-Length` ahead of any `Transfer-Encoding` that is not
/// digits alone, or two that differ.
fn framing_refused(request: &httparse::Request<'_, '_>) -> Option<&'static str> {
    let (mut length, mut coded, mut chunked) = (None, false, false);
    for header in request.headers.iter() {
        match classify(header.name) {
            Name::TransferEncoding if request.version != Some(1) => {
                return Some("an HTTP/1.0 request cannot carry Transfer-Encoding");
            }
            Name::TransferEncoding => {
                coded = true;
                // hyper reads a value that is not ASCII as no coding it knows.
                chunked = header.value.is_ascii()
                    && header
                        .value
                        .rsplit(|&byte| byte == b',')
                        .next()
                        .is_some_and(|last| last.trim_ascii().eq_ignore_ascii_case(b"chunked"));
            }
            Name::ContentLength if !coded => {
                // Digits alone: `u64`'s parser would also take a leading `+`, which hyper refuses.
                let value = std::str::from_utf8(header.value)
                    .ok()
                    .filter(|text| text.bytes().all(|byte| byte.is_ascii_digit()))
                    .and_then(|text| text.parse::<u64>().ok());
                let Some(value) = value else {
                    return Some("the request's Content-Length is not one whole number");
                };
                if length
                    .replace(value)
                    .is_some_and(|earlier| earlier != value)
                {
                    return Some("the request carries two different Content-Lengths");
                }
            }
            _ => {}
        }
    }
    (coded && !chunked).then_some("the request's Transfer-Encoding does not end in chunked")
}

/// hyper's answer to a head too large, with the request id its access-log line carries.
fn write_head_too_large(out: &mut Vec<u8>, request_id: &[u8]) -> u16 {
    out.clear();
    out.extend_from_slice(b"HTTP/1.1 431 Request Header Fields Too Large\r\n");
    push_header(out, b"x-request-id", request_id);
    out.extend_from_slice(b"content-length: 0\r\nconnection: close\r\n\r\n");
    431
}

/// A request the lane has taken: its record, and either the route to forward it to (its
/// upstream head already written) or the error that answers it.
struct Plan<'s> {
    state: &'s State,
    record: Record<'s>,
    request_id: RequestId<'s>,
    /// When the whole head was in: the start of the request's record, of the upstream's time
    /// and of its timeout.
    arrived: Instant,
    head_only: bool,
    /// Whether the request may go out again on a new connection when a kept one fails under
    /// it (`upstream::replayable`; the lane's requests have no body).
    replayable: bool,
    action: Result<&'s Route, Error>,
}

/// The connection's buffers and its upstream connection, kept while it is active.
struct Lane {
    upstream: Option<(Authority, TcpStream)>,
    /// What goes out next: the upstream request head, then the client's answer.
    out: Vec<u8>,
    from_upstream: Vec<u8>,
    last_token: LastToken,
    /// How long the client may take none of an answer's bytes.
    header_timeout: Duration,
}

/// The headers the lane tells apart; the rest pass through.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Name {
    Host,
    Authorization,
    ContentLength,
    Connection,
    TransferEncoding,
    /// Fixed hop-by-hop headers other than `Connection` and `Transfer-Encoding`. Without
    /// `Connection: upgrade`, `Upgrade` is one of them: both paths drop it.
    HopByHop,
    Expect,
    RequestId,
    ForwardedFor,
    ForwardedProto,
    ForwardedHost,
    Forwarded,
    Date,
    Other,
}

/// The class of a header name, matched case-insensitively. Its length and first letter pick
/// the one known name it can be, so most names are told apart without comparing them; each
/// header is classified once per message. `name` is a token, as httparse leaves every name it
/// parses. Inlined into the loops over a message's headers, where a call per header costs
/// more than the match: with a third caller, the compiler would otherwise call it.
#[inline(always)]
fn classify(name: &str) -> Name {
    let name = name.as_bytes();
    let Some(first) = name.first() else {
        return Name::Other;
    };
    let is = |known: &[u8]| token_is(name, known);
    match (name.len(), first.to_ascii_lowercase()) {
        (2, b't') if is(b"te") => Name::HopByHop,
        (4, b'h') if is(b"host") => Name::Host,
        (4, b'd') if is(b"date") => Name::Date,
        (6, b'e') if is(b"expect") => Name::Expect,
        (7, b'u') if is(b"upgrade") => Name::HopByHop,
        (7, b't') if is(b"trailer") => Name::HopByHop,
        (9, b'f') if is(b"forwarded") => Name::Forwarded,
        (10, b'c') if is(b"connection") => Name::Connection,
        (10, b'k') if is(b"keep-alive") => Name::HopByHop,
        (12, b'x') if is(b"x-request-id") => Name::RequestId,
        (13, b'a') if is(b"authorization") => Name::Authorization,
        (14, b'c') if is(b"content-length") => Name::ContentLength,
        (14, b'h') if is(b"http2-settings") => Name::HopByHop,
        (15, b'x') if is(b"x-forwarded-for") => Name::ForwardedFor,
        (16, b'x') if is(b"x-forwarded-host") => Name::ForwardedHost,
        (16, b'p') if is(b"proxy-connection") => Name::HopByHop,
        (17, b'x') if is(b"x-forwarded-proto") => Name::ForwardedProto,
        (17, b't') if is(b"transfer-encoding") => Name::TransferEncoding,
        (18, b'p') if is(b"proxy-authenticate") => Name::HopByHop,
        (19, b'p') if is(b"proxy-authorization") => Name::HopByHop,
        _ => Name::Other,
    }
}

/// True when `name` is `known` (lowercase letters, digits and `-`) in any case, compared eight
/// bytes at a time. `name` holds no control character but tab, as every header name and value
/// httparse parses. Setting the 0x20 bit of each byte then maps only the two cases of a letter
/// to one byte: the other bytes it would map onto a digit or `-` are control characters other
/// than tab. `eq_ignore_ascii_case` goes a byte at a time.
fn token_is(name: &[u8], known: &[u8]) -> bool {
    const CASE: u64 = 0x2020_2020_2020_2020;
    let length = name.len();
    if length != known.len() {
        return false;
    }
    if length < 8 {
        return name.eq_ignore_ascii_case(known);
    }
    let word = |bytes: &[u8], from: usize| {
        let eight: [u8; 8] = bytes[from..from + 8].try_into().expect("eight bytes");
        u64::from_le_bytes(eight) | CASE
    };
    // Whole words from the start, then one that ends at the last byte, overlapping the one
    // before it where the length is not a multiple of eight.
    (0..length - 8)
        .step_by(8)
        .chain([length - 8])
        .all(|from| word(name, from) == word(known, from))
}

/// The classes of a message's headers, in order.
fn classify_all(headers: &[httparse::Header<'_>]) -> [Name; MAX_HEADERS] {
    let mut classes = [Name::Other; MAX_HEADERS];
    for (class, header) in classes.iter_mut().zip(headers) {
        *class = classify(header.name);
    }
    classes
}

/// What one pass over the request's headers found.
#[derive(Default)]
struct Seen<'h> {
    host: Option<&'h [u8]>,
    authorization: Option<&'h [u8]>,
    request_id: Option<&'h [u8]>,
    content_length: bool,
    repeated: bool,
    not_taken: bool,
}

/// Decides a parsed request: `None` hands it to hyper. For a request to forward, the upstream
/// request head is left in `out`.
fn plan<'s>(
    state: &'s Arc<State>,
    request: &httparse::Request<'_, 's>,
    head: &[u8],
    client: &ClientConnection,
    out: &mut Vec<u8>,
    last_token: &mut LastToken,
) -> Option<Plan<'s>> {
    if request.version != Some(1) {
        return None;
    }
    let target = request.path?;
    if !target.starts_with('/') {
        return None;
    }
    let arrived = Instant::now();
    let classes = classify_all(request.headers);
    let mut seen = Seen::default();
    for (header, class) in request.headers.iter().zip(classes) {
        match class {
            Name::Host => {
                seen.repeated |= seen.host.replace(header.value).is_some();
            }
            Name::Authorization => {
                seen.repeated |= seen.authorization.replace(header.value).is_some();
            }
            Name::ContentLength => {
                seen.repeated |= std::mem::replace(&mut seen.content_length, true);
                seen.not_taken |= header.value != b"0";
            }
            Name::Connection => {
                seen.not_taken |= !token_is(header.value.trim_ascii(), b"keep-alive");
            }
            // A body, or a wish for an interim answer before it.
            Name::TransferEncoding | Name::Expect => seen.not_taken = true,
            Name::RequestId if seen.request_id.is_none() => seen.request_id = Some(header.value),
            _ => {}
        }
    }
    let host = seen.host?;
    if seen.repeated || seen.not_taken {
        return None;
    }
    // The path and query hyper's parse (`http::Uri`) reads, so that both read the same path.
    let uri;
    let (path, query, record_path) = match split_plain_target(target) {
        Some((path, query)) => (path, query, Cow::Borrowed(path)),
        None => {
            uri = Uri::from_maybe_shared(Bytes::copy_from_slice(target.as_bytes())).ok()?;
            (uri.path(), uri.query(), Cow::Owned(uri.path().to_owned()))
        }
    };
    let checked = routes::check_path(path);
    if checked.is_ok() && auth::owns_path(state, path) {
        return None;
    }
    let method = Method::from_bytes(request.method?.as_bytes()).ok()?;
    // A 2xx answer to CONNECT turns the connection into a tunnel, which is hyper's to run.
    if method == Method::CONNECT {
        return None;
    }
    let request_id = super::request_id(seen.request_id);
    let metrics = &state.services.metrics;
    let head_only = method == Method::HEAD;
    let replayable = method.is_safe();
    let mut record = Record::begin(metrics, arrived, Some(method), record_path, &request_id);
    let action = decide(
        state,
        checked,
        path,
        seen.authorization,
        last_token,
        &mut record,
    );
    let action = action.map(|(route, identity)| {
        write_upstream_head(
            out,
            state,
            route,
            request,
            head,
            &classes,
            (path, query),
            identity.as_deref(),
            client,
            host,
            request_id.as_bytes(),
        );
        route
    });
    Some(Plan {
        state,
        record,
        request_id,
        arrived,
        head_only,
        replayable,
        action,
    })
}

/// The bytes `http::Uri` takes as they are in both the path and the query, and that it does
/// not treat specially: RFC 3986's unreserved and sub-delims, `:`, `@`, `/` and `%`.
const PLAIN_TARGET: [bool; 256] = {
    let mut plain = [false; 256];
    let mut byte = 0;
    while byte < 256 {
        let b = byte as u8;
        plain[byte] = b.is_ascii_alphanumeric()
            || matches!(
                b,
                b'-' | b'.'
                    | b'_'
                    | b'~'
                    | b'!'
                    | b'$'
                    | b'&'
                    | b'\''
                    | b'('
                    | b')'
                    | b'*'
                    | b'+'
                    | b','
                    | b';'
                    | b'='
                    | b':'
                    | b'@'
                    | b'/'
                    | b'%'
            );
        byte += 1;
    }
    plain
};

/// The path and query of an origin-form target made only of [`PLAIN_TARGET`] bytes and `?`,
/// split where `http::Uri` splits them, without its copy of the target. `None` for anything
/// else (a fragment, quotes, braces, bytes past ASCII, a target too long for `Uri`), which is
/// left to `Uri`.
fn split_plain_target(target: &str) -> Option<(&str, Option<&str>)> {
    // `Uri`'s own limit on a target's length.
    const URI_MAX_LEN: usize = u16::MAX as usize - 1;
    if target.len() > URI_MAX_LEN {
        return None;
    }
    let mut query_from = None;
    for (at, byte) in target.bytes().enumerate() {
        if byte == b'?' {
            query_from.get_or_insert(at);
        } else if !PLAIN_TARGET[usize::from(byte)] {
            return None;
        }
    }
    Some(match query_from {
        Some(at) => (&target[..at], Some(&target[at + 1..])),
        None => (target, None),
    })
}

type Decision<'s> = (&'s Route, Option<Arc<crate::identity::Identity>>);

/// The checks of the hyper path's `dispatch`, in the same order (SPEC §4).
fn decide<'s>(
    state: &'s Arc<State>,
    checked_path: Result<(), Error>,
    path: &str,
    authorization: Option<&[u8]>,
    last_token: &mut LastToken,
    record: &mut Record<'s>,
) -> Result<Decision<'s>, Error> {
    checked_path?;
    let route = state.routes.find(path).ok_or(Error::NoRoute)?;
    record.route = route.series.clone();
    let method = record.method.as_ref();
    if !method.is_some_and(|method| route.allows_method(method)) {
        return Err(route.method_refused());
    }
    let identity = auth::authorize_bearer(route, || match authorization {
        Some(value) => auth::verify_remembered(state, last_token, value),
        None => Ok(None),
    })?;
    Ok((route, identity))
}

/// The request head for the upstream, by the rules of `proxy::forward`: hop-by-hop and
/// identity-like headers dropped, the identity, `X-Forwarded-*` and `X-Request-ID` set.
// Its pieces are borrowed from different places (the parsed head, the route table, the connection,
// the verified token) and it has one caller: a struct of them would exist only for that call.
#[allow(clippy::too_many_arguments)]
fn write_upstream_head(
    out: &mut Vec<u8>,
    state: &State,
    route: &Route,
    request: &httparse::Request<'_, '_>,
    head: &[u8],
    classes: &[Name],
    (path, query): (&str, Option<&str>),
    identity: Option<&crate::identity::Identity>,
    client: &ClientConnection,
    host: &[u8],
    request_id: &[u8],
) {
    let trusted = proxy::is_trusted(&state.config.server.trusted_proxies, client.peer.ip());
    let drop_authorization =
        route.auth() != AuthMode::Public && !state.config.identity.forward_authorization;
    // Only a trusted proxy's chain is kept and added to.
    let mut forwarded_for: Vec<u8> = Vec::new();
    let (mut had_proto, mut had_host) = (false, false);
    out.clear();
    out.extend_from_slice(request.method.unwrap_or_default().as_bytes());
    out.push(b' ');
    route.write_upstream_target(path, query, out);
    out.extend_from_slice(b" HTTP/1.1\r\n");
    let mut lines = KeptLines::of(head);
    for (header, &class) in request.headers.iter().zip(classes) {
        // `Host` is read before the identity rules strip anything, as in `proxy::forward`.
        if class != Name::Host && state.identity.is_protected(header.name) {
            continue;
        }
        let kept = match class {
            Name::Connection | Name::HopByHop | Name::RequestId => false,
            // Not taken by the lane; listed so that no new name slips through unnoticed.
            Name::TransferEncoding | Name::Expect => false,
            Name::Authorization => !drop_authorization,
            Name::ForwardedFor => {
                if trusted {
                    forwarded_for.extend_from_slice(header.value);
                    forwarded_for.extend_from_slice(b", ");
                }
                false
            }
            Name::ForwardedProto => {
                had_proto = true;
                trusted
            }
            Name::ForwardedHost => {
                had_host = true;
                trusted
            }
            Name::Forwarded => trusted,
            Name::Host | Name::ContentLength | Name::Date | Name::Other => true,
        };
        if kept {
            lines.keep(out, header);
        }
    }
    lines.flush(out);
    if let Some(identity) = identity {
        out.extend_from_slice(identity.header_lines());
    }
    if trusted {
        forwarded_for.extend_from_slice(client.peer_ip.as_bytes());
        push_header(out, b"x-forwarded-for", &forwarded_for);
    } else {
        push_header(out, b"x-forwarded-for", client.peer_ip.as_bytes());
    }
    if !(trusted && had_proto) {
        out.extend_from_slice(b"x-forwarded-proto: http\r\n");
    }
    if !(trusted && had_host) {
        push_header(out, b"x-forwarded-host", host);
    }
    push_header(out, b"x-request-id", request_id);
    out.extend_from_slice(b"\r\n");
}

/// Copies the kept header lines of a parsed head into an outgoing one, as they arrived: a run
/// of adjacent kept lines in one copy rather than name, separator, value and line end one by
/// one. Each run ends in `\r\n` whatever ended it in the head (httparse takes a bare `\n`),
/// so the upstream and the client only ever see `\r\n`.
struct KeptLines<'h> {
    head: &'h [u8],
    /// The run not copied yet: from a name's first byte to a value's last.
    run: Option<std::ops::Range<usize>>,
}

impl<'h> KeptLines<'h> {
    fn of(head: &'h [u8]) -> KeptLines<'h> {
        KeptLines { head, run: None }
    }

    fn keep(&mut self, out: &mut Vec<u8>, header: &httparse::Header<'_>) {
        let Some(line) = self.line_of(header) else {
            // Not a line of this head; nothing httparse gives, but a copy is still right.
            self.flush(out);
            push_header(out, header.name.as_bytes(), header.value);
            return;
        };
        match &mut self.run {
            // Compared byte by byte: two bytes are not worth a call to `memcmp`.
            Some(run)
                if line.start == run.end + 2
                    && self.head[run.end] == b'\r'
                    && self.head[run.end + 1] == b'\n' =>
            {
                run.end = line.end
            }
            _ => {
                self.flush(out);
                self.run = Some(line);
            }
        }
    }

    fn flush(&mut self, out: &mut Vec<u8>) {
        if let Some(run) = self.run.take() {
            out.extend_from_slice(&self.head[run]);
            out.extend_from_slice(b"\r\n");
        }
    }

    /// Where `header`'s line sits in the head, found from where its name and value point.
    fn line_of(&self, header: &httparse::Header<'_>) -> Option<std::ops::Range<usize>> {
        let base = self.head.as_ptr() as usize;
        let start = (header.name.as_ptr() as usize).checked_sub(base)?;
        let end = (header.value.as_ptr() as usize).checked_sub(base)? + header.value.len();
        let name_end = start + header.name.len();
        (name_end < end && end <= self.head.len()).then_some(start..end)
    }
}

// Inlined, each call's constant name is copied with a store of its own length rather than
// through `memcpy`.
#[inline(always)]
fn push_header(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.reserve(name.len() + value.len() + 4);
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// How an upstream's response body ends (RFC 9112 §6.3).
#[derive(Clone, Copy)]
enum Framing {
    Empty,
    Length(u64),
    Chunked,
    /// Only the upstream closing its connection ends it.
    UntilClose,
}

/// A response head from the upstream, already rewritten into `Lane::out` for the client.
struct Relayed {
    status: u16,
    framing: Framing,
    /// Where the body starts in `Lane::from_upstream`.
    body_from: usize,
    /// The upstream's connection can take another request once this body is read.
    reusable: bool,
}

/// Why an exchange with the upstream failed before its answer's head arrived.
enum Failed {
    Timeout,
    /// The connection closed or failed: the upstream may or may not have read the request.
    Dropped(String),
    /// No connection could be made, or the answer did not parse.
    Unavailable(String),
}

impl Lane {
    /// Answers one planned request. False when the client connection cannot go on.
    async fn answer(
        &mut self,
        plan: Plan<'_>,
        client: &mut TcpStream,
        draining: bool,
        deadline: &mut Deadline<'_>,
    ) -> bool {
        let Plan {
            state,
            mut record,
            request_id,
            arrived,
            head_only,
            replayable,
            action,
        } = plan;
        let request_id = request_id.as_bytes();
        let route = match action {
            Ok(route) => route,
            Err(error) => {
                record.status = write_error(&mut self.out, error, request_id, draining);
                return send(client, &self.out, deadline, self.header_timeout)
                    .await
                    .is_ok();
            }
        };
        // The route's timeout and the upstream's time count from the head's arrival rather
        // than from a clock read of their own: the request goes out a microsecond or two
        // later, which neither a timeout nor a histogram in milliseconds can tell.
        deadline.set(tokio::time::Instant::from_std(arrived) + route.timeout());
        let authority = route.upstream_authority();
        let kept = self.kept_upstream(state, authority).await;
        // Sends the request head in `out` and reads the answer's head; the upstream connection
        // comes back with the head, its body still to read. A kept connection that fails under
        // a replayable request is replaced once, as `UpstreamClient::send` does.
        let exchange = async {
            let mut kept = kept;
            loop {
                let reused = kept.is_some();
                let mut socket = match kept.take() {
                    Some(socket) => socket,
                    None => connect(authority).await?,
                };
                let exchanged = match socket.write_all(&self.out).await {
                    Ok(()) => {
                        read_response_head(
                            &mut socket,
                            &mut self.from_upstream,
                            &mut self.out,
                            head_only,
                            request_id,
                            draining,
                        )
                        .await
                    }
                    Err(err) => Err(Failed::Dropped(err.to_string())),
                };
                match exchanged {
                    Ok(relayed) => return Ok((socket, relayed)),
                    Err(Failed::Dropped(_)) if reused && replayable => {
                        record.span.in_scope(|| {
                            tracing::debug!(
                                "a kept upstream connection closed under a request; sending it again on a new one"
                            )
                        });
                    }
                    Err(failed) => return Err(failed),
                }
            }
        };
        let exchanged = tokio::select! {
            biased;
            exchanged = exchange => exchanged,
            () = deadline.passed() => Err(Failed::Timeout),
            // The record keeps its 499, and the upstream connection, with an answer still
            // coming on it, is closed.
            () = gone(client) => return false,
        };
        route
            .series
            .observe_upstream(&state.services.metrics, arrived.elapsed());
        let (mut upstream, relayed) = match exchanged {
            Ok(exchanged) => exchanged,
            Err(failed) => {
                let error = match failed {
                    Failed::Timeout => Error::UpstreamTimeout,
                    Failed::Dropped(why) | Failed::Unavailable(why) => {
                        record.span.in_scope(|| {
                            tracing::warn!(
                                route = %route.config.path,
                                error = %why,
                                "upstream request failed"
                            )
                        });
                        Error::UpstreamUnavailable
                    }
                };
                record.status = write_error(&mut self.out, error, request_id, draining);
                return send(client, &self.out, deadline, self.header_timeout)
                    .await
                    .is_ok();
            }
        };
        record.status = relayed.status;
        let relayed_body = self
            .relay_body(&relayed, &mut upstream, client, deadline, route.timeout())
            .await;
        match relayed_body {
            Ok(ended_clean) => {
                if ended_clean && relayed.reusable {
                    self.upstream = Some((route.upstream_authority().clone(), upstream));
                }
                !matches!(relayed.framing, Framing::UntilClose)
            }
            Err(Cut::UpstreamSilent) => {
                record.span.in_scope(|| {
                    tracing::warn!(
                        route = %route.config.path,
                        error = "the upstream sent nothing more of its answer within the route's timeout",
                        "upstream request failed"
                    )
                });
                false
            }
            Err(Cut::ClientStalled) => {
                record.span.in_scope(|| {
                    tracing::debug!(
                        "answer cut off: the client took none of it within header_timeout"
                    )
                });
                false
            }
            Err(Cut::Failed) => false,
        }
    }

    /// The upstream connection this client used last, when it is to `authority` and still
    /// open, else a kept one from the pool; one to another upstream goes back to the pool.
    async fn kept_upstream(&mut self, state: &State, authority: &Authority) -> Option<TcpStream> {
        let pool = &state.services.upstream;
        if let Some((kept_for, socket)) = self.upstream.take() {
            // Byte for byte, where `Authority`'s own `==` ignores case a byte at a time: both
            // come from the route table, and a kept connection missed over a difference of
            // case only goes back to the pool.
            if kept_for.as_str() != authority.as_str() {
                pool.keep_plain(kept_for, socket);
            } else if upstream::still_open(&socket).await {
                return Some(socket);
            }
        }
        pool.kept_plain(authority).await
    }

    /// Sends the head in `out` to the client, then the body as the upstream sends it. True
    /// when the body ended where its framing says, with nothing after it. The upstream may
    /// send nothing for `upstream_limit` (the route's timeout) and the client take nothing
    /// for `header_timeout` before the answer is cut off: otherwise an upstream stalled in the
    /// middle of an answer, or a client that asked for a large one and reads none of it, would
    /// hold both connections for ever.
    async fn relay_body(
        &mut self,
        relayed: &Relayed,
        upstream: &mut TcpStream,
        client: &mut TcpStream,
        deadline: &mut Deadline<'_>,
        upstream_limit: Duration,
    ) -> Result<bool, Cut> {
        let Lane {
            out,
            from_upstream: buffer,
            header_timeout,
            ..
        } = self;
        let client_limit = *header_timeout;
        let mut to_client = async |bytes: &[u8], deadline: &mut Deadline<'_>| {
            send(client, bytes, deadline, client_limit)
                .await
                .map_err(Cut::of_client)
        };
        let first = &buffer[relayed.body_from..];
        match relayed.framing {
            Framing::Empty => {
                to_client(out, deadline).await?;
                Ok(first.is_empty())
            }
            Framing::Length(length) => {
                let available = first.len() as u64;
                let taken = available.min(length) as usize;
                out.extend_from_slice(&first[..taken]);
                to_client(out, deadline).await?;
                let mut left = length - taken as u64;
                let clean = available <= length;
                while left > 0 {
                    buffer.clear();
                    let wanted = left.min(BODY_BUFFER as u64) as usize;
                    buffer.reserve(wanted);
                    let mut within = bytes::BufMut::limit(&mut *buffer, wanted);
                    let read = receive(upstream, &mut within, deadline, upstream_limit).await?;
                    if read == 0 {
                        return Err(Cut::Failed);
                    }
                    to_client(buffer, deadline).await?;
                    left -= read as u64;
                }
                Ok(clean)
            }
            Framing::Chunked => {
                let mut chunks = Chunks::Size;
                let mut consumed = relayed.body_from;
                loop {
                    let done = chunks
                        .relay(buffer, &mut consumed, out)
                        .map_err(|_| Cut::Failed)?;
                    to_client(out, deadline).await?;
                    out.clear();
                    if done {
                        return Ok(consumed == buffer.len());
                    }
                    buffer.drain(..consumed);
                    consumed = 0;
                    if buffer.len() > MAX_CHUNK_LINE {
                        return Err(Cut::Failed);
                    }
                    buffer.reserve(BODY_BUFFER);
                    if receive(upstream, buffer, deadline, upstream_limit).await? == 0 {
                        return Err(Cut::Failed);
                    }
                }
            }
            Framing::UntilClose => {
                out.extend_from_slice(first);
                to_client(out, deadline).await?;
                loop {
                    buffer.clear();
                    buffer.reserve(BODY_BUFFER);
                    if receive(upstream, buffer, deadline, upstream_limit).await? == 0 {
                        return Ok(false);
                    }
                    to_client(buffer, deadline).await?;
                }
            }
        }
    }
}

/// Why an answer under way was given up on.
enum Cut {
    /// The upstream sent nothing for the route's timeout.
    UpstreamSilent,
    /// The client took nothing for `header_timeout`.
    ClientStalled,
    /// Either connection failed, or the upstream broke its framing.
    Failed,
}

impl Cut {
    fn of_client(err: io::Error) -> Cut {
        if err.kind() == io::ErrorKind::TimedOut {
            Cut::ClientStalled
        } else {
            Cut::Failed
        }
    }
}

/// Writes all of `bytes` to the client, failing with `TimedOut` once it has taken none of
/// them for `limit`.
async fn send(
    client: &mut TcpStream,
    mut bytes: &[u8],
    deadline: &mut Deadline<'_>,
    limit: Duration,
) -> io::Result<()> {
    while !bytes.is_empty() {
        // Tried first with no deadline: a client that reads has room for its answer, and the
        // clock is read only when it has none.
        let written = match client.try_write(bytes) {
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => {
                deadline.set(tokio::time::Instant::now() + limit);
                tokio::select! {
                    biased;
                    written = client.write(bytes) => written?,
                    () = deadline.passed() => return Err(io::ErrorKind::TimedOut.into()),
                }
            }
            written => written?,
        };
        if written == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        bytes = &bytes[written..];
    }
    Ok(())
}

/// Reads more of an answer's body from the upstream, giving up once it has sent nothing for
/// `limit`.
async fn receive(
    upstream: &mut TcpStream,
    buffer: &mut impl bytes::BufMut,
    deadline: &mut Deadline<'_>,
    limit: Duration,
) -> Result<usize, Cut> {
    deadline.set(tokio::time::Instant::now() + limit);
    tokio::select! {
        biased;
        read = upstream.read_buf(buffer) => read.map_err(|_| Cut::Failed),
        () = deadline.passed() => Err(Cut::UpstreamSilent),
    }
}

/// Resolves when the client closes its connection, as hyper notices while a request is under
/// way. Bytes of a next (pipelined) request are left for later, and then nothing resolves.
async fn gone(client: &TcpStream) {
    let mut probe = [0u8; 1];
    let mut probe = tokio::io::ReadBuf::new(&mut probe);
    // `poll_peek` waits in the socket's own read slot, as reads do; `peek` would join its list
    // of waiters, and take and give back its place there on every request.
    let peeked = std::future::poll_fn(|cx| client.poll_peek(cx, &mut probe)).await;
    match peeked {
        Ok(0) | Err(_) => {}
        Ok(_) => std::future::pending().await,
    }
}

async fn connect(authority: &Authority) -> Result<TcpStream, Failed> {
    upstream::connect_socket(authority)
        .await
        .map_err(|err| Failed::Unavailable(err.to_string()))
}

/// Reads the upstream's answer up to the end of its head, skipping interim (1xx) answers, and
/// writes the head the client gets into `out`.
async fn read_response_head(
    upstream: &mut TcpStream,
    buffer: &mut Vec<u8>,
    out: &mut Vec<u8>,
    head_only: bool,
    request_id: &[u8],
    draining: bool,
) -> Result<Relayed, Failed> {
    let malformed = |why: &str| Failed::Unavailable(format!("the upstream's answer {why}"));
    buffer.clear();
    loop {
        let parsed = {
            let mut headers = [const { MaybeUninit::uninit() }; MAX_HEADERS];
            let mut response = httparse::Response::new(&mut []);
            match httparse::ParserConfig::default().parse_response_with_uninit_headers(
                &mut response,
                buffer,
                &mut headers,
            ) {
                Ok(httparse::Status::Complete(head_len)) => {
                    // A head that arrived whole in one read never meets the check on an
                    // unfinished one below.
                    if head_len > upstream::MAX_RESPONSE_HEAD {
                        return Err(malformed("has a head over 64 KiB"));
                    }
                    let code = response.code.unwrap_or_default();
                    if (100..200).contains(&code) && code != 101 {
                        Some(Err(head_len))
                    } else {
                        Some(Ok(rewrite_response_head(
                            &response, buffer, head_len, out, head_only, request_id, draining,
                        )
                        .map_err(malformed)?))
                    }
                }
                Ok(httparse::Status::Partial) => None,
                Err(_) => return Err(malformed("does not parse as HTTP/1.1")),
            }
        };
        match parsed {
            Some(Ok(relayed)) => return Ok(relayed),
            // An interim answer: the final one follows.
            Some(Err(head_len)) => {
                buffer.drain(..head_len);
                continue;
            }
            None => {}
        }
        if buffer.len() >= upstream::MAX_RESPONSE_HEAD {
            return Err(malformed("has a head over 64 KiB"));
        }
        buffer.reserve(BODY_BUFFER);
        match upstream.read_buf(buffer).await {
            Ok(0) => {
                let why = "the upstream closed the connection before its answer's head";
                return Err(Failed::Dropped(why.to_owned()));
            }
            Ok(_) => {}
            Err(err) => return Err(Failed::Dropped(err.to_string())),
        }
    }
}

/// The client's copy of a response head: hop-by-hop headers and those `Connection` names
/// dropped (as `proxy::remove_hop_by_hop` does), the request id set, the framing restated.
fn rewrite_response_head(
    response: &httparse::Response<'_, '_>,
    head: &[u8],
    head_len: usize,
    out: &mut Vec<u8>,
    head_only: bool,
    request_id: &[u8],
    draining: bool,
) -> Result<Relayed, &'static str> {
    let status = response.code.unwrap_or_default();
    if status == 101 {
        return Err("switches protocols unasked");
    }
    // httparse takes any three digits; hyper, through `http::StatusCode`, none under 100.
    if status < 100 {
        return Err("has a status code under 100");
    }
    let mut length: Option<u64> = None;
    let mut chunked = false;
    let mut connection_close = false;
    let mut connection_keep_alive = false;
    let mut has_date = false;
    let mut names_hop_by_hop = false;
    let classes = classify_all(response.headers);
    for (header, class) in response.headers.iter().zip(classes) {
        match class {
            Name::ContentLength => {
                let value = std::str::from_utf8(header.value)
                    .ok()
                    .filter(|value| !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()))
                    .and_then(|value| value.parse::<u64>().ok())
                    .ok_or("has an unreadable Content-Length")?;
                if length.is_some_and(|seen| seen != value) {
                    return Err("has two Content-Lengths");
                }
                length = Some(value);
            }
            Name::TransferEncoding => {
                if chunked || !header.value.trim_ascii().eq_ignore_ascii_case(b"chunked") {
                    return Err("has a Transfer-Encoding other than chunked");
                }
                chunked = true;
            }
            Name::Connection => {
                for token in header.value.split(|b| *b == b',').map(<[u8]>::trim_ascii) {
                    let close = token_is(token, b"close");
                    let keep_alive = token_is(token, b"keep-alive");
                    connection_close |= close;
                    connection_keep_alive |= keep_alive;
                    names_hop_by_hop |= !(close || keep_alive || token.is_empty());
                }
            }
            Name::Date => has_date = true,
            _ => {}
        }
    }
    if chunked && length.is_some() {
        return Err("has both Transfer-Encoding and Content-Length");
    }
    let no_body = head_only || status == 204 || status == 304;
    let framing = match (no_body, chunked, length) {
        (true, _, _) => Framing::Empty,
        (false, true, _) => Framing::Chunked,
        (false, false, Some(length)) => Framing::Length(length),
        (false, false, None) => Framing::UntilClose,
    };
    let keeps_alive = match response.version {
        Some(1) => !connection_close,
        _ => connection_keep_alive && !connection_close,
    };
    out.clear();
    out.extend_from_slice(b"HTTP/1.1 ");
    // httparse takes exactly three digits.
    out.extend_from_slice(&[
        b'0' + (status / 100) as u8,
        b'0' + (status / 10 % 10) as u8,
        b'0' + (status % 10) as u8,
    ]);
    out.push(b' ');
    out.extend_from_slice(response.reason.unwrap_or_default().as_bytes());
    out.extend_from_slice(b"\r\n");
    let mut lines = KeptLines::of(head);
    // Lengths past the first are equal to it (checked above), and hyper passes one on. With a
    // 204 or a 304 it passes none (RFC 9110 §8.6 forbids one on a 204).
    let mut length_kept = status == 204 || status == 304;
    for (header, class) in response.headers.iter().zip(classes) {
        let kept = match class {
            Name::Connection | Name::HopByHop | Name::TransferEncoding | Name::RequestId => false,
            Name::ContentLength => !std::mem::replace(&mut length_kept, true),
            _ => !(names_hop_by_hop && named_by_connection(response.headers, header.name)),
        };
        if kept {
            lines.keep(out, header);
        }
    }
    lines.flush(out);
    push_header(out, b"x-request-id", request_id);
    if matches!(framing, Framing::Chunked) {
        push_header(out, b"transfer-encoding", b"chunked");
    }
    if matches!(framing, Framing::UntilClose) || draining {
        push_header(out, b"connection", b"close");
    }
    if !has_date {
        push_header(out, b"date", now_as_http_date().as_bytes());
    }
    out.extend_from_slice(b"\r\n");
    Ok(Relayed {
        status,
        framing,
        body_from: head_len,
        reusable: keeps_alive && !matches!(framing, Framing::UntilClose),
    })
}

/// True when a `Connection` header of `headers` names `name`.
fn named_by_connection(headers: &[httparse::Header<'_>], name: &str) -> bool {
    headers
        .iter()
        .filter(|header| header.name.eq_ignore_ascii_case("connection"))
        .flat_map(|header| header.value.split(|b| *b == b','))
        .any(|token| token.trim_ascii().eq_ignore_ascii_case(name.as_bytes()))
}

fn now_as_http_date() -> String {
    httpdate::fmt_http_date(std::time::SystemTime::now())
}

/// One of the gateway's own JSON answers, as `server::handle` sends it. Returns its status.
fn write_error(out: &mut Vec<u8>, error: Error, request_id: &[u8], closing: bool) -> u16 {
    let response: Response<Bytes> = error.into_whole_response();
    let status = response.status();
    out.clear();
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or_default().as_bytes());
    out.extend_from_slice(b"\r\n");
    for (name, value) in response.headers() {
        push_header(out, name.as_str().as_bytes(), value.as_bytes());
    }
    push_header(out, b"x-request-id", request_id);
    push_header(
        out,
        b"content-length",
        response.body().len().to_string().as_bytes(),
    );
    push_header(out, b"date", now_as_http_date().as_bytes());
    if closing {
        push_header(out, b"connection", b"close");
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(response.body());
    status.as_u16()
}

/// Where a chunked body is (RFC 9112 §7.1). Chunks pass through with their sizes; chunk
/// extensions and trailers are dropped, as hyper drops them.
enum Chunks {
    Size,
    Data(u64),
    DataEnd,
    Trailers,
}

impl Chunks {
    /// Relays what `buffer` holds from `consumed` on into `out`, moving `consumed` past it.
    /// True once the last chunk and the trailers have passed.
    fn relay(
        &mut self,
        buffer: &[u8],
        consumed: &mut usize,
        out: &mut Vec<u8>,
    ) -> io::Result<bool> {
        let invalid = || io::Error::from(io::ErrorKind::InvalidData);
        loop {
            let rest = &buffer[*consumed..];
            match self {
                Chunks::Size => match httparse::parse_chunk_size(rest).map_err(|_| invalid())? {
                    httparse::Status::Complete((used, 0)) => {
                        *consumed += used;
                        *self = Chunks::Trailers;
                    }
                    httparse::Status::Complete((used, size)) => {
                        *consumed += used;
                        out.extend_from_slice(format!("{size:x}\r\n").as_bytes());
                        *self = Chunks::Data(size);
                    }
                    httparse::Status::Partial => return Ok(false),
                },
                Chunks::Data(left) => {
                    let taken = (*left).min(rest.len() as u64) as usize;
                    out.extend_from_slice(&rest[..taken]);
                    *consumed += taken;
                    *left -= taken as u64;
                    if *left > 0 {
                        return Ok(false);
                    }
                    *self = Chunks::DataEnd;
                }
                Chunks::DataEnd => {
                    if rest.len() < 2 {
                        return Ok(false);
                    }
                    if &rest[..2] != b"\r\n" {
                        return Err(invalid());
                    }
                    *consumed += 2;
                    out.extend_from_slice(b"\r\n");
                    *self = Chunks::Size;
                }
                Chunks::Trailers => {
                    let Some(end) = rest.windows(2).position(|pair| pair == b"\r\n") else {
                        return Ok(false);
                    };
                    *consumed += end + 2;
                    if end == 0 {
                        out.extend_from_slice(b"0\r\n\r\n");
                        return Ok(true);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::FutureExt;

    /// A deadline on a paused clock, its timer first armed 50 ms on.
    async fn with_deadline(check: impl AsyncFnOnce(&mut Deadline<'_>, tokio::time::Instant)) {
        let start = tokio::time::Instant::now();
        let timer = tokio::time::sleep(Duration::from_millis(50));
        tokio::pin!(timer);
        check(&mut Deadline::of(timer), start).await;
    }

    async fn advance_to(start: tokio::time::Instant, millis: u64) {
        let at = start + Duration::from_millis(millis);
        tokio::time::advance(at - tokio::time::Instant::now()).await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_deadline_moved_later_passes_at_the_last_one_set_and_not_before() {
        with_deadline(async |deadline, start| {
            deadline.set(start + Duration::from_millis(80));
            deadline.set(start + Duration::from_millis(120));
            advance_to(start, 119).await;
            assert!(deadline.passed().now_or_never().is_none());
            advance_to(start, 121).await;
            assert!(deadline.passed().now_or_never().is_some());
        })
        .await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_deadline_moved_earlier_than_its_timer_passes_at_the_earlier_one() {
        with_deadline(async |deadline, start| {
            deadline.set(start + Duration::from_millis(10));
            advance_to(start, 9).await;
            assert!(deadline.passed().now_or_never().is_none());
            advance_to(start, 11).await;
            assert!(deadline.passed().now_or_never().is_some());
        })
        .await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_deadline_whose_timer_fired_unwatched_still_waits_for_the_one_set_since() {
        with_deadline(async |deadline, start| {
            advance_to(start, 60).await;
            deadline.set(start + Duration::from_millis(100));
            assert!(deadline.passed().now_or_never().is_none());
            advance_to(start, 99).await;
            assert!(deadline.passed().now_or_never().is_none());
            advance_to(start, 101).await;
            assert!(deadline.passed().now_or_never().is_some());
        })
        .await;
    }

    #[test]
    fn known_names_are_classified_in_any_case_and_their_near_misses_are_not() {
        for (name, class) in [
            ("Host", Name::Host),
            ("DATE", Name::Date),
            ("x-Request-ID", Name::RequestId),
            ("Authorization", Name::Authorization),
            ("content-length", Name::ContentLength),
            ("X-Forwarded-For", Name::ForwardedFor),
            ("x-forwarded-host", Name::ForwardedHost),
            ("X-FORWARDED-PROTO", Name::ForwardedProto),
            ("Forwarded", Name::Forwarded),
            ("Expect", Name::Expect),
        ] {
            assert!(classify(name) == class, "{name}");
        }
        for name in [
            "Hose",
            "data",
            "x-request-ix",
            "Authorisation",
            "content-lengths",
            "",
        ] {
            assert!(classify(name) == Name::Other, "{name}");
        }
    }

    #[test]
    fn a_known_name_with_any_one_byte_changed_is_known_only_when_the_change_is_of_case() {
        let token_bytes: Vec<u8> = (0x21u8..0x7f)
            .filter(|b| !b"\"(),/:;<=>?@[\\]{}".contains(b))
            .collect();
        for (known, class) in [
            ("te", Name::HopByHop),
            ("host", Name::Host),
            ("date", Name::Date),
            ("expect", Name::Expect),
            ("upgrade", Name::HopByHop),
            ("trailer", Name::HopByHop),
            ("forwarded", Name::Forwarded),
            ("connection", Name::Connection),
            ("keep-alive", Name::HopByHop),
            ("x-request-id", Name::RequestId),
            ("authorization", Name::Authorization),
            ("content-length", Name::ContentLength),
            ("http2-settings", Name::HopByHop),
            ("x-forwarded-for", Name::ForwardedFor),
            ("x-forwarded-host", Name::ForwardedHost),
            ("proxy-connection", Name::HopByHop),
            ("x-forwarded-proto", Name::ForwardedProto),
            ("transfer-encoding", Name::TransferEncoding),
            ("proxy-authenticate", Name::HopByHop),
            ("proxy-authorization", Name::HopByHop),
        ] {
            for at in 0..known.len() {
                for &byte in &token_bytes {
                    let mut name = known.as_bytes().to_vec();
                    name[at] = byte;
                    let name = String::from_utf8(name).expect("ascii");
                    let same = byte.eq_ignore_ascii_case(&known.as_bytes()[at]);
                    assert_eq!(classify(&name) == class, same, "{name}");
                }
            }
        }
    }

    #[test]
    fn a_connection_word_one_byte_off_matches_only_when_that_byte_differs_in_case() {
        // Every byte httparse takes in a header value.
        let value_bytes: Vec<u8> = (0u8..=255)
            .filter(|&b| b == b'\t' || (b' '..0x7f).contains(&b) || b >= 0x80)
            .collect();
        for known in ["close", "keep-alive"] {
            for at in 0..known.len() {
                for &byte in &value_bytes {
                    let mut word = known.as_bytes().to_vec();
                    word[at] = byte;
                    let same = byte.eq_ignore_ascii_case(&known.as_bytes()[at]);
                    assert_eq!(token_is(&word, known.as_bytes()), same, "{word:?}");
                }
            }
        }
    }

    #[test]
    fn plain_targets_split_where_uri_splits_them() {
        let characters = (0x21u8..0x7f).map(char::from).chain(['\u{e9}', ' ']);
        for c in characters {
            let plain = c.is_ascii() && (PLAIN_TARGET[c as usize] || c == '?');
            for target in [
                format!("/{c}"),
                format!("/a{c}b"),
                format!("/a?{c}"),
                format!("/{c}?{c}"),
                format!("/?{c}?"),
            ] {
                match split_plain_target(&target) {
                    Some((path, query)) => {
                        let uri: Uri = target.parse().unwrap();
                        assert_eq!((path, query), (uri.path(), uri.query()), "{target}");
                    }
                    None => assert!(!plain, "{target} is left to Uri"),
                }
            }
        }
        assert_eq!(
            split_plain_target("/api/v1/users?page=2&sort=-name"),
            Some(("/api/v1/users", Some("page=2&sort=-name")))
        );
        assert_eq!(split_plain_target("/a#fragment"), None);
        assert_eq!(split_plain_target(&"/a".repeat(40_000)), None);
    }

    #[test]
    fn kept_lines_are_copied_as_they_arrived_with_every_line_ending_in_crlf() {
        let head = b"GET / HTTP/1.1\r\nHost: a\r\nAccept:\t*/*\nDrop: me\r\nX-A: 1  \r\nX-B:\r\nX-C: 3\r\n\r\n";
        let mut headers = [httparse::EMPTY_HEADER; 8];
        let mut request = httparse::Request::new(&mut headers);
        assert!(request.parse(head).unwrap().is_complete());
        let mut out = Vec::new();
        let mut lines = KeptLines::of(head);
        for header in request
            .headers
            .iter()
            .filter(|header| header.name != "Drop")
        {
            lines.keep(&mut out, header);
        }
        lines.flush(&mut out);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "Host: a\r\nAccept:\t*/*\r\nX-A: 1\r\nX-B:\r\nX-C: 3\r\n"
        );
    }

    #[test]
    fn a_header_from_elsewhere_is_written_out_whole() {
        let head = b"Host: a\r\n";
        let elsewhere = httparse::Header {
            name: "X-Other",
            value: b"v",
        };
        let mut out = Vec::new();
        let mut lines = KeptLines::of(&head[..]);
        lines.keep(&mut out, &elsewhere);
        lines.flush(&mut out);
        assert_eq!(out, b"X-Other: v\r\n");
    }

    #[test]
    fn every_hop_by_hop_header_of_the_proxy_is_hop_by_hop_here() {
        for name in crate::proxy::HOP_BY_HOP.iter() {
            let upper = name.as_str().to_ascii_uppercase();
            for spelling in [name.as_str(), upper.as_str()] {
                assert!(
                    matches!(
                        classify(spelling),
                        Name::Connection | Name::TransferEncoding | Name::HopByHop
                    ),
                    "{spelling}"
                );
            }
        }
        assert!(classify("X-Request-ID") == Name::RequestId);
        assert!(classify("content-type") == Name::Other);
        assert!(classify("x-wx-openid") == Name::Other);
    }

    /// Relays `body` fed in pieces of `piece` bytes, as reads from the upstream would bring it.
    fn relay_in_pieces(body: &[u8], piece: usize) -> io::Result<(Vec<u8>, usize)> {
        let mut chunks = Chunks::Size;
        let (mut buffer, mut out) = (Vec::new(), Vec::new());
        for bytes in body.chunks(piece) {
            buffer.extend_from_slice(bytes);
            let mut consumed = 0;
            let done = chunks.relay(&buffer, &mut consumed, &mut out)?;
            buffer.drain(..consumed);
            if done {
                return Ok((out, buffer.len()));
            }
        }
        Err(io::ErrorKind::UnexpectedEof.into())
    }

    #[test]
    fn chunks_pass_whole_however_they_arrive() {
        let body = b"5;name=value\r\nhello\r\n1A\r\nabcdefghijklmnopqrstuvwxyz\r\n0\r\nX-Trailer: 1\r\n\r\nNEXT";
        let expected = b"5\r\nhello\r\n1a\r\nabcdefghijklmnopqrstuvwxyz\r\n0\r\n\r\n";
        for piece in 1..=body.len() {
            let (out, left) = relay_in_pieces(body, piece).unwrap();
            assert_eq!(out, expected, "in pieces of {piece}");
            // What follows the body is not part of it.
            assert!(left <= 4, "in pieces of {piece}");
        }
    }

    #[test]
    fn malformed_chunks_are_refused() {
        for body in [
            &b"5\r\nhelloXX0\r\n\r\n"[..],
            b"zz\r\nhello\r\n0\r\n\r\n",
            b"ffffffffffffffffffff\r\n",
        ] {
            assert!(relay_in_pieces(body, body.len()).is_err(), "{body:?}");
        }
    }
}
