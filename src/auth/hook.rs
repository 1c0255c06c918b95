//! The login hook (SPEC §6): at each login the business API may add claims to the token, or
//! refuse the login. It answers for its users, so anything but a clear yes or no stops the
//! login rather than letting it through without the claims the API expects.

use serde::{Deserialize, Serialize};

use crate::config::LoginHookConfig;
use crate::error::Error;

#[derive(Serialize)]
struct HookRequest<'a> {
    appid: &'a str,
    openid: &'a str,
    unionid: Option<&'a str>,
    user: Option<&'a serde_json::Map<String, serde_json::Value>>,
}

/// `claims` has no default: a 200 without it (`{"error": "db down"}`, `{}`) is a hook that
/// failed without saying so, not a yes.
#[derive(Deserialize)]
struct HookAnswer {
    claims: serde_json::Map<String, serde_json::Value>,
}

/// Who is logging in, as the hook is told.
pub struct LoginFacts<'a> {
    pub appid: &'a str,
    pub openid: &'a str,
    pub unionid: Option<&'a str>,
    pub user: Option<&'a serde_json::Map<String, serde_json::Value>>,
}

/// The claims the hook adds: 200 `{"claims": {...}}` adds them, 403 refuses the login, and
/// anything else (down, slow, another status, a body that is not that JSON) is a 502.
pub async fn ask(
    http: &reqwest::Client,
    hook: &LoginHookConfig,
    facts: &LoginFacts<'_>,
) -> Result<serde_json::Map<String, serde_json::Value>, Error> {
    let body = serde_json::to_vec(&HookRequest {
        appid: facts.appid,
        openid: facts.openid,
        unionid: facts.unionid,
        user: facts.user,
    })
    .map_err(|_| Error::Internal)?;
    let answer = async {
        let response = http
            .post(&hook.url)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body)
            .timeout(hook.timeout)
            .send()
            .await?;
        let status = response.status();
        let body = response.bytes().await?;
        Ok::<_, reqwest::Error>((status, body))
    }
    .await;
    match answer {
        Ok((status, body)) if status == reqwest::StatusCode::OK => serde_json::from_slice::<
            HookAnswer,
        >(&body)
        .map(|answer| answer.claims)
        .map_err(|_| {
            tracing::warn!("the login hook answered 200 without a {{\"claims\": {{…}}}} object");
            Error::LoginHookUnavailable
        }),
        Ok((status, _)) if status == reqwest::StatusCode::FORBIDDEN => Err(Error::LoginRefused),
        Ok((status, _)) => {
            tracing::warn!(%status, "the login hook gave an unexpected status");
            Err(Error::LoginHookUnavailable)
        }
        Err(err) => {
            // The hook's URL is the operator's and carries no secret of the user's, but it may
            // hold credentials of the business API's: logged without it.
            tracing::warn!(error = %err.without_url(), "the login hook could not be asked");
            Err(Error::LoginHookUnavailable)
        }
    }
}
