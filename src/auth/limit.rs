//! The login rate limit: a token bucket per client IP (`rate_limit.login_per_ip_per_minute`
//! at once, refilled evenly over the minute). Every attempt counts, failed ones included,
//! since guessing is what the limit is for. An IPv6 client is counted by its /64: that is the
//! least a subscriber is given, so one with a /64 (or more) would otherwise have a fresh
//! bucket at each of its 2^64 addresses.

use std::net::{IpAddr, Ipv6Addr};
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicUsize, Ordering};

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota};

use crate::error::Error;

/// Buckets of IPs that have not been seen for a while are dropped once this many exist,
/// and again each time their number doubles, so memory follows the number of active clients.
const FIRST_SWEEP_AT: usize = 4096;

pub struct LoginLimiter {
    limiter: DefaultKeyedRateLimiter<IpAddr>,
    per_minute: NonZeroU32,
    sweep_at: AtomicUsize,
}

impl LoginLimiter {
    /// `None` when the limit is off (0).
    pub fn new(per_minute: u32) -> Option<LoginLimiter> {
        let per_minute = NonZeroU32::new(per_minute)?;
        Some(LoginLimiter {
            limiter: DefaultKeyedRateLimiter::keyed(Quota::per_minute(per_minute)),
            per_minute,
            sweep_at: AtomicUsize::new(FIRST_SWEEP_AT),
        })
    }

    pub fn per_minute(&self) -> u32 {
        self.per_minute.get()
    }

    pub fn check(&self, client: IpAddr) -> Result<(), Error> {
        let outcome = self.limiter.check_key(&bucket_of(client));
        let buckets = self.limiter.len();
        if buckets >= self.sweep_at.load(Ordering::Relaxed) {
            self.limiter.retain_recent();
            let next = (self.limiter.len() * 2).max(FIRST_SWEEP_AT);
            self.sweep_at.store(next, Ordering::Relaxed);
        }
        outcome.map_err(|not_until| {
            let wait = not_until.wait_time_from(DefaultClock::default().now());
            Error::RateLimited {
                retry_after_secs: wait.as_secs() + 1,
                wechat_errcode: None,
            }
        })
    }
}

/// The key a client's attempts count under: an IPv4 address (also when written as an
/// IPv4-mapped IPv6 one), or an IPv6 address's /64.
fn bucket_of(client: IpAddr) -> IpAddr {
    match client.to_canonical() {
        IpAddr::V6(v6) => IpAddr::V6(Ipv6Addr::from_bits(v6.to_bits() & !(u128::MAX >> 64))),
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_burst_is_the_per_minute_figure_then_429_with_retry_after() {
        let limiter = LoginLimiter::new(5).unwrap();
        let client: IpAddr = "203.0.113.7".parse().unwrap();
        for _ in 0..5 {
            assert_eq!(limiter.check(client), Ok(()));
        }
        match limiter.check(client) {
            Err(Error::RateLimited {
                retry_after_secs, ..
            }) => assert!((1..=13).contains(&retry_after_secs)),
            other => panic!("expected rate_limited, got {other:?}"),
        }
        assert_eq!(limiter.check("203.0.113.8".parse().unwrap()), Ok(()));
    }

    #[test]
    fn an_ipv6_client_is_counted_by_its_slash_64() {
        let limiter = LoginLimiter::new(2).unwrap();
        let own = |address: &str| limiter.check(address.parse().unwrap()).is_ok();
        assert!(own("2001:db8:1:2::1"));
        assert!(own("2001:db8:1:2:ffff:ffff:ffff:ffff"));
        // Another address of the same /64 finds the bucket empty.
        assert!(!own("2001:db8:1:2:abcd::9"));
        // The next /64 has its own.
        assert!(own("2001:db8:1:3::1"));

        // An IPv4 client is the same bucket however it is written.
        assert!(own("198.51.100.4"));
        assert!(own("::ffff:198.51.100.4"));
        assert!(!own("198.51.100.4"));
        assert!(own("198.51.100.5"));
    }

    #[test]
    fn zero_turns_the_limit_off() {
        assert!(LoginLimiter::new(0).is_none());
    }
}
