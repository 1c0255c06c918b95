//! Forwarding to the upstream: hop-by-hop and forwarded headers, identity (through
//! [`crate::identity`]), the streamed body cap, the response timeouts, and upgrades (SPEC §5).
//! The connections themselves are [`crate::upstream`]'s.

use std::error::Error as StdError;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use http::header::{AUTHORIZATION, CONNECTION, HOST, TRANSFER_ENCODING, UPGRADE};
use http::{HeaderMap, HeaderName, HeaderValue, Request, Response, StatusCode, Version};
use http_body::{Body, Frame, SizeHint};
use http_body_util::{Either, Empty, LengthLimitError, Limited};
use hyper::body::Incoming;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use ipnet::IpNet;
use tokio::time::{Instant, Sleep};
use tracing::Instrument;

use crate::config::AuthMode;
use crate::error::Error;
use crate::identity::Identity;
use crate::metrics::RouteSeries;
use crate::routes::Route;
use crate::server::ClientConnection;
use crate::state::State;

pub const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
const FORWARDED: HeaderName = HeaderName::from_static("forwarded");
const HTTP: HeaderValue = HeaderValue::from_static("http");
const CHUNKED: HeaderValue = HeaderValue::from_static("chunked");

/// Hop-by-hop headers (RFC 9110 §7.6.1, plus the legacy `Keep-Alive` and `Proxy-Connection`,
/// and `HTTP2-Settings`, which belongs to an `h2c` upgrade): they describe one connection and
/// are never forwarded.
pub(crate) static HOP_BY_HOP: [HeaderName; 10] = [
    CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    http::header::PROXY_AUTHENTICATE,
    http::header::PROXY_AUTHORIZATION,
    http::header::TE,
    http::header::TRAILER,
    TRANSFER_ENCODING,
    UPGRADE,
    HeaderName::from_static("http2-settings"),
];

/// Sends the request on to the route's upstream and returns its response with the body still
/// streaming, cut off should the upstream go silent in its middle. `identity` is the verified
/// token of this request, if any.
pub async fn forward(
    state: &State,
    route: &Route,
    request: Request<Incoming>,
    client: &ClientConnection,
    identity: Option<&Identity>,
    request_id: &HeaderValue,
) -> Result<Response<AnswerBody>, Error> {
    let uri = route.upstream_uri(request.uri())?;
    let mut request = request;
    // The protocol a client asks to switch to (WebSocket, most often), and the client side
    // of the connection once it is switched.
    let upgrade = requested_upgrade(request.headers())
        .map(|protocol| (protocol, hyper::upgrade::on(&mut request)));
    let (mut parts, body) = request.into_parts();
    // An HTTP/2 client sends `:authority` instead of `Host`; the upstream speaks HTTP/1.1 and
    // must still see the original host.
    let host = parts.headers.get(HOST).cloned().or_else(|| {
        parts
            .uri
            .authority()
            .and_then(|authority| HeaderValue::from_str(authority.as_str()).ok())
    });

    let headers = &mut parts.headers;
    remove_hop_by_hop(headers);
    state.identity.strip(headers);
    if route.auth() != AuthMode::Public && !state.config.identity.forward_authorization {
        headers.remove(AUTHORIZATION);
    }
    if let Some(identity) = identity {
        identity.inject(headers);
    }
    set_forwarded(state, headers, client, host.as_ref());
    headers.insert(X_REQUEST_ID, request_id.clone());
    // HTTP/1.0 may leave the host out, and HTTP/2 `:authority`, but the upstream hears
    // HTTP/1.1, which requires `Host` (RFC 9112 §3.2): the upstream's own name stands in, as
    // with nginx's `proxy_pass`.
    let upstream_host = || HeaderValue::from_str(route.upstream_authority().as_str()).ok();
    if let Some(host) = host.or_else(upstream_host) {
        headers.insert(HOST, host);
    }
    // Hop-by-hop by nature, but an upgrade is asked of the upstream on the client's behalf.
    if let Some((protocol, _)) = &upgrade {
        headers.insert(UPGRADE, protocol.clone());
        headers.insert(CONNECTION, HeaderValue::from_static("upgrade"));
    }
    parts.uri = uri;
    parts.version = Version::HTTP_11;

    let limit = usize::try_from(state.config.server.max_body_bytes).unwrap_or(usize::MAX);
    let body = if body.is_end_stream() {
        Either::Right(Empty::new())
    } else {
        // hyper's client sends a GET, HEAD or CONNECT without a length as bodiless, dropping
        // the body a client streamed with it (chunked, or HTTP/2 without `content-length`);
        // said outright, the coding holds for every method.
        if body.size_hint().exact().is_none() {
            headers.insert(TRANSFER_ENCODING, CHUNKED);
        }
        let stall = state.config.server.header_timeout;
        Either::Left(Limited::new(ClientBody::new(body, stall), limit))
    };
    let sent = state.services.upstream.send(
        route.upstream_authority(),
        client.upstream.as_deref(),
        Request::from_parts(parts, body),
    );
    let started = std::time::Instant::now();
    let answered = tokio::time::timeout(route.timeout(), sent).await;
    route
        .series
        .observe_upstream(&state.services.metrics, started.elapsed());
    let mut response = match answered {
        Err(_) => return Err(Error::UpstreamTimeout),
        Ok(Err(err)) if cause::<LengthLimitError>(&*err).is_some() => {
            return Err(Error::PayloadTooLarge);
        }
        Ok(Err(err)) => {
            // The client's doing, not the upstream's: a 502 and a warning would send the
            // operator after an upstream that did nothing wrong (nginx answers 400 too).
            if let Some(failed) = cause::<ClientBodyFailed>(&*err) {
                tracing::debug!(route = %route.config.path, error = ?failed, "the request body failed");
                return Err(Error::BadRequest(failed.to_string()));
            }
            tracing::warn!(route = %route.config.path, error = %err, "upstream request failed");
            return Err(Error::UpstreamUnavailable);
        }
        Ok(Ok(response)) => response,
    };
    // The upstream has switched its connection to a protocol the client never asked for: the
    // client could do nothing with the answer, nor hyper with the connection after it.
    if response.status() == StatusCode::SWITCHING_PROTOCOLS && upgrade.is_none() {
        tracing::warn!(
            route = %route.config.path,
            error = "the upstream's answer switches protocols unasked",
            "upstream request failed"
        );
        return Err(Error::UpstreamUnavailable);
    }
    remove_hop_by_hop(response.headers_mut());
    // The answer is the gateway's to send, in its own version (RFC 9110 §6.2): an upstream's
    // `HTTP/1.0` would tell an HTTP/1.1 client that its connection closes after it.
    *response.version_mut() = Version::HTTP_11;
    if response.status() == StatusCode::SWITCHING_PROTOCOLS
        && let Some((protocol, client_side)) = upgrade
    {
        let upstream = hyper::upgrade::on(&mut response);
        let headers = response.headers_mut();
        headers.insert(UPGRADE, protocol);
        headers.insert(CONNECTION, HeaderValue::from_static("upgrade"));
        // As long as the token would still be accepted: a tunnel closed at `exp` would meet a
        // client reconnecting within the leeway with a 101 and an immediate close, never
        // with the 401 `token_expired` that tells it to refresh.
        let leeway = state.config.token.leeway.as_secs();
        let session = identity.map(|claims| {
            let revoked = state.services.revocations.ended(claims.sid.clone());
            (claims.exp.saturating_add(leeway), revoked)
        });
        let tunnel = tunnel(
            client_side,
            upstream,
            session,
            client.clone(),
            route.config.path.clone(),
        );
        // The tunnel's lines carry the request id, like the request's own.
        tokio::spawn(tunnel.instrument(tracing::Span::current()));
    }
    Ok(response.map(|body| AnswerBody {
        inner: body,
        silence: StallLimit::new(route.timeout()),
        route: route.series.clone(),
        span: tracing::Span::current(),
    }))
}

/// An upstream's answer body, cut off once the upstream sends nothing of it for the route's
/// `timeout`: stalled in the middle of an answer, it would otherwise hold the client's
/// connection, and its own, for ever.
pub struct AnswerBody {
    inner: Incoming,
    silence: StallLimit,
    route: Arc<RouteSeries>,
    /// The request's, whose id the line that tells of a cut carries.
    span: tracing::Span,
}

impl Body for AnswerBody {
    type Data = Bytes;
    type Error = Box<dyn StdError + Send + Sync>;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        const SILENT: &str =
            "the upstream sent nothing more of its answer within the route's timeout";
        let this = &mut *self;
        let (route, span) = (&this.route, &this.span);
        this.silence.poll_frame(&mut this.inner, cx, |failed| {
            let Some(err) = failed else {
                let route = route.label.as_str();
                span.in_scope(|| tracing::warn!(route, error = SILENT, "upstream request failed"));
                return SILENT.into();
            };
            err.into()
        })
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A client's request body on its way to the upstream, cut off once the client sends nothing
/// of it for `server.header_timeout`: the limit that keeps slow headers from pinning a
/// connection holds for the body too, which would otherwise pin an upstream connection as well
/// until the route's `timeout`, and then be blamed on the upstream.
pub struct ClientBody {
    inner: Incoming,
    silence: StallLimit,
}

impl ClientBody {
    fn new(inner: Incoming, stall: Duration) -> ClientBody {
        ClientBody {
            inner,
            silence: StallLimit::new(stall),
        }
    }
}

/// Why a client's request body failed part of the way through. Its text is the client's
/// answer, so it never holds the underlying error's.
#[derive(Debug)]
pub enum ClientBodyFailed {
    /// Nothing of it arrived for `server.header_timeout`.
    Stalled,
    /// It broke off: the client's connection ended before it was whole, or its framing did not
    /// parse (a chunk size that is not hexadecimal).
    Broken(hyper::Error),
}

impl std::fmt::Display for ClientBodyFailed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ClientBodyFailed::Stalled => {
                "the request body stopped arriving for longer than the server allows"
            }
            ClientBodyFailed::Broken(_) => "the request body did not arrive whole",
        })
    }
}

impl StdError for ClientBodyFailed {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        match self {
            ClientBodyFailed::Stalled => None,
            ClientBodyFailed::Broken(err) => Some(err),
        }
    }
}

impl Body for ClientBody {
    type Data = Bytes;
    type Error = ClientBodyFailed;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        this.silence.poll_frame(&mut this.inner, cx, |failed| {
            failed.map_or(ClientBodyFailed::Stalled, ClientBodyFailed::Broken)
        })
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// How long an exchange polled again and again may find nothing to do (an upstream that sends
/// nothing, a client that takes nothing) before it is given up on. tower-http's `TimeoutBody`
/// does as much for a body, but makes a timer and puts it in the runtime's wheel for every
/// frame, one already there included; this one is made at the first stall, and then only moved
/// when another begins.
pub(crate) struct StallLimit {
    limit: Duration,
    timer: Option<Pin<Box<Sleep>>>,
    /// The last poll found nothing: the stall under way is being timed.
    stalled: bool,
}

impl StallLimit {
    pub(crate) fn new(limit: Duration) -> StallLimit {
        StallLimit {
            limit,
            timer: None,
            stalled: false,
        }
    }

    /// The exchange made progress: a later stall is timed from its own start.
    pub(crate) fn went_on(&mut self) {
        self.stalled = false;
    }

    /// The exchange found nothing to do: ready once it has found nothing for `limit`, counted
    /// from the first poll of this stall; until then `cx` is woken when the limit passes.
    pub(crate) fn poll_over(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let limit = self.limit;
        let timer = self
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        if !self.stalled {
            timer.as_mut().reset(Instant::now() + limit);
            self.stalled = true;
        }
        timer.as_mut().poll(cx)
    }

    /// The next frame of `body`, or an error once it has sent nothing for `limit`. `failed`
    /// makes the error: of the body's own error, or of `None` for the stall.
    pub(crate) fn poll_frame<B: Body + Unpin, E>(
        &mut self,
        body: &mut B,
        cx: &mut Context<'_>,
        failed: impl FnOnce(Option<B::Error>) -> E,
    ) -> Poll<Option<Result<Frame<B::Data>, E>>> {
        if let Poll::Ready(frame) = Pin::new(body).poll_frame(cx) {
            self.went_on();
            return Poll::Ready(frame.map(|frame| frame.map_err(|err| failed(Some(err)))));
        }
        ready!(self.poll_over(cx));
        Poll::Ready(Some(Err(failed(None))))
    }
}

/// The protocols named by `Upgrade` when `Connection` asks for an upgrade, less `h2c`.
///
/// An `h2c` upgrade is never asked of the upstream: once switched, the client would speak
/// HTTP/2 straight to it, every later request on that connection past the routes, the token
/// check and the header rules. Without it the request goes on as a plain request.
fn requested_upgrade(headers: &HeaderMap) -> Option<HeaderValue> {
    let asks = headers
        .get_all(CONNECTION)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .any(|token| token.trim().eq_ignore_ascii_case("upgrade"));
    if !asks {
        return None;
    }
    let protocols = headers.get(UPGRADE)?.to_str().ok()?;
    let kept: Vec<&str> = protocols
        .split(',')
        .map(str::trim)
        .filter(|protocol| {
            let name = protocol.split('/').next().unwrap_or_default();
            !protocol.is_empty() && !name.eq_ignore_ascii_case("h2c")
        })
        .collect();
    if kept.is_empty() {
        return None;
    }
    HeaderValue::from_str(&kept.join(", ")).ok()
}

/// Carries bytes both ways once both sides have switched protocols. A tunnel opened with a
/// token closes when the token expires or its session is revoked (`session`: until when the
/// token is accepted, unix seconds, and what resolves on revocation): the decision made at
/// upgrade time outlives neither.
/// It holds on to its client connection: the tunnel counts against `max_connections`, and the
/// shutdown drain waits for it until the grace period is over.
async fn tunnel(
    client_side: OnUpgrade,
    upstream: OnUpgrade,
    session: Option<(u64, impl Future<Output = ()>)>,
    client: ClientConnection,
    route: String,
) {
    let (client_side, upstream) = match tokio::try_join!(client_side, upstream) {
        Ok(both) => both,
        Err(err) => {
            tracing::debug!(%route, error = %err, "upgrade did not complete");
            return;
        }
    };
    let mut client_side = TokioIo::new(client_side);
    let mut upstream = TokioIo::new(upstream);
    let copying = tokio::io::copy_bidirectional(&mut client_side, &mut upstream);
    let session_ended = async {
        match session {
            Some((exp, revoked)) => {
                let left = Duration::from_secs(exp.saturating_sub(crate::token::unix_now()));
                tokio::select! {
                    () = tokio::time::sleep(left) => "its token expired",
                    () = revoked => "its session was revoked",
                }
            }
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = copying => {}
        why = session_ended => tracing::info!(%route, "upgraded connection closed: {why}"),
        () = client.grace_over() => {
            tracing::info!(%route, "upgraded connection closed: the shutdown grace period is over");
        }
    }
}

/// Drops the fixed hop-by-hop headers and every header the `Connection` header names. One pass
/// over the names finds them: most messages carry none but `Connection: keep-alive`, and
/// removing a name that is not there still costs a hash and a probe, on every request and
/// every response. Nothing is allocated unless `Connection` names an uncommon header.
pub fn remove_hop_by_hop(headers: &mut HeaderMap) {
    let mut fixed_present: u16 = 0;
    let mut named: Vec<HeaderName> = Vec::new();
    for (name, value) in headers.iter() {
        if let Some(index) = hop_by_hop_index(name.as_str()) {
            fixed_present |= 1 << index;
        }
        if *name == CONNECTION {
            let tokens = value.as_bytes().split(|byte| *byte == b',');
            // `keep-alive` is among the fixed ones.
            let uncommon = tokens
                .map(<[u8]>::trim_ascii)
                .filter(|token| !token.is_empty() && !token.eq_ignore_ascii_case(b"keep-alive"));
            named.extend(uncommon.filter_map(|token| HeaderName::from_bytes(token).ok()));
        }
    }
    for (index, fixed) in HOP_BY_HOP.iter().enumerate() {
        if fixed_present & (1 << index) != 0 {
            headers.remove(fixed);
        }
    }
    for name in named {
        headers.remove(name);
    }
}

/// Where `name` is in [`HOP_BY_HOP`]. A match on the text compiles to a length test and a
/// comparison or two, where comparing `HeaderName`s one by one costs ten comparisons for
/// every header of every message.
fn hop_by_hop_index(name: &str) -> Option<usize> {
    let index = match name {
        "connection" => 0,
        "keep-alive" => 1,
        "proxy-connection" => 2,
        "proxy-authenticate" => 3,
        "proxy-authorization" => 4,
        "te" => 5,
        "trailer" => 6,
        "transfer-encoding" => 7,
        "upgrade" => 8,
        "http2-settings" => 9,
        _ => return None,
    };
    Some(index)
}

/// A peer in `trusted_proxies` is believed about the client before it: its `X-Forwarded-For`
/// gets the peer appended, its `-Proto` and `-Host` are kept. Anyone else's are replaced with
/// what the gateway saw itself.
fn set_forwarded(
    state: &State,
    headers: &mut HeaderMap,
    client: &ClientConnection,
    host: Option<&HeaderValue>,
) {
    if !is_trusted(&state.config.server.trusted_proxies, client.peer.ip()) {
        headers.insert(X_FORWARDED_FOR, client.peer_ip.clone());
        headers.remove(FORWARDED);
        headers.insert(X_FORWARDED_PROTO, HTTP);
        match host {
            Some(host) => headers.insert(X_FORWARDED_HOST, host.clone()),
            None => headers.remove(X_FORWARDED_HOST),
        };
        return;
    }
    // Every line the proxy sent, in order: a chain split over several lines is still one
    // chain (RFC 9110 §5.3), and `client_ip` reads it the same way.
    let mut chain = Vec::new();
    for line in headers.get_all(X_FORWARDED_FOR) {
        chain.extend_from_slice(line.as_bytes());
        chain.extend_from_slice(b", ");
    }
    chain.extend_from_slice(client.peer_ip.as_bytes());
    if let Ok(value) = HeaderValue::from_bytes(&chain) {
        headers.insert(X_FORWARDED_FOR, value);
    }
    if !headers.contains_key(X_FORWARDED_PROTO) {
        headers.insert(X_FORWARDED_PROTO, HTTP);
    }
    if let Some(host) = host
        && !headers.contains_key(X_FORWARDED_HOST)
    {
        headers.insert(X_FORWARDED_HOST, host.clone());
    }
}

pub(crate) fn is_trusted(trusted_proxies: &[IpNet], ip: IpAddr) -> bool {
    trusted_proxies.iter().any(|net| net.contains(&ip))
}

/// The client's address: the peer itself, unless the peer is a trusted proxy; then the
/// nearest address in `X-Forwarded-For` that is not a trusted proxy too. Addresses left of it
/// were written by someone nobody vouches for.
pub fn client_ip(trusted_proxies: &[IpNet], peer: IpAddr, headers: &HeaderMap) -> IpAddr {
    let mut client = peer;
    if !is_trusted(trusted_proxies, client) {
        return client;
    }
    let forwarded: Vec<&str> = headers
        .get_all(X_FORWARDED_FOR)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .collect();
    for hop in forwarded.iter().rev() {
        match hop.trim().parse::<IpAddr>() {
            Ok(ip) => client = ip,
            Err(_) => break,
        }
        if !is_trusted(trusted_proxies, client) {
            break;
        }
    }
    client
}

/// True when a message's `Transfer-Encoding` is anything but `chunked`, once: a coding
/// under it, or `chunked` twice. hyper decodes the last `chunked` alone and the header goes
/// as hop-by-hop, so the rest of the coding would reach the other side with nothing to say
/// so. A message without the header is not coded at all.
pub(crate) fn coded_past_chunked(headers: &HeaderMap) -> bool {
    let mut codings = headers.get_all(TRANSFER_ENCODING).iter();
    let Some(first) = codings.next() else {
        return false;
    };
    codings.next().is_some()
        || !first
            .as_bytes()
            .trim_ascii()
            .eq_ignore_ascii_case(b"chunked")
}

/// True when the body's declared length (hyper takes it from `Content-Length`) is over
/// `limit`: such a body is refused before a byte of it is read.
pub fn declared_over(body: &impl Body, limit: u64) -> bool {
    body.size_hint()
        .exact()
        .is_some_and(|length| length > limit)
}

/// The first error of type `E` in `err`'s chain: the upstream client wraps what the request
/// body failed with.
fn cause<'a, E: StdError + 'static>(err: &'a (dyn StdError + 'static)) -> Option<&'a E> {
    let mut current = Some(err);
    while let Some(err) = current {
        if let Some(found) = err.downcast_ref::<E>() {
            return Some(found);
        }
        current = err.source();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use http_body::Frame;
    use http_body_util::{BodyExt, Full, StreamBody};

    #[test]
    fn the_hop_by_hop_index_is_the_list_s_own() {
        for (index, name) in HOP_BY_HOP.iter().enumerate() {
            assert_eq!(hop_by_hop_index(name.as_str()), Some(index), "{name}");
        }
        assert_eq!(hop_by_hop_index("content-length"), None);
        assert_eq!(hop_by_hop_index("x-wx-openid"), None);
    }

    #[test]
    fn connection_named_headers_are_removed() {
        let mut headers = HeaderMap::new();
        headers.insert(
            CONNECTION,
            HeaderValue::from_static("keep-alive, X-Secret-Hop"),
        );
        headers.insert("x-secret-hop", HeaderValue::from_static("1"));
        headers.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        headers.insert("te", HeaderValue::from_static("trailers"));
        headers.insert("x-kept", HeaderValue::from_static("1"));
        remove_hop_by_hop(&mut headers);
        let left: Vec<&str> = headers.keys().map(HeaderName::as_str).collect();
        assert_eq!(left, ["x-kept"]);
    }

    #[test]
    fn client_ip_believes_only_trusted_hops() {
        let trusted: Vec<IpNet> = vec!["10.0.0.0/8".parse().unwrap()];
        let mut headers = HeaderMap::new();
        headers.insert(
            X_FORWARDED_FOR,
            HeaderValue::from_static("6.6.6.6, 1.2.3.4, 10.0.0.2"),
        );
        let proxy: IpAddr = "10.0.0.1".parse().unwrap();
        assert_eq!(
            client_ip(&trusted, proxy, &headers),
            "1.2.3.4".parse::<IpAddr>().unwrap()
        );
        let stranger: IpAddr = "5.5.5.5".parse().unwrap();
        assert_eq!(client_ip(&trusted, stranger, &headers), stranger);
        headers.insert(X_FORWARDED_FOR, HeaderValue::from_static("junk"));
        assert_eq!(client_ip(&trusted, proxy, &headers), proxy);
    }

    #[tokio::test]
    async fn the_body_cap_is_found_in_the_error_chain() {
        let chunks = (0..4)
            .map(|_| Ok::<_, std::convert::Infallible>(Frame::data(Bytes::from_static(b"abc"))));
        let body = Limited::new(StreamBody::new(futures_util::stream::iter(chunks)), 10);
        let err = body.collect().await.unwrap_err();
        assert!(cause::<LengthLimitError>(err.as_ref()).is_some());
        assert!(cause::<ClientBodyFailed>(err.as_ref()).is_none());
        let other: Box<dyn StdError> = "the client went away".into();
        assert!(cause::<LengthLimitError>(other.as_ref()).is_none());
    }

    #[test]
    fn declared_length_over_the_limit() {
        assert!(declared_over(&Full::new(Bytes::from_static(b"123456")), 5));
        assert!(!declared_over(&Full::new(Bytes::from_static(b"12345")), 5));
    }

    #[test]
    fn h2c_is_never_asked_of_the_upstream() {
        let asking = |upgrade: &'static str| {
            let mut headers = HeaderMap::new();
            headers.insert(
                CONNECTION,
                HeaderValue::from_static("Upgrade, HTTP2-Settings"),
            );
            headers.insert(UPGRADE, HeaderValue::from_static(upgrade));
            requested_upgrade(&headers)
        };
        assert_eq!(asking("h2c"), None);
        assert_eq!(asking(" H2C "), None);
        assert_eq!(
            asking("websocket"),
            Some(HeaderValue::from_static("websocket"))
        );
        assert_eq!(
            asking("h2c, websocket"),
            Some(HeaderValue::from_static("websocket"))
        );
    }
}
