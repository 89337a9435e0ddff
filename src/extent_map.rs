//! Logical offset -> (volume, offset) runs: splits one I/O across a data set's extents.
//!
//! A data set's extent map is immutable once built; the file system reads it through an
//! atomically swapped pointer (`arc_swap`), so the I/O path takes no lock to find where its
//! bytes live, and a change of the extents (growth, trim, a migration's cutover) is one
//! pointer swap.

use std::ops::Range;

use crate::geometry::Geometry;
use crate::layout::Layout;
use crate::space::{Extent, VolumeId};

/// One piece of an I/O: `len` bytes at `buf_start` of the caller's buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Piece {
    /// Lives at `offset_bytes` of `volume`.
    Mapped { volume: VolumeId, offset_bytes: u64, buf_start: usize, len: usize },
    /// A hole, or past the last mapped track: reads as zeros, can't be written.
    Unallocated { buf_start: usize, len: usize },
}

#[derive(Clone, Debug, Default)]
pub struct ExtentMap {
    layout: Layout,
    track_size_bytes: u64,
}

impl ExtentMap {
    pub fn new(geometry: Geometry, layout: &Layout) -> ExtentMap {
        ExtentMap { layout: layout.clone(), track_size_bytes: geometry.track_size_bytes() }
    }

    pub fn layout(&self) -> &Layout {
        &self.layout
    }
    /// The volume extents, in logical order.
    pub fn extents(&self) -> impl Iterator<Item = Extent> + '_ {
        self.layout.extents()
    }
    /// Tracks mapped.
    pub fn allocated_tracks(&self) -> u64 {
        self.layout.mapped_tracks()
    }
    /// The logical track after the last mapped one.
    pub fn end_tracks(&self) -> u64 {
        self.layout.end()
    }
    pub fn end_bytes(&self) -> u64 {
        self.layout.end() * self.track_size_bytes
    }

    /// Logical tracks of bytes `offset..offset + len` that are holes.
    pub fn holes_in_bytes(&self, offset: u64, len: u64) -> Vec<Range<u64>> {
        if len == 0 {
            return Vec::new();
        }
        let ts = self.track_size_bytes;
        self.layout.holes_in(offset / ts..(offset + len).div_ceil(ts))
    }

    /// Are all the tracks of bytes `offset..offset + len` mapped?
    pub fn is_mapped_bytes(&self, offset: u64, len: u64) -> bool {
        let ts = self.track_size_bytes;
        len == 0 || self.layout.covers(offset / ts..(offset + len).div_ceil(ts))
    }

    /// SEEK_DATA: the first byte at or after `offset` in a mapped track (`None`: only holes
    /// from there on).
    pub fn next_data(&self, offset: u64) -> Option<u64> {
        let ts = self.track_size_bytes;
        let t = offset / ts;
        let r = self.layout.slice(t..u64::MAX).next()?;
        Some(if r.logical <= t { offset } else { r.logical * ts })
    }

    /// SEEK_HOLE: the first byte at or after `offset` in a hole.
    pub fn next_hole(&self, offset: u64) -> u64 {
        let ts = self.track_size_bytes;
        let t = offset / ts;
        match self.layout.holes_in(t..u64::MAX).first() {
            Some(h) if h.start <= t => offset,
            Some(h) => h.start * ts,
            None => u64::MAX,
        }
    }

    /// Split `len` bytes at logical `offset_bytes` into pieces, in order.
    pub fn pieces(&self, offset_bytes: u64, len: usize) -> Vec<Piece> {
        let mut out = Vec::with_capacity(2);
        let ts = self.track_size_bytes;
        let end = offset_bytes + len as u64;
        let mut pos = offset_bytes;
        let push_hole = |out: &mut Vec<Piece>, from: u64, to: u64| {
            if to > from {
                out.push(Piece::Unallocated { buf_start: (from - offset_bytes) as usize, len: (to - from) as usize });
            }
        };
        for r in self.layout.slice(offset_bytes / ts..end.div_ceil(ts)) {
            let run_start = (r.logical * ts).max(offset_bytes);
            let run_end = (r.end() * ts).min(end);
            push_hole(&mut out, pos, run_start);
            let offset = r.extent.first.0 * ts + (run_start - r.logical * ts);
            let (buf_start, n) = ((run_start - offset_bytes) as usize, (run_end - run_start) as usize);
            match out.last_mut() {
                // Adjacent runs that happen to be contiguous on one volume: one piece.
                Some(Piece::Mapped { volume, offset_bytes, len, .. })
                    if *volume == r.extent.volume && *offset_bytes + *len as u64 == offset =>
                {
                    *len += n
                }
                _ => out.push(Piece::Mapped { volume: r.extent.volume, offset_bytes: offset, buf_start, len: n }),
            }
            pos = run_end;
        }
        push_hole(&mut out, pos, end);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::geometry::TrackNo;
    use crate::layout::Run;

    #[test]
    fn pieces_split_across_extents_and_past_the_end() {
        let g = Geometry::new(4096).unwrap();
        let e = |v, first, n| Extent { volume: VolumeId(v), first: TrackNo(first), count_tracks: n };
        let m = ExtentMap::new(g, &Layout::dense(&[e(1, 10, 2), e(2, 0, 1)]));
        assert_eq!((m.allocated_tracks(), m.end_bytes()), (3, 3 * 4096));
        assert_eq!(
            m.pieces(4096 + 100, 8192),
            vec![
                Piece::Mapped { volume: VolumeId(1), offset_bytes: 11 * 4096 + 100, buf_start: 0, len: 3996 },
                Piece::Mapped { volume: VolumeId(2), offset_bytes: 0, buf_start: 3996, len: 4096 },
                Piece::Unallocated { buf_start: 8092, len: 100 },
            ]
        );
        assert_eq!(m.pieces(0, 0), vec![]);
        assert_eq!(
            ExtentMap::new(g, &Layout::default()).pieces(5, 10),
            vec![Piece::Unallocated { buf_start: 0, len: 10 }]
        );
    }

    #[test]
    fn holes_split_pieces_and_seek() {
        let g = Geometry::new(4096).unwrap();
        let e = |v, first, n| Extent { volume: VolumeId(v), first: TrackNo(first), count_tracks: n };
        let mut l = Layout::default();
        l.insert(&[Run { logical: 2, extent: e(1, 0, 1) }, Run { logical: 3, extent: e(1, 1, 1) }]);
        let m = ExtentMap::new(g, &l);
        assert_eq!(
            m.pieces(4096, 4 * 4096),
            vec![
                Piece::Unallocated { buf_start: 0, len: 4096 },
                Piece::Mapped { volume: VolumeId(1), offset_bytes: 0, buf_start: 4096, len: 8192 },
                Piece::Unallocated { buf_start: 3 * 4096, len: 4096 },
            ]
        );
        assert_eq!(m.next_data(0), Some(2 * 4096));
        assert_eq!(m.next_data(2 * 4096 + 7), Some(2 * 4096 + 7));
        assert_eq!(m.next_data(4 * 4096), None);
        assert_eq!(m.next_hole(2 * 4096), 4 * 4096);
        assert_eq!(m.next_hole(100), 100);
        assert_eq!(m.holes_in_bytes(0, 5 * 4096), vec![0..2, 4..5]);
        assert!(m.is_mapped_bytes(2 * 4096 + 1, 8000));
    }
}
