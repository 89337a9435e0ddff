//! Free-space maps of volumes, and extent allocation.
//!
//! Each volume's free space is a set of runs of free tracks (`first -> count`), coalesced, so
//! the map stays as small as the fragmentation. Allocation policy (documented in
//! docs/design.md, "Allocation"):
//!
//! 1. A data set grows in place when it can: if the tracks right after its last extent are
//!    free, the last extent is extended. Steady growth then keeps one extent.
//! 2. Otherwise the new (secondary) extent goes to the volume of the last extent if it has a
//!    run that holds the whole request, then to any volume with such a run (fewest volumes
//!    first, the volume with the most free tracks wins), and only then is the request split
//!    over the largest runs, spilling across volumes.
//! 3. The request itself is over-provisioned: a data set that grows gets at least as many new
//!    tracks as it already has, up to [`SECONDARY_EXTENT_MAX_TRACKS`], so the number of
//!    extents of a steadily growing file is logarithmic in its size, also when it is closed
//!    between appends (the surplus stays with it). The surplus of closed data sets is taken
//!    back when the pool runs short and at clean unmount. When the pool is short of space,
//!    only what is needed is taken.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::geometry::TrackNo;

/// A volume's id inside a pool. Ids are never reused, so a stale id can't alias a new volume.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct VolumeId(pub u32);

/// A run of tracks on one volume.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Extent {
    pub volume: VolumeId,
    pub first: TrackNo,
    pub count_tracks: u64,
}

impl Extent {
    pub fn end(&self) -> TrackNo {
        TrackNo(self.first.0 + self.count_tracks)
    }

    /// Whether the two extents share a track.
    pub fn overlaps(&self, other: &Extent) -> bool {
        self.volume == other.volume && self.first.0 < other.end().0 && other.first.0 < self.end().0
    }
}

/// Over-provisioning of secondary extents stops doubling here (a 64 KiB track makes this
/// 256 MiB): beyond it, a growing file gains extents linearly, and a half-used surplus of
/// this size per open file is the most a close has to trim.
pub const SECONDARY_EXTENT_MAX_TRACKS: u64 = 4096;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SpaceError {
    #[error("tracks {first}..{end} of volume {volume} are not free", volume = .volume.0)]
    NotFree { volume: VolumeId, first: u64, end: u64 },
    #[error("tracks {first}..{end} of volume {volume} are already free", volume = .volume.0)]
    AlreadyFree { volume: VolumeId, first: u64, end: u64 },
    #[error("tracks {first}..{end} are outside volume {volume}", volume = .volume.0)]
    OutOfBounds { volume: VolumeId, first: u64, end: u64 },
}

/// Free runs of one volume.
///
/// The runs are indexed twice: by first track (to take, give and coalesce) and by length (to
/// find the best fit and the largest run). Without the second index every allocation walked
/// every free run of every volume, a cost that grows with the pool's fragmentation. The
/// catalog stores only the first; the second is rebuilt when a catalog is read.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "FreeMapRecord")]
pub struct FreeMap {
    volume: VolumeId,
    tracks_total: u64,
    runs: BTreeMap<u64, u64>,
    free_tracks: u64,
    /// (track count, first track) of every run in `runs`.
    #[serde(skip)]
    by_len: BTreeSet<(u64, u64)>,
}

/// A [`FreeMap`] as the catalog stores it (docs/format.md): the fields in this order.
#[derive(Deserialize)]
struct FreeMapRecord {
    volume: VolumeId,
    tracks_total: u64,
    runs: BTreeMap<u64, u64>,
    free_tracks: u64,
}

impl From<FreeMapRecord> for FreeMap {
    fn from(r: FreeMapRecord) -> FreeMap {
        let by_len = r.runs.iter().map(|(&s, &n)| (n, s)).collect();
        FreeMap { volume: r.volume, tracks_total: r.tracks_total, runs: r.runs, free_tracks: r.free_tracks, by_len }
    }
}

impl FreeMap {
    pub fn new(volume: VolumeId, tracks_total: u64) -> FreeMap {
        let mut map =
            FreeMap { volume, tracks_total, runs: BTreeMap::new(), free_tracks: tracks_total, by_len: BTreeSet::new() };
        if tracks_total > 0 {
            map.insert_run(0, tracks_total);
        }
        map
    }

    fn insert_run(&mut self, first: u64, count: u64) {
        self.runs.insert(first, count);
        self.by_len.insert((count, first));
    }

    fn remove_run(&mut self, first: u64) {
        if let Some(count) = self.runs.remove(&first) {
            self.by_len.remove(&(count, first));
        }
    }

    pub fn volume(&self) -> VolumeId {
        self.volume
    }

    pub fn tracks_total(&self) -> u64 {
        self.tracks_total
    }
    pub fn free_tracks(&self) -> u64 {
        self.free_tracks
    }
    pub fn runs(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.runs.iter().map(|(&a, &b)| (a, b))
    }
    pub fn largest_run(&self) -> u64 {
        self.by_len.last().map_or(0, |&(n, _)| n)
    }

    /// Free tracks starting exactly at `first` (0 if `first` is owned).
    pub fn free_run_at(&self, first: u64) -> u64 {
        match self.runs.range(..=first).next_back() {
            Some((&s, &n)) if s + n > first => s + n - first,
            _ => 0,
        }
    }

    /// Is any track of `first..first+count` free?
    pub fn overlaps_free(&self, first: u64, count: u64) -> bool {
        let end = first + count;
        if let Some((&s, &n)) = self.runs.range(..=first).next_back() {
            if s + n > first {
                return true;
            }
        }
        self.runs.range(first..end).next().is_some()
    }

    /// First run, best fitting, that holds `count` tracks.
    pub fn find_fit(&self, count: u64) -> Option<u64> {
        self.by_len.range((count, 0)..).next().map(|&(_, s)| s)
    }

    /// Mark `first..first+count` owned. All of it must be free.
    pub fn take(&mut self, first: u64, count: u64) -> Result<(), SpaceError> {
        let end = first + count;
        let err = SpaceError::NotFree { volume: self.volume, first, end };
        if end > self.tracks_total {
            return Err(SpaceError::OutOfBounds { volume: self.volume, first, end });
        }
        let (s, n) = match self.runs.range(..=first).next_back() {
            Some((&s, &n)) if s + n >= end => (s, n),
            _ => return Err(err),
        };
        self.remove_run(s);
        if first > s {
            self.insert_run(s, first - s);
        }
        if s + n > end {
            self.insert_run(end, s + n - end);
        }
        self.free_tracks -= count;
        Ok(())
    }

    /// Mark `first..first+count` free again. None of it may be free already.
    pub fn give(&mut self, first: u64, count: u64) -> Result<(), SpaceError> {
        let end = first + count;
        if end > self.tracks_total {
            return Err(SpaceError::OutOfBounds { volume: self.volume, first, end });
        }
        if count == 0 {
            return Ok(());
        }
        if self.overlaps_free(first, count) {
            return Err(SpaceError::AlreadyFree { volume: self.volume, first, end });
        }
        let mut start = first;
        let mut len = count;
        if let Some((&s, &n)) = self.runs.range(..first).next_back() {
            if s + n == first {
                self.remove_run(s);
                start = s;
                len += n;
            }
        }
        if let Some(&n) = self.runs.get(&end) {
            self.remove_run(end);
            len += n;
        }
        self.insert_run(start, len);
        self.free_tracks += count;
        Ok(())
    }
}

/// Choose where `needed_tracks` more tracks of a data set go. `last` is the data set's last
/// extent, `allocated_tracks` what it holds now. Returns the extents to add, in order, or
/// `None` when the pool can't hold `needed_tracks`. Pure: the caller records the extents.
pub fn plan_growth<'a>(
    volumes: impl Iterator<Item = &'a FreeMap> + Clone,
    last: Option<Extent>,
    allocated_tracks: u64,
    needed_tracks: u64,
) -> Option<Vec<Extent>> {
    if needed_tracks == 0 {
        return Some(Vec::new());
    }
    let pool_free: u64 = volumes.clone().map(|v| v.free_tracks()).sum();
    if pool_free < needed_tracks {
        return None;
    }
    let generous = needed_tracks.max(allocated_tracks.min(SECONDARY_EXTENT_MAX_TRACKS));
    let want = if pool_free >= generous { generous } else { needed_tracks };

    let by_id = |id: VolumeId| volumes.clone().find(|v| v.volume == id);
    // 1. In place, after the last extent.
    if let Some(last) = last {
        if let Some(v) = by_id(last.volume) {
            let run = v.free_run_at(last.end().0);
            if run >= needed_tracks {
                let n = run.min(want);
                return Some(vec![Extent { volume: last.volume, first: last.end(), count_tracks: n }]);
            }
        }
    }
    // 2. One run that holds the request: the last extent's volume first, then the volume
    //    with the most free tracks.
    for want_now in [want, needed_tracks] {
        if let Some(last) = last {
            if let Some(v) = by_id(last.volume) {
                if let Some(first) = v.find_fit(want_now) {
                    return Some(vec![Extent { volume: last.volume, first: TrackNo(first), count_tracks: want_now }]);
                }
            }
        }
        // One pass, no sort: this runs on every allocation, over every open volume.
        let best = volumes
            .clone()
            .filter(|v| v.free_tracks() >= want_now)
            .min_by_key(|v| (std::cmp::Reverse(v.free_tracks()), v.volume))
            .filter(|v| v.largest_run() >= want_now)
            .or_else(|| {
                volumes
                    .clone()
                    .filter(|v| v.largest_run() >= want_now)
                    .min_by_key(|v| (std::cmp::Reverse(v.free_tracks()), v.volume))
            });
        if let Some(v) = best {
            let first = v.find_fit(want_now).expect("a run that fits exists");
            return Some(vec![Extent { volume: v.volume, first: TrackNo(first), count_tracks: want_now }]);
        }
    }
    // 3. Split over the largest runs of the pool, spilling across volumes.
    let mut runs: Vec<(u64, VolumeId, u64)> =
        volumes.clone().flat_map(|v| v.runs().map(move |(s, n)| (n, v.volume, s))).collect();
    runs.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)));
    let mut out = Vec::new();
    let mut left = needed_tracks;
    for (n, volume, s) in runs {
        if left == 0 {
            break;
        }
        let take = n.min(left);
        out.push(Extent { volume, first: TrackNo(s), count_tracks: take });
        left -= take;
    }
    debug_assert_eq!(left, 0);
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn take_and_give_coalesce() {
        let mut f = FreeMap::new(VolumeId(1), 100);
        f.take(10, 10).unwrap();
        f.take(30, 5).unwrap();
        assert_eq!(f.free_tracks(), 85);
        assert_eq!(f.free_run_at(20), 10);
        assert_eq!(f.free_run_at(15), 0);
        assert!(f.take(15, 1).is_err());
        assert!(f.take(95, 10).is_err());
        f.give(10, 10).unwrap();
        assert!(f.give(12, 1).is_err(), "double free is refused");
        f.give(30, 5).unwrap();
        assert_eq!(f.runs().collect::<Vec<_>>(), vec![(0, 100)]);
        assert_eq!(f.free_tracks(), 100);
    }

    #[test]
    fn growth_extends_in_place_then_spills() {
        let mut a = FreeMap::new(VolumeId(1), 10);
        let b = FreeMap::new(VolumeId(2), 10);
        a.take(0, 4).unwrap();
        let last = Extent { volume: VolumeId(1), first: TrackNo(0), count_tracks: 4 };
        // In place: over-provisioned to the 4 tracks it has.
        let plan = plan_growth([&a, &b].into_iter(), Some(last), 4, 1).unwrap();
        assert_eq!(plan, vec![Extent { volume: VolumeId(1), first: TrackNo(4), count_tracks: 4 }]);
        // Needs more than volume 1 has left: whole request on volume 2.
        let plan = plan_growth([&a, &b].into_iter(), Some(last), 4, 8).unwrap();
        assert_eq!(plan, vec![Extent { volume: VolumeId(2), first: TrackNo(0), count_tracks: 8 }]);
        // More than any one volume holds: split.
        let plan = plan_growth([&a, &b].into_iter(), Some(last), 4, 14).unwrap();
        assert_eq!(plan.iter().map(|e| e.count_tracks).sum::<u64>(), 14);
        assert_eq!(plan.len(), 2);
        // More than the pool holds.
        assert!(plan_growth([&a, &b].into_iter(), Some(last), 4, 17).is_none());
    }

    /// The best fit and the largest run come from an index by length, which every take and
    /// give must keep equal to the runs, and which a catalog read back must rebuild. A
    /// linear scan of the runs is the oracle.
    #[test]
    fn length_index_follows_takes_and_gives_and_survives_encoding() {
        let mut f = FreeMap::new(VolumeId(1), 1000);
        let mut owned = Vec::new();
        let mut x: u64 = 7;
        for step in 0..2000 {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let r = x >> 33;
            if step % 3 != 2 || owned.is_empty() {
                let want = 1 + r % 8;
                if let Some(first) = f.find_fit(want) {
                    f.take(first, want).unwrap();
                    owned.push((first, want));
                }
            } else {
                let (first, n) = owned.swap_remove((r as usize) % owned.len());
                f.give(first, n).unwrap();
            }
            let runs: Vec<(u64, u64)> = f.runs().collect();
            assert_eq!(f.largest_run(), runs.iter().map(|r| r.1).max().unwrap_or(0), "step {step}");
            for want in [1, 3, 8, 50] {
                let scan = runs.iter().filter(|r| r.1 >= want).min_by_key(|r| (r.1, r.0)).map(|r| r.0);
                assert_eq!(f.find_fit(want), scan, "step {step}, {want} tracks");
            }
        }
        let bytes = postcard::to_stdvec(&f).unwrap();
        let back: FreeMap = postcard::from_bytes(&bytes).unwrap();
        assert_eq!(back, f, "the index is rebuilt when read back");
        let record = postcard::to_stdvec(&(f.volume, f.tracks_total, &f.runs, f.free_tracks)).unwrap();
        assert_eq!(bytes, record, "the stored form is unchanged (docs/format.md)");
    }
}
