//! `POST /auth/refresh` and `POST /auth/logout`: refresh tokens rotate on every use, a client
//! racing itself gets the same successor pair, and a rotated token presented later is treated
//! as stolen (SPEC §6).

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use serde::{Deserialize, Serialize};

use super::{json_response, read_json, require_token, store_failed};
use crate::config::MAX_LEEWAY;
use crate::error::Error;
use crate::state::State;
use crate::store::{Rotation, SessionRecord, seal};
use crate::token::{Subject, unix_now};

/// A rotated token presented again within this many seconds is a client racing itself (two
/// tabs, a retry after a lost answer) and gets the same successor; later, it is theft.
const RACE_WINDOW_SECS: u64 = 10;

/// The purpose under which refresh tokens are named and successors sealed.
const REFRESH: &str = "refresh";

/// The token response of SPEC §3.
#[derive(Serialize, Deserialize)]
pub(super) struct TokenResponse {
    pub access_token: String,
    pub token_type: String,
    pub expires_in: u64,
    pub refresh_token: String,
    pub refresh_expires_in: u64,
    pub openid: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unionid: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user: Option<serde_json::Map<String, serde_json::Value>>,
}

#[derive(Deserialize)]
struct RefreshRequest {
    refresh_token: String,
}

/// Bytes of a refresh token that tell when it was issued: unix milliseconds, big-endian.
const ISSUED_LEN: usize = 6;
/// Random bytes of a refresh token.
const RANDOM_LEN: usize = 32;

/// A new refresh token: when it was issued and 256 random bits, for the client; and the name
/// the store knows it by.
pub(super) fn new_refresh_token() -> (String, seal::Name) {
    use rand::RngCore;
    let mut raw = [0u8; ISSUED_LEN + RANDOM_LEN];
    let issued_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_millis() as u64);
    raw[..ISSUED_LEN].copy_from_slice(&issued_ms.to_be_bytes()[8 - ISSUED_LEN..]);
    rand::rngs::OsRng.fill_bytes(&mut raw[ISSUED_LEN..]);
    let token = URL_SAFE_NO_PAD.encode(raw);
    let name = refresh_name(&token);
    (token, name)
}

/// The name the store knows a refresh token by: its SHA-256 digest (under the refresh
/// purpose), whose first bytes are replaced by the token's issue time when it carries one.
/// Names then grow with time, so that the embedded store adds each new token at the end of its
/// table rather than on a page picked at random: a login and a refresh each dirty one page
/// fewer (README, Performance). The issue time is no secret, and the random part of the token
/// is never stored; tokens issued without the time keep the whole digest as their name.
pub fn refresh_name(token: &str) -> seal::Name {
    let digest = seal::name(REFRESH, token.as_bytes());
    let mut raw = [0u8; ISSUED_LEN + RANDOM_LEN];
    match URL_SAFE_NO_PAD.decode_slice(token, &mut raw) {
        Ok(len) if len == raw.len() => {
            let mut name = [0u8; 32];
            name[..ISSUED_LEN].copy_from_slice(&raw[..ISSUED_LEN]);
            name[ISSUED_LEN..].copy_from_slice(&digest[..32 - ISSUED_LEN]);
            name
        }
        _ => digest,
    }
}

/// An access token for `session` and the token response around it and `refresh_token`; and
/// until when (unix seconds) that access token could be accepted, for the store to list a
/// revocation of the session that long.
pub(super) fn token_response(
    state: &State,
    session: &SessionRecord,
    refresh_token: String,
    now: u64,
) -> Result<(TokenResponse, u64), Error> {
    let (access_token, claims) = state.keys.issue(
        &Subject {
            appid: &session.appid,
            openid: &session.openid,
            unionid: session.unionid.as_deref(),
            sid: &session.sid,
        },
        session.claims.clone(),
    )?;
    let response = TokenResponse {
        access_token,
        token_type: "Bearer".into(),
        expires_in: state.keys.access_ttl().as_secs(),
        refresh_token,
        refresh_expires_in: session.expires_at.saturating_sub(now),
        openid: session.openid.clone(),
        unionid: session.unionid.clone(),
        user: None,
    };
    Ok((response, accepted_until(claims.exp)))
}

/// Until when (unix seconds) a token that expires at `exp` could be accepted: past the leeway
/// verification allows now, and past any it may be given by a later reload.
fn accepted_until(exp: u64) -> u64 {
    exp.saturating_add(MAX_LEEWAY.as_secs())
}

pub(super) async fn refresh(
    state: &State,
    request: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Error> {
    let body: RefreshRequest = read_json(state, request).await?;
    let presented = body.refresh_token.as_bytes();
    let old = refresh_name(&body.refresh_token);
    let now = unix_now();
    let store = &state.services.store;
    let session = store
        .refresh_session(old, now)
        .await
        .map_err(store_failed)?
        .ok_or(Error::InvalidRefreshToken)?;
    // A session of an app that a reload removed issues nothing more: every route would refuse
    // the tokens anyway.
    if !state
        .config
        .wechat
        .apps
        .iter()
        .any(|app| app.appid == session.appid)
    {
        return Err(Error::InvalidRefreshToken);
    }

    let (refresh_token, new) = new_refresh_token();
    let (successor, access_until) = token_response(state, &session, refresh_token, now)?;
    let sealed = seal::seal(
        REFRESH,
        presented,
        &serde_json::to_vec(&successor).map_err(|_| Error::Internal)?,
    );
    match store
        .rotate_refresh(old, new, &sealed, access_until, now)
        .await
        .map_err(store_failed)?
    {
        Rotation::Rotated => json_response(StatusCode::OK, &successor),
        Rotation::AlreadyRotated {
            age_secs,
            sealed_successor,
            ..
        } if age_secs <= RACE_WINDOW_SECS => {
            let earlier: TokenResponse = seal::open(REFRESH, presented, &sealed_successor)
                .and_then(|json| serde_json::from_slice(&json).ok())
                .ok_or(Error::InvalidRefreshToken)?;
            json_response(StatusCode::OK, &earlier)
        }
        Rotation::AlreadyRotated { session, .. } => {
            tracing::warn!(sid = %session.sid, "a rotated refresh token was presented again: session revoked");
            // The store lists the revocation as long as the session's last access token lives;
            // a token of the current lifetime issued now is the floor, for sessions recorded
            // before the store kept that.
            let floor = accepted_until(now + state.keys.access_ttl().as_secs());
            revoke(state, &session.sid, floor).await?;
            Err(Error::RefreshTokenReused)
        }
        Rotation::Unknown => Err(Error::InvalidRefreshToken),
    }
}

pub(super) async fn logout(
    state: &State,
    headers: &HeaderMap,
) -> Result<Response<Full<Bytes>>, Error> {
    let claims = require_token(state, headers)?;
    revoke(state, &claims.sid, accepted_until(claims.exp)).await?;
    let mut response = Response::new(Full::new(Bytes::new()));
    *response.status_mut() = StatusCode::NO_CONTENT;
    Ok(response)
}

/// Ends a session here at once, and everywhere once the other replicas sync: its tokens are
/// refused until `until` (unix seconds), or longer when the store knows of a later token of
/// the session. Should the store fail, the session stays ended here, and the revocation is sent
/// again at each sync until the store takes it.
async fn revoke(state: &State, sid: &str, until: u64) -> Result<(), Error> {
    let revocations = &state.services.revocations;
    revocations.insert(sid, until);
    match state.services.store.revoke_session(sid, until).await {
        Ok(listed_until) => {
            revocations.insert(sid, listed_until);
            Ok(())
        }
        Err(err) => {
            revocations.keep_unsent(sid, until);
            Err(store_failed(err))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token(issued_ms: u64, random: u8) -> String {
        let mut raw = [random; ISSUED_LEN + RANDOM_LEN];
        raw[..ISSUED_LEN].copy_from_slice(&issued_ms.to_be_bytes()[8 - ISSUED_LEN..]);
        URL_SAFE_NO_PAD.encode(raw)
    }

    #[test]
    fn refresh_names_lead_with_the_issue_time_then_the_digest() {
        let (earlier, later) = (token(1_000, 0xff), token(1_001, 0));
        assert!(refresh_name(&earlier) < refresh_name(&later));
        let name = refresh_name(&earlier);
        assert_eq!(name[..ISSUED_LEN], 1_000u64.to_be_bytes()[8 - ISSUED_LEN..]);
        assert_eq!(
            name[ISSUED_LEN..],
            seal::name(REFRESH, earlier.as_bytes())[..32 - ISSUED_LEN]
        );
        // A token from before tokens carried their issue time keeps the whole digest.
        let timeless = URL_SAFE_NO_PAD.encode([7u8; RANDOM_LEN]);
        assert_eq!(
            refresh_name(&timeless),
            seal::name(REFRESH, timeless.as_bytes())
        );
        assert_eq!(
            refresh_name("not base64!"),
            seal::name(REFRESH, b"not base64!")
        );
    }

    #[test]
    fn a_new_refresh_token_carries_its_issue_time_and_256_random_bits() {
        let now_ms = || {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_millis() as u64
        };
        let before = now_ms();
        let (token, name) = new_refresh_token();
        let after = now_ms();
        assert_eq!(name, refresh_name(&token));
        let raw = URL_SAFE_NO_PAD.decode(&token).unwrap();
        assert_eq!(raw.len(), ISSUED_LEN + RANDOM_LEN);
        let mut issued = [0u8; 8];
        issued[8 - ISSUED_LEN..].copy_from_slice(&raw[..ISSUED_LEN]);
        assert!((before..=after).contains(&u64::from_be_bytes(issued)));
        let (other, _) = new_refresh_token();
        assert_ne!(
            raw[ISSUED_LEN..],
            URL_SAFE_NO_PAD.decode(&other).unwrap()[ISSUED_LEN..]
        );
    }
}
