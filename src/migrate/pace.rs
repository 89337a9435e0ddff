//! Pacing of the copier, so that it never starves the applications (docs/design.md,
//! "Pacing").
//!
//! - Explicit caps: a job's `rate=` and the pool-wide `copy-rate`, each a [`RateCap`]. The
//!   copier asks every cap before it moves a chunk and waits as long as the strictest says,
//!   and a chunk is at most [`CAP_CHUNK_TIME`] of the strictest cap, so the bytes moved
//!   never run ahead of the cap, from the first chunk on.
//! - Priority for application I/O: while the applications have done I/O in the last
//!   [`APP_ACTIVE_WINDOW`], the copier moves small chunks, waits for each to reach the disk
//!   (so its time counts the disk's work, not just the copy into the page cache), and rests
//!   between them, so that it holds the disk at most [`BUSY_DUTY`] of the time; an
//!   application's fsync then finds at most one small chunk ahead of it. When they are idle
//!   it copies at full speed in large chunks.
//! - Feedback: the mount times every application fsync ([`crate::monitor::SyncLatency`]). Their average with
//!   no copier running is the baseline, and each fsync while a copier runs that takes more
//!   than [`LATENCY_HEADROOM`] times it is counted slow. Before each chunk the copier's rate
//!   ([`Governor`]) drops to a quarter if any fsync since its last step was slow, and grows
//!   by 0.5 % if fsyncs came and none was. (It looked at the latest fsync only, and missed
//!   the slow ones between two chunks: at 200 fsyncs a second the rate could climb until the
//!   disk was saturated, docs/benchmarks.md.) At equilibrium at most about 0.4 % of its steps
//!   see a slow fsync (ln 1.005 / (ln 1.005 + ln 4)), so fewer than that of the fsyncs are
//!   slow, below the 1 % a 99th percentile allows, which is what keeps the applications'
//!   tail, not just their mean, near where it was. (A
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
    seen_slow: u64,
    pub cap: RateCap,
}

impl Default for Governor {
    fn default() -> Governor {
        Governor { rate: GOVERNED_START, seen: 0, seen_slow: 0, cap: RateCap::new(GOVERNED_START as u64) }
    }
}

impl Governor {
    /// Steer by the feedback (`slow` and `samples`: the counts of slow and of all fsyncs so
    /// far); returns the rate now.
    pub fn steer(&mut self, slow: u64, samples: u64) -> f64 {
        if samples != self.seen {
            let any_slow = slow != self.seen_slow;
            self.seen = samples;
            self.seen_slow = slow;
            self.rate =
                if any_slow { (self.rate * 0.25).max(GOVERNED_MIN) } else { (self.rate * 1.005).min(GOVERNED_MAX) };
            self.cap.retune(self.rate as u64);
        }
        self.rate
    }
}

/// A cap lets a chunk of at most this long's worth of bytes go at once: the copier cuts its
/// chunks to it, so progress is smooth and no chunk runs far ahead of the average.
pub const CAP_CHUNK_TIME: Duration = Duration::from_millis(100);

/// How far a cap's schedule may lag the clock and still be kept: a copier that is late by
/// its own copy time (up to this) gets it back on the next chunk, so a cap near the disk's
/// speed is still reached; a longer pause earns no credit.
pub const CAP_LATE_MAX: Duration = Duration::from_millis(50);

/// A rate cap, kept as a schedule (the generic cell rate algorithm): `take(n)` books `n`
/// bytes after all the bytes booked before and says how long to wait until they are paid
/// for at `rate`. The copier waits *before* it moves the bytes, so the bytes moved by any
/// moment never exceed `rate` times the time since the first `take`. It starts empty: no
/// burst is granted. (The token bucket it replaces started full, a quarter second's worth,
/// and paced *after* each chunk, so a data set of a few chunks went at the disk's speed:
/// `--rate 48M` copied 8 MiB at 410 MiB/s.)
#[derive(Debug, Default)]
pub struct RateCap {
    /// Bytes per second; 0 for no cap.
    rate: AtomicU64,
    /// When the bytes booked so far are paid for.
    paid_until: Mutex<Option<Instant>>,
}

impl RateCap {
    pub fn new(rate: u64) -> RateCap {
        RateCap { rate: AtomicU64::new(rate), paid_until: Mutex::new(None) }
    }

    pub fn rate(&self) -> u64 {
        self.rate.load(Ordering::Relaxed)
    }

    /// A new rate, with a new schedule.
    pub fn set_rate(&self, rate: u64) {
        self.rate.store(rate, Ordering::Relaxed);
        *self.paid_until.lock() = None;
    }

    /// Change the rate, keeping the schedule (a controller's small steps).
    pub fn retune(&self, rate: u64) {
        self.rate.store(rate, Ordering::Relaxed);
    }

    /// Book `bytes` and return how long to wait before moving them.
    pub fn take(&self, bytes: u64) -> Duration {
        self.take_at(bytes, Instant::now())
    }

    fn take_at(&self, bytes: u64, now: Instant) -> Duration {
        let rate = self.rate() as f64;
        if rate <= 0.0 {
            return Duration::ZERO;
        }
        let mut paid = self.paid_until.lock();
        let kept_from = now.checked_sub(CAP_LATE_MAX).unwrap_or(now);
        let start = paid.map_or(now, |p| p.max(kept_from));
        let end = start + Duration::from_secs_f64(bytes as f64 / rate);
        *paid = Some(end);
        end.saturating_duration_since(now)
    }

    /// The largest chunk this cap lets go at once ([`CAP_CHUNK_TIME`]'s worth); `None` when
    /// there is no cap.
    pub fn chunk_bytes(&self) -> Option<u64> {
        let rate = self.rate();
        (rate > 0).then(|| (rate as f64 * CAP_CHUNK_TIME.as_secs_f64()) as u64)
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

    /// The story: `--rate 48M` copied an 8 MiB data set at 410 MiB/s. The bucket started
    /// full and was asked after each chunk, so the first quarter second's worth went at once.
    /// Now the first chunk waits for its own bytes, and at every chunk the bytes booked are
    /// paid for by the time the copier may move them.
    #[test]
    fn a_cap_grants_no_burst_and_holds_from_the_first_chunk() {
        let cap = RateCap::new(4 << 20);
        let t0 = Instant::now();
        assert_eq!(cap.take_at(1 << 20, t0), Duration::from_millis(250), "the first chunk waits for itself");
        // A copier that moves each chunk instantly, at the moment it is allowed to.
        let mut now = t0;
        let mut moved = 0u64;
        for _ in 0..40 {
            now += cap.take_at(400 << 10, now);
            moved += 400 << 10;
            let allowed = (4u64 << 20) as f64 * now.duration_since(t0).as_secs_f64();
            assert!(moved as f64 <= allowed * 1.0001 + (1 << 20) as f64, "{moved} bytes by {:?}", now - t0);
        }
        // A copier late by its copy time (5 ms a chunk) keeps the rate: the lag comes back.
        let cap = RateCap::new(4 << 20);
        let t0 = Instant::now();
        let mut now = t0;
        for _ in 0..100 {
            now += cap.take_at(400 << 10, now) + Duration::from_millis(5);
        }
        let rate = (100u64 * (400 << 10)) as f64 / now.duration_since(t0).as_secs_f64();
        assert!(rate > 0.98 * (4u64 << 20) as f64 && rate <= (4u64 << 20) as f64, "{rate}");
        // A pause earns at most CAP_LATE_MAX of credit.
        let late = now + Duration::from_secs(10);
        let w = cap.take_at(400 << 10, late);
        assert!(w + CAP_LATE_MAX >= Duration::from_millis(97), "{w:?}");
        assert_eq!(cap.chunk_bytes(), Some(((4u64 << 20) as f64 * 0.1) as u64));
        let none = RateCap::new(0);
        assert_eq!(none.take(u64::MAX / 2), Duration::ZERO);
        assert_eq!(none.chunk_bytes(), None);
    }

    #[test]
    fn governor_backs_off_when_fsyncs_slow_and_recovers() {
        let mut g = Governor::default();
        let start = g.steer(0, 1);
        assert!(start > GOVERNED_START, "fsyncs at their baseline: faster");
        assert_eq!(g.steer(1, 1), start, "no new fsync, no step");
        let mut r = start;
        for n in 2..20 {
            r = g.steer(n, n);
        }
        assert_eq!(r, GOVERNED_MIN, "slow fsyncs push it to the floor");
        let up = g.steer(19, 20);
        assert!(up > GOVERNED_MIN, "none slow since the last step: it grows again");
        let down = g.steer(20, 30);
        assert_eq!(down, GOVERNED_MIN.max(up * 0.25), "one slow fsync among ten since the last step is seen");
    }

    #[test]
    fn busy_applications_get_most_of_the_disk() {
        assert_eq!(rest_after(Duration::from_millis(10), false), Duration::ZERO);
        assert_eq!(rest_after(Duration::from_millis(10), true), Duration::from_millis(30));
    }
}
