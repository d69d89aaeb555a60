//! How fast one member may post through this node: a token bucket per
//! handle (governor's GCRA), `limits.posts_per_second` with bursts of
//! `limits.posts_burst`; 0 turns it off (benchmarks do).
//!
//! A post over the limit is refused with RESOURCE_EXHAUSTED and stored
//! nowhere; the client may send it again a moment later. The limit is per
//! node: a member spread over several nodes' sessions gets one bucket on
//! each, which still bounds what one key can make the cluster store.

use std::num::NonZeroU32;

use governor::clock::{Clock, DefaultClock};
use governor::middleware::NoOpMiddleware;
use governor::state::keyed::DefaultKeyedStateStore;
use governor::{Quota, RateLimiter};
use saferchat_consensus::Handle;

use crate::error::NodeError;

/// Members tracked before idle buckets are dropped (a bucket that has
/// refilled is the same as none).
const TRACKED_BEFORE_SWEEP: usize = 65_536;

type Limiter<C> =
    RateLimiter<Handle, DefaultKeyedStateStore<Handle>, C, NoOpMiddleware<<C as Clock>::Instant>>;

/// The per-member post limit of this node.
pub struct PostRate<C: Clock = DefaultClock> {
    limiter: Option<Limiter<C>>,
    per_second: u32,
    burst: u32,
}

impl<C: Clock> std::fmt::Debug for PostRate<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PostRate({}/s, burst {})", self.per_second, self.burst)
    }
}

impl PostRate {
    /// `per_second` posts per second per member, in bursts of up to
    /// `burst` (at least 1); `per_second` 0: no limit.
    pub fn new(per_second: u32, burst: u32) -> PostRate {
        PostRate::with_clock(per_second, burst, DefaultClock::default())
    }
}

impl<C: Clock> PostRate<C> {
    /// [`PostRate::new`] on `clock` (tests use a fake one).
    pub fn with_clock(per_second: u32, burst: u32, clock: C) -> PostRate<C> {
        let limiter = NonZeroU32::new(per_second).map(|rate| {
            let burst = NonZeroU32::new(burst).unwrap_or(NonZeroU32::MIN);
            RateLimiter::dashmap_with_clock(Quota::per_second(rate).allow_burst(burst), clock)
        });
        PostRate {
            limiter,
            per_second,
            burst,
        }
    }

    /// Counts one post by `who`.
    ///
    /// # Errors
    /// [`NodeError::ResourceExhausted`] when `who` is over the limit.
    pub fn check(&self, who: &Handle) -> Result<(), NodeError> {
        let Some(limiter) = &self.limiter else {
            return Ok(());
        };
        if limiter.len() >= TRACKED_BEFORE_SWEEP {
            limiter.retain_recent();
        }
        limiter.check_key(who).map_err(|_| {
            metrics::counter!("saferchat_posts_rate_limited_total").increment(1);
            NodeError::ResourceExhausted(format!(
                "posting too fast: at most {} posts per second per member (bursts of {}); send it again in a moment",
                self.per_second, self.burst
            ))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use governor::clock::FakeRelativeClock;
    use std::time::Duration;

    fn member(n: u8) -> Handle {
        Handle::of_modulus(&[n; 8])
    }

    #[test]
    fn a_burst_passes_then_the_rate_holds_per_member() {
        let clock = FakeRelativeClock::default();
        let rate = PostRate::with_clock(2, 3, clock.clone());
        for _ in 0..3 {
            rate.check(&member(1)).unwrap();
        }
        let e = rate.check(&member(1)).unwrap_err().to_string();
        assert!(e.contains("posting too fast"), "{e}");
        rate.check(&member(2)).unwrap();
        // Half a second refills one post at 2 per second.
        clock.advance(Duration::from_millis(500));
        rate.check(&member(1)).unwrap();
        assert!(rate.check(&member(1)).is_err());
    }

    #[test]
    fn zero_means_no_limit() {
        let rate = PostRate::with_clock(0, 0, FakeRelativeClock::default());
        for _ in 0..10_000 {
            rate.check(&member(1)).unwrap();
        }
    }
}
