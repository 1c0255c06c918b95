//! Login codes are exchanged with WeChat once (SPEC §7): a code posted twice (a double tap, a
//! retry, two requests in flight) within five minutes gets the one exchange's outcome, and
//! every caller that succeeds gets its own session. Within a process, concurrent callers are
//! coalesced by a cache; with a shared store, replicas agree through it on who exchanges the
//! code, and the others wait for the outcome it leaves there, sealed under the code itself.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::store_failed;
use crate::config::{AppConfig, Secret};
use crate::error::Error;
use crate::state::State;
use crate::store::{ExchangeClaim, seal};
use crate::wechat::Code2Session;

/// How long a successful exchange is remembered.
const SUCCESS_MEMORY: Duration = Duration::from_secs(300);

/// How long a failed exchange is left for replicas waiting on it; later callers try again.
const FAILURE_MEMORY: Duration = Duration::from_secs(10);

/// How often a replica waiting on another's exchange looks for its outcome. The store is
/// polled rather than subscribed to because every backend can answer a read, and a login
/// waits at most one exchange.
const WAIT_POLL: Duration = Duration::from_millis(20);

/// The purpose under which codes are named and outcomes sealed.
const CODE: &str = "code";

pub struct Exchanges {
    /// Keyed by the code's name: the cache never holds a usable code.
    cache: moka::future::Cache<seal::Name, Arc<Code2Session>>,
}

impl Default for Exchanges {
    fn default() -> Self {
        Exchanges {
            cache: moka::future::Cache::builder()
                .time_to_live(SUCCESS_MEMORY)
                .max_capacity(1_000_000)
                .build(),
        }
    }
}

/// The outcome as the store keeps it (sealed).
#[derive(Serialize, Deserialize)]
enum Outcome {
    Exchanged {
        openid: String,
        unionid: Option<String>,
        session_key: String,
    },
    Failed(Error),
}

impl Exchanges {
    pub async fn exchange(
        &self,
        state: &State,
        app: &AppConfig,
        code: &str,
    ) -> Result<Arc<Code2Session>, Error> {
        let secret = [app.appid.as_bytes(), b"\0", code.as_bytes()].concat();
        let name = seal::name(CODE, &secret);
        self.cache
            .try_get_with(name, exchange_once(state, app, code, name, &secret))
            .await
            .map_err(|shared: Arc<Error>| (*shared).clone())
    }
}

async fn exchange_once(
    state: &State,
    app: &AppConfig,
    code: &str,
    name: seal::Name,
    secret: &[u8],
) -> Result<Arc<Code2Session>, Error> {
    let wechat = &state.config.wechat;
    let store = &state.services.store;
    if !store.shared() {
        return wechat_exchange(state, app, code).await;
    }
    // Long enough for the claimant's every attempt: each host, each busy retry.
    let claim_ttl = wechat.timeout * 3 * wechat.hosts.len() as u32 + Duration::from_secs(2);
    let give_up = Instant::now() + claim_ttl * 2;
    loop {
        match store
            .claim_exchange(name, claim_ttl)
            .await
            .map_err(store_failed)?
        {
            ExchangeClaim::Mine => {
                let outcome = wechat_exchange(state, app, code).await;
                let (kept, memory) = match &outcome {
                    Ok(session) => (
                        Outcome::Exchanged {
                            openid: session.openid.clone(),
                            unionid: session.unionid.clone(),
                            session_key: session.session_key.expose().to_string(),
                        },
                        SUCCESS_MEMORY,
                    ),
                    Err(err) => (Outcome::Failed(err.clone()), FAILURE_MEMORY),
                };
                let sealed = seal::seal(
                    CODE,
                    secret,
                    &serde_json::to_vec(&kept).map_err(|_| Error::Internal)?,
                );
                if let Err(err) = store.finish_exchange(name, &sealed, memory).await {
                    tracing::warn!(error = %err, "could not share a code exchange's outcome");
                }
                return outcome;
            }
            ExchangeClaim::Done(sealed) => {
                let outcome: Outcome = seal::open(CODE, secret, &sealed)
                    .and_then(|json| serde_json::from_slice(&json).ok())
                    .ok_or(Error::Internal)?;
                return match outcome {
                    Outcome::Exchanged {
                        openid,
                        unionid,
                        session_key,
                    } => Ok(Arc::new(Code2Session {
                        openid,
                        unionid,
                        session_key: Secret::new(session_key),
                    })),
                    Outcome::Failed(err) => Err(err),
                };
            }
            ExchangeClaim::Theirs if Instant::now() < give_up => {
                tokio::time::sleep(WAIT_POLL).await;
            }
            ExchangeClaim::Theirs => return Err(Error::WechatTimeout),
        }
    }
}

async fn wechat_exchange(
    state: &State,
    app: &AppConfig,
    code: &str,
) -> Result<Arc<Code2Session>, Error> {
    state
        .services
        .wechat
        .exchange_code(&state.config.wechat, app, code)
        .await
        .map(Arc::new)
}
