//! Endpoints that answer from the bearer token alone: `/auth/me` and the forward-auth
//! `/auth/verify`.

use bytes::Bytes;
use http::{HeaderMap, Response, StatusCode};
use http_body_util::Full;
use serde::Serialize;

use super::{json_response, require_token};
use crate::error::Error;
use crate::state::State;
use crate::token::Claims;

#[derive(Serialize)]
struct Me<'a> {
    openid: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    unionid: Option<&'a str>,
    appid: &'a str,
    exp: u64,
    claims: &'a Claims,
}

pub fn me(state: &State, headers: &HeaderMap) -> Result<Response<Full<Bytes>>, Error> {
    let claims = require_token(state, headers)?;
    json_response(
        StatusCode::OK,
        &Me {
            openid: &claims.sub,
            unionid: claims.unionid.as_deref(),
            appid: &claims.appid,
            exp: claims.exp,
            claims: &claims,
        },
    )
}

/// Forward-auth (nginx `auth_request`, Traefik `forwardAuth`, …): 200 with the identity in the
/// response headers, which those proxies copy onto the request they forward.
pub fn verify(state: &State, headers: &HeaderMap) -> Result<Response<Full<Bytes>>, Error> {
    let identity = require_token(state, headers)?;
    let mut response = Response::new(Full::new(Bytes::new()));
    *response.headers_mut() = identity.headers();
    Ok(response)
}
