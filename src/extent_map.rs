//! Logical offset -> (volume, offset) runs: splits one I/O across a data set's extents.
//!
//! A data set's extent map is immutable once built; the file system reads it through an
//! atomically swapped pointer (`arc_swap`), so the I/O path takes no lock to find where its
//! bytes live, and a change of the extents (growth, trim, a migration's cutover) is one
//! pointer swap.

use crate::geometry::Geometry;
use crate::space::{Extent, VolumeId};

/// One piece of an I/O: `len` bytes at `buf_start` of the caller's buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Piece {
    /// Lives at `offset_bytes` of `volume`.
    Mapped { volume: VolumeId, offset_bytes: u64, buf_start: usize, len: usize },
    /// Past the allocation: reads as zeros, can't be written.
    Unallocated { buf_start: usize, len: usize },
}

#[derive(Clone, Debug, Default)]
pub struct ExtentMap {
    extents: Vec<Extent>,
    /// `starts[i]` is the first logical track of `extents[i]`.
    starts: Vec<u64>,
    allocated_tracks: u64,
    track_size_bytes: u64,
}

impl ExtentMap {
    pub fn new(geometry: Geometry, extents: &[Extent]) -> ExtentMap {
        let mut starts = Vec::with_capacity(extents.len());
        let mut at = 0;
        for e in extents {
            starts.push(at);
            at += e.count_tracks;
        }
        ExtentMap {
            extents: extents.to_vec(),
            starts,
            allocated_tracks: at,
            track_size_bytes: geometry.track_size_bytes(),
        }
    }

    pub fn extents(&self) -> &[Extent] {
        &self.extents
    }
    pub fn allocated_tracks(&self) -> u64 {
        self.allocated_tracks
    }
    pub fn allocated_bytes(&self) -> u64 {
        self.allocated_tracks * self.track_size_bytes
    }

    /// Split `len` bytes at logical `offset_bytes` into pieces, in order.
    pub fn pieces(&self, offset_bytes: u64, len: usize) -> Vec<Piece> {
        let mut out = Vec::with_capacity(2);
        let ts = self.track_size_bytes;
        let mut pos = offset_bytes;
        let end = offset_bytes + len as u64;
        let mut i = match self.starts.binary_search(&(pos / ts)) {
            Ok(i) => i,
            Err(i) => i.saturating_sub(1),
        };
        while pos < end {
            let buf_start = (pos - offset_bytes) as usize;
            let Some(e) = self.extents.get(i) else {
                out.push(Piece::Unallocated { buf_start, len: (end - pos) as usize });
                break;
            };
            let ext_start_bytes = self.starts[i] * ts;
            let ext_end_bytes = ext_start_bytes + e.count_tracks * ts;
            if pos >= ext_end_bytes {
                i += 1;
                continue;
            }
            let n = (end.min(ext_end_bytes) - pos) as usize;
            let offset = e.first.0 * ts + (pos - ext_start_bytes);
            match out.last_mut() {
                // Adjacent extents that happen to be contiguous on one volume: one piece.
                Some(Piece::Mapped { volume, offset_bytes, len, .. })
                    if *volume == e.volume && *offset_bytes + *len as u64 == offset =>
                {
                    *len += n
                }
                _ => out.push(Piece::Mapped { volume: e.volume, offset_bytes: offset, buf_start, len: n }),
            }
            pos += n as u64;
            i += 1;
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::geometry::TrackNo;

    #[test]
    fn pieces_split_across_extents_and_past_the_end() {
        let g = Geometry::new(4096).unwrap();
        let e = |v, first, n| Extent { volume: VolumeId(v), first: TrackNo(first), count_tracks: n };
        let m = ExtentMap::new(g, &[e(1, 10, 2), e(2, 0, 1)]);
        assert_eq!(m.allocated_bytes(), 3 * 4096);
        assert_eq!(
            m.pieces(4096 + 100, 8192),
            vec![
                Piece::Mapped { volume: VolumeId(1), offset_bytes: 11 * 4096 + 100, buf_start: 0, len: 3996 },
                Piece::Mapped { volume: VolumeId(2), offset_bytes: 0, buf_start: 3996, len: 4096 },
                Piece::Unallocated { buf_start: 8092, len: 100 },
            ]
        );
        assert_eq!(m.pieces(0, 0), vec![]);
        assert_eq!(ExtentMap::new(g, &[]).pieces(5, 10), vec![Piece::Unallocated { buf_start: 0, len: 10 }]);
    }
}
