//! Pacing of the copier, so that it never starves the applications (docs/design.md,
//! "Pacing").
//!
//! - Explicit caps: a job's `rate=` and the pool-wide `copy-rate`, each a token bucket.
//! - Priority for application I/O: while the applications have done I/O in the last
//!   [`APP_ACTIVE_WINDOW`], the copier moves small chunks and rests between them, so that it
//!   holds the disk at most [`BUSY_DUTY`] of the time; when they are idle it copies at full
//!   speed in large chunks.
//! - Bounded write-back: every chunk written to the target is pushed to the disk right away
//!   and waited for one chunk later (`sync_file_range`), so the copier never builds a large
//!   dirty backlog that an application's fsync would then wait behind.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

/// Application I/O this recent makes the copier yield.
pub const APP_ACTIVE_WINDOW: Duration = Duration::from_millis(50);
/// Share of the time the copier may hold the disk while applications are active.
pub const BUSY_DUTY: f64 = 0.25;
/// Chunk sizes: idle copies and busy copies.
pub const IDLE_CHUNK_BYTES: u64 = 4 << 20;
pub const BUSY_CHUNK_BYTES: u64 = 256 << 10;

/// A token bucket: `take(n)` says how long to wait so that the long-run rate stays at most
/// `rate` bytes per second (a burst of up to a quarter second's worth passes at once).
#[derive(Debug, Default)]
pub struct TokenBucket {
    rate: AtomicU64,
    state: Mutex<Option<(Instant, f64)>>,
}

impl TokenBucket {
    pub fn new(rate: u64) -> TokenBucket {
        TokenBucket { rate: AtomicU64::new(rate), state: Mutex::new(None) }
    }

    pub fn rate(&self) -> u64 {
        self.rate.load(Ordering::Relaxed)
    }

    pub fn set_rate(&self, rate: u64) {
        self.rate.store(rate, Ordering::Relaxed);
        *self.state.lock() = None;
    }

    /// Account for `bytes` and return how long to wait before going on.
    pub fn take(&self, bytes: u64) -> Duration {
        let rate = self.rate() as f64;
        if rate <= 0.0 {
            return Duration::ZERO;
        }
        let now = Instant::now();
        let burst = rate / 4.0;
        let mut st = self.state.lock();
        let (last, tokens) = st.get_or_insert((now, burst));
        let refill = now.duration_since(*last).as_secs_f64() * rate;
        *tokens = (*tokens + refill).min(burst) - bytes as f64;
        *last = now;
        if *tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-*tokens / rate)
        }
    }
}

/// How long the copier rests after a chunk that took `elapsed`, given whether applications
/// are active.
pub fn rest_after(elapsed: Duration, apps_active: bool) -> Duration {
    if apps_active {
        elapsed.mul_f64((1.0 - BUSY_DUTY) / BUSY_DUTY)
    } else {
        Duration::ZERO
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_holds_the_rate_over_time() {
        let b = TokenBucket::new(1 << 20);
        // The first quarter second's worth passes, the rest waits in proportion.
        assert_eq!(b.take(256 << 10), Duration::ZERO);
        let w = b.take(1 << 20);
        assert!(w > Duration::from_millis(900) && w <= Duration::from_millis(1001), "{w:?}");
        let none = TokenBucket::new(0);
        assert_eq!(none.take(u64::MAX / 2), Duration::ZERO);
    }

    #[test]
    fn busy_applications_get_most_of_the_disk() {
        assert_eq!(rest_after(Duration::from_millis(10), false), Duration::ZERO);
        assert_eq!(rest_after(Duration::from_millis(10), true), Duration::from_millis(30));
    }
}
