//! The WeChat client (SPEC §7): hosts tried in order, retries that never resend a code that may
//! have reached WeChat, errcode mapping, stable access tokens, and phone numbers.

mod access_token;
pub mod crypto;

use std::borrow::Cow;
use std::sync::Arc;
use std::time::{Duration, Instant};

use percent_encoding::{NON_ALPHANUMERIC, utf8_percent_encode};
use reqwest::RequestBuilder;
use serde::Deserialize;
use serde_json::Value;

use crate::config::{AppConfig, Secret, WechatConfig};
use crate::error::Error;
use crate::metrics::Metrics;
use access_token::AccessTokens;

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
    http: reqwest::Client,
    access_tokens: AccessTokens,
    metrics: Arc<Metrics>,
}

impl WechatClient {
    pub fn new(metrics: Arc<Metrics>) -> Self {
        // reqwest is built without a bundled crypto provider so that ring is the only one
        // compiled in; it must be installed once, before any client is built.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let http = reqwest::Client::builder()
            .no_proxy()
            .build()
            .expect("an HTTP client with default settings always builds");
        WechatClient {
            http,
            access_tokens: AccessTokens::default(),
            metrics,
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
        let query = format!(
            "appid={}&secret={}&js_code={}&grant_type=authorization_code",
            encode(&app.appid),
            encode(app.secret.expose()),
            encode(code),
        );
        let answer = self
            .call("code2session", settings, Replay::Never, |host| {
                self.http.get(format!("{host}/sns/jscode2session?{query}"))
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
                .call("phone", settings, Replay::Never, |host| {
                    self.http
                        .post(format!(
                            "{host}/wxa/business/getuserphonenumber?access_token={}",
                            encode(token.expose())
                        ))
                        .header(reqwest::header::CONTENT_TYPE, "application/json")
                        .body(body.clone())
                })
                .await?;
            // WeChat refused the token before looking at the code: sending the code again
            // with a fresh token cannot use it twice.
            if !retried && DEAD_ACCESS_TOKEN.contains(&errcode_of(&answer)) {
                self.access_tokens.invalidate(&app.appid, &token);
                retried = true;
                continue;
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
            .call("stable_token", settings, Replay::Safe, |host| {
                self.http
                    .post(format!("{host}/cgi-bin/stable_token"))
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
        request: impl Fn(&str) -> RequestBuilder,
    ) -> Result<Value, Error> {
        let mut last_failure = Failure::Unreachable;
        for host in &settings.hosts {
            let mut busy_retries = BUSY_BACKOFF.iter();
            loop {
                let started = Instant::now();
                let outcome = self
                    .attempt(api, host, request(host), settings.timeout)
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
                tracing::warn!(api, host, elapsed_ms, error = %err, "WeChat request failed");
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
        other => Error::WechatUnavailable {
            wechat_errcode: Some(other),
        },
    }
}
