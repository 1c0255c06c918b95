//! The verified-token cache: a token whose signature and claims were checked once is not
//! checked again until it expires, so a signature scheme that is slow to verify (ES256, RS256)
//! costs about what HS256 costs on the hot path. What can change during a token's life is
//! still checked on every request by the caller: revocation, and the route's apps.
//!
//! The cache belongs to one loaded config: a reload (new keys, issuer or audience) starts an
//! empty one.

use std::sync::Arc;
use std::time::{Duration, Instant};

use foldhash::fast::RandomState;
use moka::Expiry;
use moka::sync::Cache;

use crate::identity::Identity;
use crate::token::unix_now;

/// What the cache may hold, in bytes; past it the least used tokens are dropped and verified
/// again when they come back. At a few hundred bytes a token, that is some 40,000 tokens in
/// use at once.
const CAPACITY_BYTES: u64 = 32 * 1024 * 1024;

/// An entry's bookkeeping beyond its token, its claims and their header values: the cache's
/// own. The claims and the header values are each no longer than the token that carries them,
/// which is why the weigher counts the token three times.
const ENTRY_OVERHEAD: usize = 160;

pub struct VerifiedTokens {
    cache: Cache<String, Arc<Identity>, RandomState>,
}

impl VerifiedTokens {
    /// `leeway` is the clock skew verification allows past `exp`.
    pub fn new(leeway: Duration) -> VerifiedTokens {
        VerifiedTokens {
            cache: Cache::builder()
                .max_capacity(CAPACITY_BYTES)
                .weigher(|token: &String, _: &Arc<Identity>| {
                    u32::try_from(token.len() * 3 + ENTRY_OVERHEAD).unwrap_or(u32::MAX)
                })
                .expire_after(UntilExpiry { leeway })
                // Hashing the token is most of a lookup, and SipHash, the default, takes
                // about 1,300 instructions for a typical one. Its resistance to crafted
                // collisions is not needed here: only tokens the gateway signed get in.
                .build_with_hasher(RandomState::default()),
        }
    }

    pub fn get(&self, token: &str) -> Option<Arc<Identity>> {
        self.cache.get(token)
    }

    pub fn insert(&self, token: &str, identity: Arc<Identity>) {
        self.cache.insert(token.to_string(), identity);
    }
}

/// Each entry lives exactly as long as verification would still accept its token.
struct UntilExpiry {
    leeway: Duration,
}

impl Expiry<String, Arc<Identity>> for UntilExpiry {
    fn expire_after_create(
        &self,
        _token: &String,
        identity: &Arc<Identity>,
        _created_at: Instant,
    ) -> Option<Duration> {
        let valid_until = identity.exp + self.leeway.as_secs();
        Some(Duration::from_secs(valid_until.saturating_sub(unix_now())))
    }
}

#[cfg(test)]
mod tests {
    use http::HeaderName;

    use super::*;
    use crate::config::IdentityConfig;
    use crate::identity::IdentityRules;
    use crate::token::Claims;

    fn claims(exp: u64) -> Arc<Identity> {
        let rules = IdentityRules::new(&IdentityConfig {
            openid_header: HeaderName::from_static("x-wx-openid"),
            unionid_header: HeaderName::from_static("x-wx-unionid"),
            appid_header: HeaderName::from_static("x-wx-appid"),
            protected_prefixes: vec!["x-wx-".into()],
            forward_authorization: false,
            claim_headers: Vec::new(),
        });
        Arc::new(rules.identity(Claims {
            iss: "wxgate".into(),
            aud: "api".into(),
            sub: "o".into(),
            appid: "wx".into(),
            unionid: None,
            sid: "s".into(),
            jti: "j".into(),
            iat: 0,
            exp,
            extra: Default::default(),
        }))
    }

    #[test]
    fn a_live_token_is_served_from_the_cache() {
        let cache = VerifiedTokens::new(Duration::ZERO);
        cache.insert("t", claims(unix_now() + 60));
        assert_eq!(cache.get("t").unwrap().sub, "o");
        assert!(cache.get("other").is_none());
    }

    #[test]
    fn an_expired_token_is_never_served() {
        let cache = VerifiedTokens::new(Duration::ZERO);
        cache.insert("t", claims(unix_now() - 1));
        assert!(cache.get("t").is_none());
    }
}
