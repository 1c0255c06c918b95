//! The client-facing listener: the accept loop, one task per connection (HTTP/1.1 and h2c),
//! the request path from path checks to proxying, the access log, and graceful shutdown.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{CONTENT_LENGTH, CONTENT_TYPE};
use http::{HeaderValue, Request, Response, StatusCode};
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tracing::Instrument;

use crate::auth;
use crate::error::Error;
use crate::metrics::{self, RouteLabel, RouteStatus};
use crate::proxy::{self, X_REQUEST_ID};
use crate::routes::{self, Route};
use crate::state::{SharedState, State};

/// A proxied body streams through untouched; the gateway's own answers are small and whole.
pub type ResponseBody = Either<Incoming, Full<Bytes>>;

/// Longest client-sent `X-Request-Id` that is passed on; longer ones are replaced.
const MAX_REQUEST_ID_LEN: usize = 128;

/// Pause after a failed `accept` (most often out of file descriptors), so the loop does not
/// spin while the condition lasts.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);

/// Serves `listener` until `shutdown` resolves, then stops accepting and gives in-flight
/// requests `server.shutdown_grace` to finish.
pub async fn run(
    listener: TcpListener,
    state: SharedState,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let grace_state = state.clone();
    let handler = move |request, peer| {
        let state = state.load_full();
        async move { handle(&state, request, peer).await }
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
    serve_connections(listener, handler, limits, shutdown, grace).await;
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
const MAX_HEADER_BYTES: usize = 64 * 1024;

/// The accept loop shared by the gateway and the admin listener: one task per connection,
/// HTTP/1.1 or h2c, each watched so that shutdown can wait for it to finish.
async fn serve_connections<H, F>(
    listener: TcpListener,
    handler: H,
    limits: Limits,
    shutdown: impl Future<Output = ()>,
    grace: impl FnOnce() -> Duration,
) where
    H: Fn(Request<Incoming>, SocketAddr) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<ResponseBody>> + Send + 'static,
{
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .max_buf_size(MAX_HEADER_BYTES);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(MAX_HEADER_BYTES as u32)
        .keep_alive_interval(limits.header_timeout)
        .keep_alive_timeout(limits.header_timeout);
    let builder = Arc::new(builder);
    let connection_slots = Arc::new(Semaphore::new(limits.max_connections));
    let graceful = GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        // Waiting for a free slot before accepting leaves further clients in the kernel's
        // backlog, where they cost the gateway nothing.
        let slot = tokio::select! {
            slot = connection_slots.clone().acquire_owned() => {
                slot.expect("the connection semaphore is never closed")
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
        let handler = handler.clone();
        let service = service_fn(move |request| {
            let answer = handler(request, peer);
            async move { Ok::<_, Infallible>(answer.await) }
        });
        let connection = builder
            .serve_connection_with_upgrades(TokioIo::new(stream), service)
            .into_owned();
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            if let Err(err) = connection.await {
                tracing::debug!(%peer, error = %err, "connection ended with an error");
            }
            drop(slot);
        });
    }
    drop(listener);
    let grace = grace();
    tracing::info!(?grace, "draining in-flight requests");
    if tokio::time::timeout(grace, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("shutdown grace period over; closing the remaining connections");
    }
}

/// What prometheus-client writes (the probes' one-word answers read fine as it too).
const OPENMETRICS_TEXT: HeaderValue =
    HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8");

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
    let handler = move |request: Request<Incoming>, _peer| {
        let state = state.load_full();
        async move {
            let (status, body) = match request.uri().path() {
                "/healthz" => (StatusCode::OK, "ok".to_string()),
                "/metrics" => (StatusCode::OK, state.services.metrics.encode()),
                "/readyz" => match state.services.store.ping().await {
                    Ok(()) => (StatusCode::OK, "ready".to_string()),
                    Err(err) => {
                        tracing::warn!(error = %err, "not ready: the store does not answer");
                        (
                            StatusCode::SERVICE_UNAVAILABLE,
                            "store unavailable".to_string(),
                        )
                    }
                },
                _ => (StatusCode::NOT_FOUND, "not found".to_string()),
            };
            let mut response = Response::new(Either::Right(Full::new(Bytes::from(body))));
            *response.status_mut() = status;
            response
                .headers_mut()
                .insert(CONTENT_TYPE, OPENMETRICS_TEXT);
            response
        }
    };
    let limits = Limits {
        max_connections: ADMIN_MAX_CONNECTIONS,
        header_timeout: ADMIN_HEADER_TIMEOUT,
    };
    serve_connections(listener, handler, limits, shutdown, || {
        Duration::from_secs(1)
    })
    .await;
}

/// One request, start to finish: it never fails, errors become their JSON answer here.
async fn handle(
    state: &State,
    request: Request<Incoming>,
    peer: SocketAddr,
) -> Response<ResponseBody> {
    let started = Instant::now();
    let metrics = &state.services.metrics;
    metrics.in_flight.inc();
    let request_id = request_id(&request);
    let method = request.method().clone();
    let path = request.uri().path().to_owned();
    let mut route = metrics.no_route.clone();

    // Every line logged while answering carries the request id.
    let span = tracing::info_span!(
        "request",
        request_id = request_id.to_str().unwrap_or_default()
    );
    let result = dispatch(state, request, peer, &request_id, &mut route)
        .instrument(span.clone())
        .await;
    let mut response = match result {
        Ok(response) => response,
        Err(err) => err.into_response().map(Either::Right),
    };
    response
        .headers_mut()
        .insert(X_REQUEST_ID, request_id.clone());
    let took = started.elapsed();
    let status = response.status().as_u16();
    span.in_scope(|| {
        tracing::info!(
            target: "wxgate::access",
            method = %method,
            path = %path,
            route = route.as_str(),
            status,
            duration_us = took.as_micros() as u64,
        )
    });
    metrics
        .request_duration
        .get_or_create(&metrics::Route {
            route: route.clone(),
        })
        .observe(took.as_secs_f64());
    metrics
        .requests
        .get_or_create(&RouteStatus { route, status })
        .inc();
    metrics.in_flight.dec();
    response
}

/// The checks in SPEC §4 order: path, route, method, token, body size; then the answer.
async fn dispatch(
    state: &State,
    request: Request<Incoming>,
    peer: SocketAddr,
    request_id: &HeaderValue,
    route_label: &mut RouteLabel,
) -> Result<Response<ResponseBody>, Error> {
    let path = request.uri().path();
    routes::check_path(path)?;
    if auth::owns_path(state, path) {
        *route_label = state.services.metrics.auth_route.clone();
        // Boxed: the login's future (WeChat calls, the exchange cache) is many times the size
        // of the proxy path's, and hyper keeps a request future's allocation for the life of
        // each keep-alive connection. Unboxed, every idle connection would carry it.
        return Box::pin(auth::handle(state, request, peer))
            .await
            .map(|response| response.map(Either::Right));
    }
    let route: &Route = state.routes.find(path).ok_or(Error::NoRoute)?;
    *route_label = route.label.clone();
    if !route.allows_method(request.method()) {
        return Err(Error::MethodNotAllowed);
    }
    let identity = auth::authorize(state, route, request.headers())?;
    if declared_length(&request).is_some_and(|length| length > state.config.server.max_body_bytes) {
        return Err(Error::PayloadTooLarge);
    }
    // Boxed for the same reason as the gateway's own endpoints: while idle, a connection then
    // keeps a pointer's worth of request future rather than the whole proxy state machine.
    let response = Box::pin(proxy::forward(
        state,
        route,
        request,
        peer,
        identity.as_deref(),
        request_id,
    ))
    .await?;
    Ok(response.map(Either::Left))
}

fn declared_length(request: &Request<Incoming>) -> Option<u64> {
    request
        .headers()
        .get(CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .parse()
        .ok()
}

/// The client's `X-Request-Id` when it is short and plain (so it can go into logs and headers
/// as is), else a new one.
fn request_id(request: &Request<Incoming>) -> HeaderValue {
    if let Some(sent) = request.headers().get(X_REQUEST_ID) {
        let bytes = sent.as_bytes();
        let sane = !bytes.is_empty()
            && bytes.len() <= MAX_REQUEST_ID_LEN
            && bytes
                .iter()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'));
        if sane {
            return sent.clone();
        }
    }
    let generated = uuid::Uuid::new_v4();
    let mut buffer = uuid::Uuid::encode_buffer();
    HeaderValue::from_str(generated.simple().encode_lower(&mut buffer))
        .expect("a uuid is a valid header value")
}

/// `wxgate serve`: loads the config, binds the listeners and runs until SIGTERM or SIGINT.
pub async fn serve(config_path: &std::path::Path) -> anyhow::Result<()> {
    let config = crate::Config::load(config_path)?;
    let (listen, admin_listen) = (config.server.listen, config.server.admin_listen);
    let state = State::shared(config).await?;
    let listener = bind(listen).await?;
    tracing::info!(addr = %listener.local_addr()?, "wxgate listening");

    let (stop, stopped) = tokio::sync::watch::channel(false);
    let stop_requested = move || {
        let mut stopped = stopped.clone();
        async move {
            let _ = stopped.wait_for(|stop| *stop).await;
        }
    };
    let admin = match admin_listen {
        Some(addr) => {
            let admin_listener = bind(addr).await?;
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
        shutdown_signal().await;
        let _ = stop.send(true);
    });
    #[cfg(unix)]
    tokio::spawn(reload_on_sighup(config_path.to_path_buf(), state.clone()));
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
async fn reload_on_sighup(path: std::path::PathBuf, state: SharedState) {
    use tokio::signal::unix::{SignalKind, signal};
    let Ok(mut hangups) = signal(SignalKind::hangup()) else {
        tracing::warn!("cannot listen for SIGHUP: reloading is off");
        return;
    };
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
/// state they started with.
pub fn reload(
    path: &std::path::Path,
    state: &SharedState,
) -> Result<(), crate::config::ConfigError> {
    let current = state.load_full();
    let outcome = build_reloaded(path, &current).map(|next| state.store(Arc::new(next)));
    let result = if outcome.is_ok() { "ok" } else { "error" };
    current
        .services
        .metrics
        .config_reloads
        .get_or_create(&metrics::Outcome { result })
        .inc();
    outcome
}

fn build_reloaded(
    path: &std::path::Path,
    current: &State,
) -> Result<State, crate::config::ConfigError> {
    let config = crate::Config::load(path)?;
    let running = &current.config;
    if config.server.listen != running.server.listen
        || config.server.admin_listen != running.server.admin_listen
        || config.server.max_connections != running.server.max_connections
        || config.server.header_timeout != running.server.header_timeout
    {
        tracing::warn!("a listener setting changed: it takes effect only after a restart");
    }
    if config.store != running.store {
        tracing::warn!("the store settings changed: they take effect only after a restart");
    }
    State::new(config, current.services.clone())
}

async fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .map_err(|err| anyhow::anyhow!("cannot listen on {addr}: {err}"))
}

/// Resolves on the first SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut terminate =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                .expect("installing a SIGTERM handler cannot fail on unix");
        tokio::select! {
            _ = interrupt => {}
            _ = terminate.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = interrupt.await;
    }
}
