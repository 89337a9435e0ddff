//! Reading stores of older format versions (store.rs says what each version added).
//!
//! Version 4 made data sets sparse: a file's body holds a [`Layout`] of runs at logical
//! tracks (and its explicit preallocation) where it held extents laid end to end, and a
//! job's target likewise; job and plan records gained `verify`, and the snapshot the jobs'
//! checkpoints. Everything else of a version 1 to 3 snapshot decodes as it is; the dense
//! extents become a [`Layout::dense`], `verify` is off, and there are no checkpoints. In
//! the log only a job's start and a plan's start carry those records; every other op of
//! versions 1 to 3 decodes as a version 4 op.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use serde::Deserialize;
#[cfg(test)]
use serde::Serialize;

use super::model::{
    Body, Catalog, CatalogRecord, Cutover, Ino, Inode, JobRec, Meta, Op, PlanKind, PlanRec, SpecialKind, VolumeRec,
    Xattrs,
};
use crate::geometry::Geometry;
use crate::layout::Layout;
use crate::space::{Extent, VolumeId};

#[derive(Deserialize)]
#[cfg_attr(test, derive(Serialize))]
enum BodyV3 {
    Dir { parent: Ino, entries: BTreeMap<Vec<u8>, Ino> },
    File { size_bytes: u64, extents: Vec<Extent> },
    Symlink { target: Vec<u8> },
    Special { kind: SpecialKind, rdev: u32 },
}

#[derive(Deserialize)]
#[cfg_attr(test, derive(Serialize))]
struct InodeV3 {
    ino: Ino,
    meta: Meta,
    body: BodyV3,
}

impl From<InodeV3> for Inode {
    fn from(i: InodeV3) -> Inode {
        let body = match i.body {
            BodyV3::Dir { parent, entries } => Body::Dir { parent, entries },
            BodyV3::File { size_bytes, extents } => {
                Body::File { size_bytes, layout: Layout::dense(&extents), prealloc_end: 0 }
            }
            BodyV3::Symlink { target } => Body::Symlink { target },
            BodyV3::Special { kind, rdev } => Body::Special { kind, rdev },
        };
        Inode { ino: i.ino, meta: i.meta, body }
    }
}

#[derive(Deserialize)]
#[cfg_attr(test, derive(Serialize))]
struct JobRecV3 {
    id: u64,
    ino: Ino,
    path: String,
    targets: Vec<VolumeId>,
    target: Vec<Extent>,
    release: Vec<Extent>,
    switched: bool,
    cutover: Cutover,
    rate_bytes_per_s: u64,
    plan: Option<u64>,
    started_ns: i64,
}

impl From<JobRecV3> for JobRec {
    fn from(j: JobRecV3) -> JobRec {
        JobRec {
            id: j.id,
            ino: j.ino,
            path: j.path,
            targets: j.targets,
            target: Layout::dense(&j.target),
            release: j.release,
            switched: j.switched,
            cutover: j.cutover,
            rate_bytes_per_s: j.rate_bytes_per_s,
            plan: j.plan,
            started_ns: j.started_ns,
            verify: false,
        }
    }
}

#[derive(Deserialize)]
#[cfg_attr(test, derive(Serialize))]
struct PlanRecV3 {
    id: u64,
    kind: PlanKind,
    sources: Vec<VolumeId>,
    targets: Vec<VolumeId>,
    cutover: Cutover,
    rate_bytes_per_s: u64,
    started_ns: i64,
}

impl From<PlanRecV3> for PlanRec {
    fn from(p: PlanRecV3) -> PlanRec {
        PlanRec {
            id: p.id,
            kind: p.kind,
            sources: p.sources,
            targets: p.targets,
            cutover: p.cutover,
            rate_bytes_per_s: p.rate_bytes_per_s,
            started_ns: p.started_ns,
            verify: false,
        }
    }
}

/// A snapshot of versions 1 to 3: version 1 ends after `inodes`, version 2 after
/// `closed_volumes`, version 3 after `xattrs`.
struct CatalogV3 {
    geometry: Geometry,
    next_ino: Ino,
    next_volume: u32,
    volumes: BTreeMap<VolumeId, VolumeRec>,
    inodes: HashMap<Ino, InodeV3>,
    next_job: u64,
    jobs: BTreeMap<u64, JobRecV3>,
    plans: BTreeMap<u64, PlanRecV3>,
    closed_volumes: BTreeSet<VolumeId>,
    xattrs: HashMap<Ino, Xattrs>,
}

#[derive(Deserialize)]
#[cfg_attr(test, derive(Serialize))]
struct Head {
    geometry: Geometry,
    next_ino: Ino,
    next_volume: u32,
    volumes: BTreeMap<VolumeId, VolumeRec>,
    inodes: HashMap<Ino, InodeV3>,
}

#[derive(Deserialize)]
struct V1(Head);

#[derive(Deserialize)]
struct V2(Head, u64, BTreeMap<u64, JobRecV3>, BTreeMap<u64, PlanRecV3>, BTreeSet<VolumeId>);

#[derive(Deserialize)]
#[cfg_attr(test, derive(Serialize))]
struct V3(Head, u64, BTreeMap<u64, JobRecV3>, BTreeMap<u64, PlanRecV3>, BTreeSet<VolumeId>, HashMap<Ino, Xattrs>);

impl CatalogV3 {
    fn new(h: Head) -> CatalogV3 {
        CatalogV3 {
            geometry: h.geometry,
            next_ino: h.next_ino,
            next_volume: h.next_volume,
            volumes: h.volumes,
            inodes: h.inodes,
            next_job: 1,
            jobs: BTreeMap::new(),
            plans: BTreeMap::new(),
            closed_volumes: BTreeSet::new(),
            xattrs: HashMap::new(),
        }
    }
}

impl From<CatalogV3> for Catalog {
    fn from(v: CatalogV3) -> Catalog {
        // Through the stored form, so that the index is counted as for any catalog read.
        Catalog::from(CatalogRecord {
            geometry: v.geometry,
            next_ino: v.next_ino,
            next_volume: v.next_volume,
            volumes: v.volumes,
            inodes: v.inodes.into_iter().map(|(ino, i)| (ino, i.into())).collect::<HashMap<_, _>>().into(),
            next_job: v.next_job,
            jobs: v.jobs.into_iter().map(|(id, j)| (id, j.into())).collect(),
            plans: v.plans.into_iter().map(|(id, p)| (id, p.into())).collect(),
            closed_volumes: v.closed_volumes,
            xattrs: v.xattrs,
            checkpoints: Default::default(),
        })
    }
}

/// Decode the body of a snapshot of format `version` (1 to 3).
pub fn decode_snapshot(version: u16, body: &[u8]) -> Result<Catalog, postcard::Error> {
    // postcard is positional: a struct decodes as its fields in order, as a tuple does.
    let v = match version {
        1 => CatalogV3::new(postcard::from_bytes::<V1>(body)?.0),
        2 => {
            let V2(h, next_job, jobs, plans, closed_volumes) = postcard::from_bytes(body)?;
            CatalogV3 { next_job, jobs, plans, closed_volumes, ..CatalogV3::new(h) }
        }
        _ => {
            let V3(h, next_job, jobs, plans, closed_volumes, xattrs) = postcard::from_bytes(body)?;
            CatalogV3 { next_job, jobs, plans, closed_volumes, xattrs, ..CatalogV3::new(h) }
        }
    };
    Ok(v.into())
}

/// The first byte of a postcard-encoded op: its variant index (small enough for one byte).
fn tag(op: &Op) -> u8 {
    postcard::to_stdvec(op).expect("an op serializes")[0]
}

fn job_start_tag() -> u8 {
    tag(&Op::JobStart { job: JobRec::queued(0, 0, "", Vec::new()) })
}

fn plan_start_tag() -> u8 {
    tag(&Op::PlanStart {
        plan: PlanRec {
            id: 0,
            kind: PlanKind::Merge,
            sources: Vec::new(),
            targets: Vec::new(),
            cutover: Cutover::Live,
            rate_bytes_per_s: 0,
            started_ns: 0,
            verify: false,
        },
    })
}

/// Decode one log frame's op, written in format `version`.
pub fn decode_op(version: u16, payload: &[u8]) -> Result<Op, postcard::Error> {
    if version < 4 {
        match payload.first() {
            Some(&t) if t == job_start_tag() => {
                let job: JobRecV3 = postcard::from_bytes(&payload[1..])?;
                return Ok(Op::JobStart { job: job.into() });
            }
            Some(&t) if t == plan_start_tag() => {
                let plan: PlanRecV3 = postcard::from_bytes(&payload[1..])?;
                return Ok(Op::PlanStart { plan: plan.into() });
            }
            _ => {}
        }
    }
    postcard::from_bytes(payload)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::model::{Meta, ROOT_INO};
    use crate::geometry::TrackNo;
    use crate::layout::Run;

    fn e(v: u32, first: u64, n: u64) -> Extent {
        Extent { volume: VolumeId(v), first: TrackNo(first), count_tracks: n }
    }

    fn job_v3() -> JobRecV3 {
        JobRecV3 {
            id: 4,
            ino: 2,
            path: "/f".into(),
            targets: vec![VolumeId(1)],
            target: vec![e(1, 8, 2), e(1, 20, 1)],
            release: vec![],
            switched: false,
            cutover: Cutover::Close,
            rate_bytes_per_s: 7,
            plan: None,
            started_ns: 9,
        }
    }

    /// A version 3 snapshot with a data set in two extents and a job: the extents become a
    /// dense layout, and so does the job's target.
    #[test]
    fn a_version_3_snapshot_decodes_with_dense_layouts() {
        let meta = Meta { perm: 0o644, uid: 0, gid: 0, nlink: 1, atime_ns: 0, mtime_ns: 0, ctime_ns: 0 };
        let file = InodeV3 {
            ino: 2,
            meta: meta.clone(),
            body: BodyV3::File { size_bytes: 12000, extents: vec![e(1, 0, 2), e(1, 5, 1)] },
        };
        let root = InodeV3 {
            ino: ROOT_INO,
            meta,
            body: BodyV3::Dir { parent: ROOT_INO, entries: [(b"f".to_vec(), 2)].into_iter().collect() },
        };
        let head = Head {
            geometry: Geometry::new(4096).unwrap(),
            next_ino: 3,
            next_volume: 2,
            volumes: BTreeMap::new(),
            inodes: [(ROOT_INO, root), (2, file)].into_iter().collect(),
        };
        let v3 = V3(head, 5, [(4, job_v3())].into_iter().collect(), BTreeMap::new(), BTreeSet::new(), HashMap::new());
        let c = decode_snapshot(3, &postcard::to_stdvec(&v3).unwrap()).unwrap();
        let Body::File { size_bytes, layout, prealloc_end } = &c.get(2).unwrap().body else { panic!() };
        assert_eq!((*size_bytes, *prealloc_end), (12000, 0));
        assert_eq!(layout.runs(), &[Run { logical: 0, extent: e(1, 0, 2) }, Run { logical: 2, extent: e(1, 5, 1) }]);
        assert_eq!(c.jobs[&4].target, Layout::dense(&[e(1, 8, 2), e(1, 20, 1)]));
        assert_eq!((c.jobs[&4].cutover, c.jobs[&4].rate_bytes_per_s, c.next_job), (Cutover::Close, 7, 5));
        // The converted catalog's data sets are counted, as a current snapshot's are.
        assert_eq!((c.data_set_count(), c.data_sets_on(VolumeId(1))), (1, 1));
        assert_eq!(c.index(), &crate::catalog::model::CatalogIndex::of(&c));
    }

    /// A version 3 log frame of a job's start decodes with a dense target; other ops decode
    /// as they are.
    #[test]
    fn a_version_3_job_start_frame_decodes() {
        let mut payload = vec![job_start_tag()];
        payload.extend(postcard::to_stdvec(&job_v3()).unwrap());
        let Op::JobStart { job } = decode_op(3, &payload).unwrap() else { panic!() };
        assert_eq!((job.id, job.target.mapped_tracks(), job.target.end()), (4, 3, 3));
        assert!(!job.verify);
        let trim = Op::Trim { ino: 2, keep_tracks: 1 };
        assert_eq!(decode_op(3, &postcard::to_stdvec(&trim).unwrap()).unwrap(), trim);
        let plan = PlanRecV3 {
            id: 5,
            kind: PlanKind::Drain,
            sources: vec![VolumeId(1)],
            targets: vec![],
            cutover: Cutover::Live,
            rate_bytes_per_s: 3,
            started_ns: 8,
        };
        let mut payload = vec![plan_start_tag()];
        payload.extend(postcard::to_stdvec(&plan).unwrap());
        let Op::PlanStart { plan } = decode_op(3, &payload).unwrap() else { panic!() };
        assert_eq!((plan.id, plan.kind, plan.rate_bytes_per_s, plan.verify), (5, PlanKind::Drain, 3, false));
    }
}
