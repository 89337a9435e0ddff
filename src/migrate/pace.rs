//! Pacing of the copier, so that it never starves the applications (docs/design.md,
//! "Pacing").
//!
//! - Explicit caps: a job's `rate=` and the pool-wide `copy-rate`, each a token bucket.
//! - Priority for application I/O: while the applications have done I/O in the last
//!   [`APP_ACTIVE_WINDOW`], the copier moves small chunks, waits for each to reach the disk
//!   (so its time counts the disk's work, not just the copy into the page cache), and rests
//!   between them, so that it holds the disk at most [`BUSY_DUTY`] of the time; an
//!   application's fsync then finds at most one small chunk ahead of it. When they are idle
//!   it copies at full speed in large chunks.
//! - Feedback: the mount times every application fsync ([`crate::monitor::SyncLatency`]). Their average with
//!   no copier running is the baseline; while a copier runs and applications sync, the
//!   copier's rate ([`Governor`]) drops to a quarter at every fsync that takes more than
//!   [`LATENCY_HEADROOM`] times the baseline, and grows by 0.5 % at every one that doesn't. At
//!   equilibrium about 0.4 % of fsyncs are slow (ln 1.005 / (ln 1.005 + ln 4)), below the 1 %
//!   a 99th percentile allows, which is what keeps the applications' tail, not just their
//!   mean, near where it was. (A
//!   flush pays for everything the copier left in the disk's cache, which no duty cycle of
//!   the copier's own can see.)
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
pub const BUSY_CHUNK_BYTES: u64 = 128 << 10;

/// Applications' fsyncs may take this many times their baseline before the copier slows.
pub const LATENCY_HEADROOM: f64 = 1.5;
/// The governor's range while applications sync, bytes per second.
pub const GOVERNED_MIN: f64 = (1 << 20) as f64;
pub const GOVERNED_START: f64 = (32 << 20) as f64;
pub const GOVERNED_MAX: f64 = (1u64 << 30) as f64;
/// A job's copy rate while applications sync: a quarter of it when an fsync is slower than
/// the headroom allows, 0.5 % up when it isn't; one step per new fsync.
#[derive(Debug)]
pub struct Governor {
    rate: f64,
    seen: u64,
    pub bucket: TokenBucket,
}

impl Default for Governor {
    fn default() -> Governor {
        Governor { rate: GOVERNED_START, seen: 0, bucket: TokenBucket::new(GOVERNED_START as u64) }
    }
}

impl Governor {
    /// Steer by the latest feedback; returns the rate now.
    pub fn steer(&mut self, base_ns: u64, current_ns: u64, samples: u64) -> f64 {
        if samples != self.seen {
            self.seen = samples;
            self.rate = if current_ns as f64 > base_ns as f64 * LATENCY_HEADROOM {
                (self.rate * 0.25).max(GOVERNED_MIN)
            } else {
                (self.rate * 1.005).min(GOVERNED_MAX)
            };
            self.bucket.retune(self.rate as u64);
        }
        self.rate
    }
}

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

    /// Change the rate, keeping the tokens (a controller's small steps).
    pub fn retune(&self, rate: u64) {
        self.rate.store(rate, Ordering::Relaxed);
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
    fn governor_backs_off_when_fsyncs_slow_and_recovers() {
        let mut g = Governor::default();
        let start = g.steer(1000, 1000, 1);
        assert!(start > GOVERNED_START, "fsyncs at their baseline: faster");
        assert_eq!(g.steer(1000, 5000, 1), start, "no new fsync, no step");
        let mut r = start;
        for n in 2..20 {
            r = g.steer(1000, 5000, n);
        }
        assert_eq!(r, GOVERNED_MIN, "slow fsyncs push it to the floor");
        let up = g.steer(1000, 1400, 20);
        assert!(up > GOVERNED_MIN, "within the headroom it grows again");
    }

    #[test]
    fn busy_applications_get_most_of_the_disk() {
        assert_eq!(rest_after(Duration::from_millis(10), false), Duration::ZERO);
        assert_eq!(rest_after(Duration::from_millis(10), true), Duration::from_millis(30));
    }
}
