//! The catalog's durable store: a snapshot plus an append-only log of checksummed frames.
//!
//! ```text
//! POOL/catalog.snap   header (magic "FYSN", version, generation, length) + postcard(Catalog) + crc32c
//! POOL/catalog.log    header (magic "FYLG", version, generation) + frames
//! frame               magic "FYOP" | version u16 | reserved u16 | length u32 | header crc32c
//!                     | postcard(Op) | crc32c
//! ```
//!
//! Why our own log and not an embedded store: every op is one `pwrite` of a few dozen bytes
//! into the log, which lands in the kernel's page cache before the op is acknowledged, so a
//! kill -9 of the mount loses nothing that returned, with no fsync per op. `fsync()` from an
//! application is one `fdatasync` of the log. Nothing ever rewrites the whole catalog on the
//! I/O path: compaction (a new snapshot) happens at mount, at clean unmount and when the log
//! passes [`LOG_COMPACT_BYTES`]. docs/format.md draws every record.
//!
//! Replay rules: a log whose generation is older than the snapshot's was already folded into
//! it and is ignored. A tail that is a strict prefix of a frame (or zeros) is a torn append
//! that was never acknowledged, and is cut off. Anything else that fails its magic, length or
//! checksum is corruption: the store refuses to open and says where.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::model::{ApplyError, Catalog, Freed, Op};

pub const SNAP_FILE: &str = "catalog.snap";
pub const LOG_FILE: &str = "catalog.log";
const SNAP_MAGIC: &[u8; 4] = b"FYSN";
const LOG_MAGIC: &[u8; 4] = b"FYLG";
const FRAME_MAGIC: &[u8; 4] = b"FYOP";
/// Version of every record of the store; bumped on any incompatible change. Version 2 added
/// the migration journal (jobs, plans, closed volumes) to the snapshot and its ops to the log;
/// version 1 stores are read (their ops are a subset) and rewritten as version 2.
pub const FORMAT_VERSION: u16 = 2;
const FORMAT_VERSIONS_READ: [u16; 2] = [1, 2];
const SNAP_HEADER_BYTES: usize = 4 + 2 + 2 + 8 + 8;
const LOG_HEADER_BYTES: usize = 4 + 2 + 2 + 8 + 4;
/// magic, version, reserved, payload length, and a checksum of those 12 bytes: a length
/// field can't be corrupted into "the log ends here" without the header checksum noticing.
const FRAME_HEADER_BYTES: usize = 4 + 2 + 2 + 4 + 4;
/// A frame's payload is one op; the largest (a symlink or a grow of a fragmented data set)
/// is a few KiB. Anything bigger is a corrupt length field, not a record.
const FRAME_PAYLOAD_MAX_BYTES: usize = 1 << 20;
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
    pub torn_tail_bytes: u64,
    pub log_bytes: u64,
}

pub struct Store {
    dir: PathBuf,
    generation: u64,
    /// None when opened read-only.
    log: Option<Arc<File>>,
    log_len_bytes: u64,
    pub catalog: Catalog,
}

impl Store {
    /// Write the first snapshot and an empty log of a new pool.
    pub fn create(dir: &Path, catalog: Catalog) -> Result<Store, StoreError> {
        let mut s = Store { dir: dir.to_path_buf(), generation: 0, log: None, log_len_bytes: 0, catalog };
        s.compact()?;
        Ok(s)
    }

    /// Load the catalog. `writable` opens the log for appends (the caller holds the pool
    /// lock); read-only opens never write a byte.
    pub fn open(dir: &Path, writable: bool) -> Result<(Store, OpenReport), StoreError> {
        // A read-only open races the mount's compaction: it can read the old snapshot and
        // then the new log. The generations tell, and a second read sees a consistent pair.
        let mut tries = if writable { 1 } else { COMPACTION_RACE_RETRIES };
        loop {
            match Self::open_once(dir, writable) {
                Err(StoreError::Corrupt { what, .. }) if tries > 1 && what.contains(NEWER_LOG) => tries -= 1,
                other => return other,
            }
        }
    }

    fn open_once(dir: &Path, writable: bool) -> Result<(Store, OpenReport), StoreError> {
        let snap_path = dir.join(SNAP_FILE);
        let snap = match fs::read(&snap_path) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(StoreError::NotAPool { path: dir.into() }),
            Err(e) => return Err(io_err(&snap_path)(e)),
        };
        let (generation, catalog) = decode_snapshot(&snap_path, &snap)?;
        let mut s = Store { dir: dir.to_path_buf(), generation, log: None, log_len_bytes: 0, catalog };
        let mut report = OpenReport { generation, ..Default::default() };

        let log_path = dir.join(LOG_FILE);
        let log_bytes = match fs::read(&log_path) {
            Ok(b) => Some(b),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(io_err(&log_path)(e)),
        };
        let mut replay_log = false;
        if let Some(bytes) = &log_bytes {
            let log_gen = decode_log_header(&log_path, bytes)?;
            if log_gen > generation {
                return Err(StoreError::Corrupt {
                    path: log_path,
                    what: format!("log generation {log_gen} {NEWER_LOG} generation {generation}"),
                });
            }
            if log_gen == generation {
                replay_log = true;
                let (ops, valid_len) = decode_frames(&log_path, bytes)?;
                for (offset, op) in ops {
                    s.catalog.apply(&op).map_err(|source| StoreError::BadOp {
                        path: log_path.clone(),
                        offset,
                        source,
                    })?;
                    report.ops_replayed += 1;
                }
                report.torn_tail_bytes = bytes.len() as u64 - valid_len;
                report.log_bytes = valid_len;
                s.log_len_bytes = valid_len;
            }
        }
        if writable {
            if replay_log {
                let f = OpenOptions::new().read(true).write(true).open(&log_path).map_err(io_err(&log_path))?;
                if report.torn_tail_bytes > 0 {
                    f.set_len(s.log_len_bytes).map_err(io_err(&log_path))?;
                    f.sync_all().map_err(io_err(&log_path))?;
                }
                s.log = Some(Arc::new(f));
            } else {
                // Missing or stale log: start the snapshot's generation afresh.
                s.start_log()?;
            }
        }
        Ok((s, report))
    }

    pub fn log_len_bytes(&self) -> u64 {
        self.log_len_bytes
    }

    /// Append `op` to the log, then apply it. The op is in the kernel's page cache (so it
    /// survives a crash of this process) before this returns; it is durable against power
    /// loss after the next [`Store::sync`]. If the op doesn't apply, nothing is written.
    pub fn commit(&mut self, op: Op) -> Result<Freed, StoreError> {
        let log = self.log.clone().ok_or(StoreError::ReadOnly)?;
        // Check first on a dry run, so a refused op never reaches the log.
        self.catalog.check(&op)?;
        let frame = encode_frame(&op);
        let path = self.dir.join(LOG_FILE);
        if let Err(e) = log.write_all_at(&frame, self.log_len_bytes) {
            // Cut off whatever part of the frame landed, so later frames follow a valid one.
            let _ = log.set_len(self.log_len_bytes);
            return Err(io_err(&path)(e));
        }
        self.log_len_bytes += frame.len() as u64;
        let freed = self.catalog.apply(&op).expect("op was checked against this state");
        Ok(freed)
    }

    /// What a sync must make durable now, taken under the catalog lock; its
    /// [`SyncPoint::sync`] runs outside it. (Placeholder: to be replaced by monotonic marks.)
    pub fn sync_point(&self) -> SyncPoint {
        SyncPoint { log: self.log.clone(), path: self.dir.join(LOG_FILE) }
    }

    /// The log file, to `fdatasync` without holding the catalog lock.
    pub fn log_handle(&self) -> Option<Arc<File>> {
        self.log.clone()
    }

    /// Sync, or if the log failed, rewrite the catalog whole. (Placeholder.)
    pub fn sync_or_rewrite(&mut self) -> Result<(), StoreError> {
        self.sync()
    }

    /// Whether the log failed a write or a sync: the next commit compacts first.
    pub fn log_failed(&self) -> bool {
        false
    }

    pub fn sync(&self) -> Result<(), StoreError> {
        if let Some(log) = &self.log {
            log.sync_data().map_err(io_err(&self.dir.join(LOG_FILE)))?;
        }
        Ok(())
    }

    pub fn needs_compaction(&self) -> bool {
        self.log_len_bytes > LOG_COMPACT_BYTES
    }

    /// Fold the log into a new snapshot: write the snapshot to a temp file, fsync, rename,
    /// fsync the directory; then the same for a new empty log of the new generation. A crash
    /// between the two leaves a new snapshot and an old-generation log, which open() ignores.
    pub fn compact(&mut self) -> Result<(), StoreError> {
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
        replace_file(&self.dir, SNAP_FILE, &snap)?;
        self.generation = generation;
        self.start_log()
    }

    fn start_log(&mut self) -> Result<(), StoreError> {
        let mut header = Vec::with_capacity(LOG_HEADER_BYTES);
        header.extend_from_slice(LOG_MAGIC);
        header.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        header.extend_from_slice(&0u16.to_le_bytes());
        header.extend_from_slice(&self.generation.to_le_bytes());
        let crc = crc32c::crc32c(&header);
        header.extend_from_slice(&crc.to_le_bytes());
        replace_file(&self.dir, LOG_FILE, &header)?;
        let path = self.dir.join(LOG_FILE);
        let f = OpenOptions::new().read(true).write(true).open(&path).map_err(io_err(&path))?;
        self.log = Some(Arc::new(f));
        self.log_len_bytes = LOG_HEADER_BYTES as u64;
        Ok(())
    }
}

/// A sync of the log up to a point, done outside the catalog lock.
pub struct SyncPoint {
    log: Option<Arc<File>>,
    path: PathBuf,
}

impl SyncPoint {
    pub fn sync(&self) -> Result<(), StoreError> {
        if let Some(log) = &self.log {
            log.sync_data().map_err(io_err(&self.path))?;
        }
        Ok(())
    }
}

/// Write `bytes` to `dir/name` atomically: temp file, fsync, rename, fsync of the directory.
pub fn replace_file(dir: &Path, name: &str, bytes: &[u8]) -> Result<(), StoreError> {
    let tmp = dir.join(format!("{name}.tmp"));
    let dst = dir.join(name);
    {
        let f = File::create(&tmp).map_err(io_err(&tmp))?;
        f.write_all_at(bytes, 0).map_err(io_err(&tmp))?;
        f.sync_all().map_err(io_err(&tmp))?;
    }
    fs::rename(&tmp, &dst).map_err(io_err(&dst))?;
    File::open(dir).and_then(|d| d.sync_all()).map_err(io_err(dir))?;
    Ok(())
}

/// A version 1 snapshot: the catalog before the migration journal.
#[derive(serde::Deserialize)]
struct CatalogV1 {
    geometry: crate::geometry::Geometry,
    next_ino: super::model::Ino,
    next_volume: u32,
    volumes: std::collections::BTreeMap<crate::space::VolumeId, super::model::VolumeRec>,
    inodes: std::collections::HashMap<super::model::Ino, super::model::Inode>,
}

impl From<CatalogV1> for Catalog {
    fn from(v: CatalogV1) -> Catalog {
        Catalog {
            geometry: v.geometry,
            next_ino: v.next_ino,
            next_volume: v.next_volume,
            volumes: v.volumes,
            inodes: v.inodes,
            next_job: 1,
            jobs: Default::default(),
            plans: Default::default(),
            closed_volumes: Default::default(),
        }
    }
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
    let decoded = if version == 1 {
        postcard::from_bytes::<CatalogV1>(body).map(Catalog::from)
    } else {
        postcard::from_bytes::<Catalog>(body)
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

pub fn encode_frame(op: &Op) -> Vec<u8> {
    let payload = postcard::to_stdvec(op).expect("an op serializes");
    let mut f = Vec::with_capacity(FRAME_HEADER_BYTES + payload.len() + 4);
    f.extend_from_slice(FRAME_MAGIC);
    f.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    f.extend_from_slice(&0u16.to_le_bytes());
    f.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    let header_crc = crc32c::crc32c(&f[..12]);
    f.extend_from_slice(&header_crc.to_le_bytes());
    f.extend_from_slice(&payload);
    let crc = crc32c::crc32c(&f[4..]);
    f.extend_from_slice(&crc.to_le_bytes());
    f
}

/// Decode the frames after the log header. Returns the ops with their offsets, and the
/// length of the valid prefix (anything after it is a torn append).
fn decode_frames(path: &Path, b: &[u8]) -> Result<(Vec<(u64, Op)>, u64), StoreError> {
    let mut ops = Vec::new();
    let mut at = LOG_HEADER_BYTES;
    while at < b.len() {
        let rest = &b[at..];
        if rest.len() < FRAME_HEADER_BYTES {
            let n = rest.len().min(4);
            if rest[..n] == FRAME_MAGIC[..n] || rest.iter().all(|&x| x == 0) {
                break; // a torn append
            }
            return Err(corrupt(path, format!("garbage after the last frame at byte {at}")));
        }
        if &rest[..4] != FRAME_MAGIC {
            if rest.iter().all(|&x| x == 0) {
                break;
            }
            return Err(corrupt(path, format!("frame at byte {at} has a bad magic")));
        }
        let header_crc = u32::from_le_bytes(rest[12..16].try_into().unwrap());
        if header_crc != crc32c::crc32c(&rest[..12]) {
            return Err(corrupt(path, format!("frame header at byte {at} fails its checksum")));
        }
        let version = u16::from_le_bytes([rest[4], rest[5]]);
        let len = u32::from_le_bytes(rest[8..12].try_into().unwrap()) as usize;
        if len > FRAME_PAYLOAD_MAX_BYTES {
            return Err(corrupt(path, format!("frame at byte {at} claims {len} bytes")));
        }
        let total = FRAME_HEADER_BYTES + len + 4;
        if rest.len() < total {
            // The header is intact and says the frame runs past the end of the file: the
            // last append was cut short (never acknowledged).
            break;
        }
        let crc = u32::from_le_bytes(rest[total - 4..total].try_into().unwrap());
        if crc != crc32c::crc32c(&rest[4..total - 4]) {
            return Err(corrupt(path, format!("frame at byte {at} fails its checksum")));
        }
        if !FORMAT_VERSIONS_READ.contains(&version) {
            return Err(corrupt(path, format!("frame at byte {at} has format version {version}")));
        }
        let op: Op = postcard::from_bytes(&rest[FRAME_HEADER_BYTES..total - 4])
            .map_err(|e| corrupt(path, format!("frame at byte {at} does not decode: {e}")))?;
        ops.push((at as u64, op));
        at += total;
    }
    Ok((ops, at as u64))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::model::{Meta, NewKind, ROOT_INO};
    use crate::geometry::Geometry;

    fn meta() -> Meta {
        Meta { perm: 0o755, uid: 0, gid: 0, nlink: 2, atime_ns: 0, mtime_ns: 0, ctime_ns: 0 }
    }

    fn mk(s: &mut Store, ino: u64, name: &str) {
        s.commit(Op::MakeNode { ino, parent: ROOT_INO, name: name.into(), meta: meta(), kind: NewKind::File }).unwrap();
    }

    #[test]
    fn log_replays_and_compaction_keeps_state() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Store::create(dir.path(), Catalog::new(Geometry::new(4096).unwrap(), meta())).unwrap();
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

    #[test]
    fn torn_tail_is_cut_and_corruption_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Store::create(dir.path(), Catalog::new(Geometry::new(4096).unwrap(), meta())).unwrap();
        mk(&mut s, 2, "a");
        mk(&mut s, 3, "b");
        drop(s);
        let log = dir.path().join(LOG_FILE);
        let bytes = fs::read(&log).unwrap();
        // Torn: the last frame cut short.
        fs::write(&log, &bytes[..bytes.len() - 3]).unwrap();
        let (s, r) = Store::open(dir.path(), true).unwrap();
        assert_eq!(r.ops_replayed, 1);
        assert!(r.torn_tail_bytes > 0);
        assert!(s.catalog.lookup(ROOT_INO, b"b").is_none());
        drop(s);
        // Corrupt: a flipped byte inside the first frame.
        let mut bytes = fs::read(&log).unwrap();
        bytes[LOG_HEADER_BYTES + FRAME_HEADER_BYTES + 2] ^= 0x40;
        fs::write(&log, &bytes).unwrap();
        let e = Store::open(dir.path(), false).err().unwrap();
        assert!(e.to_string().contains("fails its checksum"), "{e}");
        bytes[LOG_HEADER_BYTES + FRAME_HEADER_BYTES + 2] ^= 0x40;
        // Corrupt: a length field that points past the end is not mistaken for a torn tail.
        bytes[LOG_HEADER_BYTES + 10] ^= 0x01;
        fs::write(&log, &bytes).unwrap();
        let e = Store::open(dir.path(), false).err().unwrap();
        assert!(e.to_string().contains("header at byte"), "{e}");
        // Corrupt snapshot.
        let snap = dir.path().join(SNAP_FILE);
        let mut b = fs::read(&snap).unwrap();
        let n = b.len();
        b[n - 5] ^= 1; // the last payload byte
        fs::write(&snap, &b).unwrap();
        let e = Store::open(dir.path(), false).err().unwrap();
        assert!(e.to_string().contains("checksum"), "{e}");
    }
}
