//! One volume image: positional reads and writes, flush, hole punching.
//!
//! All volume I/O goes through the narrow [`VolumeIo`] seam. Production uses [`FileVolume`]
//! (a sparse image file on any file system); tests use [`MemVolume`] and [`FaultyVolume`].
//!
//! Failure policy: the first failed write or flush is latched. After it, every later
//! `flush` reports the latched error too, because a failed fsync may have dropped dirty pages
//! and a later fsync that "succeeds" would lie about them. Reads keep working.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::sync::atomic::{AtomicI32, AtomicU64, Ordering};

use parking_lot::Mutex;

/// The storage seam: every byte of a data set goes through these five calls.
pub trait VolumeIo: Send + Sync + std::fmt::Debug {
    /// Fill `buf` from `offset_bytes`. Bytes past the image's end read as zeros.
    fn read_at(&self, buf: &mut [u8], offset_bytes: u64) -> io::Result<()>;
    fn write_at(&self, buf: &[u8], offset_bytes: u64) -> io::Result<()>;
    /// Make every completed write durable (fdatasync).
    fn flush(&self) -> io::Result<()>;
    /// Make the range read as zeros, releasing its space where the file system can.
    fn punch(&self, offset_bytes: u64, len_bytes: u64) -> io::Result<()>;
    fn size_bytes(&self) -> u64;
    /// Push a written range to the disk (`wait`: and wait until it is there). A pacing aid
    /// for bulk writers, not a durability point: `flush` is.
    fn writeback(&self, _offset_bytes: u64, _len_bytes: u64, _wait: bool) -> io::Result<()> {
        Ok(())
    }
}

/// Remembers the first write/flush failure of a volume (an errno), so that no later flush
/// reports success over lost data.
#[derive(Debug, Default)]
struct Latch {
    errno: AtomicI32,
}

impl Latch {
    fn check(&self) -> io::Result<()> {
        match self.errno.load(Ordering::Acquire) {
            0 => Ok(()),
            e => Err(io::Error::from_raw_os_error(e)),
        }
    }
    fn record<T>(&self, r: io::Result<T>) -> io::Result<T> {
        if let Err(e) = &r {
            let errno = e.raw_os_error().unwrap_or(libc::EIO);
            let _ = self.errno.compare_exchange(0, errno, Ordering::AcqRel, Ordering::Acquire);
        }
        r
    }
}

/// A volume image file. Sparse: created with `set_len`, so untouched tracks cost no disk.
#[derive(Debug)]
pub struct FileVolume {
    file: File,
    size_bytes: u64,
    latch: Latch,
}

impl FileVolume {
    /// Create a new sparse image; refuses an existing file.
    pub fn create(path: &Path, size_bytes: u64) -> io::Result<FileVolume> {
        let file = OpenOptions::new().read(true).write(true).create_new(true).open(path)?;
        file.set_len(size_bytes)?;
        file.sync_all()?;
        Ok(FileVolume { file, size_bytes, latch: Latch::default() })
    }

    /// Open an existing image; its length must be at least `size_bytes`.
    pub fn open(path: &Path, size_bytes: u64) -> io::Result<FileVolume> {
        let file = OpenOptions::new().read(true).write(true).open(path)?;
        let actual = file.metadata()?.len();
        if actual < size_bytes {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("image is {actual} bytes, the catalog expects {size_bytes}"),
            ));
        }
        Ok(FileVolume { file, size_bytes, latch: Latch::default() })
    }
}

impl VolumeIo for FileVolume {
    fn read_at(&self, buf: &mut [u8], offset_bytes: u64) -> io::Result<()> {
        let mut done = 0usize;
        while done < buf.len() {
            match self.file.read_at(&mut buf[done..], offset_bytes + done as u64) {
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
        debug_assert!(offset_bytes + buf.len() as u64 <= self.size_bytes);
        self.latch.record(self.file.write_all_at(buf, offset_bytes))
    }

    fn flush(&self) -> io::Result<()> {
        self.latch.check()?;
        self.latch.record(self.file.sync_data())
    }

    fn punch(&self, offset_bytes: u64, len_bytes: u64) -> io::Result<()> {
        if len_bytes == 0 {
            return Ok(());
        }
        // SAFETY: fallocate on an fd we own, with plain integer arguments.
        let rc = unsafe {
            libc::fallocate(
                self.file.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                offset_bytes as libc::off_t,
                len_bytes as libc::off_t,
            )
        };
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
        self.size_bytes
    }

    fn writeback(&self, offset_bytes: u64, len_bytes: u64, wait: bool) -> io::Result<()> {
        let flags = if wait {
            libc::SYNC_FILE_RANGE_WAIT_BEFORE | libc::SYNC_FILE_RANGE_WRITE | libc::SYNC_FILE_RANGE_WAIT_AFTER
        } else {
            libc::SYNC_FILE_RANGE_WRITE
        };
        // SAFETY: sync_file_range on an fd we own, with plain integer arguments.
        let rc = unsafe {
            libc::sync_file_range(
                self.file.as_raw_fd(),
                offset_bytes as libc::off64_t,
                len_bytes as libc::off64_t,
                flags,
            )
        };
        if rc == 0 {
            Ok(())
        } else {
            // Not every file system has it; this is pacing, not durability.
            Ok(())
        }
    }
}

/// Largest zero buffer written at once when a punch falls back to writing zeros.
const ZERO_CHUNK_BYTES: usize = 1 << 20;

fn write_zeros(v: &dyn VolumeIo, offset_bytes: u64, len_bytes: u64) -> io::Result<()> {
    let zeros = vec![0u8; ZERO_CHUNK_BYTES.min(len_bytes as usize)];
    let mut done = 0u64;
    while done < len_bytes {
        let n = (len_bytes - done).min(zeros.len() as u64) as usize;
        v.write_at(&zeros[..n], offset_bytes + done)?;
        done += n as u64;
    }
    Ok(())
}

/// An in-memory volume for tests.
#[derive(Debug)]
pub struct MemVolume {
    bytes: Mutex<Vec<u8>>,
}

impl MemVolume {
    pub fn new(size_bytes: u64) -> MemVolume {
        MemVolume { bytes: Mutex::new(vec![0; size_bytes as usize]) }
    }
}

impl VolumeIo for MemVolume {
    fn read_at(&self, buf: &mut [u8], offset_bytes: u64) -> io::Result<()> {
        let bytes = self.bytes.lock();
        let start = offset_bytes as usize;
        let end = (start + buf.len()).min(bytes.len());
        let n = end.saturating_sub(start);
        buf[..n].copy_from_slice(&bytes[start..start + n]);
        buf[n..].fill(0);
        Ok(())
    }
    fn write_at(&self, buf: &[u8], offset_bytes: u64) -> io::Result<()> {
        let mut bytes = self.bytes.lock();
        let start = offset_bytes as usize;
        if start + buf.len() > bytes.len() {
            return Err(io::Error::from_raw_os_error(libc::ENOSPC));
        }
        bytes[start..start + buf.len()].copy_from_slice(buf);
        Ok(())
    }
    fn flush(&self) -> io::Result<()> {
        Ok(())
    }
    fn punch(&self, offset_bytes: u64, len_bytes: u64) -> io::Result<()> {
        let mut bytes = self.bytes.lock();
        let start = offset_bytes as usize;
        let end = (start + len_bytes as usize).min(bytes.len());
        bytes[start..end].fill(0);
        Ok(())
    }
    fn size_bytes(&self) -> u64 {
        self.bytes.lock().len() as u64
    }
}

/// Wraps a volume and fails every operation after the first `ok_ops` with `errno`.
/// Used by tests to check that I/O errors reach the application and are latched.
#[derive(Debug)]
pub struct FaultyVolume<V: VolumeIo> {
    inner: V,
    ops_left: AtomicU64,
    errno: i32,
    latch: Latch,
}

impl<V: VolumeIo> FaultyVolume<V> {
    pub fn new(inner: V, ok_ops: u64, errno: i32) -> Self {
        FaultyVolume { inner, ops_left: AtomicU64::new(ok_ops), errno, latch: Latch::default() }
    }
    fn tick(&self) -> io::Result<()> {
        let left = self.ops_left.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1));
        match left {
            Ok(_) => Ok(()),
            Err(_) => Err(io::Error::from_raw_os_error(self.errno)),
        }
    }
}

impl<V: VolumeIo> VolumeIo for FaultyVolume<V> {
    fn read_at(&self, buf: &mut [u8], offset_bytes: u64) -> io::Result<()> {
        self.tick()?;
        self.inner.read_at(buf, offset_bytes)
    }
    fn write_at(&self, buf: &[u8], offset_bytes: u64) -> io::Result<()> {
        let r = self.tick().and_then(|_| self.inner.write_at(buf, offset_bytes));
        self.latch.record(r)
    }
    fn flush(&self) -> io::Result<()> {
        self.latch.check()?;
        let r = self.tick().and_then(|_| self.inner.flush());
        self.latch.record(r)
    }
    fn punch(&self, offset_bytes: u64, len_bytes: u64) -> io::Result<()> {
        let r = self.tick().and_then(|_| self.inner.punch(offset_bytes, len_bytes));
        self.latch.record(r)
    }
    fn size_bytes(&self) -> u64 {
        self.inner.size_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_volume_roundtrip_and_punch() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.img");
        let v = FileVolume::create(&path, 1 << 20).unwrap();
        v.write_at(&[7u8; 8192], 4096).unwrap();
        let mut buf = vec![0u8; 8192];
        v.read_at(&mut buf, 4096).unwrap();
        assert!(buf.iter().all(|&b| b == 7));
        v.punch(4096, 4096).unwrap();
        v.read_at(&mut buf, 4096).unwrap();
        assert!(buf[..4096].iter().all(|&b| b == 0));
        assert!(buf[4096..].iter().all(|&b| b == 7));
        v.flush().unwrap();
        assert!(FileVolume::create(&path, 1 << 20).is_err(), "create refuses an existing image");
    }

    #[test]
    fn faulty_volume_latches_the_first_failure() {
        let v = FaultyVolume::new(MemVolume::new(65536), 2, libc::EIO);
        v.write_at(&[1; 10], 0).unwrap();
        v.flush().unwrap();
        let e = v.write_at(&[1; 10], 0).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EIO));
        // Even if the device recovered, a flush after a failed write must not succeed.
        v.ops_left.store(100, Ordering::Release);
        assert_eq!(v.flush().unwrap_err().raw_os_error(), Some(libc::EIO));
    }
}
