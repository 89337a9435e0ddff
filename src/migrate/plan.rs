//! Planning: where a job's target goes, and which jobs a merge or a drain is made of. Pure
//! functions of the catalog; the engine (mod.rs) records and runs what they return.

use std::collections::{BTreeMap, HashSet};

use crate::catalog::model::{Body, Catalog, Ino};
use crate::layout::Layout;
use crate::report;
use crate::space::{plan_growth, Extent, VolumeId};

/// One data set to move, and where it may go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlannedJob {
    pub ino: Ino,
    pub path: String,
    pub tracks: u64,
    pub targets: Vec<VolumeId>,
}

/// Steps b and c: the target of `tracks` tracks on `targets`, as one request: one contiguous
/// run if a target volume has one that holds it (the volume with the most free tracks
/// first), else the fewest extents (the largest runs first). `None` if the targets don't
/// hold it. A closed volume (a plan's source) is never a target, as it takes no growth.
pub fn place_target(c: &Catalog, targets: &[VolumeId], tracks: u64) -> Option<Vec<Extent>> {
    let frees = c.open_volumes().filter(|v| targets.contains(&v.id)).map(|v| &v.free);
    plan_growth(frees, None, 0, tracks)
}

/// More target tracks for a job whose data set grew: in place after the target's last
/// extent when possible, over-provisioned like any growth.
pub fn grow_target(c: &Catalog, targets: &[VolumeId], have: &Layout, more: u64) -> Option<Vec<Extent>> {
    let frees = c.open_volumes().filter(|v| targets.contains(&v.id)).map(|v| &v.free);
    plan_growth(frees, have.last_extent(), have.mapped_tracks(), more)
}

/// Free tracks on `targets`.
pub fn free_on(c: &Catalog, targets: &[VolumeId]) -> u64 {
    targets.iter().filter_map(|v| c.volumes.get(v)).map(|v| v.free.free_tracks()).sum()
}

pub fn volume_name(c: &Catalog, id: VolumeId) -> String {
    c.volumes.get(&id).map(|v| v.name.clone()).unwrap_or_else(|| format!("#{}", id.0))
}

pub fn names(c: &Catalog, ids: &[VolumeId]) -> String {
    ids.iter().map(|&v| volume_name(c, v)).collect::<Vec<_>>().join(", ")
}

/// Human size of `tracks` tracks.
pub fn tracks_text(c: &Catalog, tracks: u64) -> String {
    let bytes = tracks * c.geometry.track_size_bytes();
    let mib = bytes as f64 / (1 << 20) as f64;
    if mib >= 1024.0 {
        format!("{tracks} tracks, {:.1} GiB", mib / 1024.0)
    } else {
        format!("{tracks} tracks, {mib:.1} MiB")
    }
}

/// Every data set with an extent on one of `sources`, except those in `busy`, in path order.
pub fn on_volumes(c: &Catalog, sources: &[VolumeId], busy: &HashSet<Ino>) -> Vec<PlannedJob> {
    let listing = report::list(c, "/").map(|l| l.data_sets).unwrap_or_default();
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    for d in listing {
        let Some(i) = c.get(d.ino) else { continue };
        let Body::File { layout, .. } = &i.body else { continue };
        if busy.contains(&d.ino) || !seen.insert(d.ino) {
            continue;
        }
        if layout.extents().any(|e| sources.contains(&e.volume)) {
            let tracks = i.data_tracks(c.geometry);
            out.push(PlannedJob { ino: d.ino, path: d.path, tracks, targets: Vec::new() });
        }
    }
    out
}

/// A merge: every data set on `sources` moves whole into `into`. Refused when they don't fit.
pub fn plan_merge(
    c: &Catalog,
    sources: &[VolumeId],
    into: VolumeId,
    busy: &HashSet<Ino>,
) -> Result<Vec<PlannedJob>, String> {
    let mut jobs = on_volumes(c, sources, busy);
    // Tracks the data sets already hold on the target are freed only after their switch.
    let need: u64 = jobs.iter().map(|j| j.tracks).sum();
    let free = free_on(c, &[into]);
    if need > free {
        return Err(format!(
            "merge refused: the data sets on {} hold {}; {} has {} free",
            names(c, sources),
            tracks_text(c, need),
            volume_name(c, into),
            tracks_text(c, free)
        ));
    }
    for j in &mut jobs {
        j.targets = vec![into];
    }
    Ok(jobs)
}

/// A drain: every data set on `source` moves to one of `targets`, the largest data sets
/// first, each to the target with the most free tracks left; a data set no single target
/// holds is spread over all of them. Refused when the total doesn't fit.
pub fn plan_drain(
    c: &Catalog,
    source: VolumeId,
    targets: &[VolumeId],
    busy: &HashSet<Ino>,
) -> Result<Vec<PlannedJob>, String> {
    let mut jobs = on_volumes(c, &[source], busy);
    let need: u64 = jobs.iter().map(|j| j.tracks).sum();
    let free_total = free_on(c, targets);
    if need > free_total {
        return Err(format!(
            "drain refused: the data sets on {} hold {}; {} have {} free",
            volume_name(c, source),
            tracks_text(c, need),
            names(c, targets),
            tracks_text(c, free_total)
        ));
    }
    let mut left: BTreeMap<VolumeId, u64> = targets.iter().map(|&v| (v, free_on(c, &[v]))).collect();
    jobs.sort_by(|a, b| b.tracks.cmp(&a.tracks).then(a.path.cmp(&b.path)));
    for j in &mut jobs {
        let best = left.iter().filter(|(_, &f)| f >= j.tracks).max_by_key(|(&v, &f)| (f, std::cmp::Reverse(v)));
        match best {
            Some((&v, _)) => {
                *left.get_mut(&v).unwrap() -= j.tracks;
                j.targets = vec![v];
            }
            None => {
                let mut need = j.tracks;
                for f in left.values_mut() {
                    let take = need.min(*f);
                    *f -= take;
                    need -= take;
                }
                j.targets = targets.to_vec();
            }
        }
    }
    jobs.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(jobs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::model::{Meta, NewKind, Op, ROOT_INO};
    use crate::geometry::{Geometry, TrackNo};

    fn meta() -> Meta {
        Meta { perm: 0o644, uid: 0, gid: 0, nlink: 1, atime_ns: 0, mtime_ns: 0, ctime_ns: 0 }
    }

    /// (volume, first track, tracks)
    type Ext = (u32, u64, u64);

    /// Volumes 1..=3 of `sizes` tracks; data sets named by their extents.
    fn catalog(sizes: [u64; 3], files: &[(&str, Vec<Ext>)]) -> Catalog {
        let mut c = Catalog::new(Geometry::new(4096).unwrap(), meta());
        for (i, n) in sizes.into_iter().enumerate() {
            let id = i as u32 + 1;
            c.apply(&Op::AddVolume {
                id: VolumeId(id),
                name: format!("V{id}"),
                path: "/x".into(),
                size_bytes: n * 4096,
                tracks_total: n,
            })
            .unwrap();
        }
        for (k, (name, extents)) in files.iter().enumerate() {
            let ino = 10 + k as u64;
            let kind = NewKind::File;
            c.apply(&Op::MakeNode { ino, parent: ROOT_INO, name: name.as_bytes().to_vec(), meta: meta(), kind })
                .unwrap();
            let extents = extents
                .iter()
                .map(|&(v, first, n)| Extent { volume: VolumeId(v), first: TrackNo(first), count_tracks: n })
                .collect();
            c.apply(&Op::Grow { ino, extents }).unwrap();
            let size_bytes = c.get(ino).unwrap().allocated_tracks() * 4096;
            c.apply(&Op::SetSize { ino, size_bytes, mtime_ns: 0 }).unwrap();
        }
        c
    }

    #[test]
    fn target_is_one_run_when_it_fits_else_fewest_extents() {
        let c = catalog([10, 10, 100], &[("a", vec![(3, 0, 10)]), ("b", vec![(3, 20, 10)])]);
        let t = place_target(&c, &[VolumeId(3)], 50).unwrap();
        assert_eq!(t, vec![Extent { volume: VolumeId(3), first: TrackNo(30), count_tracks: 50 }]);
        let t = place_target(&c, &[VolumeId(3)], 75).unwrap();
        assert_eq!(t.len(), 2, "split over the two largest runs: {t:?}");
        assert!(place_target(&c, &[VolumeId(3)], 81).is_none(), "80 tracks are free");
    }

    #[test]
    fn merge_takes_spanning_data_sets_whole_and_refuses_what_does_not_fit() {
        let c =
            catalog([10, 10, 30], &[("a", vec![(1, 0, 4)]), ("b", vec![(2, 0, 3), (3, 0, 5)]), ("c", vec![(3, 5, 2)])]);
        let jobs = plan_merge(&c, &[VolumeId(1), VolumeId(2)], VolumeId(3), &HashSet::new()).unwrap();
        assert_eq!(jobs.iter().map(|j| (j.path.as_str(), j.tracks)).collect::<Vec<_>>(), vec![("/a", 4), ("/b", 8)]);
        let small = catalog([10, 10, 10], &[("a", vec![(1, 0, 9)]), ("b", vec![(2, 0, 3)])]);
        let e = plan_merge(&small, &[VolumeId(1), VolumeId(2)], VolumeId(3), &HashSet::new()).unwrap_err();
        assert!(e.contains("merge refused") && e.contains("12 tracks") && e.contains("V3 has 10 tracks"), "{e}");
    }

    #[test]
    fn drain_spreads_by_free_space() {
        let c = catalog([20, 10, 8], &[("a", vec![(1, 0, 6)]), ("b", vec![(1, 6, 5)]), ("c", vec![(1, 11, 4)])]);
        let jobs = plan_drain(&c, VolumeId(1), &[VolumeId(2), VolumeId(3)], &HashSet::new()).unwrap();
        let to: Vec<(&str, Vec<VolumeId>)> = jobs.iter().map(|j| (j.path.as_str(), j.targets.clone())).collect();
        // a (6) -> V2 (10 free), b (5) -> V3 (8 free), c (4) -> V2 (4 left) .
        assert_eq!(to, vec![("/a", vec![VolumeId(2)]), ("/b", vec![VolumeId(3)]), ("/c", vec![VolumeId(2)])]);
        let e = plan_drain(&c, VolumeId(1), &[VolumeId(3)], &HashSet::new()).unwrap_err();
        assert!(e.contains("drain refused"), "{e}");
    }
}
