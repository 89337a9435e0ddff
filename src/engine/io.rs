//! Extent I/O of data sets: read, write, truncate, fallocate and fsync, with the monitor's
//! hooks (marks and mirrored writes) in one place.

use std::collections::BTreeSet;
use std::ops::Range;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::{volume_of, Engine, Error, FileNode, Result, Volumes};
use crate::catalog::model::now_ns;
use crate::catalog::model::{Body, Ino, Op};
use crate::catalog::ring::{self, Ring};
use crate::catalog::store::RingTail;
use crate::extent_map::{ExtentMap, Piece};
use crate::geometry::Geometry;
use crate::layout::lay_out;
use crate::space::{plan_growth, FreeMap, VolumeId};
use log::{debug, warn};
use parking_lot::RwLockReadGuard;

/// How far past its size a data set that grows by synced appends gets zeros written ahead
/// ([`Engine::zeros_ahead`]): 64 appends of 4 KiB, for one flush that allocates.
pub const ZEROS_AHEAD_BYTES: u64 = 256 << 10;
const PAGE_BYTES: u64 = 4096;

/// Write `data` at logical `offset` of a data set mapped by `map`.
pub fn write_pieces(volumes: &Volumes, map: &ExtentMap, offset: u64, data: &[u8]) -> Result<()> {
    for p in map.pieces(offset, data.len()) {
        match p {
            Piece::Mapped { volume, offset_bytes, buf_start, len } => {
                volume_of(volumes, volume)?.write_at(&data[buf_start..buf_start + len], offset_bytes)?
            }
            Piece::Unallocated { .. } => return Err(Error::os(libc::EIO)),
        }
    }
    Ok(())
}

/// Read `buf.len()` bytes at logical `offset` of a data set mapped by `map` (zeros past it).
pub fn read_pieces(volumes: &Volumes, map: &ExtentMap, offset: u64, buf: &mut [u8]) -> Result<()> {
    for p in map.pieces(offset, buf.len()) {
        match p {
            Piece::Mapped { volume, offset_bytes, buf_start, len } => {
                volume_of(volumes, volume)?.read_at(&mut buf[buf_start..buf_start + len], offset_bytes)?
            }
            Piece::Unallocated { buf_start, len } => buf[buf_start..buf_start + len].fill(0),
        }
    }
    Ok(())
}

/// Write the parts of `data` at logical `offset` that `map` maps; returns whether any part
/// fell in a hole (a mirrored write to a target that does not map the track yet).
pub fn write_mapped_pieces(volumes: &Volumes, map: &ExtentMap, offset: u64, data: &[u8]) -> Result<bool> {
    let mut missed = false;
    for p in map.pieces(offset, data.len()) {
        match p {
            Piece::Mapped { volume, offset_bytes, buf_start, len } => {
                volume_of(volumes, volume)?.write_at(&data[buf_start..buf_start + len], offset_bytes)?
            }
            Piece::Unallocated { .. } => missed = true,
        }
    }
    Ok(missed)
}

/// Make logical bytes `range` of a data set mapped by `map` read as zeros (punched; holes
/// read as zeros already).
pub fn zero_pieces(volumes: &Volumes, map: &ExtentMap, range: Range<u64>) -> Result<()> {
    let end = range.end.min(map.end_bytes());
    if end <= range.start {
        return Ok(());
    }
    for p in map.pieces(range.start, (end - range.start) as usize) {
        if let Piece::Mapped { volume, offset_bytes, len, .. } = p {
            volume_of(volumes, volume)?.punch(offset_bytes, len as u64)?;
        }
    }
    Ok(())
}

impl FileNode {
    /// Bytes `changed` of the data set now read as zeros (a punch, a zero range, a truncate's
    /// cut), under the monitor. `zero` (inside `changed` and the source's allocation) is
    /// zeroed on the source here; the rest of `changed` reads as zeros already, or lies past
    /// the size and is about to be cut.
    ///
    /// With no job, or no mirrored writes, the source is zeroed and then the tracks are
    /// marked (after the change reached the source, as for a write: monitor.rs). With
    /// mirrored writes on, the part below the copied mark is changed like a mirrored write:
    /// under the tracks' stripe locks, on the source and on the target alike, and not marked;
    /// only the part past the copied mark is marked. So a job whose applications punch, zero
    /// and truncate converges like one whose applications only write: once mirrored writes
    /// are on, its dirty set only shrinks.
    fn zero_monitored(&self, g: Geometry, volumes: &Volumes, zero: Range<u64>, changed: Range<u64>) -> Result<()> {
        let link = self.job.load();
        let Some(l) = link.as_ref().filter(|_| changed.end > changed.start) else {
            return zero_pieces(volumes, &self.map.load(), zero);
        };
        // Tracks below the copied mark stay below it: the mark never goes down.
        let split = if l.mirroring() { changed.end.min(g.bytes_of(l.copied_tracks())) } else { changed.start };
        if split > changed.start {
            let _stripes = l.lock_tracks(g.track_of(changed.start).0, g.track_of(split - 1).0);
            zero_pieces(volumes, &self.map.load(), zero)?;
            let target = l.target.load();
            let end = split.min(target.end_bytes());
            if end > changed.start {
                if let Err(e) = zero_pieces(volumes, &target, changed.start..end) {
                    // The source has the change; the job fails, not the application's call.
                    l.fail_target(format!("mirrored zeroing of the target: {e}"));
                    l.dirty.mark(g.track_of(changed.start), g.track_of(split - 1));
                }
            }
            l.mirrored_writes.fetch_add(1, Ordering::Relaxed);
        } else {
            zero_pieces(volumes, &self.map.load(), zero)?;
        }
        // Tracks past the target's last reserved track were never copied (the copier writes
        // only where the target maps), and are copied afresh when the target grows to them:
        // no mark. (Read after the source changed: a copy that read the old bytes had reserved
        // its tracks before that.) A truncate's cut reaches into the over-provisioned tail,
        // which no target reserves.
        let mark_end = changed.end.min(l.target.load().end_bytes());
        if mark_end > split {
            l.dirty.mark(g.track_of(split), g.track_of(mark_end - 1));
        }
        Ok(())
    }

    /// Write `data` at `offset` of the source, under the monitor: if a job mirrors the
    /// tracks, to the source and the target under their stripe locks, with no mark (unless
    /// the target does not map a track yet: a write that filled a hole of the source, whose
    /// tracks the copier reserves and copies at its next pass); otherwise to the source, then
    /// the mark (after the bytes landed: see monitor.rs).
    fn write_monitored(&self, g: Geometry, volumes: &Volumes, offset: u64, data: &[u8]) -> Result<()> {
        let map = self.map.load();
        let link = self.job.load();
        let Some(l) = link.as_ref().filter(|_| !data.is_empty()) else {
            return write_pieces(volumes, &map, offset, data);
        };
        let (first, last) = (g.track_of(offset), g.track_of(offset + data.len() as u64 - 1));
        match l.mirror_guard(first.0, last.0) {
            Some(_guard) => {
                write_pieces(volumes, &map, offset, data)?;
                match write_mapped_pieces(volumes, &l.target.load(), offset, data) {
                    Ok(false) => {
                        l.mirrored_writes.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(true) => l.dirty.mark(first, last),
                    // The source has the bytes; the job fails, not the application's write.
                    Err(e) => {
                        l.fail_target(format!("mirrored write to the target: {e}"));
                        l.dirty.mark(first, last);
                    }
                }
            }
            None => {
                write_pieces(volumes, &map, offset, data)?;
                l.dirty.mark(first, last);
            }
        }
        Ok(())
    }
}

impl Engine {
    /// Map the holes among the tracks of bytes `offset..end_bytes` of a data set. Growth
    /// past its last mapped track is over-provisioned (space.rs), unless `explicit` (a
    /// fallocate: exactly the range, and kept past the size as preallocation). Called with
    /// the gate held shared (mapping only adds tracks).
    fn grow(&self, node: &FileNode, offset: u64, end_bytes: u64, explicit: bool) -> Result<()> {
        let g = self.geometry;
        let (t0, t1) = (g.track_of(offset).0, g.tracks_for(end_bytes));
        let prealloc_end = if explicit { t1 } else { 0 };
        let mut cat = self.catalog.lock();
        let mut reclaimed = false;
        let runs = loop {
            // Read again after a reclaim: it may have trimmed this very data set (a truncate by
            // path builds a node that is not in the table of open ones).
            let (layout, kept) = match cat.catalog.get(node.ino).map(|i| &i.body) {
                Some(Body::File { layout, prealloc_end, .. }) => (layout, *prealloc_end),
                _ => return Err(Error::NotFound),
            };
            let mut holes = layout.holes_in(t0..t1);
            let needed: u64 = holes.iter().map(|h| h.end - h.start).sum();
            if needed == 0 {
                if prealloc_end > kept {
                    self.commit(&mut cat, Op::Map { ino: node.ino, runs: Vec::new(), prealloc_end })?;
                }
                self.refresh_map(&cat, node);
                return Ok(());
            }
            // Appending (the range starts at or before the last mapped track and reaches past
            // it) is over-provisioned like any growth; filling a hole, or a write far past
            // the end, takes exactly the tracks it needs.
            let appending = !explicit && t0 <= layout.end() && t1 > layout.end();
            let (last, allocated) = match holes.first() {
                Some(h) => (layout.slice(0..h.start).last().map(|r| r.extent), layout.tail_span()),
                None => (None, 0),
            };
            // Volumes that a merge or drain is emptying take nothing new. Quarantined tracks
            // are taken only when nothing else fits (they cost a sync of the log first).
            let open: Vec<&FreeMap> = cat.catalog.open_volumes().map(|v| &v.free).collect();
            let around = self.free_outside_quarantine(&open);
            let allocated = if appending { allocated } else { 0 };
            let found = around
                .as_ref()
                .and_then(|maps| plan_growth(maps.iter().map(|m| m.as_ref()), last, allocated, needed))
                .or_else(|| plan_growth(open.iter().copied(), last, allocated, needed));
            match found {
                Some(plan) => {
                    let surplus = plan.iter().map(|e| e.count_tracks).sum::<u64>() - needed;
                    if surplus > 0 {
                        holes.push(t1..t1 + surplus);
                    }
                    break lay_out(&plan, &holes);
                }
                None if !reclaimed && self.reclaim_surplus(&mut cat)? > 0 => reclaimed = true,
                None => return Err(Error::NoSpace),
            }
        };
        let extents: Vec<_> = runs.iter().map(|r| r.extent).collect();
        self.settle_quarantine(&mut cat, &extents)?;
        self.commit(&mut cat, Op::Map { ino: node.ino, runs, prealloc_end })?;
        self.refresh_map(&cat, node);
        Ok(())
    }

    /// Raise the recorded size to `end_bytes` if it is below. Logged before the write that
    /// needed it is acknowledged.
    fn raise_size(&self, node: &FileNode, end_bytes: u64, now: i64) -> Result<()> {
        let mut cat = self.catalog.lock();
        let size = match cat.catalog.get(node.ino).map(|i| &i.body) {
            Some(Body::File { size_bytes, .. }) => *size_bytes,
            _ => return Err(Error::NotFound),
        };
        if end_bytes > size {
            self.commit(&mut cat, Op::SetSize { ino: node.ino, size_bytes: end_bytes, mtime_ns: now })?;
            node.size_bytes.store(end_bytes, Ordering::Release);
            node.mtime_dirty.store(false, Ordering::Release);
        }
        Ok(())
    }

    /// Write `data` at `offset` of an open data set. Returns once the bytes are on the
    /// volumes and any size change is in the log.
    pub fn write(&self, node: &FileNode, offset: u64, data: &[u8]) -> Result<()> {
        let hold = node.write_hold.read();
        self.write_held(node, &hold, offset, data)
    }

    /// [`Engine::write`], unless a cutover holds the data set's writes: then `None` at once,
    /// for a thread that must not wait (an io_uring queue's: every request of its CPU waits
    /// behind it).
    pub fn try_write(&self, node: &FileNode, offset: u64, data: &[u8]) -> Option<Result<()>> {
        let hold = node.write_hold.try_read()?;
        Some(self.write_held(node, &hold, offset, data))
    }

    /// A write, with the data set's write hold taken shared.
    fn write_held(&self, node: &FileNode, _hold: &RwLockReadGuard<'_, ()>, offset: u64, data: &[u8]) -> Result<()> {
        let end = offset.checked_add(data.len() as u64).ok_or(Error::Invalid)?;
        let _io = node.gate.read();
        if !node.map.load().is_mapped_bytes(offset, data.len() as u64) {
            self.grow(node, offset, end, false)?;
        }
        self.intend(node, offset..end)?;
        node.write_monitored(self.geometry, &self.volumes.read(), offset, data)?;
        self.touched(node, offset..end);
        let now = now_ns();
        self.last_app_io_ns.store(now, Ordering::Relaxed);
        if end > node.size_bytes.load(Ordering::Acquire) {
            self.raise_size(node, end, now)?;
        } else {
            node.mtime_ns.store(now, Ordering::Release);
            node.mtime_dirty.store(true, Ordering::Release);
        }
        Ok(())
    }

    pub fn read(&self, node: &FileNode, offset: u64, size: u32) -> Result<Vec<u8>> {
        let mut buf = vec![0u8; size as usize];
        let n = self.read_into(node, offset, &mut buf)?;
        buf.truncate(n);
        Ok(buf)
    }

    /// Read from `offset` into the front of `buf`, up to the data set's end; returns how
    /// many bytes it wrote, every one of them (holes as zeros): `buf` may hold stale bytes.
    pub fn read_into(&self, node: &FileNode, offset: u64, buf: &mut [u8]) -> Result<usize> {
        self.last_app_io_ns.store(now_ns(), Ordering::Relaxed);
        let _io = node.gate.read();
        let file_size = node.size_bytes.load(Ordering::Acquire);
        if offset >= file_size {
            return Ok(0);
        }
        let len = (buf.len() as u64).min(file_size - offset) as usize;
        read_pieces(&self.volumes.read(), &node.map.load(), offset, &mut buf[..len])?;
        Ok(len)
    }

    /// Set a data set's size (open or not).
    pub fn truncate(&self, ino: Ino, new_size: u64, now: i64) -> Result<()> {
        let nodes = self.nodes.lock();
        let node = self.node_for(&nodes, ino)?;
        self.truncate_locked(&node, new_size, now)?;
        // A truncate drops a file capability as a write does (the set-ID bits: in
        // `Engine::setattr`, which knows whether the caller holds CAP_FSETID).
        if node.privileged.load(Ordering::Acquire) {
            self.drop_privileges(&node, false)?;
        }
        Ok(())
    }

    /// Set a data set's size. Shrinking zeroes the cut part of the last kept track and frees
    /// the tracks past it (explicit preallocation too, as on Linux file systems). Growing maps
    /// nothing: the new bytes are a hole. The caller holds the `nodes` lock.
    pub(super) fn truncate_locked(&self, node: &FileNode, new_size: u64, now: i64) -> Result<()> {
        let g = self.geometry;
        let _hold = node.write_hold.read();
        let _excl = node.gate.write();
        node.zeroed_end.store(0, Ordering::Release);
        // A shrink changes the bytes from the new size on (intent is logged before the
        // catalog lock is taken; it takes that lock itself).
        let shrinks = self.catalog.lock().catalog.get(node.ino).is_some_and(|i| new_size < i.size_bytes());
        if shrinks {
            self.intend(node, new_size..u64::MAX)?;
        }
        let mut cat = self.catalog.lock();
        // A node built for this truncate alone may predate a reclaim of its surplus.
        self.refresh_map(&cat, node);
        let (old_size, mapped_end) = match cat.catalog.get(node.ino).map(|i| &i.body) {
            Some(Body::File { size_bytes, layout, .. }) => (*size_bytes, layout.end()),
            _ => return Err(Error::NotFound),
        };
        if new_size < old_size {
            let keep_tracks = g.tracks_for(new_size);
            let end_bytes = node.map.load().end_bytes();
            let zero_end = old_size.min(g.bytes_of(keep_tracks)).min(end_bytes);
            // The cut part of the last kept track is zeroed; a migration re-copies it, and
            // drops (or re-copies, if the data set grows back) every track past it, unless
            // mirrored writes are on: then the target is cut alike (zeroed) at once.
            node.zero_monitored(
                g,
                &self.volumes.read(),
                new_size..zero_end.max(new_size),
                new_size..end_bytes.max(new_size + 1),
            )?;
            self.touched(node, new_size..end_bytes.max(new_size + 1));
            self.commit(&mut cat, Op::SetSize { ino: node.ino, size_bytes: new_size, mtime_ns: now })?;
            if mapped_end > keep_tracks {
                self.commit(&mut cat, Op::Trim { ino: node.ino, keep_tracks })?;
            }
            self.refresh_map(&cat, node);
        } else if new_size > old_size {
            self.commit(&mut cat, Op::SetSize { ino: node.ino, size_bytes: new_size, mtime_ns: now })?;
            self.refresh_map(&cat, node);
        } else {
            self.commit(&mut cat, Op::set_mtime(node.ino, now))?;
        }
        node.mtime_dirty.store(false, Ordering::Release);
        Ok(())
    }

    /// fallocate(2) on an open data set: allocate (mode 0, KEEP_SIZE: kept past the size as
    /// preallocation), punch a hole (PUNCH_HOLE|KEEP_SIZE: the range reads as zeros, and its
    /// whole tracks are unmapped and freed) or zero a range (ZERO_RANGE: allocated, zeros).
    pub fn fallocate(&self, node: &FileNode, offset: u64, length: u64, mode: i32) -> Result<()> {
        let end = offset.checked_add(length).ok_or(Error::Invalid)?;
        let keep_size = mode & libc::FALLOC_FL_KEEP_SIZE != 0;
        let punch = mode & libc::FALLOC_FL_PUNCH_HOLE != 0;
        let zero = mode & libc::FALLOC_FL_ZERO_RANGE != 0;
        if mode & !(libc::FALLOC_FL_KEEP_SIZE | libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_ZERO_RANGE) != 0 {
            return Err(Error::NotSupported);
        }
        if punch && !keep_size {
            return Err(Error::Invalid);
        }
        let g = self.geometry;
        let _hold = node.write_hold.read();
        if punch {
            return self.punch_hole(node, offset, end);
        }
        let _io = node.gate.read();
        self.grow(node, offset, end, true)?;
        if zero {
            self.intend(node, offset..end)?;
            node.zero_monitored(g, &self.volumes.read(), offset..end, offset..end)?;
            self.touched(node, offset..end);
        }
        if !keep_size && end > node.size_bytes.load(Ordering::Acquire) {
            self.raise_size(node, end, now_ns())?;
        }
        Ok(())
    }

    /// Punch bytes `offset..end`: they read as zeros, and the whole tracks among them are
    /// unmapped, their tracks freed (a hole). With the gate held exclusive, as every free of
    /// a data set's tracks: no read or copy is inside them.
    fn punch_hole(&self, node: &FileNode, offset: u64, end: u64) -> Result<()> {
        let g = self.geometry;
        let _excl = node.gate.write();
        node.zeroed_end.store(0, Ordering::Release);
        // Only inside the size: past it the bytes are zero already.
        let size = node.size_bytes.load(Ordering::Acquire);
        let map = node.map.load_full();
        let stop = end.min(size).min(map.end_bytes());
        if stop > offset {
            self.intend(node, offset..stop)?;
            node.zero_monitored(g, &self.volumes.read(), offset..stop, offset..stop)?;
            self.touched(node, offset..stop);
        }
        // Whole tracks, also past the size (preallocation is punched like on Linux).
        let (first, last) = (offset.div_ceil(g.track_size_bytes()), g.whole_tracks_in(end));
        if last > first && map.layout().mapped_in(first..last) > 0 {
            let mut cat = self.catalog.lock();
            self.commit(&mut cat, Op::Unmap { ino: node.ino, first, end: last })?;
            self.refresh_map(&cat, node);
        }
        Ok(())
    }

    /// lseek(2)'s SEEK_DATA and SEEK_HOLE on an open data set: data is every mapped track
    /// below the size; holes are the unmapped tracks and the end of the data set. Past the
    /// size, ENXIO, as on every Linux file system.
    pub fn seek_data_or_hole(&self, node: &FileNode, offset: u64, whence: i32) -> Result<u64> {
        let size = node.size_bytes.load(Ordering::Acquire);
        if offset >= size {
            return Err(Error::NoSuchOffset);
        }
        let map = node.map.load();
        match whence {
            libc::SEEK_DATA => map.next_data(offset).filter(|&at| at < size).ok_or(Error::NoSuchOffset),
            libc::SEEK_HOLE => Ok(map.next_hole(offset).min(size)),
            _ => Err(Error::Invalid),
        }
    }

    /// fsync (and fdatasync: `datasync`) of an open data set: its volumes, one of them
    /// carrying the log's unsynced tail in its ring (catalog/ring.rs); or, when no ring can
    /// take the tail, its volumes and then the log.
    pub fn fsync(&self, node: &FileNode, datasync: bool) -> Result<()> {
        let t0 = std::time::Instant::now();
        let volumes: BTreeSet<VolumeId> = node.map.load().extents().map(|e| e.volume).collect();
        if !datasync {
            self.persist_mtime(node)?;
        }
        self.zeros_ahead(node);
        let tail = self.write_tail(&volumes)?;
        for v in volumes {
            self.volume(v)?.flush()?;
        }
        match tail {
            Some(t) => t.flushed(),
            None => self.sync_log()?,
        }
        // The copier's pacing feeds on how long applications wait for their fsyncs.
        self.app_syncs.record(t0.elapsed().as_nanos() as u64, now_ns());
        Ok(())
    }

    /// Before the flush of an fsync that finds the data set grown, as the one before it did
    /// (a log or journal that appends and syncs): write zeros over the mapped tracks ahead
    /// of its size, up to [`ZEROS_AHEAD_BYTES`] past it, once less than half of that is left.
    /// The next appends then overwrite blocks that the host's file system allocated in this
    /// flush, so their flushes commit no allocation: on ext4 a synced 4 KiB overwrite took
    /// 118-133 us against 170-207 us for a synced 4 KiB append (docs/benchmarks.md, "Issue
    /// 10, ninth round"). A first growing fsync does nothing: a file written once and synced
    /// (a mail, a build output) would pay for zeros it never uses.
    ///
    /// The bytes past the size read as zeros already (rule 4 of docs/design.md, "Power-loss
    /// safety"), so the zeros change nothing a reader sees, and a power cut that loses or
    /// tears them loses nothing. Nothing else may write there meanwhile: this takes the
    /// data set's gate exclusively (every write holds it shared until its size is raised),
    /// and gives up rather than wait for it, for a cutover's hold or while a job watches
    /// the data set (its copier reads the same tracks). Best effort: an error is logged
    /// and the fsync goes on.
    fn zeros_ahead(&self, node: &FileNode) {
        let size = node.size_bytes.load(Ordering::Acquire);
        let before = node.synced_size.swap(size, Ordering::AcqRel);
        if size <= before {
            node.growing_syncs.store(0, Ordering::Relaxed);
            return;
        }
        if node.growing_syncs.fetch_add(1, Ordering::Relaxed) == 0
            || node.zeroed_end.load(Ordering::Acquire) >= size + ZEROS_AHEAD_BYTES / 2
            || node.job.load().is_some()
        {
            return;
        }
        let Some(_hold) = node.write_hold.try_read() else { return };
        let Some(_excl) = node.gate.try_write() else { return };
        let size = node.size_bytes.load(Ordering::Acquire);
        let start = size.next_multiple_of(PAGE_BYTES).max(node.zeroed_end.load(Ordering::Acquire));
        let map = node.map.load();
        let end = (size + ZEROS_AHEAD_BYTES).min(map.end_bytes());
        if end <= start {
            return;
        }
        let volumes = self.volumes.read();
        for p in map.pieces(start, (end - start) as usize) {
            let Piece::Mapped { volume, offset_bytes, len, .. } = p else { continue };
            let res = volume_of(&volumes, volume).and_then(|v| Ok(v.prezero(offset_bytes, len as u64)?));
            if let Err(e) = res {
                debug!("data set {}: zeros ahead of its end: {e}", node.ino);
                return;
            }
        }
        node.zeroed_end.store(end, Ordering::Release);
    }

    /// An fsync's copy of the log's unsynced tail, written (not flushed) into the ring of the
    /// first of the data set's `volumes` that has one, in slots whose fragments the log holds
    /// durably; the caller flushes `volumes`, then calls [`RingTail::flushed`]. None: the
    /// caller syncs the log, as it must (no ring among `volumes`, a full ring, a tail too
    /// long for one, a failed log).
    fn write_tail(&self, volumes: &BTreeSet<VolumeId>) -> Result<Option<RingTail>> {
        let (tail, writes) = {
            let mut cat = self.catalog.lock();
            let Some(tail) = cat.ring_tail() else { return Ok(None) };
            let RingTail::Bytes { generation, log_offset, bytes, end_mark, durable_mark, .. } = &tail else {
                return Ok(Some(tail));
            };
            let mut rings = self.rings.lock();
            let mut taken = None;
            for v in volumes.iter().filter_map(|v| cat.catalog.volumes.get(v)) {
                let ring = rings.entry(v.id).or_insert_with(|| self.new_ring(v));
                if let Some(r) = ring {
                    let slots = r.take(ring::slots_for(bytes.len()), *end_mark, *durable_mark);
                    taken = slots.map(|slots| (v, slots));
                    break;
                }
            }
            drop(rings);
            let Some((v, slots)) = taken else { return Ok(None) };
            let frags = ring::fragments_of(*generation, *log_offset, v.id, bytes);
            // Consecutive slots go in one write (two where the tail wraps the ring).
            let mut writes: Vec<(u64, Vec<u8>)> = Vec::new();
            for (slot, f) in slots.iter().zip(&frags) {
                let at = ring::slot_offset(v, *slot);
                match writes.last_mut() {
                    Some((start, buf)) if *start + buf.len() as u64 == at => buf.extend_from_slice(&f.encode()),
                    _ => writes.push((at, f.encode().to_vec())),
                }
            }
            let vol = v.id;
            cat.note_tail_record();
            (tail, (vol, writes))
        };
        let (vol, writes) = writes;
        let io = self.volume(vol)?;
        for (at, buf) in writes {
            io.write_at(&buf, at)?;
        }
        Ok(Some(tail))
    }

    /// The ring of volume `v` at this mount's first fsync on it: its room past the tracks
    /// reserved first, so that no ring write can fail for want of space on the backing file
    /// system (a failed write would fail the fsync and latch the image). None: the volume
    /// has no ring (a device), or no room for one; its data sets' fsyncs sync the log.
    fn new_ring(&self, v: &crate::catalog::VolumeRec) -> Option<Ring> {
        if !ring::has_ring(v) {
            return None;
        }
        match self.volume(v.id).and_then(|io| Ok(io.reserve(ring::slot_offset(v, 0), ring::RING_BYTES)?)) {
            Ok(()) => Some(Ring::default()),
            Err(e) => {
                warn!(
                    "volume {}: no room for its ring past the tracks ({e}); fsyncs of its data sets sync the \
                     catalog's log until the next mount",
                    v.name
                );
                None
            }
        }
    }

    /// The nodes open now (for the migration engine's and shutdown's sweeps).
    pub(super) fn nodes_snapshot(&self) -> Vec<Arc<FileNode>> {
        self.nodes.lock().values().cloned().collect()
    }
}
