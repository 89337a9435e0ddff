//! The monitor: what the write path of a data set under migration feeds (steps d and e of the
//! method), and what the copier reads.
//!
//! [`DirtyBitmap`]: one bit per logical track of the data set, in 64-bit atomic words.
//! Marking is a `fetch_or` on one word: lock-free, no system call.
//!
//! **Why no write slips between the copier's read of a track and the clearing of its bit.**
//! The write path marks a track *after* its bytes reached the source volume (the `pwrite`
//! returned); the copier takes-and-clears a word (`swap(0)`, acquire-release) *before* it
//! reads the tracks that word covers. Take any write W to track T and any copy C of T:
//! - if W's mark happened before C's clear, W's bytes were in the source before the clear,
//!   hence before C's read: C copies them;
//! - if W's mark happened after C's clear, the bit is set again and a later pass copies T
//!   again (or the cutover does, with writes held).
//!
//! Either way the target ends with W's bytes. C's read is a `read_at` into the copier's
//! buffer or, between two host files, the read inside a `copy_file_range`
//! (`StorageFile::copy_from`): both read the source's bytes at the time of the call, after
//! the clear, which is all the argument needs. The bulk copy reads tracks without clearing
//! bits first; a write during it just leaves a bit that the next pass re-copies.
//!
//! [`JobLink`] adds mirrored writes: once a job turns them on, a write to a track below the
//! copied mark goes to the source *and* the target, under the track's stripe lock, and is
//! not marked; so do a punch, a zero range and a truncate's cut (they zero both). The copier holds the same stripe locks while it re-copies a track, so a
//! mirrored write and a copy of the same track never interleave; the dirty set then only
//! shrinks. Writes above the copied mark (growth the copier has not reached) are marked as
//! before.
//!
//! [`WriteIntent`] is the job's checkpoint as the write path sees it (md's write-intent
//! bitmap, by regions of tracks): which regions below the checkpointed copy mark the log
//! holds dirty, and which were changed since the copier last looked. engine/intent.rs logs a
//! region before a change to it; migrate/job.rs (`Runner::checkpoint`) clears them.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;
use parking_lot::{Condvar, Mutex, MutexGuard};
use serde::{Deserialize, Serialize};

use crate::extent_map::ExtentMap;
use crate::geometry::TrackNo;
use crate::migrate::pace::LATENCY_HEADROOM;

/// Bits per bitmap word: one `fetch_or`/`swap` covers this many tracks.
pub const WORD_BITS: u64 = 64;

#[derive(Debug)]
pub struct DirtyBitmap {
    words: Vec<AtomicU64>,
    tracks: u64,
}

impl DirtyBitmap {
    pub fn new(tracks: u64) -> DirtyBitmap {
        let n = tracks.div_ceil(WORD_BITS) as usize;
        DirtyBitmap { words: (0..n).map(|_| AtomicU64::new(0)).collect(), tracks }
    }

    pub fn tracks(&self) -> u64 {
        self.tracks
    }

    /// Mark tracks `first..=last`. Tracks past the bitmap's end are ignored (growth past the
    /// assessed size is handled by the job, not the bitmap).
    pub fn mark(&self, first: TrackNo, last: TrackNo) {
        let last = last.0.min(self.tracks.saturating_sub(1));
        let mut t = first.0;
        while t <= last && t < self.tracks {
            let w = t / WORD_BITS;
            let lo = t % WORD_BITS;
            let hi = (last - w * WORD_BITS).min(WORD_BITS - 1);
            let mask = if hi - lo == WORD_BITS - 1 { u64::MAX } else { ((1u64 << (hi - lo + 1)) - 1) << lo };
            self.words[w as usize].fetch_or(mask, Ordering::AcqRel);
            t = (w + 1) * WORD_BITS;
        }
    }

    /// Take and clear word `w`: the tracks whose bits were set.
    pub fn take_word(&self, w: usize) -> u64 {
        self.words[w].swap(0, Ordering::AcqRel)
    }

    pub fn word_count(&self) -> usize {
        self.words.len()
    }

    pub fn count_dirty(&self) -> u64 {
        self.words.iter().map(|w| w.load(Ordering::Acquire).count_ones() as u64).sum()
    }

    /// Word `w`, left as it is.
    pub fn peek_word(&self, w: usize) -> u64 {
        self.words[w].load(Ordering::Acquire)
    }

    /// Whether track `t` is marked (a track past the end is not).
    pub fn is_marked(&self, t: u64) -> bool {
        t < self.tracks && self.words[(t / WORD_BITS) as usize].load(Ordering::Acquire) & (1 << (t % WORD_BITS)) != 0
    }

    /// Every marked track, in order, clearing them.
    pub fn take_all(&self) -> Vec<u64> {
        let mut out = Vec::new();
        for w in 0..self.words.len() {
            let mut bits = self.take_word(w);
            while bits != 0 {
                let lo = bits.trailing_zeros() as u64;
                out.push(w as u64 * WORD_BITS + lo);
                bits &= bits - 1;
            }
        }
        out
    }
}

/// A write-intent region is at least this many logical tracks (64 MiB of 64 KiB tracks): a
/// write below a job's checkpoint costs one log sync per region per checkpoint interval at
/// most, and a resumed job re-copies whole regions.
pub const REGION_TRACKS_MIN: u64 = 1024;
/// At most this many regions per job (larger regions for a larger pool), so that a
/// checkpoint's dirty set (a varint each) fits one log frame with room to spare.
pub const REGIONS_MAX: u64 = 1 << 16;

/// The region size for a job whose data set may reach `capacity_tracks`: a power of two, so
/// a bitmap word of tracks lies in one region.
pub fn region_tracks_for(capacity_tracks: u64) -> u64 {
    REGION_TRACKS_MIN.max(capacity_tracks.div_ceil(REGIONS_MAX)).next_power_of_two()
}

/// The write-intent side of a job's checkpoint (md's write-intent bitmap): below the
/// checkpointed copy mark, a region the checkpoint holds clean must be logged dirty, and the
/// log synced, *before* a write changes it. docs/design.md, "Resuming a job", tells why.
#[derive(Debug)]
pub struct WriteIntent {
    pub region_tracks: u64,
    /// The copy mark of the job's last checkpoint in the log (0: none yet, no intent needed).
    mark: AtomicU64,
    /// Regions the log holds dirty (the checkpoint's and the synced intents since).
    logged: DirtyBitmap,
    /// Regions written since the copier last cleared this (marked after the write landed).
    touched: DirtyBitmap,
    /// Serialises intents (the append and the sync) with each other and with checkpoints.
    pub serial: Mutex<()>,
}

impl WriteIntent {
    pub fn new(capacity_tracks: u64, region_tracks: u64) -> WriteIntent {
        let regions = capacity_tracks.div_ceil(region_tracks);
        WriteIntent {
            region_tracks,
            mark: AtomicU64::new(0),
            logged: DirtyBitmap::new(regions),
            touched: DirtyBitmap::new(regions),
            serial: Mutex::new(()),
        }
    }

    pub fn mark(&self) -> u64 {
        self.mark.load(Ordering::Acquire)
    }

    /// The regions a change of tracks `first..=last` must log before it is made.
    pub fn needed(&self, first: u64, last: u64) -> Vec<u64> {
        let mark = self.mark();
        if first >= mark {
            return Vec::new();
        }
        let last = last.min(mark - 1);
        (first / self.region_tracks..=last / self.region_tracks).filter(|&r| !self.logged.is_marked(r)).collect()
    }

    /// `regions` are dirty in the log, durably.
    pub fn logged(&self, regions: &[u64]) {
        for &r in regions {
            self.logged.mark(TrackNo(r), TrackNo(r));
        }
    }

    /// Tracks `first..=last` were changed (after the change landed).
    pub fn touch(&self, first: u64, last: u64) {
        self.touched.mark(TrackNo(first / self.region_tracks), TrackNo(last / self.region_tracks));
    }

    /// The regions touched since the last call, cleared.
    pub fn take_touched(&self) -> Vec<u64> {
        self.touched.take_all()
    }

    /// A checkpoint at `mark` with `dirty` regions was logged (with writes held).
    pub fn reset(&self, mark: u64, dirty: &std::collections::BTreeSet<u64>) {
        self.logged.take_all();
        for &r in dirty {
            self.logged.mark(TrackNo(r), TrackNo(r));
        }
        self.mark.store(mark, Ordering::Release);
    }
}

/// Stripe locks of mirrored tracks: track `t` is guarded by stripe `t % STRIPES`.
pub const STRIPES: u64 = 64;

/// A job's hooks in the write and open paths of its data set.
#[derive(Debug)]
pub struct JobLink {
    pub job: u64,
    pub dirty: DirtyBitmap,
    /// Logical tracks below this were copied to the target at least once. An atomic, not
    /// part of the job's state enum (migrate/state.rs): every write reads it to decide
    /// whether to mirror, and must not take the state's lock for it.
    copied_tracks: AtomicU64,
    mirror: AtomicBool,
    /// The target's reservation as an extent map (grows with the data set).
    pub target: ArcSwap<ExtentMap>,
    stripes: Vec<Mutex<()>>,
    pub mirrored_writes: AtomicU64,
    /// Close mode: true from the start of the downtime window to its end; opens wait.
    window: Mutex<bool>,
    window_cv: Condvar,
    /// Close mode: set by the last release of a handle (it wakes the job).
    closed: Mutex<bool>,
    closed_cv: Condvar,
    /// A mirrored write could not reach the target: the job fails (the application's write,
    /// which reached the source, does not).
    target_error: Mutex<Option<String>>,
    /// The checkpoint's write intent.
    pub intent: WriteIntent,
}

/// The stripe locks of a range of tracks, held.
pub struct TrackGuard<'a> {
    _held: Vec<MutexGuard<'a, ()>>,
}

impl JobLink {
    pub fn new(job: u64, capacity_tracks: u64, target: ExtentMap) -> JobLink {
        Self::with_regions(job, capacity_tracks, target, region_tracks_for(capacity_tracks))
    }

    /// A link whose write-intent regions are `region_tracks` long (a resumed job keeps its
    /// checkpoint's).
    pub fn with_regions(job: u64, capacity_tracks: u64, target: ExtentMap, region_tracks: u64) -> JobLink {
        JobLink {
            intent: WriteIntent::new(capacity_tracks, region_tracks),
            job,
            dirty: DirtyBitmap::new(capacity_tracks),
            copied_tracks: AtomicU64::new(0),
            mirror: AtomicBool::new(false),
            target: ArcSwap::from_pointee(target),
            stripes: (0..STRIPES).map(|_| Mutex::new(())).collect(),
            mirrored_writes: AtomicU64::new(0),
            window: Mutex::new(false),
            window_cv: Condvar::new(),
            closed: Mutex::new(false),
            closed_cv: Condvar::new(),
            target_error: Mutex::new(None),
        }
    }

    pub fn fail_target(&self, why: String) {
        self.target_error.lock().get_or_insert(why);
    }

    pub fn target_error(&self) -> Option<String> {
        self.target_error.lock().clone()
    }

    pub fn copied_tracks(&self) -> u64 {
        self.copied_tracks.load(Ordering::Acquire)
    }

    /// Tracks below `tracks` have been copied (never lowered).
    pub fn set_copied(&self, tracks: u64) {
        self.copied_tracks.fetch_max(tracks, Ordering::AcqRel);
    }

    pub fn mirroring(&self) -> bool {
        self.mirror.load(Ordering::Acquire)
    }

    pub fn start_mirroring(&self) {
        self.mirror.store(true, Ordering::Release);
    }

    /// Lock the stripes of tracks `first..=last`, in ascending stripe order (so two lockers
    /// never wait on each other in a cycle).
    pub fn lock_tracks(&self, first: u64, last: u64) -> TrackGuard<'_> {
        let mut idx: Vec<u64> = if last - first + 1 >= STRIPES {
            (0..STRIPES).collect()
        } else {
            (first..=last).map(|t| t % STRIPES).collect()
        };
        idx.sort_unstable();
        idx.dedup();
        TrackGuard { _held: idx.into_iter().map(|i| self.stripes[i as usize].lock()).collect() }
    }

    /// For a write of tracks `first..=last`: the held stripes if the write must be mirrored
    /// (mirroring is on and every track was copied), else `None` (write the source, then
    /// [`DirtyBitmap::mark`]).
    pub fn mirror_guard(&self, first: u64, last: u64) -> Option<TrackGuard<'_>> {
        (self.mirroring() && last < self.copied_tracks()).then(|| self.lock_tracks(first, last))
    }

    /// Close mode: open the downtime window (opens of the data set wait) or close it.
    pub fn set_window(&self, on: bool) {
        *self.window.lock() = on;
        if !on {
            self.window_cv.notify_all();
        }
    }

    pub fn in_window(&self) -> bool {
        *self.window.lock()
    }

    /// Wait while the downtime window is open.
    pub fn wait_window(&self) {
        let mut w = self.window.lock();
        while *w {
            self.window_cv.wait(&mut w);
        }
    }

    /// The last open handle of the data set was released.
    pub fn notify_closed(&self) {
        *self.closed.lock() = true;
        self.closed_cv.notify_all();
    }

    /// Wait up to `timeout` for a last release; whether one came (and clear it).
    pub fn wait_closed(&self, timeout: Duration) -> bool {
        let mut c = self.closed.lock();
        if !*c {
            self.closed_cv.wait_for(&mut c, timeout);
        }
        std::mem::take(&mut *c)
    }
}

/// How long the applications' syncs take: what the copiers' pacing steers by.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct AppSyncReport {
    /// Syncs since the mount: fsync, fdatasync, and writes through O_SYNC/O_DSYNC handles.
    pub count: u64,
    /// The latest one, microseconds.
    pub latest_us: u64,
    /// Moving average while no job copies (the pacing's baseline), microseconds; 0 before
    /// the first.
    pub quiet_avg_us: u64,
}

/// An fsync older than this says nothing about now.
const SYNC_RECENT_NS: i64 = 1_000_000_000;

/// Application fsync latency, as two moving averages: all of them, and those seen while no
/// copier was running (the baseline). The engine's fsync path feeds it; the copier's pacing
/// reads it (migrate/pace.rs).
#[derive(Debug, Default)]
pub struct SyncLatency {
    /// The latest fsync's duration.
    latest_ns: AtomicU64,
    /// Fsyncs, while a copier ran, slower than [`LATENCY_HEADROOM`] times the baseline: the
    /// governor cuts the copy rate when this moved since its last step, so no slow fsync goes
    /// unseen between two of its steps.
    slow: AtomicU64,
    ewma_ns: AtomicU64,
    quiet_ewma_ns: AtomicU64,
    samples: AtomicU64,
    last_ns: AtomicI64,
    /// Jobs copying now (their copy, re-sync or wait for a close).
    copiers: AtomicUsize,
}

fn ewma(cell: &AtomicU64, sample: u64) {
    let old = cell.load(Ordering::Relaxed);
    let new = if old == 0 { sample } else { (old * 3 + sample) / 4 };
    cell.store(new, Ordering::Relaxed);
}

impl SyncLatency {
    /// An application fsync took `took_ns`, ending at `now_ns`.
    pub fn record(&self, took_ns: u64, now_ns: i64) {
        self.latest_ns.store(took_ns, Ordering::Relaxed);
        ewma(&self.ewma_ns, took_ns);
        if self.copiers.load(Ordering::Relaxed) == 0 {
            ewma(&self.quiet_ewma_ns, took_ns);
        } else {
            let base = self.quiet_ewma_ns.load(Ordering::Relaxed);
            if base > 0 && took_ns as f64 > base as f64 * LATENCY_HEADROOM {
                self.slow.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.last_ns.store(now_ns, Ordering::Relaxed);
        self.samples.fetch_add(1, Ordering::Relaxed);
    }

    /// (slow fsyncs, all fsyncs), both counted since the mount, if applications synced
    /// recently and a baseline exists.
    pub fn feedback(&self, now_ns: i64) -> Option<(u64, u64)> {
        let base = self.quiet_ewma_ns.load(Ordering::Relaxed);
        if base == 0 || now_ns - self.last_ns.load(Ordering::Relaxed) > SYNC_RECENT_NS {
            return None;
        }
        Some((self.slow.load(Ordering::Relaxed), self.samples.load(Ordering::Relaxed)))
    }

    /// What `.ferry/status` shows of it.
    pub fn report(&self) -> AppSyncReport {
        AppSyncReport {
            count: self.samples.load(Ordering::Relaxed),
            latest_us: self.latest_ns.load(Ordering::Relaxed) / 1000,
            quiet_avg_us: self.quiet_ewma_ns.load(Ordering::Relaxed) / 1000,
        }
    }

    pub fn copier_started(&self) {
        self.copiers.fetch_add(1, Ordering::Relaxed);
    }

    pub fn copier_ended(&self) {
        self.copiers.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mark_spans_words_and_take_clears() {
        let b = DirtyBitmap::new(200);
        b.mark(TrackNo(60), TrackNo(130));
        assert_eq!(b.count_dirty(), 71);
        assert_eq!(b.take_word(0), 0xF << 60);
        assert_eq!(b.take_word(1), u64::MAX);
        assert_eq!(b.take_word(2), 0b111);
        assert_eq!(b.count_dirty(), 0);
        b.mark(TrackNo(199), TrackNo(500));
        assert_eq!(b.count_dirty(), 1);
    }

    #[test]
    fn intent_is_needed_below_the_mark_in_clean_regions_only() {
        assert_eq!(region_tracks_for(100), REGION_TRACKS_MIN);
        assert_eq!(region_tracks_for(REGIONS_MAX * 3000), 4096, "a power of two, at most REGIONS_MAX regions");
        let w = WriteIntent::new(100, 4);
        assert!(w.needed(0, 99).is_empty(), "no checkpoint yet: no intent");
        w.reset(10, &[1].into());
        assert_eq!(w.needed(0, 99), [0, 2], "regions 0 and 2 lie below the mark, 1 is dirty");
        assert!(w.needed(10, 50).is_empty(), "at and past the mark the copy will come again");
        w.logged(&[0]);
        assert_eq!(w.needed(3, 9), [2]);
        w.touch(5, 13);
        assert_eq!(w.take_touched(), [1, 2, 3]);
        assert!(w.take_touched().is_empty());
        w.reset(12, &Default::default());
        assert_eq!(w.needed(0, 11), [0, 1, 2], "a checkpoint clears what it does not name");
    }

    #[test]
    fn every_slow_fsync_while_a_copier_runs_is_counted() {
        let s = SyncLatency::default();
        assert!(s.feedback(1).is_none(), "no baseline yet");
        s.record(1_000, 1);
        s.record(1_000, 2);
        s.copier_started();
        s.record(5_000, 3);
        s.record(1_000, 4);
        s.record(1_400, 5);
        assert_eq!(s.feedback(5), Some((1, 5)), "one of three over 1.5x the baseline, though the latest was fast");
        s.copier_ended();
        s.record(9_000, 6);
        assert_eq!(s.feedback(6), Some((1, 6)), "with no copier a slow fsync moves the baseline instead");
    }

    #[test]
    fn mirror_only_below_the_copied_mark() {
        let l = JobLink::new(1, 100, ExtentMap::default());
        assert!(l.mirror_guard(0, 0).is_none(), "mirroring is off");
        l.start_mirroring();
        assert!(l.mirror_guard(0, 0).is_none(), "nothing copied yet");
        l.set_copied(10);
        assert!(l.mirror_guard(3, 9).is_some());
        assert!(l.mirror_guard(9, 10).is_none(), "track 10 is not copied yet");
        // Stripes of a wide range are all taken in order: a second locker waits, no deadlock.
        let g = l.lock_tracks(0, 99);
        drop(g);
        let _a = l.lock_tracks(63, 64);
    }
}
