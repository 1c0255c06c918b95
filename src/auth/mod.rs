//! The gateway's own endpoints under `auth_path` (SPEC §3), and the bearer-token decision that
//! every route makes before proxying.

mod exchange;
mod hook;
mod limit;
mod login;
mod open_data;
mod refresh;
mod session;
mod verified;

pub use exchange::Exchanges;
pub use limit::LoginLimiter;
pub use refresh::refresh_name;
pub use verified::{LastToken, VerifiedTokens};

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::header::{AUTHORIZATION, CACHE_CONTROL, CONTENT_TYPE};
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::body::Incoming;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::config::AuthMode;
use crate::error::Error;
use crate::identity::Identity;
use crate::routes::Route;
use crate::state::State;

pub const JWKS_PATH: &str = "/.well-known/jwks.json";

/// True when the path belongs to the gateway rather than to a route.
pub fn owns_path(state: &State, path: &str) -> bool {
    path == JWKS_PATH || crate::routes::is_under(&state.config.server.auth_path, path)
}

/// Serves one of the gateway's own endpoints; the caller has checked [`owns_path`].
pub async fn handle(
    state: &State,
    request: Request<Incoming>,
    peer: SocketAddr,
) -> Result<Response<Full<Bytes>>, Error> {
    let path = request.uri().path();
    if path == JWKS_PATH {
        // HS256 keys are secret: there is nothing to publish.
        let body = state.keys.jwks_body().ok_or(Error::NoRoute)?;
        if !matches!(*request.method(), Method::GET | Method::HEAD) {
            return Err(Error::MethodNotAllowed {
                allow: "GET, HEAD".into(),
            });
        }
        let mut response = Response::new(Full::new(body));
        let headers = response.headers_mut();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        // Verifiers fetch this set to check tokens on their own; keys change only at a
        // deliberate rotation, so five minutes of caching spares the gateway a fetch per
        // verifier without holding on to a retired key for long. A rotation that lists the next
        // key in verify_keys before it signs reaches every cache before its first token.
        headers.insert(
            CACHE_CONTROL,
            HeaderValue::from_static("public, max-age=300"),
        );
        return Ok(response);
    }
    let endpoint = path[state.config.server.auth_path.len()..].trim_end_matches('/');
    let method = request.method();
    match endpoint {
        "/login" if method == Method::POST => login::login(state, request, peer).await,
        "/me" if method == Method::GET => session::me(state, request.headers()),
        // Envoy's ext_authz appends the checked request's path to its `path_prefix`.
        "/verify" => session::verify(state, request.headers()),
        under if under.starts_with("/verify/") => session::verify(state, request.headers()),
        "/decrypt" if method == Method::POST => open_data::decrypt(state, request).await,
        "/phone" if method == Method::POST => open_data::phone(state, request).await,
        "/refresh" if method == Method::POST => refresh::refresh(state, request).await,
        "/logout" if method == Method::POST => refresh::logout(state, request.headers()).await,
        "/me" => Err(Error::MethodNotAllowed {
            allow: "GET".into(),
        }),
        "/login" | "/decrypt" | "/phone" | "/refresh" | "/logout" => Err(Error::MethodNotAllowed {
            allow: "POST".into(),
        }),
        _ => Err(Error::NoRoute),
    }
}

/// The route's auth decision: `Ok(None)` means forward without identity.
pub fn authorize(
    state: &State,
    route: &Route,
    headers: &HeaderMap,
) -> Result<Option<Arc<Identity>>, Error> {
    authorize_bearer(route, || {
        bearer_token(headers)?
            .map(|token| verify_token(state, token))
            .transpose()
    })
}

/// [`authorize`], given what finds the request's bearer token and verifies it (`Ok(None)`
/// when there is none): a public route never looks.
pub fn authorize_bearer(
    route: &Route,
    verified_bearer: impl FnOnce() -> Result<Option<Arc<Identity>>, Error>,
) -> Result<Option<Arc<Identity>>, Error> {
    let claims = match route.auth() {
        AuthMode::Public => return Ok(None),
        AuthMode::Optional => match verified_bearer()? {
            None => return Ok(None),
            Some(claims) => claims,
        },
        AuthMode::Required => verified_bearer()?.ok_or(Error::MissingToken)?,
    };
    if !route.allows_app(&claims.appid) {
        return Err(Error::ForbiddenApp);
    }
    Ok(Some(claims))
}

/// The verified claims of the request's bearer token, or why there are none.
pub fn require_token(state: &State, headers: &HeaderMap) -> Result<Arc<Identity>, Error> {
    let token = bearer_token(headers)?.ok_or(Error::MissingToken)?;
    verify_token(state, token)
}

/// The verified bearer token of an `Authorization` value (`Ok(None)` when it holds none), for
/// a connection that remembers its [`LastToken`]: the value it sent last is only checked for
/// revocation, and only when some session was revoked since it last was.
pub fn verify_remembered(
    state: &Arc<State>,
    last: &mut LastToken,
    authorization: &[u8],
) -> Result<Option<Arc<Identity>>, Error> {
    // The app check is not repeated: the remembered token passed it under this same state, so
    // under the same config.
    if let Some(identity) = last.recall(state, authorization) {
        state.services.metrics.count_token_check("ok");
        return Ok(Some(identity.clone()));
    }
    let Some(token) = bearer_of(authorization) else {
        return Ok(None);
    };
    // Taken before `verify_token` asks about revocation, so that a revocation made while it
    // does is told of.
    let revocations = state.services.revocations.watch();
    let identity = verify_token(state, token)?;
    last.remember(state, authorization, &identity, revocations);
    Ok(Some(identity))
}

fn verify_token(state: &State, token: &[u8]) -> Result<Arc<Identity>, Error> {
    let verified = check_token(state, token);
    let result = match &verified {
        Ok(_) => "ok",
        Err(err) => err.code(),
    };
    state.services.metrics.count_token_check(result);
    verified
}

fn check_token(state: &State, token: &[u8]) -> Result<Arc<Identity>, Error> {
    let identity = match state.verified_tokens.get(token) {
        Some(identity) => identity,
        None => {
            // A token in other bytes than base64url's and dots fails verification; one that is
            // not UTF-8 fails here first.
            let text = std::str::from_utf8(token).map_err(|_| Error::InvalidToken)?;
            let identity = Arc::new(state.identity.identity(state.keys.verify(text)?));
            state.verified_tokens.insert(token, identity.clone());
            identity
        }
    };
    if state.services.revocations.is_revoked(&identity.sid) {
        return Err(Error::TokenRevoked);
    }
    // A token of an app that a reload removed is not honoured any more.
    if !state
        .config
        .wechat
        .apps
        .iter()
        .any(|app| app.appid == identity.appid)
    {
        return Err(Error::ForbiddenApp);
    }
    Ok(identity)
}

/// The token of an `Authorization: Bearer …` header, the scheme matched case-insensitively
/// (RFC 7235 §2.1). Another scheme counts as no bearer token. Two `Authorization` headers are
/// refused: the gateway would check one while whatever reads the request after it (the
/// upstream, given `forward_authorization`) might believe the other.
pub fn bearer_token(headers: &HeaderMap) -> Result<Option<&[u8]>, Error> {
    let mut values = headers.get_all(AUTHORIZATION).iter();
    let Some(value) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(Error::InvalidToken);
    }
    Ok(bearer_of(value.as_bytes()))
}

/// The token of one `Authorization` header value, if it is of the bearer scheme. The token is
/// as sent, in whatever bytes: one that is not ASCII is a token present and invalid, never no
/// token, which an optional route would let through without identity.
pub fn bearer_of(value: &[u8]) -> Option<&[u8]> {
    let space = value.iter().position(|&byte| byte == b' ')?;
    let (scheme, token) = value.split_at(space);
    scheme
        .eq_ignore_ascii_case(b"bearer")
        .then(|| token.trim_ascii())
}

/// Reads a JSON body of at most `server.max_body_bytes`: 413 past it, 400 for anything
/// malformed, and 400 when it has not all arrived within `server.header_timeout`. These bodies
/// are a few hundred bytes, so a client still sending after that long is stalled or holding
/// the connection on purpose; the limit that keeps slow headers from pinning a connection
/// applies to the body as well.
async fn read_json<T: DeserializeOwned>(
    state: &State,
    request: Request<Incoming>,
) -> Result<T, Error> {
    let server = &state.config.server;
    if crate::proxy::declared_over(request.body(), server.max_body_bytes) {
        return Err(Error::PayloadTooLarge);
    }
    let limit = usize::try_from(server.max_body_bytes).unwrap_or(usize::MAX);
    let read = Limited::new(request.into_body(), limit).collect();
    let bytes = tokio::time::timeout(server.header_timeout, read)
        .await
        .map_err(|_| Error::BadRequest("the request body did not arrive in time".into()))?
        .map_err(|err| {
            if err.is::<LengthLimitError>() {
                Error::PayloadTooLarge
            } else {
                Error::BadRequest("the request body could not be read".into())
            }
        })?
        .to_bytes();
    serde_json::from_slice(&bytes).map_err(describe_json_error)
}

/// serde_json's own messages can quote the offending value, which may be a login code: only
/// the name of a missing field is passed on.
fn describe_json_error(err: serde_json::Error) -> Error {
    let text = err.to_string();
    let message = match err.classify() {
        serde_json::error::Category::Data => match text.strip_prefix("missing field ") {
            Some(rest) => format!(
                "missing field {}",
                rest.split(" at line").next().unwrap_or(rest)
            ),
            None => "a field of the request body has the wrong type".to_string(),
        },
        _ => "the request body is not valid JSON".to_string(),
    };
    Error::BadRequest(message)
}

/// Real codes (login and phone) are 32 characters; anything far longer is not a code and is
/// not sent on.
const MAX_CODE_LEN: usize = 256;

fn check_code(code: &str) -> Result<(), Error> {
    if code.is_empty() || code.len() > MAX_CODE_LEN {
        return Err(Error::BadRequest(
            "code must be the non-empty code that WeChat gave the mini-program".into(),
        ));
    }
    Ok(())
}

/// Open data that is not even well-formed is the client's mistake, wherever it is sent.
fn malformed_open_data() -> Error {
    Error::BadRequest(
        "encryptedData must be base64 of whole 16-byte blocks, and iv base64 of 16 bytes".into(),
    )
}

fn store_failed(err: crate::store::StoreError) -> Error {
    tracing::error!(error = %err, "the store failed");
    Error::Internal
}

/// A JSON answer that no cache may keep: it may carry tokens (RFC 6749 §5.1).
fn json_response(
    status: StatusCode,
    body: &impl Serialize,
) -> Result<Response<Full<Bytes>>, Error> {
    let json = serde_json::to_vec(body).map_err(|_| Error::Internal)?;
    let mut response = Response::new(Full::new(Bytes::from(json)));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(response)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_scheme_is_case_insensitive_and_other_schemes_are_no_token() {
        let mut headers = HeaderMap::new();
        for (value, expected) in [
            ("Bearer abc", Some("abc")),
            ("bearer abc", Some("abc")),
            ("BEARER  abc ", Some("abc")),
            ("Basic dXNlcjpwYXNz", None),
            ("Bearer", None),
            // Sent and not ASCII: a token, for verification to refuse.
            ("Bearer caf\u{e9}", Some("caf\u{e9}")),
            ("Basic caf\u{e9}", None),
        ] {
            headers.insert(
                AUTHORIZATION,
                HeaderValue::from_bytes(value.as_bytes()).unwrap(),
            );
            assert_eq!(
                bearer_token(&headers),
                Ok(expected.map(str::as_bytes)),
                "{value}"
            );
        }
    }

    /// A config with the app `appid`, verifying tokens with no leeway.
    pub(super) fn config_with_app(appid: &str) -> crate::Config {
        let text = format!(
            r#"
[[wechat.apps]]
appid = "{appid}"
secret = "app-secret"

[token]
secret = "0123456789abcdef0123456789abcdef"
leeway = "0s"

[store]
backend = "memory"

[[routes]]
path = "/api/"
upstream = "http://127.0.0.1:3000"
auth = "required"
"#
        );
        crate::Config::parse(&text, std::path::Path::new("c.toml"), &|_| None).unwrap()
    }

    /// A fresh state, and the `Authorization` value of a token it issued for session `sid`.
    async fn state_and_bearer(sid: &str) -> (Arc<State>, String, crate::token::Claims) {
        let shared = State::shared(config_with_app("wx0000000000000a01"))
            .await
            .unwrap();
        let state = shared.load_full();
        let subject = crate::token::Subject {
            appid: "wx0000000000000a01",
            openid: "openid",
            unionid: None,
            sid,
        };
        let (token, claims) = state.keys.issue(&subject, Default::default()).unwrap();
        (state, format!("Bearer {token}"), claims)
    }

    #[tokio::test]
    async fn a_remembered_token_is_still_checked_for_revocation() {
        let (state, authorization, claims) = state_and_bearer("session-1").await;
        let mut last = LastToken::default();
        let identity = verify_remembered(&state, &mut last, authorization.as_bytes()).unwrap();
        assert_eq!(identity.unwrap().sub, "openid");
        assert!(last.recall(&state, authorization.as_bytes()).is_some());
        assert!(last.recall(&state, b"Bearer another").is_none());
        let other_scheme = verify_remembered(&state, &mut last, b"Basic dXNlcg==").unwrap();
        assert!(other_scheme.is_none());

        let revocations = &state.services.revocations;
        let until = crate::token::unix_now() + 60;
        revocations.insert("another-session", until);
        assert!(last.recall(&state, authorization.as_bytes()).is_some());
        revocations.insert(&claims.sid, until);
        assert_eq!(
            verify_remembered(&state, &mut last, authorization.as_bytes()).map(|_| ()),
            Err(Error::TokenRevoked)
        );
    }

    #[tokio::test]
    async fn a_revocation_after_the_remembered_check_is_seen() {
        let (state, authorization, claims) = state_and_bearer("session-3").await;
        let mut last = LastToken::default();
        let identity = verify_remembered(&state, &mut last, authorization.as_bytes())
            .unwrap()
            .unwrap();
        // The session is revoked between taking the watch and finding it not revoked.
        let revocations = &state.services.revocations;
        let taken_before = revocations.watch();
        revocations.insert(&claims.sid, crate::token::unix_now() + 60);
        last.remember(&state, authorization.as_bytes(), &identity, taken_before);
        assert!(last.recall(&state, authorization.as_bytes()).is_none());
    }

    #[tokio::test]
    async fn a_remembered_token_is_forgotten_by_a_reload_and_at_its_expiry() {
        let (state, authorization, mut claims) = state_and_bearer("session-2").await;
        let mut last = LastToken::default();
        verify_remembered(&state, &mut last, authorization.as_bytes()).unwrap();

        // The reload drops the token's app: the token is verified again, and refused.
        let reloaded = Arc::new(
            State::new(
                config_with_app("wx0000000000000b02"),
                state.services.clone(),
            )
            .unwrap(),
        );
        assert!(last.recall(&reloaded, authorization.as_bytes()).is_none());
        assert_eq!(
            verify_remembered(&reloaded, &mut last, authorization.as_bytes()).map(|_| ()),
            Err(Error::ForbiddenApp)
        );

        claims.exp = crate::token::unix_now();
        let expired = Arc::new(state.identity.identity(claims));
        let revocations = state.services.revocations.watch();
        last.remember(&state, authorization.as_bytes(), &expired, revocations);
        assert!(last.recall(&state, authorization.as_bytes()).is_none());
    }

    #[test]
    fn json_errors_never_quote_values() {
        let err = serde_json::from_slice::<login::LoginRequest>(br#"{"code": 123456789}"#)
            .map_err(describe_json_error)
            .err()
            .unwrap();
        assert!(!err.to_string().contains("123456789"), "{err}");
        let err = serde_json::from_slice::<login::LoginRequest>(br#"{"appid": "wx"}"#)
            .map_err(describe_json_error)
            .err()
            .unwrap();
        assert_eq!(err.to_string(), "missing field `code`");
    }
}
