//! Bearer tokens as an attacker can send them: any `Authorization` header, any token text, and
//! real tokens with their header, payload or signature changed. Parsing and verification must
//! never panic, and a token is accepted only if its signed part (header and payload) is one the
//! key signed.

#![no_main]

use std::sync::LazyLock;
use std::time::Duration;

use arbitrary::Arbitrary;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use http::header::{AUTHORIZATION, HeaderMap, HeaderValue};
use libfuzzer_sys::fuzz_target;
use wxgate::config::{Algorithm, KeyFile, Secret, TokenConfig};
use wxgate::token::TokenKeys;

const HS256_SECRET: &str = "fuzz-secret-0123456789abcdef0123456789";

/// A fixed key, so that a crash found once reproduces.
const ES256_KEY: &str = "-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgtOciZTTz8HBy8yfj
NqgrekDMGjU04Q9MmUWsa1DSxqahRANCAATPke2UnTeD++rk+HTlA2ABfogSqhxI
4YKWoAU2gre+3woWHHWuV7ukk4uXAG30rZ/lp6udd14IidcTELceFCy4
-----END PRIVATE KEY-----
";

/// One key set and the one token signed with it.
struct Signer {
    keys: TokenKeys,
    token: String,
}

impl Signer {
    fn new(algorithm: Algorithm) -> Signer {
        let config = TokenConfig {
            issuer: "wxgate".into(),
            audience: "api".into(),
            algorithm,
            secret: (algorithm == Algorithm::Hs256).then(|| Secret::new(HS256_SECRET)),
            signing_key: (algorithm == Algorithm::Es256).then(|| KeyFile {
                path: "fuzz.pem".into(),
                pem: Secret::new(ES256_KEY),
            }),
            verify_keys: Vec::new(),
            access_ttl: Duration::from_secs(3600),
            refresh_ttl: Duration::from_secs(3600),
            leeway: Duration::from_secs(30),
        };
        let keys = TokenKeys::from_config(&config).expect("the fuzz keys are valid");
        let token = Signer::fixed_token(&keys, &config);
        assert!(keys.verify(&token).is_ok(), "the real token verifies");
        Signer { keys, token }
    }

    /// A token with fixed claims, signed with the key's own header: the gateway's `issue`
    /// draws a fresh `jti` and `iat` each time, and inputs must mean the same thing each run.
    fn fixed_token(keys: &TokenKeys, config: &TokenConfig) -> String {
        let issued = keys
            .issue(
                &wxgate::token::Subject {
                    appid: "wx0000000000000a01",
                    openid: "o-fuzz",
                    unionid: None,
                    sid: "s-fuzz",
                },
                Default::default(),
            )
            .expect("signing works")
            .0;
        let header = jsonwebtoken::decode_header(&issued).expect("an issued token has a header");
        let claims = serde_json::json!({
            "iss": "wxgate", "aud": "api", "sub": "o-fuzz", "appid": "wx0000000000000a01",
            "sid": "s-fuzz", "jti": "0", "iat": 1_700_000_000u64, "exp": 4_000_000_000u64,
        });
        let key = match &config.secret {
            Some(secret) => jsonwebtoken::EncodingKey::from_secret(secret.expose().as_bytes()),
            None => jsonwebtoken::EncodingKey::from_ec_pem(ES256_KEY.as_bytes())
                .expect("the fuzz key is a P-256 key"),
        };
        jsonwebtoken::encode(&header, &claims, &key).expect("signing works")
    }

    /// Verifies `token`; acceptance is only allowed for this signer's own signed part.
    fn check(&self, token: &str) {
        if self.keys.verify(token).is_ok() {
            assert_eq!(
                signed_part(token),
                signed_part(&self.token),
                "accepted a token the key never signed: {token}"
            );
        }
    }
}

/// The header and payload: what the signature covers.
fn signed_part(token: &str) -> &str {
    token.rsplit_once('.').map_or(token, |(signed, _)| signed)
}

static SIGNERS: LazyLock<[Signer; 2]> =
    LazyLock::new(|| [Signer::new(Algorithm::Hs256), Signer::new(Algorithm::Es256)]);

#[derive(Arbitrary, Debug)]
enum Case<'a> {
    /// An `Authorization` header value, bytes as sent.
    Header(&'a [u8]),
    /// A real token with bytes spliced into one of its three parts.
    Spliced {
        es256: bool,
        part: u8,
        at: u16,
        remove: u8,
        insert: &'a [u8],
    },
    /// A real token's header and signature around another payload (base64url of `payload`).
    Payload { es256: bool, payload: &'a [u8] },
    /// A token of any header, payload and signature, each base64url-encoded.
    Parts {
        header: &'a [u8],
        payload: &'a [u8],
        signature: &'a [u8],
    },
}

fuzz_target!(|case: Case<'_>| {
    let signers = &*SIGNERS;
    let token = match case {
        Case::Header(value) => {
            let Ok(value) = HeaderValue::from_bytes(value) else {
                return;
            };
            let mut headers = HeaderMap::new();
            headers.insert(AUTHORIZATION, value);
            match wxgate::auth::bearer_token(&headers) {
                Ok(Some(token)) => token.to_string(),
                _ => return,
            }
        }
        Case::Spliced {
            es256,
            part,
            at,
            remove,
            insert,
        } => {
            let original = &signers[usize::from(es256)].token;
            let mut parts: Vec<Vec<u8>> =
                original.split('.').map(|p| p.as_bytes().to_vec()).collect();
            let part = &mut parts[usize::from(part) % 3];
            let at = usize::from(at) % (part.len() + 1);
            let end = (at + usize::from(remove)).min(part.len());
            part.splice(at..end, insert.iter().copied());
            String::from_utf8_lossy(&parts.join(&b'.')).into_owned()
        }
        Case::Payload { es256, payload } => {
            let original = &signers[usize::from(es256)].token;
            let mut parts = original.split('.');
            let (header, _, signature) =
                (parts.next().unwrap(), parts.next(), parts.next().unwrap());
            format!("{header}.{}.{signature}", URL_SAFE_NO_PAD.encode(payload))
        }
        Case::Parts {
            header,
            payload,
            signature,
        } => [header, payload, signature]
            .map(|part| URL_SAFE_NO_PAD.encode(part))
            .join("."),
    };
    for signer in signers {
        signer.check(&token);
    }
});
