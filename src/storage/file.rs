//! The production side of the storage seam: files (and block devices) of the host.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::os::unix::io::{AsRawFd, RawFd};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use super::{copy_through, write_zeros, Copied, Disk, Latch, StorageFile};

/// A file of the host: a sparse volume image, the catalog's log, a snapshot.
#[derive(Debug)]
pub struct FileStorage {
    file: File,
    size_bytes: AtomicU64,
    latch: Latch,
    changes: Changes,
    /// Whether large reads and writes still ask for `RWF_DONTCACHE` ([`UNCACHED_WRITE_MIN_BYTES`]):
    /// cleared the first time the kernel refuses it.
    uncached: AtomicBool,
    /// Whether zeros written ahead pay ([`StorageFile::prezero`]): not on a block device,
    /// whose blocks exist whether written or not, nor where a write never overwrites in
    /// place (btrfs, ZFS: copy on write) or allocates nothing on the disk (tmpfs).
    prezero_pays: bool,
}

/// `statfs(2)`'s `f_type` of the file systems where zeros written ahead do not pay.
const NO_PREZERO_FS: [i64; 3] = [
    0x9123_683e, // btrfs
    0x2fc1_2fc1, // ZFS
    0x0102_1994, // tmpfs
];

/// Whether zeros written ahead pay for images in the directory (or file) `path`: false on
/// btrfs, ZFS or tmpfs, or if it cannot be opened.
pub fn prezero_pays_at(path: &Path) -> bool {
    File::open(path).is_ok_and(|f| prezero_pays(&f))
}

/// Whether `file`'s later overwrites get cheaper once its blocks are written (see
/// `prezero_pays`).
fn prezero_pays(file: &File) -> bool {
    if file.metadata().is_ok_and(|m| m.file_type().is_block_device()) {
        return false;
    }
    // SAFETY: statfs is plain data, all zeros is a valid value.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: fstatfs on an fd we own, into a struct it fills.
    let rc = unsafe { libc::fstatfs(file.as_raw_fd(), &mut st) };
    rc == 0 && !NO_PREZERO_FS.contains(&(st.f_type as i64))
}

/// A write of at least this many bytes goes through the host's page cache without staying
/// in it (`pwritev2` with `RWF_DONTCACHE`, Linux 6.14 and later): its writeback starts at
/// once, and the kernel drops its pages when they are clean again (as it can: a page locked
/// or dirtied again meanwhile stays). Reads of at least
/// [`UNCACHED_READ_MIN_BYTES`] do the same (`preadv2`). Two reasons:
/// - The mount's own page cache already holds what applications wrote and read through it
///   (read-write handles, `FOPEN_KEEP_CACHE`): a second copy in the image's page cache
///   doubles the memory a stream takes, for nothing the mount asks twice.
/// - A large read or write leaves large folios in the image's page cache (ext4 since
///   Linux 6.16), and a later 4 KiB write into one of them costs the whole folio: ext4 walks
///   each of its blocks, per write, under the image's inode lock. Measured here: 4 KiB
///   random writes from 4 jobs into files laid out with 1 MiB writes ran at 27-33 K IOPS
///   with the large folios, 89-109 K without (docs/benchmarks.md, seventh round).
///
/// Small writes stay cached, so repeated small overwrites still meet in the page cache
/// before they reach the disk. Nothing about durability changes: an uncached write is
/// still made durable only by a flush. A kernel or file system without `RWF_DONTCACHE`
/// (EOPNOTSUPP) gets plain reads and writes.
const UNCACHED_WRITE_MIN_BYTES: usize = 256 << 10;
/// See [`UNCACHED_WRITE_MIN_BYTES`]. Lower than for writes: an uncached read costs no disk
/// write, only the image's copy of what the mount's page cache now holds.
const UNCACHED_READ_MIN_BYTES: usize = 128 << 10;

/// Whether the file changed since its last flush, so that a flush with nothing to carry
/// costs no `fdatasync` (each one is a journal commit or a cache flush of the disk, which
/// every other writer's `fsync` on the same disk then waits behind). A count of changes,
/// taken after each change has returned, and the count the last successful flush covered.
/// A fresh handle counts one change: what an earlier process left in the page cache (a
/// daemon killed with -9) is made durable by the first flush.
#[derive(Debug)]
struct Changes {
    made: AtomicU64,
    flushed: AtomicU64,
}

impl Default for Changes {
    fn default() -> Changes {
        Changes { made: AtomicU64::new(1), flushed: AtomicU64::new(0) }
    }
}

impl Changes {
    /// After a change (a write, a punch, a copy, a new length) has returned, failed or not.
    fn note(&self) {
        self.made.fetch_add(1, Ordering::AcqRel);
    }

    /// Run `sync` unless every change that returned before this call is already covered
    /// by a successful flush. A change still in flight when the count is read is not an
    /// acknowledged one; it counts after it returns, so the next flush carries it.
    fn flush(&self, sync: impl FnOnce() -> io::Result<()>) -> io::Result<()> {
        let made = self.made.load(Ordering::Acquire);
        if self.flushed.load(Ordering::Acquire) >= made {
            return Ok(());
        }
        sync()?;
        self.flushed.fetch_max(made, Ordering::AcqRel);
        Ok(())
    }
}

impl FileStorage {
    /// Create a new sparse file of `size_bytes`; refuses an existing one. Created 0600:
    /// what ferryfs writes is its owner's alone.
    pub fn create(path: &Path, size_bytes: u64) -> io::Result<FileStorage> {
        let file = OpenOptions::new().read(true).write(true).create_new(true).mode(0o600).open(path)?;
        file.set_len(size_bytes)?;
        Ok(FileStorage::from_file(file, size_bytes))
    }

    /// A file (or block device) opened by the caller, used up to `size_bytes`.
    pub fn from_file(file: File, size_bytes: u64) -> FileStorage {
        let prezero_pays = prezero_pays(&file);
        FileStorage {
            file,
            size_bytes: AtomicU64::new(size_bytes),
            latch: Latch::default(),
            changes: Changes::default(),
            uncached: AtomicBool::new(true),
            prezero_pays,
        }
    }

    /// Open an existing file for reading and writing.
    pub fn open(path: &Path) -> io::Result<FileStorage> {
        let file = OpenOptions::new().read(true).write(true).open(path)?;
        let len = file.metadata()?.len();
        Ok(FileStorage::from_file(file, len))
    }

    /// Open a volume image; its length must be at least `size_bytes` (the catalog's size).
    /// Its [`StorageFile::size_bytes`] is its length (more, with a ring past its tracks:
    /// catalog/ring.rs).
    pub fn open_image(path: &Path, size_bytes: u64) -> io::Result<FileStorage> {
        let f = FileStorage::open(path)?;
        let actual = f.size_bytes();
        if actual < size_bytes {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("image is {actual} bytes, the catalog expects {size_bytes}"),
            ));
        }
        Ok(f)
    }

    /// One `preadv2` (`write` false, into `ptr`) or `pwritev2` (from `ptr`) of `len` bytes
    /// at `offset_bytes` with `RWF_DONTCACHE`, or `None` if the kernel refuses the flag
    /// (from then on this file does not ask again) or it is refused already.
    fn uncached_io(&self, write: bool, ptr: *mut u8, len: usize, offset_bytes: u64) -> Option<io::Result<usize>> {
        if !self.uncached.load(Ordering::Relaxed) {
            return None;
        }
        let iov = libc::iovec { iov_base: ptr.cast(), iov_len: len };
        let fd = self.file.as_raw_fd();
        let off = offset_bytes as libc::off_t;
        // SAFETY: one iovec over `len` bytes at `ptr`, which the caller borrows from a live
        // slice (mutably for a read), on an fd we own.
        let rc = unsafe {
            if write {
                libc::pwritev2(fd, &iov, 1, off, libc::RWF_DONTCACHE)
            } else {
                libc::preadv2(fd, &iov, 1, off, libc::RWF_DONTCACHE)
            }
        };
        if rc >= 0 {
            return Some(Ok(rc as usize));
        }
        let err = io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::EOPNOTSUPP) {
            self.uncached.store(false, Ordering::Relaxed);
            return None;
        }
        Some(Err(err))
    }

    /// All of `buf` at `offset_bytes`, uncached if it is large enough.
    fn write_whole_at(&self, buf: &[u8], offset_bytes: u64) -> io::Result<()> {
        let mut done = 0usize;
        while done < buf.len() {
            let rest = &buf[done..];
            let at = offset_bytes + done as u64;
            let r = match buf.len() >= UNCACHED_WRITE_MIN_BYTES {
                true => self.uncached_io(true, rest.as_ptr().cast_mut(), rest.len(), at),
                false => None,
            };
            match r.unwrap_or_else(|| self.file.write_at(rest, at)) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

impl StorageFile for FileStorage {
    fn read_at(&self, buf: &mut [u8], offset_bytes: u64) -> io::Result<()> {
        let uncached = buf.len() >= UNCACHED_READ_MIN_BYTES;
        let mut done = 0usize;
        while done < buf.len() {
            let rest = &mut buf[done..];
            let at = offset_bytes + done as u64;
            let r = match uncached {
                true => self.uncached_io(false, rest.as_mut_ptr(), rest.len(), at),
                false => None,
            };
            match r.unwrap_or_else(|| self.file.read_at(rest, at)) {
                Ok(0) => {
                    buf[done..].fill(0);
                    break;
                }
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset_bytes: u64) -> io::Result<()> {
        let r = self.latch.guard(|| self.write_whole_at(buf, offset_bytes));
        self.changes.note();
        r?;
        self.size_bytes.fetch_max(offset_bytes + buf.len() as u64, Ordering::AcqRel);
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        self.latch.check()?;
        self.changes.flush(|| self.latch.guard(|| self.file.sync_data()))
    }

    fn punch(&self, offset_bytes: u64, len_bytes: u64) -> io::Result<()> {
        if len_bytes == 0 {
            return Ok(());
        }
        self.latch.check()?;
        // SAFETY: fallocate on an fd we own, with plain integer arguments.
        let rc = unsafe {
            libc::fallocate(
                self.file.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                offset_bytes as libc::off_t,
                len_bytes as libc::off_t,
            )
        };
        self.changes.note();
        if rc == 0 {
            return Ok(());
        }
        let err = io::Error::last_os_error();
        match err.raw_os_error() {
            // The backing file system cannot punch: write zeros instead.
            Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) => write_zeros(self, offset_bytes, len_bytes),
            _ => self.latch.record(Err(err)),
        }
    }

    fn size_bytes(&self) -> u64 {
        self.size_bytes.load(Ordering::Acquire)
    }

    fn reserve(&self, offset_bytes: u64, len_bytes: u64) -> io::Result<()> {
        if len_bytes == 0 {
            return Ok(());
        }
        self.latch.check()?;
        // SAFETY: fallocate on an fd we own, with plain integer arguments.
        let rc =
            unsafe { libc::fallocate(self.file.as_raw_fd(), 0, offset_bytes as libc::off_t, len_bytes as libc::off_t) };
        if rc != 0 {
            let err = io::Error::last_os_error();
            return match err.raw_os_error() {
                Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) => Ok(()),
                _ => Err(err),
            };
        }
        // The length grew: the next flush must make it durable.
        self.changes.note();
        self.size_bytes.fetch_max(offset_bytes + len_bytes, Ordering::AcqRel);
        Ok(())
    }

    fn prezero(&self, offset_bytes: u64, len_bytes: u64) -> io::Result<bool> {
        static ZEROS: [u8; 64 << 10] = [0; 64 << 10];
        self.latch.check()?;
        if !self.prezero_pays {
            return Ok(false);
        }
        let mut done = 0u64;
        while done < len_bytes {
            let n = (len_bytes - done).min(ZEROS.len() as u64) as usize;
            // Not through the latch: a failure here loses nothing (the range reads as zeros
            // either way), so it must not fail the volume's later writes.
            match self.file.write_at(&ZEROS[..n], offset_bytes + done) {
                Ok(0) => return Err(io::Error::from(io::ErrorKind::WriteZero)),
                Ok(w) => done += w as u64,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
            self.changes.note();
        }
        self.size_bytes.fetch_max(offset_bytes + len_bytes, Ordering::AcqRel);
        Ok(true)
    }

    fn set_len(&self, len_bytes: u64) -> io::Result<()> {
        let r = self.latch.guard(|| self.file.set_len(len_bytes));
        self.changes.note();
        r?;
        self.size_bytes.store(len_bytes, Ordering::Release);
        Ok(())
    }

    fn writeback(&self, offset_bytes: u64, len_bytes: u64, wait: bool) -> io::Result<()> {
        let flags = if wait {
            libc::SYNC_FILE_RANGE_WAIT_BEFORE | libc::SYNC_FILE_RANGE_WRITE | libc::SYNC_FILE_RANGE_WAIT_AFTER
        } else {
            libc::SYNC_FILE_RANGE_WRITE
        };
        let fd = self.file.as_raw_fd();
        let (off, len) = (offset_bytes as libc::off64_t, len_bytes as libc::off64_t);
        // SAFETY: sync_file_range on an fd we own, with plain integer arguments. Not every
        // file system has it, and this is pacing, not durability: its result is ignored.
        let rc = unsafe { libc::sync_file_range(fd, off, len, flags) };
        if wait && rc == 0 {
            // The range is on the disk: let its pages go, as an uncached write's do
            // (UNCACHED_WRITE_MIN_BYTES). The kernel keeps any page written again meanwhile.
            // SAFETY: posix_fadvise on an fd we own; advice only, its result is ignored.
            let _ = unsafe { libc::posix_fadvise(fd, off, len, libc::POSIX_FADV_DONTNEED) };
        }
        Ok(())
    }

    fn raw_fd(&self) -> Option<RawFd> {
        Some(self.file.as_raw_fd())
    }

    /// From another host file, `copy_file_range`: the bytes stay in the kernel (no copy to
    /// and from a user buffer; a file system that can share extents may not copy them at
    /// all). Whatever the kernel refuses or fails (another file system: EXDEV; no support:
    /// EOPNOTSUPP, ENOSYS; overlapping ranges of one file: EINVAL; a media error) is copied
    /// through `buf` from where it stopped, so an error is reported, and latched, as the
    /// buffered path's read or write would report it.
    fn copy_from(
        &self,
        source: &dyn StorageFile,
        source_offset_bytes: u64,
        offset_bytes: u64,
        len_bytes: u64,
        buf: &mut [u8],
    ) -> io::Result<Copied> {
        let Some(source_fd) = source.raw_fd() else {
            return copy_through(source, self, source_offset_bytes, offset_bytes, len_bytes, buf);
        };
        self.latch.check()?;
        let mut done = 0u64;
        while done < len_bytes {
            let mut off_in = (source_offset_bytes + done) as libc::loff_t;
            let mut off_out = (offset_bytes + done) as libc::loff_t;
            // SAFETY: copy_file_range between two fds that stay open for the call (ours, and
            // the source's, borrowed through `source`), with offsets in locals it updates.
            let rc = unsafe {
                libc::copy_file_range(
                    source_fd,
                    &mut off_in,
                    self.file.as_raw_fd(),
                    &mut off_out,
                    (len_bytes - done) as usize,
                    0,
                )
            };
            if rc > 0 {
                done += rc as u64;
                self.changes.note();
                continue;
            }
            // 0: the source's end (the rest reads as zeros); an error: the buffered path
            // copies the rest and reports what it meets.
            if rc < 0 && io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                continue;
            }
            break;
        }
        self.size_bytes.fetch_max(offset_bytes + done, Ordering::AcqRel);
        let rest = copy_through(source, self, source_offset_bytes + done, offset_bytes + done, len_bytes - done, buf)?;
        Ok(Copied { in_kernel_bytes: done, ..rest })
    }
}

/// The host's file system.
#[derive(Debug, Default, Clone, Copy)]
pub struct RealDisk;

impl Disk for RealDisk {
    fn create_new(&self, path: &Path, size_bytes: u64) -> io::Result<Arc<dyn StorageFile>> {
        Ok(Arc::new(FileStorage::create(path, size_bytes)?))
    }

    fn open(&self, path: &Path) -> io::Result<Arc<dyn StorageFile>> {
        Ok(Arc::new(FileStorage::open(path)?))
    }

    fn read_all(&self, path: &Path) -> io::Result<Vec<u8>> {
        std::fs::read(path)
    }

    fn exists(&self, path: &Path) -> bool {
        path.exists()
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        std::fs::rename(from, to)
    }

    fn remove(&self, path: &Path) -> io::Result<()> {
        std::fs::remove_file(path)
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        File::open(dir)?.sync_all()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_roundtrip_punch_and_latch() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.img");
        let v = FileStorage::create(&path, 1 << 20).unwrap();
        v.write_at(&[7u8; 8192], 4096).unwrap();
        let mut buf = vec![0u8; 8192];
        v.read_at(&mut buf, 4096).unwrap();
        assert!(buf.iter().all(|&b| b == 7));
        v.punch(4096, 4096).unwrap();
        v.read_at(&mut buf, 4096).unwrap();
        assert!(buf[..4096].iter().all(|&b| b == 0));
        assert!(buf[4096..].iter().all(|&b| b == 7));
        v.flush().unwrap();
        assert!(FileStorage::create(&path, 1 << 20).is_err(), "create refuses an existing file");
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
    }

    /// Large reads and writes (uncached where the file system has `RWF_DONTCACHE`, plain
    /// where it refuses it: tmpfs does) read back byte for byte, unaligned, next to small
    /// ones, and past the file's end as zeros.
    #[test]
    fn large_reads_and_writes_round_trip_uncached_or_not() {
        let disk = tempfile::tempdir().unwrap();
        let shm = std::path::Path::new("/dev/shm").is_dir().then(|| tempfile::tempdir_in("/dev/shm").unwrap());
        for dir in std::iter::once(disk.path()).chain(shm.as_ref().map(|d| d.path())) {
            let v = FileStorage::create(&dir.join("v.img"), 4 << 20).unwrap();
            let big: Vec<u8> = (0..(1usize << 20) + 4096 + 3).map(|i| (i * 7 + i / 4096) as u8).collect();
            let at = 4096 + 17;
            v.write_at(&big, at).unwrap();
            v.write_at(&[9u8; 100], at + 300_000).unwrap();
            let mut want = big.clone();
            want[300_000..300_100].fill(9);
            let mut got = vec![0u8; big.len()];
            v.read_at(&mut got, at).unwrap();
            assert!(got == want, "{}: a large read returns what the writes left", dir.display());
            let mut small = vec![0u8; 5000];
            v.read_at(&mut small, at + 299_000).unwrap();
            assert_eq!(small[..], want[299_000..304_000], "{}: a small read too", dir.display());
            // Past the end: the large read reads zeros where the file ends.
            v.set_len(at + 200_000).unwrap();
            let mut tail = vec![1u8; 256 << 10];
            v.read_at(&mut tail, at).unwrap();
            assert_eq!(tail[..200_000], want[..200_000]);
            assert!(tail[200_000..].iter().all(|&b| b == 0), "{}: zeros past the end", dir.display());
            v.flush().unwrap();
        }
    }

    /// Does the file system under `dir` take `RWF_DONTCACHE`? Asked of a file of its own.
    fn takes_dontcache(dir: &Path) -> bool {
        let f = File::create(dir.join("probe")).unwrap();
        let byte = [0u8; 1];
        let iov = libc::iovec { iov_base: byte.as_ptr() as *mut libc::c_void, iov_len: 1 };
        // SAFETY: one iovec over a live one-byte array, on an fd we own.
        unsafe { libc::pwritev2(f.as_raw_fd(), &iov, 1, 0, libc::RWF_DONTCACHE) == 1 }
    }

    /// A large write asks for `RWF_DONTCACHE` and keeps asking where the file system takes
    /// it (ext4 on Linux 6.14 and later); where it is refused (tmpfs, older kernels) the
    /// file stops asking after the first refusal, and the bytes are written all the same.
    /// A small write does not ask.
    #[test]
    fn large_writes_ask_for_uncached_io_until_refused() {
        let disk = tempfile::tempdir().unwrap();
        let shm = std::path::Path::new("/dev/shm").is_dir().then(|| tempfile::tempdir_in("/dev/shm").unwrap());
        for dir in std::iter::once(disk.path()).chain(shm.as_ref().map(|d| d.path())) {
            let takes = takes_dontcache(dir);
            eprintln!("RWF_DONTCACHE under {}: {takes}", dir.display());
            let v = FileStorage::create(&dir.join("v.img"), 4 << 20).unwrap();
            v.write_at(&vec![4u8; UNCACHED_WRITE_MIN_BYTES - 1], 0).unwrap();
            assert!(v.uncached.load(Ordering::Relaxed), "a small write does not ask");
            v.write_at(&vec![4u8; UNCACHED_WRITE_MIN_BYTES], 0).unwrap();
            assert_eq!(
                v.uncached.load(Ordering::Relaxed),
                takes,
                "{}: asked, and kept asking only if taken",
                dir.display()
            );
            let mut buf = vec![0u8; UNCACHED_WRITE_MIN_BYTES];
            v.read_at(&mut buf, 0).unwrap();
            assert!(buf.iter().all(|&b| b == 4), "{}: the large write is there", dir.display());
        }
    }

    /// Pages of `path` resident in the host's page cache, per 4 KiB page (`mincore` over a
    /// mapping of it; mapping a file touches none of its pages).
    fn resident(path: &Path) -> Vec<bool> {
        let f = File::open(path).unwrap();
        let len = f.metadata().unwrap().len() as usize;
        let mut vec = vec![0u8; len.div_ceil(4096)];
        // SAFETY: a read-only shared mapping of a file kept open until it is unmapped, and
        // mincore's one byte per page into a vector of that many bytes.
        unsafe {
            let m = libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ, libc::MAP_SHARED, f.as_raw_fd(), 0);
            assert_ne!(m, libc::MAP_FAILED);
            assert_eq!(libc::mincore(m, len, vec.as_mut_ptr()), 0);
            libc::munmap(m, len);
        }
        vec.iter().map(|&b| b & 1 == 1).collect()
    }

    /// A waited writeback (the copier's, chunk by chunk) leaves the range on the disk and
    /// out of the host's page cache; pages outside it stay cached, and the bytes read back.
    #[test]
    fn a_waited_writeback_lets_the_range_go() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.img");
        let v = FileStorage::create(&path, 1 << 20).unwrap();
        for i in 0..64u64 {
            v.write_at(&[i as u8; 4096], i * 4096).unwrap();
        }
        v.write_at(&[9u8; 4096], 512 << 10).unwrap();
        let before = resident(&path);
        assert!(before[..64].iter().all(|&r| r) && before[128], "small writes are cached");
        v.writeback(0, 64 * 4096, false).unwrap();
        v.writeback(0, 64 * 4096, true).unwrap();
        let after = resident(&path);
        assert_eq!(after[..64].iter().filter(|&&r| r).count(), 0, "the range written back left the cache");
        assert!(after[128], "a page outside the range stays cached");
        let mut buf = [0u8; 4096];
        v.read_at(&mut buf, 63 * 4096).unwrap();
        assert!(buf.iter().all(|&b| b == 63));
    }

    /// A flush syncs once after changes and never for nothing; the first flush of a fresh
    /// handle syncs (an earlier process may have left unflushed pages); a failed sync leaves
    /// the changes to the next flush.
    #[test]
    fn a_flush_syncs_only_what_changed() {
        let c = Changes::default();
        let syncs = std::cell::Cell::new(0);
        let ok = || {
            syncs.set(syncs.get() + 1);
            Ok(())
        };
        c.flush(ok).unwrap();
        c.flush(ok).unwrap();
        assert_eq!(syncs.get(), 1, "a fresh handle syncs once, then nothing changed");
        c.note();
        c.note();
        c.flush(ok).unwrap();
        c.flush(ok).unwrap();
        assert_eq!(syncs.get(), 2);
        c.note();
        assert!(c.flush(|| Err(io::Error::other("EIO"))).is_err());
        c.flush(ok).unwrap();
        assert_eq!(syncs.get(), 3, "a failed sync leaves the change to the next flush");
    }

    /// Between two host files the bytes stay in the kernel; from a memory volume they go
    /// through the buffer in pieces of its size; past the source's end they copy as zeros.
    #[test]
    fn copy_from_in_kernel_or_through_the_buffer() {
        let dir = tempfile::tempdir().unwrap();
        let source = FileStorage::create(&dir.path().join("s.img"), 1 << 20).unwrap();
        let target = FileStorage::create(&dir.path().join("t.img"), 1 << 20).unwrap();
        let bytes: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        source.write_at(&bytes, 4096).unwrap();
        let mut buf = [0u8; 64 << 10];
        let c = target.copy_from(&source, 4096, 8192, bytes.len() as u64, &mut buf).unwrap();
        assert_eq!(c, Copied { in_kernel_bytes: bytes.len() as u64, buffered_writes: 0 });
        let mut back = vec![0u8; bytes.len()];
        target.read_at(&mut back, 8192).unwrap();
        assert_eq!(back, bytes);

        let mem = crate::storage::mem::MemVolume::new(1 << 20);
        mem.write_at(&bytes, 0).unwrap();
        let c = target.copy_from(&mem, 0, 512 << 10, bytes.len() as u64, &mut buf).unwrap();
        assert_eq!(c, Copied { in_kernel_bytes: 0, buffered_writes: 5 }, "300,000 bytes in 64 KiB pieces");
        target.read_at(&mut back, 512 << 10).unwrap();
        assert_eq!(back, bytes);

        // The source file ends at 1 MiB; what lies past it copies as zeros.
        target.write_at(&[9u8; 8192], 0).unwrap();
        let c = target.copy_from(&source, (1 << 20) - 4096, 0, 8192, &mut buf).unwrap();
        assert_eq!(c.in_kernel_bytes, 4096);
        let mut tail = [1u8; 8192];
        target.read_at(&mut tail, 0).unwrap();
        assert!(tail.iter().all(|&b| b == 0));

        // What the kernel refuses goes through the buffer from where it stopped: overlapping
        // ranges of one file are EINVAL.
        let c = target.copy_from(&target, 8192, 8192 + 4096, 16384, &mut buf).unwrap();
        assert_eq!(c, Copied { in_kernel_bytes: 0, buffered_writes: 1 });
        let mut moved = vec![0u8; 16384];
        target.read_at(&mut moved, 8192 + 4096).unwrap();
        assert_eq!(moved, bytes[..16384]);
    }
}
