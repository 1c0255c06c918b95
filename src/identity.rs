//! Protected header families: everything a client sends that could pass for identity is
//! removed, then the verified identity is injected (SPEC §5, steps 2 and 3). Names are compared
//! case-insensitively with `_` read as `-`, because many upstream stacks (CGI, WSGI, PHP) fold
//! `X_WX_OPENID` and `X-WX-OpenID` into the same variable.

use std::ops::Deref;

use http::{HeaderMap, HeaderName, HeaderValue};

use crate::config::IdentityConfig;
use crate::token::Claims;

/// The headers the gateway sets itself. Spelled with `-`, the proxy replaces a client's by its
/// own rules; spelled with `_` (`X_Forwarded_For`), a client's would pass as another header and
/// reach a CGI-style upstream as the same variable as the gateway's, and ahead of it: a client
/// address of the client's choosing. So those spellings are stripped as a protected family's.
const SET_BY_GATEWAY: [&str; 4] = [
    "x-forwarded-for",
    "x-forwarded-host",
    "x-forwarded-proto",
    "x-request-id",
];

pub struct IdentityRules {
    openid: HeaderName,
    unionid: HeaderName,
    appid: HeaderName,
    /// Normalized names (lower case, `-`) of every exact protected header.
    exact: Vec<String>,
    /// Normalized prefixes.
    prefixes: Vec<String>,
    /// The bytes a protected name can start with, in any spelling. Most headers of a request
    /// (Host, Accept, User-Agent, Authorization) are cleared by their first byte alone, on
    /// every request.
    first_bytes: [bool; 256],
    claim_headers: Vec<(String, HeaderName)>,
}

impl IdentityRules {
    pub fn new(config: &IdentityConfig) -> IdentityRules {
        let mut exact: Vec<String> = [
            &config.openid_header,
            &config.unionid_header,
            &config.appid_header,
        ]
        .into_iter()
        .chain(config.claim_headers.iter().map(|(_, header)| header))
        .map(|name| normalize(name.as_str()))
        .collect();
        exact.sort();
        exact.dedup();
        let prefixes: Vec<String> = config
            .protected_prefixes
            .iter()
            .map(|prefix| normalize(prefix))
            .collect();
        let mut first_bytes = [false; 256];
        let names = exact.iter().chain(&prefixes).map(String::as_str);
        for normalized in names.chain(SET_BY_GATEWAY) {
            match normalized.as_bytes().first() {
                Some(&first) => {
                    for byte in 0..=u8::MAX {
                        first_bytes[usize::from(byte)] |= fold(byte) == first;
                    }
                }
                // An empty prefix protects every name.
                None => first_bytes = [true; 256],
            }
        }
        IdentityRules {
            openid: config.openid_header.clone(),
            unionid: config.unionid_header.clone(),
            appid: config.appid_header.clone(),
            exact,
            prefixes,
            first_bytes,
            claim_headers: config.claim_headers.clone(),
        }
    }

    /// True when `name` belongs to a protected family.
    pub fn is_protected(&self, name: &str) -> bool {
        if let Some(&first) = name.as_bytes().first()
            && !self.first_bytes[usize::from(first)]
        {
            return false;
        }
        self.exact
            .iter()
            .any(|protected| same_name(name, protected))
            || self.prefixes.iter().any(|prefix| {
                name.len() >= prefix.len() && same_name(&name[..prefix.len()], prefix)
            })
            || (SET_BY_GATEWAY.iter().any(|set| same_name(name, set)) && name.contains('_'))
    }

    /// Removes every header of a protected family.
    pub fn strip(&self, headers: &mut HeaderMap) {
        let doomed: Vec<HeaderName> = headers
            .keys()
            .filter(|name| self.is_protected(name.as_str()))
            .cloned()
            .collect();
        for name in doomed {
            headers.remove(name);
        }
    }

    /// Verified claims with the identity headers they make under these rules.
    pub fn identity(&self, claims: Claims) -> Identity {
        let mut headers = Vec::with_capacity(3 + self.claim_headers.len());
        let mut set = |name: &HeaderName, value: &str| match HeaderValue::from_str(value) {
            Ok(value) => headers.push((name.clone(), value)),
            // A value that cannot be a header value (a control character in a claim) is left
            // out rather than sent mangled: the upstream then sees no header, never a wrong one.
            Err(_) => {
                tracing::warn!(header = %name, "identity value is not a valid header value; left out")
            }
        };
        set(&self.openid, &claims.sub);
        set(&self.appid, &claims.appid);
        if let Some(unionid) = &claims.unionid {
            set(&self.unionid, unionid);
        }
        for (claim, header) in &self.claim_headers {
            match claims.extra.get(claim) {
                Some(serde_json::Value::String(text)) => set(header, text),
                Some(serde_json::Value::Null) | None => {}
                Some(other) => set(header, &other.to_string()),
            }
        }
        let lines = headers
            .iter()
            .flat_map(|(name, value)| [name.as_str().as_bytes(), b": ", value.as_bytes(), b"\r\n"])
            .flatten()
            .copied()
            .collect();
        Identity {
            claims,
            headers,
            lines,
        }
    }
}

/// A verified token's claims, with its identity headers made once, when the token is verified,
/// rather than on each of its requests.
pub struct Identity {
    claims: Claims,
    headers: Vec<(HeaderName, HeaderValue)>,
    /// The same headers as lines of an HTTP/1.1 head, made once per verified token rather
    /// than once per request.
    lines: Box<[u8]>,
}

impl Identity {
    /// Sets the identity headers. Call after [`IdentityRules::strip`].
    pub fn inject(&self, headers: &mut HeaderMap) {
        for (name, value) in &self.headers {
            headers.insert(name.clone(), value.clone());
        }
    }

    /// The identity headers as lines of an HTTP/1.1 head (`name: value\r\n`), in the order
    /// they are set.
    pub fn header_lines(&self) -> &[u8] {
        &self.lines
    }

    /// The identity as response headers, for forward-auth answers.
    pub fn headers(&self) -> HeaderMap {
        let mut headers = HeaderMap::with_capacity(self.headers.len());
        self.inject(&mut headers);
        headers
    }
}

/// An identity is its claims; the headers are only a way of sending them.
impl Deref for Identity {
    type Target = Claims;

    fn deref(&self) -> &Claims {
        &self.claims
    }
}

fn normalize(name: &str) -> String {
    name.bytes().map(|b| fold(b) as char).collect()
}

/// `protected` is already normalized.
fn same_name(name: &str, protected: &str) -> bool {
    name.len() == protected.len()
        && name
            .bytes()
            .zip(protected.bytes())
            .all(|(a, b)| fold(a) == b)
}

fn fold(byte: u8) -> u8 {
    match byte {
        b'_' => b'-',
        other => other.to_ascii_lowercase(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules() -> IdentityRules {
        rules_with("x-wx-", ("uid", "x-user-id"))
    }

    /// The default identity headers, with one protected prefix and one claim header.
    fn rules_with(prefix: &str, (claim, header): (&str, &'static str)) -> IdentityRules {
        IdentityRules::new(&IdentityConfig {
            openid_header: HeaderName::from_static("x-wx-openid"),
            unionid_header: HeaderName::from_static("x-wx-unionid"),
            appid_header: HeaderName::from_static("x-wx-appid"),
            protected_prefixes: vec![prefix.into()],
            forward_authorization: false,
            claim_headers: vec![(claim.into(), HeaderName::from_static(header))],
        })
    }

    #[test]
    fn client_supplied_identity_headers_are_stripped_in_every_spelling() {
        let rules = rules();
        let mut headers = HeaderMap::new();
        for name in [
            "x-wx-openid",
            "x_wx_openid",
            "x-wx_openid",
            "x-wx-anything",
            "x_wx_unionid",
            "x-user-id",
            "x_user_id",
        ] {
            headers.insert(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_static("spoof"),
            );
        }
        headers.insert("x-other", HeaderValue::from_static("kept"));
        headers.insert("x-wxy", HeaderValue::from_static("kept"));
        rules.strip(&mut headers);
        let left: Vec<&str> = headers.keys().map(|n| n.as_str()).collect();
        assert_eq!(left.len(), 2, "{left:?}");
        assert!(headers.contains_key("x-other") && headers.contains_key("x-wxy"));
    }

    #[test]
    fn protected_names_are_found_in_any_spelling_whatever_letter_starts_them() {
        let rules = rules_with("_Private-", ("uid", "user-id"));
        for name in [
            "USER-ID",
            "User_Id",
            "user-id",
            "_private-x",
            "-PRIVATE_y",
            "X_WX_OPENID",
        ] {
            assert!(rules.is_protected(name), "{name}");
        }
        for name in ["userid", "Host", "authorization", "private-x", "X-WX"] {
            assert!(!rules.is_protected(name), "{name}");
        }
        // The gateway's own headers: the `_` spellings go; the proxy sets the `-` ones.
        for name in [
            "X_Forwarded_For",
            "x-forwarded_proto",
            "X_FORWARDED_HOST",
            "x_request_id",
        ] {
            assert!(rules.is_protected(name), "{name}");
        }
        for name in [
            "X-Forwarded-For",
            "x-forwarded-proto",
            "X-Request-ID",
            "x_forwarded",
        ] {
            assert!(!rules.is_protected(name), "{name}");
        }
        let everything = rules_with("", ("uid", "user-id"));
        assert!(everything.is_protected("Host"));
    }

    #[test]
    fn identity_is_injected_from_claims() {
        let rules = rules();
        let mut extra = serde_json::Map::new();
        extra.insert("uid".into(), 42.into());
        let claims = Claims {
            iss: "wxgate".into(),
            aud: "api".into(),
            sub: "o-alice".into(),
            appid: "wx1".into(),
            unionid: None,
            sid: "s".into(),
            jti: "j".into(),
            iat: 0,
            exp: 0,
            extra,
        };
        let identity = rules.identity(claims);
        assert_eq!(
            identity.header_lines(),
            b"x-wx-openid: o-alice\r\nx-wx-appid: wx1\r\nx-user-id: 42\r\n"
        );
        let headers = identity.headers();
        assert_eq!(headers["x-wx-openid"], "o-alice");
        assert_eq!(headers["x-wx-appid"], "wx1");
        assert_eq!(headers["x-user-id"], "42");
        assert!(!headers.contains_key("x-wx-unionid"));
    }
}
