//! The storage seam: everything ferryfs persists (volume images, the catalog's log and
//! snapshot) goes through [`StorageFile`] and [`Disk`].
//!
//! - Production: [`file::FileStorage`] (a file or block device opened by path) and
//!   [`file::RealDisk`] (the host's file system).
//! - Tests: [`sim::SimDisk`], a simulated disk that keeps the writes made since the last
//!   sync apart from the synced ones, and whose power cut drops, keeps or tears them (a seed
//!   chooses); [`mem::MemVolume`] and [`mem::FaultyVolume`] for unit tests of the I/O path.
//!
//! Every volume the engine opens is wrapped in a [`counted::Counted`], which counts its I/O
//! for `.ferry/metrics` (two relaxed atomic adds per call).
//!
//! Failure policy, the same for every implementation: the first failed write, punch or
//! flush of a file is latched. After it every later write and flush of that open file
//! reports the latched error, because a failed fsync may have dropped dirty pages and a later
//! fsync that "succeeds" would lie about them. Only a new open of the file (a remount, or a
//! catalog compaction that writes a new file) starts afresh. Reads keep working.

pub mod counted;
pub mod file;
pub mod mem;
pub mod sim;

use std::fmt::Debug;
use std::io;
use std::os::unix::io::RawFd;
use std::path::Path;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::Arc;

pub use file::{FileStorage, RealDisk};

/// One persistent file: positional reads and writes, flush, hole punching.
pub trait StorageFile: Send + Sync + Debug {
    /// Fill `buf` from `offset_bytes`. Bytes past the file's end read as zeros.
    fn read_at(&self, buf: &mut [u8], offset_bytes: u64) -> io::Result<()>;
    fn write_at(&self, buf: &[u8], offset_bytes: u64) -> io::Result<()>;
    /// Make every completed write durable, and the file's length (fdatasync).
    fn flush(&self) -> io::Result<()>;
    /// Make the range read as zeros, releasing its space where the medium can.
    fn punch(&self, offset_bytes: u64, len_bytes: u64) -> io::Result<()>;
    /// The file's length now. A volume image's length is its size, fixed at creation, plus
    /// its ring while it has one (catalog/ring.rs).
    fn size_bytes(&self) -> u64;
    /// Cut or extend the file to `len_bytes` (extended bytes read as zeros).
    fn set_len(&self, len_bytes: u64) -> io::Result<()>;
    /// Take the medium's space for a range now (the file grows to cover it; the range reads
    /// as zeros where nothing was written), so that a later write into it cannot fail for
    /// want of space. A failure writes nothing and is not latched. Media that cannot
    /// reserve (a device, a file system without `fallocate`) do nothing.
    fn reserve(&self, _offset_bytes: u64, _len_bytes: u64) -> io::Result<()> {
        Ok(())
    }
    /// Write zeros over a range that reads as zeros already, so that the host's file system
    /// allocates its blocks now: a later write there is an overwrite, and the flush after it
    /// commits no allocation (docs/design.md, "Zeros ahead of a synced append"). Returns
    /// whether it wrote them: media where it does not pay (memory, a block device, a
    /// copy-on-write or memory file system: storage/file.rs) write nothing. Best effort: a
    /// failure (no space on the host) is returned but not latched, and the range still reads
    /// as zeros.
    fn prezero(&self, _offset_bytes: u64, _len_bytes: u64) -> io::Result<bool> {
        Ok(false)
    }
    /// Push a written range to the disk (`wait`: and wait until it is there, then let the
    /// host's page cache drop the range's clean pages, as it drops a large write's:
    /// storage/file.rs). A pacing aid for bulk writers, not a durability point: `flush` is.
    fn writeback(&self, _offset_bytes: u64, _len_bytes: u64, _wait: bool) -> io::Result<()> {
        Ok(())
    }
    /// The descriptor of the host file underneath, for a copy that keeps the bytes in the
    /// kernel ([`StorageFile::copy_from`]); `None` for anything that is not a host file (a
    /// memory or simulated volume). Wrappers forward their inner file's.
    fn raw_fd(&self) -> Option<RawFd> {
        None
    }
    /// Copy `len_bytes` of `source` at `source_offset_bytes` into this file at
    /// `offset_bytes`, as `source.read_at` then `self.write_at` would: the source is read at
    /// the time of the call (the monitor's ordering, monitor.rs, holds as for a read), bytes
    /// past the source's end copy as zeros, and a failure is this file's write failure. The
    /// default goes through `buf` in pieces of at most its length (the caller's bound on
    /// memory); a host file copies within the kernel when the source is one too.
    fn copy_from(
        &self,
        source: &dyn StorageFile,
        source_offset_bytes: u64,
        offset_bytes: u64,
        len_bytes: u64,
        buf: &mut [u8],
    ) -> io::Result<Copied> {
        copy_through(source, self, source_offset_bytes, offset_bytes, len_bytes, buf)
    }
    /// Count `len_bytes` read from this file by a copy that did not call `read_at` (an
    /// in-kernel [`StorageFile::copy_from`] into another file): the counting wrapper counts
    /// them as one read; every other file ignores it.
    fn note_copied_out(&self, _len_bytes: u64) {}
}

/// How [`StorageFile::copy_from`] moved the bytes, so that the counting wrappers count each
/// side as what it did: the bytes copied within the kernel were never read through the
/// source's `read_at`, the rest were (and counted there).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Copied {
    /// Bytes copied within the kernel (`copy_file_range`), in one or more calls.
    pub in_kernel_bytes: u64,
    /// Writes through a buffer (each after a `read_at` of the source).
    pub buffered_writes: u64,
}
/// The buffered copy: `len_bytes` of `source` into `target`, through `buf` in pieces of at
/// most its length.
pub fn copy_through(
    source: &dyn StorageFile,
    target: &(impl StorageFile + ?Sized),
    source_offset_bytes: u64,
    offset_bytes: u64,
    len_bytes: u64,
    buf: &mut [u8],
) -> io::Result<Copied> {
    assert!(!buf.is_empty() || len_bytes == 0, "a buffered copy needs a buffer");
    let mut done = 0u64;
    let mut buffered_writes = 0u64;
    while done < len_bytes {
        let n = (len_bytes - done).min(buf.len() as u64) as usize;
        source.read_at(&mut buf[..n], source_offset_bytes + done)?;
        target.write_at(&buf[..n], offset_bytes + done)?;
        done += n as u64;
        buffered_writes += 1;
    }
    Ok(Copied { in_kernel_bytes: 0, buffered_writes })
}

/// Where files live: opening and creating them, and the namespace operations a crash-safe
/// replace needs (rename, directory sync).
pub trait Disk: Send + Sync + Debug {
    /// A new file of `size_bytes` (sparse, reads as zeros). Refuses an existing path
    /// (`AlreadyExists`). Neither the file nor its name is durable before a flush and a
    /// [`Disk::sync_dir`] of its directory.
    fn create_new(&self, path: &Path, size_bytes: u64) -> io::Result<Arc<dyn StorageFile>>;
    /// An existing file, for reading and writing.
    fn open(&self, path: &Path) -> io::Result<Arc<dyn StorageFile>>;
    /// The whole file (`NotFound` if there is none).
    fn read_all(&self, path: &Path) -> io::Result<Vec<u8>>;
    fn exists(&self, path: &Path) -> bool;
    /// Atomically replace `to` with `from` (durable after a sync of the directory).
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()>;
    fn remove(&self, path: &Path) -> io::Result<()>;
    /// Make the directory's entries durable (creates, renames, removes in it).
    fn sync_dir(&self, dir: &Path) -> io::Result<()>;
}

/// The production disk.
pub fn real() -> Arc<dyn Disk> {
    Arc::new(RealDisk)
}

/// Write `bytes` to `dir/name` atomically: temp file, flush, rename, sync of the directory.
/// After a power cut `dir/name` holds either its old contents or `bytes`, whole.
pub fn replace_file(disk: &dyn Disk, dir: &Path, name: &str, bytes: &[u8]) -> io::Result<()> {
    let tmp = dir.join(format!("{name}.tmp"));
    let dst = dir.join(name);
    if disk.exists(&tmp) {
        disk.remove(&tmp)?;
    }
    {
        let f = disk.create_new(&tmp, 0)?;
        f.write_at(bytes, 0)?;
        f.flush()?;
    }
    disk.rename(&tmp, &dst)?;
    disk.sync_dir(dir)
}

/// Remembers the first write/flush failure of an open file (an errno), so that no later
/// flush reports success over lost data.
#[derive(Debug, Default)]
pub struct Latch {
    errno: AtomicI32,
}

impl Latch {
    /// The latched error, if any.
    pub fn check(&self) -> io::Result<()> {
        match self.errno.load(Ordering::Acquire) {
            0 => Ok(()),
            e => Err(io::Error::from_raw_os_error(e)),
        }
    }

    /// Pass `r` through, latching its error (the first one wins).
    pub fn record<T>(&self, r: io::Result<T>) -> io::Result<T> {
        if let Err(e) = &r {
            let errno = e.raw_os_error().unwrap_or(libc::EIO);
            let _ = self.errno.compare_exchange(0, errno, Ordering::AcqRel, Ordering::Acquire);
        }
        r
    }

    /// Run `op` unless an error is latched; latch its error.
    pub fn guard<T>(&self, op: impl FnOnce() -> io::Result<T>) -> io::Result<T> {
        self.check()?;
        self.record(op())
    }
}

/// Largest zero buffer written at once when a punch falls back to writing zeros.
const ZERO_CHUNK_BYTES: usize = 1 << 20;

/// Write zeros over a range (for media that cannot punch holes).
pub fn write_zeros(v: &dyn StorageFile, offset_bytes: u64, len_bytes: u64) -> io::Result<()> {
    let zeros = vec![0u8; ZERO_CHUNK_BYTES.min(len_bytes as usize)];
    let mut done = 0u64;
    while done < len_bytes {
        let n = (len_bytes - done).min(zeros.len() as u64) as usize;
        v.write_at(&zeros[..n], offset_bytes + done)?;
        done += n as u64;
    }
    Ok(())
}
