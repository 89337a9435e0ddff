//! In-memory files for unit tests of the I/O path: a plain one and a faulty wrapper.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::Mutex;

use super::{Latch, StorageFile};

/// An in-memory volume for tests. [`MemVolume::new`] is a medium with no room past its
/// size (a write or a reservation there is ENOSPC); [`MemVolume::growable`] grows like a
/// file.
#[derive(Debug)]
pub struct MemVolume {
    bytes: Mutex<Vec<u8>>,
    grows: bool,
}

impl MemVolume {
    pub fn new(size_bytes: u64) -> MemVolume {
        MemVolume { bytes: Mutex::new(vec![0; size_bytes as usize]), grows: false }
    }

    pub fn growable(size_bytes: u64) -> MemVolume {
        MemVolume { grows: true, ..MemVolume::new(size_bytes) }
    }

    /// Make room up to `end`, or ENOSPC for a volume that does not grow.
    fn room(&self, bytes: &mut Vec<u8>, end: usize) -> io::Result<()> {
        if end > bytes.len() {
            if !self.grows {
                return Err(io::Error::from_raw_os_error(libc::ENOSPC));
            }
            bytes.resize(end, 0);
        }
        Ok(())
    }
}

impl StorageFile for MemVolume {
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
        self.room(&mut bytes, start + buf.len())?;
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
    fn set_len(&self, len_bytes: u64) -> io::Result<()> {
        self.bytes.lock().resize(len_bytes as usize, 0);
        Ok(())
    }
    fn reserve(&self, offset_bytes: u64, len_bytes: u64) -> io::Result<()> {
        self.room(&mut self.bytes.lock(), (offset_bytes + len_bytes) as usize)
    }
}

/// Wraps a volume and fails every operation after the first `ok_ops` with `errno`.
/// Used by tests to check that I/O errors reach the application and are latched.
#[derive(Debug)]
pub struct FaultyVolume<V: StorageFile> {
    inner: V,
    ops_left: AtomicU64,
    errno: i32,
    latch: Latch,
}

impl<V: StorageFile> FaultyVolume<V> {
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

impl<V: StorageFile> StorageFile for FaultyVolume<V> {
    fn read_at(&self, buf: &mut [u8], offset_bytes: u64) -> io::Result<()> {
        self.tick()?;
        self.inner.read_at(buf, offset_bytes)
    }
    fn write_at(&self, buf: &[u8], offset_bytes: u64) -> io::Result<()> {
        self.latch.check()?;
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
    fn set_len(&self, len_bytes: u64) -> io::Result<()> {
        let r = self.tick().and_then(|_| self.inner.set_len(len_bytes));
        self.latch.record(r)
    }
    fn reserve(&self, offset_bytes: u64, len_bytes: u64) -> io::Result<()> {
        self.tick().and_then(|_| self.inner.reserve(offset_bytes, len_bytes))
    }
    fn prezero(&self, offset_bytes: u64, len_bytes: u64) -> io::Result<bool> {
        self.tick().and_then(|_| self.inner.prezero(offset_bytes, len_bytes))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
