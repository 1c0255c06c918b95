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
//!
//! A successful exchange is handed to its callers while its session_key is still being
//! stored, and each caller waits for that write only when it is about to answer
//! ([`Exchanged::key_stored`]). A login's own write (its session) is then asked for while the
//! key's is still queued, and the embedded store usually commits both in one transaction: a
//! login waits for one commit, not two in a row.

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
    /// The outcome is a success whose session_key is still being stored. Once stored, this
    /// turns false; if storing fails, the outcome turns into that failure.
    storing_key: bool,
}

/// A successful exchange, as a caller gets it.
pub struct Exchanged {
    pub session: Arc<Code2Session>,
    flight: Flight,
}

impl Exchanged {
    /// Waits until the session_key of this exchange is stored. A login answers only after
    /// this: the key it was given must be there for the open-data calls that follow.
    pub async fn key_stored(mut self) -> Result<(), Error> {
        let settled = self
            .flight
            .0
            .wait_for(|settled| settled.as_ref().is_some_and(|settled| !settled.storing_key))
            .await;
        match settled {
            Ok(settled) => settled.as_ref().map_or(Err(Error::Internal), |settled| {
                settled.outcome.clone().map(drop)
            }),
            // The task ended while storing: it panicked, and said why in the log.
            Err(_) => Err(Error::Internal),
        }
    }
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
    pub async fn exchange(
        &self,
        state: &State,
        app: &AppConfig,
        code: &str,
    ) -> Result<Exchanged, Error> {
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
        let Flight(mut flight) = entry.into_value();
        let session = match flight.wait_for(Option::is_some).await {
            Ok(settled) => settled
                .as_ref()
                .map_or(Err(Error::Internal), |settled| settled.outcome.clone())?,
            // The task ended without settling: it panicked, and said why in the log.
            Err(_) => return Err(Error::Internal),
        };
        Ok(Exchanged {
            session,
            flight: Flight(flight),
        })
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
        let mut settled = self.settle().await;
        let storing_key = settled.storing_key;
        settle.send_replace(Some(settled.clone()));
        // The callers go on with the outcome while the key is stored. The write is asked for
        // in the same poll that hands the outcome over, so that it is queued ahead of the
        // writes the callers go on to ask for.
        if storing_key {
            self.store_key(&mut settled).await;
            settle.send_replace(Some(settled));
        }
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
        let mut waited = false;
        loop {
            let claim = match store.claim_exchange(self.name, claim_ttl).await {
                Ok(claim) => claim,
                // Nothing was sent: the next caller may try.
                Err(err) => return forgotten(store_failed(err)),
            };
            match claim {
                // The claim this replica waited on ran out with no outcome: its claimant may
                // have sent the code and died. The code is not sent again, and the failure is
                // shared, so that the other replicas waiting do not send it either.
                ExchangeClaim::Mine if waited => {
                    let settled = Settled {
                        outcome: Err(Error::WechatTimeout),
                        memory: FAILURE_MEMORY,
                        storing_key: false,
                    };
                    self.share(&settled).await;
                    return settled;
                }
                ExchangeClaim::Mine => {
                    let mut settled = self.exchange().await;
                    // Replicas that open the shared outcome take its key as stored.
                    self.store_key(&mut settled).await;
                    self.share(&settled).await;
                    return settled;
                }
                ExchangeClaim::Done(sealed) => return self.open(&sealed),
                ExchangeClaim::Theirs if Instant::now() < give_up => {
                    waited = true;
                    tokio::time::sleep(WAIT_POLL).await;
                }
                // The claimant may have sent the code and died: it is not sent again.
                ExchangeClaim::Theirs => {
                    return Settled {
                        outcome: Err(Error::WechatTimeout),
                        memory: FAILURE_MEMORY,
                        storing_key: false,
                    };
                }
            }
        }
    }

    /// Sends the code to WeChat. A success's session_key is to be stored
    /// ([`Job::store_key`]).
    async fn exchange(&self) -> Settled {
        let outcome = self
            .services
            .wechat
            .exchange_code(&self.wechat, &self.app, &self.code)
            .await
            .map(Arc::new);
        let storing_key = outcome.is_ok();
        Settled {
            storing_key,
            ..remembered(outcome)
        }
    }

    /// Stores the session_key of a success whose key is not stored yet. It is stored by this
    /// task, whatever becomes of the login (a refused signature, a hook that says no, a client
    /// that hung up): WeChat rotated the user's key as it answered. A remembered exchange,
    /// which holds an older key, never stores it.
    async fn store_key(&self, settled: &mut Settled) {
        if !settled.storing_key {
            return;
        }
        settled.storing_key = false;
        let Ok(session) = &settled.outcome else {
            return;
        };
        if let Err(err) = self
            .services
            .store
            .put_session_key(&self.app.appid, &session.openid, &session.session_key)
            .await
        {
            settled.outcome = Err(store_failed(err));
            settled.memory = FAILURE_MEMORY;
        }
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
    Settled {
        outcome,
        memory,
        storing_key: false,
    }
}

/// A failure of the gateway's own before anything reached WeChat: shared with the callers
/// waiting now, not remembered.
fn forgotten(err: Error) -> Settled {
    Settled {
        outcome: Err(err),
        memory: Duration::ZERO,
        storing_key: false,
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use async_trait::async_trait;
    use futures_util::FutureExt;
    use tokio::net::TcpListener;
    use tokio::sync::Semaphore;

    use super::*;
    use crate::config::WechatHost;
    use crate::mock::wechat::MockWechat;
    use crate::store::{Digest, MemoryStore, Revoked, Rotation, SessionRecord, Store, StoreError};

    const APPID: &str = "wx0000000000000e01";

    /// A memory store that lists the writes asked of it, and holds each session_key write
    /// until the test lets it through, then fails it if told to.
    struct HeldKeys {
        inner: MemoryStore,
        asked: Mutex<Vec<&'static str>>,
        release: Semaphore,
        fail: bool,
    }

    impl HeldKeys {
        fn new(fail: bool) -> Arc<HeldKeys> {
            Arc::new(HeldKeys {
                inner: MemoryStore::default(),
                asked: Mutex::new(Vec::new()),
                release: Semaphore::new(0),
                fail,
            })
        }

        fn asked(&self) -> Vec<&'static str> {
            self.asked.lock().unwrap().clone()
        }
    }

    #[async_trait]
    impl Store for HeldKeys {
        async fn put_session_key(
            &self,
            appid: &str,
            openid: &str,
            session_key: &Secret,
        ) -> Result<(), StoreError> {
            self.asked.lock().unwrap().push("session_key");
            self.release.acquire().await.unwrap().forget();
            if self.fail {
                return Err(StoreError("the disk is full".into()));
            }
            self.inner.put_session_key(appid, openid, session_key).await
        }

        async fn session_key(
            &self,
            appid: &str,
            openid: &str,
        ) -> Result<Option<Secret>, StoreError> {
            self.inner.session_key(appid, openid).await
        }

        async fn create_session(
            &self,
            session: &SessionRecord,
            refresh: Digest,
            access_until: u64,
        ) -> Result<(), StoreError> {
            self.asked.lock().unwrap().push("session");
            self.inner
                .create_session(session, refresh, access_until)
                .await
        }

        async fn refresh_session(
            &self,
            refresh: Digest,
            now: u64,
        ) -> Result<Option<SessionRecord>, StoreError> {
            self.inner.refresh_session(refresh, now).await
        }

        async fn rotate_refresh(
            &self,
            old: Digest,
            new: Digest,
            sealed_successor: &[u8],
            access_until: u64,
            now: u64,
        ) -> Result<Rotation, StoreError> {
            self.inner
                .rotate_refresh(old, new, sealed_successor, access_until, now)
                .await
        }

        async fn revoke_session(&self, sid: &str, until: u64) -> Result<u64, StoreError> {
            self.inner.revoke_session(sid, until).await
        }

        async fn revoked_since(&self, cursor: u64) -> Result<(Vec<Revoked>, u64), StoreError> {
            self.inner.revoked_since(cursor).await
        }

        async fn claim_exchange(
            &self,
            code: Digest,
            ttl: Duration,
        ) -> Result<ExchangeClaim, StoreError> {
            self.inner.claim_exchange(code, ttl).await
        }

        async fn finish_exchange(
            &self,
            code: Digest,
            sealed_outcome: &[u8],
            ttl: Duration,
        ) -> Result<(), StoreError> {
            self.inner.finish_exchange(code, sealed_outcome, ttl).await
        }

        async fn ping(&self) -> Result<(), StoreError> {
            self.inner.ping().await
        }
    }

    /// A state whose store is `store`, talking to a mock WeChat of its own.
    async fn state_with(store: Arc<HeldKeys>) -> (State, Arc<MockWechat>) {
        let wechat = MockWechat::new();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let host = listener.local_addr().unwrap();
        tokio::spawn(wechat.clone().serve(listener));
        let mut config = crate::auth::tests::config_with_app(APPID);
        config.wechat.hosts = vec![WechatHost::new(&format!("http://{host}")).unwrap()];
        let services = Services::open(&config).await.unwrap();
        let services = Arc::new(Services { store, ..services });
        (State::new(config, services).unwrap(), wechat)
    }

    fn session(sid: &str) -> SessionRecord {
        SessionRecord {
            sid: sid.into(),
            appid: APPID.into(),
            openid: "o".into(),
            unionid: None,
            claims: serde_json::Map::new(),
            expires_at: crate::token::unix_now() + 60,
        }
    }

    #[tokio::test]
    async fn a_caller_goes_on_while_the_key_is_stored_and_answers_once_it_is() {
        let store = HeldKeys::new(false);
        let (state, _wechat) = state_with(store.clone()).await;
        let app = &state.config.wechat.apps[0];

        // The key's write is held until the test lets it through: a caller that waited for it
        // here would never be answered.
        let exchanging = state.services.exchanges.exchange(&state, app, "ivan");
        let exchanged = tokio::time::timeout(Duration::from_secs(10), exchanging)
            .await
            .expect("the caller waited for the session_key to be stored")
            .unwrap();
        assert_eq!(
            exchanged.session.openid,
            MockWechat::openid_for(APPID, "ivan")
        );
        // The key's write was asked for before the caller went on: the caller's own write
        // comes after it, and may share its commit.
        assert_eq!(store.asked(), ["session_key"]);
        store
            .create_session(&session("s-1"), [1; 32], 0)
            .await
            .unwrap();
        assert_eq!(store.asked(), ["session_key", "session"]);

        let mut stored = Box::pin(exchanged.key_stored());
        assert!((&mut stored).now_or_never().is_none());
        store.release.add_permits(1);
        assert_eq!(stored.await, Ok(()));
        let kept = state
            .services
            .store
            .session_key(APPID, &MockWechat::openid_for(APPID, "ivan"))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            kept.expose(),
            MockWechat::session_key_for(APPID, "ivan").expose()
        );
    }

    #[tokio::test]
    async fn a_key_that_cannot_be_stored_fails_the_caller_and_its_retry() {
        let store = HeldKeys::new(true);
        let (state, wechat) = state_with(store.clone()).await;
        let app = &state.config.wechat.apps[0];

        let exchanged = state
            .services
            .exchanges
            .exchange(&state, app, "judy")
            .await
            .unwrap();
        store.release.add_permits(1);
        assert_eq!(exchanged.key_stored().await, Err(Error::Internal));
        // The code reached WeChat: a retry gets the failure, and the code is not sent again.
        let retry = state.services.exchanges.exchange(&state, app, "judy").await;
        assert_eq!(retry.err(), Some(Error::Internal));
        assert_eq!(wechat.code2session_calls(), 1);
    }
}
