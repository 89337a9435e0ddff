//! A volume's I/O counters: [`Counted`] wraps a [`StorageFile`] and counts what passes
//! through it, so that every volume I/O of the mount (applications' reads and writes, the
//! copier's, zeroing, flushes) is counted in one place whatever path issued it. The engine
//! wraps each volume it opens; `.ferry/metrics` shows the counts (src/metrics.rs).
//!
//! The cost on the I/O path is two relaxed atomic adds per call (operations and bytes):
//! no lock, no ordering with anything else. A reader sees each counter on its own; two
//! counters read one after the other may be a few operations apart, which a rate over
//! seconds does not notice.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use std::os::unix::io::RawFd;

use super::{Copied, StorageFile};

/// The kinds of volume operation an error is counted under.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IoOp {
    Read,
    Write,
    Flush,
    Punch,
    Writeback,
}

impl IoOp {
    pub const ALL: [IoOp; 5] = [IoOp::Read, IoOp::Write, IoOp::Flush, IoOp::Punch, IoOp::Writeback];

    pub fn name(self) -> &'static str {
        match self {
            IoOp::Read => "read",
            IoOp::Write => "write",
            IoOp::Flush => "flush",
            IoOp::Punch => "punch",
            IoOp::Writeback => "writeback",
        }
    }
}

/// One volume's counters since the mount opened it. Operations and bytes count calls that
/// succeeded; a call that failed counts once in `errors`, under its kind.
#[derive(Debug, Default)]
pub struct IoCounters {
    reads: AtomicU64,
    read_bytes: AtomicU64,
    writes: AtomicU64,
    written_bytes: AtomicU64,
    flushes: AtomicU64,
    punches: AtomicU64,
    punched_bytes: AtomicU64,
    errors: [AtomicU64; IoOp::ALL.len()],
}

/// The counters of one volume, read at one moment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IoSnapshot {
    pub reads: u64,
    pub read_bytes: u64,
    pub writes: u64,
    pub written_bytes: u64,
    pub flushes: u64,
    pub punches: u64,
    pub punched_bytes: u64,
    /// Failed calls, indexed like [`IoOp::ALL`].
    pub errors: [u64; IoOp::ALL.len()],
}

impl IoSnapshot {
    pub fn errors_of(&self, op: IoOp) -> u64 {
        self.errors[op as usize]
    }
}

fn add(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

impl IoCounters {
    pub fn snapshot(&self) -> IoSnapshot {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        IoSnapshot {
            reads: get(&self.reads),
            read_bytes: get(&self.read_bytes),
            writes: get(&self.writes),
            written_bytes: get(&self.written_bytes),
            flushes: get(&self.flushes),
            punches: get(&self.punches),
            punched_bytes: get(&self.punched_bytes),
            errors: std::array::from_fn(|i| get(&self.errors[i])),
        }
    }

    /// Count `r`, the outcome of one `op`: `ops` and `bytes` on success, an error otherwise.
    fn count<T>(&self, op: IoOp, r: io::Result<T>, done: impl FnOnce(&IoCounters)) -> io::Result<T> {
        match &r {
            Ok(_) => done(self),
            Err(_) => add(&self.errors[op as usize], 1),
        }
        r
    }
}

/// A [`StorageFile`] whose every call is counted in its [`IoCounters`]. Behaves exactly as
/// the file it wraps (errors, latches and all).
#[derive(Debug)]
pub struct Counted {
    inner: Arc<dyn StorageFile>,
    counters: Arc<IoCounters>,
}

impl Counted {
    pub fn new(inner: Arc<dyn StorageFile>, counters: Arc<IoCounters>) -> Counted {
        Counted { inner, counters }
    }
}

impl StorageFile for Counted {
    fn read_at(&self, buf: &mut [u8], offset_bytes: u64) -> io::Result<()> {
        let n = buf.len() as u64;
        let r = self.inner.read_at(buf, offset_bytes);
        self.counters.count(IoOp::Read, r, |c| {
            add(&c.reads, 1);
            add(&c.read_bytes, n);
        })
    }

    fn write_at(&self, buf: &[u8], offset_bytes: u64) -> io::Result<()> {
        let r = self.inner.write_at(buf, offset_bytes);
        self.counters.count(IoOp::Write, r, |c| {
            add(&c.writes, 1);
            add(&c.written_bytes, buf.len() as u64);
        })
    }

    fn flush(&self) -> io::Result<()> {
        let r = self.inner.flush();
        self.counters.count(IoOp::Flush, r, |c| add(&c.flushes, 1))
    }

    fn punch(&self, offset_bytes: u64, len_bytes: u64) -> io::Result<()> {
        let r = self.inner.punch(offset_bytes, len_bytes);
        self.counters.count(IoOp::Punch, r, |c| {
            add(&c.punches, 1);
            add(&c.punched_bytes, len_bytes);
        })
    }

    fn size_bytes(&self) -> u64 {
        self.inner.size_bytes()
    }

    fn set_len(&self, len_bytes: u64) -> io::Result<()> {
        self.inner.set_len(len_bytes)
    }

    fn reserve(&self, offset_bytes: u64, len_bytes: u64) -> io::Result<()> {
        self.inner.reserve(offset_bytes, len_bytes)
    }

    fn prezero(&self, offset_bytes: u64, len_bytes: u64) -> io::Result<bool> {
        let r = self.inner.prezero(offset_bytes, len_bytes);
        let wrote = matches!(r, Ok(true));
        self.counters.count(IoOp::Write, r, |c| {
            if wrote {
                add(&c.writes, 1);
                add(&c.written_bytes, len_bytes);
            }
        })
    }

    fn writeback(&self, offset_bytes: u64, len_bytes: u64, wait: bool) -> io::Result<()> {
        let r = self.inner.writeback(offset_bytes, len_bytes, wait);
        self.counters.count(IoOp::Writeback, r, |_| {})
    }

    fn raw_fd(&self) -> Option<RawFd> {
        self.inner.raw_fd()
    }

    /// Counted as this volume's writes (one for the in-kernel part, one per buffered piece)
    /// and, for the bytes copied within the kernel, as one read of the source; the buffered
    /// pieces' reads went through the source's `read_at` and were counted there.
    fn copy_from(
        &self,
        source: &dyn StorageFile,
        source_offset_bytes: u64,
        offset_bytes: u64,
        len_bytes: u64,
        buf: &mut [u8],
    ) -> io::Result<Copied> {
        let r = self.inner.copy_from(source, source_offset_bytes, offset_bytes, len_bytes, buf);
        let copied = *r.as_ref().unwrap_or(&Copied::default());
        if copied.in_kernel_bytes > 0 {
            source.note_copied_out(copied.in_kernel_bytes);
        }
        self.counters.count(IoOp::Write, r, |c| {
            add(&c.writes, copied.buffered_writes + u64::from(copied.in_kernel_bytes > 0));
            add(&c.written_bytes, len_bytes);
        })
    }

    fn note_copied_out(&self, len_bytes: u64) {
        add(&self.counters.reads, 1);
        add(&self.counters.read_bytes, len_bytes);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::mem::{FaultyVolume, MemVolume};

    #[test]
    fn counts_what_passes_and_what_fails() {
        let c = Arc::new(IoCounters::default());
        let v = Counted::new(Arc::new(MemVolume::new(1 << 20)), c.clone());
        v.write_at(&[7u8; 4096], 0).unwrap();
        v.write_at(&[7u8; 100], 8192).unwrap();
        let mut buf = [0u8; 512];
        v.read_at(&mut buf, 0).unwrap();
        v.flush().unwrap();
        v.punch(0, 4096).unwrap();
        let s = c.snapshot();
        assert_eq!((s.writes, s.written_bytes), (2, 4196));
        assert_eq!((s.reads, s.read_bytes), (1, 512));
        assert_eq!((s.flushes, s.punches, s.punched_bytes), (1, 1, 4096));
        assert_eq!(s.errors, [0; 5]);

        // A volume that fails: the failures are counted under their kind, not as I/O done.
        let c = Arc::new(IoCounters::default());
        let v = Counted::new(Arc::new(FaultyVolume::new(MemVolume::new(1 << 20), 1, libc::EIO)), c.clone());
        v.write_at(&[1u8; 10], 0).unwrap();
        assert!(v.write_at(&[1u8; 10], 10).is_err());
        assert!(v.flush().is_err(), "a latched failure fails the flush too");
        let s = c.snapshot();
        assert_eq!((s.writes, s.written_bytes, s.flushes), (1, 10, 0));
        assert_eq!(s.errors_of(IoOp::Write), 1);
        assert_eq!(s.errors_of(IoOp::Flush), 1);
    }

    /// A copy counts as the target's writes and the source's reads, whichever way it went:
    /// in the kernel (one read and one write of the whole range) or through a buffer (a read
    /// and a write per piece).
    #[test]
    fn counts_a_copy_on_both_sides() {
        let dir = tempfile::tempdir().unwrap();
        let (sc, tc) = (Arc::new(IoCounters::default()), Arc::new(IoCounters::default()));
        let file = |name: &str| -> Arc<dyn StorageFile> {
            Arc::new(crate::storage::FileStorage::create(&dir.path().join(name), 1 << 20).unwrap())
        };
        let source = Counted::new(file("s.img"), sc.clone());
        let target = Counted::new(file("t.img"), tc.clone());
        source.write_at(&[3u8; 200 << 10], 0).unwrap();
        let mut buf = [0u8; 64 << 10];
        target.copy_from(&source, 0, 0, 200 << 10, &mut buf).unwrap();
        let (s, t) = (sc.snapshot(), tc.snapshot());
        assert_eq!((s.reads, s.read_bytes), (1, 200 << 10));
        assert_eq!((t.writes, t.written_bytes), (1, 200 << 10));

        let (mc, nc) = (Arc::new(IoCounters::default()), Arc::new(IoCounters::default()));
        let source = Counted::new(Arc::new(MemVolume::new(1 << 20)), mc.clone());
        let target = Counted::new(Arc::new(MemVolume::new(1 << 20)), nc.clone());
        target.copy_from(&source, 0, 0, 200 << 10, &mut buf).unwrap();
        let (s, t) = (mc.snapshot(), nc.snapshot());
        assert_eq!((s.reads, s.read_bytes), (4, 200 << 10));
        assert_eq!((t.writes, t.written_bytes), (4, 200 << 10));
    }
}
