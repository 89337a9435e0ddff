//! The catalog's durable store: a snapshot plus an append-only log of checksummed frames.
//!
//! ```text
//! POOL/catalog.snap   header (magic "FYSN", version, generation, length) + postcard(Catalog) + crc32c
//! POOL/catalog.log    header (magic "FYLG", version, generation) + frames
//! frame               magic "FYOP" | version u16 | durable_sectors u16 | length u32
//!                     | header crc32c | postcard(Op) | crc32c
//! ```
//!
//! Why our own log and not an embedded store: every op is one `pwrite` of a few dozen bytes
//! into the log, which lands in the kernel's page cache before the op is acknowledged, so a
//! kill -9 of the mount loses nothing that returned, with no fsync per op. `fsync()` from an
//! application is one `fdatasync` of the log, or none: the fsync copies the log's unsynced
//! tail into the ring of a volume image it flushes anyway (ring.rs). Nothing ever
//! rewrites the whole catalog on the I/O path: compaction (a new snapshot) happens at mount,
//! at clean unmount and when the log passes [`LOG_COMPACT_BYTES`]. docs/format.md draws
//! every record.
//!
//! Every byte of the catalog's files goes through a [`Disk`], so that a simulated disk sees
//! (and can lose) each of them.
//!
//! Durability marks: the store counts the bytes it appended since it opened (a mark that
//! never goes down, not even when a compaction starts a new, shorter log), and a shared
//! durable mark says how far they are synced. A [`SyncPoint`] taken under the catalog lock
//! syncs up to its mark outside it, and does nothing when another sync or a compaction got
//! there first.
//!
//! A failed append or log sync latches the log: no later sync of that file reports success,
//! and the next commit first compacts (a new snapshot and a new log, written from the
//! in-memory catalog, which never holds a failed op).
//!
//! Replay rules: a log whose generation is older than the snapshot's was already folded into
//! it and is ignored. Frames replay up to the first one that fails (bad magic, a checksum, or
//! a length running past the end). What follows is either a torn tail, or damage in data
//! that was synced. Each frame records how many whole 4 KiB sectors of its log were known
//! synced when it was written (`durable_sectors`); if a valid frame after the damage says
//! the damage lies in synced sectors, the store refuses to open and says where and how to
//! repair; otherwise the tail (with any valid frames in it, which were never synced and
//! survived a power cut out of order) is dropped, and a writable open cuts it off.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use super::legacy;
use super::model::{ApplyError, Catalog, Freed, Op};
use super::ring::{self, RingScan};
use crate::storage::{self, Disk, Latch, StorageFile};

pub const SNAP_FILE: &str = "catalog.snap";
pub const LOG_FILE: &str = "catalog.log";
/// Prefix of the copy `fsck --repair` keeps of a damaged log (then `-<unix seconds>`).
pub const DAMAGED_LOG_PREFIX: &str = "catalog.log.damaged";
const SNAP_MAGIC: &[u8; 4] = b"FYSN";
const LOG_MAGIC: &[u8; 4] = b"FYLG";
const FRAME_MAGIC: &[u8; 4] = b"FYOP";
/// Version of every record of the store; bumped on any incompatible change. Version 2 added
/// the migration journal (jobs, plans, closed volumes) to the snapshot and its ops to the log;
/// version 1 stores are read (their ops are a subset) and rewritten as version 2. Version 3
/// added special files (a `Body` and a `NewKind` variant), extended attributes (the
/// snapshot's `xattrs`, after `closed_volumes`) and their ops; version 1 and 2 stores are
/// read the same way and rewritten as version 3. Version 4 made data sets sparse (a file's
/// `extents` became a `layout` of runs at logical tracks, with its explicit preallocation,
/// and a job's target likewise) and added the jobs' checkpoints (the snapshot's
/// `checkpoints`, after `xattrs`) and their ops; older stores are converted on read
/// (legacy.rs) and rewritten as version 4.
pub const FORMAT_VERSION: u16 = 4;
const FORMAT_VERSIONS_READ: [u16; 4] = [1, 2, 3, 4];
const SNAP_HEADER_BYTES: usize = 4 + 2 + 2 + 8 + 8;
const LOG_HEADER_BYTES: usize = 4 + 2 + 2 + 8 + 4;
/// magic, version, durable_sectors, payload length, and a checksum of those 12 bytes: a
/// length field can't be corrupted into "the log ends here" without the header checksum
/// noticing.
const FRAME_HEADER_BYTES: usize = 4 + 2 + 2 + 4 + 4;
/// A frame's payload is one op; the largest (a symlink or a grow of a fragmented data set)
/// is a few KiB. Anything bigger is a corrupt length field, not a record.
const FRAME_PAYLOAD_MAX_BYTES: usize = 1 << 20;
/// The unit a power cut loses or tears writes in. A frame's `durable_sectors` counts whole
/// sectors of its log that were synced before it was written: later appends never rewrite
/// them, so a power cut can't tear them.
pub const SECTOR_BYTES: u64 = 4096;
/// When the log passes this size it is folded into a new snapshot, so that a mount replays at
/// most this much (about a second of replay at worst).
pub const LOG_COMPACT_BYTES: u64 = 64 << 20;
/// A read-only open that meets a log newer than its snapshot (a compaction ran between the
/// two reads) tries again this many times before calling it corruption.
const COMPACTION_RACE_RETRIES: u32 = 5;
const NEWER_LOG: &str = "is newer than the snapshot's";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("{} is not a ferryfs pool (no {SNAP_FILE})", path.display())]
    NotAPool { path: PathBuf },
    #[error("catalog is corrupt: {}: {what}", path.display())]
    Corrupt { path: PathBuf, what: String },
    #[error("catalog is corrupt: {}: frame at byte {offset} does not apply: {source}", path.display())]
    BadOp { path: PathBuf, offset: u64, source: ApplyError },
    #[error("catalog update refused: {0}")]
    Refused(#[from] ApplyError),
    #[error("catalog is read-only")]
    ReadOnly,
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> StoreError + '_ {
    move |source| StoreError::Io { path: path.to_path_buf(), source }
}

/// What opening the store found.
#[derive(Debug, Default, Clone)]
pub struct OpenReport {
    pub generation: u64,
    pub ops_replayed: u64,
    /// Bytes after the last good frame: a torn tail, dropped (and cut by a writable open).
    pub torn_tail_bytes: u64,
    /// Valid frames found in the torn tail, after the damaged one: appended but never
    /// synced, they survived a power cut that lost an earlier write, and are dropped.
    pub frames_dropped: u64,
    pub log_bytes: u64,
    /// Frames replayed from the log's tail as kept in the volumes' rings (ring.rs): catalog
    /// changes that an fsync made durable without syncing the log, whose frames in the log
    /// a power cut lost.
    pub ring_frames: u64,
    /// Data sets whose size a size record (what rings held before fragments) restored.
    pub sizes_restored: u64,
}

pub struct Store {
    disk: Arc<dyn Disk>,
    dir: PathBuf,
    generation: u64,
    /// None when opened read-only.
    log: Option<Arc<dyn StorageFile>>,
    /// The failures of this log file (a new log file starts with a new latch).
    log_latch: Arc<Latch>,
    /// Where the next frame goes in the log file (the end of its last frame).
    log_end_bytes: u64,
    /// Bytes appended since the store opened: never goes down.
    appended_mark: u64,
    /// The appended mark and the file length when the current log file started; the file's
    /// bytes before `log_base_len` were durable then.
    log_base_mark: u64,
    log_base_len: u64,
    /// How far the appended bytes are durable in the log itself (raised by syncs of the log
    /// and compactions).
    durable_mark: Arc<AtomicU64>,
    /// How far the appended bytes are durable counting the fragments in the volumes' rings
    /// whose flush completed (ring.rs); the log's own durability is `durable_mark`.
    ring_mark: Arc<AtomicU64>,
    /// The bytes appended from `tail_mark` on, while they are few enough for a ring
    /// ([`ring::TAIL_BYTES_MAX`]); None: more were appended since the last durable point,
    /// and fsyncs sync the log until one does.
    tail: Option<Vec<u8>>,
    tail_mark: u64,
    /// The snapshot on disk is of [`FORMAT_VERSION`] (one of an older version is rewritten
    /// by the next compaction).
    snapshot_current: bool,
    /// What `.ferry/metrics` shows of the store since it opened.
    stats: StoreStats,
    pub catalog: Catalog,
}

/// The store's counters since it opened (a mount's lifetime), and its sizes now. Plain
/// numbers: they change only under the catalog lock, like everything else in [`Store`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StoreStats {
    /// Length of the current log file (header and frames).
    pub log_size_bytes: u64,
    /// Length of the snapshot last read or written.
    pub snapshot_size_bytes: u64,
    /// Bytes appended to the log (the appended mark).
    pub appended_bytes: u64,
    /// Ops committed (each one frame of the log).
    pub ops_committed: u64,
    /// Compactions that succeeded: at mount, when the log passes [`LOG_COMPACT_BYTES`], at
    /// unmount, and after a failed write or sync of the log.
    pub compactions: u64,
    pub compaction_failures: u64,
    /// Fsyncs that copied the log's tail into a volume's ring instead of syncing the log.
    pub tail_records: u64,
}

impl Store {
    /// Write the first snapshot and an empty log of a new pool (on the host's disk).
    pub fn create(dir: &Path, catalog: Catalog) -> Result<Store, StoreError> {
        Self::create_on(storage::real(), dir, catalog)
    }

    /// Write the first snapshot and an empty log of a new pool on `disk`.
    pub fn create_on(disk: Arc<dyn Disk>, dir: &Path, catalog: Catalog) -> Result<Store, StoreError> {
        let mut s = Store::new(disk, dir, 0, catalog);
        s.compact()?;
        Ok(s)
    }

    fn new(disk: Arc<dyn Disk>, dir: &Path, generation: u64, catalog: Catalog) -> Store {
        Store {
            disk,
            dir: dir.to_path_buf(),
            generation,
            log: None,
            log_latch: Arc::new(Latch::default()),
            log_end_bytes: 0,
            appended_mark: 0,
            log_base_mark: 0,
            log_base_len: 0,
            durable_mark: Arc::new(AtomicU64::new(0)),
            ring_mark: Arc::new(AtomicU64::new(0)),
            tail: Some(Vec::new()),
            tail_mark: 0,
            snapshot_current: false,
            stats: StoreStats::default(),
            catalog,
        }
    }

    /// The store's counters and sizes now.
    pub fn stats(&self) -> StoreStats {
        StoreStats { log_size_bytes: self.log_end_bytes, appended_bytes: self.appended_mark, ..self.stats }
    }

    /// Load the catalog from the host's disk. `writable` opens the log for appends (the
    /// caller holds the pool lock); read-only opens never write a byte. The volumes' rings
    /// (ring.rs) are read only while the pool's `mounted` marker is there: a mount
    /// runs, or the last one did not stop cleanly. A clean stop folded the log and cut the
    /// rings off, and removed the marker last.
    pub fn open(dir: &Path, writable: bool) -> Result<(Store, OpenReport), StoreError> {
        let restore = dir.join(crate::pool::MOUNTED_FILE).exists();
        Self::open_with(storage::real(), dir, writable, restore)
    }

    /// [`Store::open`] on `disk`, always reading the rings.
    pub fn open_on(disk: Arc<dyn Disk>, dir: &Path, writable: bool) -> Result<(Store, OpenReport), StoreError> {
        Self::open_with(disk, dir, writable, true)
    }

    fn open_with(
        disk: Arc<dyn Disk>,
        dir: &Path,
        writable: bool,
        restore: bool,
    ) -> Result<(Store, OpenReport), StoreError> {
        // A read-only open races the mount's compaction: it can read the old snapshot and
        // then the new log. The generations tell, and a second read sees a consistent pair.
        let mut tries = if writable { 1 } else { COMPACTION_RACE_RETRIES };
        loop {
            match Self::open_once(&disk, dir, writable, restore) {
                Err(StoreError::Corrupt { what, .. }) if tries > 1 && what.contains(NEWER_LOG) => tries -= 1,
                other => return other,
            }
        }
    }

    /// One open; `restore` reads the volumes' rings and replays what they keep of the log
    /// past its end on the disk (ring.rs).
    fn open_once(
        disk: &Arc<dyn Disk>,
        dir: &Path,
        writable: bool,
        restore: bool,
    ) -> Result<(Store, OpenReport), StoreError> {
        let snap_path = dir.join(SNAP_FILE);
        let snap = match disk.read_all(&snap_path) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(StoreError::NotAPool { path: dir.into() }),
            Err(e) => return Err(io_err(&snap_path)(e)),
        };
        let (generation, catalog) = decode_snapshot(&snap_path, &snap)?;
        let mut s = Store::new(disk.clone(), dir, generation, catalog);
        s.snapshot_current = snap.get(4..6) == Some(&FORMAT_VERSION.to_le_bytes()[..]);
        s.stats.snapshot_size_bytes = snap.len() as u64;
        let mut report = OpenReport { generation, ..Default::default() };

        let log_path = dir.join(LOG_FILE);
        let log_bytes = match disk.read_all(&log_path) {
            Ok(b) => Some(b),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(io_err(&log_path)(e)),
        };
        let mut replay_log = false;
        let mut rings = restore.then(RingScan::default);
        // Where the log's own frames end on the disk, before any fragment is laid over it.
        let mut disk_end = 0;
        if let Some(mut bytes) = log_bytes {
            let log_gen = decode_log_header(&log_path, &bytes)?;
            if log_gen > generation {
                return Err(StoreError::Corrupt {
                    path: log_path,
                    what: format!("log generation {log_gen} {NEWER_LOG} generation {generation}"),
                });
            }
            if log_gen == generation {
                replay_log = true;
                let file_len = bytes.len() as u64;
                let mut applied_to = 0;
                loop {
                    // The rings of every volume known so far (the snapshot's, then those the
                    // replayed frames added): lay what continues the log over it.
                    let mut laid = false;
                    if let Some(scan) = rings.as_mut() {
                        scan.read_new(&**disk, &s.catalog, generation)
                            .map_err(|(path, e)| io_err(Path::new(&path))(e))?;
                        if !scan.fragments.is_empty() {
                            let (end, _) = frames_prefix(&bytes)?;
                            if disk_end == 0 {
                                disk_end = end;
                            }
                            laid = ring::overlay(&mut bytes, end, &scan.fragments) > end;
                        }
                    }
                    if applied_to > 0 && !laid {
                        break;
                    }
                    let frames = decode_frames(&log_path, &bytes)?;
                    for (offset, op) in frames.ops.into_iter().filter(|(o, _)| *o >= applied_to) {
                        s.catalog.apply(&op).map_err(|source| StoreError::BadOp {
                            path: log_path.clone(),
                            offset,
                            source,
                        })?;
                        report.ops_replayed += 1;
                        if offset >= disk_end && disk_end > 0 {
                            report.ring_frames += 1;
                        }
                    }
                    applied_to = frames.valid_len;
                    report.torn_tail_bytes = file_len.saturating_sub(frames.valid_len);
                    report.frames_dropped = frames.frames_dropped;
                    report.log_bytes = frames.valid_len;
                    s.log_end_bytes = frames.valid_len;
                    // A volume the replayed frames added may hold the next fragments.
                    if !rings.as_ref().is_some_and(|r| r.unread(&s.catalog)) {
                        break;
                    }
                }
                if disk_end == 0 {
                    disk_end = s.log_end_bytes;
                }
            }
        }
        // Fragments laid over the log, or a fragment or size record of this generation that
        // reaches past what the log held: the log file lacks bytes the catalog now holds, or
        // will be appended to where a ring keeps other bytes. Only a new generation (a
        // compaction) makes every ring older than the catalog.
        let ahead = replay_log && rings.as_ref().is_some_and(|r| r.reaches_past(disk_end));
        if writable {
            if replay_log {
                let f = disk.open(&log_path).map_err(io_err(&log_path))?;
                if ahead {
                    // Compacted below, before anything is appended.
                    s.log = Some(f);
                } else {
                    if report.torn_tail_bytes > 0 {
                        f.set_len(s.log_end_bytes).map_err(io_err(&log_path))?;
                    }
                    // What replayed came from the file, maybe from the page cache of a
                    // process that died: make it durable, so that the frames appended from
                    // here on can say which sectors are.
                    f.flush().map_err(io_err(&log_path))?;
                    s.log = Some(f);
                }
                s.log_base_len = s.log_end_bytes;
            } else {
                // Missing or stale log: start the snapshot's generation afresh.
                s.start_log()?;
            }
        }
        if let Some(scan) = rings.as_ref().filter(|_| replay_log) {
            report.sizes_restored = s.restore_sizes(scan);
        }
        if report.ring_frames > 0 && writable {
            log::warn!(
                "replayed {} catalog change(s) from the log's tail kept in the volume images: fsync'd changes \
                 whose log frames a power cut lost",
                report.ring_frames
            );
        }
        if ahead && writable {
            s.compact()?;
        }
        Ok((s, report))
    }

    /// The appended mark: bytes appended to the log since the store opened. It never goes
    /// down (a compaction does not reset it).
    pub fn appended_mark(&self) -> u64 {
        self.appended_mark
    }

    /// Append `op` to the log, then apply it. The op is in the kernel's page cache (so it
    /// survives a crash of this process) before this returns; it is durable against power
    /// loss after the next [`Store::sync`]. If the op doesn't apply, nothing is written. If
    /// the log failed before, this first compacts (and fails if that fails). If the append
    /// fails, the catalog is unchanged and the log is latched.
    pub fn commit(&mut self, op: Op) -> Result<Freed, StoreError> {
        if self.log.is_none() {
            return Err(StoreError::ReadOnly);
        }
        // Check first on a dry run, so a refused op never reaches the log.
        self.catalog.check(&op)?;
        if self.log_failed() {
            // The failed file is never trusted again: a failed write may have left part of
            // a frame, a failed sync may have dropped pages. Rewrite from memory.
            self.compact()?;
        }
        let log = self.log.clone().ok_or(StoreError::ReadOnly)?;
        let frame = encode_frame(&op, self.durable_sectors());
        let at = self.log_end_bytes;
        if let Err(e) = self.log_latch.record(log.write_at(&frame, at)) {
            // Best effort: cut off whatever part of the frame landed. The next commit
            // compacts anyway.
            let _ = log.set_len(at);
            return Err(io_err(&self.dir.join(LOG_FILE))(e));
        }
        self.log_end_bytes += frame.len() as u64;
        self.appended_mark += frame.len() as u64;
        self.keep_in_tail(&frame);
        self.stats.ops_committed += 1;
        let freed = self.catalog.apply(&op).expect("op was checked against this state");
        Ok(freed)
    }

    /// Whole sectors of the current log file known durable now.
    fn durable_sectors(&self) -> u16 {
        let durable = self.durable_mark.load(Ordering::Acquire).saturating_sub(self.log_base_mark);
        let bytes = (self.log_base_len + durable).min(self.log_end_bytes);
        (bytes / SECTOR_BYTES).min(u16::MAX as u64) as u16
    }

    /// What a sync must make durable now, taken under the catalog lock; its
    /// [`SyncPoint::sync`] runs outside it.
    pub fn sync_point(&self) -> SyncPoint {
        SyncPoint {
            log: self.log.clone(),
            latch: self.log_latch.clone(),
            mark: self.appended_mark,
            durable_mark: self.durable_mark.clone(),
            path: self.dir.join(LOG_FILE),
        }
    }

    /// The generation of the snapshot and of the log appended to.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// How far the appended bytes are durable in the log itself now.
    pub fn durable_mark(&self) -> u64 {
        self.durable_mark.load(Ordering::Acquire)
    }

    /// Is every committed op durable, in the log or in a ring (and the log sound)?
    pub fn all_durable(&self) -> bool {
        self.log.is_some() && !self.log_failed() && self.durable_anywhere() >= self.appended_mark
    }

    /// How far the appended bytes are durable, in the log or in a ring.
    fn durable_anywhere(&self) -> u64 {
        self.durable_mark.load(Ordering::Acquire).max(self.ring_mark.load(Ordering::Acquire))
    }

    /// What an fsync must copy into a ring instead of syncing the log (ring.rs): the bytes
    /// appended since the last durable point, the log or a ring's. [`RingTail::Nothing`]
    /// when every committed op is durable already; None when a ring cannot stand in for a
    /// sync of the log (a read-only store, a failed log, a tail longer than
    /// [`ring::TAIL_BYTES_MAX`]).
    pub fn ring_tail(&self) -> Option<RingTail> {
        if self.log.is_none() || self.log_failed() {
            return None;
        }
        let from = self.durable_anywhere();
        if from >= self.appended_mark {
            return Some(RingTail::Nothing);
        }
        let tail = self.tail.as_ref()?;
        // Marks fall between frames, and the kept tail starts at or before every durable
        // point since the last compaction (a compaction makes everything durable).
        let skip = usize::try_from(from.checked_sub(self.tail_mark)?).ok()?;
        let bytes = tail.get(skip..)?;
        if bytes.is_empty() || bytes.len() > ring::TAIL_BYTES_MAX || from < self.log_base_mark {
            return None;
        }
        Some(RingTail::Bytes {
            generation: self.generation,
            log_offset: self.log_base_len + (from - self.log_base_mark),
            bytes: bytes.to_vec(),
            end_mark: self.appended_mark,
            durable_mark: self.durable_mark(),
            ring_mark: self.ring_mark.clone(),
        })
    }

    /// Count an fsync that copied the log's tail into a ring instead of syncing the log.
    pub fn note_tail_record(&mut self) {
        self.stats.tail_records += 1;
    }

    /// Keep `frame` (just appended) in the tail an fsync may copy into a ring, after
    /// dropping what became durable.
    fn keep_in_tail(&mut self, frame: &[u8]) {
        let durable = self.durable_anywhere();
        let before = self.appended_mark - frame.len() as u64;
        if durable >= before {
            self.tail = Some(Vec::new());
            self.tail_mark = before;
        } else if let Some(t) = self.tail.as_mut() {
            if durable > self.tail_mark {
                t.drain(..(durable - self.tail_mark) as usize);
                self.tail_mark = durable;
            }
        }
        let room = self.tail.as_ref().is_some_and(|t| t.len() + frame.len() <= ring::TAIL_BYTES_MAX);
        match self.tail.as_mut() {
            Some(t) if room => t.extend_from_slice(frame),
            _ => self.tail = None,
        }
    }

    /// At an open, after the replay: raise the size of every data set that a size record
    /// (what the rings held before fragments) says more about than the replayed log, in
    /// memory; the caller compacts a writable store. Returns how many sizes it raised.
    fn restore_sizes(&mut self, scan: &RingScan) -> u64 {
        let mut raised = 0;
        for r in scan.sizes_past(self.log_end_bytes) {
            let below = self.catalog.get(r.ino).is_some_and(|i| i.size_bytes() < r.size_bytes);
            if !below {
                continue;
            }
            let op = Op::SetSize { ino: r.ino, size_bytes: r.size_bytes, mtime_ns: r.mtime_ns };
            match self.catalog.apply(&op) {
                Ok(_) => raised += 1,
                Err(e) => log::warn!("size record of data set {} ({} bytes) not applied: {e}", r.ino, r.size_bytes),
            }
        }
        if raised > 0 && self.log.is_some() {
            log::warn!(
                "restored the size of {raised} data set(s) from size records: fsync'd growth whose log frames a \
                 power cut lost"
            );
        }
        raised
    }

    /// Whether the log failed a write or a sync: the next commit compacts first.
    pub fn log_failed(&self) -> bool {
        self.log_latch.check().is_err()
    }

    /// Make every committed op durable.
    pub fn sync(&self) -> Result<(), StoreError> {
        self.sync_point().sync()
    }

    /// Make every committed op durable, for a caller that holds the catalog lock: a sync, or,
    /// if the log has failed (before or in this sync), a compaction, which writes everything
    /// anew.
    pub fn sync_or_rewrite(&mut self) -> Result<(), StoreError> {
        if self.log.is_none() {
            return Ok(());
        }
        if !self.log_failed() {
            match self.sync() {
                Ok(()) => return Ok(()),
                Err(e) if !self.log_failed() => return Err(e),
                Err(_) => {}
            }
        }
        self.compact()
    }

    /// Is everything already in a durable snapshot of this format version, with not one op
    /// in the log and no failed log? Then a compaction would write the same catalog again
    /// (at mount after a clean unmount: half a second at 10^6 data sets).
    pub fn folded(&self) -> bool {
        self.snapshot_current
            && self.log.is_some()
            && self.log_end_bytes == LOG_HEADER_BYTES as u64
            && !self.log_failed()
    }

    pub fn needs_compaction(&self) -> bool {
        self.log_end_bytes > LOG_COMPACT_BYTES
    }

    /// Fold the log into a new snapshot: write the snapshot to a temp file, fsync, rename,
    /// fsync the directory; then the same for a new empty log of the new generation. A crash
    /// between the two leaves a new snapshot and an old-generation log, which open() ignores.
    /// Makes every committed op durable, and clears a failed log.
    pub fn compact(&mut self) -> Result<(), StoreError> {
        let r = self.compact_once();
        match r {
            Ok(()) => self.stats.compactions += 1,
            Err(_) => self.stats.compaction_failures += 1,
        }
        r
    }

    fn compact_once(&mut self) -> Result<(), StoreError> {
        let started = std::time::Instant::now();
        let generation = self.generation + 1;
        let payload = postcard::to_stdvec(&self.catalog).expect("the catalog serializes");
        let mut snap = Vec::with_capacity(SNAP_HEADER_BYTES + payload.len() + 4);
        snap.extend_from_slice(SNAP_MAGIC);
        snap.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        snap.extend_from_slice(&0u16.to_le_bytes());
        snap.extend_from_slice(&generation.to_le_bytes());
        snap.extend_from_slice(&(payload.len() as u64).to_le_bytes());
        snap.extend_from_slice(&payload);
        let crc = crc32c::crc32c(&snap);
        snap.extend_from_slice(&crc.to_le_bytes());
        let snap_path = self.dir.join(SNAP_FILE);
        storage::replace_file(&*self.disk, &self.dir, SNAP_FILE, &snap).map_err(io_err(&snap_path))?;
        self.stats.snapshot_size_bytes = snap.len() as u64;
        self.generation = generation;
        self.snapshot_current = true;
        // The snapshot holds every committed op.
        self.durable_mark.fetch_max(self.appended_mark, Ordering::AcqRel);
        if let Err(e) = self.start_log() {
            // The log in hand belongs to the old generation, which a reopen ignores: never
            // append to it again.
            let errno = match &e {
                StoreError::Io { source, .. } => source.raw_os_error().unwrap_or(libc::EIO),
                _ => libc::EIO,
            };
            let _ = self.log_latch.record::<()>(Err(io::Error::from_raw_os_error(errno)));
            return Err(e);
        }
        // Compaction grows with the catalog (a full encode and write): say what it cost.
        log::debug!(
            "catalog compacted: generation {generation}, snapshot {} bytes, in {:.1} ms",
            snap.len(),
            started.elapsed().as_secs_f64() * 1e3
        );
        Ok(())
    }

    fn start_log(&mut self) -> Result<(), StoreError> {
        let mut header = Vec::with_capacity(LOG_HEADER_BYTES);
        header.extend_from_slice(LOG_MAGIC);
        header.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        header.extend_from_slice(&0u16.to_le_bytes());
        header.extend_from_slice(&self.generation.to_le_bytes());
        let crc = crc32c::crc32c(&header);
        header.extend_from_slice(&crc.to_le_bytes());
        let path = self.dir.join(LOG_FILE);
        storage::replace_file(&*self.disk, &self.dir, LOG_FILE, &header).map_err(io_err(&path))?;
        let f = self.disk.open(&path).map_err(io_err(&path))?;
        self.log = Some(f);
        self.log_latch = Arc::new(Latch::default());
        self.log_end_bytes = LOG_HEADER_BYTES as u64;
        self.log_base_len = LOG_HEADER_BYTES as u64;
        self.log_base_mark = self.appended_mark;
        self.tail = Some(Vec::new());
        self.tail_mark = self.appended_mark;
        Ok(())
    }
}

/// What an fsync copies into a ring instead of syncing the log ([`Store::ring_tail`]).
pub enum RingTail {
    /// Every committed op is durable already.
    Nothing,
    /// Bytes `log_offset..` of the log file of `generation`: the appended bytes up to
    /// `end_mark`, from the last durable point on. `durable_mark` is the log's own at the
    /// time (slots whose fragments end at or below it are free).
    Bytes {
        generation: u64,
        log_offset: u64,
        bytes: Vec<u8>,
        end_mark: u64,
        durable_mark: u64,
        ring_mark: Arc<AtomicU64>,
    },
}

impl RingTail {
    /// The fragments holding the tail are flushed: the appended bytes up to its end mark
    /// are durable.
    pub fn flushed(&self) {
        if let RingTail::Bytes { end_mark, ring_mark, .. } = self {
            ring_mark.fetch_max(*end_mark, Ordering::AcqRel);
        }
    }
}

/// A sync of the log up to the appended mark it was taken at, done outside the catalog lock.
pub struct SyncPoint {
    log: Option<Arc<dyn StorageFile>>,
    latch: Arc<Latch>,
    mark: u64,
    durable_mark: Arc<AtomicU64>,
    path: PathBuf,
}

impl SyncPoint {
    /// Returns at once if a sync or a compaction already made the mark durable; else flushes
    /// the log. A log that failed before (or fails now) is an error, never a success.
    pub fn sync(&self) -> Result<(), StoreError> {
        self.sync_io().map_err(io_err(&self.path))
    }

    fn sync_io(&self) -> io::Result<()> {
        if self.durable_mark.load(Ordering::Acquire) >= self.mark {
            return Ok(());
        }
        let Some(log) = &self.log else {
            return Ok(());
        };
        self.latch.check()?;
        self.latch.record(log.flush())?;
        self.durable_mark.fetch_max(self.mark, Ordering::AcqRel);
        Ok(())
    }
}

/// Write `bytes` to `dir/name` on the host's disk atomically: temp file, fsync, rename,
/// fsync of the directory.
pub fn replace_file(dir: &Path, name: &str, bytes: &[u8]) -> Result<(), StoreError> {
    storage::replace_file(&storage::RealDisk, dir, name, bytes).map_err(io_err(&dir.join(name)))
}

/// What `fsck --repair` did to a damaged log.
#[derive(Debug, Clone, Default)]
pub struct Repair {
    /// The log's length before the repair.
    pub log_bytes: u64,
    /// Where the log was cut (the end of the last good frame).
    pub cut_at: u64,
    /// Where the damage began (None: nothing to repair).
    pub damage_at: Option<u64>,
    /// Valid frames after the damage, cut with it.
    pub frames_lost: u64,
    /// The copy of the log as it was.
    pub copy: Option<PathBuf>,
}

/// Cut the log of the pool in `dir` at the last good frame before its first damaged one,
/// after keeping a copy of it as `catalog.log.damaged-<now_secs>` (0600, flushed, its
/// directory synced). A log with nothing after its last good frame, or one a snapshot
/// already folded in, is left alone. The caller holds the pool lock.
pub fn repair_log_on(disk: &Arc<dyn Disk>, dir: &Path, now_secs: u64) -> Result<Repair, StoreError> {
    let snap_path = dir.join(SNAP_FILE);
    let snap = match disk.read_all(&snap_path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(StoreError::NotAPool { path: dir.into() }),
        Err(e) => return Err(io_err(&snap_path)(e)),
    };
    let (generation, _) = decode_snapshot(&snap_path, &snap)?;
    let log_path = dir.join(LOG_FILE);
    let bytes = match disk.read_all(&log_path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Repair::default()),
        Err(e) => return Err(io_err(&log_path)(e)),
    };
    let log_gen = decode_log_header(&log_path, &bytes)?;
    let mut r = Repair { log_bytes: bytes.len() as u64, cut_at: bytes.len() as u64, ..Default::default() };
    if log_gen != generation {
        return Ok(r); // ignored (older) or refused (newer) whatever its frames hold
    }
    let (valid_len, scan) = frames_prefix(&bytes)?;
    if valid_len == bytes.len() as u64 {
        return Ok(r);
    }
    r.cut_at = valid_len;
    r.damage_at = Some(valid_len);
    r.frames_lost = scan.frames;
    let mut n = 0;
    let copy = loop {
        let name = match n {
            0 => format!("{DAMAGED_LOG_PREFIX}-{now_secs}"),
            _ => format!("{DAMAGED_LOG_PREFIX}-{now_secs}.{n}"),
        };
        let p = dir.join(name);
        match disk.create_new(&p, 0) {
            Ok(f) => break (p, f),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists && n < 100 => n += 1,
            Err(e) => return Err(io_err(&p)(e)),
        }
    };
    let (copy_path, f) = copy;
    f.write_at(&bytes, 0).and_then(|_| f.flush()).map_err(io_err(&copy_path))?;
    disk.sync_dir(dir).map_err(io_err(dir))?;
    r.copy = Some(copy_path);
    let log = disk.open(&log_path).map_err(io_err(&log_path))?;
    log.set_len(valid_len).and_then(|_| log.flush()).map_err(io_err(&log_path))?;
    // The cut took frames that were synced: a fragment or size record written after them
    // (ring.rs) would be laid over a log that no longer leads to it. A new generation makes
    // every ring older than the catalog.
    let (mut s, _) = Store::open_once(disk, dir, true, false)?;
    s.compact()?;
    Ok(r)
}

/// [`repair_log_on`] on the host's disk.
pub fn repair_log(dir: &Path, now_secs: u64) -> Result<Repair, StoreError> {
    repair_log_on(&storage::real(), dir, now_secs)
}

fn corrupt(path: &Path, what: impl Into<String>) -> StoreError {
    StoreError::Corrupt { path: path.to_path_buf(), what: what.into() }
}

fn decode_snapshot(path: &Path, b: &[u8]) -> Result<(u64, Catalog), StoreError> {
    if b.len() < SNAP_HEADER_BYTES + 4 {
        return Err(corrupt(path, format!("snapshot is truncated ({} bytes)", b.len())));
    }
    if &b[0..4] != SNAP_MAGIC {
        return Err(corrupt(path, "bad magic (not a ferryfs catalog snapshot)"));
    }
    let version = u16::from_le_bytes([b[4], b[5]]);
    if !FORMAT_VERSIONS_READ.contains(&version) {
        return Err(corrupt(path, format!("format version {version}, this ferryfs reads {FORMAT_VERSIONS_READ:?}")));
    }
    let generation = u64::from_le_bytes(b[8..16].try_into().unwrap());
    let len = u64::from_le_bytes(b[16..24].try_into().unwrap());
    let want = SNAP_HEADER_BYTES as u64 + len + 4;
    if want != b.len() as u64 {
        return Err(corrupt(path, format!("snapshot is {} bytes, its header says {want}", b.len())));
    }
    let body_end = SNAP_HEADER_BYTES + len as usize;
    let crc = u32::from_le_bytes(b[body_end..body_end + 4].try_into().unwrap());
    let actual = crc32c::crc32c(&b[..body_end]);
    if crc != actual {
        return Err(corrupt(path, format!("snapshot checksum mismatch (stored {crc:#010x}, computed {actual:#010x})")));
    }
    let body = &b[SNAP_HEADER_BYTES..body_end];
    let decoded = match version {
        1..=3 => legacy::decode_snapshot(version, body),
        _ => postcard::from_bytes::<Catalog>(body),
    };
    let catalog = decoded.map_err(|e| corrupt(path, format!("snapshot does not decode: {e}")))?;
    Ok((generation, catalog))
}

fn decode_log_header(path: &Path, b: &[u8]) -> Result<u64, StoreError> {
    if b.len() < LOG_HEADER_BYTES {
        return Err(corrupt(path, format!("log header is truncated ({} bytes)", b.len())));
    }
    if &b[0..4] != LOG_MAGIC {
        return Err(corrupt(path, "bad magic (not a ferryfs catalog log)"));
    }
    let crc = u32::from_le_bytes(b[16..20].try_into().unwrap());
    if crc != crc32c::crc32c(&b[..16]) {
        return Err(corrupt(path, "log header checksum mismatch"));
    }
    let version = u16::from_le_bytes([b[4], b[5]]);
    if !FORMAT_VERSIONS_READ.contains(&version) {
        return Err(corrupt(path, format!("format version {version}, this ferryfs reads {FORMAT_VERSIONS_READ:?}")));
    }
    Ok(u64::from_le_bytes(b[8..16].try_into().unwrap()))
}

/// One frame: the op and the whole sectors of its log file known durable when it was
/// written (see [`SECTOR_BYTES`]).
pub fn encode_frame(op: &Op, durable_sectors: u16) -> Vec<u8> {
    let payload = postcard::to_stdvec(op).expect("an op serializes");
    let mut f = Vec::with_capacity(FRAME_HEADER_BYTES + payload.len() + 4);
    f.extend_from_slice(FRAME_MAGIC);
    f.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    f.extend_from_slice(&durable_sectors.to_le_bytes());
    f.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    let header_crc = crc32c::crc32c(&f[..12]);
    f.extend_from_slice(&header_crc.to_le_bytes());
    f.extend_from_slice(&payload);
    let crc = crc32c::crc32c(&f[4..]);
    f.extend_from_slice(&crc.to_le_bytes());
    f
}

/// A frame whose magic and both checksums hold.
struct FrameAt {
    total: usize,
    version: u16,
    durable_sectors: u16,
}

/// The frame at `at`, or why there is none.
fn frame_at(b: &[u8], at: usize) -> Result<FrameAt, String> {
    let rest = &b[at..];
    if rest.len() < FRAME_HEADER_BYTES {
        return Err(format!("is cut short ({} bytes left)", rest.len()));
    }
    if &rest[..4] != FRAME_MAGIC {
        return Err("has a bad magic".into());
    }
    let header_crc = u32::from_le_bytes(rest[12..16].try_into().unwrap());
    if header_crc != crc32c::crc32c(&rest[..12]) {
        return Err("has a header that fails its checksum".into());
    }
    let version = u16::from_le_bytes([rest[4], rest[5]]);
    let durable_sectors = u16::from_le_bytes([rest[6], rest[7]]);
    let len = u32::from_le_bytes(rest[8..12].try_into().unwrap()) as usize;
    if len > FRAME_PAYLOAD_MAX_BYTES {
        return Err(format!("claims {len} bytes"));
    }
    let total = FRAME_HEADER_BYTES + len + 4;
    if rest.len() < total {
        return Err("runs past the end of the file".into());
    }
    let crc = u32::from_le_bytes(rest[total - 4..total].try_into().unwrap());
    if crc != crc32c::crc32c(&rest[4..total - 4]) {
        return Err("fails its checksum".into());
    }
    Ok(FrameAt { total, version, durable_sectors })
}

/// Valid frames found after a damaged one.
#[derive(Debug, Default, Clone, Copy)]
struct TailScan {
    frames: u64,
    /// The largest `durable_sectors` among them, in bytes, and the frame that says it.
    synced_bytes: u64,
    synced_by: u64,
}

/// Look for valid frames at any byte offset from `from` on.
fn scan_tail(b: &[u8], from: usize) -> TailScan {
    let mut scan = TailScan::default();
    let mut at = from;
    while at + FRAME_HEADER_BYTES <= b.len() {
        let Some(i) = b[at..].windows(4).position(|w| w == FRAME_MAGIC) else {
            break;
        };
        at += i;
        match frame_at(b, at) {
            Ok(f) => {
                scan.frames += 1;
                let synced = f.durable_sectors as u64 * SECTOR_BYTES;
                if synced > scan.synced_bytes {
                    scan.synced_bytes = synced;
                    scan.synced_by = at as u64;
                }
                at += f.total;
            }
            Err(_) => at += 1,
        }
    }
    scan
}

/// Where a walk of the frames stopped.
struct Walk {
    /// The end of the last good frame.
    valid_len: u64,
    /// The first frame that failed: its offset and what is wrong with it.
    damage: Option<(u64, String)>,
    /// The valid frames after the damage.
    scan: TailScan,
}

/// Walk the frames after the log header up to the first that fails, and scan what follows.
fn walk_frames(b: &[u8], mut each: impl FnMut(usize, &FrameAt) -> Result<(), StoreError>) -> Result<Walk, StoreError> {
    let mut at = LOG_HEADER_BYTES;
    while at < b.len() {
        match frame_at(b, at) {
            Ok(f) => {
                each(at, &f)?;
                at += f.total;
            }
            Err(why) => {
                let scan = if b[at..].iter().all(|&x| x == 0) { TailScan::default() } else { scan_tail(b, at + 1) };
                return Ok(Walk { valid_len: at as u64, damage: Some((at as u64, why)), scan });
            }
        }
    }
    Ok(Walk { valid_len: at as u64, damage: None, scan: TailScan::default() })
}

/// The end of the last good frame, and what lies after it (for a repair).
fn frames_prefix(b: &[u8]) -> Result<(u64, TailScan), StoreError> {
    let w = walk_frames(b, |_, _| Ok(()))?;
    Ok((w.valid_len, w.scan))
}

/// Decoded frames: the ops with their offsets, the end of the last good frame, and how
/// many valid (never synced) frames the dropped tail held.
struct Frames {
    ops: Vec<(u64, Op)>,
    valid_len: u64,
    frames_dropped: u64,
}

/// Decode the frames after the log header. Damage followed by a frame that says the damaged
/// bytes were synced is corruption; any other damage starts a torn tail, dropped.
fn decode_frames(path: &Path, b: &[u8]) -> Result<Frames, StoreError> {
    let mut ops = Vec::new();
    let Walk { valid_len, damage, scan } = walk_frames(b, |at, f| {
        if !FORMAT_VERSIONS_READ.contains(&f.version) {
            return Err(corrupt(path, format!("frame at byte {at} has format version {}", f.version)));
        }
        let op = legacy::decode_op(f.version, &b[at + FRAME_HEADER_BYTES..at + f.total - 4])
            .map_err(|e| corrupt(path, format!("frame at byte {at} does not decode: {e}")))?;
        ops.push((at as u64, op));
        Ok(())
    })?;
    if let Some((at, why)) = damage {
        if scan.synced_bytes > at {
            let pool = path.parent().unwrap_or(Path::new("POOL"));
            return Err(corrupt(
                path,
                format!(
                    "frame at byte {at} {why}, in data that was synced (the frame at byte {} says the first {} \
                     bytes were); run `ferryfs fsck --repair {}` (it keeps a copy of the log and cuts it at the \
                     last good frame)",
                    scan.synced_by,
                    scan.synced_bytes,
                    pool.display()
                ),
            ));
        }
    }
    Ok(Frames { ops, valid_len, frames_dropped: scan.frames })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::model::{Body, Meta, NewKind, ROOT_INO};
    use crate::geometry::Geometry;
    use crate::storage::RealDisk;
    use std::fs;
    use std::sync::atomic::AtomicBool;

    fn meta() -> Meta {
        Meta { perm: 0o755, uid: 0, gid: 0, nlink: 2, atime_ns: 0, mtime_ns: 0, ctime_ns: 0 }
    }

    fn mk_op(ino: u64, name: &str) -> Op {
        Op::MakeNode { ino, parent: ROOT_INO, name: name.into(), meta: meta(), kind: NewKind::File }
    }

    fn mk(s: &mut Store, ino: u64, name: &str) {
        s.commit(mk_op(ino, name)).unwrap();
    }

    fn new_catalog() -> Catalog {
        Catalog::new(Geometry::new(4096).unwrap(), meta())
    }

    /// What the test disk counts and which faults it injects, for the log file only.
    #[derive(Debug, Default)]
    struct Faults {
        log_flushes: AtomicU64,
        fail_next_flush: AtomicBool,
        fail_next_write: AtomicBool,
    }

    /// The host's disk, with the catalog log's flushes counted and faults injected into it.
    /// It does not latch: the store must.
    #[derive(Debug, Default)]
    struct TestDisk {
        faults: Arc<Faults>,
    }

    #[derive(Debug)]
    struct TestFile {
        inner: Arc<dyn StorageFile>,
        faults: Arc<Faults>,
    }

    fn eio() -> io::Error {
        io::Error::from_raw_os_error(libc::EIO)
    }

    impl StorageFile for TestFile {
        fn read_at(&self, buf: &mut [u8], offset_bytes: u64) -> io::Result<()> {
            self.inner.read_at(buf, offset_bytes)
        }
        fn write_at(&self, buf: &[u8], offset_bytes: u64) -> io::Result<()> {
            if self.faults.fail_next_write.swap(false, Ordering::AcqRel) {
                return Err(eio());
            }
            self.inner.write_at(buf, offset_bytes)
        }
        fn flush(&self) -> io::Result<()> {
            if self.faults.fail_next_flush.swap(false, Ordering::AcqRel) {
                return Err(eio());
            }
            self.faults.log_flushes.fetch_add(1, Ordering::AcqRel);
            self.inner.flush()
        }
        fn punch(&self, offset_bytes: u64, len_bytes: u64) -> io::Result<()> {
            self.inner.punch(offset_bytes, len_bytes)
        }
        fn size_bytes(&self) -> u64 {
            self.inner.size_bytes()
        }
        fn set_len(&self, len_bytes: u64) -> io::Result<()> {
            self.inner.set_len(len_bytes)
        }
    }

    impl Disk for TestDisk {
        fn create_new(&self, path: &Path, size_bytes: u64) -> io::Result<Arc<dyn StorageFile>> {
            RealDisk.create_new(path, size_bytes)
        }
        fn open(&self, path: &Path) -> io::Result<Arc<dyn StorageFile>> {
            let inner = RealDisk.open(path)?;
            if path.file_name().is_some_and(|n| n == LOG_FILE) {
                return Ok(Arc::new(TestFile { inner, faults: self.faults.clone() }));
            }
            Ok(inner)
        }
        fn read_all(&self, path: &Path) -> io::Result<Vec<u8>> {
            RealDisk.read_all(path)
        }
        fn exists(&self, path: &Path) -> bool {
            RealDisk.exists(path)
        }
        fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
            RealDisk.rename(from, to)
        }
        fn remove(&self, path: &Path) -> io::Result<()> {
            RealDisk.remove(path)
        }
        fn sync_dir(&self, dir: &Path) -> io::Result<()> {
            RealDisk.sync_dir(dir)
        }
    }

    fn test_disk() -> (Arc<dyn Disk>, Arc<Faults>) {
        let d = TestDisk::default();
        let faults = d.faults.clone();
        (Arc::new(d), faults)
    }

    fn flushes(f: &Faults) -> u64 {
        f.log_flushes.load(Ordering::Acquire)
    }

    /// The frames of a log file: (offset, length).
    fn frames_of(bytes: &[u8]) -> Vec<(usize, usize)> {
        let mut out = Vec::new();
        let mut at = LOG_HEADER_BYTES;
        while at < bytes.len() {
            let f = frame_at(bytes, at).expect("a whole frame");
            out.push((at, f.total));
            at += f.total;
        }
        out
    }

    #[test]
    fn log_replays_and_compaction_keeps_state() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Store::create(dir.path(), new_catalog()).unwrap();
        mk(&mut s, 2, "a");
        mk(&mut s, 3, "b");
        assert!(s.commit(Op::Destroy { ino: 2 }).is_err(), "refused ops are not logged");
        let want = s.catalog.clone();
        drop(s);
        let (mut s, r) = Store::open(dir.path(), true).unwrap();
        assert_eq!(r.ops_replayed, 2);
        assert_eq!(s.catalog, want);
        s.compact().unwrap();
        mk(&mut s, 4, "c");
        let want = s.catalog.clone();
        let (s2, r) = Store::open(dir.path(), false).unwrap();
        assert_eq!(r.ops_replayed, 1);
        assert_eq!(s2.catalog, want);
    }

    /// A pool written by version 2 must mount: its snapshot has no `xattrs` and its frames
    /// say version 2. This builds one byte for byte with the version 2 encoding (a catalog
    /// whose only node is a directory, with no attributes, minus the empty map's one byte).
    /// legacy.rs tests the data sets and jobs of older versions.
    #[test]
    fn a_version_2_pool_opens_and_is_rewritten_as_the_current_version() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = new_catalog();
        c.apply(&Op::MakeNode { ino: 2, parent: ROOT_INO, name: b"old".to_vec(), meta: meta(), kind: NewKind::Dir })
            .unwrap();
        let mut payload = postcard::to_stdvec(&c).unwrap();
        assert_eq!(payload.pop(), Some(0), "an empty checkpoints map is one zero byte at the end");
        assert_eq!(payload.pop(), Some(0), "an empty xattrs map is one zero byte before it");
        let mut snap = Vec::new();
        snap.extend_from_slice(SNAP_MAGIC);
        snap.extend_from_slice(&2u16.to_le_bytes());
        snap.extend_from_slice(&0u16.to_le_bytes());
        snap.extend_from_slice(&7u64.to_le_bytes());
        snap.extend_from_slice(&(payload.len() as u64).to_le_bytes());
        snap.extend_from_slice(&payload);
        let crc = crc32c::crc32c(&snap);
        snap.extend_from_slice(&crc.to_le_bytes());
        fs::write(dir.path().join(SNAP_FILE), &snap).unwrap();
        let mut log = Vec::new();
        log.extend_from_slice(LOG_MAGIC);
        log.extend_from_slice(&2u16.to_le_bytes());
        log.extend_from_slice(&0u16.to_le_bytes());
        log.extend_from_slice(&7u64.to_le_bytes());
        let crc = crc32c::crc32c(&log);
        log.extend_from_slice(&crc.to_le_bytes());
        let mut frame = encode_frame(&mk_op(3, "logged"), 0);
        frame[4..6].copy_from_slice(&2u16.to_le_bytes());
        let header_crc = crc32c::crc32c(&frame[..12]);
        frame[12..16].copy_from_slice(&header_crc.to_le_bytes());
        let end = frame.len() - 4;
        let payload_crc = crc32c::crc32c(&frame[4..end]);
        frame[end..].copy_from_slice(&payload_crc.to_le_bytes());
        log.extend_from_slice(&frame);
        fs::write(dir.path().join(LOG_FILE), &log).unwrap();

        let (mut s, _) = Store::open(dir.path(), true).unwrap();
        assert_eq!(s.catalog.lookup(ROOT_INO, b"old"), Some(2));
        assert_eq!(s.catalog.lookup(ROOT_INO, b"logged"), Some(3));
        assert!(s.catalog.xattrs.is_empty());
        s.commit(Op::SetXattr { ino: 3, name: b"user.k".to_vec(), value: b"v".to_vec(), ctime_ns: 5 }).unwrap();
        s.compact().unwrap();
        drop(s);
        let snap = fs::read(dir.path().join(SNAP_FILE)).unwrap();
        assert_eq!(u16::from_le_bytes([snap[4], snap[5]]), FORMAT_VERSION, "rewritten as the current version");
        let (s, _) = Store::open(dir.path(), false).unwrap();
        assert_eq!(s.catalog.xattrs[&3][&b"user.k"[..]], b"v");
    }

    /// A job's checkpoint and its intents replay and survive a compaction; a checkpoint
    /// replaces the last one's dirty set; the end of the job drops it; an intent needs one.
    #[test]
    fn job_checkpoints_replay_compact_and_end_with_the_job() {
        use crate::catalog::model::JobRec;
        use crate::space::{Extent, VolumeId};
        let dir = tempfile::tempdir().unwrap();
        let mut s = Store::create(dir.path(), new_catalog()).unwrap();
        let v = VolumeId(1);
        s.commit(Op::AddVolume { id: v, name: "V1".into(), path: "v".into(), size_bytes: 64 * 4096, tracks_total: 64 })
            .unwrap();
        mk(&mut s, 2, "f");
        let job = |id| JobRec::queued(id, 2, "/f", vec![v]);
        s.commit(Op::JobStart { job: job(1) }).unwrap();
        assert!(s.commit(Op::JobIntent { job: 1, regions: vec![0] }).is_err(), "an intent needs a checkpoint");
        let target = vec![Extent { volume: v, first: crate::geometry::TrackNo(8), count_tracks: 8 }];
        s.commit(Op::JobGrow { job: 1, extents: target }).unwrap();
        let cp = |copied_tracks, dirty_regions: Vec<u64>| Op::JobCheckpoint {
            job: 1,
            copied_tracks,
            region_tracks: 2,
            dirty_regions,
        };
        s.commit(cp(4, vec![0, 1])).unwrap();
        s.commit(cp(6, vec![1])).unwrap();
        s.commit(Op::JobIntent { job: 1, regions: vec![2] }).unwrap();
        assert!(s
            .commit(Op::JobCheckpoint { job: 1, copied_tracks: 6, region_tracks: 0, dirty_regions: vec![] })
            .is_err());
        let want = s.catalog.clone();
        assert_eq!(want.checkpoints[&1].copied_tracks, 6);
        assert_eq!(want.checkpoints[&1].dirty_regions.iter().copied().collect::<Vec<_>>(), [1, 2]);
        drop(s);
        let (mut s, r) = Store::open(dir.path(), true).unwrap();
        assert!(r.ops_replayed > 0);
        assert_eq!(s.catalog, want, "replayed");
        s.compact().unwrap();
        drop(s);
        let (mut s, _) = Store::open(dir.path(), true).unwrap();
        assert_eq!(s.catalog, want, "from the snapshot");
        assert!(crate::catalog::check::check(&s.catalog).problems.is_empty());
        s.commit(Op::JobCancel { job: 1 }).unwrap();
        assert!(s.catalog.checkpoints.is_empty(), "the rollback drops the checkpoint");
    }

    #[test]
    fn special_files_and_xattrs_replay_and_compact() {
        use crate::catalog::model::SpecialKind;
        let dir = tempfile::tempdir().unwrap();
        let mut s = Store::create(dir.path(), new_catalog()).unwrap();
        let kind = NewKind::Special { kind: SpecialKind::CharDev, rdev: 0x103 };
        s.commit(Op::MakeNode { ino: 2, parent: ROOT_INO, name: b"null".to_vec(), meta: meta(), kind }).unwrap();
        s.commit(Op::SetXattr { ino: 2, name: b"user.a".to_vec(), value: vec![0, 1, 2], ctime_ns: 1 }).unwrap();
        s.commit(Op::SetXattr { ino: 2, name: b"user.b".to_vec(), value: vec![], ctime_ns: 2 }).unwrap();
        s.commit(Op::RemoveXattr { ino: 2, name: b"user.b".to_vec(), ctime_ns: 3 }).unwrap();
        assert!(s.commit(Op::RemoveXattr { ino: 2, name: b"user.b".to_vec(), ctime_ns: 4 }).is_err());
        let want = s.catalog.clone();
        drop(s);
        let (mut s, _) = Store::open(dir.path(), true).unwrap();
        assert_eq!(s.catalog, want, "replay");
        s.compact().unwrap();
        drop(s);
        let (s, _) = Store::open(dir.path(), false).unwrap();
        assert_eq!(s.catalog, want, "snapshot");
        assert_eq!(s.catalog.get(2).unwrap().body, Body::Special { kind: SpecialKind::CharDev, rdev: 0x103 });
        assert_eq!(s.catalog.get(2).unwrap().meta.ctime_ns, 3);
    }

    #[test]
    fn stats_follow_commits_and_compactions() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Store::create(dir.path(), new_catalog()).unwrap();
        let fresh = s.stats();
        assert_eq!((fresh.compactions, fresh.ops_committed), (1, 0), "creating a pool compacts once");
        assert_eq!(fresh.log_size_bytes, LOG_HEADER_BYTES as u64);
        assert_eq!(fresh.snapshot_size_bytes, fs::metadata(dir.path().join(SNAP_FILE)).unwrap().len());
        mk(&mut s, 2, "a");
        mk(&mut s, 3, "b");
        let st = s.stats();
        assert_eq!(st.ops_committed, 2);
        assert_eq!(st.log_size_bytes, fs::metadata(dir.path().join(LOG_FILE)).unwrap().len());
        assert_eq!(st.appended_bytes, st.log_size_bytes - LOG_HEADER_BYTES as u64);
        s.compact().unwrap();
        let st = s.stats();
        assert_eq!(st.compactions, 2);
        assert_eq!(st.log_size_bytes, LOG_HEADER_BYTES as u64, "a compaction starts a new log");
        assert!(st.appended_bytes > 0, "the appended bytes never go down");
    }

    /// A pool directory whose log holds two creates (a, b), closed; and the log's path.
    fn store_with_two_ops() -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Store::create(dir.path(), new_catalog()).unwrap();
        mk(&mut s, 2, "a");
        mk(&mut s, 3, "b");
        drop(s);
        let log = dir.path().join(LOG_FILE);
        (dir, log)
    }

    #[test]
    fn torn_tail_is_cut_and_corruption_refused() {
        let (dir, log) = store_with_two_ops();
        let bytes = fs::read(&log).unwrap();
        // Torn: the last frame cut short.
        fs::write(&log, &bytes[..bytes.len() - 3]).unwrap();
        let (s, r) = Store::open(dir.path(), true).unwrap();
        assert_eq!(r.ops_replayed, 1);
        assert!(r.torn_tail_bytes > 0);
        assert!(s.catalog.lookup(ROOT_INO, b"b").is_none());
        drop(s);
        // Corrupt log header.
        let mut b = fs::read(&log).unwrap();
        b[9] ^= 1;
        fs::write(&log, &b).unwrap();
        let e = Store::open(dir.path(), false).err().unwrap();
        assert!(e.to_string().contains("log header checksum"), "{e}");
        // Corrupt snapshot.
        let snap = dir.path().join(SNAP_FILE);
        let mut b = fs::read(&snap).unwrap();
        let n = b.len();
        b[n - 5] ^= 1; // the last payload byte
        fs::write(&snap, &b).unwrap();
        let e = Store::open(dir.path(), false).err().unwrap();
        assert!(e.to_string().contains("checksum"), "{e}");
    }

    /// The mount tracked "bytes of the log synced" as a length: after a compaction started a
    /// new, shorter log, no sync flushed the log again until it grew past the old length.
    #[test]
    fn sync_after_compaction_of_a_long_log_flushes() {
        let dir = tempfile::tempdir().unwrap();
        let (disk, faults) = test_disk();
        let mut s = Store::create_on(disk.clone(), dir.path(), new_catalog()).unwrap();
        for i in 0..300 {
            mk(&mut s, 2 + i, &format!("f{i}"));
        }
        drop(s);
        let (mut s, r) = Store::open_on(disk, dir.path(), true).unwrap();
        assert_eq!(r.ops_replayed, 300);
        assert!(r.log_bytes > 8192);
        // What the mount kept as "synced" before its compaction at mount.
        let synced_before = s.appended_mark();
        s.compact().unwrap();
        mk(&mut s, 1000, "small");
        assert!(s.appended_mark() > synced_before, "the mark went down across the compaction");
        let before = flushes(&faults);
        s.sync_point().sync().unwrap();
        assert_eq!(flushes(&faults), before + 1, "the sync after the compaction did not flush the log");
        // Nothing new: no flush.
        s.sync_point().sync().unwrap();
        s.sync().unwrap();
        assert_eq!(flushes(&faults), before + 1);
        // A point taken before a compaction needs no flush after it.
        mk(&mut s, 1001, "small2");
        let p = s.sync_point();
        s.compact().unwrap();
        let before = flushes(&faults);
        p.sync().unwrap();
        assert_eq!(flushes(&faults), before);
    }

    #[test]
    fn failed_sync_latches_and_the_next_commit_rewrites() {
        let dir = tempfile::tempdir().unwrap();
        let (disk, faults) = test_disk();
        let mut s = Store::create_on(disk.clone(), dir.path(), new_catalog()).unwrap();
        mk(&mut s, 2, "a");
        faults.fail_next_flush.store(true, Ordering::Release);
        assert!(s.sync_point().sync().is_err());
        assert!(s.log_failed());
        // The disk would flush now; the store must not believe it.
        assert!(s.sync_point().sync().is_err(), "a sync after a failed one reported success");
        assert!(s.sync().is_err());
        mk(&mut s, 3, "b");
        assert!(!s.log_failed(), "the commit did not rewrite the failed log");
        s.sync().unwrap();
        let want = s.catalog.clone();
        drop(s);
        let (s, _) = Store::open_on(disk, dir.path(), false).unwrap();
        assert_eq!(s.catalog, want);
        assert!(s.catalog.lookup(ROOT_INO, b"a").is_some() && s.catalog.lookup(ROOT_INO, b"b").is_some());
    }

    #[test]
    fn failed_append_leaves_the_catalog_and_sync_or_rewrite_recovers() {
        let dir = tempfile::tempdir().unwrap();
        let (disk, faults) = test_disk();
        let mut s = Store::create_on(disk.clone(), dir.path(), new_catalog()).unwrap();
        mk(&mut s, 2, "a");
        let before = s.catalog.clone();
        faults.fail_next_write.store(true, Ordering::Release);
        assert!(s.commit(mk_op(3, "b")).is_err());
        assert_eq!(s.catalog, before, "a failed append changed the catalog");
        assert!(s.log_failed());
        s.sync_or_rewrite().unwrap();
        assert!(!s.log_failed());
        // A sync that fails is answered with a rewrite.
        mk(&mut s, 3, "b");
        faults.fail_next_flush.store(true, Ordering::Release);
        s.sync_or_rewrite().unwrap();
        assert!(!s.log_failed());
        let want = s.catalog.clone();
        let (s2, _) = Store::open_on(disk, dir.path(), false).unwrap();
        assert_eq!(s2.catalog, want);
    }

    #[test]
    fn zeroed_payload_of_the_last_frame_is_a_torn_tail() {
        let (dir, log) = store_with_two_ops();
        let mut bytes = fs::read(&log).unwrap();
        let frames = frames_of(&bytes);
        let (at, len) = frames[1];
        bytes[at + FRAME_HEADER_BYTES..at + len].fill(0);
        fs::write(&log, &bytes).unwrap();
        let (s, r) = Store::open(dir.path(), true).unwrap();
        assert_eq!(r.ops_replayed, 1);
        assert_eq!(r.torn_tail_bytes, len as u64);
        assert_eq!(r.frames_dropped, 0);
        assert!(s.catalog.lookup(ROOT_INO, b"a").is_some());
        assert!(s.catalog.lookup(ROOT_INO, b"b").is_none());
        assert_eq!(fs::metadata(&log).unwrap().len(), at as u64, "a writable open cuts the tail");
    }

    #[test]
    fn lost_unsynced_frame_before_valid_ones_is_a_torn_tail() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Store::create(dir.path(), new_catalog()).unwrap();
        for (i, n) in ["a", "b", "c", "d"].iter().enumerate() {
            mk(&mut s, 2 + i as u64, n);
        }
        drop(s);
        let log = dir.path().join(LOG_FILE);
        let mut bytes = fs::read(&log).unwrap();
        let (at, len) = frames_of(&bytes)[1];
        bytes[at..at + len].fill(0);
        fs::write(&log, &bytes).unwrap();
        // Read-only: opens, writes nothing.
        let (s, r) = Store::open(dir.path(), false).unwrap();
        assert_eq!(r.ops_replayed, 1);
        assert_eq!(r.frames_dropped, 2);
        assert_eq!(r.torn_tail_bytes, (bytes.len() - at) as u64);
        assert!(s.catalog.lookup(ROOT_INO, b"c").is_none());
        assert_eq!(fs::read(&log).unwrap(), bytes);
        // Writable: cuts.
        let (_, r) = Store::open(dir.path(), true).unwrap();
        assert_eq!(r.frames_dropped, 2);
        assert_eq!(fs::metadata(&log).unwrap().len(), at as u64);
    }

    #[test]
    fn damage_in_synced_data_is_refused_and_repair_cuts_it() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Store::create(dir.path(), new_catalog()).unwrap();
        for i in 0..200 {
            mk(&mut s, 2 + i, &format!("f{i}"));
        }
        s.sync().unwrap();
        mk(&mut s, 1000, "after-sync");
        drop(s);
        let log = dir.path().join(LOG_FILE);
        let mut bytes = fs::read(&log).unwrap();
        let frames = frames_of(&bytes);
        let (last_at, _) = *frames.last().unwrap();
        let sectors = u16::from_le_bytes([bytes[last_at + 6], bytes[last_at + 7]]);
        // A flipped byte in the payload of the fourth frame, in a sector the last frame says
        // was synced.
        let (at, _) = frames[3];
        assert!(at as u64 + 100 < sectors as u64 * SECTOR_BYTES, "the frame after the sync says {sectors} sectors");
        bytes[at + FRAME_HEADER_BYTES + 2] ^= 0x40;
        fs::write(&log, &bytes).unwrap();
        for writable in [false, true] {
            let e = Store::open(dir.path(), writable).err().expect("damage in synced data must refuse");
            let msg = e.to_string();
            assert!(msg.contains(&format!("frame at byte {at} ")), "{msg}");
            assert!(msg.contains("fsck --repair"), "{msg}");
        }
        assert_eq!(fs::read(&log).unwrap(), bytes, "a refused open wrote to the log");
        // The repair keeps a copy and cuts at the last good frame.
        let r = repair_log(dir.path(), 1234).unwrap();
        assert_eq!(r.damage_at, Some(at as u64));
        assert_eq!(r.cut_at, at as u64);
        assert_eq!(r.frames_lost, frames.len() as u64 - 4);
        let copy = r.copy.unwrap();
        assert_eq!(copy, dir.path().join("catalog.log.damaged-1234"));
        assert_eq!(fs::read(&copy).unwrap(), bytes);
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(fs::metadata(&copy).unwrap().permissions().mode() & 0o777, 0o600);
        let (s, r) = Store::open(dir.path(), true).unwrap();
        // The three good frames were folded into a new snapshot (a new generation: no size
        // record written against the old log can raise a size).
        assert_eq!((r.ops_replayed, r.torn_tail_bytes), (0, 0));
        assert_eq!(r.generation, 2);
        assert!(s.catalog.lookup(ROOT_INO, b"f2").is_some());
        assert!(s.catalog.lookup(ROOT_INO, b"f3").is_none());
        drop(s);
        // A healthy log: nothing to do.
        let r = repair_log(dir.path(), 1235).unwrap();
        assert!(r.damage_at.is_none() && r.copy.is_none());
        assert!(!dir.path().join("catalog.log.damaged-1235").exists());
    }

    #[test]
    fn frames_record_the_durable_sectors_of_their_own_log() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Store::create(dir.path(), new_catalog()).unwrap();
        for i in 0..200 {
            mk(&mut s, 2 + i, &format!("f{i}"));
        }
        s.sync().unwrap();
        s.compact().unwrap();
        // A new log: nothing of it but its header is durable, whatever the mark says.
        mk(&mut s, 1000, "x");
        let bytes = fs::read(dir.path().join(LOG_FILE)).unwrap();
        let (at, _) = frames_of(&bytes)[0];
        assert_eq!(u16::from_le_bytes([bytes[at + 6], bytes[at + 7]]), 0);
    }
}
