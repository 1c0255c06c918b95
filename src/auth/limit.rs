//! The login rate limit: a token bucket per client IP (`rate_limit.login_per_ip_per_minute`
//! at once, refilled evenly over the minute). Every attempt counts, failed ones included,
//! since guessing is what the limit is for.

use std::net::IpAddr;
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
    sweep_at: AtomicUsize,
}

impl LoginLimiter {
    /// `None` when the limit is off (0).
    pub fn new(per_minute: u32) -> Option<LoginLimiter> {
        let per_minute = NonZeroU32::new(per_minute)?;
        Some(LoginLimiter {
            limiter: DefaultKeyedRateLimiter::keyed(Quota::per_minute(per_minute)),
            sweep_at: AtomicUsize::new(FIRST_SWEEP_AT),
        })
    }

    pub fn check(&self, client: IpAddr) -> Result<(), Error> {
        let outcome = self.limiter.check_key(&client);
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
    fn zero_turns_the_limit_off() {
        assert!(LoginLimiter::new(0).is_none());
    }
}
