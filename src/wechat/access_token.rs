//! Access tokens, one per app, from WeChat's stable-token API: cached until shortly before they
//! expire, fetched by one caller while the others wait for that fetch's outcome, and dropped
//! only when WeChat reports exactly that token dead.
//!
//! Where tokens are kept is a [`TokenCache`]. The one in use is per process: replicas each
//! hold their own copy of the *same* token, since the stable-token API without `force_refresh`
//! answers every caller with the token WeChat currently holds for the app, so replicas never
//! invalidate each other's. A cache in a store shared by the replicas would spare each of them
//! its own fetch: it needs only the three operations of the trait.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use async_trait::async_trait;

use super::WechatClient;
use crate::config::{AppConfig, Secret, WechatConfig};
use crate::error::Error;

/// A token is replaced this long before WeChat says it expires (SPEC §7).
const REFRESH_MARGIN: Duration = Duration::from_secs(300);

/// WeChat's tokens last two hours; an answer that claims more is believed for a day at most,
/// which also keeps the moment of renewal within what an `Instant` can hold.
const LONGEST_KEPT: Duration = Duration::from_secs(24 * 3600);

/// Where fetched access tokens are kept between calls. A cache that cannot answer (a store
/// that is down) answers `None` and keeps nothing: the token is then fetched from WeChat.
#[async_trait]
pub(super) trait TokenCache: Send + Sync {
    /// The app's token, unless none is kept or it is due for renewal.
    async fn fresh(&self, appid: &str) -> Option<Secret>;

    /// Keeps `token` as the app's token for `fresh_for`.
    async fn keep(&self, appid: &str, token: &Secret, fresh_for: Duration);

    /// Forgets the app's token if it is still `dead`: one fetched since stays.
    async fn forget(&self, appid: &str, dead: &Secret);
}

/// The per-process [`TokenCache`]. A map behind a lock rather than a `moka` cache: it holds one
/// entry per configured app, each with its own lifetime, and forgetting must compare the
/// entry with the dead token under the same lock.
#[derive(Default)]
pub(super) struct LocalTokens {
    tokens: Mutex<HashMap<String, (Secret, Instant)>>,
}

impl LocalTokens {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, (Secret, Instant)>> {
        // No code that can panic runs under the lock: the map is always whole.
        self.tokens.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[async_trait]
impl TokenCache for LocalTokens {
    async fn fresh(&self, appid: &str) -> Option<Secret> {
        self.lock()
            .get(appid)
            .filter(|(_, refresh_at)| *refresh_at > Instant::now())
            .map(|(token, _)| token.clone())
    }

    async fn keep(&self, appid: &str, token: &Secret, fresh_for: Duration) {
        self.lock().insert(
            appid.to_string(),
            (token.clone(), Instant::now() + fresh_for),
        );
    }

    async fn forget(&self, appid: &str, dead: &Secret) {
        let mut tokens = self.lock();
        if tokens.get(appid).is_some_and(|(token, _)| token == dead) {
            tokens.remove(appid);
        }
    }
}

pub(super) struct AccessTokens {
    cache: Arc<dyn TokenCache>,
    fetches: Mutex<HashMap<String, Arc<Fetches>>>,
}

/// One app's fetches: one at a time, each one's outcome handed to every caller that waited
/// for it, failure included. Waiting callers do not fetch again in turn, which during an
/// outage would make the last of N callers wait N fetches; a caller that arrives after an
/// outcome was handed out tries again.
#[derive(Default)]
struct Fetches {
    /// How many fetches have finished. A caller reads it before waiting for `last`: if it has
    /// moved by the time the caller holds the lock, a fetch finished while it waited.
    finished: AtomicU64,
    /// Held across a fetch; the outcome of the latest one.
    last: tokio::sync::Mutex<Option<Result<Secret, Error>>>,
}

impl AccessTokens {
    pub(super) fn new(cache: Arc<dyn TokenCache>) -> Self {
        AccessTokens {
            cache,
            fetches: Mutex::default(),
        }
    }

    fn fetches(&self, appid: &str) -> Arc<Fetches> {
        self.fetches
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(appid.to_string())
            .or_default()
            .clone()
    }

    /// The app's current token, fetched when there is none or it is due for renewal.
    pub(super) async fn get(
        &self,
        client: &WechatClient,
        settings: &WechatConfig,
        app: &AppConfig,
    ) -> Result<Secret, Error> {
        let fetches = self.fetches(&app.appid);
        // Read before looking at the cache: a fetch that finishes after the cache was found
        // empty then shows up as a moved count.
        let seen = fetches.finished.load(Ordering::SeqCst);
        if let Some(token) = self.cache.fresh(&app.appid).await {
            return Ok(token);
        }
        let mut last = fetches.last.lock().await;
        if fetches.finished.load(Ordering::SeqCst) != seen
            && let Some(outcome) = last.as_ref()
        {
            return outcome.clone();
        }
        // Another replica may have put a token into a shared cache meanwhile.
        if let Some(token) = self.cache.fresh(&app.appid).await {
            return Ok(token);
        }
        let fetched = client.fetch_stable_token(settings, app).await;
        if let Ok((token, expires_in)) = &fetched {
            let fresh_for = expires_in.saturating_sub(REFRESH_MARGIN).min(LONGEST_KEPT);
            self.cache.keep(&app.appid, token, fresh_for).await;
        }
        let outcome = fetched.map(|(token, _)| token);
        *last = Some(outcome.clone());
        fetches.finished.fetch_add(1, Ordering::SeqCst);
        outcome
    }

    /// Drops `dead` if it is still the app's token; a newer one fetched meanwhile stays.
    pub(super) async fn invalidate(&self, appid: &str, dead: &Secret) {
        self.cache.forget(appid, dead).await;
    }
}

#[cfg(test)]
mod tests {
    use futures_util::poll;
    use http::StatusCode;
    use serde_json::json;

    use super::*;
    use crate::metrics::Metrics;
    use crate::wechat::tests::{
        APPID, TIMEOUT, app, client, scripted_host, settings, start_mock, status_answer,
        text_answer,
    };

    /// A host handing out the tokens `t1`, `t2`, … in turn, counting requests.
    async fn token_host() -> (String, Arc<AtomicU64>) {
        let issued = Arc::new(AtomicU64::new(0));
        scripted_host(move |_| {
            let n = issued.fetch_add(1, Ordering::SeqCst) + 1;
            text_answer(json!({"access_token": format!("t{n}"), "expires_in": 7200}).to_string())
        })
        .await
    }

    #[tokio::test]
    async fn a_token_due_within_five_minutes_is_fetched_again_and_a_later_one_is_kept() {
        let (mock, host) = start_mock().await;
        let settings = settings(&[&host], TIMEOUT);
        let mut expected_calls = 0;
        for (expires_in, kept) in [(0, false), (299, false), (300, false), (360, true)] {
            mock.set_access_token_ttl(expires_in);
            let client = client();
            for _ in 0..2 {
                client
                    .access_tokens
                    .get(&client, &settings, &app())
                    .await
                    .unwrap();
            }
            expected_calls += if kept { 1 } else { 2 };
            assert_eq!(mock.stable_token_calls(), expected_calls, "{expires_in}");
        }
        assert_eq!(mock.forced_refreshes(), 0);
    }

    #[tokio::test]
    async fn an_absurd_expires_in_is_kept_for_a_day_at_most() {
        let (host, hits) = scripted_host(|_| {
            text_answer(json!({"access_token": "t", "expires_in": u64::MAX}).to_string())
        })
        .await;
        let client = client();
        let settings = settings(&[&host], TIMEOUT);
        for _ in 0..2 {
            let token = client.access_tokens.get(&client, &settings, &app()).await;
            assert_eq!(token.unwrap().expose(), "t");
        }
        assert_eq!(hits.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn only_exactly_the_dead_token_is_dropped() {
        let (host, hits) = token_host().await;
        let client = client();
        let settings = settings(&[&host], TIMEOUT);
        let app = app();
        let get = || client.access_tokens.get(&client, &settings, &app);
        let first = get().await.unwrap();
        assert_eq!(first.expose(), "t1");
        assert_eq!(get().await.unwrap(), first, "kept");
        client.access_tokens.invalidate(APPID, &first).await;
        let second = get().await.unwrap();
        assert_eq!(second.expose(), "t2");
        // A call that used the first token reports it dead late: the newer one stays.
        client.access_tokens.invalidate(APPID, &first).await;
        assert_eq!(get().await.unwrap(), second);
        assert_eq!(hits.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_dead_token_is_dropped_while_other_callers_wait() {
        let (host, hits) = token_host().await;
        let client = client();
        let settings = settings(&[&host], TIMEOUT);
        let app = app();
        let get = || client.access_tokens.get(&client, &settings, &app);
        let mut fetching = std::pin::pin!(get());
        let mut waiting = std::pin::pin!(get());
        assert!(poll!(fetching.as_mut()).is_pending());
        assert!(poll!(waiting.as_mut()).is_pending());
        let first = fetching.await.unwrap();
        // The waiting caller has not run since the fetch ended: a lock it would hold on
        // its way to the cached token must not keep the dead token there.
        client.access_tokens.invalidate(APPID, &first).await;
        assert_eq!(waiting.await.unwrap(), first, "it waited for that fetch");
        assert_eq!(get().await.unwrap().expose(), "t2");
        assert_eq!(hits.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_failed_fetch_is_shared_with_the_callers_waiting_for_it() {
        let (failing, hits) =
            scripted_host(|_| status_answer(StatusCode::INTERNAL_SERVER_ERROR, None)).await;
        let client = client();
        let settings = settings(&[&failing], TIMEOUT);
        let app = app();
        let get = || client.access_tokens.get(&client, &settings, &app);
        let mut callers = [
            Box::pin(get()),
            Box::pin(get()),
            Box::pin(get()),
            Box::pin(get()),
        ];
        for caller in &mut callers {
            assert!(poll!(caller.as_mut()).is_pending());
        }
        for caller in callers {
            assert_eq!(
                caller.await.unwrap_err(),
                Error::WechatUnavailable {
                    wechat_errcode: None
                }
            );
        }
        assert_eq!(hits.load(Ordering::SeqCst), 1, "one fetch for the four");
        // A caller arriving after that outcome tries again.
        assert!(get().await.is_err());
        assert_eq!(hits.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn replicas_sharing_a_cache_fetch_once() {
        let (mock, host) = start_mock().await;
        let settings = settings(&[&host], TIMEOUT);
        let shared: Arc<dyn TokenCache> = Arc::new(LocalTokens::default());
        let replica = || WechatClient {
            access_tokens: AccessTokens::new(shared.clone()),
            ..WechatClient::new(Arc::new(Metrics::default()))
        };
        let (one, two) = (replica(), replica());
        let first = one
            .access_tokens
            .get(&one, &settings, &app())
            .await
            .unwrap();
        let second = two
            .access_tokens
            .get(&two, &settings, &app())
            .await
            .unwrap();
        assert_eq!(first, second);
        assert_eq!(mock.stable_token_calls(), 1);
        // A token one replica finds dead is gone for the other too.
        two.access_tokens.invalidate(APPID, &second).await;
        one.access_tokens
            .get(&one, &settings, &app())
            .await
            .unwrap();
        assert_eq!(mock.stable_token_calls(), 2);
    }
}
