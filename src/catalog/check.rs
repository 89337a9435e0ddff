//! Every invariant of the catalog, checked (fsck; also run by tests and debug builds).
//!
//! - no track is owned twice, and none is both free and owned, and none is neither;
//! - every extent lies inside its volume;
//! - every data set's size lies inside its allocation;
//! - every directory entry resolves, link counts match the entries, and every inode with
//!   links is reachable from the root;
//! - a special file holds no tracks (its body has none), and only a device has a device
//!   number;
//! - extended attributes belong to inodes that exist, have valid names (a stored namespace,
//!   at most 255 bytes) and values (at most 64 KiB), stay within the per-node caps, and an
//!   ACL decodes; an access ACL says the same as the node's permission bits;
//! - what the catalog keeps counted as ops apply (data sets, per volume too; volumes by
//!   name) matches a recount.

use std::collections::{BTreeMap, HashMap, HashSet};

use super::acl;
use super::model::CONTROL_DIR_NAME;
use super::model::{
    volumes_of, xattr_bytes, xattr_list_bytes, xattr_name_valid, Body, Catalog, CatalogIndex, Ino, ROOT_INO,
    XATTR_LIST_MAX_BYTES, XATTR_NODE_MAX_BYTES, XATTR_SYSTEM_NAMES, XATTR_VALUE_MAX_BYTES,
};
use crate::space::{Extent, VolumeId};

#[derive(Debug, Default)]
pub struct CheckReport {
    /// Broken invariants: a non-empty list makes fsck fail.
    pub problems: Vec<String>,
    /// Facts worth saying that are not errors (orphans the next mount frees).
    pub notes: Vec<String>,
    pub data_sets: usize,
    pub directories: usize,
    /// Fifos, sockets and device nodes.
    pub special_files: usize,
}

pub fn check(c: &Catalog) -> CheckReport {
    let mut r = CheckReport::default();
    let vol_name = |id: VolumeId| c.volumes.get(&id).map(|v| v.name.clone()).unwrap_or(format!("#{}", id.0));

    // Extents, per volume.
    // (first, end, owner): a data set, or a job's reservation or set-aside tracks.
    let mut owned: HashMap<VolumeId, Vec<(u64, u64, Owner)>, FastHash> = HashMap::default();
    // The data sets on each volume, counted again, against what the catalog kept counted.
    let mut data_sets_on: BTreeMap<VolumeId, u64> = BTreeMap::new();
    let mut spread: Vec<VolumeId> = Vec::new();
    // One walk of the inode table for everything checked per inode: at 10^6 data sets the
    // table is far larger than the CPU's caches, and each walk costs a cache miss per inode.
    let mut special: Vec<(Ino, String)> = Vec::new();
    for i in c.inodes.values() {
        if let Body::Special { kind, rdev } = i.body {
            r.special_files += 1;
            if !kind.is_device() && rdev != 0 {
                special
                    .push((i.ino, format!("special file {}: a {} with device number {rdev:#x}", i.ino, kind.name())));
            }
        }
        if let Body::File { layout, prealloc_end, .. } = &i.body {
            r.data_sets += 1;
            volumes_of(layout, &mut spread);
            for &v in &spread {
                *data_sets_on.entry(v).or_default() += 1;
            }
            // Holes: the runs in logical order, none overlapping another (a logical track
            // mapped twice), none empty.
            if let Err(e) = layout.check() {
                r.problems.push(format!("data set {}: {e}", i.ino));
            }
            // Preallocation claims only mapped tracks.
            if *prealloc_end > layout.end() {
                r.problems.push(format!(
                    "data set {}: preallocated to logical track {prealloc_end}, but mapped only to {}",
                    i.ino,
                    layout.end()
                ));
            }
            for e in layout.extents() {
                if e.count_tracks == 0 {
                    r.problems.push(format!("data set {}: empty extent on {}", i.ino, vol_name(e.volume)));
                }
                match c.volumes.get(&e.volume) {
                    None => r.problems.push(format!("data set {}: extent on unknown volume #{}", i.ino, e.volume.0)),
                    Some(v) if e.end().0 > v.free.tracks_total() => r.problems.push(format!(
                        "data set {}: extent {}..{} lies outside volume {} ({} tracks)",
                        i.ino,
                        e.first.0,
                        e.end().0,
                        v.name,
                        v.free.tracks_total()
                    )),
                    Some(_) => {}
                }
                owned.entry(e.volume).or_default().push((e.first.0, e.end().0, Owner::DataSet(i.ino)));
            }
        }
    }
    check_index(c, r.data_sets as u64, &data_sets_on, &mut r);
    special.sort();
    r.problems.extend(special.into_iter().map(|(_, p)| p));
    check_xattrs(c, &mut r);
    for (id, cp) in &c.checkpoints {
        match c.jobs.get(id) {
            None => r.problems.push(format!("checkpoint of job {id}, which the catalog does not hold")),
            Some(j) if j.switched => r.problems.push(format!("job {id}: switched but still holds a checkpoint")),
            Some(_) if cp.region_tracks == 0 => r.problems.push(format!("job {id}: a checkpoint with empty regions")),
            Some(_) => {}
        }
    }
    for j in c.jobs.values() {
        if !c.inodes.get(&j.ino).is_some_and(|i| matches!(i.body, Body::File { .. })) {
            r.problems.push(format!("job {}: data set {} is missing", j.id, j.ino));
        }
        if j.switched && !j.target.is_empty() {
            r.problems.push(format!("job {}: switched but still holds a target reservation", j.id));
        }
        if let Err(e) = j.target.check() {
            r.problems.push(format!("job {}: reservation: {e}", j.id));
        }
        let target: Vec<Extent> = j.target.extents().collect();
        for (what, list) in [("reservation", &target), ("set-aside tracks", &j.release)] {
            for e in list {
                if c.volumes.get(&e.volume).is_none_or(|v| e.end().0 > v.free.tracks_total()) {
                    r.problems.push(format!(
                        "job {}: {what} {}..{} lies outside volume #{}",
                        j.id,
                        e.first.0,
                        e.end().0,
                        e.volume.0
                    ));
                }
                owned.entry(e.volume).or_default().push((e.first.0, e.end().0, Owner::Job(j.id, what)));
            }
        }
    }
    for p in c.plans.values() {
        for v in p.sources.iter().chain(&p.targets) {
            if !c.volumes.contains_key(v) {
                r.problems.push(format!("plan {}: volume #{} is not in the pool", p.id, v.0));
            }
        }
    }
    for (id, v) in &c.volumes {
        let mut list = owned.remove(id).unwrap_or_default();
        list.sort_unstable();
        let mut owned_tracks = 0u64;
        for w in list.windows(2) {
            if w[1].0 < w[0].1 {
                r.problems.push(format!(
                    "volume {}: tracks {}..{} are owned by {} and {}",
                    v.name,
                    w[1].0,
                    w[0].1.min(w[1].1),
                    w[0].2,
                    w[1].2
                ));
            }
        }
        for (s, e, owner) in &list {
            let (s, e) = (*s, *e);
            owned_tracks += e - s;
            if e <= v.free.tracks_total() && v.free.overlaps_free(s, e - s) {
                r.problems
                    .push(format!("volume {}: tracks in {}..{} are both free and owned by {owner}", v.name, s, e));
            }
        }
        let total = v.free.tracks_total();
        if owned_tracks + v.free.free_tracks() != total {
            r.problems.push(format!(
                "volume {}: {} owned + {} free tracks != {} tracks",
                v.name,
                owned_tracks,
                v.free.free_tracks(),
                total
            ));
        }
    }
    for id in owned.keys() {
        r.problems.push(format!("extents on volume #{} which the catalog does not hold", id.0));
    }

    // Namespace.
    match c.inodes.get(&ROOT_INO) {
        Some(root) if root.is_dir() => {}
        _ => {
            r.problems.push("the root directory is missing".into());
            return r;
        }
    }
    // Links of every inode that is not a directory, and the directories reached.
    let mut links: HashMap<Ino, u32, FastHash> = HashMap::with_capacity_and_hasher(c.inodes.len(), FastHash);
    let mut reached: HashSet<Ino, FastHash> = HashSet::default();
    let mut stack = vec![ROOT_INO];
    reached.insert(ROOT_INO);
    while let Some(d) = stack.pop() {
        r.directories += 1;
        let Some(Body::Dir { entries, .. }) = c.inodes.get(&d).map(|i| &i.body) else { continue };
        let mut subdirs = 0;
        for (name, &ino) in entries {
            let shown = || String::from_utf8_lossy(name);
            if d == ROOT_INO && name.as_slice() == CONTROL_DIR_NAME.as_bytes() {
                r.problems.push(format!("a user entry is named {CONTROL_DIR_NAME} at the root"));
            }
            match c.inodes.get(&ino) {
                None => r.problems.push(format!("directory {d}: entry {:?} points to missing inode {ino}", shown())),
                Some(i) => {
                    if let Body::Dir { parent, .. } = &i.body {
                        subdirs += 1;
                        if *parent != d {
                            r.problems
                                .push(format!("directory {ino} ({:?}) says its parent is {parent}, not {d}", shown()));
                        }
                        if !reached.insert(ino) {
                            r.problems.push(format!("directory {ino} is reachable twice"));
                            continue;
                        }
                        stack.push(ino);
                    } else {
                        *links.entry(ino).or_default() += 1;
                    }
                }
            }
        }
        let want = 2 + subdirs;
        let have = c.inodes[&d].meta.nlink;
        if have != want {
            r.problems.push(format!("directory {d}: link count {have}, expected {want}"));
        }
    }
    for i in c.inodes.values() {
        if i.is_dir() {
            if !reached.contains(&i.ino) {
                r.problems.push(format!("directory {} is not reachable from the root", i.ino));
            }
            continue;
        }
        let n = links.get(&i.ino).copied().unwrap_or(0);
        if n != i.meta.nlink {
            r.problems.push(format!("inode {}: link count {}, but {} entries name it", i.ino, i.meta.nlink, n));
        }
        if i.meta.nlink == 0 {
            r.notes.push(format!(
                "inode {} has no links (it was open when the mount stopped; the next mount frees it)",
                i.ino
            ));
        }
    }
    r
}

/// Who owns tracks of a volume (named only in a problem).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Owner {
    DataSet(Ino),
    /// A job's reservation or set-aside tracks.
    Job(u64, &'static str),
}

impl std::fmt::Display for Owner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Owner::DataSet(ino) => write!(f, "data set {ino}"),
            Owner::Job(id, what) => write!(f, "job {id} ({what})"),
        }
    }
}

/// A hasher for the check's tables of inode numbers and volume ids, which no one outside
/// chooses: a multiply per key instead of SipHash's rounds, over a million inodes.
#[derive(Clone, Copy, Default)]
struct FastHash;

impl std::hash::BuildHasher for FastHash {
    type Hasher = FastHasher;
    fn build_hasher(&self) -> FastHasher {
        FastHasher(0)
    }
}

struct FastHasher(u64);

impl std::hash::Hasher for FastHasher {
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u64(b as u64);
        }
    }
    fn write_u32(&mut self, n: u32) {
        self.write_u64(n as u64);
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0.rotate_left(5) ^ n).wrapping_mul(0x517c_c1b7_2722_0a95);
    }
    fn finish(&self) -> u64 {
        self.0
    }
}

/// What the catalog keeps counted as ops apply (its [`CatalogIndex`]) against a recount:
/// `data_sets` and `data_sets_on` are the recount's.
fn check_index(c: &Catalog, data_sets: u64, data_sets_on: &BTreeMap<VolumeId, u64>, r: &mut CheckReport) {
    let kept = c.index();
    if kept.data_sets != data_sets {
        r.problems.push(format!("the catalog counts {} data sets, but holds {data_sets}", kept.data_sets));
    }
    for (v, (k, n)) in merge_counts(&kept.data_sets_on, data_sets_on) {
        if k != n {
            r.problems.push(format!(
                "volume {}: the catalog counts {k} data sets on it, but {n} have tracks there",
                c.volumes.get(&v).map(|x| x.name.clone()).unwrap_or(format!("#{}", v.0))
            ));
        }
    }
    let names = CatalogIndex::of_names(c);
    if kept.volume_names != names {
        r.problems.push(format!(
            "the catalog's index of volume names ({} names) does not match its {} volumes",
            kept.volume_names.len(),
            c.volumes.len()
        ));
    }
}

/// Each volume of `a` or `b`, with its count in each (0 where it has none).
fn merge_counts(a: &BTreeMap<VolumeId, u64>, b: &BTreeMap<VolumeId, u64>) -> BTreeMap<VolumeId, (u64, u64)> {
    let mut out: BTreeMap<VolumeId, (u64, u64)> = BTreeMap::new();
    for (v, n) in a {
        out.entry(*v).or_default().0 = *n;
    }
    for (v, n) in b {
        out.entry(*v).or_default().1 = *n;
    }
    out
}

/// Extended attributes.
fn check_xattrs(c: &Catalog, r: &mut CheckReport) {
    let mut inos: Vec<&Ino> = c.xattrs.keys().collect();
    inos.sort_unstable();
    for ino in inos {
        let x = &c.xattrs[ino];
        let Some(i) = c.inodes.get(ino) else {
            r.problems.push(format!("extended attributes of inode {ino}, which does not exist"));
            continue;
        };
        if x.is_empty() {
            r.problems.push(format!("inode {ino}: an empty attribute table is kept"));
        }
        for (name, value) in x {
            let shown = String::from_utf8_lossy(name);
            if !xattr_name_valid(name) {
                r.problems.push(format!("inode {ino}: attribute name {shown:?} is not valid"));
            }
            if value.len() > XATTR_VALUE_MAX_BYTES {
                r.problems.push(format!("inode {ino}: attribute {shown:?} holds {} bytes", value.len()));
            }
            if XATTR_SYSTEM_NAMES.iter().any(|n| n.as_bytes() == &name[..]) && !acl::valid(value) {
                r.problems.push(format!("inode {ino}: {shown} is not a valid ACL"));
            }
        }
        let (bytes, list) = (xattr_bytes(x), xattr_list_bytes(x));
        if bytes > XATTR_NODE_MAX_BYTES || list > XATTR_LIST_MAX_BYTES {
            r.problems.push(format!(
                "inode {ino}: attributes take {bytes} bytes ({list} of names); the cap is {XATTR_NODE_MAX_BYTES} \
                 ({XATTR_LIST_MAX_BYTES})"
            ));
        }
        if let Some(mode) = x.get(acl::ACL_ACCESS).and_then(|a| acl::mode_of(a)) {
            if mode != i.meta.perm & 0o777 {
                r.problems.push(format!(
                    "inode {ino}: its access ACL says {mode:o}, its permission bits {:o}",
                    i.meta.perm & 0o777
                ));
            }
        }
        if x.contains_key(acl::ACL_DEFAULT) && !i.is_dir() {
            r.problems.push(format!("inode {ino}: a default ACL on something that is not a directory"));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::model::{Meta, NewKind, Op, SpecialKind};
    use crate::geometry::Geometry;

    fn meta(perm: u32) -> Meta {
        Meta { perm, uid: 0, gid: 0, nlink: 0, atime_ns: 0, mtime_ns: 0, ctime_ns: 0 }
    }

    fn special(c: &mut Catalog, ino: Ino, kind: SpecialKind, rdev: u32) {
        let name = format!("n{ino}").into_bytes();
        c.apply(&Op::MakeNode {
            ino,
            parent: ROOT_INO,
            name,
            meta: meta(0o644),
            kind: NewKind::Special { kind, rdev },
        })
        .unwrap();
    }

    /// The per-volume counts the catalog keeps are checked against a recount: a layout
    /// changed behind `apply`'s back shows.
    #[test]
    fn kept_counts_are_checked_against_a_recount() {
        use crate::geometry::TrackNo;
        use crate::layout::Layout;
        let mut c = Catalog::new(Geometry::new(4096).unwrap(), meta(0o755));
        for id in [1, 2] {
            let (name, path) = (format!("V{id}"), "/x".into());
            c.apply(&Op::AddVolume { id: VolumeId(id), name, path, size_bytes: 8 * 4096, tracks_total: 8 }).unwrap();
        }
        c.apply(&Op::MakeNode {
            ino: 2,
            parent: ROOT_INO,
            name: b"f".to_vec(),
            meta: meta(0o644),
            kind: NewKind::File,
        })
        .unwrap();
        let on = |v, first| Extent { volume: VolumeId(v), first: TrackNo(first), count_tracks: 2 };
        c.apply(&Op::Grow { ino: 2, extents: vec![on(1, 0)] }).unwrap();
        let r = check(&c);
        assert!(r.problems.is_empty(), "{:?}", r.problems);
        assert_eq!((c.data_sets_on(VolumeId(1)), c.data_sets_on(VolumeId(2))), (1, 0));

        let mut bad = c.clone();
        if let Body::File { layout, .. } = &mut bad.inodes.get_mut(&2).unwrap().body {
            *layout = Layout::dense(&[on(2, 0)]);
        }
        let problems = check(&bad).problems.join("\n");
        for want in [
            "volume V1: the catalog counts 1 data sets on it, but 0 have tracks there",
            "volume V2: the catalog counts 0 data sets on it, but 1 have tracks there",
        ] {
            assert!(problems.contains(want), "{want:?} missing from:\n{problems}");
        }
    }

    #[test]
    fn special_files_and_attributes_are_checked() {
        let mut c = Catalog::new(Geometry::new(4096).unwrap(), meta(0o755));
        special(&mut c, 2, SpecialKind::CharDev, 0x103);
        special(&mut c, 3, SpecialKind::Fifo, 0);
        c.apply(&Op::SetXattr { ino: 2, name: b"user.a".to_vec(), value: b"v".to_vec(), ctime_ns: 1 }).unwrap();
        let r = check(&c);
        assert!(r.problems.is_empty(), "{:?}", r.problems);
        assert_eq!(r.special_files, 2);

        let mut bad = c.clone();
        bad.inodes.get_mut(&3).unwrap().body = Body::Special { kind: SpecialKind::Fifo, rdev: 7 };
        bad.xattrs.insert(99, [(b"user.x".to_vec(), vec![])].into());
        bad.xattrs.get_mut(&2).unwrap().insert(b"os2.x".to_vec(), vec![]);
        bad.xattrs.get_mut(&2).unwrap().insert(b"user.big".to_vec(), vec![0; XATTR_VALUE_MAX_BYTES + 1]);
        bad.xattrs.insert(3, [(acl::ACL_ACCESS.to_vec(), b"not an acl".to_vec())].into());
        let problems = check(&bad).problems.join("\n");
        for want in [
            "a fifo with device number 0x7",
            "inode 99, which does not exist",
            "\"os2.x\" is not valid",
            "\"user.big\" holds 65537 bytes",
            "system.posix_acl_access is not a valid ACL",
        ] {
            assert!(problems.contains(want), "{want:?} missing from:\n{problems}");
        }
    }
}
