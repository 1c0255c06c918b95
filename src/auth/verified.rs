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
use tokio::sync::watch;

use crate::identity::Identity;
use crate::state::State;
use crate::token::unix_now;

/// What the cache may hold, in bytes; past it the least used tokens are dropped and verified
/// again when they come back. At a few hundred bytes a token, that is some 40,000 tokens in
/// use at once.
const CAPACITY_BYTES: u64 = 32 * 1024 * 1024;

/// An entry's bookkeeping beyond its token, its claims and their headers (as values and as
/// head lines): the cache's own. The claims and the headers are each about as long as the token
/// that carries them at most, which is why the weigher counts the token four times.
const ENTRY_OVERHEAD: usize = 160;

/// A token's bytes: a lookup needs no text; only a token that is not in the cache is read as
/// text, to be verified.
type Token = Box<[u8]>;

pub struct VerifiedTokens {
    cache: Cache<Token, Arc<Identity>, RandomState>,
    leeway: Duration,
}

impl VerifiedTokens {
    /// `leeway` is the clock skew verification allows past `exp`.
    pub fn new(leeway: Duration) -> VerifiedTokens {
        VerifiedTokens {
            cache: Cache::builder()
                .max_capacity(CAPACITY_BYTES)
                .weigher(|token: &Token, _| {
                    u32::try_from(token.len() * 4 + ENTRY_OVERHEAD).unwrap_or(u32::MAX)
                })
                .expire_after(UntilExpiry { leeway })
                // Hashing the token is most of a lookup, and SipHash, the default, takes
                // about 1,300 instructions for a typical one. Its resistance to crafted
                // collisions is not needed here: only tokens the gateway signed get in.
                .build_with_hasher(RandomState::default()),
            leeway,
        }
    }

    pub fn get(&self, token: &[u8]) -> Option<Arc<Identity>> {
        self.cache.get(token)
    }

    pub fn insert(&self, token: &[u8], identity: Arc<Identity>) {
        self.cache.insert(token.into(), identity);
    }

    /// True while verification would still accept the token `identity` came from: the life
    /// the cache gives its entry.
    fn accepts(&self, identity: &Identity) -> bool {
        unix_now() < accepted_until(identity, self.leeway)
    }
}

/// The `Authorization` value a connection presented last, and what verifying its token gave.
///
/// A client sends the same token on every request of a keep-alive connection. Matching the
/// value's bytes here spares reading the token out of it and the cache lookup, which hashes a
/// few hundred bytes and does the cache's bookkeeping: some 1,500 instructions, a tenth of a
/// proxied request (`bench/instructions.py`). It answers only under the state that verified
/// the token, so a reload (new keys, apps or audience) forgets it, and only within the token's
/// life. Revocation is asked again whenever a session was revoked since it last was.
#[derive(Default)]
pub struct LastToken(Option<Remembered>);

struct Remembered {
    /// Held, not only compared: a state freed and another made at its address must not pass
    /// for it.
    state: Arc<State>,
    authorization: Box<[u8]>,
    identity: Arc<Identity>,
    /// Marked seen before the session was last found not revoked.
    revocations: watch::Receiver<()>,
}

impl LastToken {
    /// What the token in `authorization` verified to under `state`, if it is the value
    /// remembered, its token is still alive and its session not revoked.
    pub fn recall(&mut self, state: &Arc<State>, authorization: &[u8]) -> Option<&Arc<Identity>> {
        let last = self.0.as_mut()?;
        let alive = Arc::ptr_eq(&last.state, state)
            && *last.authorization == *authorization
            && state.verified_tokens.accepts(&last.identity);
        if !alive {
            return None;
        }
        // Marked before asking: a revocation made while it is asked is still told of next time.
        if last.revocations.has_changed().unwrap_or(true) {
            last.revocations.mark_unchanged();
            if state.services.revocations.is_revoked(&last.identity.sid) {
                return None;
            }
        }
        Some(&last.identity)
    }

    /// Remembers a token verified under `state`, whose session was found not revoked after
    /// `revocations` was taken.
    pub fn remember(
        &mut self,
        state: &Arc<State>,
        authorization: &[u8],
        identity: &Arc<Identity>,
        revocations: watch::Receiver<()>,
    ) {
        self.0 = Some(Remembered {
            state: state.clone(),
            authorization: authorization.into(),
            identity: identity.clone(),
            revocations,
        });
    }
}

/// Each entry lives exactly as long as verification would still accept its token.
struct UntilExpiry {
    leeway: Duration,
}

impl Expiry<Token, Arc<Identity>> for UntilExpiry {
    fn expire_after_create(
        &self,
        _token: &Token,
        identity: &Arc<Identity>,
        _created_at: Instant,
    ) -> Option<Duration> {
        let valid_until = accepted_until(identity, self.leeway);
        Some(Duration::from_secs(valid_until.saturating_sub(unix_now())))
    }
}

/// The unix second from which the gateway no longer vouches for `identity`'s token without
/// verifying it again.
fn accepted_until(identity: &Identity, leeway: Duration) -> u64 {
    identity.exp + leeway.as_secs()
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
        cache.insert(b"t", claims(unix_now() + 60));
        assert_eq!(cache.get(b"t").unwrap().sub, "o");
        assert!(cache.get(b"other").is_none());
    }

    #[test]
    fn an_expired_token_is_never_served() {
        let cache = VerifiedTokens::new(Duration::ZERO);
        cache.insert(b"t", claims(unix_now() - 1));
        assert!(cache.get(b"t").is_none());
    }
}
