//! The catalog model: paths, data sets, extents, volumes, and the one function that changes
//! them ([`Catalog::apply`]).
//!
//! Every change to the catalog is an [`Op`]. The live file system builds an op, appends it to
//! the log (store.rs) and then applies it; recovery replays the same ops through the same
//! `apply`. So the state after a crash is exactly the state after the last op whose frame
//! reached the log. `apply` validates everything it relies on and refuses an op that does not
//! fit the state (that can only mean a corrupt log or a bug), leaving the state unchanged.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use serde::{Deserialize, Serialize};

use super::acl;
use crate::geometry::Geometry;
use crate::layout::{Layout, LayoutError, Run};
use crate::space::{Extent, FreeMap, SpaceError, VolumeId};

pub type Ino = u64;
pub const ROOT_INO: Ino = 1;
/// The time now, as the catalog stores times: nanoseconds since the epoch.
pub fn now_ns() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as i64).unwrap_or(0)
}

/// The control directory at the root of every mount (fs/control.rs): no data set takes
/// this name there.
pub const CONTROL_DIR_NAME: &str = ".ferry";
/// Longest file name, as in every Linux file system.
pub const NAME_MAX_BYTES: usize = 255;
/// Longest symlink target (PATH_MAX - 1).
pub const SYMLINK_MAX_BYTES: usize = 4095;
/// Longest extended attribute name, prefix included (Linux's XATTR_NAME_MAX).
pub const XATTR_NAME_MAX_BYTES: usize = 255;
/// Largest extended attribute value (Linux's XATTR_SIZE_MAX): no setxattr(2) passes more.
pub const XATTR_VALUE_MAX_BYTES: usize = 65536;
/// Most bytes of extended attributes one node holds: the sum, over its attributes, of the
/// name, its NUL and the value. Three of the largest values fit, with room beside them for
/// small ones (ext4 holds one 4 KiB block, XFS and btrfs about one largest value); the cap
/// bounds what one node adds to the snapshot and to every compaction, and it is what ENOSPC
/// means for a setxattr.
pub const XATTR_NODE_MAX_BYTES: usize = 256 << 10;
/// Longest list of a node's attribute names (each with its NUL): listxattr(2) can't return
/// more than Linux's XATTR_LIST_MAX, so a node holds no more names than that.
pub const XATTR_LIST_MAX_BYTES: usize = 65536;
/// The attribute namespaces a node may hold: a name starts with one of these prefixes, or
/// is one of [`XATTR_SYSTEM_NAMES`]. Everything else is EOPNOTSUPP.
pub const XATTR_PREFIXES: [&str; 3] = ["user.", "trusted.", "security."];
/// The `system.` attributes stored: the POSIX ACLs, which the kernel enforces.
pub const XATTR_SYSTEM_NAMES: [&str; 2] = ["system.posix_acl_access", "system.posix_acl_default"];

/// Is `name` an attribute name the catalog stores (a known namespace, a non-empty rest, no
/// NUL, at most [`XATTR_NAME_MAX_BYTES`])?
pub fn xattr_name_valid(name: &[u8]) -> bool {
    name.len() <= XATTR_NAME_MAX_BYTES
        && !name.contains(&0)
        && (XATTR_SYSTEM_NAMES.iter().any(|n| n.as_bytes() == name)
            || XATTR_PREFIXES.iter().any(|p| name.len() > p.len() && name.starts_with(p.as_bytes())))
}

/// The bytes a node's attributes count against [`XATTR_NODE_MAX_BYTES`].
pub fn xattr_bytes(xattrs: &Xattrs) -> usize {
    xattrs.iter().map(|(n, v)| n.len() + 1 + v.len()).sum()
}

/// The bytes of a node's name list (each name with its NUL), as listxattr(2) returns it.
pub fn xattr_list_bytes(xattrs: &Xattrs) -> usize {
    xattrs.keys().map(|n| n.len() + 1).sum()
}

/// One node's extended attributes: name -> value, both raw bytes.
pub type Xattrs = BTreeMap<Vec<u8>, Vec<u8>>;

/// A file that holds no bytes of its own: the kernel serves its opens (a fifo's pipe, a
/// socket's listener, a device's driver).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum SpecialKind {
    Fifo,
    Socket,
    CharDev,
    BlockDev,
}

impl SpecialKind {
    /// The kind of a mknod(2) mode (its S_IFMT bits); `None` for a regular file, a
    /// directory or a symlink.
    pub fn of_mode(mode: u32) -> Option<SpecialKind> {
        match mode & libc::S_IFMT {
            libc::S_IFIFO => Some(SpecialKind::Fifo),
            libc::S_IFSOCK => Some(SpecialKind::Socket),
            libc::S_IFCHR => Some(SpecialKind::CharDev),
            libc::S_IFBLK => Some(SpecialKind::BlockDev),
            _ => None,
        }
    }

    pub fn is_device(self) -> bool {
        matches!(self, SpecialKind::CharDev | SpecialKind::BlockDev)
    }

    pub fn name(self) -> &'static str {
        match self {
            SpecialKind::Fifo => "fifo",
            SpecialKind::Socket => "socket",
            SpecialKind::CharDev => "char-device",
            SpecialKind::BlockDev => "block-device",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Meta {
    /// Permission bits (0o7777), without the file type.
    pub perm: u32,
    pub uid: u32,
    pub gid: u32,
    pub nlink: u32,
    pub atime_ns: i64,
    pub mtime_ns: i64,
    pub ctime_ns: i64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Body {
    Dir {
        parent: Ino,
        entries: BTreeMap<Vec<u8>, Ino>,
    },
    /// A data set: its logical tracks are mapped by `layout` or are holes (zeros); bytes at
    /// and past `size_bytes` are zero (the mapping may run past the size).
    File {
        size_bytes: u64,
        layout: Layout,
        /// Explicit preallocation (fallocate): the tracks below this logical track stay
        /// mapped past the size; only the implicit surplus of growth past
        /// `max(tracks of the size, prealloc_end)` is ever taken back. Never past the last
        /// mapped track: a truncate or a punch that unmaps the end lowers it.
        prealloc_end: u64,
    },
    Symlink {
        target: Vec<u8>,
    },
    /// A fifo, a socket or a device node: no tracks. `rdev` is the device number (the
    /// kernel's encoding, as stat(2) shows it) of a device, 0 for a fifo or a socket.
    Special {
        kind: SpecialKind,
        rdev: u32,
    },
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Inode {
    pub ino: Ino,
    pub meta: Meta,
    pub body: Body,
}

impl Inode {
    pub fn is_dir(&self) -> bool {
        matches!(self.body, Body::Dir { .. })
    }
    pub fn allocated_tracks(&self) -> u64 {
        match &self.body {
            Body::File { layout, .. } => layout.mapped_tracks(),
            _ => 0,
        }
    }
    /// Mapped tracks that hold the data set's bytes (below its size): what a migration moves.
    pub fn data_tracks(&self, g: Geometry) -> u64 {
        match &self.body {
            Body::File { layout, size_bytes, .. } => layout.mapped_in(0..g.tracks_for(*size_bytes)),
            _ => 0,
        }
    }
    /// The volume extents of a data set, in logical order (none for any other node).
    pub fn extents(&self) -> Vec<Extent> {
        match &self.body {
            Body::File { layout, .. } => layout.extents().collect(),
            _ => Vec::new(),
        }
    }
    pub fn size_bytes(&self) -> u64 {
        match &self.body {
            Body::File { size_bytes, .. } => *size_bytes,
            Body::Symlink { target } => target.len() as u64,
            Body::Dir { entries, .. } => entries.len() as u64,
            Body::Special { .. } => 0,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeRec {
    pub id: VolumeId,
    pub name: String,
    /// Absolute path of the image.
    pub path: String,
    pub size_bytes: u64,
    pub free: FreeMap,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum NewKind {
    Dir,
    File,
    Symlink { target: Vec<u8> },
    Special { kind: SpecialKind, rdev: u32 },
}

/// How a migration ends: `Live` holds writes for the switch; `Close` waits for the data set
/// to be closed and holds opens for the switch (the patent's downtime window).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Cutover {
    Live,
    Close,
}

impl Cutover {
    pub fn name(self) -> &'static str {
        match self {
            Cutover::Live => "live",
            Cutover::Close => "close",
        }
    }
}

/// A migration of one data set, as far as it must survive a crash: the private reservation
/// of its target (or, once switched, the source tracks it still has to free).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobRec {
    pub id: u64,
    pub ino: Ino,
    /// The path when the job started (for reports; the job follows the inode).
    pub path: String,
    /// The volumes the job may place the data set on.
    pub targets: Vec<VolumeId>,
    /// The reserved target tracks, at the logical tracks of the data set they will map. No
    /// data set owns them; no allocation can hand them out.
    pub target: Layout,
    /// After the switch: the tracks (source and unneeded target tail) to free once the
    /// switch is durable.
    pub release: Vec<Extent>,
    pub switched: bool,
    pub cutover: Cutover,
    /// Copy rate cap, bytes per second (0: none).
    pub rate_bytes_per_s: u64,
    /// The merge or drain plan this job belongs to.
    pub plan: Option<u64>,
    pub started_ns: i64,
    /// Compare source and target before the switch (`verify=yes`), also after a restart.
    pub verify: bool,
}

impl JobRec {
    /// A job just queued: no target reserved yet, nothing to release, live cutover, no cap,
    /// no plan, no verification. Callers set what differs with struct update syntax.
    pub fn queued(id: u64, ino: Ino, path: impl Into<String>, targets: Vec<VolumeId>) -> JobRec {
        JobRec {
            id,
            ino,
            path: path.into(),
            targets,
            target: Layout::default(),
            release: Vec::new(),
            switched: false,
            cutover: Cutover::Live,
            rate_bytes_per_s: 0,
            plan: None,
            started_ns: 0,
            verify: false,
        }
    }
}

/// How far a job's copy is known to be durable on its target, so that a crash resumes it
/// there instead of from the start (docs/design.md, "Resuming a job"). Kept beside the job
/// records (`Catalog::checkpoints`), not in [`JobRec`]: a postcard record has no optional
/// trailing field, and `JobRec` is also the payload of `Op::JobStart`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobCheckpoint {
    /// Logical tracks below this were copied to the target and flushed.
    pub copied_tracks: u64,
    /// The size of a write-intent region, in logical tracks.
    pub region_tracks: u64,
    /// Regions below `copied_tracks` whose target may differ from the source: written
    /// since their copy, or about to be (`Op::JobIntent`). Copied again when the job resumes.
    pub dirty_regions: BTreeSet<u64>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PlanKind {
    Merge,
    Drain,
}

impl PlanKind {
    pub fn name(self) -> &'static str {
        match self {
            PlanKind::Merge => "merge",
            PlanKind::Drain => "drain",
        }
    }
}

/// A merge or drain: move every data set off `sources` onto `targets`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlanRec {
    pub id: u64,
    pub kind: PlanKind,
    pub sources: Vec<VolumeId>,
    pub targets: Vec<VolumeId>,
    pub cutover: Cutover,
    pub rate_bytes_per_s: u64,
    pub started_ns: i64,
    /// Its jobs verify before they switch (`verify=yes`).
    pub verify: bool,
}

/// One change to the catalog; the payload of one log frame. docs/format.md draws each.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Op {
    AddVolume {
        id: VolumeId,
        name: String,
        path: String,
        size_bytes: u64,
        tracks_total: u64,
    },
    MakeNode {
        ino: Ino,
        parent: Ino,
        name: Vec<u8>,
        meta: Meta,
        kind: NewKind,
    },
    Link {
        ino: Ino,
        parent: Ino,
        name: Vec<u8>,
        time_ns: i64,
    },
    /// Removes a name: a file's or symlink's link, or an empty directory. An inode left with
    /// no link stays (an orphan, still open somewhere) until [`Op::Destroy`].
    Unlink {
        parent: Ino,
        name: Vec<u8>,
        time_ns: i64,
    },
    /// Moves `name` to `new_name`, replacing what is there (its link is dropped), or with
    /// `exchange` swaps the two.
    Rename {
        parent: Ino,
        name: Vec<u8>,
        new_parent: Ino,
        new_name: Vec<u8>,
        exchange: bool,
        time_ns: i64,
    },
    SetMeta {
        ino: Ino,
        perm: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        atime_ns: Option<i64>,
        mtime_ns: Option<i64>,
        ctime_ns: i64,
    },
    /// A data set's size changed (write past the end, truncate, fallocate).
    SetSize {
        ino: Ino,
        size_bytes: u64,
        mtime_ns: i64,
    },
    /// Extents appended after a data set's last mapped track (an extent contiguous with the
    /// last one merges).
    Grow {
        ino: Ino,
        extents: Vec<Extent>,
    },
    /// Keep the first `keep_tracks` logical tracks of a data set, free the rest (and lower
    /// its preallocation to what stays mapped).
    Trim {
        ino: Ino,
        keep_tracks: u64,
    },
    /// Remove an inode with no links and free its tracks.
    Destroy {
        ino: Ino,
    },
    /// A migration starts: its target tracks are taken from the free space, privately.
    JobStart {
        job: JobRec,
    },
    /// More target tracks for a job whose data set grew, appended after the target's last
    /// mapped track. (Logs of format version 3 and before; new jobs map with [`Op::JobMap`].)
    JobGrow {
        job: u64,
        extents: Vec<Extent>,
    },
    /// The catalog switch: the data set's extents become the first tracks of the target
    /// (as many as it holds now); its old extents and the unneeded target tail are kept
    /// aside until [`Op::JobRelease`].
    JobSwitch {
        job: u64,
    },
    /// After the switch is durable: free what the switch set aside, and forget the job.
    JobRelease {
        job: u64,
    },
    /// A job that never switched is rolled back: its target is freed, the source is untouched.
    JobCancel {
        job: u64,
    },
    /// A merge or drain starts: its source volumes stop taking new allocations.
    PlanStart {
        plan: PlanRec,
    },
    /// A plan ends. `reopen` gives the sources back to allocation (a cancelled plan); a
    /// finished plan leaves them closed and empty, ready to retire.
    PlanEnd {
        plan: u64,
        reopen: bool,
    },
    /// An empty volume leaves the pool.
    RemoveVolume {
        id: VolumeId,
    },
    /// A closed volume (a finished plan's source) takes allocations again.
    ReopenVolume {
        id: VolumeId,
    },
    /// Set an extended attribute of a node (created or replaced).
    SetXattr {
        ino: Ino,
        name: Vec<u8>,
        value: Vec<u8>,
        ctime_ns: i64,
    },
    /// Remove an extended attribute of a node.
    RemoveXattr {
        ino: Ino,
        name: Vec<u8>,
        ctime_ns: i64,
    },
    /// [`Op::MakeNode`] with the node's first attributes (the ACLs it inherits from its
    /// directory's default ACL), in one frame: a power cut keeps both or neither.
    MakeNodeXattrs {
        ino: Ino,
        parent: Ino,
        name: Vec<u8>,
        meta: Meta,
        kind: NewKind,
        xattrs: Xattrs,
    },
    /// Map holes of a data set (a write or fallocate into them, or growth past its end), and
    /// raise its explicit preallocation to `prealloc_end` (0: unchanged).
    Map {
        ino: Ino,
        runs: Vec<Run>,
        prealloc_end: u64,
    },
    /// Unmap logical tracks `first..end` of a data set (a punched hole): their tracks are freed.
    Unmap {
        ino: Ino,
        first: u64,
        end: u64,
    },
    /// Reserve target tracks for a job at the given logical tracks of its data set.
    JobMap {
        job: u64,
        runs: Vec<Run>,
    },
    /// A job's copy reached `copied_tracks` and its target was flushed: the checkpoint
    /// replaces the job's last one, dirty regions and all.
    JobCheckpoint {
        job: u64,
        copied_tracks: u64,
        region_tracks: u64,
        dirty_regions: Vec<u64>,
    },
    /// Before a write changes tracks below a job's checkpoint, in regions the checkpoint
    /// holds clean: those regions join its dirty set (synced before the write is made).
    JobIntent {
        job: u64,
        regions: Vec<u64>,
    },
    /// A device volume was found by its label at another path (device names change): the
    /// catalog records where it is now.
    SetVolumePath {
        id: VolumeId,
        path: String,
    },
}

impl Op {
    /// A data set's contents changed at `time_ns` (mtime and ctime).
    pub fn set_mtime(ino: Ino, time_ns: i64) -> Op {
        Op::SetMeta {
            ino,
            perm: None,
            uid: None,
            gid: None,
            atime_ns: None,
            mtime_ns: Some(time_ns),
            ctime_ns: time_ns,
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ApplyError {
    #[error("no inode {0}")]
    NoInode(Ino),
    #[error("inode {0} is not a directory")]
    NotDir(Ino),
    #[error("inode {0} is not a data set")]
    NotFile(Ino),
    #[error("no entry {name:?} in directory {parent}")]
    NoEntry { parent: Ino, name: String },
    #[error("entry {name:?} already exists in directory {parent}")]
    Exists { parent: Ino, name: String },
    #[error("directory {0} is not empty")]
    NotEmpty(Ino),
    #[error("inode {0} already exists")]
    InoInUse(Ino),
    #[error("inode {0} still has links")]
    StillLinked(Ino),
    #[error("no volume {0}")]
    NoVolume(u32),
    #[error("volume {0} already exists")]
    VolumeExists(String),
    #[error("no job {0}")]
    NoJob(u64),
    #[error("job {0} already exists")]
    JobExists(u64),
    #[error("job {0} has already switched")]
    JobSwitched(u64),
    #[error("job {0} has no checkpoint (or one with regions of no tracks)")]
    NoCheckpoint(u64),
    #[error("no plan {0}")]
    NoPlan(u64),
    #[error("plan {0} already exists")]
    PlanExists(u64),
    #[error("volume {0} is not empty")]
    VolumeInUse(String),
    #[error("volume {0} can't be reopened: it is not closed, or a plan is emptying it")]
    NotReopenable(String),
    #[error("data set {ino}: a trim to {tracks} tracks would cut into its {size_bytes} bytes")]
    BeyondAllocation { ino: Ino, size_bytes: u64, tracks: u64 },
    #[error("data set {ino}: {source}")]
    Layout { ino: Ino, source: LayoutError },
    #[error("job {job}: the target does not map logical tracks {first}..{end} of the data set")]
    TargetMissing { job: u64, first: u64, end: u64 },
    #[error("inode {ino} has no extended attribute {name:?}")]
    NoXattr { ino: Ino, name: String },
    #[error(transparent)]
    Space(#[from] SpaceError),
}

fn name_str(name: &[u8]) -> String {
    String::from_utf8_lossy(name).into_owned()
}

/// The whole catalog, in memory. Serialized as is into snapshots (less its [`CatalogIndex`],
/// which is rebuilt when a catalog is read).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "CatalogRecord")]
pub struct Catalog {
    pub geometry: Geometry,
    pub next_ino: Ino,
    pub next_volume: u32,
    pub volumes: BTreeMap<VolumeId, VolumeRec>,
    pub inodes: HashMap<Ino, Inode>,
    /// Jobs and plans count from 1 and are never reused.
    pub next_job: u64,
    pub jobs: BTreeMap<u64, JobRec>,
    pub plans: BTreeMap<u64, PlanRec>,
    /// Volumes that take no new allocation (the sources of a plan, running or finished).
    pub closed_volumes: BTreeSet<VolumeId>,
    /// Extended attributes, by inode; a node with none has no entry. (Beside the inodes
    /// rather than in them, so that an inode's encoding is the same as in version 2.)
    pub xattrs: HashMap<Ino, Xattrs>,
    /// The checkpoints of jobs that have not switched (since version 4), by job id.
    pub checkpoints: BTreeMap<u64, JobCheckpoint>,
    /// What the reports ask of the whole catalog, kept as ops apply: never stored.
    #[serde(skip)]
    index: CatalogIndex,
}

/// A [`Catalog`] as a snapshot stores it (docs/format.md): the fields in this order.
#[derive(Deserialize)]
pub(crate) struct CatalogRecord {
    pub geometry: Geometry,
    pub next_ino: Ino,
    pub next_volume: u32,
    pub volumes: BTreeMap<VolumeId, VolumeRec>,
    pub inodes: InodeTable,
    pub next_job: u64,
    pub jobs: BTreeMap<u64, JobRec>,
    pub plans: BTreeMap<u64, PlanRec>,
    pub closed_volumes: BTreeSet<VolumeId>,
    pub xattrs: HashMap<Ino, Xattrs>,
    pub checkpoints: BTreeMap<u64, JobCheckpoint>,
}

/// A snapshot's inode table, with its data sets counted (per volume too) as each inode is
/// read, while its layout is still in the CPU's caches: a second walk of 10^6 inodes in hash
/// order, after the table is built, costs a cache miss per data set at every mount.
pub(crate) struct InodeTable {
    pub inodes: HashMap<Ino, Inode>,
    data_sets: u64,
    data_sets_on: BTreeMap<VolumeId, u64>,
}

impl From<HashMap<Ino, Inode>> for InodeTable {
    fn from(inodes: HashMap<Ino, Inode>) -> InodeTable {
        let mut t = InodeTable { inodes: HashMap::new(), data_sets: 0, data_sets_on: BTreeMap::new() };
        let mut spread = Vec::new();
        for i in inodes.values() {
            t.count(i, &mut spread, true);
        }
        t.inodes = inodes;
        t
    }
}

impl InodeTable {
    /// Count data set `i` in (`add`) or out.
    fn count(&mut self, i: &Inode, spread: &mut Vec<VolumeId>, add: bool) {
        let Body::File { layout, .. } = &i.body else { return };
        volumes_of(layout, spread);
        if add {
            self.data_sets += 1;
            for &v in spread.iter() {
                *self.data_sets_on.entry(v).or_default() += 1;
            }
        } else {
            self.data_sets -= 1;
            for v in spread.iter() {
                if let Some(n) = self.data_sets_on.get_mut(v) {
                    *n -= 1;
                    if *n == 0 {
                        self.data_sets_on.remove(v);
                    }
                }
            }
        }
    }
}

impl<'de> Deserialize<'de> for InodeTable {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<InodeTable, D::Error> {
        struct Table;
        impl<'de> serde::de::Visitor<'de> for Table {
            type Value = InodeTable;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a map of inodes")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut m: A) -> Result<InodeTable, A::Error> {
                // As the generic decoder does: trust the stated count only so far.
                let first = m.size_hint().unwrap_or(0).min(1 << 12);
                let mut t =
                    InodeTable { inodes: HashMap::with_capacity(first), data_sets: 0, data_sets_on: BTreeMap::new() };
                let mut spread = Vec::new();
                while let Some((ino, inode)) = m.next_entry::<Ino, Inode>()? {
                    t.count(&inode, &mut spread, true);
                    if let Some(old) = t.inodes.insert(ino, inode) {
                        // A repeated key (never written): the last one wins, as it always did.
                        t.count(&old, &mut spread, false);
                    }
                }
                Ok(t)
            }
        }
        d.deserialize_map(Table)
    }
}

impl From<CatalogRecord> for Catalog {
    fn from(r: CatalogRecord) -> Catalog {
        let mut c = Catalog {
            geometry: r.geometry,
            next_ino: r.next_ino,
            next_volume: r.next_volume,
            volumes: r.volumes,
            inodes: r.inodes.inodes,
            next_job: r.next_job,
            jobs: r.jobs,
            plans: r.plans,
            closed_volumes: r.closed_volumes,
            xattrs: r.xattrs,
            checkpoints: r.checkpoints,
            index: CatalogIndex::default(),
        };
        c.index = CatalogIndex {
            data_sets: r.inodes.data_sets,
            data_sets_on: r.inodes.data_sets_on,
            volume_names: CatalogIndex::of_names(&c),
        };
        c
    }
}

/// What is asked of the whole catalog again and again, kept up to date by [`Catalog::apply`]
/// so that a read costs O(volumes) or less, not O(data sets): the data sets on each volume (a read of `.ferry/status` walked every data set under the catalog lock) and
/// the volumes by name (an offline `volume add` replays every earlier add, and each looked
/// for its name among all the volumes before it). [`CatalogIndex::of`] counts it all again;
/// fsck compares the two.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CatalogIndex {
    /// Data sets (regular files, linked or not).
    pub data_sets: u64,
    /// Data sets with at least one track on each volume; a volume with none has no entry.
    pub data_sets_on: BTreeMap<VolumeId, u64>,
    pub volume_names: HashMap<String, VolumeId>,
}

impl CatalogIndex {
    /// The index of `c`, counted from scratch.
    pub fn of(c: &Catalog) -> CatalogIndex {
        let mut x = CatalogIndex { volume_names: Self::of_names(c), ..Default::default() };
        let mut spread = Vec::new();
        for i in c.inodes.values() {
            let Body::File { layout, .. } = &i.body else { continue };
            x.data_sets += 1;
            volumes_of(layout, &mut spread);
            for &v in &spread {
                *x.data_sets_on.entry(v).or_default() += 1;
            }
        }
        x
    }

    /// The volumes of `c` by name, from scratch.
    pub fn of_names(c: &Catalog) -> HashMap<String, VolumeId> {
        c.volumes.values().map(|v| (v.name.clone(), v.id)).collect()
    }

    /// A data set's volumes went from `before` to `after` (each sorted, no repeats).
    fn moved(&mut self, before: &[VolumeId], after: &[VolumeId]) {
        for v in before.iter().filter(|v| after.binary_search(v).is_err()) {
            if let Some(n) = self.data_sets_on.get_mut(v) {
                *n -= 1;
                if *n == 0 {
                    self.data_sets_on.remove(v);
                }
            }
        }
        for &v in after.iter().filter(|v| before.binary_search(v).is_err()) {
            *self.data_sets_on.entry(v).or_default() += 1;
        }
    }
}

/// The volumes `layout` has tracks on, sorted, each once, into `out`. No allocation beyond
/// `out`'s for the common data set, whose extents all lie on one volume.
pub(crate) fn volumes_of(layout: &Layout, out: &mut Vec<VolumeId>) {
    out.clear();
    let mut extents = layout.extents();
    let Some(first) = extents.next() else { return };
    out.push(first.volume);
    if extents.all(|e| e.volume == first.volume) {
        return;
    }
    out.extend(layout.extents().map(|e| e.volume));
    out.sort_unstable();
    out.dedup();
}

/// What an applied op released, for the caller to punch after the op is durable.
pub type Freed = Vec<Extent>;

impl Catalog {
    pub fn new(geometry: Geometry, mut root_meta: Meta) -> Catalog {
        root_meta.nlink = 2;
        let mut inodes = HashMap::new();
        inodes.insert(
            ROOT_INO,
            Inode { ino: ROOT_INO, meta: root_meta, body: Body::Dir { parent: ROOT_INO, entries: BTreeMap::new() } },
        );
        Catalog {
            geometry,
            next_ino: ROOT_INO + 1,
            next_volume: 1,
            volumes: BTreeMap::new(),
            inodes,
            next_job: 1,
            jobs: BTreeMap::new(),
            plans: BTreeMap::new(),
            closed_volumes: BTreeSet::new(),
            xattrs: HashMap::new(),
            checkpoints: BTreeMap::new(),
            index: CatalogIndex::default(),
        }
    }

    /// What [`Catalog::apply`] keeps counted (fsck compares it with [`CatalogIndex::of`]).
    pub fn index(&self) -> &CatalogIndex {
        &self.index
    }

    /// Data sets (regular files, linked or not) in the catalog.
    pub fn data_set_count(&self) -> u64 {
        self.index.data_sets
    }

    /// Data sets with at least one track on volume `id`.
    pub fn data_sets_on(&self, id: VolumeId) -> u64 {
        self.index.data_sets_on.get(&id).copied().unwrap_or(0)
    }

    pub fn get(&self, ino: Ino) -> Option<&Inode> {
        self.inodes.get(&ino)
    }

    pub fn lookup(&self, parent: Ino, name: &[u8]) -> Option<Ino> {
        match &self.inodes.get(&parent)?.body {
            Body::Dir { entries, .. } => entries.get(name).copied(),
            _ => None,
        }
    }

    /// Is directory `dir` the directory `ancestor` or below it?
    pub fn is_within(&self, dir: Ino, ancestor: Ino) -> bool {
        let mut at = dir;
        loop {
            if at == ancestor {
                return true;
            }
            match self.inodes.get(&at).map(|i| &i.body) {
                Some(Body::Dir { parent, .. }) if *parent != at => at = *parent,
                _ => return false,
            }
        }
    }

    pub fn volume_by_name(&self, name: &str) -> Option<&VolumeRec> {
        self.volumes.get(self.index.volume_names.get(name)?)
    }

    fn inode_mut(&mut self, ino: Ino) -> Result<&mut Inode, ApplyError> {
        self.inodes.get_mut(&ino).ok_or(ApplyError::NoInode(ino))
    }

    fn entries_mut(&mut self, dir: Ino) -> Result<&mut BTreeMap<Vec<u8>, Ino>, ApplyError> {
        match &mut self.inode_mut(dir)?.body {
            Body::Dir { entries, .. } => Ok(entries),
            _ => Err(ApplyError::NotDir(dir)),
        }
    }

    fn entry(&self, parent: Ino, name: &[u8]) -> Result<Ino, ApplyError> {
        match &self.inodes.get(&parent).ok_or(ApplyError::NoInode(parent))?.body {
            Body::Dir { entries, .. } => {
                entries.get(name).copied().ok_or(ApplyError::NoEntry { parent, name: name_str(name) })
            }
            _ => Err(ApplyError::NotDir(parent)),
        }
    }

    fn touch_dir(&mut self, dir: Ino, time_ns: i64) {
        if let Some(d) = self.inodes.get_mut(&dir) {
            d.meta.mtime_ns = time_ns;
            d.meta.ctime_ns = time_ns;
        }
    }

    fn free_extents(&mut self, extents: &[Extent]) -> Result<(), ApplyError> {
        for e in extents {
            let v = self.volumes.get_mut(&e.volume).ok_or(ApplyError::NoVolume(e.volume.0))?;
            v.free.give(e.first.0, e.count_tracks)?;
        }
        Ok(())
    }

    /// Check that `op` fits the current state, without changing anything.
    pub fn check(&self, op: &Op) -> Result<(), ApplyError> {
        match op {
            Op::AddVolume { id, name, .. } => {
                if self.volumes.contains_key(id) || self.volume_by_name(name).is_some() {
                    return Err(ApplyError::VolumeExists(name.clone()));
                }
            }
            Op::MakeNode { ino, parent, name, .. } | Op::MakeNodeXattrs { ino, parent, name, .. } => {
                if self.inodes.contains_key(ino) {
                    return Err(ApplyError::InoInUse(*ino));
                }
                if self.lookup(parent_checked(self, *parent)?, name).is_some() {
                    return Err(ApplyError::Exists { parent: *parent, name: name_str(name) });
                }
            }
            Op::Link { ino, parent, name, .. } => {
                let i = self.inodes.get(ino).ok_or(ApplyError::NoInode(*ino))?;
                if i.is_dir() {
                    return Err(ApplyError::NotFile(*ino));
                }
                if self.lookup(parent_checked(self, *parent)?, name).is_some() {
                    return Err(ApplyError::Exists { parent: *parent, name: name_str(name) });
                }
            }
            Op::Unlink { parent, name, .. } => {
                let ino = self.entry(*parent, name)?;
                if let Some(Body::Dir { entries, .. }) = self.inodes.get(&ino).map(|i| &i.body) {
                    if !entries.is_empty() {
                        return Err(ApplyError::NotEmpty(ino));
                    }
                }
            }
            Op::Rename { parent, name, new_parent, new_name, exchange, .. } => {
                self.entry(*parent, name)?;
                parent_checked(self, *new_parent)?;
                match self.lookup(*new_parent, new_name) {
                    Some(target) if !*exchange => {
                        if let Some(Body::Dir { entries, .. }) = self.inodes.get(&target).map(|i| &i.body) {
                            if !entries.is_empty() {
                                return Err(ApplyError::NotEmpty(target));
                            }
                        }
                    }
                    None if *exchange => {
                        return Err(ApplyError::NoEntry { parent: *new_parent, name: name_str(new_name) })
                    }
                    _ => {}
                }
            }
            Op::SetMeta { ino, .. } | Op::SetXattr { ino, .. } => {
                self.inodes.get(ino).ok_or(ApplyError::NoInode(*ino))?;
            }
            Op::RemoveXattr { ino, name, .. } => {
                self.inodes.get(ino).ok_or(ApplyError::NoInode(*ino))?;
                if !self.xattrs.get(ino).is_some_and(|x| x.contains_key(name)) {
                    return Err(ApplyError::NoXattr { ino: *ino, name: name_str(name) });
                }
            }
            Op::SetSize { ino, .. } => file_checked(self, *ino)?,
            // A trim takes back tracks past the bytes, never the bytes. (Checked for new ops
            // only; replay takes the log as it is, and fsck says what is wrong.)
            Op::Trim { ino, keep_tracks } => {
                file_checked(self, *ino)?;
                let size_bytes = self.inodes[ino].size_bytes();
                if size_bytes > self.geometry.bytes_of(*keep_tracks) {
                    return Err(ApplyError::BeyondAllocation { ino: *ino, size_bytes, tracks: *keep_tracks });
                }
            }
            Op::Map { ino, runs, .. } => {
                let layout = layout_of(self, *ino)?;
                layout.check_insert(runs).map_err(|source| ApplyError::Layout { ino: *ino, source })?;
                self.check_free(&runs.iter().map(|r| r.extent).collect::<Vec<_>>())?;
            }
            Op::Unmap { ino, .. } => file_checked(self, *ino)?,
            Op::JobMap { job, runs } => {
                let j = self.jobs.get(job).ok_or(ApplyError::NoJob(*job))?;
                if j.switched {
                    return Err(ApplyError::JobSwitched(*job));
                }
                j.target.check_insert(runs).map_err(|source| ApplyError::Layout { ino: j.ino, source })?;
                self.check_free(&runs.iter().map(|r| r.extent).collect::<Vec<_>>())?;
            }
            Op::Grow { ino, extents } => {
                file_checked(self, *ino)?;
                self.check_free(extents)?;
            }
            Op::Destroy { ino } => {
                let i = self.inodes.get(ino).ok_or(ApplyError::NoInode(*ino))?;
                if i.meta.nlink != 0 {
                    return Err(ApplyError::StillLinked(*ino));
                }
            }
            Op::JobStart { job } => {
                if self.jobs.contains_key(&job.id) {
                    return Err(ApplyError::JobExists(job.id));
                }
                file_checked(self, job.ino)?;
                job.target.check().map_err(|source| ApplyError::Layout { ino: job.ino, source })?;
                self.check_free(&job.target.extents().collect::<Vec<_>>())?;
            }
            Op::JobGrow { job, extents } => {
                let j = self.jobs.get(job).ok_or(ApplyError::NoJob(*job))?;
                if j.switched {
                    return Err(ApplyError::JobSwitched(*job));
                }
                self.check_free(extents)?;
            }
            Op::JobSwitch { job } => {
                let j = self.jobs.get(job).ok_or(ApplyError::NoJob(*job))?;
                if j.switched {
                    return Err(ApplyError::JobSwitched(*job));
                }
                // Every mapped track of the data set has its target track.
                for r in layout_of(self, j.ino)?.runs() {
                    if let Some(h) = j.target.holes_in(r.logical..r.end()).first() {
                        return Err(ApplyError::TargetMissing { job: *job, first: h.start, end: h.end });
                    }
                }
            }
            Op::JobRelease { job } => {
                let j = self.jobs.get(job).ok_or(ApplyError::NoJob(*job))?;
                if !j.switched {
                    return Err(ApplyError::NoJob(*job));
                }
            }
            Op::JobCancel { job } => {
                let j = self.jobs.get(job).ok_or(ApplyError::NoJob(*job))?;
                if j.switched {
                    return Err(ApplyError::JobSwitched(*job));
                }
            }
            Op::JobCheckpoint { job, region_tracks, .. } => {
                let j = self.jobs.get(job).ok_or(ApplyError::NoJob(*job))?;
                if j.switched {
                    return Err(ApplyError::JobSwitched(*job));
                }
                if *region_tracks == 0 {
                    return Err(ApplyError::NoCheckpoint(*job));
                }
            }
            Op::JobIntent { job, .. } => {
                let j = self.jobs.get(job).ok_or(ApplyError::NoJob(*job))?;
                if j.switched {
                    return Err(ApplyError::JobSwitched(*job));
                }
                if !self.checkpoints.contains_key(job) {
                    return Err(ApplyError::NoCheckpoint(*job));
                }
            }
            Op::PlanStart { plan } => {
                if self.plans.contains_key(&plan.id) {
                    return Err(ApplyError::PlanExists(plan.id));
                }
                for v in plan.sources.iter().chain(&plan.targets) {
                    self.volumes.get(v).ok_or(ApplyError::NoVolume(v.0))?;
                }
            }
            Op::PlanEnd { plan, .. } => {
                self.plans.get(plan).ok_or(ApplyError::NoPlan(*plan))?;
            }
            Op::SetVolumePath { id, .. } => {
                self.volumes.get(id).ok_or(ApplyError::NoVolume(id.0))?;
            }
            Op::RemoveVolume { id } => {
                let v = self.volumes.get(id).ok_or(ApplyError::NoVolume(id.0))?;
                if v.free.free_tracks() != v.free.tracks_total() || self.plans.values().any(|p| p.targets.contains(id))
                {
                    return Err(ApplyError::VolumeInUse(v.name.clone()));
                }
            }
            Op::ReopenVolume { id } => {
                let v = self.volumes.get(id).ok_or(ApplyError::NoVolume(id.0))?;
                if !self.closed_volumes.contains(id) || self.plans.values().any(|p| p.sources.contains(id)) {
                    return Err(ApplyError::NotReopenable(v.name.clone()));
                }
            }
        }
        Ok(())
    }

    fn check_free(&self, extents: &[Extent]) -> Result<(), ApplyError> {
        for e in extents {
            let v = self.volumes.get(&e.volume).ok_or(ApplyError::NoVolume(e.volume.0))?;
            if v.free.free_run_at(e.first.0) < e.count_tracks {
                let (first, end) = (e.first.0, e.first.0 + e.count_tracks);
                return Err(SpaceError::NotFree { volume: e.volume, first, end }.into());
            }
        }
        Ok(())
    }

    fn take_extents(&mut self, extents: &[Extent]) -> Result<(), ApplyError> {
        for e in extents {
            self.volumes
                .get_mut(&e.volume)
                .ok_or(ApplyError::NoVolume(e.volume.0))?
                .free
                .take(e.first.0, e.count_tracks)?;
        }
        Ok(())
    }

    /// Volumes that may take new allocations.
    pub fn open_volumes(&self) -> impl Iterator<Item = &VolumeRec> + Clone {
        self.volumes.values().filter(|v| !self.closed_volumes.contains(&v.id))
    }

    /// The job migrating `ino`, if any.
    pub fn job_of(&self, ino: Ino) -> Option<&JobRec> {
        self.jobs.values().find(|j| j.ino == ino)
    }

    /// Apply one op. On error nothing changed.
    pub fn apply(&mut self, op: &Op) -> Result<Freed, ApplyError> {
        self.check(op)?;
        // The one data set whose tracks the op may move between volumes, and its volumes
        // before the op.
        let moved = match op {
            Op::Grow { ino, .. }
            | Op::Trim { ino, .. }
            | Op::Map { ino, .. }
            | Op::Unmap { ino, .. }
            | Op::Destroy { ino } => Some(*ino),
            Op::JobSwitch { job } => self.jobs.get(job).map(|j| j.ino),
            _ => None,
        };
        let mut before = Vec::new();
        if let Some(Inode { body: Body::File { layout, .. }, .. }) = moved.and_then(|ino| self.inodes.get(&ino)) {
            volumes_of(layout, &mut before);
        }
        let was_file = match op {
            Op::Destroy { ino } => matches!(self.inodes.get(ino), Some(Inode { body: Body::File { .. }, .. })),
            _ => false,
        };
        let removed_name = match op {
            Op::RemoveVolume { id } => self.volumes.get(id).map(|v| v.name.clone()),
            _ => None,
        };
        let freed = self.apply_checked(op)?;
        match op {
            Op::AddVolume { id, name, .. } => {
                self.index.volume_names.insert(name.clone(), *id);
            }
            Op::RemoveVolume { .. } => {
                if let Some(name) = removed_name {
                    self.index.volume_names.remove(&name);
                }
            }
            Op::MakeNode { kind: NewKind::File, .. } | Op::MakeNodeXattrs { kind: NewKind::File, .. } => {
                self.index.data_sets += 1;
            }
            Op::Destroy { .. } if was_file => self.index.data_sets -= 1,
            _ => {}
        }
        if let Some(ino) = moved {
            let mut after = Vec::new();
            if let Some(Inode { body: Body::File { layout, .. }, .. }) = self.inodes.get(&ino) {
                volumes_of(layout, &mut after);
            }
            if before != after {
                self.index.moved(&before, &after);
            }
        }
        Ok(freed)
    }

    /// [`Catalog::apply`] of an op that [`Catalog::check`] passed, less the index.
    fn apply_checked(&mut self, op: &Op) -> Result<Freed, ApplyError> {
        let mut freed = Vec::new();
        match op.clone() {
            Op::AddVolume { id, name, path, size_bytes, tracks_total } => {
                self.next_volume = self.next_volume.max(id.0 + 1);
                self.volumes.insert(id, VolumeRec { id, name, path, size_bytes, free: FreeMap::new(id, tracks_total) });
            }
            Op::MakeNode { ino, parent, name, mut meta, kind } => {
                let time_ns = meta.ctime_ns;
                let body = match kind {
                    NewKind::Dir => {
                        meta.nlink = 2;
                        self.inode_mut(parent)?.meta.nlink += 1;
                        Body::Dir { parent, entries: BTreeMap::new() }
                    }
                    NewKind::File => {
                        meta.nlink = 1;
                        Body::File { size_bytes: 0, layout: Layout::default(), prealloc_end: 0 }
                    }
                    NewKind::Symlink { target } => {
                        meta.nlink = 1;
                        Body::Symlink { target }
                    }
                    NewKind::Special { kind, rdev } => {
                        meta.nlink = 1;
                        Body::Special { kind, rdev }
                    }
                };
                self.entries_mut(parent)?.insert(name, ino);
                self.inodes.insert(ino, Inode { ino, meta, body });
                self.next_ino = self.next_ino.max(ino + 1);
                self.touch_dir(parent, time_ns);
            }
            Op::Link { ino, parent, name, time_ns } => {
                self.entries_mut(parent)?.insert(name, ino);
                let i = self.inode_mut(ino)?;
                i.meta.nlink += 1;
                i.meta.ctime_ns = time_ns;
                self.touch_dir(parent, time_ns);
            }
            Op::Unlink { parent, name, time_ns } => {
                let ino = self.entries_mut(parent)?.remove(&name).expect("checked");
                self.drop_link(parent, ino, time_ns)?;
                self.touch_dir(parent, time_ns);
            }
            Op::Rename { parent, name, new_parent, new_name, exchange, time_ns } => {
                let src = self.entry(parent, &name)?;
                let dst = self.lookup(new_parent, &new_name);
                if exchange {
                    let dst = dst.expect("checked");
                    self.entries_mut(parent)?.insert(name, dst);
                    self.entries_mut(new_parent)?.insert(new_name, src);
                    self.reparent(dst, parent, new_parent)?;
                    self.reparent(src, new_parent, parent)?;
                } else {
                    self.entries_mut(parent)?.remove(&name);
                    if let Some(dst) = dst {
                        self.drop_link(new_parent, dst, time_ns)?;
                    }
                    self.entries_mut(new_parent)?.insert(new_name, src);
                    self.reparent(src, new_parent, parent)?;
                }
                if let Some(i) = self.inodes.get_mut(&src) {
                    i.meta.ctime_ns = time_ns;
                }
                self.touch_dir(parent, time_ns);
                self.touch_dir(new_parent, time_ns);
            }
            Op::SetMeta { ino, perm, uid, gid, atime_ns, mtime_ns, ctime_ns } => {
                // A chmod rewrites the access ACL to say the same as the new bits.
                if let (Some(p), Some(x)) = (perm, self.xattrs.get_mut(&ino)) {
                    if let Some(a) = x.get_mut(acl::ACL_ACCESS) {
                        *a = acl::chmod(a, p);
                    }
                }
                let m = &mut self.inode_mut(ino)?.meta;
                if let Some(p) = perm {
                    m.perm = p & 0o7777;
                }
                if let Some(u) = uid {
                    m.uid = u;
                }
                if let Some(g) = gid {
                    m.gid = g;
                }
                if let Some(t) = atime_ns {
                    m.atime_ns = t;
                }
                if let Some(t) = mtime_ns {
                    m.mtime_ns = t;
                }
                m.ctime_ns = ctime_ns;
            }
            Op::SetSize { ino, size_bytes, mtime_ns } => {
                let i = self.inode_mut(ino)?;
                i.meta.mtime_ns = mtime_ns;
                i.meta.ctime_ns = mtime_ns;
                if let Body::File { size_bytes: s, .. } = &mut i.body {
                    *s = size_bytes;
                }
            }
            Op::Grow { ino, extents } => {
                self.take_extents(&extents)?;
                if let Body::File { layout, .. } = &mut self.inode_mut(ino)?.body {
                    layout.append(&extents);
                }
            }
            Op::Trim { ino, keep_tracks } => {
                if let Body::File { layout, prealloc_end, .. } = &mut self.inode_mut(ino)?.body {
                    freed = layout.trim(keep_tracks);
                    *prealloc_end = (*prealloc_end).min(layout.end());
                }
                self.free_extents(&freed)?;
            }
            Op::Map { ino, runs, prealloc_end: p } => {
                self.take_extents(&runs.iter().map(|r| r.extent).collect::<Vec<_>>())?;
                if let Body::File { layout, prealloc_end, .. } = &mut self.inode_mut(ino)?.body {
                    layout.insert(&runs);
                    *prealloc_end = (*prealloc_end).max(p);
                }
            }
            Op::Unmap { ino, first, end } => {
                if let Body::File { layout, prealloc_end, .. } = &mut self.inode_mut(ino)?.body {
                    freed = layout.unmap(first..end);
                    *prealloc_end = (*prealloc_end).min(layout.end());
                }
                self.free_extents(&freed)?;
            }
            Op::Destroy { ino } => {
                let i = self.inodes.remove(&ino).expect("checked");
                self.xattrs.remove(&ino);
                if let Body::File { layout, .. } = i.body {
                    freed = layout.extents().collect();
                    self.free_extents(&freed)?;
                }
            }
            Op::JobStart { job } => {
                self.take_extents(&job.target.extents().collect::<Vec<_>>())?;
                self.next_job = self.next_job.max(job.id + 1);
                self.jobs.insert(job.id, job);
            }
            Op::JobGrow { job, extents } => {
                self.take_extents(&extents)?;
                self.jobs.get_mut(&job).expect("checked").target.append(&extents);
            }
            Op::JobMap { job, runs } => {
                self.take_extents(&runs.iter().map(|r| r.extent).collect::<Vec<_>>())?;
                self.jobs.get_mut(&job).expect("checked").target.insert(&runs);
            }
            Op::JobSwitch { job } => {
                let j = self.jobs.get_mut(&job).expect("checked");
                let ino = j.ino;
                let target = std::mem::take(&mut j.target);
                let Some(Inode { body: Body::File { layout, .. }, .. }) = self.inodes.get_mut(&ino) else {
                    unreachable!("checked")
                };
                // The data set's mapped tracks now live where the target maps them; its holes
                // stay holes. Set aside: its old tracks, and the target's tracks at its holes.
                let (switched, mut release) = switch_layout(layout, &target);
                release.extend(std::mem::replace(layout, switched).extents());
                let j = self.jobs.get_mut(&job).expect("checked");
                j.release = release;
                j.switched = true;
                self.checkpoints.remove(&job);
            }
            Op::JobRelease { job } => {
                let j = self.jobs.remove(&job).expect("checked");
                self.checkpoints.remove(&job);
                self.free_extents(&j.release)?;
                freed = j.release;
            }
            Op::JobCancel { job } => {
                let j = self.jobs.remove(&job).expect("checked");
                self.checkpoints.remove(&job);
                freed = j.target.extents().collect();
                self.free_extents(&freed)?;
            }
            Op::PlanStart { plan } => {
                self.next_job = self.next_job.max(plan.id + 1);
                self.closed_volumes.extend(plan.sources.iter().copied());
                self.plans.insert(plan.id, plan);
            }
            Op::PlanEnd { plan, reopen } => {
                let p = self.plans.remove(&plan).expect("checked");
                if reopen {
                    for v in &p.sources {
                        if !self.plans.values().any(|q| q.sources.contains(v)) {
                            self.closed_volumes.remove(v);
                        }
                    }
                }
            }
            Op::SetVolumePath { id, path } => {
                self.volumes.get_mut(&id).expect("checked").path = path;
            }
            Op::RemoveVolume { id } => {
                self.volumes.remove(&id);
                self.closed_volumes.remove(&id);
            }
            Op::ReopenVolume { id } => {
                self.closed_volumes.remove(&id);
            }
            Op::MakeNodeXattrs { ino, parent, name, meta, kind, xattrs } => {
                self.apply_checked(&Op::MakeNode { ino, parent, name, meta, kind })?;
                if !xattrs.is_empty() {
                    self.xattrs.insert(ino, xattrs);
                }
            }
            Op::SetXattr { ino, name, value, ctime_ns } => {
                let meta = &mut self.inode_mut(ino)?.meta;
                meta.ctime_ns = ctime_ns;
                // An access ACL sets the permission bits (the group bits are its mask).
                if name == acl::ACL_ACCESS {
                    if let Some(mode) = acl::mode_of(&value) {
                        meta.perm = (meta.perm & !0o777) | mode;
                    }
                }
                self.xattrs.entry(ino).or_default().insert(name, value);
            }
            Op::JobCheckpoint { job, copied_tracks, region_tracks, dirty_regions } => {
                let dirty_regions = dirty_regions.into_iter().collect();
                self.checkpoints.insert(job, JobCheckpoint { copied_tracks, region_tracks, dirty_regions });
            }
            Op::JobIntent { job, regions } => {
                self.checkpoints.get_mut(&job).expect("checked").dirty_regions.extend(regions);
            }
            Op::RemoveXattr { ino, name, ctime_ns } => {
                self.inode_mut(ino)?.meta.ctime_ns = ctime_ns;
                if let Some(x) = self.xattrs.get_mut(&ino) {
                    x.remove(&name);
                    if x.is_empty() {
                        self.xattrs.remove(&ino);
                    }
                }
            }
        }
        Ok(freed)
    }

    fn reparent(&mut self, ino: Ino, new_parent: Ino, old_parent: Ino) -> Result<(), ApplyError> {
        if let Body::Dir { parent, .. } = &mut self.inode_mut(ino)?.body {
            *parent = new_parent;
            if new_parent != old_parent {
                self.inode_mut(old_parent)?.meta.nlink -= 1;
                self.inode_mut(new_parent)?.meta.nlink += 1;
            }
        }
        Ok(())
    }

    /// Drop one link of `ino`, whose entry in `parent` is already gone.
    fn drop_link(&mut self, parent: Ino, ino: Ino, time_ns: i64) -> Result<(), ApplyError> {
        let i = self.inode_mut(ino)?;
        i.meta.ctime_ns = time_ns;
        if i.is_dir() {
            i.meta.nlink = 0;
            self.inodes.remove(&ino);
            self.xattrs.remove(&ino);
            self.inode_mut(parent)?.meta.nlink -= 1;
        } else {
            i.meta.nlink = i.meta.nlink.saturating_sub(1);
        }
        Ok(())
    }

    /// Inodes with no links left (open when the mount stopped); recovery destroys them.
    pub fn orphans(&self) -> Vec<Ino> {
        let mut v: Vec<Ino> =
            self.inodes.values().filter(|i| i.meta.nlink == 0 && !i.is_dir()).map(|i| i.ino).collect();
        v.sort_unstable();
        v
    }
}

fn parent_checked(c: &Catalog, parent: Ino) -> Result<Ino, ApplyError> {
    match c.inodes.get(&parent) {
        Some(i) if i.is_dir() => Ok(parent),
        Some(_) => Err(ApplyError::NotDir(parent)),
        None => Err(ApplyError::NoInode(parent)),
    }
}

fn file_checked(c: &Catalog, ino: Ino) -> Result<(), ApplyError> {
    match c.inodes.get(&ino) {
        Some(Inode { body: Body::File { .. }, .. }) => Ok(()),
        Some(_) => Err(ApplyError::NotFile(ino)),
        None => Err(ApplyError::NoInode(ino)),
    }
}

fn layout_of(c: &Catalog, ino: Ino) -> Result<&Layout, ApplyError> {
    match c.inodes.get(&ino) {
        Some(Inode { body: Body::File { layout, .. }, .. }) => Ok(layout),
        Some(_) => Err(ApplyError::NotFile(ino)),
        None => Err(ApplyError::NoInode(ino)),
    }
}

/// A job's switch: the layout that maps `source`'s mapped tracks where `target` maps them,
/// and the target's extents that map `source`'s holes (no longer needed).
pub fn switch_layout(source: &Layout, target: &Layout) -> (Layout, Vec<Extent>) {
    let mut switched = Layout::default();
    let mut unneeded = Vec::new();
    for t in target.runs() {
        let mut at = t.logical;
        for s in source.slice(t.logical..t.end()) {
            unneeded.extend(t.slice(at..s.logical).map(|r| r.extent));
            switched.push(t.slice(s.logical..s.end()).expect("inside the target run"));
            at = s.end();
        }
        unneeded.extend(t.slice(at..t.end()).map(|r| r.extent));
    }
    (switched, unneeded)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::geometry::TrackNo;

    impl Op {
        /// A `JobStart` with its target mapping `runs`.
        fn with_target(self, runs: Vec<Run>) -> Op {
            match self {
                Op::JobStart { mut job } => {
                    job.target.insert(&runs);
                    Op::JobStart { job }
                }
                op => op,
            }
        }
    }

    fn meta() -> Meta {
        Meta { perm: 0o755, uid: 0, gid: 0, nlink: 0, atime_ns: 0, mtime_ns: 0, ctime_ns: 0 }
    }

    fn cat() -> Catalog {
        let mut c = Catalog::new(Geometry::new(4096).unwrap(), meta());
        c.apply(&Op::AddVolume {
            id: VolumeId(1),
            name: "V1".into(),
            path: "/x".into(),
            size_bytes: 40960,
            tracks_total: 10,
        })
        .unwrap();
        c
    }

    /// A long random sequence of ops (most of them valid, the rest refused) over three small
    /// volumes: after every op, what the catalog kept counted equals a recount, and after
    /// the sequence, a catalog read back from its snapshot holds the same index.
    #[test]
    fn the_index_follows_every_op() {
        let (mut switches, mut spanned) = (0, 0);
        for seed in 1..=40u64 {
            let mut rng = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
            let mut next = |n: u64| {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                rng % n.max(1)
            };
            let mut c = Catalog::new(Geometry::new(4096).unwrap(), meta());
            let mut next_job = 1;
            let (mut applied, mut refused, mut refused_before) = (0, 0, 0);
            for step in 0..1500u64 {
                let ino = 2 + next(8);
                let vol = VolumeId(1 + next(4) as u32);
                let e = |first: u64, n: u64| Extent { volume: vol, first: TrackNo(first), count_tracks: n.max(1) };
                let name = format!("n{}", next(8)).into_bytes();
                let job = 1 + next(next_job);
                let op = match next(21) {
                    0 => Op::AddVolume {
                        id: vol,
                        name: format!("V{}", vol.0),
                        path: "/x".into(),
                        size_bytes: 64 * 4096,
                        tracks_total: 64,
                    },
                    1 => Op::RemoveVolume { id: vol },
                    2..=4 => Op::MakeNode {
                        ino,
                        parent: ROOT_INO,
                        name,
                        meta: meta(),
                        kind: if next(4) == 0 { NewKind::Dir } else { NewKind::File },
                    },
                    5 => Op::MakeNodeXattrs {
                        ino,
                        parent: ROOT_INO,
                        name,
                        meta: meta(),
                        kind: NewKind::File,
                        xattrs: [(b"user.a".to_vec(), vec![1])].into(),
                    },
                    6 => Op::Unlink { parent: ROOT_INO, name, time_ns: 1 },
                    7 => Op::Rename {
                        parent: ROOT_INO,
                        name,
                        new_parent: ROOT_INO,
                        new_name: format!("n{}", next(8)).into_bytes(),
                        exchange: next(2) == 0,
                        time_ns: 1,
                    },
                    8 => Op::Link { ino, parent: ROOT_INO, name, time_ns: 1 },
                    9 | 10 => Op::Grow { ino, extents: vec![e(next(64), 1 + next(6))] },
                    11 | 12 => {
                        let logical = next(40);
                        Op::Map { ino, runs: vec![Run { logical, extent: e(next(64), 1 + next(6)) }], prealloc_end: 0 }
                    }
                    13 => {
                        let first = next(40);
                        Op::Unmap { ino, first, end: first + 1 + next(10) }
                    }
                    14 => Op::Trim { ino, keep_tracks: next(20) },
                    15 => Op::SetSize { ino, size_bytes: next(20) * 4096, mtime_ns: 1 },
                    16 => Op::Destroy { ino },
                    17 => {
                        // A job whose target maps the whole of the data set's layout.
                        let end = match c.inodes.get(&ino).map(|i| &i.body) {
                            Some(Body::File { layout, .. }) => layout.end(),
                            _ => 1,
                        };
                        let runs = vec![Run { logical: 0, extent: e(next(64), end) }];
                        next_job += 1;
                        Op::JobStart { job: JobRec::queued(next_job - 1, ino, "", vec![vol]) }.with_target(runs)
                    }
                    18 => Op::JobSwitch { job },
                    19 => Op::JobRelease { job },
                    _ => Op::JobCancel { job },
                };
                match c.apply(&op) {
                    Ok(_) => applied += 1,
                    Err(_) => refused += 1,
                }
                if matches!(op, Op::JobSwitch { .. }) && refused_before == refused {
                    switches += 1;
                }
                refused_before = refused;
                let mut vols = Vec::new();
                spanned += c
                    .inodes
                    .values()
                    .filter(|i| matches!(&i.body, Body::File { layout, .. } if { volumes_of(layout, &mut vols); vols.len() > 1 }))
                    .count();
                assert_eq!(c.index, CatalogIndex::of(&c), "seed {seed}, step {step}: after {op:?}");
            }
            assert!(applied > 300 && refused > 0, "seed {seed}: {applied} applied, {refused} refused");
            let stored = postcard::to_stdvec(&c).unwrap();
            let read: Catalog = postcard::from_bytes(&stored).unwrap();
            assert_eq!(read.index, c.index, "seed {seed}: read back");
            assert_eq!(read, c);
        }
        assert!(switches > 20 && spanned > 100, "{switches} switches, {spanned} data sets over two volumes or more");
    }

    #[test]
    fn make_grow_trim_destroy_returns_space() {
        let mut c = cat();
        c.apply(&Op::MakeNode { ino: 2, parent: ROOT_INO, name: b"f".to_vec(), meta: meta(), kind: NewKind::File })
            .unwrap();
        let e = |first, n| Extent { volume: VolumeId(1), first: TrackNo(first), count_tracks: n };
        c.apply(&Op::Grow { ino: 2, extents: vec![e(0, 4)] }).unwrap();
        c.apply(&Op::Grow { ino: 2, extents: vec![e(4, 2)] }).unwrap();
        assert_eq!(
            c.get(2).unwrap().body,
            Body::File { size_bytes: 0, layout: Layout::dense(&[e(0, 6)]), prealloc_end: 0 },
            "contiguous grow merges"
        );
        assert!(c.apply(&Op::Grow { ino: 2, extents: vec![e(5, 2)] }).is_err(), "owned tracks can't be taken twice");
        assert_eq!(c.apply(&Op::Trim { ino: 2, keep_tracks: 1 }).unwrap(), vec![e(1, 5)]);
        assert_eq!(c.volumes[&VolumeId(1)].free.free_tracks(), 9);
        assert!(c.apply(&Op::Destroy { ino: 2 }).is_err(), "a linked inode can't be destroyed");
        c.apply(&Op::Unlink { parent: ROOT_INO, name: b"f".to_vec(), time_ns: 1 }).unwrap();
        assert_eq!(c.orphans(), vec![2]);
        c.apply(&Op::Destroy { ino: 2 }).unwrap();
        assert_eq!(c.volumes[&VolumeId(1)].free.free_tracks(), 10);
    }

    #[test]
    fn rename_replaces_and_counts_dir_links() {
        let mut c = cat();
        c.apply(&Op::MakeNode { ino: 2, parent: ROOT_INO, name: b"d".to_vec(), meta: meta(), kind: NewKind::Dir })
            .unwrap();
        c.apply(&Op::MakeNode { ino: 3, parent: 2, name: b"sub".to_vec(), meta: meta(), kind: NewKind::Dir }).unwrap();
        assert_eq!(c.get(2).unwrap().meta.nlink, 3);
        c.apply(&Op::Rename {
            parent: 2,
            name: b"sub".to_vec(),
            new_parent: ROOT_INO,
            new_name: b"sub2".to_vec(),
            exchange: false,
            time_ns: 1,
        })
        .unwrap();
        assert_eq!(c.get(2).unwrap().meta.nlink, 2);
        assert_eq!(c.get(ROOT_INO).unwrap().meta.nlink, 4);
        assert!(c
            .apply(&Op::Rename {
                parent: ROOT_INO,
                name: b"sub2".to_vec(),
                new_parent: ROOT_INO,
                new_name: b"d".to_vec(),
                exchange: false,
                time_ns: 2
            })
            .is_ok());
        assert_eq!(c.lookup(ROOT_INO, b"d"), Some(3));
        assert!(c.get(2).is_none(), "the replaced empty directory is gone");
    }

    #[test]
    fn holes_map_unmap_and_a_switch_keep_them() {
        let mut c = cat();
        c.apply(&Op::AddVolume {
            id: VolumeId(2),
            name: "V2".into(),
            path: "/y".into(),
            size_bytes: 40960,
            tracks_total: 10,
        })
        .unwrap();
        c.apply(&Op::MakeNode { ino: 2, parent: ROOT_INO, name: b"f".to_vec(), meta: meta(), kind: NewKind::File })
            .unwrap();
        let e = |v, first, n| Extent { volume: VolumeId(v), first: TrackNo(first), count_tracks: n };
        let run = |logical, v, first, n| Run { logical, extent: e(v, first, n) };
        // Tracks 0 and 100..102 mapped; 1..100 a hole that takes nothing.
        c.apply(&Op::SetSize { ino: 2, size_bytes: 102 * 4096, mtime_ns: 1 }).unwrap();
        c.apply(&Op::Map { ino: 2, runs: vec![run(100, 1, 3, 2), run(0, 1, 0, 1)], prealloc_end: 0 }).unwrap();
        assert_eq!(c.get(2).unwrap().allocated_tracks(), 3);
        assert_eq!(c.volumes[&VolumeId(1)].free.free_tracks(), 7);
        assert!(
            matches!(
                c.apply(&Op::Map { ino: 2, runs: vec![run(101, 1, 6, 1)], prealloc_end: 0 }),
                Err(ApplyError::Layout { .. })
            ),
            "a mapped track can't be mapped again"
        );
        // A job maps the target at the same logical tracks, and one more (filled, then punched).
        let job = JobRec::queued(7, 2, "/f", vec![VolumeId(2)]);
        c.apply(&Op::JobStart { job }).unwrap();
        c.apply(&Op::JobMap { job: 7, runs: vec![run(0, 2, 0, 1), run(100, 2, 1, 2)] }).unwrap();
        c.apply(&Op::Map { ino: 2, runs: vec![run(50, 1, 9, 1)], prealloc_end: 0 }).unwrap();
        assert_eq!(
            c.check(&Op::JobSwitch { job: 7 }),
            Err(ApplyError::TargetMissing { job: 7, first: 50, end: 51 }),
            "a switch needs a target track for every mapped track"
        );
        c.apply(&Op::JobMap { job: 7, runs: vec![run(50, 2, 5, 1)] }).unwrap();
        assert_eq!(c.apply(&Op::Unmap { ino: 2, first: 100, end: 101 }).unwrap(), vec![e(1, 3, 1)]);
        c.apply(&Op::JobSwitch { job: 7 }).unwrap();
        let Body::File { layout, .. } = &c.get(2).unwrap().body else { panic!() };
        assert_eq!(layout.runs(), &[run(0, 2, 0, 1), run(50, 2, 5, 1), run(101, 2, 2, 1)]);
        c.apply(&Op::JobRelease { job: 7 }).unwrap();
        assert_eq!(c.volumes[&VolumeId(1)].free.free_tracks(), 10, "the source is free again");
        assert_eq!(c.volumes[&VolumeId(2)].free.free_tracks(), 7, "the punched track's target was freed too");
    }

    #[test]
    fn trim_keeps_explicit_preallocation_only_above_the_cut() {
        let mut c = cat();
        c.apply(&Op::MakeNode { ino: 2, parent: ROOT_INO, name: b"f".to_vec(), meta: meta(), kind: NewKind::File })
            .unwrap();
        let e = |first, n| Extent { volume: VolumeId(1), first: TrackNo(first), count_tracks: n };
        c.apply(&Op::Map { ino: 2, runs: vec![Run { logical: 0, extent: e(0, 4) }], prealloc_end: 4 }).unwrap();
        assert!(matches!(c.get(2).unwrap().body, Body::File { prealloc_end: 4, .. }));
        c.apply(&Op::Trim { ino: 2, keep_tracks: 2 }).unwrap();
        assert!(matches!(c.get(2).unwrap().body, Body::File { prealloc_end: 2, .. }));
    }
}
