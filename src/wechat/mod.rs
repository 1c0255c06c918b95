//! The WeChat client (SPEC §7): hosts tried in order, retries that never resend a code that may
//! have reached WeChat, errcode mapping, stable access tokens, and phone numbers.

mod access_token;
pub mod crypto;

use std::borrow::Cow;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use percent_encoding::{NON_ALPHANUMERIC, utf8_percent_encode};
use reqwest::RequestBuilder;
use serde::Deserialize;
use serde_json::Value;

use crate::config::{AppConfig, Secret, WechatConfig, WechatHost};
use crate::error::Error;
use crate::metrics::Metrics;
use access_token::{AccessTokens, LocalTokens};

/// What code2Session answered for one user. The session_key is a [`Secret`]: it never leaves
/// the gateway.
#[derive(Debug, Clone)]
pub struct Code2Session {
    pub openid: String,
    pub unionid: Option<String>,
    pub session_key: Secret,
}

/// A user's phone number, as `getuserphonenumber` gives it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct PhoneNumber {
    pub phone_number: String,
    pub pure_phone_number: String,
    pub country_code: String,
}

/// Pauses before the two retries of an answer of -1 (system busy): about a second in all.
const BUSY_BACKOFF: [Duration; 2] = [Duration::from_millis(250), Duration::from_millis(600)];

/// How long a busy WeChat asks clients to wait, in seconds.
const BUSY_RETRY_AFTER_SECS: u64 = 1;

/// errcodes saying the access token was refused before WeChat looked at anything else.
const DEAD_ACCESS_TOKEN: [i64; 2] = [40001, 42001];

/// Whether a call may be sent again after it may have reached WeChat.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Replay {
    /// It carries a single-use code: only a host that could not be reached is left for the
    /// next one; a timeout or a bad answer ends the call.
    Never,
    /// Safe to repeat (the stable token): a timeout, a 5xx or a body that is not JSON also
    /// moves on to the next host.
    Safe,
}

/// How one attempt at one host failed.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Failure {
    /// The connection could not be made: nothing reached WeChat.
    Unreachable,
    Timeout,
    /// An HTTP error status, or a body that is not JSON.
    BadAnswer,
}

/// Long-lived: kept across config reloads so the token cache and the connection pool survive.
pub struct WechatClient {
    /// Built on first use, when the attempt timeout is known.
    http: Mutex<Option<Http>>,
    access_tokens: AccessTokens,
    metrics: Arc<Metrics>,
}

/// The HTTP client, built for one attempt timeout. reqwest takes the connect timeout per
/// client, not per request, so a reload that changes `wechat.timeout` builds a new client (and
/// a new pool); every other reload keeps this one.
struct Http {
    attempt_timeout: Duration,
    client: reqwest::Client,
}

impl Http {
    fn new(attempt_timeout: Duration) -> Self {
        let client = reqwest::Client::builder()
            .no_proxy()
            // WeChat's API does not redirect, and following a 307 or 308 would send the
            // stable-token body, app secret included, wherever `Location` points.
            .redirect(reqwest::redirect::Policy::none())
            // A connection not made in time counts as a host that cannot be reached, so the
            // next one is tried: nothing was sent. It must give up strictly before the
            // attempt's own timeout, or reqwest reports that timeout instead, and a timeout
            // ends a call that carries a code. Half: a handshake slower than that leaves
            // little of the attempt for WeChat's answer anyway.
            .connect_timeout(attempt_timeout / 2)
            .build()
            .expect("an HTTP client with these settings always builds");
        Http {
            attempt_timeout,
            client,
        }
    }
}

impl WechatClient {
    pub fn new(metrics: Arc<Metrics>) -> Self {
        // reqwest is built without a bundled crypto provider so that ring is the only one
        // compiled in; it must be installed once, before any client is built, this one's or
        // another module's.
        let _ = rustls::crypto::ring::default_provider().install_default();
        WechatClient {
            http: Mutex::new(None),
            access_tokens: AccessTokens::new(Arc::new(LocalTokens::default())),
            metrics,
        }
    }

    /// The client for attempts of `attempt_timeout` (a cheap handle on the shared pool).
    fn http(&self, attempt_timeout: Duration) -> reqwest::Client {
        // Nothing can panic while the lock is held but building a client, which leaves the
        // old one in place: a poisoned lock still guards a usable client.
        let mut http = self.http.lock().unwrap_or_else(PoisonError::into_inner);
        match &*http {
            Some(current) if current.attempt_timeout == attempt_timeout => current.client.clone(),
            _ => http.insert(Http::new(attempt_timeout)).client.clone(),
        }
    }

    /// Exchanges a `wx.login` code with WeChat. Callers make sure a code is exchanged once
    /// (see `auth::exchange`).
    pub async fn exchange_code(
        &self,
        settings: &WechatConfig,
        app: &AppConfig,
        code: &str,
    ) -> Result<Code2Session, Error> {
        #[derive(Deserialize)]
        struct Answer {
            openid: Option<String>,
            session_key: Option<String>,
            unionid: Option<String>,
        }
        let answer = self
            .call("code2session", settings, Replay::Never, |http, host| {
                let mut url = host.code2session.clone();
                url.query_pairs_mut()
                    .append_pair("appid", &app.appid)
                    .append_pair("secret", app.secret.expose())
                    .append_pair("js_code", code)
                    .append_pair("grant_type", "authorization_code");
                http.get(url)
            })
            .await?;
        let answer: Answer = accepted(answer)?;
        match (answer.openid, answer.session_key) {
            (Some(openid), Some(session_key)) if !openid.is_empty() => Ok(Code2Session {
                openid,
                unionid: answer.unionid.filter(|unionid| !unionid.is_empty()),
                session_key: Secret::new(session_key),
            }),
            _ => Err(Error::WechatUnavailable {
                wechat_errcode: None,
            }),
        }
    }

    /// Exchanges a `getPhoneNumber` code. The code goes in the body, never in the URL; the
    /// access token comes from the stable-token cache, and one that WeChat reports dead is
    /// dropped and the call made once more with a fresh one.
    pub async fn phone_number(
        &self,
        settings: &WechatConfig,
        app: &AppConfig,
        code: &str,
    ) -> Result<PhoneNumber, Error> {
        #[derive(Deserialize)]
        struct Answer {
            phone_info: Option<PhoneInfo>,
        }
        #[derive(Deserialize)]
        #[serde(rename_all = "camelCase")]
        struct PhoneInfo {
            phone_number: String,
            pure_phone_number: String,
            country_code: String,
            watermark: Option<Value>,
        }
        let body = serde_json::json!({ "code": code }).to_string();
        let mut retried = false;
        loop {
            let token = self.access_tokens.get(self, settings, app).await?;
            let answer = self
                .call("phone", settings, Replay::Never, |http, host| {
                    http.post(format!(
                        "{host}/wxa/business/getuserphonenumber?access_token={}",
                        encode(token.expose())
                    ))
                    .header(reqwest::header::CONTENT_TYPE, "application/json")
                    .body(body.clone())
                })
                .await?;
            if DEAD_ACCESS_TOKEN.contains(&errcode_of(&answer)) {
                // Dropped even after the retry, so that no later call starts with it.
                self.access_tokens.invalidate(&app.appid, &token).await;
                // WeChat refused the token before looking at the code: sending the code
                // again with a fresh token cannot use it twice.
                if !retried {
                    retried = true;
                    continue;
                }
            }
            let info = accepted::<Answer>(answer)?
                .phone_info
                .ok_or(Error::WechatUnavailable {
                    wechat_errcode: None,
                })?;
            let watermark_appid = info
                .watermark
                .as_ref()
                .and_then(|watermark| watermark.get("appid"))
                .and_then(Value::as_str);
            if watermark_appid != Some(app.appid.as_str()) {
                tracing::warn!(appid = %app.appid, "phone number answer carries another app's watermark");
                return Err(Error::WechatUnavailable {
                    wechat_errcode: None,
                });
            }
            return Ok(PhoneNumber {
                phone_number: info.phone_number,
                pure_phone_number: info.pure_phone_number,
                country_code: info.country_code,
            });
        }
    }

    /// A new access token from the stable-token API. `force_refresh` is always false: WeChat
    /// allows forcing only a few times a day, and forcing invalidates the token every other
    /// server of the app is using.
    async fn fetch_stable_token(
        &self,
        settings: &WechatConfig,
        app: &AppConfig,
    ) -> Result<(Secret, Duration), Error> {
        #[derive(Deserialize)]
        struct Answer {
            access_token: Option<String>,
            expires_in: Option<u64>,
        }
        let body = serde_json::json!({
            "grant_type": "client_credential",
            "appid": app.appid,
            "secret": app.secret.expose(),
            "force_refresh": false,
        })
        .to_string();
        let answer = self
            .call("stable_token", settings, Replay::Safe, |http, host| {
                http.post(format!("{host}/cgi-bin/stable_token"))
                    .header(reqwest::header::CONTENT_TYPE, "application/json")
                    .body(body.clone())
            })
            .await?;
        match accepted::<Answer>(answer)? {
            Answer {
                access_token: Some(token),
                expires_in: Some(expires_in),
            } if !token.is_empty() => Ok((Secret::new(token), Duration::from_secs(expires_in))),
            _ => Err(Error::WechatUnavailable {
                wechat_errcode: None,
            }),
        }
    }

    /// Sends one call, trying hosts in order, and answers WeChat's JSON. An errcode of -1
    /// (system busy: WeChat did not act on the call) is retried twice with backoff on the same
    /// host; every other errcode is the caller's to read.
    async fn call(
        &self,
        api: &'static str,
        settings: &WechatConfig,
        replay: Replay,
        request: impl Fn(&reqwest::Client, &WechatHost) -> RequestBuilder,
    ) -> Result<Value, Error> {
        let http = self.http(settings.timeout);
        let mut last_failure = Failure::Unreachable;
        for host in &settings.hosts {
            let mut busy_retries = BUSY_BACKOFF.iter();
            loop {
                let started = Instant::now();
                let outcome = self
                    .attempt(api, &host.base, request(&http, host), settings.timeout)
                    .await;
                let result: Cow<'static, str> = match &outcome {
                    Ok(answer) => match errcode_of(answer) {
                        0 => "ok".into(),
                        errcode => errcode.to_string().into(),
                    },
                    Err(Failure::Timeout) => "timeout".into(),
                    Err(_) => "unavailable".into(),
                };
                self.metrics.observe_wechat(api, result, started.elapsed());
                let failure = match outcome {
                    Ok(answer) if errcode_of(&answer) == -1 => match busy_retries.next() {
                        Some(pause) => {
                            tokio::time::sleep(*pause).await;
                            continue;
                        }
                        None => {
                            return Err(Error::WechatBusy {
                                retry_after_secs: BUSY_RETRY_AFTER_SECS,
                            });
                        }
                    },
                    Ok(answer) => return Ok(answer),
                    Err(failure) => failure,
                };
                last_failure = failure;
                if failure == Failure::Unreachable || replay == Replay::Safe {
                    break;
                }
                return Err(failure_error(failure));
            }
        }
        tracing::warn!(api, "no WeChat host gave a usable answer");
        Err(failure_error(last_failure))
    }

    /// One request to one host. URLs carry the app secret, codes or the access token, so they
    /// are never logged, and reqwest's errors, which would print them, are logged without.
    async fn attempt(
        &self,
        api: &'static str,
        host: &str,
        request: RequestBuilder,
        timeout: Duration,
    ) -> Result<Value, Failure> {
        let started = Instant::now();
        let outcome = async {
            let response = request.timeout(timeout).send().await?;
            let status = response.status();
            let body = response.bytes().await?;
            Ok::<_, reqwest::Error>((status, body))
        }
        .await;
        let elapsed_ms = started.elapsed().as_millis() as u64;
        let (status, body) = match outcome {
            Ok(answered) => answered,
            Err(err) => {
                let err = err.without_url();
                let failure = if err.is_connect() {
                    Failure::Unreachable
                } else if err.is_timeout() {
                    Failure::Timeout
                } else {
                    Failure::BadAnswer
                };
                tracing::warn!(
                    api,
                    host,
                    elapsed_ms,
                    error = with_causes(&err),
                    "WeChat request failed"
                );
                return Err(failure);
            }
        };
        if !status.is_success() {
            tracing::warn!(api, host, %status, elapsed_ms, "WeChat answered with an HTTP error");
            return Err(Failure::BadAnswer);
        }
        // WeChat sends JSON as text/plain: the body is parsed whatever its Content-Type says.
        match serde_json::from_slice::<Value>(&body) {
            Ok(answer) if answer.is_object() => {
                tracing::debug!(
                    api,
                    host,
                    elapsed_ms,
                    errcode = errcode_of(&answer),
                    "WeChat answered"
                );
                Ok(answer)
            }
            _ => {
                tracing::warn!(
                    api,
                    host,
                    elapsed_ms,
                    "WeChat answered with a body that is not JSON"
                );
                Err(Failure::BadAnswer)
            }
        }
    }
}

/// An error and its causes, for the log: reqwest's own message says only "error sending
/// request". Callers pass errors stripped of their URL; a nested reqwest error, which could
/// carry one, ends the chain.
fn with_causes(err: &(dyn std::error::Error + 'static)) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        if cause.is::<reqwest::Error>() {
            break;
        }
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

fn failure_error(failure: Failure) -> Error {
    match failure {
        Failure::Timeout => Error::WechatTimeout,
        Failure::Unreachable | Failure::BadAnswer => Error::WechatUnavailable {
            wechat_errcode: None,
        },
    }
}

/// A missing `errcode` means 0.
fn errcode_of(answer: &Value) -> i64 {
    answer.get("errcode").and_then(Value::as_i64).unwrap_or(0)
}

/// The answer's fields when its errcode is 0, else the errcode's error.
fn accepted<T: serde::de::DeserializeOwned>(answer: Value) -> Result<T, Error> {
    match errcode_of(&answer) {
        0 => serde_json::from_value(answer).map_err(|_| Error::WechatUnavailable {
            wechat_errcode: None,
        }),
        errcode => Err(map_errcode(errcode)),
    }
}

fn encode(value: &str) -> percent_encoding::PercentEncode<'_> {
    utf8_percent_encode(value, NON_ALPHANUMERIC)
}

/// SPEC §7's mapping of WeChat's errcodes.
fn map_errcode(errcode: i64) -> Error {
    match errcode {
        40029 | 40163 => Error::InvalidCode {
            wechat_errcode: errcode,
        },
        45011 => Error::RateLimited {
            retry_after_secs: 1,
            wechat_errcode: Some(errcode),
        },
        40226 => Error::WechatRiskyUser {
            wechat_errcode: errcode,
        },
        -1 => Error::WechatBusy {
            retry_after_secs: BUSY_RETRY_AFTER_SECS,
        },
        other => {
            // Each of these is the client's 502, but most of them are the operator's to mend,
            // and each repeats on every login until mended: the log says which it is.
            let hint = match other {
                40013 | 41002 => "WeChat knows no such appid: check wechat.apps[].appid",
                40125 | 41004 => "WeChat refused the app secret: check wechat.apps[].secret",
                40164 | 89503 => {
                    "WeChat refused this server's IP address: add it to the app's IP whitelist"
                }
                _ => "an errcode the gateway does not map: see WeChat's documentation",
            };
            tracing::warn!(errcode = other, hint, "WeChat refused the call");
            Error::WechatUnavailable {
                wechat_errcode: Some(other),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU64, Ordering};

    use bytes::Bytes;
    use http::{Request, Response, StatusCode};
    use http_body_util::Full;
    use hyper::body::Incoming;
    use tokio::net::{TcpListener, TcpSocket, TcpStream};

    use super::*;
    use crate::mock::wechat::MockWechat;

    pub(super) const APPID: &str = "wx00000000000000a1";
    const APP_SECRET: &str = "app-secret-that-must-not-leak";

    pub(super) fn client() -> WechatClient {
        WechatClient::new(Arc::new(Metrics::default()))
    }

    pub(super) fn app() -> AppConfig {
        AppConfig {
            appid: APPID.to_string(),
            secret: Secret::new(APP_SECRET),
        }
    }

    pub(super) fn settings(hosts: &[&str], timeout: Duration) -> WechatConfig {
        WechatConfig {
            hosts: hosts
                .iter()
                .map(|host| WechatHost::new(host).unwrap())
                .collect(),
            timeout,
            apps: vec![app()],
        }
    }

    pub(super) async fn start_mock() -> (Arc<MockWechat>, String) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let host = format!("http://{}", listener.local_addr().unwrap());
        let mock = MockWechat::new();
        tokio::spawn(mock.clone().serve(listener));
        (mock, host)
    }

    /// A host nothing listens on.
    fn closed_host() -> String {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", listener.local_addr().unwrap())
    }

    /// A host whose accept queue is full: the kernel drops further connection attempts, so
    /// connecting to it can only time out. The listener and the connection filling its queue
    /// are returned to be kept alive.
    async fn unanswering_host() -> (String, TcpListener, TcpStream) {
        let socket = TcpSocket::new_v4().unwrap();
        socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let listener = socket.listen(0).unwrap();
        let addr = listener.local_addr().unwrap();
        let filler = TcpStream::connect(addr).await.unwrap();
        (format!("http://{addr}"), listener, filler)
    }

    /// A host that answers every request with `answer(path)`, counting requests.
    pub(super) async fn scripted_host(
        answer: impl Fn(&str) -> Response<Full<Bytes>> + Clone + Send + Sync + 'static,
    ) -> (String, Arc<AtomicU64>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let host = format!("http://{}", listener.local_addr().unwrap());
        let hits = Arc::new(AtomicU64::new(0));
        let counted = hits.clone();
        tokio::spawn(crate::mock::serve(
            listener,
            move |request: Request<Incoming>| {
                counted.fetch_add(1, Ordering::SeqCst);
                let answer = answer(request.uri().path());
                async move { answer }
            },
        ));
        (host, hits)
    }

    /// A host that accepts requests and never answers them, counting requests.
    async fn silent_host() -> (String, Arc<AtomicU64>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let host = format!("http://{}", listener.local_addr().unwrap());
        let hits = Arc::new(AtomicU64::new(0));
        let counted = hits.clone();
        tokio::spawn(crate::mock::serve(listener, move |_: Request<Incoming>| {
            counted.fetch_add(1, Ordering::SeqCst);
            std::future::pending()
        }));
        (host, hits)
    }

    /// A 200 answer with `body` as WeChat sends it.
    pub(super) fn text_answer(body: String) -> Response<Full<Bytes>> {
        Response::new(Full::new(Bytes::from(body)))
    }

    pub(super) fn status_answer(
        status: StatusCode,
        location: Option<String>,
    ) -> Response<Full<Bytes>> {
        let mut response = Response::new(Full::new(Bytes::from_static(b"{\"errcode\":0}")));
        *response.status_mut() = status;
        if let Some(location) = location {
            response
                .headers_mut()
                .insert(http::header::LOCATION, location.parse().unwrap());
        }
        response
    }

    async fn exchange(
        hosts: &[&str],
        timeout: Duration,
        code: &str,
    ) -> Result<Code2Session, Error> {
        client()
            .exchange_code(&settings(hosts, timeout), &app(), code)
            .await
    }

    pub(super) const TIMEOUT: Duration = Duration::from_secs(5);

    #[tokio::test]
    async fn an_exchange_answers_the_users_openid_unionid_and_session_key() {
        let (mock, host) = start_mock().await;
        let session = exchange(&[&host], TIMEOUT, "alice-1").await.unwrap();
        assert_eq!(session.openid, MockWechat::openid_for(APPID, "alice"));
        assert_eq!(session.unionid, MockWechat::unionid_for("alice"));
        assert!(session.unionid.is_some());
        assert_eq!(
            session.session_key,
            MockWechat::session_key_for(APPID, "alice")
        );
        let session = exchange(&[&host], TIMEOUT, "nounion-bob").await.unwrap();
        assert_eq!(session.unionid, None);
        assert_eq!(mock.code2session_calls(), 2);
    }

    #[tokio::test]
    async fn an_unreachable_host_fails_over_to_the_next() {
        let (mock, host) = start_mock().await;
        let session = exchange(&[&closed_host(), &host], TIMEOUT, "carol")
            .await
            .unwrap();
        assert_eq!(session.openid, MockWechat::openid_for(APPID, "carol"));
        assert_eq!(mock.code2session_calls(), 1);
    }

    #[tokio::test]
    async fn a_connect_timeout_fails_over_to_the_next_host() {
        let (mock, host) = start_mock().await;
        let (unanswering, _listener, _filler) = unanswering_host().await;
        let timeout = Duration::from_millis(400);
        let session = exchange(&[&unanswering, &host], timeout, "dave")
            .await
            .unwrap();
        assert_eq!(session.openid, MockWechat::openid_for(APPID, "dave"));
        assert_eq!(mock.code2session_calls(), 1);
        // Alone, it is a host that could not be reached, not a timeout: nothing was sent.
        assert_eq!(
            exchange(&[&unanswering], timeout, "dave-2")
                .await
                .unwrap_err(),
            Error::WechatUnavailable {
                wechat_errcode: None
            }
        );
    }

    #[tokio::test]
    async fn no_reachable_host_is_wechat_unavailable() {
        let err = exchange(&[&closed_host(), &closed_host()], TIMEOUT, "erin")
            .await
            .unwrap_err();
        assert_eq!(
            err,
            Error::WechatUnavailable {
                wechat_errcode: None
            }
        );
    }

    #[tokio::test]
    async fn busy_is_tried_three_times_then_wechat_busy() {
        let (mock, host) = start_mock().await;
        let err = exchange(&[&host, &host], TIMEOUT, "busy")
            .await
            .unwrap_err();
        assert_eq!(
            err,
            Error::WechatBusy {
                retry_after_secs: 1
            }
        );
        assert_eq!(mock.code2session_calls(), 3);
    }

    #[tokio::test]
    async fn flaky_succeeds_after_one_busy_answer() {
        let (mock, host) = start_mock().await;
        let session = exchange(&[&host], TIMEOUT, "flaky").await.unwrap();
        assert_eq!(session.openid, MockWechat::openid_for(APPID, "flaky"));
        assert_eq!(mock.code2session_calls(), 2);
    }

    #[tokio::test]
    async fn errcodes_map_to_the_spec_errors_without_another_host() {
        let (mock, host) = start_mock().await;
        let cases = [
            (
                "invalid",
                Error::InvalidCode {
                    wechat_errcode: 40029,
                },
            ),
            (
                "risky",
                Error::WechatRiskyUser {
                    wechat_errcode: 40226,
                },
            ),
            (
                "limited",
                Error::RateLimited {
                    retry_after_secs: 1,
                    wechat_errcode: Some(45011),
                },
            ),
        ];
        for (code, expected) in &cases {
            let err = exchange(&[&host, &host], TIMEOUT, code).await.unwrap_err();
            assert_eq!(err, *expected, "{code}");
        }
        assert_eq!(mock.code2session_calls(), cases.len() as u64);
    }

    #[tokio::test]
    async fn a_used_code_is_invalid_code_40163() {
        let (_mock, host) = start_mock().await;
        // Two clients: each would remember its own exchange, WeChat remembers the code.
        exchange(&[&host], TIMEOUT, "frank").await.unwrap();
        let err = exchange(&[&host], TIMEOUT, "frank").await.unwrap_err();
        assert_eq!(
            err,
            Error::InvalidCode {
                wechat_errcode: 40163
            }
        );
    }

    #[test]
    fn other_errcodes_are_wechat_unavailable_with_the_errcode() {
        for errcode in [40013, 41008, 45009] {
            assert_eq!(
                map_errcode(errcode),
                Error::WechatUnavailable {
                    wechat_errcode: Some(errcode)
                }
            );
        }
        let answer = serde_json::json!({"errmsg": "ok", "openid": "o1"});
        assert_eq!(errcode_of(&answer), 0, "a missing errcode means 0");
    }

    #[tokio::test]
    async fn a_timeout_once_connected_is_wechat_timeout_and_not_resent() {
        let (mock, host) = start_mock().await;
        let err = exchange(&[&host, &host], Duration::from_millis(300), "slow")
            .await
            .unwrap_err();
        assert_eq!(err, Error::WechatTimeout);
        assert_eq!(mock.code2session_calls(), 1);
    }

    #[tokio::test]
    async fn a_body_that_is_not_json_is_wechat_unavailable_and_not_resent() {
        let (mock, host) = start_mock().await;
        let err = exchange(&[&host, &host], TIMEOUT, "garbage")
            .await
            .unwrap_err();
        assert_eq!(
            err,
            Error::WechatUnavailable {
                wechat_errcode: None
            }
        );
        assert_eq!(mock.code2session_calls(), 1);
    }

    #[tokio::test]
    async fn a_5xx_is_wechat_unavailable_and_the_code_is_not_resent() {
        let (mock, host) = start_mock().await;
        let (failing, hits) =
            scripted_host(|_| status_answer(StatusCode::INTERNAL_SERVER_ERROR, None)).await;
        let err = exchange(&[&failing, &host], TIMEOUT, "grace")
            .await
            .unwrap_err();
        assert_eq!(
            err,
            Error::WechatUnavailable {
                wechat_errcode: None
            }
        );
        assert_eq!(hits.load(Ordering::SeqCst), 1);
        assert_eq!(mock.code2session_calls(), 0);
    }

    #[tokio::test]
    async fn a_redirect_is_not_followed() {
        let (mock, host) = start_mock().await;
        let target = format!("{host}/sns/jscode2session?appid={APPID}&secret=x&js_code=heidi");
        let (redirecting, hits) = scripted_host(move |_| {
            status_answer(StatusCode::TEMPORARY_REDIRECT, Some(target.clone()))
        })
        .await;
        let err = exchange(&[&redirecting, &host], TIMEOUT, "heidi")
            .await
            .unwrap_err();
        assert_eq!(
            err,
            Error::WechatUnavailable {
                wechat_errcode: None
            }
        );
        assert_eq!(hits.load(Ordering::SeqCst), 1);
        assert_eq!(mock.code2session_calls(), 0);
    }

    #[tokio::test]
    async fn a_changed_timeout_applies_to_the_next_call() {
        let (mock, host) = start_mock().await;
        let client = client();
        let slow = client
            .exchange_code(
                &settings(&[&host], Duration::from_millis(300)),
                &app(),
                "slow",
            )
            .await;
        assert_eq!(slow.unwrap_err(), Error::WechatTimeout);
        let session = client
            .exchange_code(&settings(&[&host], TIMEOUT), &app(), "ivan")
            .await
            .unwrap();
        assert_eq!(session.openid, MockWechat::openid_for(APPID, "ivan"));
        assert_eq!(mock.code2session_calls(), 2);
    }

    async fn stable_token(hosts: &[&str], timeout: Duration) -> Result<Secret, Error> {
        let client = client();
        client
            .access_tokens
            .get(&client, &settings(hosts, timeout), &app())
            .await
    }

    #[tokio::test]
    async fn a_stable_token_timeout_fails_over_to_the_next_host() {
        let (mock, host) = start_mock().await;
        let (silent, hits) = silent_host().await;
        let token = stable_token(&[&silent, &host], Duration::from_millis(300))
            .await
            .unwrap();
        assert_eq!(Some(token.expose()), mock.access_token(APPID).as_deref());
        assert_eq!(hits.load(Ordering::SeqCst), 1);
        assert_eq!(mock.stable_token_calls(), 1);
        assert_eq!(mock.forced_refreshes(), 0);
    }

    #[tokio::test]
    async fn a_stable_token_answer_that_is_not_json_fails_over_to_the_next_host() {
        let (mock, host) = start_mock().await;
        let (garbage, hits) =
            scripted_host(|_| text_answer("<html>502 Bad Gateway</html>".into())).await;
        let token = stable_token(&[&garbage, &host], TIMEOUT).await.unwrap();
        assert_eq!(Some(token.expose()), mock.access_token(APPID).as_deref());
        assert_eq!(hits.load(Ordering::SeqCst), 1);
        assert_eq!(mock.stable_token_calls(), 1);
    }

    /// A host whose stable token is `t` and whose phone answer carries `watermark`.
    async fn phone_host(watermark: Value) -> String {
        let (host, _) = scripted_host(move |path| {
            let body = match path {
                "/cgi-bin/stable_token" => {
                    serde_json::json!({"access_token": "t", "expires_in": 7200})
                }
                _ => serde_json::json!({"errcode": 0, "phone_info": {
                    "phoneNumber": "13800000000",
                    "purePhoneNumber": "13800000000",
                    "countryCode": "86",
                    "watermark": watermark,
                }}),
            };
            text_answer(body.to_string())
        })
        .await;
        host
    }

    #[tokio::test]
    async fn a_phone_number_of_another_app_or_without_watermark_is_refused() {
        let phone = |host: String| async move {
            client()
                .phone_number(&settings(&[&host], TIMEOUT), &app(), "p-1")
                .await
        };
        let own =
            phone(phone_host(serde_json::json!({"appid": APPID, "timestamp": 1})).await).await;
        assert_eq!(own.unwrap().phone_number, "13800000000");
        for watermark in [
            serde_json::json!({"appid": "wx00000000000000b2", "timestamp": 1}),
            serde_json::json!({"timestamp": 1}),
            serde_json::json!({"appid": 7}),
            Value::Null,
        ] {
            let refused = phone(phone_host(watermark.clone()).await).await;
            assert_eq!(
                refused.unwrap_err(),
                Error::WechatUnavailable {
                    wechat_errcode: None
                },
                "{watermark}"
            );
        }
    }

    #[tokio::test]
    async fn an_expired_access_token_42001_is_replaced_once_like_a_dead_one() {
        let (mock, host) = start_mock().await;
        let client = client();
        let quick = settings(&[&host], TIMEOUT);
        client.phone_number(&quick, &app(), "pat-1").await.unwrap();
        let first = mock.access_token(APPID).unwrap();
        mock.expire_access_token(APPID);
        let phone = client.phone_number(&quick, &app(), "pat-2").await.unwrap();
        assert_eq!(phone.phone_number, MockWechat::phone_for("pat"));
        assert_ne!(mock.access_token(APPID).unwrap(), first);
        assert_eq!(mock.stable_token_calls(), 2);
        assert_eq!(
            mock.phone_calls(),
            3,
            "before, with the expired token, retried"
        );
        assert_eq!(mock.forced_refreshes(), 0);
    }

    #[tokio::test]
    async fn a_token_refused_again_after_the_retry_is_not_kept() {
        let (host, hits) = scripted_host(|path| {
            let body = match path {
                "/cgi-bin/stable_token" => {
                    serde_json::json!({"access_token": "t", "expires_in": 7200})
                }
                _ => serde_json::json!({"errcode": 40001, "errmsg": "invalid credential"}),
            };
            text_answer(body.to_string())
        })
        .await;
        let client = client();
        let quick = settings(&[&host], TIMEOUT);
        let err = client
            .phone_number(&quick, &app(), "q-1")
            .await
            .unwrap_err();
        assert_eq!(
            err,
            Error::WechatUnavailable {
                wechat_errcode: Some(40001)
            }
        );
        // Two stable-token and two phone requests: the call and its one retry.
        assert_eq!(hits.load(Ordering::SeqCst), 4);
        // The next caller does not start with the token WeChat refused twice.
        client
            .access_tokens
            .get(&client, &quick, &app())
            .await
            .unwrap();
        assert_eq!(hits.load(Ordering::SeqCst), 5);
    }

    /// Collects everything a `fmt` subscriber writes.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    // The single-threaded test runtime runs the mock's tasks and the client's on this thread,
    // so the thread's default subscriber sees every event: ours, hyper-util's and h2's.
    // reqwest logs through `log`, which only a global logger sees: the binary's
    // `tests/logs.rs` covers that at RUST_LOG=trace.
    #[tokio::test]
    async fn trace_logs_of_wechat_calls_hold_no_secret_code_or_session_key() {
        let captured = Captured::default();
        let writer = captured.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .finish();
        // tracing keeps one interest per callsite for the whole process. While a single
        // dispatcher is registered, it asks only the default of the first thread to reach a
        // callsite: a sibling test's thread, with no subscriber, would then mark hyper-util's
        // lines "never" for every thread (tokio-rs/tracing#3611). A second dispatcher, never any
        // thread's default, makes it ask every registered one, this test's among them.
        let _second = tracing::Dispatch::new(
            tracing_subscriber::fmt()
                .with_max_level(tracing::Level::TRACE)
                .with_writer(std::io::sink)
                .finish(),
        );
        let _guard = tracing::subscriber::set_default(subscriber);

        let (_mock, host) = start_mock().await;
        let (redirecting, _) =
            scripted_host(|_| status_answer(StatusCode::FOUND, Some("http://127.0.0.1:9/".into())))
                .await;
        let client = client();
        let quick = settings(&[&closed_host(), &host], TIMEOUT);
        let session = client
            .exchange_code(&quick, &app(), "leakcheck-1")
            .await
            .unwrap();
        let phone = client
            .phone_number(&quick, &app(), "leakphone-1")
            .await
            .unwrap();
        assert_eq!(phone.phone_number, MockWechat::phone_for("leakphone-1"));
        for (hosts, code) in [
            (vec![host.as_str()], "garbage"),
            (vec![host.as_str()], "leakcheck-2"),
            (vec![redirecting.as_str()], "leakcheck-3"),
        ] {
            let _ = client
                .exchange_code(&settings(&hosts, TIMEOUT), &app(), code)
                .await;
        }
        let _ = client
            .exchange_code(
                &settings(&[&host], Duration::from_millis(200)),
                &app(),
                "slow",
            )
            .await;
        // An app secret WeChat refuses is the operator's to mend: said at warn, with no secret.
        let (refusing, _) = scripted_host(|_| {
            Response::new(Full::new(Bytes::from_static(
                b"{\"errcode\":40125,\"errmsg\":\"invalid appsecret\"}",
            )))
        })
        .await;
        let refused = client
            .exchange_code(&settings(&[&refusing], TIMEOUT), &app(), "leakcheck-4")
            .await;
        assert_eq!(
            refused.err(),
            Some(Error::WechatUnavailable {
                wechat_errcode: Some(40125)
            })
        );

        let logs = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
        assert!(logs.contains("WeChat answered"), "{logs}");
        let refusal = logs
            .lines()
            .find(|line| line.contains("WeChat refused the call"))
            .unwrap_or_else(|| panic!("no refusal in the logs:\n{logs}"));
        assert!(refusal.contains("WARN"), "{refusal}");
        assert!(refusal.contains("errcode=40125"), "{refusal}");
        assert!(refusal.contains("check wechat.apps[].secret"), "{refusal}");
        assert!(logs.contains("connecting to"), "hyper-util's trace: {logs}");
        for secret in [
            APP_SECRET,
            "leakcheck",
            "leakphone",
            session.session_key.expose(),
            "js_code",
            "secret=",
            "access_token=",
        ] {
            assert!(!logs.contains(secret), "{secret} in the logs:\n{logs}");
        }
    }
}
