//! `POST /auth/decrypt` (open data decrypted with the caller's stored session_key, which never
//! leaves the gateway) and `POST /auth/phone`.

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use serde::Deserialize;

use super::{
    check_code, json_response, malformed_open_data, read_json, require_token, store_failed,
};
use crate::error::Error;
use crate::state::State;
use crate::wechat::crypto::{OpenDataError, SealedData};

#[derive(Deserialize)]
struct DecryptRequest {
    #[serde(rename = "encryptedData")]
    encrypted_data: String,
    iv: String,
}

pub(super) async fn decrypt(
    state: &State,
    request: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Error> {
    let claims = require_token(state, request.headers())?;
    let body: DecryptRequest = read_json(state, request).await?;
    // Input that no key could decrypt is the client's mistake whether or not a key is stored.
    let sealed =
        SealedData::parse(&body.encrypted_data, &body.iv).map_err(|_| malformed_open_data())?;
    let session_key = state
        .services
        .store
        .session_key(&claims.appid, &claims.sub)
        .await
        .map_err(store_failed)?
        .ok_or(Error::SessionKeyStale)?;
    let data = sealed
        .open(&session_key, &claims.appid)
        .map_err(|err| match err {
            // The input's shape was checked: only the stored key can be malformed, and a key
            // that cannot be used is as good as none.
            OpenDataError::Malformed => Error::SessionKeyStale,
            // Padding or JSON failing with the newest key means the data was sealed with an
            // older one: a later wx.login rotated it.
            OpenDataError::Undecryptable => Error::SessionKeyStale,
            OpenDataError::ForeignWatermark => Error::InvalidEncryptedData,
        })?;
    json_response(StatusCode::OK, &serde_json::json!({ "data": data }))
}

#[derive(Deserialize)]
struct PhoneRequest {
    code: String,
}

/// `POST /auth/phone`: a `getPhoneNumber` code in, the caller's phone number out.
pub(super) async fn phone(
    state: &State,
    request: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Error> {
    let claims = require_token(state, request.headers())?;
    let body: PhoneRequest = read_json(state, request).await?;
    check_code(&body.code)?;
    let app = state
        .config
        .wechat
        .apps
        .iter()
        .find(|app| app.appid == claims.appid)
        .ok_or(Error::ForbiddenApp)?;
    let number = state
        .services
        .wechat
        .phone_number(&state.config.wechat, app, &body.code)
        .await?;
    json_response(StatusCode::OK, &number)
}
