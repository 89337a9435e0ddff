//! A data set's layout: which of its logical tracks are mapped, and where they live.
//!
//! A data set is sparse: its logical tracks are either mapped onto a volume (a [`Run`] maps a
//! range of them onto one extent) or a hole, which takes no track anywhere and reads as
//! zeros. A [`Layout`] is the runs in logical order, never overlapping; the gaps between
//! them, and everything past the last run, are holes. Adjacent runs that are contiguous on
//! one volume are merged, so a dense data set written front to back has one run per extent.
//!
//! Everything here is pure arithmetic on runs; the catalog (catalog/model.rs) owns the free
//! maps and applies what these functions compute.

use std::ops::Range;

use serde::{Deserialize, Serialize};

use crate::geometry::TrackNo;
use crate::space::Extent;

/// Logical tracks `logical..logical + extent.count_tracks` of a data set live on `extent`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Run {
    pub logical: u64,
    pub extent: Extent,
}

impl Run {
    pub fn end(&self) -> u64 {
        self.logical + self.extent.count_tracks
    }

    /// The part of this run that maps logical tracks `range` (clipped to the run).
    pub fn slice(&self, range: Range<u64>) -> Option<Run> {
        let start = range.start.max(self.logical);
        let end = range.end.min(self.end());
        (start < end).then(|| Run {
            logical: start,
            extent: Extent {
                volume: self.extent.volume,
                first: TrackNo(self.extent.first.0 + (start - self.logical)),
                count_tracks: end - start,
            },
        })
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LayoutError {
    #[error("logical tracks {first}..{end} are mapped already")]
    Overlap { first: u64, end: u64 },
    #[error("an empty run at logical track {0}")]
    Empty(u64),
}

/// The runs of a data set, in logical order, not overlapping.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Layout {
    runs: Vec<Run>,
}

impl Layout {
    /// A dense layout: `extents` laid end to end from logical track 0 (how every data set
    /// was laid out before holes, and how a plain append lays out its growth).
    pub fn dense(extents: &[Extent]) -> Layout {
        let mut l = Layout::default();
        l.append(extents);
        l
    }

    pub fn runs(&self) -> &[Run] {
        &self.runs
    }

    pub fn is_empty(&self) -> bool {
        self.runs.is_empty()
    }

    /// The volume extents, in logical order.
    pub fn extents(&self) -> impl Iterator<Item = Extent> + '_ {
        self.runs.iter().map(|r| r.extent)
    }

    /// Tracks mapped (what the data set takes from the pool).
    pub fn mapped_tracks(&self) -> u64 {
        self.runs.iter().map(|r| r.extent.count_tracks).sum()
    }

    /// The logical track after the last mapped one (0 if none).
    pub fn end(&self) -> u64 {
        self.runs.last().map_or(0, |r| r.end())
    }

    /// Tracks of the mapped span (no hole inside) that ends at the last mapped track: what a
    /// data set appended front to back has written, for growth to over-provision against.
    pub fn tail_span(&self) -> u64 {
        let mut start = self.end();
        for r in self.runs.iter().rev() {
            if r.end() != start {
                break;
            }
            start = r.logical;
        }
        self.end() - start
    }

    /// The last run's extent: where in-place growth would continue.
    pub fn last_extent(&self) -> Option<Extent> {
        self.runs.last().map(|r| r.extent)
    }

    /// Index of the first run that ends after logical track `t`.
    fn first_ending_after(&self, t: u64) -> usize {
        self.runs.partition_point(|r| r.end() <= t)
    }

    /// The runs that map any of logical tracks `range`, clipped to it.
    pub fn slice(&self, range: Range<u64>) -> impl Iterator<Item = Run> + '_ {
        let from = self.first_ending_after(range.start);
        self.runs[from..].iter().take_while(move |r| r.logical < range.end).filter_map(move |r| r.slice(range.clone()))
    }

    /// Tracks of `range` that are mapped.
    pub fn mapped_in(&self, range: Range<u64>) -> u64 {
        self.slice(range).map(|r| r.extent.count_tracks).sum()
    }

    /// The holes inside logical tracks `range`, in order.
    pub fn holes_in(&self, range: Range<u64>) -> Vec<Range<u64>> {
        let mut out = Vec::new();
        let mut at = range.start;
        for r in self.slice(range.clone()) {
            if r.logical > at {
                out.push(at..r.logical);
            }
            at = r.end();
        }
        if at < range.end {
            out.push(at..range.end);
        }
        out
    }

    /// Are all of logical tracks `range` mapped? (No allocation: the write path asks this
    /// for every write.)
    pub fn covers(&self, range: Range<u64>) -> bool {
        let mut at = range.start;
        for r in self.runs[self.first_ending_after(range.start)..].iter() {
            if at >= range.end || r.logical > at {
                break;
            }
            at = r.end();
        }
        at >= range.end
    }

    /// Is logical track `t` mapped?
    pub fn is_mapped(&self, t: u64) -> bool {
        self.runs.get(self.first_ending_after(t)).is_some_and(|r| r.logical <= t)
    }

    /// Append `extents` after the last mapped track (a contiguous one merges into it).
    pub fn append(&mut self, extents: &[Extent]) {
        let mut at = self.end();
        for e in extents {
            self.push_merged(Run { logical: at, extent: *e });
            at += e.count_tracks;
        }
    }

    /// Add `r` after every run (the caller keeps logical order); merges when contiguous.
    pub fn push(&mut self, r: Run) {
        debug_assert!(r.logical >= self.end(), "runs are pushed in logical order");
        self.push_merged(r)
    }

    fn push_merged(&mut self, r: Run) {
        match self.runs.last_mut() {
            Some(last)
                if last.end() == r.logical
                    && last.extent.volume == r.extent.volume
                    && last.extent.end() == r.extent.first =>
            {
                last.extent.count_tracks += r.extent.count_tracks
            }
            _ => self.runs.push(r),
        }
    }

    /// Check that `more` maps only holes (and no empty run), without changing anything.
    pub fn check_insert(&self, more: &[Run]) -> Result<(), LayoutError> {
        for (i, r) in more.iter().enumerate() {
            if r.extent.count_tracks == 0 {
                return Err(LayoutError::Empty(r.logical));
            }
            let clash = self.slice(r.logical..r.end()).next().map(|c| c.logical..c.end()).or_else(|| {
                more[..i].iter().find(|o| o.logical < r.end() && r.logical < o.end()).map(|o| o.logical..o.end())
            });
            if let Some(c) = clash {
                return Err(LayoutError::Overlap { first: c.start, end: c.end });
            }
        }
        Ok(())
    }

    /// Map holes: `more` lands in logical order among the runs, merging with a neighbour
    /// that continues it on its volume. The caller checked it ([`Layout::check_insert`]).
    pub fn insert(&mut self, more: &[Run]) {
        let continues = |a: &Run, b: &Run| {
            a.end() == b.logical && a.extent.volume == b.extent.volume && a.extent.end() == b.extent.first
        };
        for r in more {
            let mut i = self.runs.partition_point(|x| x.logical < r.logical);
            self.runs.insert(i, *r);
            if i > 0 && continues(&self.runs[i - 1], &self.runs[i]) {
                self.runs[i - 1].extent.count_tracks += r.extent.count_tracks;
                self.runs.remove(i);
                i -= 1;
            }
            if i + 1 < self.runs.len() && continues(&self.runs[i], &self.runs[i + 1]) {
                self.runs[i].extent.count_tracks += self.runs[i + 1].extent.count_tracks;
                self.runs.remove(i + 1);
            }
        }
    }

    /// Unmap logical tracks `range`; returns the extents that mapped them.
    pub fn unmap(&mut self, range: Range<u64>) -> Vec<Extent> {
        let mut kept = Vec::with_capacity(self.runs.len() + 1);
        let mut freed = Vec::new();
        for r in std::mem::take(&mut self.runs) {
            if r.end() <= range.start || r.logical >= range.end {
                kept.push(r);
                continue;
            }
            kept.extend(r.slice(r.logical..range.start));
            freed.extend(r.slice(range.clone()).map(|s| s.extent));
            kept.extend(r.slice(range.end..r.end()));
        }
        self.runs = kept;
        freed
    }

    /// Unmap every track at or past logical track `keep`; returns their extents.
    pub fn trim(&mut self, keep: u64) -> Vec<Extent> {
        self.unmap(keep..u64::MAX)
    }

    /// Check the invariants: runs in order, not overlapping, none empty.
    pub fn check(&self) -> Result<(), LayoutError> {
        let mut at = 0;
        for r in &self.runs {
            if r.extent.count_tracks == 0 {
                return Err(LayoutError::Empty(r.logical));
            }
            if r.logical < at {
                return Err(LayoutError::Overlap { first: r.logical, end: at });
            }
            at = r.end();
        }
        Ok(())
    }
}

/// Lay `extents` (in order) over the logical `ranges` (in order), which together hold as
/// many tracks: the runs that map those ranges onto those extents.
pub fn lay_out(extents: &[Extent], ranges: &[Range<u64>]) -> Vec<Run> {
    let mut out = Vec::new();
    let mut ext = extents.iter().copied();
    let mut cur: Option<Extent> = None;
    for range in ranges {
        let mut at = range.start;
        while at < range.end {
            let e = match cur.take().or_else(|| ext.next()) {
                Some(e) => e,
                None => return out,
            };
            let n = e.count_tracks.min(range.end - at);
            out.push(Run { logical: at, extent: Extent { count_tracks: n, ..e } });
            if n < e.count_tracks {
                cur =
                    Some(Extent { volume: e.volume, first: TrackNo(e.first.0 + n), count_tracks: e.count_tracks - n });
            }
            at += n;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::space::VolumeId;

    fn e(v: u32, first: u64, n: u64) -> Extent {
        Extent { volume: VolumeId(v), first: TrackNo(first), count_tracks: n }
    }
    fn run(logical: u64, v: u32, first: u64, n: u64) -> Run {
        Run { logical, extent: e(v, first, n) }
    }

    #[test]
    fn dense_append_merges_contiguous_extents() {
        let l = Layout::dense(&[e(1, 0, 4), e(1, 4, 2), e(2, 0, 1)]);
        assert_eq!(l.runs(), &[run(0, 1, 0, 6), run(6, 2, 0, 1)]);
        assert_eq!((l.mapped_tracks(), l.end(), l.tail_span()), (7, 7, 7));
        let mut s = Layout::default();
        s.insert(&[run(0, 1, 0, 2), run(10, 1, 5, 3), run(13, 2, 0, 1)]);
        assert_eq!(s.tail_span(), 4, "the span after the hole");
    }

    #[test]
    fn holes_insert_unmap_and_trim() {
        let mut l = Layout::default();
        let more = [run(10, 1, 0, 2), run(0, 1, 5, 1)];
        l.check_insert(&more).unwrap();
        l.insert(&more);
        assert_eq!(l.runs(), &[run(0, 1, 5, 1), run(10, 1, 0, 2)]);
        assert_eq!(l.holes_in(0..14), vec![1..10, 12..14]);
        assert!(l.is_mapped(11) && !l.is_mapped(5) && !l.is_mapped(12));
        assert!(l.covers(10..12) && l.covers(0..1) && l.covers(5..5));
        assert!(!l.covers(0..2) && !l.covers(11..13) && !l.covers(12..13));
        assert_eq!(l.check_insert(&[run(11, 2, 0, 3)]), Err(LayoutError::Overlap { first: 11, end: 12 }));
        assert_eq!(l.check_insert(&[run(3, 2, 0, 3), run(4, 2, 9, 1)]), Err(LayoutError::Overlap { first: 3, end: 6 }));
        // Filling the hole right before a contiguous run merges with it.
        l.insert(&[run(9, 1, 9, 1)]);
        assert_eq!(l.runs().len(), 3);
        assert_eq!(l.unmap(10..11), vec![e(1, 0, 1)]);
        assert_eq!(l.runs(), &[run(0, 1, 5, 1), run(9, 1, 9, 1), run(11, 1, 1, 1)]);
        assert_eq!(l.trim(1), vec![e(1, 9, 1), e(1, 1, 1)]);
        assert_eq!(l.mapped_tracks(), 1);
        l.check().unwrap();
    }

    #[test]
    fn lay_out_splits_extents_over_ranges() {
        assert_eq!(
            lay_out(&[e(3, 100, 3), e(4, 0, 2)], &[0..2, 7..10]),
            vec![run(0, 3, 100, 2), run(7, 3, 102, 1), run(8, 4, 0, 2)]
        );
    }
}
