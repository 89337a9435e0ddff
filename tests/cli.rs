//! The command line: bad input gets one clear error line and changes nothing; a corrupt
//! catalog is refused cleanly by `mount` and `fsck`.

mod common;

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use common::*;

/// Every file under the pool (recursively), with its bytes, except the daemon log; volume
/// images are represented by their length only.
fn pool_state(pool: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<PathBuf, Vec<u8>>) {
        let Ok(rd) = fs::read_dir(dir) else { return };
        for e in rd {
            let e = e.unwrap();
            let p = e.path();
            let rel = p.strip_prefix(root).unwrap().to_path_buf();
            let ft = e.file_type().unwrap();
            if ft.is_dir() {
                out.insert(rel.join(""), Vec::new());
                walk(root, &p, out);
            } else if rel == Path::new("mount.log") || rel == Path::new("pool.lock") {
                continue;
            } else if p.extension().map(|x| x == "img").unwrap_or(false) {
                out.insert(rel, fs::metadata(&p).unwrap().len().to_le_bytes().to_vec());
            } else {
                out.insert(rel, fs::read(&p).unwrap_or_default());
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(pool, pool, &mut out);
    out
}

/// Runs ARGS expecting exit `want` and one clear error line.
#[track_caller]
fn fails_with(want: i32, args: &[&str], word: &str) -> String {
    let (code, err) = ferry_err(args);
    assert_eq!(code, want, "`ferryfs {}` should exit {want}: {err}", args.join(" "));
    assert_one_clear_line(&err, word);
    err
}

/// Runs ARGS expecting a refusal (a rule said no; nothing changed): exit 3.
#[track_caller]
fn refused(args: &[&str], word: &str) -> String {
    fails_with(exit::REFUSED, args, word)
}

/// Runs ARGS expecting an error (not a pool, I/O, ...): exit 1.
#[track_caller]
fn errs(args: &[&str], word: &str) -> String {
    fails_with(exit::ERROR, args, word)
}

/// Runs ARGS expecting a usage error: exit 2, clap's message naming `word`, and where to
/// find help.
#[track_caller]
fn usage_error(args: &[&str], word: &str) {
    let (code, err) = ferry_err(args);
    assert_eq!(code, exit::USAGE, "`ferryfs {}` should exit 2: {err}", args.join(" "));
    assert!(err.contains(word) && err.contains("--help") && !err.contains("panicked"), "{err}");
}

fn names(pool: &Path) -> Vec<String> {
    volume_list_json(pool)["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap().to_string())
        .collect()
}

// ---------------------------------------------------------------- init

#[test]
fn init_rejects_bad_track_sizes() {
    for bad in ["3K", "1K", "abc", "0", "", "2K", "6K", "128M", "-4K", "64Q", "4 Q", "0.3M"] {
        let tp = TestPool::uninit();
        // `--flag=value` so that a value starting with '-' is a value, not a flag
        usage_error(&["init", s(&tp.pool), &format!("--track-size={bad}")], "--track-size");
        let left = fs::read_dir(&tp.pool).map(|d| d.count()).unwrap_or(0);
        assert_eq!(left, 0, "track size {bad:?}: refused init left {left} files in the pool dir");
        assert!(
            ferry(["fsck", s(&tp.pool)]).status.code() != Some(0),
            "track size {bad:?}: a refused init must not leave a pool"
        );
    }
}

#[test]
fn init_accepts_good_track_sizes() {
    for (good, bytes) in [
        ("4K", 4096u64),
        ("64K", 65536),
        ("4KiB", 4096),
        ("8KB", 8192),
        ("1M", 1 << 20),
        ("64M", 64 << 20),
        ("65536", 65536),
        ("4 K", 4096),
        ("0.5M", 512 << 10),
    ] {
        let tp = TestPool::uninit();
        ferry_ok(&["init", s(&tp.pool), "--track-size", good]);
        let vl = volume_list_json(&tp.pool);
        assert_eq!(vl["track_size_bytes"].as_u64(), Some(bytes), "--track-size {good}");
        assert!(vl["volumes"].as_array().unwrap().is_empty());
        fsck_clean(&tp.pool);
    }
    // default 64K
    let tp = TestPool::uninit();
    ferry_ok(&["init", s(&tp.pool)]);
    assert_eq!(volume_list_json(&tp.pool)["track_size_bytes"].as_u64(), Some(65536));
    fsck_clean(&tp.pool);
}

#[test]
fn init_existing_dir_rules() {
    let tp = TestPool::uninit();
    // an existing empty directory is fine
    fs::create_dir(&tp.pool).unwrap();
    ferry_ok(&["init", s(&tp.pool)]);
    let before = pool_state(&tp.pool);
    // a second init of the same pool is refused and changes nothing
    refused(&["init", s(&tp.pool)], "");
    assert_eq!(pool_state(&tp.pool), before, "second init changed the pool");
    // a non-empty directory is refused and keeps its file
    let other = tp.dir().join("busy");
    fs::create_dir(&other).unwrap();
    fs::write(other.join("keep.txt"), b"mine").unwrap();
    refused(&["init", s(&other)], "");
    assert_eq!(fs::read(other.join("keep.txt")).unwrap(), b"mine");
    assert_eq!(fs::read_dir(&other).unwrap().count(), 1, "refused init wrote into a non-empty dir");
    // a path that is a file
    let file = tp.dir().join("afile");
    fs::write(&file, b"x").unwrap();
    errs(&["init", s(&file)], "");
    assert_eq!(fs::read(&file).unwrap(), b"x");
    fsck_clean(&tp.pool);
}

// ---------------------------------------------------------------- volume add

#[test]
fn volume_add_rejects_bad_names() {
    let tp = TestPool::new("64K", &[("V1", "1M")]);
    let before = pool_state(&tp.pool);
    let long = "a".repeat(33);
    for bad in ["", "-a", "_a", "a b", "a/b", "a.b", "..", "é", "V1\n", long.as_str(), "a*", "/abs"] {
        // `--` so that a name starting with '-' is a name, not a flag
        usage_error(&["volume", "add", s(&tp.pool), "--size", "1M", "--", bad], "bad volume name");
        assert_eq!(pool_state(&tp.pool), before, "bad name {bad:?} changed the pool");
    }
    assert_eq!(names(&tp.pool), ["V1"]);
    let max = "Z".repeat(32);
    for good in ["a", "9z", "A_b-c", max.as_str()] {
        ferry_ok(&["volume", "add", s(&tp.pool), good, "--size", "64K"]);
    }
    assert_eq!(names(&tp.pool), ["V1", "a", "9z", "A_b-c", max.as_str()]);
    fsck_clean(&tp.pool);
}

#[test]
fn volume_add_rejects_duplicates() {
    let tp = TestPool::new("64K", &[("V1", "1M")]);
    let before = pool_state(&tp.pool);
    refused(&["volume", "add", s(&tp.pool), "V1", "--size", "2M"], "V1");
    // also with a --path elsewhere
    let p = tp.dir().join("dup.img");
    refused(&["volume", "add", s(&tp.pool), "V1", "--size", "2M", "--path", s(&p)], "V1");
    assert!(!p.exists(), "refused add created its image");
    assert_eq!(pool_state(&tp.pool), before);
    let v = volume_json(&tp.pool, "V1");
    assert_eq!(v["size_bytes"].as_u64(), Some(1 << 20), "the first V1 is untouched");
    fsck_clean(&tp.pool);
}

#[test]
fn volume_add_refuses_existing_path() {
    let tp = TestPool::new("64K", &[("V1", "1M")]);
    let before = pool_state(&tp.pool);
    let existing = tp.dir().join("precious.img");
    fs::write(&existing, b"do not overwrite me").unwrap();
    refused(&["volume", "add", s(&tp.pool), "V2", "--size", "1M", "--path", s(&existing)], "");
    assert_eq!(fs::read(&existing).unwrap(), b"do not overwrite me", "existing file untouched");
    assert_eq!(pool_state(&tp.pool), before);
    assert_eq!(names(&tp.pool), ["V1"]);
    // another volume's image, and a directory
    let v1 = tp.pool.join("volumes/V1.img");
    refused(&["volume", "add", s(&tp.pool), "V2", "--size", "1M", "--path", s(&v1)], "");
    refused(&["volume", "add", s(&tp.pool), "V2", "--size", "1M", "--path", s(tp.dir())], "");
    // a path in a missing directory
    let nodir = tp.dir().join("no/such/dir/v.img");
    errs(&["volume", "add", s(&tp.pool), "V2", "--size", "1M", "--path", s(&nodir)], "");
    assert_eq!(pool_state(&tp.pool), before);
    assert_eq!(names(&tp.pool), ["V1"]);
    fsck_clean(&tp.pool);
}

#[test]
fn volume_add_rejects_bad_sizes() {
    let tp = TestPool::new("64K", &[("V1", "1M")]);
    let before = pool_state(&tp.pool);
    // Not a size: a usage error. A size under one track: refused by the pool.
    let malformed = ["12X", "", "-1", "1..5M", "K", "M1", "99999999999T", "1 Q"];
    for bad in malformed.into_iter().chain(["0", "10K", "65535", "0M"]) {
        let args = ["volume", "add", s(&tp.pool), "V2", &format!("--size={bad}")];
        if malformed.contains(&bad) {
            usage_error(&args, "--size");
        } else {
            refused(&args, "at least one track");
        }
        assert_eq!(pool_state(&tp.pool), before, "size {bad:?} changed the pool");
        assert!(!tp.pool.join("volumes/V2.img").exists(), "size {bad:?} left an image");
    }
    assert_eq!(names(&tp.pool), ["V1"]);
    // accepted spellings
    for (i, (good, bytes)) in [
        ("64K", 65536u64),
        ("1MiB", 1 << 20),
        ("1MB", 1 << 20),
        ("131072", 131072),
        ("100K", 65536),
        ("1G", 1 << 30),
        ("1.5M", 3 << 19),
        ("1 M", 1 << 20),
    ]
    .into_iter()
    .enumerate()
    {
        let name = format!("G{i}");
        ferry_ok(&["volume", "add", s(&tp.pool), &name, "--size", good]);
        assert_eq!(volume_json(&tp.pool, &name)["size_bytes"].as_u64(), Some(bytes), "--size {good}");
    }
    fsck_clean(&tp.pool);
}

#[test]
fn usage_mistakes_exit_2() {
    let tp = TestPool::new("64K", &[("V1", "1M")]);
    for args in [
        vec!["volume", "add", s(&tp.pool), "V2"],
        vec!["volume", "add", s(&tp.pool)],
        vec!["init"],
        vec!["mount", s(&tp.pool)],
        vec!["init", s(&tp.pool), "--no-such-flag"],
        vec!["frobnicate"],
    ] {
        let out = ferry(&args);
        assert_eq!(out.status.code(), Some(2), "`ferryfs {}`: {:?}", args.join(" "), out);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!err.contains("panicked"), "{err}");
        assert!(err.to_lowercase().contains("usage"), "usage text expected: {err}");
    }
    assert_eq!(names(&tp.pool), ["V1"]);
    fsck_clean(&tp.pool);
}

// ---------------------------------------------------------------- unknown pools, non-pools

#[test]
fn unknown_pool_is_a_clear_error() {
    let tp = TestPool::uninit();
    let missing = tp.dir().join("no-such-pool");
    let m = s(&missing);
    errs(&["volume", "add", m, "V1", "--size", "1M"], "");
    errs(&["volume", "list", m], "");
    errs(&["volume", "list", m, "--json"], "");
    errs(&["ls", m], "");
    errs(&["fsck", m], "");
    assert!(!missing.exists(), "a command created the missing pool");
    let at = try_mount(&missing, tp.mnt());
    let mounted = at.guard.is_some();
    drop(at.guard);
    assert!(!mounted, "mount of a missing pool succeeded");
    assert_eq!(at.status.code(), Some(1), "{}", at.stderr);
    assert_one_clear_line(&at.stderr, "");
    // an empty directory and a directory of other files are not pools either
    let empty = tp.dir().join("empty");
    fs::create_dir(&empty).unwrap();
    errs(&["volume", "list", s(&empty)], "");
    errs(&["volume", "add", s(&empty), "V1", "--size", "1M"], "");
    errs(&["fsck", s(&empty)], "");
    assert_eq!(fs::read_dir(&empty).unwrap().count(), 0, "a command wrote into a non-pool");
}

#[test]
fn mount_of_a_non_pool_is_refused() {
    let tp = TestPool::uninit();
    let notpool = tp.dir().join("notpool");
    fs::create_dir(&notpool).unwrap();
    fs::write(notpool.join("catalog.txt"), b"hello").unwrap();
    let at = try_mount(&notpool, tp.mnt());
    let mounted = at.guard.is_some();
    drop(at.guard);
    assert!(!mounted, "mounted a directory that is not a pool");
    assert_eq!(at.status.code(), Some(1));
    assert_one_clear_line(&at.stderr, "");
    assert!(!is_mounted(tp.mnt()));
    let mut left: Vec<String> =
        fs::read_dir(&notpool).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    left.sort();
    assert_eq!(left, ["catalog.txt"], "mount wrote into a non-pool");
    // a file as the pool
    let f = tp.dir().join("file");
    fs::write(&f, b"x").unwrap();
    let at = try_mount(&f, tp.mnt());
    assert!(at.guard.is_none());
    assert_eq!(at.status.code(), Some(1));
    assert_one_clear_line(&at.stderr, "");
}

#[test]
fn mount_onto_bad_mountpoints_is_refused() {
    let tp = TestPool::new("64K", &[("V1", "1M")]);
    let before = pool_state(&tp.pool);
    let missing = tp.dir().join("no-such-mnt");
    let at = try_mount(&tp.pool, &missing);
    assert!(at.guard.is_none(), "mounted on a missing directory");
    assert_eq!(at.status.code(), Some(1));
    assert_one_clear_line(&at.stderr, "");
    let file = tp.dir().join("mnt-file");
    fs::write(&file, b"x").unwrap();
    let at = try_mount(&tp.pool, &file);
    let mounted = at.guard.is_some();
    drop(at.guard);
    assert!(!mounted, "mounted on a file");
    assert_eq!(at.status.code(), Some(1));
    assert_one_clear_line(&at.stderr, "");
    assert!(!tp.pool.join("mounted").exists(), "a failed mount left POOL/mounted");
    // the pool still mounts afterwards and is unchanged
    let after = pool_state(&tp.pool);
    assert_eq!(after.keys().collect::<Vec<_>>(), before.keys().collect::<Vec<_>>());
    let m = tp.mount();
    m.unmount();
    fsck_clean(&tp.pool);
}

// ---------------------------------------------------------------- a mounted pool

#[test]
fn mounted_pool_refuses_changes() {
    let tp = TestPool::new("64K", &[("V1", "1M")]);
    let m = tp.mount();
    fs::write(m.p("f"), b"data").unwrap();
    let vl = volume_list_json(&m.mnt);
    refused(&["volume", "add", s(&tp.pool), "V2", "--size", "1M"], "");
    assert!(!tp.pool.join("volumes/V2.img").exists(), "refused add left an image");
    refused(&["init", s(&tp.pool)], "");
    // a second mount of the same pool, elsewhere
    let mnt2 = tp.dir().join("mnt2");
    fs::create_dir(&mnt2).unwrap();
    let at = try_mount(&tp.pool, &mnt2);
    let second = at.guard.is_some() && is_mounted(&mnt2);
    if second {
        // do not let the second daemon's cleanup touch the first
        lazy_unmount(&mnt2);
    }
    // never let this guard clean up: POOL/mounted names the first daemon
    std::mem::forget(at.guard);
    assert!(!second, "the same pool mounted twice");
    assert_eq!(at.status.code(), Some(1));
    assert_one_clear_line(&at.stderr, "");
    // the first mount still serves and the pool is unchanged
    assert_eq!(fs::read(m.p("f")).unwrap(), b"data");
    assert_eq!(volume_list_json(&m.mnt), vl);
    // fsck works on a mounted pool
    fsck_clean(&tp.pool);
    m.unmount();
    assert_eq!(names(&tp.pool), ["V1"]);
    fsck_clean(&tp.pool);
    // once unmounted, adding works
    tp.add_volume("V2", "1M");
    assert_eq!(names(&tp.pool), ["V1", "V2"]);
    fsck_clean(&tp.pool);
}

#[test]
fn mounted_file_and_umount_errors() {
    let tp = TestPool::new("64K", &[("V1", "1M")]);
    let m = tp.mount();
    let v = parse_json(&fs::read_to_string(tp.pool.join("mounted")).unwrap());
    assert_eq!(v["pid"].as_i64().unwrap() as i32, m.daemon_pid());
    let mp = fs::canonicalize(&m.mnt).unwrap();
    assert_eq!(v["mountpoint"].as_str().unwrap(), s(&mp));
    assert!(Path::new(v["mountpoint"].as_str().unwrap()).is_absolute());
    // umount of something that is not a ferryfs mount
    errs(&["umount", s(tp.dir())], "");
    errs(&["umount", s(&tp.dir().join("nonexistent"))], "");
    assert!(is_mounted(&m.mnt), "a refused umount unmounted the real one");
    m.unmount();
    errs(&["umount", s(tp.mnt())], "");
    fsck_clean(&tp.pool);
}

#[test]
fn fusermount_unmount_is_clean() {
    let tp = TestPool::new("64K", &[("V1", "4M")]);
    let m = tp.mount();
    let data = pattern(500_000, 90);
    fs::write(m.p("f"), &data).unwrap();
    let out = retry_while_busy(|| std::process::Command::new("fusermount3").arg("-u").arg(&m.mnt).output().unwrap());
    assert!(out.status.success(), "fusermount3 -u failed: {}", String::from_utf8_lossy(&out.stderr));
    m.wait_daemon_exit();
    fsck_clean(&tp.pool);
    let m = tp.mount();
    assert_bytes_eq(&fs::read(m.p("f")).unwrap(), &data, "after fusermount3 -u and remount");
    m.unmount();
    fsck_clean(&tp.pool);
}

#[test]
fn daemon_writes_mount_log() {
    let tp = TestPool::new("64K", &[("V1", "1M")]);
    let m = tp.mount();
    assert!(tp.pool.join("mount.log").exists(), "daemon log at POOL/mount.log");
    m.unmount();
    fsck_clean(&tp.pool);
}

// ---------------------------------------------------------------- corrupt catalogs

/// A pool with some data, cleanly unmounted.
fn pool_with_data() -> TestPool {
    let tp = TestPool::new("64K", &[("V1", "4M"), ("V2", "4M")]);
    let m = tp.mount();
    fs::create_dir(m.p("d")).unwrap();
    fs::write(m.p("d/a"), pattern(300_000, 91)).unwrap();
    fs::write(m.p("b"), pattern(100_000, 92)).unwrap();
    std::os::unix::fs::symlink("d/a", m.p("l")).unwrap();
    m.unmount();
    fsck_clean(&tp.pool);
    tp
}

/// A pool whose catalog.log holds frames: writes after the mount, then a kill -9.
fn pool_with_log() -> TestPool {
    let tp = pool_with_data();
    let m = tp.mount();
    for i in 0..10u64 {
        fs::write(m.p(&format!("log{i}")), pattern(20_000, 200 + i)).unwrap();
    }
    fs::rename(m.p("b"), m.p("b2")).unwrap();
    let f = File::open(m.p("log0")).unwrap();
    f.sync_all().unwrap();
    drop(f);
    m.kill9();
    fsck_clean(&tp.pool);
    tp
}

/// `mount` and `fsck` both refuse the pool with one clear line mentioning the catalog, and
/// nothing gets mounted.
#[track_caller]
fn assert_refused_as_corrupt(tp: &TestPool) {
    tp.corrupted();
    let before = pool_state(&tp.pool);
    let out = ferry(["fsck", s(&tp.pool)]);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(!out.status.success(), "fsck of a corrupt catalog exited 0:\n{stdout}{err}");
    assert!(!err.contains("panicked") && !stdout.contains("panicked"), "fsck panicked:\n{err}");
    assert!((err + &stdout).to_lowercase().contains("catalog"), "fsck output must mention the catalog");
    let at = tp.try_mount();
    let mounted = at.guard.is_some();
    drop(at.guard);
    assert!(!mounted, "a corrupt catalog was mounted");
    assert!(!at.status.success(), "mount of a corrupt catalog exited 0");
    assert_eq!(at.status.code(), Some(1), "{}", at.stderr);
    assert_one_clear_line(&at.stderr, "catalog");
    assert!(!is_mounted(tp.mnt()));
    // (a pool left by a kill -9 keeps its stale POOL/mounted; the state comparison covers it)
    assert_eq!(pool_state(&tp.pool), before, "refused mount/fsck changed the pool");
    let (_, lserr) = ferry_err(&["ls", s(&tp.pool)]);
    assert_one_clear_line(&lserr, "catalog");
}

fn flip_byte(p: &Path, at: u64) {
    let f = OpenOptions::new().read(true).write(true).open(p).unwrap();
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, at).unwrap();
    b[0] ^= 0x5A;
    f.write_all_at(&b, at).unwrap();
}

#[test]
fn corrupt_snapshot_flipped_bytes() {
    let snap_len = {
        let tp = pool_with_data();
        fs::metadata(tp.pool.join("catalog.snap")).unwrap().len()
    };
    assert!(snap_len > 40, "snapshot of {snap_len} bytes");
    // header, middle, last byte
    for at in [0, 5, 10, snap_len / 2, snap_len - 1] {
        let tp = pool_with_data();
        flip_byte(&tp.pool.join("catalog.snap"), at);
        assert_refused_as_corrupt(&tp);
    }
}

#[test]
fn corrupt_snapshot_truncated() {
    for keep in [0u64, 3, 20, 1_000_000] {
        let tp = pool_with_data();
        let p = tp.pool.join("catalog.snap");
        let len = fs::metadata(&p).unwrap().len();
        let keep = if keep >= len { len / 2 } else { keep };
        OpenOptions::new().write(true).open(&p).unwrap().set_len(keep).unwrap();
        assert_refused_as_corrupt(&tp);
    }
    // garbage appended to the snapshot
    let tp = pool_with_data();
    let mut f = OpenOptions::new().append(true).open(tp.pool.join("catalog.snap")).unwrap();
    f.write_all(b"trailing garbage").unwrap();
    drop(f);
    assert_refused_as_corrupt(&tp);
}

#[test]
fn corrupt_log_flipped_bytes_mid_log() {
    let len = {
        let tp = pool_with_log();
        fs::metadata(tp.pool.join("catalog.log")).unwrap().len()
    };
    assert!(len > 200, "catalog.log holds frames after writes and a kill -9 ({len} bytes)");
    assert!(len < 4096, "the frames lie in the log's first sector, never synced whole ({len} bytes)");
    // The log's header: refused.
    let tp = pool_with_log();
    flip_byte(&tp.pool.join("catalog.log"), 1);
    assert_refused_as_corrupt(&tp);
    // Inside frames that no sync of the log covered: what a power cut can leave (a sector
    // written in part). The fsync copied them into the ring of a volume image (docs/format.md,
    // "The ring: the log's tail"): the mount lays that copy over the damage and keeps every
    // change, the fsync'd file's bytes and the rename included.
    for at in [len / 3, len / 2, 2 * len / 3] {
        let tp = pool_with_log();
        eprintln!("flipping byte {at} of {len} in catalog.log");
        flip_byte(&tp.pool.join("catalog.log"), at);
        let m = tp.mount();
        let log = fs::read_to_string(tp.pool.join("mount.log")).unwrap_or_default();
        assert!(log.contains("from the log's tail kept in the volume images"), "the ring healed nothing:\n{log}");
        assert!(!log.contains("torn"), "the mount dropped frames the ring held:\n{log}");
        assert_bytes_eq(&fs::read(m.p("log0")).unwrap(), &pattern(20_000, 200), "log0");
        assert_bytes_eq(&fs::read(m.p("b2")).unwrap(), &pattern(100_000, 92), "renamed b");
        m.unmount();
        fsck_clean(&tp.pool);
    }
    // The same damage in frames no fsync covered at all (here: the rings cut off, as if the
    // fsync had not run). The mount keeps the frames before the damage, drops the rest with
    // a warning, and the pool is consistent. (Damage in synced frames is refused:
    // tests/repair.rs.)
    for at in [len / 3, len / 2, 2 * len / 3] {
        let tp = pool_with_log();
        for v in ["V1", "V2"] {
            let image = PathBuf::from(volume_json(&tp.pool, v)["path"].as_str().unwrap());
            OpenOptions::new().write(true).open(&image).unwrap().set_len(4 << 20).unwrap();
        }
        flip_byte(&tp.pool.join("catalog.log"), at);
        let m = tp.mount();
        let log = fs::read_to_string(tp.pool.join("mount.log")).unwrap_or_default();
        assert!(log.contains("torn"), "the mount says it dropped a torn tail:\n{log}");
        m.unmount();
        fsck_clean(&tp.pool);
    }
}

/// Garbage after the last frame is what a power cut can leave of an append that was never
/// synced: dropped at mount, with everything before it kept.
#[test]
fn corrupt_log_garbage_appended() {
    let tp = pool_with_log();
    let mut f = OpenOptions::new().append(true).open(tp.pool.join("catalog.log")).unwrap();
    f.write_all(b"this is not a frame, it is garbage written after the last one").unwrap();
    drop(f);
    let m = tp.mount();
    assert_bytes_eq(&fs::read(m.p("d/a")).unwrap(), &pattern(300_000, 91), "d/a");
    assert_bytes_eq(&fs::read(m.p("b2")).unwrap(), &pattern(100_000, 92), "renamed b");
    m.unmount();
    fsck_clean(&tp.pool);
}

/// A power cut after fdatasyncs that went by the ring (docs/format.md, "The ring: the log's
/// tail") leaves the journal's frames in the volume image only. An offline command that
/// changes the pool (here `volume add`) opens the catalog writable first: it replays them
/// from the ring and compacts before it logs its own change, so the next mount finds the
/// journal whole and the new volume both.
#[test]
fn an_offline_change_after_a_power_cut_keeps_what_the_ring_holds() {
    let tp = TestPool::new("64K", &[("V1", "4M")]);
    let m = tp.mount();
    let log = tp.pool.join("catalog.log");
    let synced = fs::metadata(&log).unwrap().len();
    let mut f = OpenOptions::new().write(true).create(true).truncate(true).open(m.p("journal")).unwrap();
    let mut want = Vec::new();
    for i in 0..20u64 {
        let rec = pattern(300, 500 + i);
        f.write_all(&rec).unwrap();
        f.sync_data().unwrap();
        want.extend_from_slice(&rec);
    }
    drop(f);
    m.kill9();
    // What a power cut leaves of the log: only what the mount synced.
    OpenOptions::new().write(true).open(&log).unwrap().set_len(synced).unwrap();
    let out = ferry(["volume", "add", s(&tp.pool), "V2", "--size", "4M"]);
    assert!(out.status.success(), "volume add: {}", String::from_utf8_lossy(&out.stderr));
    let m = tp.mount();
    assert_bytes_eq(&fs::read(m.p("journal")).unwrap(), &want, "the journal after the offline change");
    m.unmount();
    assert!(volume_json(&tp.pool, "V2")["size_bytes"].as_u64().is_some(), "V2 was not added");
    fsck_clean(&tp.pool);
}

#[test]
fn torn_log_tail_is_recovered() {
    // Zeros (or a strict prefix of a frame) after the last frame are a torn append that
    // was never acknowledged: the mount cuts them off and keeps everything before.
    let tp = pool_with_log();
    let mut f = OpenOptions::new().append(true).open(tp.pool.join("catalog.log")).unwrap();
    f.write_all(&[0u8; 37]).unwrap();
    drop(f);
    fsck_clean(&tp.pool);
    let m = tp.mount();
    assert_bytes_eq(&fs::read(m.p("d/a")).unwrap(), &pattern(300_000, 91), "d/a");
    assert_bytes_eq(&fs::read(m.p("log0")).unwrap(), &pattern(20_000, 200), "log0");
    assert_bytes_eq(&fs::read(m.p("b2")).unwrap(), &pattern(100_000, 92), "renamed b");
    m.unmount();
    fsck_clean(&tp.pool);
}

#[test]
fn missing_snapshot_is_not_a_pool() {
    let tp = pool_with_data();
    fs::remove_file(tp.pool.join("catalog.snap")).unwrap();
    let at = tp.try_mount();
    let mounted = at.guard.is_some();
    drop(at.guard);
    assert!(!mounted);
    assert_eq!(at.status.code(), Some(1));
    assert_one_clear_line(&at.stderr, "");
    errs(&["fsck", s(&tp.pool)], "");
}

#[test]
fn catalog_survives_kill9_and_replays() {
    let tp = pool_with_log();
    let m = tp.mount();
    for i in 0..10u64 {
        assert_bytes_eq(&fs::read(m.p(&format!("log{i}"))).unwrap(), &pattern(20_000, 200 + i), &format!("log{i}"));
    }
    assert!(!m.p("b").exists());
    assert_bytes_eq(&fs::read(m.p("b2")).unwrap(), &pattern(100_000, 92), "b2");
    assert_eq!(fs::read_link(m.p("l")).unwrap(), Path::new("d/a"));
    m.unmount();
    fsck_clean(&tp.pool);
}

// ---------------------------------------------------------------- completions, man pages

#[test]
fn completions_name_every_subcommand() {
    let bash = ferry_ok(&["completions", "bash"]);
    assert!(bash.contains("complete") && bash.contains("ferryfs"), "{bash}");
    for sub in ["init", "volume", "mount", "migrate", "merge", "drain", "wait", "cancel", "status", "completions"] {
        assert!(bash.contains(sub), "bash completions lack {sub}");
    }
    for shell in ["zsh", "fish", "elvish", "powershell"] {
        let out = ferry_ok(&["completions", shell]);
        assert!(out.contains("migrate") && out.contains("--interval"), "{shell} completions:\n{out}");
    }
    let (code, err) = ferry_err(&["completions", "tcsh"]);
    assert_eq!(code, exit::USAGE, "{err}");
}

#[test]
fn man_pages_are_written_for_every_subcommand() {
    let tp = TestPool::uninit();
    let dir = tp.dir().join("man/man1");
    let out = ferry_ok(&["manpages", s(&dir)]);
    let written: Vec<&str> = out.lines().collect();
    for page in ["ferryfs.1", "ferryfs-migrate.1", "ferryfs-wait.1", "ferryfs-volume.1", "ferryfs-volume-add.1"] {
        let p = dir.join(page);
        assert!(written.contains(&s(&p)), "{page} not listed: {out}");
        let text = fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        assert!(text.starts_with(".TH") || text.lines().any(|l| l.starts_with(".TH")), "{page}: no .TH");
    }
    assert_eq!(written.len(), fs::read_dir(&dir).unwrap().count(), "every page written is listed");
    let main = fs::read_to_string(dir.join("ferryfs.1")).unwrap();
    assert!(main.contains(".SH \"EXIT STATUS\"") && main.contains("refused"), "{main}");
    let migrate = fs::read_to_string(dir.join("ferryfs-migrate.1")).unwrap();
    assert!(migrate.contains("interval") && migrate.contains("Cap each job"), "{migrate}");
    // man renders it, where man is installed.
    if let Ok(out) = std::process::Command::new("man").args(["-l", s(&dir.join("ferryfs.1"))]).output() {
        if out.status.success() {
            assert!(String::from_utf8_lossy(&out.stdout).contains("EXIT STATUS"));
        }
    }
}
