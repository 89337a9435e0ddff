//! The engine: data sets and their nodes, extent I/O, commit, sync and recovery, over the
//! catalog and the volumes. It knows nothing of FUSE (`fs` is a thin adapter over it) nor of
//! migration jobs (`migrate` drives it); both sit above it, so a test can drive the engine
//! directly, over a simulated disk (`storage::sim`), thousands of operations a second.
//!
//! ```text
//!   fs (FUSE adapter, .ferry control files)      migrate (jobs, plans, control verbs)
//!                      \                              /
//!                       engine (this module) ---- monitor (dirty bitmap, job hooks)
//!                      /          |          \
//!             catalog (model, log)   extent_map   space
//!                      \          |          /
//!                         storage (the seam: files, or the simulated disk)
//! ```
//!
//! Locks, always taken in this order (never the reverse):
//!
//! 1. `nodes`: the table of open data sets (and of data sets a migration pins). Held by open,
//!    release, unlink, rename and truncate, so that a data set's in-memory node is unique and
//!    no open can build a node from a catalog state that a concurrent truncate is about to
//!    change.
//! 2. `FileNode::write_hold`: shared by everything that changes a data set's bytes or size
//!    (write, truncate, fallocate), exclusive for a migration's cutover ("hold the writes").
//!    Reads don't take it.
//! 3. `FileNode::gate`: shared by every read and write of the data set, exclusive for
//!    whatever frees its tracks (truncate, trim at close). So no I/O is ever in flight to a
//!    track being freed.
//! 4. a migration's stripe locks (monitor.rs), around mirrored writes and re-copies.
//! 5. `catalog`: the store. Held only to validate and log an op and to apply it (a few
//!    microseconds), never across volume I/O except the punch of tracks about to be handed
//!    out again.
//!
//! `open_inodes`, `quarantine`, `unzeroed`, `volume_io`, `rings` and `volumes` are leaf
//! locks: nothing is taken while holding one.
//!
//! The I/O path takes no global lock: a read or a write takes the data set's gate shared,
//! loads the extent map through an atomic pointer, and does positional I/O on the volumes.
//! It takes the catalog lock only when it must allocate tracks or raise the size, and that
//! op is in the log before the write is acknowledged, so a kill -9 loses nothing that
//! returned. Every volume in the table is wrapped in a `storage::counted::Counted`, whose
//! counters (`.ferry/metrics`) cost the I/O path two relaxed atomic adds per call.
//!
//! **Power loss** (docs/design.md, "Power-loss safety"). The log is the order of truth: a
//! power cut keeps a prefix of its frames, every frame before the last sync included. Two
//! rules keep the volumes consistent with any such prefix:
//! - tracks freed by an op are *quarantined*: not punched and not handed out again until the
//!   log is synced past that op ([`Engine::settle_quarantine`]), so no surviving catalog can
//!   map a track that another data set's bytes (or zeros) overwrote;
//! - a migration's switch is committed only after its target is flushed (migrate/job.rs), so
//!   no surviving switch points at tracks the copy had not made durable.
//!
//! An fsync copies the log's unsynced tail into the ring of one of the data set's volumes,
//! flushed with them, instead of syncing the log (catalog/ring.rs); where no ring can take
//! it, it syncs the log after the volumes.

mod intent;
mod io;
mod namespace;
mod node;
mod recovery;
mod xattr;

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::io as stdio;
use std::path::PathBuf;
use std::sync::atomic::AtomicI64;
use std::sync::Arc;

use log::warn;
use parking_lot::{Mutex, RwLock};

use crate::catalog::model::{Ino, Op};
use crate::catalog::ring::Ring;
use crate::catalog::store::{Store, StoreError};
use crate::geometry::Geometry;
use crate::monitor::SyncLatency;
use crate::space::{Extent, FreeMap, VolumeId};
use crate::storage::counted::{Counted, IoCounters, IoSnapshot};
use crate::storage::{Disk, StorageFile};

pub use io::{read_pieces, write_pieces};
pub use namespace::{check_name, Attr, FsStats, Kind, SetAttr, RENAME_EXCHANGE, RENAME_NOREPLACE, RENAME_WHITEOUT};
pub use node::FileNode;
pub use recovery::RecoveryReport;
pub use xattr::{is_acl_name, XATTR_CREATE, XATTR_REPLACE};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("no such entry")]
    NotFound,
    #[error("entry exists")]
    Exists,
    #[error("directory not empty")]
    NotEmpty,
    #[error("name too long")]
    NameTooLong,
    #[error("is a directory")]
    IsDir,
    #[error("not a directory")]
    NotDir,
    #[error("no space left in the pool")]
    NoSpace,
    #[error("invalid argument")]
    Invalid,
    #[error("operation not permitted")]
    NotPermitted,
    #[error("not supported")]
    NotSupported,
    #[error("bad file handle")]
    BadHandle,
    #[error("no such attribute")]
    NoData,
    #[error("attribute value too large")]
    TooBig,
    #[error("result out of range")]
    OutOfRange,
    #[error("the node's extended attributes are full")]
    XattrFull,
    #[error("no data (or hole) at or after the offset")]
    NoSuchOffset,
    #[error("volume I/O: {0}")]
    Io(#[from] stdio::Error),
    #[error("catalog: {0}")]
    Catalog(#[from] StoreError),
}

impl Error {
    /// The one place where errors become errno values.
    pub fn errno(&self) -> i32 {
        match self {
            Error::NotFound => libc::ENOENT,
            Error::Exists => libc::EEXIST,
            Error::NotEmpty => libc::ENOTEMPTY,
            Error::NameTooLong => libc::ENAMETOOLONG,
            Error::IsDir => libc::EISDIR,
            Error::NotDir => libc::ENOTDIR,
            Error::NoSpace => libc::ENOSPC,
            Error::Invalid => libc::EINVAL,
            Error::NotPermitted => libc::EPERM,
            Error::NotSupported => libc::EOPNOTSUPP,
            Error::BadHandle => libc::EBADF,
            Error::NoData => libc::ENODATA,
            Error::TooBig => libc::E2BIG,
            Error::OutOfRange => libc::ERANGE,
            Error::XattrFull => libc::ENOSPC,
            Error::NoSuchOffset => libc::ENXIO,
            Error::Io(e) => e.raw_os_error().unwrap_or(libc::EIO),
            Error::Catalog(StoreError::Io { source, .. }) => {
                source.raw_os_error().filter(|&e| e == libc::ENOSPC).unwrap_or(libc::EIO)
            }
            Error::Catalog(_) => libc::EIO,
        }
    }

    /// An I/O error with this errno.
    pub fn os(errno: i32) -> Error {
        Error::Io(stdio::Error::from_raw_os_error(errno))
    }
}

pub type Result<T> = std::result::Result<T, Error>;

/// Allocation goes around quarantined tracks while it can; once more than this many are
/// quarantined, the op that freed the last of them settles them all (one sync of the log, a
/// punch and a flush: [`Engine::commit`]), so that the quarantine never hides much of a
/// pool's free space.
pub const QUARANTINE_TRACKS_MAX: u64 = 1024;

/// The volume table: every open volume by id.
pub type Volumes = HashMap<VolumeId, Arc<dyn StorageFile>>;

/// A volume of the table, borrowed: the I/O path looks volumes up without touching their
/// reference counts. A missing one (the catalog names a volume the engine has not opened)
/// is an I/O error.
pub fn volume_of(volumes: &Volumes, id: VolumeId) -> Result<&Arc<dyn StorageFile>> {
    volumes.get(&id).ok_or_else(|| Error::os(libc::EIO))
}

/// Wrap a volume's image so that its I/O is counted.
fn counted(file: Arc<dyn StorageFile>) -> (Arc<dyn StorageFile>, Arc<IoCounters>) {
    let counters = Arc::new(IoCounters::default());
    (Arc::new(Counted::new(file, counters.clone())), counters)
}

pub struct Engine {
    pub geometry: Geometry,
    pub pool_dir: PathBuf,
    /// Where the catalog and the images live (the host's files, or a simulated disk).
    pub disk: Arc<dyn Disk>,
    pub catalog: Mutex<Store>,
    volumes: RwLock<Volumes>,
    /// The I/O counters of each volume in `volumes` (every image there is wrapped in a
    /// [`Counted`] that feeds them); read by `.ferry/metrics`.
    volume_io: Mutex<HashMap<VolumeId, Arc<IoCounters>>>,
    nodes: Mutex<HashMap<Ino, Arc<FileNode>>>,
    /// The inodes in `nodes`, as a leaf lock that the catalog's holder may take.
    open_inodes: Mutex<HashSet<Ino>>,
    /// Tracks freed by ops the log may not hold durably yet: neither punched nor handed out
    /// again before a sync of the log ([`Engine::settle_quarantine`]).
    quarantine: Mutex<Vec<Extent>>,
    /// Freed extents whose punch failed; zeroed before they are handed out again.
    unzeroed: Mutex<Vec<Extent>>,
    /// Time of the last application read or write (the copier's pacing looks at it).
    pub last_app_io_ns: AtomicI64,
    /// Applications' fsync latency (the copier's pacing steers by it).
    pub app_syncs: SyncLatency,
    /// The ring of each volume an fsync wrote the log's tail to (None: the volume has none,
    /// a device), catalog/ring.rs.
    rings: Mutex<HashMap<VolumeId, Option<Ring>>>,
    /// Set by a [`Engine::shutdown`] whose compaction succeeded: the catalog holds it all,
    /// and no ring says more (the mount removes its `mounted` marker only then).
    pub stopped_cleanly: std::sync::atomic::AtomicBool,
}

impl Engine {
    pub fn new(
        store: Store,
        pool_dir: PathBuf,
        disk: Arc<dyn Disk>,
        volumes: Vec<(VolumeId, Arc<dyn StorageFile>)>,
    ) -> Engine {
        let mut table = Volumes::new();
        let mut io = HashMap::new();
        for (id, file) in volumes {
            let (file, counters) = counted(file);
            table.insert(id, file);
            io.insert(id, counters);
        }
        Engine {
            geometry: store.catalog.geometry,
            pool_dir,
            disk,
            catalog: Mutex::new(store),
            volumes: RwLock::new(table),
            volume_io: Mutex::new(io),
            nodes: Mutex::new(HashMap::new()),
            open_inodes: Mutex::new(HashSet::new()),
            quarantine: Mutex::new(Vec::new()),
            unzeroed: Mutex::new(Vec::new()),
            last_app_io_ns: AtomicI64::new(0),
            app_syncs: SyncLatency::default(),
            rings: Mutex::new(HashMap::new()),
            stopped_cleanly: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Put a new volume's image in the table (before the catalog records the volume, so
    /// nothing can be placed on it before its image is here).
    pub fn adopt_volume(&self, id: VolumeId, io: Arc<dyn StorageFile>) {
        let (file, counters) = counted(io);
        self.volume_io.lock().insert(id, counters);
        self.volumes.write().insert(id, file);
    }

    /// A retired volume leaves the table (nothing maps to it any more).
    pub fn forget_volume(&self, id: VolumeId) {
        self.quarantine.lock().retain(|e| e.volume != id);
        self.unzeroed.lock().retain(|e| e.volume != id);
        self.volumes.write().remove(&id);
        self.volume_io.lock().remove(&id);
        self.rings.lock().remove(&id);
    }

    /// The I/O counters of every volume in the table, read now.
    pub fn volume_io(&self) -> HashMap<VolumeId, IoSnapshot> {
        self.volume_io.lock().iter().map(|(&id, c)| (id, c.snapshot())).collect()
    }

    pub fn volume(&self, id: VolumeId) -> Result<Arc<dyn StorageFile>> {
        volume_of(&self.volumes.read(), id).cloned()
    }

    /// The volume table, read-locked, for a batch of positional I/O.
    pub fn volumes(&self) -> parking_lot::RwLockReadGuard<'_, Volumes> {
        self.volumes.read()
    }

    /// Commit an op, compacting the log when it has grown past its limit. Tracks the op
    /// frees go to the quarantine: they are punched and handed out again only once the log
    /// holds the op durably. An op that takes the quarantine past [`QUARANTINE_TRACKS_MAX`]
    /// settles it at once: a large free (an unlink's last close, a truncate) pays for its
    /// own sync and punch, as the backing file system's unlink or truncate pays for freeing
    /// its blocks, rather than the next writer whose allocation would settle it. On a
    /// backing file system mounted with `discard`, the punch of 256 MiB takes 70-80 ms, the
    /// same as its own `rm` of that much. If the settle fails, the quarantine stays, and
    /// the next allocation settles it (or reports why it cannot); the op itself is done.
    pub fn commit(&self, cat: &mut Store, op: Op) -> Result<Vec<Extent>> {
        let freed = self.commit_prezeroed(cat, op)?;
        if !freed.is_empty() {
            self.quarantine.lock().extend_from_slice(&freed);
            // Settles only past the cap: the plan is empty, so nothing overlaps.
            if let Err(e) = self.settle_quarantine(cat, &[]) {
                warn!("settling the quarantine of freed tracks (left to the next allocation): {e}");
            }
        }
        Ok(freed)
    }

    /// Commit an op whose freed tracks need no quarantine: the caller zeroed them already and
    /// no catalog that can survive a power cut maps them to a data set (a migration's
    /// source, set aside at its durable switch).
    pub fn commit_prezeroed(&self, cat: &mut Store, op: Op) -> Result<Vec<Extent>> {
        let freed = cat.commit(op)?;
        if cat.needs_compaction() {
            if let Err(e) = cat.compact() {
                warn!("catalog compaction failed (the log keeps growing): {e}");
            }
        }
        Ok(freed)
    }

    /// The free maps of `open` with the quarantined tracks taken out (cloned only for the
    /// volumes that have some), so that allocation can go around them while there is room;
    /// `None` when nothing is quarantined.
    pub fn free_outside_quarantine<'a>(&self, open: &[&'a FreeMap]) -> Option<Vec<Cow<'a, FreeMap>>> {
        let q = self.quarantine.lock();
        if q.is_empty() {
            return None;
        }
        let mut maps: Vec<Cow<'a, FreeMap>> = open.iter().map(|m| Cow::Borrowed(*m)).collect();
        for e in q.iter() {
            if let Some(m) = maps.iter_mut().find(|m| m.volume() == e.volume) {
                // Quarantined tracks are free in the catalog, whole.
                let _ = m.to_mut().take(e.first.0, e.count_tracks);
            }
        }
        Some(maps)
    }

    /// Before `plan` is handed out: if it takes quarantined tracks (or the quarantine has
    /// grown past [`QUARANTINE_TRACKS_MAX`]), make the log durable (so the ops that freed
    /// them survive any power cut; nothing to do if an application's sync did it already),
    /// then zero every quarantined track and flush. Tracks whose punch failed earlier are
    /// zeroed too. Called with the catalog lock held (as `cat`), so nothing else can
    /// allocate meanwhile.
    pub fn settle_quarantine(&self, cat: &mut Store, plan: &[Extent]) -> Result<()> {
        let held = {
            let mut q = self.quarantine.lock();
            let overlaps = q.iter().any(|u| plan.iter().any(|p| p.overlaps(u)));
            let settle = overlaps || q.iter().map(|e| e.count_tracks).sum::<u64>() > QUARANTINE_TRACKS_MAX;
            settle.then(|| std::mem::take(&mut *q))
        };
        if let Some(held) = &held {
            if let Err(e) = cat.sync_or_rewrite() {
                self.quarantine.lock().extend_from_slice(held);
                return Err(e.into());
            }
            self.punch_freed(held);
        }
        self.zero_unzeroed(plan)?;
        if let Some(held) = &held {
            self.flush_extents_volumes(held)?;
        }
        Ok(())
    }

    /// Flush the volumes that `extents` lie on. Zeroed tracks must read as zeros on the disk
    /// before a durable op can hand them to a data set whose own bytes may not get there.
    pub fn flush_extents_volumes(&self, extents: &[Extent]) -> Result<()> {
        let vols: std::collections::BTreeSet<VolumeId> = extents.iter().map(|e| e.volume).collect();
        for v in vols {
            self.volume(v)?.flush()?;
        }
        Ok(())
    }

    /// Zero freed tracks. One that fails stays on the `unzeroed` list: it is zeroed before it
    /// is handed out, or the allocation is refused.
    fn punch_freed(&self, extents: &[Extent]) {
        let g = self.geometry;
        for e in extents {
            let r =
                self.volume(e.volume).and_then(|v| Ok(v.punch(g.track_offset(e.first), g.bytes_of(e.count_tracks))?));
            if let Err(err) = r {
                warn!("zeroing freed tracks {}..{} of volume #{}: {err}", e.first.0, e.end().0, e.volume.0);
                self.unzeroed.lock().push(*e);
            }
        }
    }

    /// Zero the parts of `plan` still on the `unzeroed` list (a punch at free time failed).
    fn zero_unzeroed(&self, plan: &[Extent]) -> Result<()> {
        let g = self.geometry;
        let mut list = self.unzeroed.lock();
        if list.is_empty() {
            return Ok(());
        }
        let mut keep = Vec::new();
        for u in list.drain(..) {
            let hit = plan.iter().any(|p| p.overlaps(&u));
            if hit {
                let v = self.volume(u.volume)?;
                v.punch(g.track_offset(u.first), g.bytes_of(u.count_tracks))?;
                v.flush()?;
            } else {
                keep.push(u);
            }
        }
        *list = keep;
        Ok(())
    }

    /// fsync of a directory (or of any node that is not a data set): make every namespace
    /// change so far durable. Nothing to do when the log, or the rings' copies of its tail
    /// (catalog/ring.rs), already hold every frame: a database that fsyncs its journal and
    /// then the journal's directory pays one flush, not two. Otherwise the log is synced.
    pub fn fsyncdir(&self) -> Result<()> {
        if self.catalog.lock().all_durable() {
            return Ok(());
        }
        self.sync_log()
    }

    /// Make the log durable up to what is written now. A log whose write or sync failed is
    /// never synced again: the catalog is rewritten whole instead (a new snapshot and log).
    pub fn sync_log(&self) -> Result<()> {
        let point = {
            let mut cat = self.catalog.lock();
            if cat.log_failed() {
                cat.sync_or_rewrite()?;
                return Ok(());
            }
            cat.sync_point()
        };
        point.sync()?;
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod tests;
