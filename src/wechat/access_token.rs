//! Access tokens, one per app, from WeChat's stable-token API: cached until shortly before they
//! expire, fetched by one caller while the others wait for that result, and dropped only when
//! WeChat reports exactly that token dead.
//!
//! The cache is per process. Replicas each hold their own copy of the *same* token: the
//! stable-token API without `force_refresh` answers every caller with the token WeChat
//! currently holds for the app, so replicas never invalidate each other's.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::WechatClient;
use crate::config::{AppConfig, Secret, WechatConfig};
use crate::error::Error;

/// A token is replaced this long before WeChat says it expires (SPEC §7).
const REFRESH_MARGIN: Duration = Duration::from_secs(300);

#[derive(Default)]
pub(super) struct AccessTokens {
    // The std Mutex guards only the map lookup; the per-app async Mutex is the one held
    // across the fetch, so that one caller fetches while the others of that app wait.
    apps: Mutex<HashMap<String, Arc<tokio::sync::Mutex<Option<Cached>>>>>,
}

struct Cached {
    token: Secret,
    refresh_at: Instant,
}

impl AccessTokens {
    fn slot(&self, appid: &str) -> Arc<tokio::sync::Mutex<Option<Cached>>> {
        self.apps
            .lock()
            .expect("access token map lock poisoned")
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
        let slot = self.slot(&app.appid);
        let mut cached = slot.lock().await;
        if let Some(current) = cached.as_ref()
            && current.refresh_at > Instant::now()
        {
            return Ok(current.token.clone());
        }
        let (token, expires_in) = client.fetch_stable_token(settings, app).await?;
        *cached = Some(Cached {
            token: token.clone(),
            refresh_at: Instant::now() + expires_in.saturating_sub(REFRESH_MARGIN),
        });
        Ok(token)
    }

    /// Drops `dead` if it is still the cached token; a newer one fetched meanwhile stays.
    pub(super) fn invalidate(&self, appid: &str, dead: &Secret) {
        let slot = self.slot(appid);
        // Holding the lock means a fetch is under way; it will replace the token anyway.
        if let Ok(mut cached) = slot.try_lock()
            && cached
                .as_ref()
                .is_some_and(|current| current.token == *dead)
        {
            *cached = None;
        }
    }
}
