//! `POST /auth/decrypt`: open data decrypted with the caller's stored session_key, which never
//! leaves the gateway.

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use serde::Deserialize;

use super::{json_response, read_json, require_token, store_failed};
use crate::error::Error;
use crate::state::State;
use crate::wechat::crypto::{OpenDataError, decrypt_open_data};

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
    let body: DecryptRequest = read_json(request, state.config.server.max_body_bytes).await?;
    let session_key = state
        .services
        .store
        .session_key(&claims.appid, &claims.sub)
        .await
        .map_err(store_failed)?
        .ok_or(Error::SessionKeyStale)?;
    let data = decrypt_open_data(&session_key, &body.encrypted_data, &body.iv, &claims.appid)
        .map_err(|err| match err {
            OpenDataError::Malformed => {
                Error::BadRequest("encryptedData and iv must be base64, and iv 16 bytes".into())
            }
            // Padding or JSON failing with the newest key means the data was sealed with an
            // older one: a later wx.login rotated it.
            OpenDataError::Undecryptable => Error::SessionKeyStale,
            OpenDataError::ForeignWatermark => Error::InvalidEncryptedData,
        })?;
    json_response(StatusCode::OK, &serde_json::json!({ "data": data }))
}
