//! The simulated disk: a [`Disk`] for deterministic simulation tests, whose power can be cut
//! at any operation and which then comes back holding what a real disk might hold.
//!
//! # The model
//!
//! Every file keeps its *synced* state (its content and length as of its last successful
//! `flush`), its *current* content (what reads see) and, in order, the operations made on it
//! since that flush: writes, punches (zeros, size kept) and length changes. The namespace
//! (names of files; directories are implicit) likewise keeps a *synced* map and the list of
//! namespace operations (create, rename, remove) made since the last `sync_dir`.
//!
//! A power cut freezes the disk: the operation in flight and every later operation or read
//! on it, or on any file opened from it, fail with `EIO`. The operation in flight counts as
//! pending: the disk may or may not have done it. [`SimDisk::restart`] then builds a new disk
//! from what survived, every choice drawn from one seeded [`SimRng`]:
//!
//! - **Synced data survives.** Content and length made durable by a successful `flush`, and
//!   names made durable by a `sync_dir`, are always there after a restart, unless a later
//!   pending operation on the same bytes may have overwritten them (as on a real disk).
//! - **Pending data may or may not survive, sector by sector.** The file's content is built
//!   like a page cache written back in any order: per 4096-byte sector the versions are v0
//!   (its synced content) and v1..vk (its content after each pending operation that touched
//!   it), and one of them is chosen. Its length is chosen from its length history (synced
//!   length, then each length a pending operation set). Sectors past the chosen length are
//!   cut; bytes inside it that no kept version wrote read as zeros. So no byte ever holds a
//!   value that was never written there.
//! - **The last write may tear.** A sector touched by a file's last pending operation (the
//!   write the disk may have been doing at the cut) is, with a small probability, torn: it
//!   holds version i up to a random 512-byte boundary and version i+1 after it. 512 bytes is
//!   the unit a disk writes atomically; nothing smaller tears.
//! - **Extremes are explored.** Per file the rng picks a mode: keep everything pending
//!   (latest versions and length), drop everything pending (synced state only), or a random
//!   mix per sector (the only mode that tears).
//! - **Namespace operations survive as a prefix.** We assume a journaled file system that
//!   commits metadata in order: after a cut the surviving namespace is the synced one plus a
//!   prefix (of random length, possibly empty or whole) of the pending namespace operations.
//!   A `sync_dir` of any directory makes every pending namespace operation durable. A rename
//!   is therefore atomic, and a rename of a flushed file followed by a `sync_dir` (as
//!   [`super::replace_file`] does) leaves old or new contents, whole. Files no surviving name
//!   reaches are gone.
//!
//! A file handle refers to the file, not its name: after a rename it still reaches the same
//! file. Every handle latches its first write, punch, length or flush failure
//! ([`super::Latch`]); a new `open` starts afresh. [`SimDisk::fail_next`] injects one such
//! failure; an injected flush failure leaves the pending writes pending.
//!
//! Determinism: the same calls and the same seed give the same result. State lives in
//! ordered maps (files by id, names by path), nothing depends on time or threads, and the
//! restart draws its choices in a fixed order: the namespace prefix, then per surviving file
//! in id order its mode, length and sectors in ascending order.
//!
//! Contents are held densely in memory: the simulated files are meant to be small (a few MiB).
//! Pending writes keep their data and the synced image of each sector they first touch, and
//! only until the next flush; a flush costs time in the number of pending operations, not
//! the file's size.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::io;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::Mutex;

use super::{Disk, Latch, StorageFile};

/// The unit of write-back: per sector one version survives (or two, torn).
const SECTOR_BYTES: u64 = 4096;
/// The unit a disk writes atomically: a torn sector switches versions at such a boundary.
const ATOMIC_BYTES: u64 = 512;
/// Chance (numerator, denominator) that a sector the last pending operation touched is torn.
const TEAR_CHANCE: (u64, u64) = (1, 8);
/// The largest simulated file: contents are held densely in memory.
const MAX_FILE_BYTES: u64 = 1 << 32;

fn eio() -> io::Error {
    io::Error::from_raw_os_error(libc::EIO)
}

/// A small seeded RNG (splitmix64), also used by the simulation tests.
#[derive(Clone, Debug)]
pub struct SimRng(u64);

impl SimRng {
    pub fn new(seed: u64) -> SimRng {
        SimRng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A number in `0..n` (`n > 0`).
    pub fn below(&mut self, n: u64) -> u64 {
        assert!(n > 0, "SimRng::below(0)");
        ((u128::from(self.next_u64()) * u128::from(n)) >> 64) as u64
    }

    /// True with probability `num / den` (`den > 0`).
    pub fn chance(&mut self, num: u64, den: u64) -> bool {
        self.below(den) < num
    }
}

/// Which operation of a file [`SimDisk::fail_next`] fails.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultKind {
    /// The next `write_at`, `punch` or `set_len`.
    Write,
    /// The next `flush`.
    Flush,
}

/// One change of a file's content or length, pending until the file's next flush.
#[derive(Debug)]
enum Change {
    Write {
        offset: u64,
        data: Vec<u8>,
    },
    /// Zeros over `offset..offset + len`, already clipped to the file's length.
    Punch {
        offset: u64,
        len: u64,
    },
    /// The length went from `from` to `to`; a cut zeros `to..from`.
    SetLen {
        from: u64,
        to: u64,
    },
}

impl Change {
    /// The bytes whose content the change sets (none for a write of nothing or an extension).
    fn range(&self) -> Option<Range<u64>> {
        let r = match self {
            Change::Write { offset, data } => *offset..offset + data.len() as u64,
            Change::Punch { offset, len } => *offset..offset + len,
            Change::SetLen { from, to } => *to..*from,
        };
        (r.start < r.end).then_some(r)
    }

    /// The sectors the change touches.
    fn sectors(&self) -> Range<u64> {
        match self.range() {
            Some(r) => r.start / SECTOR_BYTES..r.end.div_ceil(SECTOR_BYTES),
            None => 0..0,
        }
    }

    /// Apply the change to `buf`, the content of sector `s`.
    fn apply_to_sector(&self, s: u64, buf: &mut [u8]) {
        let Some(r) = self.range() else { return };
        let base = s * SECTOR_BYTES;
        let (lo, hi) = (r.start.max(base), r.end.min(base + SECTOR_BYTES));
        if lo >= hi {
            return;
        }
        let dst = &mut buf[(lo - base) as usize..(hi - base) as usize];
        match self {
            Change::Write { offset, data } => {
                dst.copy_from_slice(&data[(lo - offset) as usize..(hi - offset) as usize])
            }
            Change::Punch { .. } | Change::SetLen { .. } => dst.fill(0),
        }
    }
}

#[derive(Debug)]
struct Pending {
    change: Change,
    /// The file's length after the change.
    len_after: u64,
}

/// How a restart treats one file's pending changes.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    KeepAll,
    DropAll,
    Mix,
}

#[derive(Default)]
struct SimFile {
    /// The current content; its length is the file's length.
    data: Vec<u8>,
    synced_len: u64,
    /// The synced content of each sector below `synced_len` a pending change touched, saved
    /// before the first such change. Every other sector's synced content is in `data` (or
    /// zeros past `synced_len`).
    base: BTreeMap<u64, Box<[u8]>>,
    pending: Vec<Pending>,
    flushes: u64,
    handles: usize,
    fault_write: Option<i32>,
    fault_flush: Option<i32>,
}

impl SimFile {
    /// A file whose content is all synced (as after a restart).
    fn synced(data: Vec<u8>) -> SimFile {
        SimFile { synced_len: data.len() as u64, data, ..SimFile::default() }
    }

    fn len(&self) -> u64 {
        self.data.len() as u64
    }

    /// The current content of sector `s`, zeros past the end.
    fn sector(&self, s: u64) -> Box<[u8]> {
        let mut buf = vec![0u8; SECTOR_BYTES as usize];
        self.read(&mut buf, s * SECTOR_BYTES);
        buf.into_boxed_slice()
    }

    fn read(&self, buf: &mut [u8], offset: u64) {
        let len = self.len();
        let start = offset.min(len);
        let end = offset.saturating_add(buf.len() as u64).min(len);
        let n = (end - start) as usize;
        buf[..n].copy_from_slice(&self.data[start as usize..end as usize]);
        buf[n..].fill(0);
    }

    /// Make `change` (already validated) current and pending.
    fn apply(&mut self, change: Change) {
        for s in change.sectors() {
            if s * SECTOR_BYTES < self.synced_len && !self.base.contains_key(&s) {
                let image = self.sector(s);
                self.base.insert(s, image);
            }
        }
        match &change {
            Change::Write { offset, data } => {
                if !data.is_empty() {
                    let (start, end) = (*offset as usize, *offset as usize + data.len());
                    if end > self.data.len() {
                        self.data.resize(end, 0);
                    }
                    self.data[start..end].copy_from_slice(data);
                }
            }
            Change::Punch { offset, len } => self.data[*offset as usize..(offset + len) as usize].fill(0),
            Change::SetLen { to, .. } => self.data.resize(*to as usize, 0),
        }
        let len_after = self.len();
        self.pending.push(Pending { change, len_after });
    }

    fn flush(&mut self) {
        self.synced_len = self.len();
        self.base.clear();
        self.pending.clear();
        self.flushes += 1;
    }

    /// The content this file holds after a power cut, chosen with `rng`.
    fn survivor(&self, rng: &mut SimRng) -> Vec<u8> {
        let mode = match rng.below(3) {
            0 => Mode::KeepAll,
            1 => Mode::DropAll,
            _ => Mode::Mix,
        };
        if mode == Mode::KeepAll {
            return self.data.clone();
        }
        let len = match mode {
            Mode::DropAll => self.synced_len,
            _ => {
                let mut history = vec![self.synced_len];
                for p in &self.pending {
                    if history.last() != Some(&p.len_after) {
                        history.push(p.len_after);
                    }
                }
                history[rng.below(history.len() as u64) as usize]
            }
        };
        let mut out = vec![0u8; len as usize];
        let n = len.min(self.len()) as usize;
        out[..n].copy_from_slice(&self.data[..n]);

        // Per touched sector (below the chosen length), the pending changes touching it.
        let mut touched: BTreeMap<u64, Vec<usize>> = BTreeMap::new();
        for (i, p) in self.pending.iter().enumerate() {
            for s in p.change.sectors() {
                if s * SECTOR_BYTES < len {
                    touched.entry(s).or_default().push(i);
                }
            }
        }
        let last = self.pending.len().checked_sub(1);
        for (s, ops) in touched {
            let k = ops.len() as u64;
            let (version, tear) = match mode {
                Mode::Mix => {
                    let version = rng.below(k + 1) as usize;
                    let tear = (ops.last().copied() == last && rng.chance(TEAR_CHANCE.0, TEAR_CHANCE.1)).then(|| {
                        let i = rng.below(k) as usize;
                        let at = ATOMIC_BYTES * (1 + rng.below(SECTOR_BYTES / ATOMIC_BYTES - 1));
                        (i, at as usize)
                    });
                    (version, tear)
                }
                _ => (0, None),
            };
            let mut image = match self.base.get(&s) {
                Some(b) => b.to_vec(),
                None => vec![0u8; SECTOR_BYTES as usize],
            };
            match tear {
                None => {
                    for &i in &ops[..version] {
                        self.pending[i].change.apply_to_sector(s, &mut image);
                    }
                }
                Some((i, at)) => {
                    for &j in &ops[..i] {
                        self.pending[j].change.apply_to_sector(s, &mut image);
                    }
                    let mut next = image.clone();
                    self.pending[ops[i]].change.apply_to_sector(s, &mut next);
                    image[at..].copy_from_slice(&next[at..]);
                }
            }
            let lo = s * SECTOR_BYTES;
            let hi = (lo + SECTOR_BYTES).min(len);
            out[lo as usize..hi as usize].copy_from_slice(&image[..(hi - lo) as usize]);
        }
        out
    }
}

/// A namespace operation, pending until a `sync_dir`.
#[derive(Debug)]
enum NsOp {
    Create { path: PathBuf, id: u64 },
    Rename { from: PathBuf, to: PathBuf },
    Remove { path: PathBuf },
}

impl NsOp {
    fn replay(&self, names: &mut BTreeMap<PathBuf, u64>) {
        match self {
            NsOp::Create { path, id } => {
                names.insert(path.clone(), *id);
            }
            NsOp::Rename { from, to } => {
                if let Some(id) = names.remove(from) {
                    names.insert(to.clone(), id);
                }
            }
            NsOp::Remove { path } => {
                names.remove(path);
            }
        }
    }
}

/// Whether an operation that reached the disk completes or is the one the power cut hit.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Step {
    Go,
    /// The power went during this operation: it counts as pending, and fails with EIO.
    InFlight,
}

impl Step {
    fn done(self) -> io::Result<()> {
        match self {
            Step::Go => Ok(()),
            Step::InFlight => Err(eio()),
        }
    }

    /// The operation was refused with `e` (or the power went first).
    fn refuse(self, e: io::Error) -> io::Error {
        match self {
            Step::Go => e,
            Step::InFlight => eio(),
        }
    }
}

#[derive(Default)]
struct State {
    ops: u64,
    cut_at: Option<u64>,
    dead: bool,
    next_id: u64,
    files: BTreeMap<u64, SimFile>,
    names: BTreeMap<PathBuf, u64>,
    synced_names: BTreeMap<PathBuf, u64>,
    pending_ns: Vec<NsOp>,
}

impl fmt::Debug for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("State")
            .field("ops", &self.ops)
            .field("cut_at", &self.cut_at)
            .field("dead", &self.dead)
            .field("files", &self.files.len())
            .field("names", &self.names.keys().collect::<Vec<_>>())
            .field("pending_ns", &self.pending_ns.len())
            .finish()
    }
}

impl State {
    fn alive(&self) -> io::Result<()> {
        if self.dead {
            Err(eio())
        } else {
            Ok(())
        }
    }

    /// Count a mutating operation; it may be the one the power cut hits.
    fn begin(&mut self) -> io::Result<Step> {
        self.alive()?;
        self.ops += 1;
        if self.cut_at.is_some_and(|at| self.ops >= at) {
            self.dead = true;
            return Ok(Step::InFlight);
        }
        Ok(Step::Go)
    }

    fn file(&mut self, id: u64) -> &mut SimFile {
        self.files.get_mut(&id).expect("a file stays while a handle or a name reaches it")
    }

    fn id_of(&self, path: &Path) -> io::Result<u64> {
        self.names.get(path).copied().ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, path.display().to_string()))
    }

    /// Forget file `id` if nothing can reach it any more: no handle, no current or synced
    /// name, no pending create a power cut could keep.
    fn collect(&mut self, id: u64) {
        let Some(f) = self.files.get(&id) else { return };
        let reached = f.handles > 0
            || self.names.values().any(|&v| v == id)
            || self.synced_names.values().any(|&v| v == id)
            || self.pending_ns.iter().any(|op| matches!(op, NsOp::Create { id: c, .. } if *c == id));
        if !reached {
            self.files.remove(&id);
        }
    }

    /// A change of file `id`'s content or length, with the injected write fault.
    fn change(&mut self, id: u64, make: impl FnOnce(u64) -> io::Result<Change>) -> io::Result<()> {
        let step = self.begin()?;
        let f = self.file(id);
        if step == Step::Go {
            if let Some(errno) = f.fault_write.take() {
                return Err(io::Error::from_raw_os_error(errno));
            }
        }
        let change = make(f.len()).map_err(|e| step.refuse(e))?;
        f.apply(change);
        step.done()
    }

    fn flush(&mut self, id: u64) -> io::Result<()> {
        self.begin()?.done()?;
        let f = self.file(id);
        if let Some(errno) = f.fault_flush.take() {
            return Err(io::Error::from_raw_os_error(errno));
        }
        f.flush();
        Ok(())
    }
}

fn end_of(offset: u64, len: u64) -> io::Result<u64> {
    match offset.checked_add(len) {
        Some(end) if end <= MAX_FILE_BYTES => Ok(end),
        _ => Err(io::Error::from_raw_os_error(libc::EFBIG)),
    }
}

/// A simulated disk with power cuts (see the module documentation). A cloneable handle:
/// clones share one disk.
#[derive(Clone, Debug, Default)]
pub struct SimDisk {
    state: Arc<Mutex<State>>,
}

impl SimDisk {
    pub fn new() -> SimDisk {
        SimDisk::default()
    }

    /// Mutating operations so far: write_at, punch, set_len, flush (of files), create_new,
    /// rename, remove, sync_dir. Operations refused by a handle's latch never reach the disk
    /// and are not counted.
    pub fn ops(&self) -> u64 {
        self.state.lock().ops
    }

    /// Power is cut when the op counter reaches `op` (the op numbered `op`, counting from 1,
    /// is the one in flight): that op and every later op and read fail with EIO. An `op` the
    /// counter already reached cuts the power now.
    pub fn cut_power_at(&self, op: u64) {
        let mut st = self.state.lock();
        if op <= st.ops {
            st.dead = true;
        } else {
            st.cut_at = Some(op);
        }
    }

    /// Cut the power now, between operations.
    pub fn cut_power_now(&self) {
        self.state.lock().dead = true;
    }

    pub fn is_cut(&self) -> bool {
        self.state.lock().dead
    }

    /// Power comes back: a NEW disk holding what survived the cut, chosen by `seed`. `self`
    /// stays dead forever (every op and read on it and on files opened from it fails with
    /// EIO), so threads of the old engine that still run can't touch the new state. Calling
    /// restart on a disk whose power was not cut first cuts it now. A dead disk can be
    /// restarted many times, with the same or other seeds.
    pub fn restart(&self, seed: u64) -> SimDisk {
        let mut st = self.state.lock();
        st.dead = true;
        let mut rng = SimRng::new(seed);
        let keep = rng.below(st.pending_ns.len() as u64 + 1) as usize;
        let mut names = st.synced_names.clone();
        for op in &st.pending_ns[..keep] {
            op.replay(&mut names);
        }
        let live: BTreeSet<u64> = names.values().copied().collect();
        let files = live.into_iter().map(|id| (id, SimFile::synced(st.files[&id].survivor(&mut rng)))).collect();
        let state = State { next_id: st.next_id, files, synced_names: names.clone(), names, ..State::default() };
        SimDisk { state: Arc::new(Mutex::new(state)) }
    }

    /// One-shot fault: the next op of `kind` on the file now named `path` fails with `errno`
    /// (and the handle latches it). Panics if no file has that name.
    pub fn fail_next(&self, path: &Path, kind: FaultKind, errno: i32) {
        let mut st = self.state.lock();
        let id = st.id_of(path).unwrap_or_else(|e| panic!("fail_next: {e}"));
        let f = st.file(id);
        match kind {
            FaultKind::Write => f.fault_write = Some(errno),
            FaultKind::Flush => f.fault_flush = Some(errno),
        }
    }

    /// Successful flushes of the file now named `path` (0 if there is none).
    pub fn flushes(&self, path: &Path) -> u64 {
        let st = self.state.lock();
        st.names.get(path).map_or(0, |id| st.files[id].flushes)
    }

    fn handle(&self, id: u64) -> Arc<dyn StorageFile> {
        Arc::new(SimHandle { state: self.state.clone(), id, latch: Latch::default() })
    }
}

impl Disk for SimDisk {
    fn create_new(&self, path: &Path, size_bytes: u64) -> io::Result<Arc<dyn StorageFile>> {
        let mut st = self.state.lock();
        let step = st.begin()?;
        if st.names.contains_key(path) {
            return Err(step.refuse(io::Error::new(io::ErrorKind::AlreadyExists, path.display().to_string())));
        }
        end_of(0, size_bytes).map_err(|e| step.refuse(e))?;
        let id = st.next_id;
        st.next_id += 1;
        let mut f = SimFile { handles: usize::from(step == Step::Go), ..SimFile::default() };
        f.apply(Change::SetLen { from: 0, to: size_bytes });
        st.files.insert(id, f);
        st.names.insert(path.to_path_buf(), id);
        st.pending_ns.push(NsOp::Create { path: path.to_path_buf(), id });
        step.done()?;
        Ok(self.handle(id))
    }

    fn open(&self, path: &Path) -> io::Result<Arc<dyn StorageFile>> {
        let mut st = self.state.lock();
        st.alive()?;
        let id = st.id_of(path)?;
        st.file(id).handles += 1;
        Ok(self.handle(id))
    }

    fn read_all(&self, path: &Path) -> io::Result<Vec<u8>> {
        let st = self.state.lock();
        st.alive()?;
        let id = st.id_of(path)?;
        Ok(st.files[&id].data.clone())
    }

    /// False on a dead disk: nothing can be seen on it.
    fn exists(&self, path: &Path) -> bool {
        let st = self.state.lock();
        !st.dead && st.names.contains_key(path)
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        let mut st = self.state.lock();
        let step = st.begin()?;
        let id = st.id_of(from).map_err(|e| step.refuse(e))?;
        if from != to {
            st.names.remove(from);
            let replaced = st.names.insert(to.to_path_buf(), id);
            st.pending_ns.push(NsOp::Rename { from: from.to_path_buf(), to: to.to_path_buf() });
            if let Some(old) = replaced {
                st.collect(old);
            }
        }
        step.done()
    }

    fn remove(&self, path: &Path) -> io::Result<()> {
        let mut st = self.state.lock();
        let step = st.begin()?;
        let id = st.id_of(path).map_err(|e| step.refuse(e))?;
        st.names.remove(path);
        st.pending_ns.push(NsOp::Remove { path: path.to_path_buf() });
        st.collect(id);
        step.done()
    }

    /// Makes every pending namespace operation durable, whatever the directory.
    fn sync_dir(&self, _dir: &Path) -> io::Result<()> {
        let mut st = self.state.lock();
        st.begin()?.done()?;
        st.synced_names = st.names.clone();
        st.pending_ns.clear();
        let named: BTreeSet<u64> = st.names.values().copied().collect();
        st.files.retain(|id, f| f.handles > 0 || named.contains(id));
        Ok(())
    }
}

/// A file opened from a [`SimDisk`]: reaches the file (not its name) until dropped.
struct SimHandle {
    state: Arc<Mutex<State>>,
    id: u64,
    latch: Latch,
}

impl fmt::Debug for SimHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SimHandle").field("id", &self.id).field("latch", &self.latch).finish()
    }
}

impl Drop for SimHandle {
    fn drop(&mut self) {
        let mut st = self.state.lock();
        st.file(self.id).handles -= 1;
        st.collect(self.id);
    }
}

impl StorageFile for SimHandle {
    fn read_at(&self, buf: &mut [u8], offset_bytes: u64) -> io::Result<()> {
        let mut st = self.state.lock();
        st.alive()?;
        st.file(self.id).read(buf, offset_bytes);
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset_bytes: u64) -> io::Result<()> {
        self.latch.guard(|| {
            self.state.lock().change(self.id, |_| {
                end_of(offset_bytes, buf.len() as u64)?;
                Ok(Change::Write { offset: offset_bytes, data: buf.to_vec() })
            })
        })
    }

    fn flush(&self) -> io::Result<()> {
        self.latch.guard(|| self.state.lock().flush(self.id))
    }

    fn punch(&self, offset_bytes: u64, len_bytes: u64) -> io::Result<()> {
        self.latch.guard(|| {
            self.state.lock().change(self.id, |len| {
                let end = offset_bytes.saturating_add(len_bytes).min(len);
                let offset = offset_bytes.min(end);
                Ok(Change::Punch { offset, len: end - offset })
            })
        })
    }

    /// A write of zeros, lost or torn by a power cut like any write, but not latched.
    fn prezero(&self, offset_bytes: u64, len_bytes: u64) -> io::Result<bool> {
        self.latch.check()?;
        self.state.lock().change(self.id, |_| {
            end_of(offset_bytes, len_bytes)?;
            Ok(Change::Write { offset: offset_bytes, data: vec![0; len_bytes as usize] })
        })?;
        Ok(true)
    }

    /// The current length (also on a dead disk, where it can no longer change).
    fn size_bytes(&self) -> u64 {
        self.state.lock().file(self.id).len()
    }

    fn set_len(&self, len_bytes: u64) -> io::Result<()> {
        self.latch.guard(|| {
            self.state.lock().change(self.id, |len| {
                end_of(0, len_bytes)?;
                Ok(Change::SetLen { from: len, to: len_bytes })
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::replace_file;

    const SEEDS: u64 = 200;

    fn p(s: &str) -> PathBuf {
        PathBuf::from(s)
    }

    fn errno(r: io::Result<impl fmt::Debug>) -> Option<i32> {
        r.expect_err("the operation must fail").raw_os_error()
    }

    /// A disk holding `path` with `bytes` flushed and its name synced.
    fn disk_with(path: &str, bytes: &[u8]) -> SimDisk {
        let d = SimDisk::new();
        let f = d.create_new(&p(path), 0).unwrap();
        f.write_at(bytes, 0).unwrap();
        f.flush().unwrap();
        d.sync_dir(&p("d")).unwrap();
        d
    }

    #[test]
    fn rng_is_seeded_and_below_stays_in_range() {
        let (mut a, mut b) = (SimRng::new(7), SimRng::new(7));
        let xs: Vec<u64> = (0..100).map(|_| a.next_u64()).collect();
        assert_eq!(xs, (0..100).map(|_| b.next_u64()).collect::<Vec<_>>());
        assert_ne!(xs, (0..100).map(|_| SimRng::new(8).next_u64()).collect::<Vec<_>>());
        let mut seen = [0u32; 5];
        for _ in 0..1000 {
            seen[a.below(5) as usize] += 1;
        }
        assert!(seen.iter().all(|&n| n > 100), "{seen:?}");
        assert!(!a.chance(0, 3) && a.chance(3, 3));
    }

    #[test]
    fn flushed_data_and_synced_names_survive_every_restart() {
        let flushed: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8 + 1).collect();
        for seed in 0..SEEDS {
            let d = disk_with("d/a", &flushed);
            // Pending work that must not disturb what is durable.
            let f = d.open(&p("d/a")).unwrap();
            f.write_at(&[0xEE; 1000], 20_000).unwrap();
            let g = d.create_new(&p("d/b"), 0).unwrap();
            g.write_at(&[1; 100], 0).unwrap();
            d.cut_power_at(d.ops() + 1);
            assert_eq!(errno(g.write_at(&[2; 5000], 50)), Some(libc::EIO));
            let r = d.restart(seed);
            let a = r.read_all(&p("d/a")).unwrap();
            assert!(a.len() == 10_000 || a.len() == 21_000, "seed {seed}: len {}", a.len());
            assert_eq!(a[..10_000], flushed[..], "seed {seed}");
            assert!(a[10_000..].iter().all(|&b| b == 0 || b == 0xEE), "seed {seed}");
        }
    }

    #[test]
    fn unflushed_writes_survive_for_some_seeds_only_and_never_invent_bytes() {
        let old = vec![0xAAu8; 3 * 4096];
        let (mut kept, mut lost, mut mixed) = (false, false, false);
        for seed in 0..SEEDS {
            let d = disk_with("d/a", &old);
            let f = d.open(&p("d/a")).unwrap();
            f.write_at(&[0xBB; 5000], 1000).unwrap();
            f.write_at(&[0xCC; 300], 4000).unwrap();
            f.punch(9000, 100).unwrap();
            let r = d.restart(seed);
            let a = r.read_all(&p("d/a")).unwrap();
            assert_eq!(a.len(), old.len(), "seed {seed}");
            for (i, &b) in a.iter().enumerate() {
                let mut allowed = vec![0xAA];
                if (1000..6000).contains(&i) {
                    allowed.push(0xBB);
                }
                if (4000..4300).contains(&i) {
                    allowed.push(0xCC);
                }
                if (9000..9100).contains(&i) {
                    allowed.push(0);
                }
                assert!(allowed.contains(&b), "seed {seed}: byte {i} is {b:#x}");
            }
            kept |= a[1000..4000].iter().all(|&b| b == 0xBB);
            lost |= a[1000..4000].iter().all(|&b| b == 0xAA);
            // Sectors are chosen one by one: the write's first sector kept, its second not.
            mixed |= a[1000..4000].iter().all(|&b| b == 0xBB) && a[4096..6000].iter().all(|&b| b == 0xAA);
        }
        assert!(kept && lost && mixed, "kept {kept} lost {lost} mixed {mixed}");
    }

    #[test]
    fn a_rename_without_sync_dir_can_be_lost_with_it_never() {
        let mut outcomes = BTreeSet::new();
        for synced in [false, true] {
            for seed in 0..SEEDS {
                let d = disk_with("d/a", b"old");
                let f = d.create_new(&p("d/t"), 0).unwrap();
                f.write_at(b"new", 0).unwrap();
                f.flush().unwrap();
                d.rename(&p("d/t"), &p("d/a")).unwrap();
                if synced {
                    d.sync_dir(&p("d")).unwrap();
                }
                let got = d.restart(seed).read_all(&p("d/a")).unwrap();
                assert!(got == b"old" || got == b"new", "seed {seed}: {got:?}");
                if synced {
                    assert_eq!(got, b"new", "seed {seed}");
                }
                outcomes.insert((synced, got));
            }
        }
        assert!(outcomes.contains(&(false, b"old".to_vec())) && outcomes.contains(&(false, b"new".to_vec())));
    }

    #[test]
    fn replace_file_leaves_old_or_new_whole_after_a_cut_at_every_op() {
        let dir = p("d");
        let old: Vec<u8> = (0..9000u32).map(|i| (i % 7) as u8 + 1).collect();
        let new: Vec<u8> = (0..13_000u32).map(|i| (i % 11) as u8 + 100).collect();
        let setup = || {
            let d = SimDisk::new();
            replace_file(&d, &dir, "x", &old).unwrap();
            // A leftover temp file from an earlier crash, so the replace removes it first.
            d.create_new(&p("d/x.tmp"), 10).unwrap();
            d
        };
        let d = setup();
        let before = d.ops();
        replace_file(&d, &dir, "x", &new).unwrap();
        let n = d.ops() - before;
        assert_eq!(n, 6, "remove, create, write, flush, rename, sync_dir");
        let mut seen = BTreeSet::new();
        for k in 1..=n + 1 {
            for seed in 0..50 {
                let d = setup();
                d.cut_power_at(before + k);
                let r = replace_file(&d, &dir, "x", &new);
                assert_eq!(r.is_ok(), k > n, "cut at op {k}");
                let got = d.restart(seed).read_all(&p("d/x")).unwrap();
                assert!(got == old || got == new, "cut at op {k}, seed {seed}: {} bytes", got.len());
                seen.insert((k, got == new));
            }
        }
        assert!(seen.contains(&(n + 1, true)) && !seen.contains(&(n + 1, false)), "a finished replace is durable");
        assert!(seen.contains(&(n, true)) && seen.contains(&(n, false)), "a cut during the sync may go either way");
        assert!(!seen.contains(&(3, true)), "before the rename the old file stays");
    }

    #[test]
    fn the_write_in_flight_tears_for_some_seed_at_a_512_byte_boundary() {
        let mut torn = 0;
        for seed in 0..1000 {
            let d = disk_with("d/a", &[0xAA; 8192]);
            let f = d.open(&p("d/a")).unwrap();
            d.cut_power_at(d.ops() + 1);
            assert_eq!(errno(f.write_at(&[0xBB; 8192], 0)), Some(libc::EIO));
            let a = d.restart(seed).read_all(&p("d/a")).unwrap();
            for sector in a.chunks(4096) {
                assert!(sector.iter().all(|&b| b == 0xAA || b == 0xBB), "seed {seed}");
                let switch = sector.iter().position(|&b| b == 0xBB).unwrap_or(4096);
                if switch > 0 && switch < 4096 {
                    torn += 1;
                    assert_eq!(switch % 512, 0, "seed {seed}");
                    assert!(sector[switch..].iter().all(|&b| b == 0xBB), "seed {seed}: old, then new");
                }
            }
        }
        assert!(torn > 0);
        assert!(torn < 200, "tearing is rare: {torn}");
    }

    #[test]
    fn a_sector_holds_one_version_so_a_cut_does_not_come_back_under_a_later_write() {
        let a = [0xAAu8; 4096];
        let mut b_then_zeros = [0u8; 4096];
        b_then_zeros[..100].fill(0xBB);
        let mut seen = BTreeSet::new();
        for seed in 0..SEEDS {
            let d = disk_with("d/a", &a);
            let f = d.open(&p("d/a")).unwrap();
            f.set_len(0).unwrap();
            f.set_len(4096).unwrap();
            f.write_at(&[0xBB; 100], 0).unwrap();
            let got = d.restart(seed).read_all(&p("d/a")).unwrap();
            // The versions: the synced As, zeros (the cut), the Bs over zeros. A sector holds
            // one of them, or is torn: version i, then version i+1 from a 512-byte boundary.
            let versions = [a, [0; 4096], b_then_zeros];
            let whole = got.is_empty() || versions.iter().any(|v| got == v);
            let torn = got.len() == 4096
                && (0..2).any(|i| {
                    (512..4096)
                        .step_by(512)
                        .any(|at| got[..at] == versions[i][..at] && got[at..] == versions[i + 1][at..])
                });
            assert!(whole || torn, "seed {seed}: {:x?}..", &got[..got.len().min(120)]);
            seen.insert(got);
        }
        assert!(seen.len() >= 4, "{} outcomes", seen.len());
        assert!(seen.contains(&vec![]), "the length may be any of its history, 0 too");
    }

    #[test]
    fn an_injected_flush_failure_latches_and_keeps_the_writes_pending() {
        let path = p("d/a");
        let (mut kept, mut lost) = (false, false);
        for seed in 0..SEEDS {
            let d = disk_with("d/a", &[1; 4096]);
            let f = d.open(&path).unwrap();
            f.write_at(&[2; 4096], 0).unwrap();
            d.fail_next(&path, FaultKind::Flush, libc::ENOSPC);
            assert_eq!(errno(f.flush()), Some(libc::ENOSPC));
            assert_eq!(errno(f.flush()), Some(libc::ENOSPC), "latched");
            assert_eq!(errno(f.write_at(&[3; 10], 0)), Some(libc::ENOSPC), "latched");
            assert_eq!(errno(f.punch(0, 10)), Some(libc::ENOSPC), "latched");
            assert_eq!(errno(f.set_len(10)), Some(libc::ENOSPC), "latched");
            assert_eq!(d.flushes(&path), 1);
            let mut buf = [0u8; 4];
            f.read_at(&mut buf, 0).unwrap();
            assert_eq!(buf, [2; 4], "reads go on; the latched write did not happen");
            let a = d.restart(seed).read_all(&path).unwrap();
            kept |= a == [2; 4096];
            lost |= a == [1; 4096];
        }
        assert!(kept && lost, "the failed flush synced nothing");

        let d = disk_with("d/a", &[1; 4096]);
        let f = d.open(&path).unwrap();
        d.fail_next(&path, FaultKind::Flush, libc::EIO);
        assert_eq!(errno(f.flush()), Some(libc::EIO));
        let g = d.open(&path).unwrap();
        g.write_at(&[4; 4096], 0).unwrap();
        g.flush().unwrap();
        assert_eq!(d.flushes(&path), 2);
        assert_eq!(errno(f.flush()), Some(libc::EIO), "the old handle stays latched");
        for seed in 0..20 {
            assert_eq!(d.restart(seed).read_all(&path).unwrap(), [4; 4096]);
        }
    }

    #[test]
    fn an_injected_write_failure_latches_the_handle_only() {
        let path = p("d/a");
        let d = disk_with("d/a", &[1; 100]);
        let f = d.open(&path).unwrap();
        d.fail_next(&path, FaultKind::Write, libc::EIO);
        assert_eq!(errno(f.write_at(&[2; 10], 0)), Some(libc::EIO));
        assert_eq!(d.read_all(&path).unwrap(), [1; 100], "the failed write did nothing");
        assert_eq!(errno(f.flush()), Some(libc::EIO));
        let g = d.open(&path).unwrap();
        g.write_at(&[3; 10], 0).unwrap();
        g.flush().unwrap();
        assert_eq!(d.read_all(&path).unwrap()[..11], [3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 1]);
    }

    #[test]
    fn a_dead_disk_fails_everything_and_the_restarted_disk_works() {
        let d = disk_with("d/a", &[7; 5000]);
        let f = d.open(&p("d/a")).unwrap();
        let ops = d.ops();
        d.cut_power_at(ops + 2);
        f.write_at(&[8; 10], 0).unwrap();
        assert!(!d.is_cut());
        assert_eq!(errno(f.write_at(&[9; 10], 0)), Some(libc::EIO), "the op in flight fails");
        assert!(d.is_cut());
        let mut buf = [0u8; 10];
        assert_eq!(errno(f.read_at(&mut buf, 0)), Some(libc::EIO));
        let g = d.clone();
        let h: &dyn Disk = &g;
        assert_eq!(errno(h.open(&p("d/a"))), Some(libc::EIO));
        assert_eq!(errno(h.read_all(&p("d/a"))), Some(libc::EIO));
        assert_eq!(errno(h.create_new(&p("d/c"), 0)), Some(libc::EIO));
        assert_eq!(errno(h.rename(&p("d/a"), &p("d/c"))), Some(libc::EIO));
        assert_eq!(errno(h.remove(&p("d/a"))), Some(libc::EIO));
        assert_eq!(errno(h.sync_dir(&p("d"))), Some(libc::EIO));
        assert!(!h.exists(&p("d/a")));
        assert_eq!(d.ops(), ops + 2, "nothing after the cut reaches the disk");

        let r = d.restart(3);
        // The old disk and its handles stay dead after a restart.
        assert_eq!(errno(f.read_at(&mut buf, 0)), Some(libc::EIO));
        assert!(d.is_cut() && !r.is_cut());
        assert_eq!(r.ops(), 0);
        let a = r.read_all(&p("d/a")).unwrap();
        assert!(a.iter().all(|&b| b == 7 || b == 8 || b == 9));
        let f2 = r.open(&p("d/a")).unwrap();
        f2.write_at(&[5; 10], 0).unwrap();
        f2.flush().unwrap();
        f2.read_at(&mut buf, 0).unwrap();
        assert_eq!(buf, [5; 10]);
        assert_eq!(r.flushes(&p("d/a")), 1);
        r.create_new(&p("d/c"), 0).unwrap();
        r.sync_dir(&p("d")).unwrap();
        assert_eq!(r.ops(), 4);
        // Restarting a disk whose power is on cuts it first.
        let r2 = r.restart(1);
        assert!(r.is_cut());
        assert_eq!(r2.read_all(&p("d/a")).unwrap()[..10], [5; 10]);
        assert!(r2.exists(&p("d/c")));
    }

    #[test]
    fn namespace_basics_and_handles_follow_the_file() {
        let d = SimDisk::new();
        let f = d.create_new(&p("a"), 10).unwrap();
        assert_eq!(f.size_bytes(), 10);
        assert_eq!(d.create_new(&p("a"), 0).unwrap_err().kind(), io::ErrorKind::AlreadyExists);
        assert_eq!(d.open(&p("b")).unwrap_err().kind(), io::ErrorKind::NotFound);
        assert_eq!(d.read_all(&p("b")).unwrap_err().kind(), io::ErrorKind::NotFound);
        assert_eq!(d.remove(&p("b")).unwrap_err().kind(), io::ErrorKind::NotFound);
        assert_eq!(d.rename(&p("b"), &p("a")).unwrap_err().kind(), io::ErrorKind::NotFound);
        d.rename(&p("a"), &p("b")).unwrap();
        assert!(!d.exists(&p("a")) && d.exists(&p("b")));
        f.write_at(b"xyz", 20).unwrap();
        assert_eq!(d.read_all(&p("b")).unwrap(), [&[0u8; 20][..], b"xyz"].concat());
        d.fail_next(&p("b"), FaultKind::Flush, libc::EIO);
        assert_eq!(errno(f.flush()), Some(libc::EIO), "a fault follows the name's file");
        let mut buf = [1u8; 8];
        f.read_at(&mut buf, 20).unwrap();
        assert_eq!(&buf, b"xyz\0\0\0\0\0", "reads past the end are zeros");
        let g = d.open(&p("b")).unwrap();
        g.punch(21, 100).unwrap();
        assert_eq!(g.size_bytes(), 23, "a punch keeps the size");
        g.set_len(5).unwrap();
        g.set_len(30).unwrap();
        assert_eq!(d.read_all(&p("b")).unwrap(), vec![0u8; 30], "a cut and an extension read as zeros");
        g.writeback(0, 30, true).unwrap();
        g.flush().unwrap();
        d.remove(&p("b")).unwrap();
        g.write_at(b"q", 0).unwrap();
        assert!(!d.exists(&p("b")));
        assert_eq!(d.flushes(&p("b")), 0);
        drop((f, g));
        d.sync_dir(&p("")).unwrap();
        assert!(d.state.lock().files.is_empty(), "unreachable files are forgotten");
    }

    /// One random workload on a file, cut at a random op; returns what each seed restores.
    fn random_run(run: u64, seeds: Range<u64>) -> Vec<Vec<u8>> {
        const MAX: usize = 5 * 4096;
        let mut rng = SimRng::new(run);
        let d = SimDisk::new();
        let f = d.create_new(&p("f"), rng.below(MAX as u64)).unwrap();
        // Per byte position the values it may hold after a cut (a 256-bit set), and the lengths.
        let mut shadow: Vec<u8> = vec![0; f.size_bytes() as usize];
        let mut allowed = vec![[0u64; 4]; MAX + 4096];
        let mut lens = BTreeSet::from([0u64, shadow.len() as u64]);
        let allow = |allowed: &mut Vec<[u64; 4]>, i: usize, v: u8| allowed[i][v as usize / 64] |= 1 << (v % 64);
        for i in 0..allowed.len() {
            allow(&mut allowed, i, 0);
        }
        let ops = 1 + rng.below(40);
        d.cut_power_at(d.ops() + rng.below(ops + 5) + 1);
        for _ in 0..ops {
            let len = shadow.len();
            let (touched, r) = match rng.below(10) {
                0..=5 => {
                    let off = rng.below(MAX as u64) as usize;
                    let n = (rng.below(9000) as usize).min(MAX - off);
                    let v = rng.below(256) as u8;
                    let r = f.write_at(&vec![v; n], off as u64);
                    if n > 0 {
                        shadow.resize(shadow.len().max(off + n), 0);
                        shadow[off..off + n].fill(v);
                    }
                    (off..off + n, r)
                }
                6 => {
                    let off = rng.below(MAX as u64) as usize;
                    let n = rng.below(9000) as usize;
                    let r = f.punch(off as u64, n as u64);
                    let (lo, hi) = (off.min(len), (off + n).min(len));
                    shadow[lo..hi].fill(0);
                    (lo..hi, r)
                }
                7 => {
                    let to = rng.below(MAX as u64) as usize;
                    let r = f.set_len(to as u64);
                    shadow.resize(to, 0);
                    (to.min(len)..len, r)
                }
                _ => {
                    let r = f.flush();
                    if r.is_ok() {
                        allowed.iter_mut().for_each(|a| *a = [0; 4]);
                        for (i, &v) in shadow.iter().enumerate() {
                            allow(&mut allowed, i, v);
                        }
                        for i in shadow.len()..allowed.len() {
                            allow(&mut allowed, i, 0);
                        }
                        lens = BTreeSet::from([shadow.len() as u64]);
                    }
                    (0..0, r)
                }
            };
            lens.insert(shadow.len() as u64);
            for i in touched {
                allow(&mut allowed, i, shadow.get(i).copied().unwrap_or(0));
            }
            if r.is_err() {
                break;
            }
            assert_eq!(d.read_all(&p("f")).unwrap(), shadow, "run {run}");
        }
        seeds
            .map(|seed| {
                let got = d.restart(seed).read_all(&p("f")).unwrap_or_default();
                if d.restart(seed).exists(&p("f")) {
                    assert!(lens.contains(&(got.len() as u64)), "run {run} seed {seed}: length {}", got.len());
                }
                for (i, &v) in got.iter().enumerate() {
                    assert!(
                        allowed[i][v as usize / 64] & (1 << (v % 64)) != 0,
                        "run {run} seed {seed}: byte {i} = {v}"
                    );
                }
                got
            })
            .collect()
    }

    #[test]
    fn random_workloads_restore_only_bytes_and_lengths_that_were_there() {
        for run in 0..300 {
            random_run(run, 0..20);
        }
    }

    #[test]
    fn same_calls_and_same_seed_give_the_same_disk() {
        let mut seeds_differ = false;
        for run in 0..30 {
            let a = random_run(run, 0..30);
            assert_eq!(a, random_run(run, 0..30), "run {run}");
            seeds_differ |= a.iter().any(|x| x != &a[0]);
        }
        assert!(seeds_differ);
    }
}
