//! Data sets on volumes: spanning, full pools, reuse of freed tracks, persistence across
//! mounts, extent counts, and the figures of `volume list`.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::path::Path;

use serde_json::Value;

use common::*;

const K64: u64 = 65536;

fn u(v: &Value) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("not an unsigned integer: {v}"))
}

/// Checks `ls --json` and `volume list --json` against each other: extents lie inside their
/// volumes, never overlap, add up to each data set's allocation and to each volume's usage.
fn check_catalog_views(target: &Path) {
    let ls = ls_json(target);
    let vl = volume_list_json(target);
    let ts = u(&ls["track_size_bytes"]);
    assert_eq!(ts, u(&vl["track_size_bytes"]));
    let mut vols: BTreeMap<String, Value> = BTreeMap::new();
    for v in vl["volumes"].as_array().unwrap() {
        assert_eq!(u(&v["tracks_used"]) + u(&v["tracks_free"]), u(&v["tracks_total"]), "{v}");
        assert_eq!(u(&v["size_bytes"]), u(&v["tracks_total"]) * ts, "{v}");
        vols.insert(v["name"].as_str().unwrap().to_string(), v.clone());
    }
    let mut seen_ino = BTreeSet::new();
    let mut used: BTreeMap<String, Vec<(u64, u64, String)>> = BTreeMap::new();
    let mut sets_on: BTreeMap<String, BTreeSet<u64>> = BTreeMap::new();
    for d in ls["data_sets"].as_array().unwrap() {
        let path = d["path"].as_str().unwrap().to_string();
        let exts = d["extents"].as_array().unwrap();
        assert_eq!(exts.len() as u64, u(&d["extent_count"]), "{path}: extent_count");
        let sum: u64 = exts.iter().map(|e| u(&e["track_count"])).sum();
        assert_eq!(sum, u(&d["allocated_tracks"]), "{path}: extents add up to allocated_tracks");
        // a data set is sparse: its extents lie at logical tracks, in order, not overlapping
        let runs: Vec<(u64, u64)> =
            exts.iter().map(|e| (u(&e["logical_track"]), u(&e["logical_track"]) + u(&e["track_count"]))).collect();
        assert!(runs.windows(2).all(|w| w[0].1 <= w[1].0), "{path}: extents overlap or are out of order: {d}");
        let mut order = Vec::new();
        for e in exts {
            let name = e["volume"].as_str().unwrap().to_string();
            assert!(u(&e["track_count"]) > 0, "{path}: empty extent {e}");
            if !order.contains(&name) {
                order.push(name.clone());
            }
            let v = vols.get(&name).unwrap_or_else(|| panic!("{path}: unknown volume {name}"));
            assert!(
                u(&e["first_track"]) + u(&e["track_count"]) <= u(&v["tracks_total"]),
                "{path}: extent {e} past the end of {name}"
            );
            sets_on.entry(name.clone()).or_default().insert(u(&d["ino"]));
            if !seen_ino.contains(&u(&d["ino"])) {
                used.entry(name).or_default().push((u(&e["first_track"]), u(&e["track_count"]), path.clone()));
            }
        }
        let listed: Vec<String> =
            d["volumes"].as_array().unwrap().iter().map(|v| v.as_str().unwrap().to_string()).collect();
        assert_eq!(listed, order, "{path}: volumes in order of first appearance");
        seen_ino.insert(u(&d["ino"]));
    }
    for (name, v) in &vols {
        let mut runs = used.get(name).cloned().unwrap_or_default();
        runs.sort();
        for w in runs.windows(2) {
            assert!(w[0].0 + w[0].1 <= w[1].0, "{name}: extents overlap: {:?} and {:?}", w[0], w[1]);
        }
        let total: u64 = runs.iter().map(|r| r.1).sum();
        assert_eq!(total, u(&v["tracks_used"]), "{name}: tracks_used = tracks in extents");
        let n = sets_on.get(name).map(|s| s.len()).unwrap_or(0) as u64;
        assert_eq!(n, u(&v["data_sets"]), "{name}: data_sets count");
    }
}

#[test]
fn file_larger_than_one_volume_spans_two() {
    let tp = TestPool::new("64K", &[("V1", "1M"), ("V2", "2M")]);
    let m = tp.mount();
    // larger than either volume: it cannot fit in one
    let data = pattern(2_500_000, 21);
    fs::write(m.p("span.bin"), &data).unwrap();
    assert_bytes_eq(&fs::read(m.p("span.bin")).unwrap(), &data, "read back");
    let v = ls_json_at(&m.mnt, "/span.bin");
    let sets = v["data_sets"].as_array().unwrap();
    assert_eq!(sets.len(), 1, "{v:#}");
    let d = &sets[0];
    assert_eq!(d["path"], "/span.bin");
    assert_eq!(u(&d["size_bytes"]), 2_500_000);
    let vols: Vec<&str> = d["volumes"].as_array().unwrap().iter().map(|x| x.as_str().unwrap()).collect();
    assert_eq!(vols.len(), 2, "spans two volumes: {d:#}");
    assert!(vols.contains(&"V1") && vols.contains(&"V2"), "{d:#}");
    assert!(u(&d["allocated_tracks"]) >= 39, "2.5 MB needs 39 tracks of 64K: {d:#}");
    check_catalog_views(&m.mnt);
    m.unmount();
    fsck_clean(&tp.pool);
    // and after a remount
    let m = tp.mount();
    assert_bytes_eq(&fs::read(m.p("span.bin")).unwrap(), &data, "after remount");
    m.unmount();
    fsck_clean(&tp.pool);
}

#[test]
fn file_that_fits_one_volume_stays_on_one() {
    // a data set spans volumes only when it must
    let tp = TestPool::new("64K", &[("V1", "1M"), ("V2", "2M")]);
    let m = tp.mount();
    let data = pattern(1_500_000, 22);
    fs::write(m.p("one.bin"), &data).unwrap();
    let d = data_set(&m.mnt, "/one.bin");
    assert_eq!(d["volumes"], serde_json::json!(["V2"]), "{d:#}");
    assert_bytes_eq(&fs::read(m.p("one.bin")).unwrap(), &data, "read back");
    m.unmount();
    fsck_clean(&tp.pool);
}

#[test]
fn many_files_fill_volumes_and_read_back() {
    let tp = TestPool::new("64K", &[("V1", "1M"), ("V2", "2M")]);
    let m = tp.mount();
    let mut files = Vec::new();
    for i in 0..10u64 {
        let data = pattern(200_000 + (i as usize) * 7_000, 100 + i);
        fs::write(m.p(&format!("f{i}")), &data).unwrap();
        files.push(data);
    }
    for (i, data) in files.iter().enumerate() {
        assert_bytes_eq(&fs::read(m.p(&format!("f{i}"))).unwrap(), data, &format!("f{i}"));
    }
    let vl = volume_list_json(&m.mnt);
    for v in vl["volumes"].as_array().unwrap() {
        assert!(u(&v["tracks_used"]) > 0, "both volumes used: {vl:#}");
    }
    check_catalog_views(&m.mnt);
    m.unmount();
    check_catalog_views(&tp.pool);
    fsck_clean(&tp.pool);
}

#[test]
fn enospc_when_pool_full_keeps_earlier_data() {
    let tp = TestPool::new("64K", &[("V1", "1M"), ("V2", "1M")]);
    let m = tp.mount();
    let a = pattern(500_000, 31);
    let b = pattern(600_000, 32);
    fs::write(m.p("a"), &a).unwrap();
    fs::write(m.p("b"), &b).unwrap();
    let mut f = File::create(m.p("c")).unwrap();
    let chunk = pattern(50_000, 33);
    let mut acked = 0usize;
    let err = loop {
        match f.write_all(&chunk) {
            Ok(()) => acked += chunk.len(),
            Err(e) => break e,
        }
        assert!(acked < 8 << 20, "no ENOSPC after {acked} bytes in a 2 MiB pool");
    };
    assert_eq!(errno(&err), libc::ENOSPC, "{err}");
    // a new file cannot get space either, and a mkdir still works (metadata only)
    let r = File::create(m.p("d")).and_then(|mut g| g.write_all(&[1u8; 70_000]).and_then(|_| g.sync_all()));
    assert_errno(r, libc::ENOSPC, "writing a new file into a full pool");
    fs::create_dir(m.p("dir")).unwrap();
    drop(f);
    assert_bytes_eq(&fs::read(m.p("a")).unwrap(), &a, "a intact");
    assert_bytes_eq(&fs::read(m.p("b")).unwrap(), &b, "b intact");
    let c = fs::read(m.p("c")).unwrap();
    assert!(c.len() >= acked, "c has {} bytes, {acked} acknowledged", c.len());
    for (i, ch) in c[..acked].chunks(chunk.len()).enumerate() {
        assert_bytes_eq(ch, &chunk[..ch.len()], &format!("c chunk {i}"));
    }
    check_catalog_views(&m.mnt);
    m.unmount();
    fsck_clean(&tp.pool);
    let m = tp.mount();
    assert_bytes_eq(&fs::read(m.p("a")).unwrap(), &a, "a intact after remount");
    assert_bytes_eq(&fs::read(m.p("b")).unwrap(), &b, "b intact after remount");
    // freeing space makes room again
    fs::remove_file(m.p("c")).unwrap();
    fs::write(m.p("e"), pattern(300_000, 34)).unwrap();
    assert_bytes_eq(&fs::read(m.p("e")).unwrap(), &pattern(300_000, 34), "e");
    m.unmount();
    fsck_clean(&tp.pool);
}

#[test]
fn freed_tracks_never_leak_old_bytes() {
    // One 4 MiB volume filled with 0xAA, freed, then reused by new files.
    let tp = TestPool::new("64K", &[("V1", "4M")]);
    let m = tp.mount();
    {
        let mut f = File::create(m.p("old")).unwrap();
        f.write_all(&vec![0xAAu8; 4 << 20]).unwrap();
        f.sync_all().unwrap();
    }
    assert_eq!(u(&volume_json(&m.mnt, "V1")["tracks_free"]), 0, "pool full of 0xAA");
    fs::remove_file(m.p("old")).unwrap();

    let f = OpenOptions::new().read(true).write(true).create(true).truncate(true).open(m.p("new")).unwrap();
    // a small write leaves the rest of its track unwritten
    f.write_all_at(b"0123456789", 0).unwrap();
    // extend by truncate
    f.set_len(300_000).unwrap();
    // writes at offsets past EOF leave gaps
    f.write_all_at(b"mid", 700_000).unwrap();
    f.write_all_at(b"end", 1_900_000).unwrap();
    drop(f);
    let got = fs::read(m.p("new")).unwrap();
    assert_eq!(got.len(), 1_900_003);
    let mut want = vec![0u8; 1_900_003];
    want[..10].copy_from_slice(b"0123456789");
    want[700_000..700_003].copy_from_slice(b"mid");
    want[1_900_000..].copy_from_slice(b"end");
    if let Some(i) = got.iter().position(|&b| b == 0xAA) {
        panic!("old 0xAA byte leaked into a new file at offset {i}");
    }
    assert_bytes_eq(&got, &want, "new file");

    // a second file: a small write, then growth by truncate inside the same track
    let mut g = File::create(m.p("other")).unwrap();
    g.write_all(&[1u8; 1000]).unwrap();
    drop(g);
    OpenOptions::new().write(true).open(m.p("other")).unwrap().set_len(64_000).unwrap();
    let got = fs::read(m.p("other")).unwrap();
    assert!(got[..1000].iter().all(|&b| b == 1));
    assert!(got[1000..].iter().all(|&b| b == 0), "tail of a reused track must be zeros");

    // and the bytes stay zero after a remount (nothing stale on disk)
    m.unmount();
    fsck_clean(&tp.pool);
    let m = tp.mount();
    let got = fs::read(m.p("new")).unwrap();
    assert_bytes_eq(&got, &want, "new file after remount");
    m.unmount();
}

#[test]
fn shrink_then_grow_does_not_resurrect_bytes_on_disk() {
    let tp = TestPool::new("64K", &[("V1", "4M")]);
    let m = tp.mount();
    let f = OpenOptions::new().read(true).write(true).create(true).truncate(true).open(m.p("f")).unwrap();
    f.write_all_at(&vec![0xAAu8; 1 << 20], 0).unwrap();
    f.sync_all().unwrap();
    f.set_len(100).unwrap();
    f.sync_all().unwrap();
    drop(f);
    m.unmount();
    let m = tp.mount();
    let f = OpenOptions::new().read(true).write(true).open(m.p("f")).unwrap();
    assert_eq!(f.metadata().unwrap().len(), 100);
    f.set_len(1 << 20).unwrap();
    drop(f);
    let got = fs::read(m.p("f")).unwrap();
    assert!(got[..100].iter().all(|&b| b == 0xAA));
    if let Some(i) = got[100..].iter().position(|&b| b != 0) {
        panic!("stale byte after shrink, remount, grow at offset {}", 100 + i);
    }
    m.unmount();
    fsck_clean(&tp.pool);
}

#[test]
fn file_extended_by_truncate_is_consistent() {
    // growth by truncate reads as zeros, and the catalog stays consistent
    let tp = TestPool::new("64K", &[("V1", "4M")]);
    let m = tp.mount();
    fs::write(m.p("f"), b"abc").unwrap();
    OpenOptions::new().write(true).open(m.p("f")).unwrap().set_len(1 << 20).unwrap();
    File::create(m.p("g")).unwrap().set_len(300_000).unwrap();
    check_catalog_views(&m.mnt);
    fsck_clean(&tp.pool);
    m.unmount();
    fsck_clean(&tp.pool);
    let m = tp.mount();
    let got = fs::read(m.p("f")).unwrap();
    assert_eq!(got.len(), 1 << 20);
    assert_eq!(&got[..3], b"abc");
    assert!(got[3..].iter().all(|&b| b == 0));
    assert_eq!(fs::read(m.p("g")).unwrap(), vec![0u8; 300_000]);
    m.unmount();
    fsck_clean(&tp.pool);
}

#[test]
fn remount_keeps_everything() {
    let tp = TestPool::new("64K", &[("V1", "8M"), ("V2", "8M")]);
    let m = tp.mount();
    fs::create_dir_all(m.p("db/sub")).unwrap();
    fs::create_dir(m.p("emptydir")).unwrap();
    let big = pattern(3_000_000, 41);
    fs::write(m.p("db/base.dat"), &big).unwrap();
    fs::write(m.p("db/sub/small"), b"small file").unwrap();
    File::create(m.p("zero")).unwrap();
    {
        let f = File::create(m.p("sparse")).unwrap();
        f.write_all_at(b"far", 1_000_000).unwrap();
    }
    std::os::unix::fs::symlink("db/base.dat", m.p("link")).unwrap();
    std::os::unix::fs::symlink("/dangling/target", m.p("db/dangling")).unwrap();
    fs::hard_link(m.p("db/sub/small"), m.p("hard")).unwrap();
    fs::set_permissions(m.p("db/sub/small"), fs::Permissions::from_mode(0o640)).unwrap();
    fs::set_permissions(m.p("emptydir"), fs::Permissions::from_mode(0o711)).unwrap();
    std::os::unix::fs::chown(m.p("zero"), Some(1000), Some(2000)).unwrap();
    let mtime = std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_234_567_890);
    File::options().write(true).open(m.p("zero")).unwrap().set_modified(mtime).unwrap();
    let ls_before = ls_json(&m.mnt);
    let ino_small = fs::metadata(m.p("db/sub/small")).unwrap().ino();
    m.unmount();
    fsck_clean(&tp.pool);
    // The pool's own view matches the mounted one, but for the over-provisioned tails that a
    // clean unmount trims (allocation may only shrink to what the sizes need).
    let after = ls_json(&tp.pool);
    assert_eq!(without_allocation(&after), without_allocation(&ls_before), "ls of the pool equals ls of the mount");
    for (a, b) in after["data_sets"].as_array().unwrap().iter().zip(ls_before["data_sets"].as_array().unwrap()) {
        // Nothing mapped past the size is left; "sparse" keeps its hole (one track mapped).
        let need = u(&a["size_bytes"]).div_ceil(K64);
        let end = a["extents"].as_array().unwrap().last().map_or(0, |e| u(&e["logical_track"]) + u(&e["track_count"]));
        assert!(end <= need, "unmount trims {} to its size: {a}", a["path"]);
        let want = if a["path"] == "/sparse" { 1 } else { need };
        assert_eq!(u(&a["allocated_tracks"]), want, "{}: {a}", a["path"]);
        assert!(u(&b["allocated_tracks"]) >= want);
    }

    let m = tp.mount();
    assert_bytes_eq(&fs::read(m.p("db/base.dat")).unwrap(), &big, "base.dat");
    assert_eq!(fs::read(m.p("db/sub/small")).unwrap(), b"small file");
    assert_eq!(fs::metadata(m.p("zero")).unwrap().len(), 0);
    let sp = fs::read(m.p("sparse")).unwrap();
    assert_eq!(sp.len(), 1_000_003);
    assert!(sp[..1_000_000].iter().all(|&b| b == 0));
    assert_eq!(&sp[1_000_000..], b"far");
    assert_eq!(fs::read_link(m.p("link")).unwrap(), Path::new("db/base.dat"));
    assert_eq!(fs::read_link(m.p("db/dangling")).unwrap(), Path::new("/dangling/target"));
    assert_bytes_eq(&fs::read(m.p("link")).unwrap(), &big, "through symlink");
    let (a, b) = (fs::metadata(m.p("db/sub/small")).unwrap(), fs::metadata(m.p("hard")).unwrap());
    assert_eq!(a.ino(), b.ino(), "hard link still one inode");
    assert_eq!(a.ino(), ino_small, "inode numbers are stable across mounts");
    assert_eq!(a.nlink(), 2);
    assert_eq!(a.mode() & 0o7777, 0o640);
    assert_eq!(fs::metadata(m.p("emptydir")).unwrap().mode() & 0o7777, 0o711);
    assert!(fs::metadata(m.p("emptydir")).unwrap().is_dir());
    assert_eq!(fs::read_dir(m.p("emptydir")).unwrap().count(), 0);
    let z = fs::metadata(m.p("zero")).unwrap();
    assert_eq!((z.uid(), z.gid()), (1000, 2000));
    assert_eq!(z.mtime(), 1_234_567_890);
    let names: BTreeSet<String> =
        fs::read_dir(m.p("db")).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    assert_eq!(names, ["base.dat", "dangling", "sub"].iter().map(|s| s.to_string()).collect());
    assert_eq!(ls_json(&m.mnt), after, "ls after remount");
    // new inodes after a remount do not collide with old ones
    fs::write(m.p("newfile"), b"n").unwrap();
    let new_ino = fs::metadata(m.p("newfile")).unwrap().ino();
    let old: BTreeSet<u64> = ls_before["data_sets"].as_array().unwrap().iter().map(|d| u(&d["ino"])).collect();
    assert!(!old.contains(&new_ino), "new inode {new_ino} reuses a live one");
    // an unlink and rename persist too
    fs::remove_file(m.p("hard")).unwrap();
    fs::rename(m.p("db/base.dat"), m.p("moved.dat")).unwrap();
    m.unmount();
    fsck_clean(&tp.pool);
    let m = tp.mount();
    assert!(!m.p("hard").exists());
    assert!(!m.p("db/base.dat").exists());
    assert_eq!(fs::metadata(m.p("db/sub/small")).unwrap().nlink(), 1);
    assert_bytes_eq(&fs::read(m.p("moved.dat")).unwrap(), &big, "renamed file");
    assert_eq!(fs::read(m.p("newfile")).unwrap(), b"n");
    m.unmount();
    fsck_clean(&tp.pool);
}

#[test]
fn fsynced_data_survives_kill9() {
    let tp = TestPool::new("64K", &[("V1", "8M")]);
    let m = tp.mount();
    let data = pattern(777_777, 51);
    {
        let mut f = File::create(m.p("durable")).unwrap();
        f.write_all(&data).unwrap();
        f.sync_all().unwrap();
    }
    fs::create_dir(m.p("dir")).unwrap();
    File::open(&m.mnt).unwrap().sync_all().unwrap();
    m.kill9();
    fsck_clean(&tp.pool);
    let m = tp.mount();
    assert_bytes_eq(&fs::read(m.p("durable")).unwrap(), &data, "fsynced file after kill -9");
    assert!(m.p("dir").is_dir(), "fsynced dir after kill -9");
    check_catalog_views(&m.mnt);
    m.unmount();
    fsck_clean(&tp.pool);
}

#[test]
fn unsynced_writes_after_kill9_leave_a_consistent_pool() {
    let tp = TestPool::new("64K", &[("V1", "8M")]);
    let m = tp.mount();
    for i in 0..20u64 {
        fs::write(m.p(&format!("f{i}")), pattern(50_000 + i as usize * 3_000, 60 + i)).unwrap();
    }
    fs::remove_file(m.p("f3")).unwrap();
    m.kill9();
    fsck_clean(&tp.pool);
    let m = tp.mount();
    // whatever survived is either absent or a prefix-consistent file, never foreign bytes
    for i in 0..20u64 {
        if let Ok(got) = fs::read(m.p(&format!("f{i}"))) {
            let want = pattern(50_000 + i as usize * 3_000, 60 + i);
            assert!(got.len() <= want.len(), "f{i} grew");
            for (j, (&g, &w)) in got.iter().zip(&want).enumerate() {
                assert!(g == w || g == 0, "f{i}: byte {j} is {g:#x}, neither written nor zero");
            }
        }
    }
    check_catalog_views(&m.mnt);
    m.unmount();
    fsck_clean(&tp.pool);
}

#[test]
fn appended_file_stays_in_few_extents() {
    let tp = TestPool::new("64K", &[("V1", "64M")]);
    let m = tp.mount();
    let block = pattern(4096, 71);
    for _ in 0..2000 {
        let mut f = OpenOptions::new().append(true).create(true).open(m.p("log")).unwrap();
        f.write_all(&block).unwrap();
    }
    let d = data_set(&m.mnt, "/log");
    assert_eq!(u(&d["size_bytes"]), 4096 * 2000);
    let n = u(&d["extent_count"]);
    assert!(n <= 4, "steadily appended file has {n} extents: {d}");
    let got = fs::read(m.p("log")).unwrap();
    for (i, c) in got.chunks(4096).enumerate() {
        assert_bytes_eq(c, &block, &format!("block {i}"));
    }
    m.unmount();
    fsck_clean(&tp.pool);
}

#[test]
fn interleaved_appends_stay_in_few_extents() {
    // Two files growing in turn: a track-at-a-time allocator would interleave them into
    // hundreds of extents each; secondary allocations keep them in a few.
    let tp = TestPool::new("64K", &[("V1", "64M")]);
    let m = tp.mount();
    let block = pattern(16_384, 72);
    for _ in 0..500 {
        for name in ["x", "y"] {
            let mut f = OpenOptions::new().append(true).create(true).open(m.p(name)).unwrap();
            f.write_all(&block).unwrap();
        }
    }
    for name in ["/x", "/y"] {
        let d = data_set(&m.mnt, name);
        assert_eq!(u(&d["size_bytes"]), 16_384 * 500);
        let n = u(&d["extent_count"]);
        assert!(n <= 16, "{name}: {n} extents for 125 tracks appended in turn: {d}");
    }
    check_catalog_views(&m.mnt);
    m.unmount();
    fsck_clean(&tp.pool);
}

#[test]
fn allocation_is_trimmed_on_close_or_truncate() {
    // Whatever secondary allocation a data set got, shrinking it gives the tracks back.
    let tp = TestPool::new("64K", &[("V1", "16M")]);
    let m = tp.mount();
    fs::write(m.p("f"), pattern(5 << 20, 73)).unwrap();
    OpenOptions::new().write(true).open(m.p("f")).unwrap().set_len(K64).unwrap();
    let d = data_set(&m.mnt, "/f");
    assert_eq!(u(&d["size_bytes"]), K64);
    assert!(
        u(&d["allocated_tracks"]) <= 16,
        "64 KiB file still holds {} tracks after truncate from 5 MiB",
        u(&d["allocated_tracks"])
    );
    check_catalog_views(&m.mnt);
    m.unmount();
    fsck_clean(&tp.pool);
}

#[test]
fn volume_list_figures() {
    let tp = TestPool::uninit();
    ferry_ok(&["init", s(&tp.pool), "--track-size", "64K"]);
    tp.add_volume("V1", "1M");
    // rounded down to whole tracks
    ferry_ok(&["volume", "add", s(&tp.pool), "V2", "--size", &format!("{}", 2 * 1024 * 1024 + 1000)]);
    let ext = tp.dir().join("elsewhere.img");
    ferry_ok(&["volume", "add", s(&tp.pool), "V3", "--size", "512K", "--path", s(&ext)]);
    assert!(ext.exists(), "--path image created");

    let vl = volume_list_json(&tp.pool);
    assert_eq!(u(&vl["track_size_bytes"]), K64);
    let vols = vl["volumes"].as_array().unwrap();
    let names: Vec<&str> = vols.iter().map(|v| v["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["V1", "V2", "V3"]);
    let expect = [(1u64 << 20, 16u64), (2 << 20, 32), (512 << 10, 8)];
    for (v, (size, tracks)) in vols.iter().zip(expect) {
        assert_eq!(u(&v["size_bytes"]), size, "{v}");
        assert_eq!(u(&v["tracks_total"]), tracks, "{v}");
        assert_eq!(u(&v["tracks_used"]), 0, "{v}");
        assert_eq!(u(&v["tracks_free"]), tracks, "{v}");
        assert_eq!(u(&v["data_sets"]), 0, "{v}");
        let p = Path::new(v["path"].as_str().unwrap());
        assert!(p.is_absolute() && p.exists(), "{v}");
    }
    let v1 = Path::new(vols[0]["path"].as_str().unwrap());
    assert_eq!(fs::canonicalize(v1).unwrap(), fs::canonicalize(tp.pool.join("volumes/V1.img")).unwrap());
    assert_eq!(fs::canonicalize(vols[2]["path"].as_str().unwrap()).unwrap(), fs::canonicalize(&ext).unwrap());
    // images are sparse
    let md = fs::metadata(tp.pool.join("volumes/V2.img")).unwrap();
    assert!(md.len() >= 2 << 20, "image is at least the volume size");
    assert!(md.blocks() * 512 < 1 << 20, "image is sparse ({} blocks)", md.blocks());

    let m = tp.mount();
    fs::write(m.p("a"), vec![1u8; 100_000]).unwrap(); // 2 tracks
    fs::write(m.p("b"), vec![2u8; 10]).unwrap(); // 1 track
    File::create(m.p("empty")).unwrap(); // no track
    let vl = volume_list_json(&m.mnt);
    let mut used = 0;
    let mut sets = 0;
    for v in vl["volumes"].as_array().unwrap() {
        assert_eq!(u(&v["tracks_used"]) + u(&v["tracks_free"]), u(&v["tracks_total"]), "{v}");
        used += u(&v["tracks_used"]);
        sets += u(&v["data_sets"]);
    }
    assert!(used >= 3, "3 tracks at least: {vl:#}");
    assert!(sets >= 2, "two data sets with tracks: {vl:#}");
    check_catalog_views(&m.mnt);
    // the pool path gives the same figures as the mountpoint while mounted
    assert_eq!(volume_list_json(&tp.pool), vl, "volume list of the pool while mounted");
    m.unmount();
    assert_eq!(volume_list_json(&tp.pool), vl, "volume list after unmount");
    fsck_clean(&tp.pool);
}

#[test]
fn ls_path_filters_below_a_directory() {
    let tp = TestPool::new("64K", &[("V1", "8M")]);
    let m = tp.mount();
    fs::create_dir_all(m.p("db/x")).unwrap();
    fs::create_dir(m.p("dbother")).unwrap();
    fs::write(m.p("db/a"), b"a").unwrap();
    fs::write(m.p("db/x/b"), b"b").unwrap();
    fs::write(m.p("dbother/c"), b"c").unwrap();
    fs::write(m.p("top"), b"t").unwrap();
    let paths = |v: Value| -> BTreeSet<String> {
        v["data_sets"].as_array().unwrap().iter().map(|d| d["path"].as_str().unwrap().to_string()).collect()
    };
    let all = paths(ls_json(&m.mnt));
    assert_eq!(all, ["/db/a", "/db/x/b", "/dbother/c", "/top"].iter().map(|s| s.to_string()).collect());
    let db = paths(ls_json_at(&m.mnt, "/db"));
    assert_eq!(db, ["/db/a", "/db/x/b"].iter().map(|s| s.to_string()).collect(), "ls /db");
    let db2 = paths(ls_json_at(&m.mnt, "db/x/b"));
    assert_eq!(db2, ["/db/x/b"].iter().map(|s| s.to_string()).collect(), "ls db/x/b");
    assert_eq!(paths(ls_json_at(&tp.pool, "/db")), db, "ls of the pool path");
    // the plain listing mentions each path
    let text = ferry_ok(&["ls", s(&m.mnt)]);
    for p in &all {
        assert!(text.contains(p.as_str()), "ls text misses {p}:\n{text}");
    }
    // a missing path: either one clear error line, or an empty listing
    let out = ferry(["ls", s(&m.mnt), "/no/such", "--json"]);
    if out.status.success() {
        let v = parse_json(&String::from_utf8_lossy(&out.stdout));
        assert!(v["data_sets"].as_array().unwrap().is_empty(), "ls /no/such: {v}");
    } else {
        assert_one_clear_line(&String::from_utf8_lossy(&out.stderr), "");
    }
    m.unmount();
    fsck_clean(&tp.pool);
}

#[test]
fn volume_added_later_takes_new_data() {
    let tp = TestPool::new("64K", &[("V1", "1M")]);
    let m = tp.mount();
    let a = pattern(900_000, 81);
    fs::write(m.p("a"), &a).unwrap();
    m.unmount();
    tp.add_volume("V2", "4M");
    let m = tp.mount();
    let b = pattern(2_000_000, 82);
    fs::write(m.p("b"), &b).unwrap();
    assert_bytes_eq(&fs::read(m.p("a")).unwrap(), &a, "a");
    assert_bytes_eq(&fs::read(m.p("b")).unwrap(), &b, "b");
    let d = data_set(&m.mnt, "/b");
    assert!(d["volumes"].as_array().unwrap().iter().any(|v| v == "V2"), "{d}");
    check_catalog_views(&m.mnt);
    m.unmount();
    fsck_clean(&tp.pool);
}

#[test]
fn space_of_a_closed_and_unlinked_file_is_free_at_once() {
    // rm then write: the second file needs the first one's tracks. The first file was closed
    // before the unlink, so its space must be free when unlink returns.
    let tp = TestPool::new("64K", &[("V1", "1536K")]);
    let m = tp.mount();
    let data = pattern(1 << 20, 95);
    for i in 0..40 {
        let name = format!("f{}", i % 2);
        let mut f = File::create(m.p(&name)).unwrap_or_else(|e| panic!("round {i}: create: {e}"));
        f.write_all(&data).unwrap_or_else(|e| panic!("round {i}: write 1 MiB into a 1.5 MiB pool after rm: {e}"));
        drop(f);
        fs::remove_file(m.p(&name)).unwrap();
        let v = volume_json(&m.mnt, "V1");
        assert_eq!(u(&v["tracks_used"]), 0, "round {i}: tracks still used after close and unlink: {v}");
    }
    m.unmount();
    fsck_clean(&tp.pool);
}

#[test]
fn orphan_of_a_killed_mount_is_freed_on_next_mount() {
    let tp = TestPool::new("64K", &[("V1", "4M")]);
    let m = tp.mount();
    fs::write(m.p("keep"), b"kept").unwrap();
    let f = OpenOptions::new().read(true).write(true).create(true).truncate(true).open(m.p("orphan")).unwrap();
    f.write_all_at(&pattern(1 << 20, 96), 0).unwrap();
    fs::remove_file(m.p("orphan")).unwrap();
    f.write_all_at(b"more", 1 << 20).unwrap();
    f.sync_all().unwrap();
    let used_open = u(&volume_json(&m.mnt, "V1")["tracks_used"]);
    assert!(used_open >= 16, "the open orphan holds its tracks ({used_open})");
    // kill the daemon while the unlinked file is still open
    m.kill9();
    drop(f);
    fsck_clean(&tp.pool);
    let m = tp.mount();
    assert_eq!(fs::read(m.p("keep")).unwrap(), b"kept");
    let v = volume_json(&m.mnt, "V1");
    assert_eq!(u(&v["tracks_used"]), 1, "only `keep` holds a track after the orphan is freed: {v}");
    assert_eq!(ls_json(&m.mnt)["data_sets"].as_array().unwrap().len(), 1);
    check_catalog_views(&m.mnt);
    m.unmount();
    fsck_clean(&tp.pool);
}

#[test]
fn external_volume_path_persists() {
    let tp = TestPool::uninit();
    ferry_ok(&["init", s(&tp.pool), "--track-size", "64K"]);
    let ext = tp.dir().join("disk2").join("ext.img");
    fs::create_dir(ext.parent().unwrap()).unwrap();
    ferry_ok(&["volume", "add", s(&tp.pool), "EXT", "--size", "2M", "--path", s(&ext)]);
    let m = tp.mount();
    let data = pattern(1_500_000, 97);
    fs::write(m.p("f"), &data).unwrap();
    assert_eq!(data_set(&m.mnt, "/f")["volumes"], serde_json::json!(["EXT"]));
    m.unmount();
    assert!(fs::metadata(&ext).unwrap().blocks() > 0, "bytes landed on the external image");
    let m = tp.mount();
    assert_bytes_eq(&fs::read(m.p("f")).unwrap(), &data, "external volume after remount");
    m.unmount();
    fsck_clean(&tp.pool);
}

/// An `ls --json` listing without the allocation figures.
fn without_allocation(v: &serde_json::Value) -> serde_json::Value {
    let mut v = v.clone();
    for d in v["data_sets"].as_array_mut().unwrap() {
        let o = d.as_object_mut().unwrap();
        o.remove("allocated_tracks");
        o.remove("extents");
        o.remove("extent_count");
    }
    v
}

/// Regression: tracks freed by an unlink were punched after the catalog lock was dropped,
/// so another data set could be handed those tracks, write its bytes, be acknowledged, and
/// then have them zeroed by the late punch. Freed tracks are now punched before they can be
/// allocated again. This test churns frees and allocations on a small pool from two
/// threads and checks every byte the allocating side wrote.
#[test]
fn freed_tracks_are_never_zeroed_under_a_new_owner() {
    let tp = TestPool::new("64K", &[("V1", "8M")]);
    let m = tp.mount();
    let mnt = m.mnt.clone();
    let churn = std::thread::spawn({
        let mnt = mnt.clone();
        move || {
            for i in 0..60u64 {
                let p = mnt.join(format!("churn{}", i % 3));
                fs::write(&p, pattern(1 << 20, 1000 + i)).unwrap();
                fs::remove_file(&p).unwrap();
            }
        }
    });
    for i in 0..60u64 {
        let p = mnt.join(format!("keep{}", i % 4));
        let want = pattern(300_000, 2000 + i);
        fs::write(&p, &want).unwrap();
        assert_bytes_eq(&fs::read(&p).unwrap(), &want, &format!("keep round {i}"));
    }
    churn.join().unwrap();
    for i in 56..60u64 {
        let p = mnt.join(format!("keep{}", i % 4));
        assert_bytes_eq(&fs::read(&p).unwrap(), &pattern(300_000, 2000 + i), "keep at the end");
    }
    m.unmount();
    fsck_clean(&tp.pool);
}

/// The story: on a full pool of 16 tracks, X held 5 tracks and one byte (6 tracks, and the
/// surplus its growth was given), Y held 6; `truncate X` to 12 tracks by path left X with a
/// size of 786432 bytes on an allocation of 8 tracks, and fsck refused the catalog. (A
/// truncate by path builds a node of its own, and the reclaim of surplus tails that the
/// allocation falls back on trims X itself under that node.) A truncate up that the pool
/// can't hold must fail with ENOSPC and change nothing; one that fits succeeds whole.
#[test]
fn truncate_up_by_path_on_a_full_pool_is_a_hole() {
    for vols in [&[("V1", "1M")][..], &[("V1", "512K"), ("V2", "512K")][..]] {
        let tp = TestPool::new("64K", vols);
        let m = tp.mount();
        let x = pattern(5 * K64 as usize, 41);
        fs::write(m.p("X"), &x).unwrap();
        OpenOptions::new().append(true).open(m.p("X")).unwrap().write_all(b"!").unwrap();
        let y = pattern(6 * K64 as usize, 42);
        fs::write(m.p("Y"), &y).unwrap();
        // Data sets are sparse: the new size is a hole, which takes no track.
        nix_truncate(&m.p("X"), 12 * K64).unwrap();
        let mut want_x = x.clone();
        want_x.push(b'!');
        want_x.resize(12 * K64 as usize, 0);
        assert_eq!(fs::metadata(m.p("X")).unwrap().len(), 12 * K64);
        assert_bytes_eq(&fs::read(m.p("X")).unwrap(), &want_x, "X reads zeros past its old end");
        assert_bytes_eq(&fs::read(m.p("Y")).unwrap(), &y, "Y intact");
        // Filling the hole needs tracks the pool no longer has: a clear ENOSPC, nothing lost.
        let f = OpenOptions::new().write(true).open(m.p("X")).unwrap();
        let r = f.write_all_at(&pattern(5 * K64 as usize, 43), 7 * K64);
        assert_errno(r, libc::ENOSPC, &format!("{vols:?}: filling X's hole past the pool's free space"));
        drop(f);
        assert_bytes_eq(&fs::read(m.p("Y")).unwrap(), &y, "Y intact after the refused write");
        check_catalog_views(&m.mnt);
        m.unmount();
        fsck_clean(&tp.pool);
        let m = tp.mount();
        // Once Y is gone, the same write fits.
        fs::remove_file(m.p("Y")).unwrap();
        let fill = pattern(5 * K64 as usize, 43);
        OpenOptions::new().write(true).open(m.p("X")).unwrap().write_all_at(&fill, 7 * K64).unwrap();
        let got = fs::read(m.p("X")).unwrap();
        assert_bytes_eq(&got[7 * K64 as usize..], &fill, "X's hole, filled");
        assert_bytes_eq(&got[..5 * K64 as usize + 1], &want_x[..5 * K64 as usize + 1], "X's data before the hole");
        check_catalog_views(&m.mnt);
        m.unmount();
        fsck_clean(&tp.pool);
    }
}

/// truncate(2) by path, as `os.truncate` does (no open handle).
fn nix_truncate(path: &Path, len: u64) -> std::io::Result<()> {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: a valid NUL-terminated path; truncate(2) reads it only.
    if unsafe { libc::truncate(c.as_ptr(), len as libc::off_t) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Volumes added one by one to an unmounted pool, each by its own `ferryfs volume add`: each
/// add appends one frame to the catalog log (the snapshot is not rewritten), every volume is
/// listed, and a mount spreads data sets over them and reads them back.
#[test]
fn many_volumes_added_offline_one_by_one() {
    const N: usize = 200;
    let tp = TestPool::new("64K", &[]);
    let snap = tp.pool.join("catalog.snap");
    let log = tp.pool.join("catalog.log");
    let snap_before = fs::read(&snap).unwrap();
    let log_before = fs::metadata(&log).unwrap().len();
    let name = |i: usize| format!("V{i:03}");
    for i in 1..=N {
        tp.add_volume(&name(i), "1M");
    }
    assert_eq!(fs::read(&snap).unwrap(), snap_before, "an offline add rewrote the catalog snapshot");
    let log_after = fs::metadata(&log).unwrap().len();
    assert!(log_after - log_before >= N as u64 * 40, "{N} adds grew the log by {} bytes", log_after - log_before);
    for f in [&snap, &log] {
        assert_eq!(fs::metadata(f).unwrap().permissions().mode() & 0o777, 0o600, "{}", f.display());
    }
    let listed = |target: &Path| -> Vec<String> {
        let vl = volume_list_json(target);
        vl["volumes"].as_array().unwrap().iter().map(|v| v["name"].as_str().unwrap().to_string()).collect()
    };
    let want: Vec<String> = (1..=N).map(name).collect();
    assert_eq!(listed(&tp.pool), want);
    // A name already taken, however far back it was added, is refused.
    let (_, err) = ferry_err(&["volume", "add", s(&tp.pool), &name(1), "--size", "1M"]);
    assert!(err.contains("already exists"), "{err}");

    let m = tp.mount();
    assert_eq!(listed(&m.mnt), want);
    // Each data set takes 15 of a volume's 16 tracks: one volume each.
    let bytes = |i: usize| pattern(15 * K64 as usize, i as u64);
    for i in 0..N {
        fs::write(m.p(&format!("f{i}")), bytes(i)).unwrap();
    }
    let vl = volume_list_json(&m.mnt);
    let used = vl["volumes"].as_array().unwrap().iter().filter(|v| u(&v["data_sets"]) == 1).count();
    assert_eq!(used, N, "every volume holds one data set: {vl:#}");
    check_catalog_views(&m.mnt);
    m.unmount();
    let m = tp.mount();
    for i in 0..N {
        assert_bytes_eq(&fs::read(m.p(&format!("f{i}"))).unwrap(), &bytes(i), &format!("f{i}"));
    }
    check_catalog_views(&m.mnt);
    m.unmount();
    fsck_clean(&tp.pool);
}
