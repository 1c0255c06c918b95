//! Access tokens: claims, keys, signing and verification (SPEC §6). No I/O: keys arrive as the
//! bytes the config loader read.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::config::{Algorithm, Problem, TokenConfig};
use crate::error::Error;

/// The claims of an access token. Login-hook claims sit in `extra` and can never replace the
/// named ones: [`TokenKeys::issue`] drops reserved names from them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Claims {
    pub iss: String,
    pub aud: String,
    /// The openid.
    pub sub: String,
    pub appid: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unionid: Option<String>,
    /// The session this token belongs to; logout revokes it.
    pub sid: String,
    pub jti: String,
    pub iat: u64,
    pub exp: u64,
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

/// Claim names a login hook may not set.
pub const RESERVED_CLAIMS: &[&str] = &[
    "iss", "aud", "sub", "appid", "unionid", "sid", "jti", "iat", "exp", "nbf",
];

/// Who a token is issued to.
pub struct Subject<'a> {
    pub appid: &'a str,
    pub openid: &'a str,
    pub unionid: Option<&'a str>,
    pub sid: &'a str,
}

/// The signing key and every key tokens are still accepted with, built once per config load.
pub struct TokenKeys {
    header: Header,
    encoding: EncodingKey,
    /// (kid, key) pairs: the signing key's own first, then `verify_keys`.
    decoding: Vec<(String, DecodingKey)>,
    validation: Validation,
    issuer: String,
    audience: String,
    access_ttl: Duration,
}

impl TokenKeys {
    /// Fails naming the key at fault, never quoting it.
    pub fn from_config(config: &TokenConfig) -> Result<TokenKeys, Problem> {
        let (algorithm, encoding, decoding) = match config.algorithm {
            Algorithm::Hs256 => {
                let secret = config
                    .secret
                    .as_ref()
                    .ok_or_else(|| problem("token.secret", "HS256 needs a secret".into()))?;
                let bytes = secret.expose().as_bytes();
                (
                    jsonwebtoken::Algorithm::HS256,
                    EncodingKey::from_secret(bytes),
                    DecodingKey::from_secret(bytes),
                )
            }
            Algorithm::Es256 | Algorithm::EdDsa | Algorithm::Rs256 => {
                return Err(problem(
                    "token.algorithm",
                    format!(
                        "{} is not yet supported; use HS256",
                        config.algorithm.name()
                    ),
                ));
            }
        };
        if !config.verify_keys.is_empty() {
            return Err(problem(
                "token.verify_keys",
                "not yet supported with HS256".into(),
            ));
        }
        let kid = key_id(config);
        let mut header = Header::new(algorithm);
        header.kid = Some(kid.clone());

        let mut validation = Validation::new(algorithm);
        validation.set_issuer(&[&config.issuer]);
        validation.set_audience(&[&config.audience]);
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        validation.validate_nbf = true;
        validation.leeway = config.leeway.as_secs();

        Ok(TokenKeys {
            header,
            encoding,
            decoding: vec![(kid, decoding)],
            validation,
            issuer: config.issuer.clone(),
            audience: config.audience.clone(),
            access_ttl: config.access_ttl,
        })
    }

    pub fn access_ttl(&self) -> Duration {
        self.access_ttl
    }

    /// Signs a new access token for `subject`, with `extra` claims minus the reserved names.
    pub fn issue(
        &self,
        subject: &Subject<'_>,
        mut extra: serde_json::Map<String, serde_json::Value>,
    ) -> Result<(String, Claims), Error> {
        extra.retain(|name, _| !RESERVED_CLAIMS.contains(&name.as_str()));
        let iat = unix_now();
        let claims = Claims {
            iss: self.issuer.clone(),
            aud: self.audience.clone(),
            sub: subject.openid.to_string(),
            appid: subject.appid.to_string(),
            unionid: subject.unionid.map(str::to_string),
            sid: subject.sid.to_string(),
            jti: uuid::Uuid::new_v4().simple().to_string(),
            iat,
            exp: iat + self.access_ttl.as_secs(),
            extra,
        };
        let token = jsonwebtoken::encode(&self.header, &claims, &self.encoding).map_err(|err| {
            tracing::error!(error = %err, "signing an access token failed");
            Error::Internal
        })?;
        Ok((token, claims))
    }

    /// Verifies signature, algorithm, `iss`, `aud`, `exp` and `nbf` (with leeway).
    pub fn verify(&self, token: &str) -> Result<Claims, Error> {
        let header = jsonwebtoken::decode_header(token).map_err(|_| Error::InvalidToken)?;
        let kid = header.kid.as_deref().ok_or(Error::InvalidToken)?;
        let (_, key) = self
            .decoding
            .iter()
            .find(|(known, _)| known == kid)
            .ok_or(Error::InvalidToken)?;
        match jsonwebtoken::decode::<Claims>(token, key, &self.validation) {
            Ok(data) => Ok(data.claims),
            Err(err) if *err.kind() == ErrorKind::ExpiredSignature => Err(Error::TokenExpired),
            Err(_) => Err(Error::InvalidToken),
        }
    }
}

fn problem(key: &str, message: String) -> Problem {
    Problem {
        key: key.into(),
        message,
    }
}

/// A key id that names the key without revealing it: a short hash. For HS256 it hashes the
/// secret under a fixed label, which tells nothing useful about a secret of 32 bytes or more.
fn key_id(config: &TokenConfig) -> String {
    let mut hasher = Sha256::new();
    hasher.update(b"wxgate kid\0");
    if let Some(secret) = &config.secret {
        hasher.update(secret.expose().as_bytes());
    }
    hex::encode(&hasher.finalize()[..8])
}

pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|elapsed| elapsed.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Secret;
    use base64::Engine;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;

    const SECRET: &str = "0123456789abcdef0123456789abcdef-test";

    fn config(secret: &str) -> TokenConfig {
        TokenConfig {
            issuer: "wxgate".into(),
            audience: "api".into(),
            algorithm: Algorithm::Hs256,
            secret: Some(Secret::new(secret)),
            signing_key: None,
            verify_keys: vec![],
            access_ttl: Duration::from_secs(7200),
            refresh_ttl: Duration::from_secs(86400),
            leeway: Duration::from_secs(30),
        }
    }

    fn subject() -> Subject<'static> {
        Subject {
            appid: "wx1",
            openid: "o-alice",
            unionid: Some("u-alice"),
            sid: "s1",
        }
    }

    #[test]
    fn issued_token_verifies_with_every_claim() {
        let keys = TokenKeys::from_config(&config(SECRET)).unwrap();
        let mut extra = serde_json::Map::new();
        extra.insert("uid".into(), 42.into());
        extra.insert("sub".into(), "someone-else".into());
        let (token, issued) = keys.issue(&subject(), extra).unwrap();
        let verified = keys.verify(&token).unwrap();
        assert_eq!(verified, issued);
        assert_eq!(verified.sub, "o-alice");
        assert_eq!(verified.extra["uid"], 42);
        assert!(!verified.extra.contains_key("sub"));
        assert_eq!(verified.exp - verified.iat, 7200);
        let header = jsonwebtoken::decode_header(&token).unwrap();
        assert_eq!(header.alg, jsonwebtoken::Algorithm::HS256);
        assert!(header.kid.is_some());
    }

    #[test]
    fn token_of_another_secret_is_refused() {
        let keys = TokenKeys::from_config(&config(SECRET)).unwrap();
        let other =
            TokenKeys::from_config(&config("another-secret-of-at-least-32-bytes!!")).unwrap();
        let (token, _) = other.issue(&subject(), Default::default()).unwrap();
        assert_eq!(keys.verify(&token), Err(Error::InvalidToken));
    }

    #[test]
    fn alg_none_is_refused() {
        let keys = TokenKeys::from_config(&config(SECRET)).unwrap();
        let (token, _) = keys.issue(&subject(), Default::default()).unwrap();
        let payload = token.split('.').nth(1).unwrap();
        let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"none","typ":"JWT"}"#);
        for forged in [
            format!("{header}.{payload}."),
            format!("{header}.{payload}"),
        ] {
            assert_eq!(keys.verify(&forged), Err(Error::InvalidToken));
        }
    }

    #[test]
    fn secret_never_appears_in_the_kid() {
        let keys = TokenKeys::from_config(&config(SECRET)).unwrap();
        let (token, _) = keys.issue(&subject(), Default::default()).unwrap();
        let header = jsonwebtoken::decode_header(&token).unwrap();
        assert!(!header.kid.unwrap().contains("0123456789abcdef"));
    }
}
