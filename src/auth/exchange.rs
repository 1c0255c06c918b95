//! Login codes are exchanged with WeChat once (SPEC §7): a code posted twice (a double tap, a
//! retry, two requests in flight) within five minutes gets the one exchange's outcome, and
//! every caller that succeeds gets its own session. Within a process, callers with the same
//! code share one exchange, run by a task of its own; with a shared store, replicas agree
//! through it on who exchanges the code, and the others wait for the outcome it leaves there,
//! sealed under the code itself.
//!
//! The exchange runs apart from the request that started it because a code that may have
//! reached WeChat must never be sent again: were it run inside that request, a client hanging
//! up would cancel the call half-way, and the next caller with the code (the same client,
//! retrying) would send it again and get `invalid_code`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use moka::Expiry;
use moka::future::Cache;
use moka::ops::compute::Op;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tracing::Instrument;

use super::store_failed;
use crate::config::{AppConfig, Secret, WechatConfig};
use crate::error::Error;
use crate::state::{Services, State};
use crate::store::{ExchangeClaim, seal};
use crate::wechat::Code2Session;

/// How long a successful exchange is remembered.
const SUCCESS_MEMORY: Duration = Duration::from_secs(300);

/// How long a failed exchange whose code may have reached WeChat is remembered; later callers
/// try again, and WeChat tells them whether the code is still good.
const FAILURE_MEMORY: Duration = Duration::from_secs(10);

/// The least time an outcome is left in a shared store, even one that is not remembered, so
/// that the replicas already waiting for it (polling every [`WAIT_POLL`]) read it.
const SHARED_AT_LEAST: Duration = Duration::from_secs(1);

/// How often a replica waiting on another's exchange looks for its outcome. The store is
/// polled rather than subscribed to because every backend can answer a read, and a login
/// waits at most one exchange.
const WAIT_POLL: Duration = Duration::from_millis(20);

/// The purpose under which codes are named and outcomes sealed.
const CODE: &str = "code";

type Outcome = Result<Arc<Code2Session>, Error>;

pub struct Exchanges {
    /// Keyed by the code's name: the cache never holds a usable code.
    flights: Cache<seal::Name, Flight>,
}

impl Default for Exchanges {
    fn default() -> Self {
        Exchanges {
            flights: Cache::builder()
                .expire_after(Remembered)
                .max_capacity(1_000_000)
                .build(),
        }
    }
}

/// One code's exchange, as its callers wait for it: `None` until it settles.
#[derive(Clone)]
struct Flight(watch::Receiver<Option<Settled>>);

#[derive(Clone)]
struct Settled {
    outcome: Outcome,
    /// How long later callers with the same code get this outcome rather than a new exchange.
    memory: Duration,
}

impl Flight {
    /// An exchange under way stays listed (at most [`SUCCESS_MEMORY`], far longer than its
    /// every attempt); once it settles, its task updates the entry to the outcome's own time.
    fn memory(&self) -> Duration {
        self.0
            .borrow()
            .as_ref()
            .map_or(SUCCESS_MEMORY, |settled| settled.memory)
    }
}

/// Each exchange is remembered for as long as its outcome says.
struct Remembered;

impl Expiry<seal::Name, Flight> for Remembered {
    fn expire_after_create(&self, _: &seal::Name, flight: &Flight, _: Instant) -> Option<Duration> {
        Some(flight.memory())
    }

    fn expire_after_update(
        &self,
        _: &seal::Name,
        flight: &Flight,
        _: Instant,
        _: Option<Duration>,
    ) -> Option<Duration> {
        Some(flight.memory())
    }
}

impl Exchanges {
    /// What WeChat answered for `code`: from the exchange this call starts, or from the one
    /// already under way or remembered.
    pub async fn exchange(&self, state: &State, app: &AppConfig, code: &str) -> Outcome {
        let secret = [app.appid.as_bytes(), b"\0", code.as_bytes()].concat();
        let name = seal::name(CODE, &secret);
        let entry = self
            .flights
            .entry(name)
            .or_insert_with(async {
                let (settle, flight) = watch::channel(None);
                let job = Job {
                    services: state.services.clone(),
                    wechat: state.config.wechat.clone(),
                    app: app.clone(),
                    code: code.to_string(),
                    name,
                    secret,
                };
                // Its lines carry the request id of the caller that started it.
                let run = job.run(settle, self.flights.clone());
                tokio::spawn(run.instrument(tracing::Span::current()));
                Flight(flight)
            })
            .await;
        let mut flight = entry.into_value().0;
        match flight.wait_for(Option::is_some).await {
            Ok(settled) => settled
                .as_ref()
                .map_or(Err(Error::Internal), |settled| settled.outcome.clone()),
            // The task ended without settling: it panicked, and said why in the log.
            Err(_) => Err(Error::Internal),
        }
    }
}

/// What an exchange needs, owned, so that it runs to its end whoever is still waiting.
struct Job {
    services: Arc<Services>,
    wechat: WechatConfig,
    app: AppConfig,
    code: String,
    name: seal::Name,
    secret: Vec<u8>,
}

/// The outcome as a shared store keeps it (sealed).
#[derive(Serialize, Deserialize)]
enum Kept {
    Exchanged {
        openid: String,
        unionid: Option<String>,
        session_key: String,
    },
    Failed(Error),
}

impl Job {
    async fn run(self, settle: watch::Sender<Option<Settled>>, flights: Cache<seal::Name, Flight>) {
        let name = self.name;
        let settled = self.settle().await;
        settle.send_replace(Some(settled));
        // Re-inserting the entry sets its expiry from the outcome; an entry that is no longer
        // this flight's (evicted, then started again) is left alone.
        let ours = Flight(settle.subscribe());
        flights
            .entry(name)
            .and_compute_with(|current| {
                let op = match current {
                    Some(entry) if entry.value().0.same_channel(&ours.0) => Op::Put(ours),
                    _ => Op::Nop,
                };
                std::future::ready(op)
            })
            .await;
    }

    async fn settle(&self) -> Settled {
        let wechat = &self.wechat;
        let store = &self.services.store;
        if !store.shared() {
            return self.exchange().await;
        }
        // Long enough for the claimant's every attempt: each host, each busy retry.
        let claim_ttl = wechat.timeout * 3 * wechat.hosts.len() as u32 + Duration::from_secs(2);
        let give_up = Instant::now() + claim_ttl * 2;
        loop {
            let claim = match store.claim_exchange(self.name, claim_ttl).await {
                Ok(claim) => claim,
                // Nothing was sent: the next caller may try.
                Err(err) => return forgotten(store_failed(err)),
            };
            match claim {
                ExchangeClaim::Mine => {
                    let settled = self.exchange().await;
                    self.share(&settled).await;
                    return settled;
                }
                ExchangeClaim::Done(sealed) => return self.open(&sealed),
                ExchangeClaim::Theirs if Instant::now() < give_up => {
                    tokio::time::sleep(WAIT_POLL).await;
                }
                // The claimant may have sent the code and died: it is not sent again.
                ExchangeClaim::Theirs => {
                    return Settled {
                        outcome: Err(Error::WechatTimeout),
                        memory: FAILURE_MEMORY,
                    };
                }
            }
        }
    }

    /// Sends the code to WeChat. A success's session_key is stored at once: WeChat rotated the
    /// user's key as it answered, whatever becomes of the login (a refused signature, a hook
    /// that says no), and a remembered exchange, which holds an older key, never stores it.
    async fn exchange(&self) -> Settled {
        let outcome = self
            .services
            .wechat
            .exchange_code(&self.wechat, &self.app, &self.code)
            .await
            .map(Arc::new);
        if let Ok(session) = &outcome
            && let Err(err) = self
                .services
                .store
                .put_session_key(&self.app.appid, &session.openid, &session.session_key)
                .await
        {
            return Settled {
                outcome: Err(store_failed(err)),
                memory: FAILURE_MEMORY,
            };
        }
        remembered(outcome)
    }

    /// Leaves the outcome in the shared store for the replicas waiting on it.
    async fn share(&self, settled: &Settled) {
        let kept = match &settled.outcome {
            Ok(session) => Kept::Exchanged {
                openid: session.openid.clone(),
                unionid: session.unionid.clone(),
                session_key: session.session_key.expose().to_string(),
            },
            Err(err) => Kept::Failed(err.clone()),
        };
        let Ok(json) = serde_json::to_vec(&kept) else {
            tracing::error!("a code exchange's outcome could not be encoded");
            return;
        };
        let sealed = seal::seal(CODE, &self.secret, &json);
        let memory = settled.memory.max(SHARED_AT_LEAST);
        if let Err(err) = self
            .services
            .store
            .finish_exchange(self.name, &sealed, memory)
            .await
        {
            tracing::warn!(error = %err, "could not share a code exchange's outcome");
        }
    }

    /// The outcome another replica left in the store.
    fn open(&self, sealed: &[u8]) -> Settled {
        let Some(kept) = seal::open(CODE, &self.secret, sealed)
            .and_then(|json| serde_json::from_slice::<Kept>(&json).ok())
        else {
            return forgotten(Error::Internal);
        };
        remembered(match kept {
            Kept::Exchanged {
                openid,
                unionid,
                session_key,
            } => Ok(Arc::new(Code2Session {
                openid,
                unionid,
                session_key: Secret::new(session_key),
            })),
            Kept::Failed(err) => Err(err),
        })
    }
}

/// WeChat's outcome, remembered as long as its code must not be sent again: a success or any
/// failure after which the code may have reached WeChat. `-1` (system busy) is the one answer
/// that says WeChat did not use the code.
fn remembered(outcome: Outcome) -> Settled {
    let memory = match &outcome {
        Ok(_) => SUCCESS_MEMORY,
        Err(Error::WechatBusy { .. }) => Duration::ZERO,
        Err(_) => FAILURE_MEMORY,
    };
    Settled { outcome, memory }
}

/// A failure of the gateway's own before anything reached WeChat: shared with the callers
/// waiting now, not remembered.
fn forgotten(err: Error) -> Settled {
    Settled {
        outcome: Err(err),
        memory: Duration::ZERO,
    }
}
