//! The WeChat client (SPEC §7): hosts tried in order, retries that never resend a code that may
//! have reached WeChat, errcode mapping, and the exchange cache that makes a double-posted code
//! reach WeChat once.

pub mod crypto;

use std::sync::Arc;
use std::time::{Duration, Instant};

use percent_encoding::{NON_ALPHANUMERIC, utf8_percent_encode};
use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::config::{AppConfig, Secret, WechatConfig};
use crate::error::Error;

/// What code2Session answered for one user. The session_key is a [`Secret`]: it never leaves
/// the gateway.
#[derive(Debug, Clone)]
pub struct Code2Session {
    pub openid: String,
    pub unionid: Option<String>,
    pub session_key: Secret,
}

/// How long a successful exchange is remembered, so a double tap or a client retry with the
/// same code gets a session instead of WeChat's "code been used" (SPEC §7).
const EXCHANGE_MEMORY: Duration = Duration::from_secs(300);

/// Pauses before the two retries of an answer of -1 (system busy): about a second in all.
const BUSY_BACKOFF: [Duration; 2] = [Duration::from_millis(250), Duration::from_millis(600)];

/// How long a busy WeChat asks clients to wait, in seconds.
const BUSY_RETRY_AFTER_SECS: u64 = 1;

/// Long-lived: kept across config reloads so the exchange cache and the connection pool survive.
pub struct WechatClient {
    http: reqwest::Client,
    /// Keyed by appid and the SHA-256 of the code: the cache never holds a usable code.
    exchanges: moka::future::Cache<(String, [u8; 32]), Arc<Code2Session>>,
}

impl Default for WechatClient {
    fn default() -> Self {
        Self::new()
    }
}

/// The fields of code2Session's answer; `errcode` absent means 0.
#[derive(Deserialize)]
struct Code2SessionAnswer {
    #[serde(default)]
    errcode: i64,
    openid: Option<String>,
    session_key: Option<String>,
    unionid: Option<String>,
}

/// Why one attempt at one host failed, before it is turned into an [`Error`].
enum Attempt {
    /// The connection could not be made: nothing reached WeChat, the next host may be tried.
    Unreachable,
    Failed(Error),
}

impl WechatClient {
    pub fn new() -> Self {
        // reqwest is built without a bundled crypto provider so that ring (already needed by
        // rustls elsewhere in the tree) is the only one compiled in; it must be installed once.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let http = reqwest::Client::builder()
            .no_proxy()
            .build()
            .expect("an HTTP client with default settings always builds");
        WechatClient {
            http,
            exchanges: moka::future::Cache::builder()
                .time_to_live(EXCHANGE_MEMORY)
                .max_capacity(1_000_000)
                .build(),
        }
    }

    /// Exchanges a `wx.login` code. The same (app, code) within 5 minutes reaches WeChat once:
    /// concurrent callers share the one exchange's outcome, and a success is remembered.
    pub async fn code2session(
        &self,
        settings: &WechatConfig,
        app: &AppConfig,
        code: &str,
    ) -> Result<Arc<Code2Session>, Error> {
        let key = (app.appid.clone(), Sha256::digest(code.as_bytes()).into());
        self.exchanges
            .try_get_with(key, async {
                self.exchange_code(settings, app, code).await.map(Arc::new)
            })
            .await
            .map_err(|shared: Arc<Error>| (*shared).clone())
    }

    /// One exchange with WeChat, without the cache.
    pub async fn exchange_code(
        &self,
        settings: &WechatConfig,
        app: &AppConfig,
        code: &str,
    ) -> Result<Code2Session, Error> {
        let query = format!(
            "appid={}&secret={}&js_code={}&grant_type=authorization_code",
            encode(&app.appid),
            encode(app.secret.expose()),
            encode(code),
        );
        for host in &settings.hosts {
            let url = format!("{host}/sns/jscode2session?{query}");
            let mut busy_retries = BUSY_BACKOFF.iter();
            loop {
                let answer = match self.get(&url, host, settings.timeout).await {
                    Ok(answer) => answer,
                    Err(Attempt::Unreachable) => break,
                    Err(Attempt::Failed(err)) => return Err(err),
                };
                let answer: Code2SessionAnswer =
                    serde_json::from_slice(&answer).map_err(|_| Error::WechatUnavailable {
                        wechat_errcode: None,
                    })?;
                match answer.errcode {
                    0 => {}
                    // -1 means WeChat did not look at the code: retrying cannot use it twice.
                    -1 => match busy_retries.next() {
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
                    errcode => return Err(map_errcode(errcode)),
                }
                return match (answer.openid, answer.session_key) {
                    (Some(openid), Some(session_key)) if !openid.is_empty() => Ok(Code2Session {
                        openid,
                        unionid: answer.unionid.filter(|unionid| !unionid.is_empty()),
                        session_key: Secret::new(session_key),
                    }),
                    _ => Err(Error::WechatUnavailable {
                        wechat_errcode: None,
                    }),
                };
            }
        }
        tracing::warn!(api = "code2session", "no WeChat host could be reached");
        Err(Error::WechatUnavailable {
            wechat_errcode: None,
        })
    }

    /// One GET, answered with its body. The URL carries the app secret and the code, so it
    /// is never logged and reqwest's errors, which would print it, are logged without it.
    async fn get(&self, url: &str, host: &str, timeout: Duration) -> Result<Vec<u8>, Attempt> {
        let started = Instant::now();
        let outcome = async {
            let response = self.http.get(url).timeout(timeout).send().await?;
            let status = response.status();
            let body = response.bytes().await?;
            Ok::<_, reqwest::Error>((status, body))
        }
        .await;
        let elapsed_ms = started.elapsed().as_millis() as u64;
        match outcome {
            Ok((status, body)) if status.is_success() => {
                tracing::debug!(api = "code2session", host, %status, elapsed_ms, "WeChat answered");
                Ok(body.to_vec())
            }
            Ok((status, _)) => {
                tracing::warn!(api = "code2session", host, %status, elapsed_ms, "WeChat answered with an HTTP error");
                Err(Attempt::Failed(Error::WechatUnavailable {
                    wechat_errcode: None,
                }))
            }
            Err(err) => {
                let err = err.without_url();
                if err.is_connect() {
                    tracing::warn!(api = "code2session", host, error = %err, "WeChat host unreachable");
                    Err(Attempt::Unreachable)
                } else if err.is_timeout() {
                    tracing::warn!(
                        api = "code2session",
                        host,
                        elapsed_ms,
                        "WeChat did not answer in time"
                    );
                    Err(Attempt::Failed(Error::WechatTimeout))
                } else {
                    tracing::warn!(api = "code2session", host, error = %err, "WeChat request failed");
                    Err(Attempt::Failed(Error::WechatUnavailable {
                        wechat_errcode: None,
                    }))
                }
            }
        }
    }
}

fn encode(value: &str) -> percent_encoding::PercentEncode<'_> {
    utf8_percent_encode(value, NON_ALPHANUMERIC)
}

/// SPEC §7's mapping of WeChat's errcodes; -1 is handled by the retry loop.
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
