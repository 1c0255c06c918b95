//! Access tokens: claims, keys, signing and verification, and the published key set (SPEC §6,
//! §3). No I/O: keys arrive as the text the config loader read.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use bytes::Bytes;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{DecodingKey, EncodingKey, Header, Validation};
use p256::elliptic_curve::sec1::ToEncodedPoint;
use p256::pkcs8::{DecodePrivateKey, DecodePublicKey, EncodePrivateKey, LineEnding};
use rand::RngCore;
use rand::rngs::OsRng;
use rsa::pkcs1::{DecodeRsaPrivateKey, DecodeRsaPublicKey, EncodeRsaPrivateKey};
use rsa::traits::PublicKeyParts;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::config::{
    Algorithm, Config, ConfigError, KeyFile, MAX_TOKEN_LIFETIME, Problem, TokenConfig, as_setting,
};
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
    /// The published key set as JSON text, serialized here once rather than on every request;
    /// `None` under HS256, whose key is a secret.
    jwks: Option<Bytes>,
}

impl TokenKeys {
    /// Fails naming the key at fault, never quoting it.
    pub fn from_config(config: &TokenConfig) -> Result<TokenKeys, Problem> {
        let algorithm = jwt_algorithm(config.algorithm);
        let (encoding, decoding, jwks) = match config.algorithm {
            Algorithm::Hs256 => {
                let secret = config
                    .secret
                    .as_ref()
                    .ok_or_else(|| problem("token.secret", "HS256 needs a secret".into()))?;
                // A PEM key accepted next to an HMAC secret is the classic algorithm-confusion
                // hole; the config loader refuses it too.
                if !config.verify_keys.is_empty() {
                    return Err(problem(
                        "token.verify_keys",
                        "is only for ES256, EdDSA and RS256: HS256 takes token.secret".into(),
                    ));
                }
                let bytes = secret.expose().as_bytes();
                let decoding = vec![(hs256_key_id(config), DecodingKey::from_secret(bytes))];
                (EncodingKey::from_secret(bytes), decoding, None)
            }
            Algorithm::Es256 | Algorithm::EdDsa | Algorithm::Rs256 => {
                let (encoding, published) = asymmetric_keys(config)?;
                let decoding = published
                    .iter()
                    .map(|(kid, key)| (kid.clone(), key.decoding_key()))
                    .collect();
                let keys: Vec<_> = published.iter().map(|(kid, key)| key.jwk(kid)).collect();
                let set = serde_json::json!({ "keys": keys });
                (encoding, decoding, Some(Bytes::from(set.to_string())))
            }
        };
        let mut header = Header::new(algorithm);
        // The signing key is the first of the keys tokens are checked with.
        header.kid = decoding.first().map(|(kid, _)| kid.clone());

        let mut validation = Validation::new(algorithm);
        validation.set_issuer(&[&config.issuer]);
        validation.set_audience(&[&config.audience]);
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        validation.validate_nbf = true;
        validation.leeway = config.leeway.as_secs();

        Ok(TokenKeys {
            header,
            encoding,
            decoding,
            validation,
            issuer: config.issuer.clone(),
            audience: config.audience.clone(),
            access_ttl: config.access_ttl,
            jwks,
        })
    }

    pub fn access_ttl(&self) -> Duration {
        self.access_ttl
    }

    /// The public verification keys as a JWK Set (RFC 7517 §5), signing key first, as the
    /// JSON body of `/.well-known/jwks.json`: a cheap clone. `None` under HS256.
    pub fn jwks_body(&self) -> Option<Bytes> {
        self.jwks.clone()
    }

    /// Signs a new access token for `subject`, valid for `token.access_ttl`, with `extra`
    /// claims minus the reserved names.
    pub fn issue(
        &self,
        subject: &Subject<'_>,
        extra: serde_json::Map<String, serde_json::Value>,
    ) -> Result<(String, Claims), Error> {
        self.issue_with_ttl(subject, extra, self.access_ttl)
    }

    /// [`TokenKeys::issue`] with a lifetime of the caller's choosing (`wxgate token --ttl`).
    pub fn issue_with_ttl(
        &self,
        subject: &Subject<'_>,
        mut extra: serde_json::Map<String, serde_json::Value>,
        ttl: Duration,
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
            exp: iat + ttl.as_secs(),
            extra,
        };
        let token = jsonwebtoken::encode(&self.header, &claims, &self.encoding).map_err(|err| {
            tracing::error!(error = %err, "signing an access token failed");
            Error::Internal
        })?;
        Ok((token, claims))
    }

    /// Verifies signature, algorithm, `iss`, `aud`, `exp` and `nbf` (with leeway). Only the
    /// configured algorithm and the configured keys, found by `kid`, are ever tried.
    pub fn verify(&self, token: &str) -> Result<Claims, Error> {
        let header = jsonwebtoken::decode_header(token).map_err(|_| Error::InvalidToken)?;
        // jsonwebtoken refuses another algorithm too; checking first means a token of another
        // family (HS256 "signed" with a public key) never even meets one of our keys.
        if header.alg != self.header.alg {
            return Err(Error::InvalidToken);
        }
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

fn jwt_algorithm(algorithm: Algorithm) -> jsonwebtoken::Algorithm {
    match algorithm {
        Algorithm::Hs256 => jsonwebtoken::Algorithm::HS256,
        Algorithm::Es256 => jsonwebtoken::Algorithm::ES256,
        Algorithm::EdDsa => jsonwebtoken::Algorithm::EdDSA,
        Algorithm::Rs256 => jsonwebtoken::Algorithm::RS256,
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
fn hs256_key_id(config: &TokenConfig) -> String {
    let mut hasher = Sha256::new();
    hasher.update(b"wxgate kid\0");
    if let Some(secret) = &config.secret {
        hasher.update(secret.expose().as_bytes());
    }
    hex::encode(&hasher.finalize()[..8])
}

/// The signing key, and the public half of every key tokens are accepted with, each with its
/// kid: the signing key's first, then `verify_keys`, a key listed twice kept once.
fn asymmetric_keys(
    config: &TokenConfig,
) -> Result<(EncodingKey, Vec<(String, PublicKey)>), Problem> {
    let algorithm = config.algorithm;
    let file = config.signing_key.as_ref().ok_or_else(|| {
        problem(
            "token.signing_key",
            format!(
                "is required with algorithm {} (a private key in PEM)",
                algorithm.name()
            ),
        )
    })?;
    let (encoding, signing) = read_signing_key(file, algorithm)?;
    let mut published = vec![(signing.thumbprint(), signing)];
    for (index, file) in config.verify_keys.iter().enumerate() {
        let key = read_key(file, &format!("token.verify_keys[{index}]"), algorithm)?.public;
        let kid = key.thumbprint();
        if !published.iter().any(|(known, _)| *known == kid) {
            published.push((kid, key));
        }
    }
    Ok((encoding, published))
}

/// Reads `token.signing_key`, which must hold the private half.
fn read_signing_key(
    file: &KeyFile,
    algorithm: Algorithm,
) -> Result<(EncodingKey, PublicKey), Problem> {
    let signing = read_key(file, "token.signing_key", algorithm)?;
    let encoding = signing.private.ok_or_else(|| {
        problem(
            "token.signing_key",
            "is a public key; signing needs the private key (a PEM PRIVATE KEY)".into(),
        )
    })?;
    Ok((encoding, signing.public))
}

/// What is wrong with `token.signing_key` for `algorithm`, read as [`TokenKeys::from_config`]
/// will read it: the config's validation asks this, so that a bad key is listed with every
/// other problem of the file rather than alone, once the rest is mended.
pub(crate) fn signing_key_problem(file: &KeyFile, algorithm: Algorithm) -> Option<Problem> {
    read_signing_key(file, algorithm).err()
}

/// [`signing_key_problem`] for the verification key given as `key`.
pub(crate) fn verify_key_problem(
    file: &KeyFile,
    key: &str,
    algorithm: Algorithm,
) -> Option<Problem> {
    read_key(file, key, algorithm).err()
}

/// The public half of a key: what tokens are verified with, and what the JWKS publishes.
enum PublicKey {
    P256(p256::PublicKey),
    Ed25519(ed25519_dalek::VerifyingKey),
    Rsa(rsa::RsaPublicKey),
}

/// What one key file holds: the public half always, the private half when the file had it.
struct KeyPair {
    public: PublicKey,
    private: Option<EncodingKey>,
}

/// RSA keys below this many bits are refused: 2048 is NIST's floor (SP 800-57 part 1).
const MIN_RSA_BITS: usize = 2048;

impl PublicKey {
    fn algorithm(&self) -> Algorithm {
        match self {
            PublicKey::P256(_) => Algorithm::Es256,
            PublicKey::Ed25519(_) => Algorithm::EdDsa,
            PublicKey::Rsa(_) => Algorithm::Rs256,
        }
    }

    fn describe(&self) -> &'static str {
        match self {
            PublicKey::P256(_) => "a P-256 key (ES256)",
            PublicKey::Ed25519(_) => "an Ed25519 key (EdDSA)",
            PublicKey::Rsa(_) => "an RSA key (RS256)",
        }
    }

    /// The members of the key's JWK that RFC 7638 §3.2 requires, in the lexicographic order
    /// its thumbprint hashes them in.
    fn required_members(&self) -> Vec<(&'static str, String)> {
        match self {
            PublicKey::P256(key) => {
                // Uncompressed SEC1: 0x04, then x and y of 32 bytes each (a public key is never
                // the identity point, the one point without coordinates).
                let point = key.to_encoded_point(false);
                let (x, y) = point.as_bytes()[1..].split_at(32);
                vec![
                    ("crv", "P-256".into()),
                    ("kty", "EC".into()),
                    ("x", URL_SAFE_NO_PAD.encode(x)),
                    ("y", URL_SAFE_NO_PAD.encode(y)),
                ]
            }
            PublicKey::Ed25519(key) => vec![
                ("crv", "Ed25519".into()),
                ("kty", "OKP".into()),
                ("x", URL_SAFE_NO_PAD.encode(key.as_bytes())),
            ],
            PublicKey::Rsa(key) => vec![
                ("e", URL_SAFE_NO_PAD.encode(key.e().to_bytes_be())),
                ("kty", "RSA".into()),
                ("n", URL_SAFE_NO_PAD.encode(key.n().to_bytes_be())),
            ],
        }
    }

    /// The RFC 7638 JWK thumbprint (SHA-256, base64url): a kid derived from the public key
    /// alone, so a private key and its public half name themselves alike, and any verifier
    /// can recompute it from the published JWK.
    fn thumbprint(&self) -> String {
        // The members are base64url text and fixed names: nothing in them needs JSON escaping.
        let members: Vec<String> = self
            .required_members()
            .into_iter()
            .map(|(name, value)| format!("\"{name}\":\"{value}\""))
            .collect();
        let canonical = format!("{{{}}}", members.join(","));
        URL_SAFE_NO_PAD.encode(Sha256::digest(canonical.as_bytes()))
    }

    /// The public JWK (RFC 7517), with nothing of the private key in it.
    fn jwk(&self, kid: &str) -> serde_json::Value {
        let mut jwk: serde_json::Map<String, serde_json::Value> = self
            .required_members()
            .into_iter()
            .map(|(name, value)| (name.to_string(), value.into()))
            .collect();
        jwk.insert("kid".into(), kid.into());
        jwk.insert("alg".into(), self.algorithm().name().into());
        jwk.insert("use".into(), "sig".into());
        jwk.into()
    }

    fn decoding_key(&self) -> DecodingKey {
        match self {
            PublicKey::P256(key) => {
                DecodingKey::from_ec_der(key.to_encoded_point(false).as_bytes())
            }
            PublicKey::Ed25519(key) => DecodingKey::from_ed_der(key.as_bytes()),
            PublicKey::Rsa(key) => {
                DecodingKey::from_rsa_raw_components(&key.n().to_bytes_be(), &key.e().to_bytes_be())
            }
        }
    }
}

impl KeyPair {
    fn public(public: PublicKey) -> KeyPair {
        KeyPair {
            public,
            private: None,
        }
    }

    // jsonwebtoken's signers read PKCS#8 DER for ES256 and EdDSA and PKCS#1 DER for RS256, so
    // each private key is re-encoded to what its signer reads, whatever the file's format was.

    fn p256(secret: p256::SecretKey) -> Option<KeyPair> {
        let der = secret.to_pkcs8_der().ok()?;
        Some(KeyPair {
            public: PublicKey::P256(secret.public_key()),
            private: Some(EncodingKey::from_ec_der(der.as_bytes())),
        })
    }

    fn ed25519(secret: ed25519_dalek::SigningKey) -> Option<KeyPair> {
        let der = secret.to_pkcs8_der().ok()?;
        Some(KeyPair {
            public: PublicKey::Ed25519(secret.verifying_key()),
            private: Some(EncodingKey::from_ed_der(der.as_bytes())),
        })
    }

    fn rsa(secret: rsa::RsaPrivateKey) -> Option<KeyPair> {
        let der = secret.to_pkcs1_der().ok()?;
        Some(KeyPair {
            public: PublicKey::Rsa(secret.to_public_key()),
            private: Some(EncodingKey::from_rsa_der(der.as_bytes())),
        })
    }
}

/// Reads one PEM key meant for `algorithm`: PKCS#8 `PRIVATE KEY`, SEC1 `EC PRIVATE KEY`,
/// PKCS#1 `RSA PRIVATE KEY`, SPKI `PUBLIC KEY` or PKCS#1 `RSA PUBLIC KEY`. Messages name the
/// config key and say what is wrong, never quoting the file.
fn read_key(file: &KeyFile, key: &str, algorithm: Algorithm) -> Result<KeyPair, Problem> {
    let fail = |message: &str| problem(key, message.into());
    let blocks =
        pem::parse_many(file.pem.expose()).map_err(|_| fail("is not a readable PEM file"))?;
    // `openssl ecparam -genkey` writes the curve's parameters ahead of the key, and the key
    // names its curve itself.
    let blocks: Vec<_> = blocks
        .iter()
        .filter(|block| block.tag() != "EC PARAMETERS")
        .collect();
    let block = match blocks.as_slice() {
        [block] => block,
        [] => return Err(fail("holds no PEM key (-----BEGIN PRIVATE KEY----- …)")),
        _ => return Err(fail("holds more than one PEM block; keep one key per file")),
    };
    let der = block.contents();
    let pair = match block.tag() {
        "PRIVATE KEY" => p256::SecretKey::from_pkcs8_der(der)
            .ok()
            .and_then(KeyPair::p256)
            .or_else(|| {
                ed25519_dalek::SigningKey::from_pkcs8_der(der)
                    .ok()
                    .and_then(KeyPair::ed25519)
            })
            .or_else(|| {
                rsa::RsaPrivateKey::from_pkcs8_der(der)
                    .ok()
                    .and_then(KeyPair::rsa)
            }),
        "EC PRIVATE KEY" => p256::SecretKey::from_sec1_der(der)
            .ok()
            .and_then(KeyPair::p256),
        "RSA PRIVATE KEY" => rsa::RsaPrivateKey::from_pkcs1_der(der)
            .ok()
            .and_then(KeyPair::rsa),
        "PUBLIC KEY" => p256::PublicKey::from_public_key_der(der)
            .map(PublicKey::P256)
            .or_else(|_| {
                ed25519_dalek::VerifyingKey::from_public_key_der(der).map(PublicKey::Ed25519)
            })
            .or_else(|_| rsa::RsaPublicKey::from_public_key_der(der).map(PublicKey::Rsa))
            .ok()
            .map(KeyPair::public),
        "RSA PUBLIC KEY" => rsa::RsaPublicKey::from_pkcs1_der(der)
            .ok()
            .map(|public| KeyPair::public(PublicKey::Rsa(public))),
        "ENCRYPTED PRIVATE KEY" => {
            return Err(fail(
                "is encrypted; wxgate reads unencrypted keys (`openssl pkcs8 -nocrypt` writes one)",
            ));
        }
        _ => return Err(fail("holds no PRIVATE KEY or PUBLIC KEY PEM block")),
    };
    let pair = pair.ok_or_else(|| fail("holds no P-256, Ed25519 or RSA key that can be read"))?;
    if pair.public.algorithm() != algorithm {
        return Err(problem(
            key,
            format!(
                "holds {}, but token.algorithm is {}",
                pair.public.describe(),
                algorithm.name()
            ),
        ));
    }
    if let PublicKey::Rsa(public) = &pair.public
        && public.n().bits() < MIN_RSA_BITS
    {
        return Err(problem(
            key,
            format!(
                "holds an RSA key of {} bits; RS256 needs at least {MIN_RSA_BITS}",
                public.n().bits()
            ),
        ));
    }
    Ok(pair)
}

/// The modulus size of `wxgate keygen --alg RS256`: NIST's floor (SP 800-57, fine through
/// 2030), and the cheapest RS256 signature (one per login and refresh). Operators who want more
/// bring their own key from openssl.
const KEYGEN_RSA_BITS: usize = 2048;

/// A new key for `algorithm` (`wxgate keygen`). HS256: 48 random bytes in base64, 64 characters
/// of key text where the config asks for at least 32. Otherwise: a private key in PKCS#8 PEM,
/// ready for `token.signing_key`.
pub fn keygen(algorithm: Algorithm) -> anyhow::Result<String> {
    let pem = match algorithm {
        Algorithm::Hs256 => {
            let mut secret = [0u8; 48];
            OsRng.try_fill_bytes(&mut secret)?;
            return Ok(STANDARD.encode(secret));
        }
        Algorithm::Es256 => p256::SecretKey::random(&mut OsRng).to_pkcs8_pem(LineEnding::LF)?,
        Algorithm::EdDsa => {
            let mut seed = [0u8; 32];
            OsRng.try_fill_bytes(&mut seed)?;
            ed25519_dalek::SigningKey::from_bytes(&seed).to_pkcs8_pem(LineEnding::LF)?
        }
        Algorithm::Rs256 => {
            rsa::RsaPrivateKey::new(&mut OsRng, KEYGEN_RSA_BITS)?.to_pkcs8_pem(LineEnding::LF)?
        }
    };
    Ok(pem.to_string())
}

/// What `wxgate token` asks for.
pub struct MintRequest<'a> {
    pub openid: &'a str,
    /// May be left out when exactly one app is configured, as at login.
    pub appid: Option<&'a str>,
    /// `None`: `token.access_ttl`.
    pub ttl: Option<Duration>,
}

/// Mints an access token with the configured keys outside any login (`wxgate token`, for
/// operators and debugging). Its session id is fresh and random: no refresh token or
/// session_key goes with it, and nothing is stored.
pub fn mint(config: &Config, request: &MintRequest<'_>) -> anyhow::Result<String> {
    if request.openid.is_empty() {
        anyhow::bail!("--openid must not be empty");
    }
    let apps = &config.wechat.apps;
    let appid = match request.appid {
        Some(appid) if apps.iter().any(|app| app.appid == appid) => appid,
        Some(appid) => anyhow::bail!("app {appid} is not configured in wechat.apps"),
        None => match apps.as_slice() {
            [app] => app.appid.as_str(),
            _ => anyhow::bail!("--appid is needed: {} apps are configured", apps.len()),
        },
    };
    let ttl = request.ttl.unwrap_or(config.token.access_ttl);
    // exp counts whole seconds: anything shorter would mint a token already expired.
    if ttl.as_secs() == 0 {
        anyhow::bail!("--ttl must be at least 1s");
    }
    if ttl > MAX_TOKEN_LIFETIME {
        anyhow::bail!("--ttl must be at most {}", as_setting(MAX_TOKEN_LIFETIME));
    }
    let keys = TokenKeys::from_config(&config.token).map_err(|problem| ConfigError {
        problems: vec![problem],
    })?;
    let sid = uuid::Uuid::new_v4().simple().to_string();
    let subject = Subject {
        appid,
        openid: request.openid,
        unionid: None,
        sid: &sid,
    };
    let (token, _) = keys
        .issue_with_ttl(&subject, serde_json::Map::new(), ttl)
        .map_err(|_| anyhow::anyhow!("signing the token failed"))?;
    Ok(token)
}

pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|elapsed| elapsed.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};
    use std::sync::OnceLock;

    use p256::pkcs8::EncodePublicKey;
    use rsa::pkcs1::{EncodeRsaPrivateKey, EncodeRsaPublicKey};

    use super::*;
    use crate::config::Secret;

    const SECRET: &str = "0123456789abcdef0123456789abcdef-test";
    const ASYMMETRIC: [Algorithm; 3] = [Algorithm::Es256, Algorithm::EdDsa, Algorithm::Rs256];

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

    fn key_file(pem: &str) -> KeyFile {
        KeyFile {
            path: PathBuf::from("/etc/wxgate/keys/test.pem"),
            pem: Secret::new(pem),
        }
    }

    fn asymmetric(algorithm: Algorithm, signing: &str, verify: &[&str]) -> TokenConfig {
        TokenConfig {
            algorithm,
            secret: None,
            signing_key: Some(key_file(signing)),
            verify_keys: verify.iter().map(|pem| key_file(pem)).collect(),
            ..config(SECRET)
        }
    }

    fn keys_for(algorithm: Algorithm, signing: &str, verify: &[&str]) -> TokenKeys {
        TokenKeys::from_config(&asymmetric(algorithm, signing, verify)).unwrap()
    }

    /// A private key from `keygen`. RSA keys are slow to make, so the RSA tests share one.
    fn private_pem(algorithm: Algorithm) -> String {
        static RSA: OnceLock<String> = OnceLock::new();
        match algorithm {
            Algorithm::Rs256 => RSA.get_or_init(|| keygen(algorithm).unwrap()).clone(),
            other => keygen(other).unwrap(),
        }
    }

    /// The public half of a PKCS#8 private key, as `openssl pkey -pubout` writes it.
    fn public_pem(private: &str) -> String {
        if let Ok(key) = p256::SecretKey::from_pkcs8_pem(private) {
            return key.public_key().to_public_key_pem(LineEnding::LF).unwrap();
        }
        if let Ok(key) = ed25519_dalek::SigningKey::from_pkcs8_pem(private) {
            return key
                .verifying_key()
                .to_public_key_pem(LineEnding::LF)
                .unwrap();
        }
        rsa::RsaPrivateKey::from_pkcs8_pem(private)
            .unwrap()
            .to_public_key()
            .to_public_key_pem(LineEnding::LF)
            .unwrap()
    }

    fn kid_of_file(pem: &str, algorithm: Algorithm) -> String {
        read_key(&key_file(pem), "k", algorithm)
            .unwrap()
            .public
            .thumbprint()
    }

    fn jwks(keys: &TokenKeys) -> serde_json::Value {
        serde_json::from_slice(&keys.jwks_body().unwrap()).unwrap()
    }

    fn kid_of_token(token: &str) -> String {
        jsonwebtoken::decode_header(token).unwrap().kid.unwrap()
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
    fn every_algorithm_signs_and_verifies() {
        for algorithm in ASYMMETRIC {
            let private = private_pem(algorithm);
            let keys = keys_for(algorithm, &private, &[]);
            let (token, issued) = keys.issue(&subject(), Default::default()).unwrap();
            assert_eq!(keys.verify(&token), Ok(issued), "{}", algorithm.name());
            let header = jsonwebtoken::decode_header(&token).unwrap();
            assert_eq!(header.alg, jwt_algorithm(algorithm));
            assert_eq!(header.kid, Some(kid_of_file(&private, algorithm)));
        }
    }

    #[test]
    fn issue_with_ttl_sets_the_lifetime() {
        let keys = keys_for(Algorithm::Es256, &private_pem(Algorithm::Es256), &[]);
        let (token, issued) = keys
            .issue_with_ttl(&subject(), Default::default(), Duration::from_secs(90))
            .unwrap();
        assert_eq!(issued.exp - issued.iat, 90);
        assert_eq!(keys.verify(&token), Ok(issued));
    }

    #[test]
    fn kid_of_a_private_key_equals_kid_of_its_public_key() {
        for algorithm in ASYMMETRIC {
            let private = private_pem(algorithm);
            let kid = kid_of_file(&private, algorithm);
            assert_eq!(kid_of_file(&public_pem(&private), algorithm), kid);
            // Listed again as a verify key, public or private, it is one key, published once.
            let keys = keys_for(algorithm, &private, &[&public_pem(&private), &private]);
            assert_eq!(jwks(&keys)["keys"].as_array().unwrap().len(), 1);
        }
    }

    #[test]
    fn sec1_and_pkcs1_keys_are_read_with_the_same_kid() {
        let ec = p256::SecretKey::random(&mut OsRng);
        let pkcs8 = ec.to_pkcs8_pem(LineEnding::LF).unwrap();
        let sec1 = ec.to_sec1_pem(LineEnding::LF).unwrap();
        // What `openssl ecparam -genkey -name prime256v1` writes: parameters, then the key.
        let with_parameters = format!(
            "-----BEGIN EC PARAMETERS-----\nBggqhkjOPQMBBw==\n-----END EC PARAMETERS-----\n{}",
            *sec1
        );
        let kid = kid_of_file(&pkcs8, Algorithm::Es256);
        assert_eq!(kid_of_file(&sec1, Algorithm::Es256), kid);
        assert_eq!(kid_of_file(&with_parameters, Algorithm::Es256), kid);
        let keys = keys_for(Algorithm::Es256, &with_parameters, &[&pkcs8]);
        let (token, _) = keys.issue(&subject(), Default::default()).unwrap();
        assert!(keys.verify(&token).is_ok());

        let rsa = rsa::RsaPrivateKey::from_pkcs8_pem(&private_pem(Algorithm::Rs256)).unwrap();
        let pkcs1 = rsa.to_pkcs1_pem(LineEnding::LF).unwrap();
        let pkcs1_public = rsa.to_public_key().to_pkcs1_pem(LineEnding::LF).unwrap();
        let kid = kid_of_file(&private_pem(Algorithm::Rs256), Algorithm::Rs256);
        assert_eq!(kid_of_file(&pkcs1, Algorithm::Rs256), kid);
        assert_eq!(kid_of_file(&pkcs1_public, Algorithm::Rs256), kid);
        let keys = keys_for(Algorithm::Rs256, &pkcs1, &[]);
        let (token, _) = keys.issue(&subject(), Default::default()).unwrap();
        assert!(keys.verify(&token).is_ok());
    }

    #[test]
    fn kid_is_the_rfc7638_thumbprint() {
        // RFC 7638 §3.1: this RSA key's thumbprint.
        let n = "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_BJECPebWKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_FDW2QvzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw";
        let key = rsa::RsaPublicKey::new(
            rsa::BigUint::from_bytes_be(&URL_SAFE_NO_PAD.decode(n).unwrap()),
            rsa::BigUint::from(65537u32),
        )
        .unwrap();
        assert_eq!(
            PublicKey::Rsa(key).thumbprint(),
            "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"
        );
    }

    #[test]
    fn rotated_out_key_still_verifies_and_new_tokens_carry_the_new_kid() {
        for algorithm in ASYMMETRIC {
            let old = private_pem(algorithm);
            // The shared RSA key cannot be its own successor.
            let new = match algorithm {
                Algorithm::Rs256 => keygen(algorithm).unwrap(),
                _ => private_pem(algorithm),
            };
            let before = keys_for(algorithm, &old, &[]);
            let (old_token, old_claims) = before.issue(&subject(), Default::default()).unwrap();

            // The rotation: the new key signs, the old one (its public half is enough) verifies.
            let after = keys_for(algorithm, &new, &[&public_pem(&old)]);
            assert_eq!(after.verify(&old_token), Ok(old_claims));
            let (new_token, _) = after.issue(&subject(), Default::default()).unwrap();
            assert_eq!(kid_of_token(&new_token), kid_of_file(&new, algorithm));
            assert_eq!(kid_of_token(&old_token), kid_of_file(&old, algorithm));
            assert_ne!(kid_of_token(&new_token), kid_of_token(&old_token));
            // A replica still on the old config does not know the new key.
            assert_eq!(before.verify(&new_token), Err(Error::InvalidToken));
        }
    }

    #[test]
    fn hs256_token_made_with_the_public_key_is_refused() {
        for algorithm in ASYMMETRIC {
            let private = private_pem(algorithm);
            let keys = keys_for(algorithm, &private, &[]);
            let (token, claims) = keys.issue(&subject(), Default::default()).unwrap();
            let public = public_pem(&private);
            let der = pem::parse(&public).unwrap().contents().to_vec();
            let mut header = Header::new(jsonwebtoken::Algorithm::HS256);
            header.kid = Some(kid_of_token(&token));
            for secret in [public.as_bytes(), der.as_slice()] {
                let forged =
                    jsonwebtoken::encode(&header, &claims, &EncodingKey::from_secret(secret))
                        .unwrap();
                assert_eq!(
                    keys.verify(&forged),
                    Err(Error::InvalidToken),
                    "{}",
                    algorithm.name()
                );
            }
        }
    }

    #[test]
    fn alg_none_is_refused() {
        let hs256 = TokenKeys::from_config(&config(SECRET)).unwrap();
        let es256 = keys_for(Algorithm::Es256, &private_pem(Algorithm::Es256), &[]);
        for keys in [hs256, es256] {
            let (token, _) = keys.issue(&subject(), Default::default()).unwrap();
            let payload = token.split('.').nth(1).unwrap();
            let kid = kid_of_token(&token);
            for header in [
                r#"{"alg":"none","typ":"JWT"}"#.to_string(),
                format!(r#"{{"alg":"none","typ":"JWT","kid":"{kid}"}}"#),
            ] {
                let header = URL_SAFE_NO_PAD.encode(header);
                for forged in [
                    format!("{header}.{payload}."),
                    format!("{header}.{payload}"),
                ] {
                    assert_eq!(keys.verify(&forged), Err(Error::InvalidToken));
                }
            }
        }
    }

    #[test]
    fn token_of_an_unknown_key_is_refused() {
        let keys = keys_for(Algorithm::Es256, &private_pem(Algorithm::Es256), &[]);
        let stranger = keys_for(Algorithm::Es256, &private_pem(Algorithm::Es256), &[]);
        let (token, claims) = stranger.issue(&subject(), Default::default()).unwrap();
        assert_eq!(keys.verify(&token), Err(Error::InvalidToken));
        // The stranger's signature under our kid: found by kid, refused by signature.
        let mut header = Header::new(jsonwebtoken::Algorithm::ES256);
        header.kid = Some(kid_of_token(
            &keys.issue(&subject(), Default::default()).unwrap().0,
        ));
        let forged = jsonwebtoken::encode(&header, &claims, &stranger.encoding).unwrap();
        assert_eq!(keys.verify(&forged), Err(Error::InvalidToken));
        // No kid at all.
        let forged =
            jsonwebtoken::encode(&Header::new(header.alg), &claims, &stranger.encoding).unwrap();
        assert_eq!(keys.verify(&forged), Err(Error::InvalidToken));
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
    fn jwks_lists_every_key_public_only() {
        let private_members = ["d", "p", "q", "dp", "dq", "qi", "oth", "k"];
        for algorithm in ASYMMETRIC {
            let signing = private_pem(algorithm);
            // The shared RSA key cannot be its own rotation partner: a 2048-bit public key
            // stands in for the second one.
            let other = match algorithm {
                Algorithm::Rs256 => rsa::RsaPrivateKey::new(&mut OsRng, 2048)
                    .unwrap()
                    .to_pkcs8_pem(LineEnding::LF)
                    .unwrap()
                    .to_string(),
                _ => private_pem(algorithm),
            };
            let keys = keys_for(algorithm, &signing, &[&other]);
            let set = jwks(&keys);
            let published = set["keys"].as_array().unwrap();
            let kids: Vec<&str> = published
                .iter()
                .map(|k| k["kid"].as_str().unwrap())
                .collect();
            assert_eq!(
                kids,
                [
                    kid_of_file(&signing, algorithm).as_str(),
                    kid_of_file(&other, algorithm).as_str()
                ]
            );
            for jwk in published {
                let members: Vec<&str> = jwk
                    .as_object()
                    .unwrap()
                    .keys()
                    .map(String::as_str)
                    .collect();
                for private in private_members {
                    assert!(!members.contains(&private), "{private} in {jwk}");
                }
                assert_eq!(jwk["alg"], algorithm.name());
                assert_eq!(jwk["use"], "sig");
                let expected: &[&str] = match algorithm {
                    Algorithm::Es256 => &["alg", "crv", "kid", "kty", "use", "x", "y"],
                    Algorithm::EdDsa => &["alg", "crv", "kid", "kty", "use", "x"],
                    _ => &["alg", "e", "kid", "kty", "n", "use"],
                };
                let mut sorted = members.clone();
                sorted.sort_unstable();
                assert_eq!(sorted, expected);
                // Whatever jsonwebtoken makes of the published JWK verifies our tokens.
                let (token, _) = keys.issue(&subject(), Default::default()).unwrap();
                if jwk["kid"] == kid_of_token(&token) {
                    let jwk: jsonwebtoken::jwk::Jwk = serde_json::from_value(jwk.clone()).unwrap();
                    let key = DecodingKey::from_jwk(&jwk).unwrap();
                    assert!(jsonwebtoken::decode::<Claims>(&token, &key, &keys.validation).is_ok());
                }
            }
        }
    }

    #[test]
    fn hs256_publishes_no_jwks() {
        let keys = TokenKeys::from_config(&config(SECRET)).unwrap();
        assert!(keys.jwks_body().is_none());
    }

    #[test]
    fn key_problems_name_the_key_and_never_quote_it() {
        let es256 = private_pem(Algorithm::Es256);
        let ed25519 = private_pem(Algorithm::EdDsa);
        let short_rsa = rsa::RsaPrivateKey::new(&mut OsRng, 1024)
            .unwrap()
            .to_pkcs8_pem(LineEnding::LF)
            .unwrap()
            .to_string();
        let garbled =
            "-----BEGIN PRIVATE KEY-----\nbm90IGEga2V5IGF0IGFsbA==\n-----END PRIVATE KEY-----\n";
        let encrypted = es256.replace("PRIVATE KEY", "ENCRYPTED PRIVATE KEY");
        let two = format!("{es256}{es256}");
        let public = public_pem(&es256);
        let cases: Vec<(TokenConfig, &str, &str)> = vec![
            (
                asymmetric(Algorithm::Es256, "not a key", &[]),
                "token.signing_key",
                "no PEM key",
            ),
            (
                asymmetric(Algorithm::Es256, garbled, &[]),
                "token.signing_key",
                "no P-256, Ed25519 or RSA key",
            ),
            (
                asymmetric(Algorithm::Es256, &encrypted, &[]),
                "token.signing_key",
                "encrypted",
            ),
            (
                asymmetric(Algorithm::Es256, &two, &[]),
                "token.signing_key",
                "more than one",
            ),
            (
                asymmetric(Algorithm::Es256, &public, &[]),
                "token.signing_key",
                "public key",
            ),
            (
                asymmetric(Algorithm::Es256, &ed25519, &[]),
                "token.signing_key",
                "holds an Ed25519 key (EdDSA), but token.algorithm is ES256",
            ),
            (
                asymmetric(Algorithm::Es256, &es256, &[&es256, &ed25519]),
                "token.verify_keys[1]",
                "holds an Ed25519 key (EdDSA), but token.algorithm is ES256",
            ),
            (
                asymmetric(Algorithm::Rs256, &short_rsa, &[]),
                "token.signing_key",
                "1024 bits",
            ),
            (
                TokenConfig {
                    signing_key: None,
                    ..asymmetric(Algorithm::EdDsa, &ed25519, &[])
                },
                "token.signing_key",
                "is required",
            ),
        ];
        for (config, key, says) in cases {
            let problem = TokenKeys::from_config(&config).err().unwrap();
            assert_eq!(problem.key, key, "{problem:?}");
            assert!(problem.message.contains(says), "{problem:?}");
            let files = config.signing_key.iter().chain(&config.verify_keys);
            for line in files.flat_map(|file| file.pem.expose().lines()) {
                if !line.starts_with("-----") && line.len() > 8 {
                    assert!(!problem.message.contains(line), "{problem:?}");
                }
            }
        }
    }

    #[test]
    fn keygen_hs256_is_a_long_base64_secret() {
        let secret = keygen(Algorithm::Hs256).unwrap();
        assert_eq!(STANDARD.decode(&secret).unwrap().len(), 48);
        assert!(secret.len() > 32);
        assert_ne!(secret, keygen(Algorithm::Hs256).unwrap());
    }

    fn two_app_config(algorithm_section: &str) -> Config {
        let text = format!(
            r#"
[[wechat.apps]]
appid = "wx0000000000000a01"
secret = "app-secret-a"

[[wechat.apps]]
appid = "wx0000000000000b02"
secret = "app-secret-b"

[token]
{algorithm_section}
access_ttl = "10m"

[[routes]]
path = "/api/"
upstream = "http://127.0.0.1:3000"
auth = "required"
"#
        );
        Config::parse(&text, Path::new("/etc/wxgate/config.toml"), &|_| None).unwrap()
    }

    #[test]
    fn mint_needs_a_configured_app() {
        let config = two_app_config(&format!("secret = \"{SECRET}\""));
        let request = |appid| MintRequest {
            openid: "o-cli",
            appid,
            ttl: None,
        };
        let err = mint(&config, &request(None)).unwrap_err().to_string();
        assert!(err.contains("--appid is needed"), "{err}");
        let err = mint(&config, &request(Some("wx-unknown")))
            .unwrap_err()
            .to_string();
        assert!(err.contains("not configured"), "{err}");

        let token = mint(&config, &request(Some("wx0000000000000b02"))).unwrap();
        let keys = TokenKeys::from_config(&config.token).unwrap();
        let claims = keys.verify(&token).unwrap();
        assert_eq!(claims.sub, "o-cli");
        assert_eq!(claims.appid, "wx0000000000000b02");
        assert_eq!(claims.exp - claims.iat, 600);
        let again = keys.verify(&mint(&config, &request(Some("wx0000000000000b02"))).unwrap());
        assert_ne!(again.unwrap().sid, claims.sid);
    }
}
