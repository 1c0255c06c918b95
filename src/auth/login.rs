//! `POST /auth/login`: a `wx.login` code in, a token pair out (SPEC §3, §6, §7).

use std::net::SocketAddr;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use serde::Deserialize;

use super::hook::{self, LoginFacts};
use super::refresh::{new_refresh_token, token_response};
use super::{check_code, json_response, malformed_open_data, read_json, store_failed};
use crate::config::AppConfig;
use crate::error::Error;
use crate::metrics::AppResult;
use crate::proxy::client_ip;
use crate::state::State;
use crate::store::SessionRecord;
use crate::token::unix_now;
use crate::wechat::crypto::{OpenDataError, SealedData, signature_matches};

/// Field names follow the mini-program's own, so the front end can pass on what WeChat gave it.
#[derive(Deserialize)]
pub(super) struct LoginRequest {
    code: String,
    appid: Option<String>,
    #[serde(rename = "encryptedData")]
    encrypted_data: Option<String>,
    iv: Option<String>,
    #[serde(rename = "rawData")]
    raw_data: Option<String>,
    signature: Option<String>,
}

/// The `appid` label of login attempts refused before their app was known.
const UNKNOWN_APP: &str = "unknown";

pub(super) async fn login(
    state: &State,
    request: Request<Incoming>,
    peer: SocketAddr,
) -> Result<Response<Full<Bytes>>, Error> {
    // Labelled with a configured appid only, so a client cannot grow the label set; attempts
    // refused before their app is known count under a fixed name.
    let mut appid = String::from(UNKNOWN_APP);
    let outcome = log_in(state, request, peer, &mut appid).await;
    let result = match &outcome {
        Ok(_) => "ok",
        Err(err) => err.code(),
    };
    state
        .services
        .metrics
        .logins
        .get_or_create(&AppResult { appid, result })
        .inc();
    outcome
}

async fn log_in(
    state: &State,
    request: Request<Incoming>,
    peer: SocketAddr,
    appid: &mut String,
) -> Result<Response<Full<Bytes>>, Error> {
    if let Some(limiter) = &*state.services.login_limiter.load() {
        let trusted = &state.config.server.trusted_proxies;
        limiter.check(client_ip(trusted, peer.ip(), request.headers()))?;
    }
    let body: LoginRequest = read_json(state, request).await?;
    check_code(&body.code)?;
    let app = resolve_app(state, body.appid.as_deref())?;
    appid.clone_from(&app.appid);
    // Everything that can be refused without WeChat is refused before the code is spent: a
    // code that reached WeChat cannot be used again, so the front end would have to call
    // wx.login again for a mistake of its own.
    let sealed = match (&body.encrypted_data, &body.iv) {
        (Some(encrypted), Some(iv)) => {
            Some(SealedData::parse(encrypted, iv).map_err(|_| malformed_open_data())?)
        }
        (None, None) => None,
        _ => {
            return Err(Error::BadRequest(
                "encryptedData and iv must be sent together".into(),
            ));
        }
    };
    let signed = match (&body.raw_data, &body.signature) {
        (Some(raw_data), Some(signature)) => Some((raw_data, signature)),
        (None, None) => None,
        _ => {
            return Err(Error::BadRequest(
                "rawData and signature must be sent together".into(),
            ));
        }
    };
    let exchanged = state
        .services
        .exchanges
        .exchange(state, app, &body.code)
        .await?;
    let session = &*exchanged.session;

    let user = sealed
        .map(|sealed| sealed.open(&session.session_key, &app.appid))
        .transpose()
        .map_err(|err| match err {
            // The session_key WeChat gave is not a 16-byte key: WeChat's answer is at fault.
            OpenDataError::Malformed => Error::WechatUnavailable {
                wechat_errcode: None,
            },
            OpenDataError::Undecryptable | OpenDataError::ForeignWatermark => {
                Error::InvalidEncryptedData
            }
        })?;
    if let Some((raw_data, signature)) = signed
        && !signature_matches(raw_data, &session.session_key, signature)
    {
        return Err(Error::InvalidSignature);
    }

    let claims = match &state.config.login_hook {
        Some(hook) => {
            let facts = LoginFacts {
                appid: &app.appid,
                openid: &session.openid,
                unionid: session.unionid.as_deref(),
                user: user.as_ref(),
            };
            hook::ask(&state.services.hook_client, hook, &facts).await?
        }
        None => serde_json::Map::new(),
    };
    let now = unix_now();
    let record = SessionRecord {
        // Time-ordered, so that the embedded store appends each new session to its table
        // rather than writing into a page picked at random: a login then dirties one page
        // fewer (README, Performance).
        sid: uuid::Uuid::now_v7().simple().to_string(),
        appid: app.appid.clone(),
        openid: session.openid.clone(),
        unionid: session.unionid.clone(),
        claims,
        expires_at: now + state.config.token.refresh_ttl.as_secs(),
    };
    let (refresh_token, refresh_name) = new_refresh_token();
    let (mut answer, access_until) = token_response(state, &record, refresh_token, now)?;
    state
        .services
        .store
        .create_session(&record, refresh_name, access_until)
        .await
        .map_err(store_failed)?;
    // Asked for after the session's write, which is then queued behind the key's: both are
    // usually committed together. Should the key's write fail, the session just written is
    // never handed out, and ends with its expiry.
    exchanged.key_stored().await?;
    answer.user = user;
    tracing::info!(appid = %app.appid, openid = %record.openid, sid = %record.sid, "login");
    json_response(StatusCode::OK, &answer)
}

/// `appid` may be left out only when exactly one app is configured.
fn resolve_app<'a>(state: &'a State, appid: Option<&str>) -> Result<&'a AppConfig, Error> {
    let apps = &state.config.wechat.apps;
    match appid {
        Some(appid) => apps
            .iter()
            .find(|app| app.appid == appid)
            .ok_or_else(|| Error::UnknownApp("this appid is not configured".into())),
        None if apps.len() == 1 => Ok(&apps[0]),
        None => Err(Error::UnknownApp(
            "several apps are configured: send the appid".into(),
        )),
    }
}
