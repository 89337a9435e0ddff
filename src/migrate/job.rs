//! One job: the method's steps a to m for one data set, run by its own thread (the copier).
//! docs/design.md maps each step to the functions here.

use std::ops::Range;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::pace::{rest_after, Governor, APP_ACTIVE_WINDOW, BUSY_CHUNK_BYTES, IDLE_CHUNK_BYTES};
use super::plan::{grow_target, names, place_target, tracks_text};
use super::{JobState, Migrations, State, Verified};
use crate::catalog::model::now_ns;
use crate::catalog::model::{Body, Catalog, Cutover, Inode, Op};
use crate::engine::{read_pieces, volume_of, write_pieces, Engine, Error as FsError, FileNode, Volumes};
use crate::extent_map::{ExtentMap, Piece};
use crate::geometry::Geometry;
use crate::layout::{lay_out, Layout};
use crate::monitor::{JobLink, WORD_BITS};
use crate::space::VolumeId;
use crate::storage::StorageFile;

/// Re-sync passes before the job turns on mirrored writes (step g, bounded).
pub const MAX_PASSES: u32 = 8;
/// A pass that leaves more than half of the dirty set it started from has not converged:
/// the writers dirty tracks about as fast as the copier cleans them. After this many such
/// passes in a row mirrored writes go on.
pub const STUCK_PASSES: u32 = 1;
/// The dirty set is small enough for the cutover when it holds at most this many bytes:
/// copying it with writes held takes well under a millisecond from the page cache.
pub const CONVERGED_BYTES: u64 = 1 << 20;
/// A simulated job copies this many tracks between yield points, so that application
/// operations interleave with every part of the copy.
const SIMULATED_CHUNK_TRACKS: u64 = 2;
/// The copier's buffer, per job, whatever the track size: where the bytes cannot stay in
/// the kernel (a volume that is not a host file, or a file system that refuses
/// `copy_file_range`: [`StorageFile::copy_from`]), a chunk or a dirty run (up to 64 tracks
/// of up to 64 MiB each, with writes held) is read and written in pieces of at most this many
/// bytes. 1 MiB is as large as the mount's own writes, so a piece costs the disk no more
/// round trips than an application's write; the buffer held it whole before, and a pool of
/// 8 MiB tracks took the daemon from 5 MB to 275 MB.
pub const COPY_PIECE_BYTES_MAX: u64 = 1 << 20;
/// The verification (`verify=yes`) reads source and target in pieces of this many bytes and
/// checksums them at once: small enough that both pieces are still in the CPU's cache for
/// the checksum, large enough that a pool of small tracks costs few reads. A power of two,
/// so a piece holds whole tracks or whole parts of one.
pub const VERIFY_PIECE_BYTES: u64 = 128 << 10;

/// A checkpoint after this many bytes copied (or [`CHECKPOINT_INTERVAL`]): a crash
/// re-copies at most this much of the bulk copy. One checkpoint costs a flush of the target
/// and one log write.
pub const CHECKPOINT_BYTES: u64 = 256 << 20;
/// A checkpoint at least this often while the job copies or re-syncs: a slow (capped) copy
/// loses at most this much time, and a region's intent costs at most one log sync per
/// interval.
pub const CHECKPOINT_INTERVAL: Duration = Duration::from_secs(2);
/// A simulated job takes a checkpoint every this many chunks, so that power cuts land
/// before, between and after them.
const SIMULATED_CHECKPOINT_CHUNKS: u64 = 3;

/// A simulated job's write-intent regions are this many tracks, so that its small data sets
/// span several, and power cuts find regions both clean and dirty.
const SIMULATED_REGION_TRACKS: u64 = 4;

/// The live cutover flushes the target before it holds the writes at most this many times,
/// until one flush takes less than [`SHORT_FLUSH`] (a simulated job once: the clock must not
/// change what a seed replays).
const PRE_HOLD_FLUSHES: usize = 3;
const SHORT_FLUSH: Duration = Duration::from_millis(1);

/// `part` of `total` in whole per cent, never above 100.
pub fn percent(part: u64, total: u64) -> u64 {
    (part.min(total) * 100).checked_div(total).unwrap_or(100)
}

/// `len` bytes at `off` in pieces (offset, length) of at most `max` bytes, in order.
fn pieces(off: u64, len: u64, max: u64) -> impl Iterator<Item = (u64, u64)> {
    (0..len.div_ceil(max)).map(move |i| {
        let at = i * max;
        (off + at, (len - at).min(max))
    })
}

/// Why a job stopped before its switch.
#[derive(Debug)]
pub enum End {
    /// The mount is stopping: the job's record stays; the next mount resumes it from its
    /// checkpoint (or, without one, rolls it back and starts it again).
    Stopped,
    Cancelled,
    /// The data set was deleted: nothing to move.
    Gone,
    Failed(String),
}

impl From<std::io::Error> for End {
    fn from(e: std::io::Error) -> End {
        End::Failed(format!("volume I/O: {e}"))
    }
}

impl From<FsError> for End {
    fn from(e: FsError) -> End {
        End::Failed(e.to_string())
    }
}

type JobResult<T> = Result<T, End>;

/// A chunk of the target pushed to the disk, to be waited for one chunk later.
struct InFlight {
    volume: Arc<dyn StorageFile>,
    offset: u64,
    len: u64,
}

struct Runner<'a> {
    m: &'a Arc<Migrations>,
    engine: &'a Engine,
    job: &'a JobState,
    g: Geometry,
    node: Option<Arc<FileNode>>,
    link: Option<Arc<JobLink>>,
    buf: Vec<u8>,
    in_flight: Vec<InFlight>,
    /// Push each chunk to the disk without waiting for the one before (the cutover's final
    /// copies: one wait for all of them at the end, not one per track).
    batch_writeback: bool,
    /// When step f started; `None` again once it is done (the copy rate holds still then).
    copy_started: Option<Instant>,
    /// The copy rate while applications sync (pace.rs).
    governor: Governor,
    /// Counted among the running copiers (the fsync baseline excludes their effect).
    copying: bool,
    /// What the verification before the switch found (`verify=yes`), once it ran.
    verified: Option<Verified>,
    /// Bytes a resumed job had copied before this mount (its checkpoint): not in the rate.
    copied_before: u64,
    /// When the last checkpoint was taken, and the chunks and bytes copied since.
    last_checkpoint: Instant,
    chunks_since_checkpoint: u64,
    bytes_since_checkpoint: u64,
}

impl Drop for Runner<'_> {
    fn drop(&mut self) {
        if self.copying {
            self.engine.app_syncs.copier_ended();
        }
    }
}

/// Run the job to its end; the phase and the events say how it ended.
pub fn run(m: &Arc<Migrations>, job: &JobState) {
    let mut r = Runner {
        m,
        engine: &m.engine,
        job,
        g: m.engine.geometry,
        node: None,
        link: None,
        buf: Vec::new(),
        in_flight: Vec::new(),
        batch_writeback: false,
        copy_started: None,
        governor: Governor::default(),
        copying: false,
        verified: None,
        copied_before: 0,
        last_checkpoint: Instant::now(),
        chunks_since_checkpoint: 0,
        bytes_since_checkpoint: 0,
    };
    match r.run() {
        Ok(()) => {}
        Err(End::Stopped) => {
            r.detach();
            job.settle(m, State::Stopped);
            m.event(format!(
                "job {} stopped path={} (the next mount resumes it from its checkpoint, or starts it again)",
                job.id, job.path
            ));
        }
        Err(End::Cancelled) => {
            r.detach();
            match r.drop_record() {
                Ok(()) => {
                    job.settle(m, State::Cancelled);
                    m.event(format!("job {} cancelled path={} (target freed, source untouched)", job.id, job.path));
                }
                Err(e) => job.fail(m, format!("cancelling: {e}"), None),
            }
        }
        Err(End::Gone) => {
            r.detach();
            match r.drop_record() {
                Ok(()) => {
                    job.settle(m, State::Gone);
                    m.event(format!(
                        "job {} gone path={} (the data set was deleted; nothing to move)",
                        job.id, job.path
                    ));
                }
                Err(e) => job.fail(m, format!("rolling back the job of a deleted data set: {e}"), None),
            }
        }
        Err(End::Failed(why)) => {
            r.detach();
            let why = match r.drop_record() {
                Ok(()) => why,
                Err(e) => format!("{why}; rolling back: {e}"),
            };
            job.fail(m, why, r.verified);
        }
    }
}

/// The logical tracks a job's bitmap covers: the data set's (mapped or preallocated) and
/// its target's, and as many again as the pool holds, so that no growth the pool can hold
/// outruns it. One bit a track: a 1 TiB sparse data set of 64 KiB tracks costs 2 MiB.
fn bitmap_tracks(c: &Catalog, i: &Inode, target: &Layout) -> u64 {
    let own = match &i.body {
        Body::File { layout, prealloc_end, size_bytes } => {
            layout.end().max(*prealloc_end).max(c.geometry.tracks_for(*size_bytes))
        }
        _ => 0,
    };
    let pool_tracks: u64 = c.volumes.values().map(|v| v.free.tracks_total()).sum();
    own.max(target.end()) + pool_tracks
}

/// At the mount, before it serves: give a job that recovery kept for its checkpoint its
/// monitor at once, as the checkpoint left it (copied mark, dirty regions, write intent), so
/// that no write between the mount and the job's start escapes it (the job may wait in the
/// queue). Returns the checkpoint's copy mark, the data set's tracks and the dirty regions.
pub(super) fn attach_checkpoint(m: &Migrations, job: &JobState) -> Result<(u64, u64, usize), FsError> {
    let g = m.engine.geometry;
    let (cp, target, bitmap_tracks, tracks) = {
        let cat = m.engine.catalog.lock();
        let c = &cat.catalog;
        let cp = c.checkpoints.get(&job.id).cloned().ok_or(FsError::NotFound)?;
        let target = c.jobs.get(&job.id).map(|j| j.target.clone()).ok_or(FsError::NotFound)?;
        let i = c.get(job.ino).ok_or(FsError::NotFound)?;
        // The copy mark counts logical tracks: its percentage is of the logical end.
        let end = match &i.body {
            Body::File { layout, prealloc_end, size_bytes } => {
                layout.end().min(g.tracks_for(*size_bytes).max(*prealloc_end))
            }
            _ => 0,
        };
        (cp, target.clone(), bitmap_tracks(c, i, &target), end)
    };
    let link = JobLink::with_regions(job.id, bitmap_tracks, ExtentMap::new(g, &target), cp.region_tracks);
    link.set_copied(cp.copied_tracks);
    for &r in &cp.dirty_regions {
        let first = r * cp.region_tracks;
        let last = ((r + 1) * cp.region_tracks).min(cp.copied_tracks);
        if last > first {
            link.dirty.mark(crate::geometry::TrackNo(first), crate::geometry::TrackNo(last - 1));
        }
    }
    link.intent.reset(cp.copied_tracks, &cp.dirty_regions);
    let link = Arc::new(link);
    m.engine.pin_node(job.ino, link.clone())?;
    job.link.store(Some(link));
    job.bytes_copied.store(g.bytes_of(cp.copied_tracks.min(tracks)), Ordering::Relaxed);
    job.bytes_total.store(g.bytes_of(tracks), Ordering::Relaxed);
    Ok((cp.copied_tracks, tracks, cp.dirty_regions.len()))
}

/// A queued job that holds a monitor (one resumed from its checkpoint) lets go of it: it
/// was cancelled before it started.
pub(super) fn detach_queued(m: &Migrations, job: &JobState) {
    if let Some(link) = job.link.load_full() {
        match m.engine.pin_node(job.ino, link.clone()) {
            Ok(node) => {
                {
                    let _hold = node.write_hold.write();
                    node.job.store(None);
                }
                if let Err(e) = m.engine.unpin_node(&node) {
                    log::warn!("job {}: releasing the data set: {e}", job.id);
                }
            }
            Err(e) => log::warn!("job {}: releasing the data set: {e}", job.id),
        }
        link.set_window(false);
    }
    job.unlink();
}

impl Runner<'_> {
    /// Step the job's state to `to`. A refused step is a bug: it is logged, and the job fails
    /// (and rolls back) rather than go on in a state it should not be in.
    fn enter(&self, to: State) -> JobResult<()> {
        self.job.transition(to).map_err(|e| {
            log::error!("job {}: {e}", self.job.id);
            End::Failed(format!("internal error: {e}"))
        })
    }

    /// The point of no return ([`JobState::begin_switch`]): `Err(Cancelled)` if a cancel
    /// came first.
    fn begin_switch(&self) -> JobResult<()> {
        match self.job.begin_switch() {
            Ok(true) => Ok(()),
            Ok(false) => Err(End::Cancelled),
            Err(e) => {
                log::error!("job {}: {e}", self.job.id);
                Err(End::Failed(format!("internal error: {e}")))
            }
        }
    }

    /// A point where the job may stop, be cancelled, or (simulated) give the turn back.
    fn check(&self) -> JobResult<()> {
        if let Some(t) = &self.m.turns {
            t.park(self.job.id);
        }
        if self.m.stopping() {
            return Err(End::Stopped);
        }
        if self.job.cancel_requested() {
            return Err(End::Cancelled);
        }
        if self.data_set_gone() {
            return Err(End::Gone);
        }
        if let Some(why) = self.link.as_ref().and_then(|l| l.target_error()) {
            return Err(End::Failed(why));
        }
        Ok(())
    }

    /// The data set was deleted (no name reaches it; an open handle may still write it, but
    /// it is destroyed at its last close): there is nothing to move.
    fn data_set_gone(&self) -> bool {
        let cat = self.engine.catalog.lock();
        !cat.catalog.get(self.job.ino).is_some_and(|i| matches!(i.body, Body::File { .. }) && i.meta.nlink > 0)
    }

    fn node(&self) -> &Arc<FileNode> {
        self.node.as_ref().expect("pinned")
    }

    fn link(&self) -> &Arc<JobLink> {
        self.link.as_ref().expect("pinned")
    }

    fn run(&mut self) -> JobResult<()> {
        let m = self.m;
        let job = self.job;
        self.check()?;

        // a. Assess: the source's mapped tracks (its holes take no target) and the space.
        self.enter(State::Assessing)?;
        let (tracks, ranges, bitmap_tracks) = {
            let cat = self.engine.catalog.lock();
            let c = &cat.catalog;
            let i = c.get(job.ino).ok_or(End::Gone)?;
            if !matches!(i.body, Body::File { .. }) || i.meta.nlink == 0 {
                return Err(End::Gone);
            }
            // The bytes end at the size (or the explicit preallocation past it): the
            // over-provisioned tail past that is not moved (the cutover trims it from the
            // source).
            let Body::File { layout, prealloc_end, .. } = &i.body else { return Err(End::Gone) };
            let keep = self.g.tracks_for(i.size_bytes()).max(*prealloc_end);
            let ranges: Vec<Range<u64>> = layout.slice(0..keep).map(|r| r.logical..r.end()).collect();
            let tracks = ranges.iter().map(|r| r.end - r.start).sum::<u64>();
            (tracks, ranges, bitmap_tracks(c, i, &Layout::default()))
        };
        job.bytes_total.store(self.g.bytes_of(tracks), Ordering::Relaxed);

        // b, c. Allocate the target as one request and map every mapped source track onto
        // it, in order: logical track t of the data set goes to logical track t of the
        // target map; holes stay holes.
        self.enter(State::Allocating)?;
        // A job resumed from its checkpoint has its target, and its link since the mount.
        let resumed = job.link.load_full();
        let target = if resumed.is_some() {
            Layout::default()
        } else {
            let mut cat = self.engine.catalog.lock();
            let c = &cat.catalog;
            let plan = place_target(c, &job.targets, tracks).ok_or_else(|| {
                End::Failed(format!(
                    "target full: {} needs {}; {} {} {} free",
                    job.path,
                    tracks_text(c, tracks),
                    names(c, &job.targets),
                    if job.targets.len() == 1 { "has" } else { "have" },
                    tracks_text(c, super::plan::free_on(c, &job.targets))
                ))
            })?;
            if !plan.is_empty() {
                self.engine.settle_quarantine(&mut cat, &plan)?;
                let runs = lay_out(&plan, &ranges);
                self.engine.commit(&mut cat, Op::JobMap { job: job.id, runs })?;
            }
            cat.catalog.jobs.get(&job.id).map(|j| j.target.clone()).unwrap_or_default()
        };

        // d. Start the monitor: from here every write of the data set marks its tracks.
        let link = match resumed {
            Some(l) => l,
            None if m.turns.is_some() => Arc::new(JobLink::with_regions(
                job.id,
                bitmap_tracks,
                ExtentMap::new(self.g, &target),
                SIMULATED_REGION_TRACKS,
            )),
            None => Arc::new(JobLink::new(job.id, bitmap_tracks, ExtentMap::new(self.g, &target))),
        };
        let node = self.engine.pin_node(job.ino, link.clone())?;
        job.link.store(Some(link.clone()));
        self.node = Some(node);
        self.link = Some(link);
        m.event(format!(
            "job {} job-start path={} tracks={} to={} cutover={}",
            job.id,
            job.path,
            tracks,
            self.target_names(),
            job.cutover.name()
        ));

        // f. Copy, following growth.
        self.enter(State::Copying)?;
        self.copy_started = Some(Instant::now());
        self.copied_before = job.bytes_copied.load(Ordering::Relaxed);
        self.last_checkpoint = Instant::now();
        self.engine.app_syncs.copier_started();
        self.copying = true;
        self.copy_growth(true)?;
        self.note_rate();
        self.copy_started = None;
        m.event(format!(
            "job {} copy-done path={} bytes={}",
            job.id,
            job.path,
            job.bytes_copied.load(Ordering::Relaxed)
        ));

        // g. Re-sync until the dirty set is small (mirrored writes if it won't shrink).
        self.enter(State::Resyncing)?;
        self.converge()?;

        // h..m. Cutover.
        match job.cutover {
            Cutover::Live => self.cutover_live(),
            Cutover::Close => self.cutover_close(),
        }
    }

    fn target_names(&self) -> String {
        let cat = self.engine.catalog.lock();
        names(&cat.catalog, &self.job.targets)
    }

    /// The logical tracks a migration moves: up to the size, or the explicit preallocation
    /// past it. (The over-provisioned tail past them is trimmed at the cutover.)
    fn keep_tracks(&self) -> u64 {
        let node = self.node();
        self.g.tracks_for(node.size_bytes.load(Ordering::Acquire)).max(node.prealloc_end.load(Ordering::Acquire))
    }

    /// The logical end of the data set's moved tracks: past it, only holes (and the tail).
    fn source_tracks(&self) -> u64 {
        self.node().map.load().end_tracks().min(self.keep_tracks())
    }

    /// Steps c and k: the target maps every mapped source track of logical tracks `range`
    /// (the data set grew, or a write filled one of its holes); with `written`, every track
    /// of `range` (tracks a write marked: an application that punches or truncates and
    /// writes the same tracks again and again would otherwise find a target hole at every
    /// mirrored write, and mark it, if the copier came by while the source had the hole).
    /// The tracks it lacks are reserved in one request, laid over the logical tracks that
    /// need them; those the source does not map at the switch are set aside with it.
    fn ensure_target(&self, range: Range<u64>, written: bool) -> JobResult<()> {
        let link = self.link();
        let end = if written { link.dirty.tracks() } else { self.source_tracks() };
        let range = range.start..range.end.min(end);
        if range.is_empty() {
            return Ok(());
        }
        let src = self.node().map.load();
        let target = link.target.load();
        let missing: Vec<Range<u64>> = if written {
            target.layout().holes_in(range)
        } else {
            src.layout().slice(range).flat_map(|r| target.layout().holes_in(r.logical..r.end())).collect()
        };
        let Some(last) = missing.last() else { return Ok(()) };
        if last.end > link.dirty.tracks() {
            return Err(End::Failed("the data set grew past what the job's bitmap covers; start it again".into()));
        }
        let needed: u64 = missing.iter().map(|r| r.end - r.start).sum();
        let mut cat = self.engine.catalog.lock();
        let c = &cat.catalog;
        let current = c.jobs.get(&self.job.id).map(|j| j.target.clone()).unwrap_or_default();
        let more = grow_target(c, &self.job.targets, &current, needed).ok_or_else(|| {
            End::Failed(format!(
                "target full: {} grew by {}; {} can't hold it",
                self.job.path,
                tracks_text(c, needed),
                names(c, &self.job.targets)
            ))
        })?;
        let runs = lay_out(&more, &missing);
        self.engine.settle_quarantine(&mut cat, &runs.iter().map(|r| r.extent).collect::<Vec<_>>())?;
        self.engine.commit(&mut cat, Op::JobMap { job: self.job.id, runs })?;
        let layout = cat.catalog.jobs.get(&self.job.id).map(|j| j.target.clone()).unwrap_or_default();
        link.target.store(Arc::new(ExtentMap::new(self.g, &layout)));
        Ok(())
    }

    /// Tracks in the next chunk: small while applications are active, and never more than a
    /// cap lets go at once ([`CAP_CHUNK_TIME`](super::pace::CAP_CHUNK_TIME)).
    fn chunk_tracks(&self, apps_active: bool) -> u64 {
        if self.m.turns.is_some() {
            return SIMULATED_CHUNK_TRACKS;
        }
        let mut bytes = if apps_active { BUSY_CHUNK_BYTES } else { IDLE_CHUNK_BYTES };
        for cap in [&self.job.rate, &self.m.copy_rate] {
            bytes = bytes.min(cap.chunk_bytes().unwrap_or(u64::MAX));
        }
        if apps_active {
            bytes = bytes.min(self.governor.cap.chunk_bytes().unwrap_or(u64::MAX));
        }
        (bytes / self.g.track_size_bytes()).max(1)
    }

    fn apps_active(&self) -> bool {
        self.m.turns.is_none()
            && now_ns() - self.engine.last_app_io_ns.load(Ordering::Relaxed) < APP_ACTIVE_WINDOW.as_nanos() as i64
    }

    /// Steps f and k: copy the tracks past the copied mark, up to the data set's last moved
    /// track, reserving target tracks as needed. Holes cost nothing: the mark jumps over
    /// tracks that neither side maps. `paced` is false while writes are held.
    ///
    /// The copied mark goes on to the end of the target's reservation even when the data set
    /// is smaller now (a truncate cut it): the reserved tracks past the source's bytes are
    /// zeroed on the target, as they read on the source. Otherwise writes that grow the data
    /// set back into them would be marked, not mirrored, and a data set that shrinks and
    /// grows would keep its dirty set from ever shrinking.
    fn copy_growth(&mut self, paced: bool) -> JobResult<()> {
        loop {
            if paced {
                self.check()?;
            }
            let a = self.source_tracks();
            let src = self.node().map.load_full();
            let dst = self.link().target.load_full();
            let keep = self.keep_tracks();
            self.job.bytes_total.store(self.g.bytes_of(src.layout().mapped_in(0..keep)), Ordering::Relaxed);
            let end = a.max(dst.end_tracks());
            // Over holes on both sides, straight to the next mapped track of either.
            let mapped_from = |t: u64| {
                let next = |m: &ExtentMap| m.layout().slice(t..end).next().map(|r| r.logical);
                next(&src).into_iter().chain(next(&dst)).min()
            };
            let Some(c) = mapped_from(self.link().copied_tracks()) else {
                self.link().set_copied(self.link().copied_tracks().max(end));
                return Ok(());
            };
            let active = paced && self.apps_active();
            let n = self.chunk_tracks(active).min(end - c);
            let data = self.g.bytes_of(src.layout().mapped_in(c..(c + n).min(a)));
            if paced {
                self.wait_for_caps(data, active);
                self.check()?;
            }
            let t0 = Instant::now();
            self.copy(c, n, false)?;
            if active {
                self.wait_writeback()?;
            }
            self.link().set_copied(c + n);
            // Only the data set's mapped bytes count as copied, not holes or the zeroed tail.
            self.job.bytes_copied.fetch_add(data, Ordering::Relaxed);
            self.note_rate();
            if paced {
                self.rest(t0.elapsed(), active);
                self.chunks_since_checkpoint += 1;
                self.bytes_since_checkpoint += self.g.bytes_of(n);
                // Not at the copy's end: the re-sync or the cutover follows at once, and the
                // cutover's flush and switch supersede a checkpoint there (a re-sync under
                // load takes the next one that is due).
                if c + n < end {
                    self.maybe_checkpoint()?;
                }
            }
        }
    }

    /// Copy logical tracks `first..first+n` from the source to the target, where the target
    /// maps them (reserving first what it lacks for the source's mapped tracks, or for all of
    /// them if they are `written`: marked dirty). Where the source has a hole (a punch, or a
    /// truncate's cut), the target is zeroed. Each run mapped on both sides is one
    /// [`StorageFile::copy_from`]: `copy_file_range` between two volume images (the bytes
    /// stay in the kernel; docs/benchmarks.md measured about a third less of the daemon's
    /// CPU time per GiB), else through the job's buffer in pieces of at most
    /// [`COPY_PIECE_BYTES_MAX`]. Either way the source is read when the call is made, after
    /// the dirty word's clear, as monitor.rs requires.
    ///
    /// The data set's gate is held shared, so no truncate or punch frees source tracks under
    /// the copy; with mirrored writes on, the tracks' stripes are held too, so no mirrored
    /// write interleaves with the copy (monitor.rs).
    fn copy(&mut self, first: u64, n: u64, written: bool) -> JobResult<()> {
        if n == 0 {
            return Ok(());
        }
        self.ensure_target(first..first + n, written)?;
        let g = self.g;
        let node = self.node.clone().expect("pinned");
        let link = self.link.clone().expect("pinned");
        let _io = node.gate.read();
        let _stripes = link.mirroring().then(|| link.lock_tracks(first, first + n - 1));
        let src = node.map.load();
        let dst = link.target.load();
        let volumes = self.engine.volumes();
        let (off, len) = (g.bytes_of(first), g.bytes_of(n));
        for p in dst.pieces(off, len as usize) {
            let Piece::Mapped { volume, offset_bytes: to, buf_start, len } = p else { continue };
            let target = volume_of(&volumes, volume)?;
            for sp in src.pieces(off + buf_start as u64, len) {
                match sp {
                    Piece::Mapped { volume, offset_bytes: from, buf_start: b, len } => {
                        let source = volume_of(&volumes, volume)?;
                        // Within the kernel between two host files; through the buffer
                        // otherwise, in pieces of at most its size.
                        let n = (len as u64).min(COPY_PIECE_BYTES_MAX) as usize;
                        if self.buf.len() < n {
                            self.buf.resize(n, 0);
                        }
                        target.copy_from(source.as_ref(), from, to + b as u64, len as u64, &mut self.buf[..n])?;
                    }
                    Piece::Unallocated { buf_start: b, len } => target.punch(to + b as u64, len as u64)?,
                }
            }
        }
        self.writeback(&volumes, &dst, off, len)?;
        Ok(())
    }

    /// Push what was just written to the disk, and wait for the chunk before it: the copier
    /// keeps at most two chunks of dirty pages (pace.rs).
    fn writeback(&mut self, volumes: &Volumes, dst: &ExtentMap, off: u64, len: u64) -> JobResult<()> {
        if !self.batch_writeback {
            self.wait_writeback()?;
        }
        for p in dst.pieces(off, len as usize) {
            if let Piece::Mapped { volume, offset_bytes, len, .. } = p {
                let v = volume_of(volumes, volume)?.clone();
                v.writeback(offset_bytes, len as u64, false).map_err(FsError::from)?;
                self.in_flight.push(InFlight { volume: v, offset: offset_bytes, len: len as u64 });
            }
        }
        Ok(())
    }

    /// Wait until every chunk pushed to the disk is there.
    fn wait_writeback(&mut self) -> JobResult<()> {
        for f in self.in_flight.drain(..) {
            f.volume.writeback(f.offset, f.len, true).map_err(FsError::from)?;
        }
        Ok(())
    }

    fn mirror_on(&self, dirty: u64) {
        let link = self.link();
        if !link.mirroring() {
            link.start_mirroring();
            self.job.mirrored.store(true, Ordering::Relaxed);
            self.m.event(format!(
                "job {} mirror-on path={} dirty_tracks={dirty} passes={}",
                self.job.id,
                self.job.path,
                self.job.passes.load(Ordering::Relaxed)
            ));
        }
    }

    /// The copy rate as the CLI shows it: bytes copied by step f over the time since it
    /// started (its waits for the caps included, so it never reads above a cap).
    fn note_rate(&self) {
        if let Some(t) = self.copy_started {
            let secs = t.elapsed().as_secs_f64();
            if secs > 0.0 {
                let bytes = self.job.bytes_copied.load(Ordering::Relaxed).saturating_sub(self.copied_before);
                self.job.copy_rate.store((bytes as f64 / secs) as u64, Ordering::Relaxed);
            }
        }
    }

    /// Before a chunk of `bytes`: wait until every cap lets it go (the job's `rate=`, the
    /// pool's copy-rate and, while applications sync, the governor). Waiting before the copy,
    /// not after it, is what keeps the bytes moved under each cap at every moment (pace.rs).
    fn wait_for_caps(&mut self, bytes: u64, apps_active: bool) {
        let m = self.m;
        if m.turns.is_some() {
            return; // simulated: time plays no part
        }
        let mut wait = self.job.rate.take(bytes).max(m.copy_rate.take(bytes));
        if apps_active {
            if let Some((slow, samples)) = self.engine.app_syncs.feedback(now_ns()) {
                self.governor.steer(slow, samples);
                wait = wait.max(self.governor.cap.take(bytes));
            }
        }
        self.sleep(wait);
    }

    /// After a chunk that took `elapsed`: rest, so that busy applications get the disk.
    fn rest(&self, elapsed: Duration, apps_active: bool) {
        if self.m.turns.is_none() {
            self.sleep(rest_after(elapsed, apps_active));
        }
    }

    /// Sleep in slices, so that a cancel or an unmount is seen promptly.
    fn sleep(&self, wait: Duration) {
        let until = Instant::now() + wait;
        while Instant::now() < until && !self.m.stopping() && !self.job.cancel_requested() {
            std::thread::sleep((until - Instant::now()).min(Duration::from_millis(50)));
        }
    }

    /// Step g: one pass over the bitmap. Each word is taken and cleared, then the runs of
    /// tracks it marked are copied. Returns the tracks copied.
    fn resync_pass(&mut self, paced: bool) -> JobResult<u64> {
        let link = self.link.clone().expect("pinned");
        let mut copied = 0;
        for w in 0..link.dirty.word_count() {
            let mut bits = link.dirty.take_word(w);
            while bits != 0 {
                let lo = bits.trailing_zeros() as u64;
                let run = (bits >> lo).trailing_ones() as u64;
                bits &= !(if run == WORD_BITS { u64::MAX } else { ((1u64 << run) - 1) << lo });
                let mut first = w as u64 * WORD_BITS + lo;
                let end = first + run;
                // A run is copied in chunks, each cleared by the caps first, like step f's.
                while first < end {
                    let active = paced && self.apps_active();
                    let n = if paced { self.chunk_tracks(active).min(end - first) } else { end - first };
                    if paced {
                        self.wait_for_caps(self.g.bytes_of(n), active);
                    }
                    let t0 = Instant::now();
                    self.copy(first, n, true)?;
                    copied += n;
                    self.job.bytes_resynced.fetch_add(self.g.bytes_of(n), Ordering::Relaxed);
                    if paced {
                        if active {
                            self.wait_writeback()?;
                        }
                        self.rest(t0.elapsed(), active);
                        self.check()?;
                    }
                    first += n;
                }
            }
        }
        Ok(copied)
    }

    /// Step g, bounded: re-sync passes until the dirty set is small. If it stops shrinking
    /// (or after [`MAX_PASSES`]), mirrored writes go on; from then on it can only shrink.
    fn converge(&mut self) -> JobResult<()> {
        let small = (CONVERGED_BYTES / self.g.track_size_bytes()).max(1);
        let mut prev = u64::MAX;
        let mut stuck = 0;
        loop {
            self.check()?;
            self.copy_growth(true)?;
            let dirty = self.link().dirty.count_dirty();
            if dirty <= small {
                return Ok(());
            }
            let passes = self.job.passes.load(Ordering::Relaxed);
            if passes >= MAX_PASSES || stuck >= STUCK_PASSES {
                self.mirror_on(dirty);
            }
            if self.link().mirroring() && passes >= 4 * MAX_PASSES {
                // Only growth faster than the copier can keep the set from shrinking now;
                // the cutover copies the rest with writes held.
                return Ok(());
            }
            self.resync_pass(true)?;
            self.job.passes.fetch_add(1, Ordering::Relaxed);
            self.chunks_since_checkpoint += 1;
            self.maybe_checkpoint()?;
            stuck = if dirty.saturating_mul(2) > prev { stuck + 1 } else { 0 };
            prev = dirty;
        }
    }

    /// A checkpoint when one is due: every [`CHECKPOINT_BYTES`] copied or every
    /// [`CHECKPOINT_INTERVAL`], whichever comes first (in a simulation, every
    /// [`SIMULATED_CHECKPOINT_CHUNKS`] chunks). Called only between chunks and passes, where
    /// no dirty bit is taken and not yet copied.
    fn maybe_checkpoint(&mut self) -> JobResult<()> {
        let due = match self.m.turns {
            Some(_) => self.chunks_since_checkpoint >= SIMULATED_CHECKPOINT_CHUNKS,
            None => {
                let interval = crate::failpoint::pause_at("checkpoint-interval").unwrap_or(CHECKPOINT_INTERVAL);
                self.bytes_since_checkpoint >= CHECKPOINT_BYTES || self.last_checkpoint.elapsed() >= interval
            }
        };
        if due {
            self.checkpoint()?;
        }
        Ok(())
    }

    /// Log how far the copy is durable on the target, and which regions below that may
    /// differ from the source, so that a crash resumes here (docs/design.md, "Resuming a
    /// job"). In three steps:
    ///
    /// 1. clear the touched regions: a change that lands after this is touched again, and
    ///    one that landed before it is on the target (copied or mirrored) before step 2;
    /// 2. flush the target and the source: every copy so far, and those changes, are
    ///    durable on both sides;
    /// 3. with writes held (no change is between its intent and its touch), take the copy
    ///    mark and the dirty regions below it (dirty tracks, touched regions), log the
    ///    checkpoint, and from then require intent below the new mark outside those regions.
    ///
    /// Then the log is synced, which costs one log write: no application waits for it.
    fn checkpoint(&mut self) -> JobResult<()> {
        self.chunks_since_checkpoint = 0;
        self.bytes_since_checkpoint = 0;
        self.last_checkpoint = Instant::now();
        let link = self.link().clone();
        let node = self.node().clone();
        link.intent.take_touched();
        self.wait_writeback()?;
        self.flush_target()?;
        // The source too: a clean region must read the same on both sides *durably*. A write
        // the copier carried to the target but that no fsync made durable on the source
        // could come back on the target alone after a power cut, and the data set would
        // change under its applications when the resumed job switches.
        let sources: std::collections::BTreeSet<VolumeId> = node.map.load().extents().map(|e| e.volume).collect();
        for v in sources {
            self.engine.volume(v)?.flush().map_err(FsError::from)?;
        }
        let (mark, dirty) = {
            let _hold = node.write_hold.write();
            let _serial = link.intent.serial.lock();
            let mark = link.copied_tracks();
            let rt = link.intent.region_tracks;
            let mut dirty: std::collections::BTreeSet<u64> = link.intent.take_touched().into_iter().collect();
            for w in 0..(mark.div_ceil(WORD_BITS) as usize).min(link.dirty.word_count()) {
                let mut bits = link.dirty.peek_word(w);
                while bits != 0 {
                    dirty.insert((w as u64 * WORD_BITS + bits.trailing_zeros() as u64) / rt);
                    bits &= bits - 1;
                }
            }
            dirty.retain(|&r| r * rt < mark);
            let op = Op::JobCheckpoint {
                job: self.job.id,
                copied_tracks: mark,
                region_tracks: rt,
                dirty_regions: dirty.iter().copied().collect(),
            };
            self.engine.commit(&mut self.engine.catalog.lock(), op)?;
            link.intent.reset(mark, &dirty);
            (mark, dirty)
        };
        self.engine.sync_log()?;
        let total = self.source_tracks().max(1);
        self.m.event(format!(
            "job {} checkpoint path={} at {} % copied_tracks={mark} dirty_regions={}",
            self.job.id,
            self.job.path,
            percent(mark, total),
            dirty.len()
        ));
        Ok(())
    }

    fn flush_target(&self) -> JobResult<()> {
        let vols: std::collections::BTreeSet<VolumeId> =
            self.link().target.load().extents().map(|e| e.volume).collect();
        for v in vols {
            self.engine.volume(v)?.flush().map_err(FsError::from)?;
        }
        Ok(())
    }

    /// Steps j, k and l, with writes held (and, in close mode, opens): copy what is still
    /// dirty and any growth, flush the target, and switch the catalog in one op. The data
    /// set's extent map is swapped under the catalog lock, so every I/O after it goes to the
    /// target.
    ///
    /// The flush comes before the switch is even in the log: from the moment it is, any
    /// application's fsync (of any data set) may make it durable, and a durable switch must
    /// never point at tracks the copy had not made durable (a power cut would leave the data
    /// set reading holes, or another data set's old bytes). The target was flushed before
    /// the hold too, so this flush carries only what the catch-up and the hold copied.
    fn final_sync_and_switch(&mut self) -> JobResult<()> {
        self.batch_writeback = true;
        let copied = self.copy_growth(false).and_then(|()| self.resync_pass(false));
        self.batch_writeback = false;
        copied?;
        self.wait_writeback()?;
        if let Some(why) = self.link().target_error() {
            return Err(End::Failed(why));
        }
        self.flush_target()?;
        if self.job.verify {
            self.corrupt_target_for_test()?;
            self.verify()?;
        }
        let node = self.node().clone();
        let mut cat = self.engine.catalog.lock();
        // The source's over-provisioned tail goes first (writes and truncates are held, and
        // no read goes past the size), so the switch needs no target for it.
        let keep_tracks = self.keep_tracks();
        if node.map.load().end_tracks() > keep_tracks {
            self.engine.commit(&mut cat, Op::Trim { ino: self.job.ino, keep_tracks })?;
            self.engine.refresh_map(&cat, &node);
        }
        self.engine.commit(&mut cat, Op::JobSwitch { job: self.job.id })?;
        self.engine.refresh_map(&cat, &node);
        Ok(())
    }

    /// Before the switch, writes held, after the final re-sync (`verify=yes`): compare a
    /// checksum of every logical track that holds the data set's bytes, read from the source
    /// and from the target. What is not allocated reads as zeros on either side, so tracks
    /// that neither side maps (holes) are equal without a read. The first
    /// mismatch ends the comparison and fails the job, which rolls back: the target is freed
    /// and the source, never written by the job, goes on serving.
    ///
    /// It reads the whole data set twice with writes held: in live mode its time adds to the
    /// stall (docs/design.md, "Verifying before the switch").
    fn verify(&mut self) -> JobResult<()> {
        self.enter(State::Verifying)?;
        let t0 = Instant::now();
        let g = self.g;
        let tracks = self.source_tracks();
        let node = self.node().clone();
        let link = self.link().clone();
        let found = {
            // No truncate frees source tracks under the reads (as in `copy`).
            let _io = node.gate.read();
            let (src, dst) = (node.map.load(), link.target.load());
            let volumes = self.engine.volumes();
            let mut target_buf = Vec::new();
            let tb = g.track_size_bytes();
            let mut found = (0, None);
            let (mut source_crc, mut target_crc) = (0u32, 0u32);
            // The logical tracks either side maps, as disjoint ranges in order.
            let mut ranges: Vec<Range<u64>> = Vec::new();
            let mut mapped: Vec<Range<u64>> = src
                .layout()
                .slice(0..tracks)
                .chain(dst.layout().slice(0..tracks))
                .map(|r| r.logical..r.end())
                .collect();
            mapped.sort_by_key(|r| r.start);
            for r in mapped {
                match ranges.last_mut() {
                    Some(last) if r.start <= last.end => last.end = last.end.max(r.end),
                    _ => ranges.push(r),
                }
            }
            // Pieces at multiples of their size: whole tracks when a track is at most that
            // (tracks are powers of two), else whole parts of one track. Each track's checksum
            // is built over its slices and compared at its end.
            let all = ranges
                .iter()
                .flat_map(|r| pieces(g.bytes_of(r.start), g.bytes_of(r.end - r.start), VERIFY_PIECE_BYTES));
            'pieces: for (at, n) in all {
                let n = n as usize;
                if self.buf.len() < n {
                    self.buf.resize(n, 0);
                }
                if target_buf.len() < n {
                    target_buf.resize(n, 0);
                }
                read_pieces(&volumes, &src, at, &mut self.buf[..n])?;
                read_pieces(&volumes, &dst, at, &mut target_buf[..n])?;
                let mut off = at;
                while off < at + n as u64 {
                    let t = off / tb;
                    let end = ((t + 1) * tb).min(at + n as u64);
                    let slice = (off - at) as usize..(end - at) as usize;
                    source_crc = crc32c::crc32c_append(source_crc, &self.buf[slice.clone()]);
                    target_crc = crc32c::crc32c_append(target_crc, &target_buf[slice]);
                    if end == (t + 1) * tb {
                        found.0 += 1;
                        if source_crc != target_crc {
                            found.1 = Some((t, source_crc, target_crc));
                            break 'pieces;
                        }
                        (source_crc, target_crc) = (0, 0);
                    }
                    off = end;
                }
            }
            found
        };
        let (compared, mismatch) = found;
        let v = Verified {
            tracks: compared,
            bytes: g.bytes_of(compared),
            elapsed_us: t0.elapsed().as_micros() as u64,
            first_mismatch: mismatch.map(|(t, ..)| t),
        };
        self.verified = Some(v);
        let ms = v.elapsed_us as f64 / 1000.0;
        if let Some((t, source_crc, target_crc)) = mismatch {
            self.m.event(format!(
                "job {} verify-mismatch path={} track={t} source_crc32c={source_crc:08x} \
                 target_crc32c={target_crc:08x} (after {compared} tracks in {ms:.3} ms)",
                self.job.id, self.job.path
            ));
            return Err(End::Failed(format!(
                "verify: logical track {t} differs between source and target (crc32c {source_crc:08x} != \
                 {target_crc:08x})"
            )));
        }
        self.m.event(format!(
            "job {} verified {compared} tracks ({:.1} MiB) in {ms:.3} ms path={}",
            self.job.id,
            v.bytes as f64 / (1u64 << 20) as f64,
            self.job.path
        ));
        self.enter(State::Cutover { switching: true })
    }

    /// Fault point `verify-corrupt-target` (failpoint.rs): flip one byte of the target at a
    /// logical track, so that a test sees the verification catch it.
    fn corrupt_target_for_test(&mut self) -> JobResult<()> {
        let Some(track) = crate::failpoint::fault_at("verify-corrupt-target") else { return Ok(()) };
        let tracks = self.source_tracks();
        if tracks == 0 {
            return Ok(());
        }
        let t = track.min(tracks - 1);
        // In the middle of the track: past the first piece of a track larger than one.
        let at = self.g.bytes_of(t) + self.g.track_size_bytes() / 2 + 1;
        let dst = self.link().target.load();
        let volumes = self.engine.volumes();
        let mut byte = [0u8; 1];
        read_pieces(&volumes, &dst, at, &mut byte)?;
        byte[0] ^= 0xA5;
        write_pieces(&volumes, &dst, at, &byte)?;
        self.m.event(format!("job {} fault point=verify-corrupt-target track={t}", self.job.id));
        Ok(())
    }

    /// After the switch: wait for reads still on the old map, and make the switch durable
    /// (the target was flushed before it).
    fn make_durable(&mut self) -> JobResult<()> {
        drop(self.node().gate.write());
        self.engine.sync_log()?;
        Ok(())
    }

    /// Once the switch is durable: zero the tracks the switch set aside (the source, the
    /// target's unneeded tail), then free them. They belong to the job's record until the
    /// release, so no allocation can take them while they are punched, and the catalog lock
    /// is not held across the punch of a whole data set.
    fn release_source(&mut self) -> JobResult<()> {
        let set_aside = {
            let cat = self.engine.catalog.lock();
            cat.catalog.jobs.get(&self.job.id).map(|j| j.release.clone()).unwrap_or_default()
        };
        let g = self.g;
        let mut zeroed = true;
        for e in &set_aside {
            let r = self
                .engine
                .volume(e.volume)
                .and_then(|v| Ok(v.punch(g.track_offset(e.first), g.bytes_of(e.count_tracks))?));
            zeroed &= r.is_ok();
        }
        // The zeros must be on the disk before the tracks can be handed out again.
        zeroed &= self.engine.flush_extents_volumes(&set_aside).is_ok();
        let mut cat = self.engine.catalog.lock();
        if zeroed {
            self.engine.commit_prezeroed(&mut cat, Op::JobRelease { job: self.job.id })?;
        } else {
            // Quarantined like any free: zeroed (and flushed) before it is handed out again.
            self.engine.commit(&mut cat, Op::JobRelease { job: self.job.id })?;
        }
        Ok(())
    }

    fn switched(&mut self, stall: Duration) -> JobResult<()> {
        let node = self.node().clone();
        self.engine.unpin_node(&node)?;
        let link = self.link().clone();
        link.set_window(false);
        self.job.unlink();
        let us = stall.as_micros() as u64;
        let what = match self.job.cutover {
            Cutover::Live => format!("stall_us={us}"),
            Cutover::Close => {
                self.m.event(format!("job {} downtime-end path={} window_us={us}", self.job.id, self.job.path));
                format!("window_us={us}")
            }
        };
        // Switched once durable. The phase says so only once the source is punched and freed
        // too: a `--wait` that returns at `switched` may retire the source volume at once.
        let released = self.make_durable();
        let extents = {
            let cat = self.engine.catalog.lock();
            match cat.catalog.get(self.job.ino).map(|i| &i.body) {
                Some(Body::File { layout, .. }) => layout.runs().len(),
                _ => 0,
            }
        };
        self.m.event(format!(
            "job {} switched path={} {what} extents={extents} passes={} mirrored={} copy_rate={}",
            self.job.id,
            self.job.path,
            self.job.passes.load(Ordering::Relaxed),
            self.job.mirrored.load(Ordering::Relaxed),
            self.job.copy_rate.load(Ordering::Relaxed)
        ));
        let released = released.and_then(|()| self.release_source());
        if let Err(End::Failed(e)) = released {
            // The switch is in the catalog; the next mount frees the source.
            log::warn!("job {}: freeing the source after the switch: {e}", self.job.id);
        }
        self.job.settle(self.m, State::Switched { held_us: us, verified: self.verified });
        Ok(())
    }

    /// Live cutover: hold the writes (waiting for those in flight), final re-sync, switch,
    /// release. Reads go on throughout.
    fn cutover_live(&mut self) -> JobResult<()> {
        self.enter(State::Cutover { switching: false })?;
        self.flush_target()?;
        // Writes during that flush dirtied tracks again: catch up outside the hold, with
        // mirrored writes if they keep pace, so the hold copies next to nothing.
        let small = (CONVERGED_BYTES / self.g.track_size_bytes()).max(1);
        for round in 0..4 {
            self.copy_growth(false)?;
            let dirty = self.link().dirty.count_dirty();
            if dirty == 0 || (round > 0 && dirty <= small / 4) {
                break;
            }
            if round > 0 {
                self.mirror_on(dirty);
            }
            self.batch_writeback = true;
            let r = self.resync_pass(false);
            self.batch_writeback = false;
            r?;
            self.wait_writeback()?;
        }
        // Flush what the catch-up copied and what mirrored writes put on the target since
        // the first flush, so that the flush inside the hold carries only the writes of the
        // last few milliseconds. Under a heavy writer one flush takes milliseconds, and the
        // mirrored writes that came during it are what the flush inside the hold would wait
        // for: flush again (a few times at most) until one is short.
        let flushes = if self.m.turns.is_some() { 1 } else { PRE_HOLD_FLUSHES };
        for _ in 0..flushes {
            let t = Instant::now();
            self.flush_target()?;
            if t.elapsed() < SHORT_FLUSH {
                break;
            }
        }
        let node = self.node().clone();
        let t0 = Instant::now();
        let hold = node.write_hold.write();
        self.pause("live-hold");
        if let Err(e) = self.begin_switch() {
            drop(hold);
            return Err(e);
        }
        self.pause("live-switch");
        self.final_sync_and_switch()?;
        node.job.store(None);
        drop(hold);
        self.switched(t0.elapsed())
    }

    /// Close cutover, the patent's method: ask for a close (h), and when the last handle is
    /// released open the downtime window (i): new opens wait. Final re-sync (j, k), switch
    /// (l), and let the opens through (m).
    fn cutover_close(&mut self) -> JobResult<()> {
        let m = self.m;
        self.enter(State::AwaitingClose)?;
        m.event(format!("job {} close-requested path={}", self.job.id, self.job.path));
        let node = self.node().clone();
        let link = self.link().clone();
        // Most of the copy reaches the disk now, so the flush in the window is short.
        self.flush_target()?;
        loop {
            self.check()?;
            if self.engine.open_window_if_closed(&node, &link) {
                break;
            }
            if self.m.turns.is_none() {
                link.wait_closed(Duration::from_millis(100));
            }
            // Keep the dirty set small while the applications finish.
            self.copy_growth(true)?;
            if link.dirty.count_dirty() > 0 {
                self.resync_pass(true)?;
            }
        }
        let t0 = Instant::now();
        m.event(format!("job {} downtime-start path={}", self.job.id, self.job.path));
        self.enter(State::Cutover { switching: false })?;
        let hold = node.write_hold.write();
        self.pause("close-window");
        if let Err(e) = self.begin_switch() {
            drop(hold);
            return Err(e);
        }
        if let Err(e) = self.final_sync_and_switch() {
            drop(hold);
            return Err(e);
        }
        node.job.store(None);
        drop(hold);
        self.switched(t0.elapsed())
    }

    /// Sleep at a pause point, if the mount was started with one (`failpoint`).
    fn pause(&self, point: &str) {
        if let Some(d) = crate::failpoint::pause_at(point) {
            self.m.event(format!("job {} pause point={point} us={}", self.job.id, d.as_micros()));
            std::thread::sleep(d);
        }
    }

    /// Take the job's hooks out of the data set (no mirrored write is in flight after it),
    /// and let any waiting opens through.
    fn detach(&mut self) {
        if let (Some(node), Some(link)) = (self.node.clone(), self.link.clone()) {
            {
                let _hold = node.write_hold.write();
                node.job.store(None);
            }
            if let Err(e) = self.engine.unpin_node(&node) {
                log::warn!("job {}: releasing the data set: {e}", self.job.id);
            }
            link.set_window(false);
        }
        self.job.unlink();
    }

    /// Roll back: free the target; the source was never changed.
    fn drop_record(&self) -> Result<(), FsError> {
        self.m.drop_record(self.job.id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_cover_the_range_in_bounded_pieces() {
        let kib = VERIFY_PIECE_BYTES;
        assert_eq!(pieces(0, 0, kib).count(), 0);
        assert_eq!(pieces(5, 10, kib).collect::<Vec<_>>(), [(5, 10)]);
        assert_eq!(pieces(7, kib + 1, kib).collect::<Vec<_>>(), [(7, kib), (7 + kib, 1)]);
        // A dirty run of 64 tracks of 8 MiB: 4096 pieces of 128 KiB, none larger, in order.
        let (off, len) = (3 * (8 << 20), 64 * (8 << 20));
        let ps: Vec<(u64, u64)> = pieces(off, len, kib).collect();
        assert_eq!(ps.len(), 4096);
        assert!(ps.iter().all(|&(_, n)| n > 0 && n <= kib));
        let mut at = off;
        for (o, n) in ps {
            assert_eq!(o, at, "pieces are contiguous");
            at += n;
        }
        assert_eq!(at, off + len, "and cover the range exactly");
    }
}
