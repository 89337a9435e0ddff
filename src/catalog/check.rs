//! Every invariant of the catalog, checked (fsck; also run by tests and debug builds).
//!
//! - no track is owned twice, and none is both free and owned, and none is neither;
//! - every extent lies inside its volume;
//! - every data set's size lies inside its allocation;
//! - every directory entry resolves, link counts match the entries, and every inode with
//!   links is reachable from the root.

use std::collections::{HashMap, HashSet};

use super::model::CONTROL_DIR_NAME;
use super::model::{Body, Catalog, Ino, ROOT_INO};
use crate::space::VolumeId;

#[derive(Debug, Default)]
pub struct CheckReport {
    /// Broken invariants: a non-empty list makes fsck fail.
    pub problems: Vec<String>,
    /// Facts worth saying that are not errors (orphans the next mount frees).
    pub notes: Vec<String>,
    pub data_sets: usize,
    pub directories: usize,
}

pub fn check(c: &Catalog) -> CheckReport {
    let mut r = CheckReport::default();
    let track_bytes = c.geometry.track_size_bytes();
    let vol_name = |id: VolumeId| c.volumes.get(&id).map(|v| v.name.clone()).unwrap_or(format!("#{}", id.0));

    // Extents, per volume.
    // (first, end, owner): a data set, or a job's reservation or set-aside tracks.
    let mut owned: HashMap<VolumeId, Vec<(u64, u64, String)>> = HashMap::new();
    for i in c.inodes.values() {
        if let Body::File { size_bytes, extents } = &i.body {
            r.data_sets += 1;
            let alloc: u64 = extents.iter().map(|e| e.count_tracks).sum();
            if *size_bytes > alloc * track_bytes {
                r.problems.push(format!(
                    "data set {}: size {} bytes is beyond its allocation of {} tracks",
                    i.ino, size_bytes, alloc
                ));
            }
            for e in extents {
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
                owned.entry(e.volume).or_default().push((e.first.0, e.end().0, format!("data set {}", i.ino)));
            }
        }
    }
    for j in c.jobs.values() {
        if !c.inodes.get(&j.ino).is_some_and(|i| matches!(i.body, Body::File { .. })) {
            r.problems.push(format!("job {}: data set {} is missing", j.id, j.ino));
        }
        if j.switched && !j.target.is_empty() {
            r.problems.push(format!("job {}: switched but still holds a target reservation", j.id));
        }
        for (what, list) in [("reservation", &j.target), ("set-aside tracks", &j.release)] {
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
                owned.entry(e.volume).or_default().push((e.first.0, e.end().0, format!("job {} ({what})", j.id)));
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
    let mut links: HashMap<Ino, u32> = HashMap::new();
    let mut reached: HashSet<Ino> = HashSet::new();
    let mut stack = vec![ROOT_INO];
    reached.insert(ROOT_INO);
    while let Some(d) = stack.pop() {
        r.directories += 1;
        let Some(Body::Dir { entries, .. }) = c.inodes.get(&d).map(|i| &i.body) else { continue };
        let mut subdirs = 0;
        for (name, &ino) in entries {
            let shown = String::from_utf8_lossy(name);
            if d == ROOT_INO && name.as_slice() == CONTROL_DIR_NAME.as_bytes() {
                r.problems.push(format!("a user entry is named {CONTROL_DIR_NAME} at the root"));
            }
            match c.inodes.get(&ino) {
                None => r.problems.push(format!("directory {d}: entry {shown:?} points to missing inode {ino}")),
                Some(i) => {
                    *links.entry(ino).or_default() += 1;
                    if let Body::Dir { parent, .. } = &i.body {
                        subdirs += 1;
                        if *parent != d {
                            r.problems
                                .push(format!("directory {ino} ({shown:?}) says its parent is {parent}, not {d}"));
                        }
                        if !reached.insert(ino) {
                            r.problems.push(format!("directory {ino} is reachable twice"));
                            continue;
                        }
                        stack.push(ino);
                    } else {
                        reached.insert(ino);
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
    for i in c.inodes.values() {
        if i.is_dir() && !reached.contains(&i.ino) {
            r.problems.push(format!("directory {} is not reachable from the root", i.ino));
        }
    }
    r
}
