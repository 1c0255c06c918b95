//! The gateway's errors and the one mapping from each of them to a status code and a JSON body
//! (SPEC §4). The `match` in `Error::answer` has no catch-all arm on purpose: a new variant
//! does not compile until someone decides what the client sees.

use bytes::Bytes;
use http::header::{ALLOW, CONTENT_TYPE, RETRY_AFTER, WWW_AUTHENTICATE};
use http::{HeaderValue, Response, StatusCode};
use http_body_util::Full;
use serde::Serialize;

/// Everything that can stop a request. Messages are fixed sentences or built from values the
/// gateway chose itself, never from a secret, a code or a token.
/// They serialize so that one replica can hand a WeChat outcome to others through the store.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, serde::Deserialize)]
pub enum Error {
    #[error("{0}")]
    BadRequest(String),
    #[error(
        "the request path is not in plain form: a dot-segment, an empty segment, a `;`, a \
         backslash, an encoded slash or letter, or a double encoding"
    )]
    BadPath,
    #[error("WeChat refused the code: call wx.login again and send the new code")]
    InvalidCode { wechat_errcode: i64 },
    #[error("{0}")]
    UnknownApp(String),
    #[error("the encrypted data could not be decrypted or belongs to another app")]
    InvalidEncryptedData,
    #[error("rawData does not match its signature")]
    InvalidSignature,
    #[error("this endpoint needs a bearer token in the Authorization header")]
    MissingToken,
    #[error("the bearer token is not valid")]
    InvalidToken,
    #[error("the bearer token has expired: refresh it or log in again")]
    TokenExpired,
    #[error("the bearer token belongs to a session that was logged out")]
    TokenRevoked,
    #[error("the refresh token is not valid: log in again")]
    InvalidRefreshToken,
    #[error("the refresh token was already used: the session is revoked, log in again")]
    RefreshTokenReused,
    #[error("the token's app is not allowed on this route")]
    ForbiddenApp,
    #[error("WeChat flagged this user as risky and refused the login")]
    WechatRiskyUser { wechat_errcode: i64 },
    #[error("the business API refused this login")]
    LoginRefused,
    #[error("no route matches this path")]
    NoRoute,
    /// `allow` lists the methods that are accepted, for the `Allow` header RFC 9110 §15.5.6
    /// has every 405 carry.
    #[error("this route does not accept this method")]
    MethodNotAllowed { allow: String },
    #[error(
        "the stored session_key cannot decrypt this data, most often because a newer login \
         rotated it: log in again, then fetch the data again"
    )]
    SessionKeyStale,
    #[error("the request body is larger than this gateway accepts")]
    PayloadTooLarge,
    #[error("too many requests: try again later")]
    RateLimited {
        retry_after_secs: u64,
        wechat_errcode: Option<i64>,
    },
    #[error("the upstream service could not be reached or gave a bad answer")]
    UpstreamUnavailable,
    #[error("WeChat could not be reached or gave an answer the gateway cannot use")]
    WechatUnavailable { wechat_errcode: Option<i64> },
    #[error("the login hook could not be reached or gave an answer the gateway cannot use")]
    LoginHookUnavailable,
    #[error("WeChat is busy: try again shortly")]
    WechatBusy { retry_after_secs: u64 },
    #[error("the upstream service did not answer in time")]
    UpstreamTimeout,
    #[error("WeChat did not answer in time")]
    WechatTimeout,
    #[error("the gateway failed to handle this request")]
    Internal,
}

/// What `WWW-Authenticate` says on a 401 (RFC 6750 §3).
const BEARER_CHALLENGE: HeaderValue = HeaderValue::from_static("Bearer realm=\"wxgate\"");
const BEARER_INVALID_TOKEN: HeaderValue =
    HeaderValue::from_static("Bearer realm=\"wxgate\", error=\"invalid_token\"");
const APPLICATION_JSON: HeaderValue = HeaderValue::from_static("application/json");

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: &'a str,
    message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    wechat_errcode: Option<i64>,
}

/// What the client is told of an error, beyond its message.
struct Answer {
    status: StatusCode,
    code: &'static str,
    /// The `errcode` WeChat answered, when WeChat caused the error.
    wechat_errcode: Option<i64>,
    /// For `Retry-After`.
    retry_after_secs: Option<u64>,
}

impl Answer {
    fn new(status: StatusCode, code: &'static str) -> Answer {
        Answer {
            status,
            code,
            wechat_errcode: None,
            retry_after_secs: None,
        }
    }

    fn wechat_errcode(mut self, errcode: Option<i64>) -> Answer {
        self.wechat_errcode = errcode;
        self
    }

    fn retry_after(mut self, secs: u64) -> Answer {
        // `Retry-After: 0` would invite an immediate retry of what just failed.
        self.retry_after_secs = Some(secs.max(1));
        self
    }
}

impl Error {
    /// The status, the machine-readable code of SPEC §4, and what WeChat said.
    fn answer(&self) -> Answer {
        use Error::*;
        match self {
            BadRequest(_) => Answer::new(StatusCode::BAD_REQUEST, "bad_request"),
            BadPath => Answer::new(StatusCode::BAD_REQUEST, "bad_path"),
            InvalidCode { wechat_errcode } => Answer::new(StatusCode::BAD_REQUEST, "invalid_code")
                .wechat_errcode(Some(*wechat_errcode)),
            UnknownApp(_) => Answer::new(StatusCode::BAD_REQUEST, "unknown_app"),
            InvalidEncryptedData => Answer::new(StatusCode::BAD_REQUEST, "invalid_encrypted_data"),
            InvalidSignature => Answer::new(StatusCode::BAD_REQUEST, "invalid_signature"),
            MissingToken => Answer::new(StatusCode::UNAUTHORIZED, "missing_token"),
            InvalidToken => Answer::new(StatusCode::UNAUTHORIZED, "invalid_token"),
            TokenExpired => Answer::new(StatusCode::UNAUTHORIZED, "token_expired"),
            TokenRevoked => Answer::new(StatusCode::UNAUTHORIZED, "token_revoked"),
            InvalidRefreshToken => Answer::new(StatusCode::UNAUTHORIZED, "invalid_refresh_token"),
            RefreshTokenReused => Answer::new(StatusCode::UNAUTHORIZED, "refresh_token_reused"),
            ForbiddenApp => Answer::new(StatusCode::FORBIDDEN, "forbidden_app"),
            WechatRiskyUser { wechat_errcode } => {
                Answer::new(StatusCode::FORBIDDEN, "wechat_risky_user")
                    .wechat_errcode(Some(*wechat_errcode))
            }
            LoginRefused => Answer::new(StatusCode::FORBIDDEN, "login_refused"),
            NoRoute => Answer::new(StatusCode::NOT_FOUND, "no_route"),
            MethodNotAllowed { .. } => {
                Answer::new(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed")
            }
            SessionKeyStale => Answer::new(StatusCode::CONFLICT, "session_key_stale"),
            PayloadTooLarge => Answer::new(StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large"),
            RateLimited {
                retry_after_secs,
                wechat_errcode,
            } => Answer::new(StatusCode::TOO_MANY_REQUESTS, "rate_limited")
                .wechat_errcode(*wechat_errcode)
                .retry_after(*retry_after_secs),
            UpstreamUnavailable => Answer::new(StatusCode::BAD_GATEWAY, "upstream_unavailable"),
            WechatUnavailable { wechat_errcode } => {
                Answer::new(StatusCode::BAD_GATEWAY, "wechat_unavailable")
                    .wechat_errcode(*wechat_errcode)
            }
            LoginHookUnavailable => Answer::new(StatusCode::BAD_GATEWAY, "login_hook_unavailable"),
            WechatBusy { retry_after_secs } => {
                Answer::new(StatusCode::SERVICE_UNAVAILABLE, "wechat_busy")
                    .wechat_errcode(Some(-1))
                    .retry_after(*retry_after_secs)
            }
            UpstreamTimeout => Answer::new(StatusCode::GATEWAY_TIMEOUT, "upstream_timeout"),
            WechatTimeout => Answer::new(StatusCode::GATEWAY_TIMEOUT, "wechat_timeout"),
            Internal => Answer::new(StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        }
    }

    /// The machine-readable code alone, for logs and metric labels.
    pub fn code(&self) -> &'static str {
        self.answer().code
    }

    /// On a 401, a request that carried no token is only told how to authenticate (RFC 6750
    /// §3.1); one whose token was refused is also told that the token is the problem.
    pub fn into_response(self) -> Response<Full<Bytes>> {
        self.into_whole_response().map(Full::new)
    }

    /// [`Error::into_response`] with its body as bytes, for an answer written without hyper.
    pub fn into_whole_response(self) -> Response<Bytes> {
        let answer = self.answer();
        let body = ErrorBody {
            error: answer.code,
            message: self.to_string(),
            wechat_errcode: answer.wechat_errcode,
        };
        let json = serde_json::to_vec(&body).expect("an error body always serializes");
        let mut response = Response::new(Bytes::from(json));
        *response.status_mut() = answer.status;
        let headers = response.headers_mut();
        headers.insert(CONTENT_TYPE, APPLICATION_JSON);
        if answer.status == StatusCode::UNAUTHORIZED {
            let challenge = if self == Error::MissingToken {
                BEARER_CHALLENGE
            } else {
                BEARER_INVALID_TOKEN
            };
            headers.insert(WWW_AUTHENTICATE, challenge);
        }
        if let Some(secs) = answer.retry_after_secs {
            headers.insert(RETRY_AFTER, HeaderValue::from(secs));
        }
        if let Error::MethodNotAllowed { allow } = &self
            && let Ok(allow) = HeaderValue::from_str(allow)
        {
            headers.insert(ALLOW, allow);
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    async fn body_json(response: Response<Full<Bytes>>) -> serde_json::Value {
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        serde_json::from_slice(&bytes).unwrap()
    }

    #[tokio::test]
    async fn missing_token_gets_a_plain_challenge() {
        let response = Error::MissingToken.into_response();
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(
            response.headers()[WWW_AUTHENTICATE],
            "Bearer realm=\"wxgate\""
        );
        let body = body_json(response).await;
        assert_eq!(body["error"], "missing_token");
        assert!(body.get("wechat_errcode").is_none());
    }

    #[tokio::test]
    async fn refused_token_names_invalid_token_in_the_challenge() {
        let response = Error::TokenExpired.into_response();
        assert_eq!(
            response.headers()[WWW_AUTHENTICATE],
            "Bearer realm=\"wxgate\", error=\"invalid_token\""
        );
    }

    #[tokio::test]
    async fn wechat_errors_carry_the_errcode_and_retry_after() {
        let response = Error::WechatBusy {
            retry_after_secs: 1,
        }
        .into_response();
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(response.headers()[RETRY_AFTER], "1");
        let body = body_json(response).await;
        assert_eq!(body["error"], "wechat_busy");
        assert_eq!(body["wechat_errcode"], -1);

        let response = Error::RateLimited {
            retry_after_secs: 0,
            wechat_errcode: Some(45011),
        }
        .into_response();
        assert_eq!(response.headers()[RETRY_AFTER], "1");
        assert_eq!(body_json(response).await["wechat_errcode"], 45011);
    }
}
