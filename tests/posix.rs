//! POSIX behaviour of a mounted pool, through std::fs and libc, as applications see it.

mod common;

use std::collections::BTreeSet;
use std::ffi::CString;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, SystemTime};

use common::*;

const NOBODY: u32 = 65534;

/// A pool with one 64 MiB volume, mounted.
fn setup() -> (TestPool, Mounted) {
    let tp = TestPool::new("64K", &[("V1", "64M")]);
    let m = tp.mount();
    (tp, m)
}

fn cpath(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).unwrap()
}

fn last_errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap()
}

fn read_all(p: &Path) -> Vec<u8> {
    fs::read(p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()))
}

fn renameat2(from: &Path, to: &Path, flags: u32) -> std::io::Result<()> {
    let (a, b) = (cpath(from), cpath(to));
    // SAFETY: libc calls with valid C strings and out-parameters.
    let r = unsafe { libc::renameat2(libc::AT_FDCWD, a.as_ptr(), libc::AT_FDCWD, b.as_ptr(), flags) };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

fn fallocate(f: &File, mode: i32, off: i64, len: i64) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: fallocate on a file descriptor this test owns.
    let r = unsafe { libc::fallocate(f.as_raw_fd(), mode, off, len) };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

fn statvfs(p: &Path) -> libc::statvfs {
    let c = cpath(p);
    // SAFETY: statvfs is plain data: all zeroes is a valid value.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: libc calls with valid C strings and out-parameters.
    let r = unsafe { libc::statvfs(c.as_ptr(), &mut st) };
    assert_eq!(r, 0, "statvfs {}: errno {}", p.display(), last_errno());
    st
}

// ---------------------------------------------------------------- create/read/write

#[test]
fn create_write_read_back() {
    let (_tp, m) = setup();
    let data = pattern(300_000, 1);
    {
        let mut f = File::create(m.p("a.bin")).unwrap();
        f.write_all(&data).unwrap();
        f.flush().unwrap();
    } // release
    assert_bytes_eq(&read_all(&m.p("a.bin")), &data, "a.bin");
    assert_eq!(fs::metadata(m.p("a.bin")).unwrap().len(), 300_000);

    // a second open sees the same bytes; reading in odd chunks
    let mut f = File::open(m.p("a.bin")).unwrap();
    let mut got = Vec::new();
    let mut buf = vec![0u8; 7777];
    loop {
        let n = f.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        got.extend_from_slice(&buf[..n]);
    }
    assert_bytes_eq(&got, &data, "chunked read");
}

#[test]
fn empty_file_and_read_past_eof() {
    let (_tp, m) = setup();
    File::create(m.p("empty")).unwrap();
    let md = fs::metadata(m.p("empty")).unwrap();
    assert!(md.is_file());
    assert_eq!(md.len(), 0);
    assert_eq!(read_all(&m.p("empty")), b"");
    fs::write(m.p("small"), b"hello").unwrap();
    let f = File::open(m.p("small")).unwrap();
    let mut buf = [0u8; 16];
    assert_eq!(f.read_at(&mut buf, 5).unwrap(), 0, "read at EOF");
    assert_eq!(f.read_at(&mut buf, 1000).unwrap(), 0, "read past EOF");
    assert_eq!(f.read_at(&mut buf, 3).unwrap(), 2);
    assert_eq!(&buf[..2], b"lo");
}

#[test]
fn overwrite_in_place_and_at_offsets_across_tracks() {
    let (_tp, m) = setup();
    let mut model = pattern(200_000, 2);
    fs::write(m.p("f"), &model).unwrap();
    let f = OpenOptions::new().read(true).write(true).open(m.p("f")).unwrap();
    // writes straddling the 64K track boundaries, and one that extends the file
    for (off, len, seed) in [(65_530usize, 20usize, 3u64), (131_000, 1_000, 4), (10, 1, 5), (199_990, 30_000, 6)] {
        let chunk = pattern(len, seed);
        f.write_all_at(&chunk, off as u64).unwrap();
        if model.len() < off + len {
            model.resize(off + len, 0);
        }
        model[off..off + len].copy_from_slice(&chunk);
    }
    drop(f);
    assert_bytes_eq(&read_all(&m.p("f")), &model, "after pwrites");
    assert_eq!(fs::metadata(m.p("f")).unwrap().len(), model.len() as u64);
}

#[test]
fn sparse_write_far_past_eof_reads_zeros_in_gap() {
    let (_tp, m) = setup();
    let f = File::create(m.p("sparse")).unwrap();
    f.write_all_at(b"head", 0).unwrap();
    f.write_all_at(b"tail", 5_000_000).unwrap();
    drop(f);
    let got = read_all(&m.p("sparse"));
    assert_eq!(got.len(), 5_000_004);
    assert_eq!(&got[..4], b"head");
    assert_eq!(&got[5_000_000..], b"tail");
    assert!(got[4..5_000_000].iter().all(|&b| b == 0), "gap must read as zeros");
}

#[test]
fn random_io_matches_model_small_tracks() {
    // 4 KiB tracks: many operations cross track boundaries.
    let tp = TestPool::new("4K", &[("V1", "16M")]);
    let m = tp.mount();
    let path = m.p("model.bin");
    let mut model: Vec<u8> = Vec::new();
    let f = OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&path).unwrap();
    let mut rng = 0x1234_5678_9abc_def1u64;
    let mut next = move |n: u64| {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng % n
    };
    for i in 0..400u64 {
        match next(10) {
            0..=5 => {
                let off = next(600_000) as usize;
                let len = 1 + next(20_000) as usize;
                let chunk = pattern(len, 1000 + i);
                f.write_all_at(&chunk, off as u64).unwrap();
                if model.len() < off + len {
                    model.resize(off + len, 0);
                }
                model[off..off + len].copy_from_slice(&chunk);
            }
            6 | 7 => {
                let len = next(650_000) as usize;
                f.set_len(len as u64).unwrap();
                model.resize(len, 0);
            }
            _ => {
                let off = next(650_000) as usize;
                let len = 1 + next(30_000) as usize;
                let mut buf = vec![0u8; len];
                let n = f.read_at(&mut buf, off as u64).unwrap();
                let want: &[u8] = if off >= model.len() { &[] } else { &model[off..model.len().min(off + len)] };
                assert_bytes_eq(&buf[..n], want, &format!("op {i}: read {len}@{off}"));
            }
        }
    }
    drop(f);
    assert_bytes_eq(&read_all(&path), &model, "final content");
    m.unmount();
    fsck_clean(&tp.pool);
}

#[test]
fn open_flags_excl_trunc_append() {
    let (_tp, m) = setup();
    fs::write(m.p("f"), b"0123456789").unwrap();
    assert_errno(
        OpenOptions::new().write(true).create_new(true).open(m.p("f")),
        libc::EEXIST,
        "O_CREAT|O_EXCL on existing file",
    );
    {
        let mut f = OpenOptions::new().append(true).open(m.p("f")).unwrap();
        f.write_all(b"AB").unwrap();
    }
    assert_eq!(read_all(&m.p("f")), b"0123456789AB");
    {
        let mut f = OpenOptions::new().write(true).truncate(true).open(m.p("f")).unwrap();
        f.write_all(b"xy").unwrap();
    }
    assert_eq!(read_all(&m.p("f")), b"xy");
    assert_eq!(fs::metadata(m.p("f")).unwrap().len(), 2);
}

#[test]
fn fsync_fdatasync_and_fsyncdir() {
    let (_tp, m) = setup();
    fs::create_dir(m.p("d")).unwrap();
    let mut f = File::create(m.p("d/f")).unwrap();
    f.write_all(&pattern(100_000, 7)).unwrap();
    f.sync_data().unwrap();
    f.write_all(b"more").unwrap();
    f.sync_all().unwrap();
    drop(f);
    // fsyncdir
    File::open(m.p("d")).unwrap().sync_all().unwrap();
    File::open(&m.mnt).unwrap().sync_all().unwrap();
    let mut want = pattern(100_000, 7);
    want.extend_from_slice(b"more");
    assert_bytes_eq(&read_all(&m.p("d/f")), &want, "after fsync");
}

/// The syncs the mount has counted (`app_syncs.count` in `.ferry/status`).
fn syncs(m: &Mounted) -> u64 {
    common::jobs::status(&m.mnt)["app_syncs"]["count"].as_u64().expect("app_syncs.count in the status")
}

/// A write through an O_SYNC or O_DSYNC handle is durable when it returns: the kernel leaves
/// that to the file system, so the mount must flush it before it answers. Each such write
/// is one sync of the mount; a plain write is none.
#[test]
fn o_sync_and_o_dsync_writes_are_flushed_before_they_return() {
    let (_tp, m) = setup();
    let plain = File::create(m.p("f")).unwrap();
    let c0 = syncs(&m);
    for i in 0..10u64 {
        plain.write_all_at(&pattern(4096, i), i * 4096).unwrap();
    }
    drop(plain);
    assert_eq!(syncs(&m), c0, "plain writes and a close are not syncs");
    for (flag, name) in [(libc::O_SYNC, "O_SYNC"), (libc::O_DSYNC, "O_DSYNC")] {
        let f = OpenOptions::new().write(true).custom_flags(flag).open(m.p("f")).unwrap();
        let before = syncs(&m);
        for i in 0..10u64 {
            f.write_all_at(&pattern(4096, 100 + i), i * 4096).unwrap();
        }
        assert_eq!(syncs(&m), before + 10, "each {name} write is flushed before it returns");
        drop(f);
    }
    let f = OpenOptions::new().write(true).open(m.p("f")).unwrap();
    let before = syncs(&m);
    f.sync_data().unwrap();
    assert_eq!(syncs(&m), before + 1, "an fdatasync is one sync");
    let want: Vec<u8> = (0..10u64).flat_map(|i| pattern(4096, 100 + i)).collect();
    assert_bytes_eq(&read_all(&m.p("f")), &want, "after the O_DSYNC writes");
}

#[test]
fn seek_data_on_written_file() {
    let (_tp, m) = setup();
    let mut f = OpenOptions::new().read(true).write(true).create(true).truncate(true).open(m.p("f")).unwrap();
    f.write_all(&pattern(70_000, 8)).unwrap();
    let end = f.seek(SeekFrom::End(0)).unwrap();
    assert_eq!(end, 70_000);
    f.seek(SeekFrom::Start(69_990)).unwrap();
    let mut buf = Vec::new();
    f.read_to_end(&mut buf).unwrap();
    assert_bytes_eq(&buf, &pattern(70_000, 8)[69_990..], "tail");
}

// ---------------------------------------------------------------- lookup/getattr/setattr

#[test]
fn lookup_and_getattr() {
    let (_tp, m) = setup();
    fs::write(m.p("f"), vec![1u8; 12_345]).unwrap();
    fs::create_dir(m.p("d")).unwrap();
    let md = fs::metadata(m.p("f")).unwrap();
    assert!(md.is_file());
    assert_eq!(md.len(), 12_345);
    assert_eq!(md.nlink(), 1);
    assert_eq!(md.uid(), 0);
    assert_eq!(md.gid(), 0);
    assert!(md.blocks() * 512 >= 12_345, "st_blocks {} too small", md.blocks());
    let dmd = fs::metadata(m.p("d")).unwrap();
    assert!(dmd.is_dir());
    assert_ne!(md.ino(), dmd.ino());
    // inode numbers are stable across lookups
    assert_eq!(fs::metadata(m.p("f")).unwrap().ino(), md.ino());
    assert!(fs::metadata(&m.mnt).unwrap().is_dir());
    assert_errno(fs::metadata(m.p("nope")), libc::ENOENT, "stat missing");
    assert_errno(fs::metadata(m.p("d/nope/x")), libc::ENOENT, "stat missing deep");
    assert_errno(File::open(m.p("nope")), libc::ENOENT, "open missing");
}

#[test]
fn truncate_down_then_up_reads_zeros_in_gap() {
    let (_tp, m) = setup();
    let data = vec![0xFFu8; 200_000];
    fs::write(m.p("t"), &data).unwrap();
    let f = OpenOptions::new().read(true).write(true).open(m.p("t")).unwrap();
    f.set_len(1_000).unwrap(); // down, mid-track
    assert_eq!(fs::metadata(m.p("t")).unwrap().len(), 1_000);
    assert_eq!(read_all(&m.p("t")), vec![0xFFu8; 1_000]);
    f.set_len(300_000).unwrap(); // up, past old end
    drop(f);
    let got = read_all(&m.p("t"));
    assert_eq!(got.len(), 300_000);
    assert!(got[..1_000].iter().all(|&b| b == 0xFF), "kept bytes");
    if let Some(i) = got[1_000..].iter().position(|&b| b != 0) {
        panic!("old bytes reappeared after truncate down/up at offset {}", 1_000 + i);
    }
    // truncate to zero and up again
    fs::OpenOptions::new().write(true).open(m.p("t")).unwrap().set_len(0).unwrap();
    fs::OpenOptions::new().write(true).open(m.p("t")).unwrap().set_len(70_000).unwrap();
    assert!(read_all(&m.p("t")).iter().all(|&b| b == 0), "zeros after 0 and up");
}

#[test]
fn truncate_via_path_and_write_after_truncate() {
    let (_tp, m) = setup();
    fs::write(m.p("t"), pattern(150_000, 9)).unwrap();
    let c = cpath(&m.p("t"));
    // SAFETY: libc calls with valid C strings and out-parameters.
    assert_eq!(unsafe { libc::truncate(c.as_ptr(), 65_536) }, 0);
    let f = OpenOptions::new().write(true).open(m.p("t")).unwrap();
    f.write_all_at(b"Z", 100_000).unwrap();
    drop(f);
    let got = read_all(&m.p("t"));
    assert_eq!(got.len(), 100_001);
    assert_bytes_eq(&got[..65_536], &pattern(150_000, 9)[..65_536], "kept");
    assert!(got[65_536..100_000].iter().all(|&b| b == 0), "gap zeros");
    assert_eq!(got[100_000], b'Z');
}

#[test]
fn chmod() {
    let (_tp, m) = setup();
    fs::write(m.p("f"), b"x").unwrap();
    fs::create_dir(m.p("d")).unwrap();
    for mode in [0o640, 0o600, 0o755, 0o4755, 0o1777] {
        fs::set_permissions(m.p("f"), fs::Permissions::from_mode(mode)).unwrap();
        assert_eq!(fs::metadata(m.p("f")).unwrap().mode() & 0o7777, mode, "file mode");
    }
    fs::set_permissions(m.p("d"), fs::Permissions::from_mode(0o700)).unwrap();
    let md = fs::metadata(m.p("d")).unwrap();
    assert_eq!(md.mode() & 0o7777, 0o700);
    assert!(md.is_dir(), "chmod must keep the file type");
    // fchmod through an open handle
    let f = File::open(m.p("f")).unwrap();
    f.set_permissions(fs::Permissions::from_mode(0o444)).unwrap();
    assert_eq!(fs::metadata(m.p("f")).unwrap().mode() & 0o7777, 0o444);
}

#[test]
fn create_honours_mode_and_umask_bits() {
    let (_tp, m) = setup();
    let f = OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(m.p("f")).unwrap();
    drop(f);
    let mode = fs::metadata(m.p("f")).unwrap().mode() & 0o777;
    assert_eq!(mode & !0o600, 0, "created 0600 file has mode {mode:o}");
}

#[test]
fn chown_to_another_uid_as_root() {
    let (_tp, m) = setup();
    fs::write(m.p("f"), b"x").unwrap();
    fs::create_dir(m.p("d")).unwrap();
    std::os::unix::fs::chown(m.p("f"), Some(NOBODY), Some(NOBODY)).unwrap();
    let md = fs::metadata(m.p("f")).unwrap();
    assert_eq!((md.uid(), md.gid()), (NOBODY, NOBODY));
    std::os::unix::fs::chown(m.p("d"), Some(1234), None).unwrap();
    let md = fs::metadata(m.p("d")).unwrap();
    assert_eq!((md.uid(), md.gid()), (1234, 0), "gid unchanged when not given");
    std::os::unix::fs::chown(m.p("d"), None, Some(4321)).unwrap();
    let md = fs::metadata(m.p("d")).unwrap();
    assert_eq!((md.uid(), md.gid()), (1234, 4321));
    assert_eq!(read_all(&m.p("f")), b"x", "chown keeps content");
}

#[test]
fn utimens_sets_times() {
    let (_tp, m) = setup();
    fs::write(m.p("f"), b"x").unwrap();
    let atime = SystemTime::UNIX_EPOCH + Duration::new(1_000_000_000, 123_456_789);
    let mtime = SystemTime::UNIX_EPOCH + Duration::new(1_200_000_000, 987_654_321);
    let f = File::options().write(true).open(m.p("f")).unwrap();
    f.set_times(fs::FileTimes::new().set_accessed(atime).set_modified(mtime)).unwrap();
    drop(f);
    let md = fs::metadata(m.p("f")).unwrap();
    assert_eq!(md.mtime(), 1_200_000_000);
    assert_eq!(md.atime(), 1_000_000_000);
    // utimensat on a path, seconds only, also for a directory
    fs::create_dir(m.p("d")).unwrap();
    let c = cpath(&m.p("d"));
    let ts =
        [libc::timespec { tv_sec: 1_100_000_000, tv_nsec: 0 }, libc::timespec { tv_sec: 1_300_000_000, tv_nsec: 0 }];
    // SAFETY: libc calls with valid C strings and out-parameters.
    let r = unsafe { libc::utimensat(libc::AT_FDCWD, c.as_ptr(), ts.as_ptr(), 0) };
    assert_eq!(r, 0, "utimensat errno {}", last_errno());
    let md = fs::metadata(m.p("d")).unwrap();
    assert_eq!((md.atime(), md.mtime()), (1_100_000_000, 1_300_000_000));
}

#[test]
fn write_updates_mtime() {
    let (_tp, m) = setup();
    fs::write(m.p("f"), b"x").unwrap();
    let old = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000_000);
    File::options().write(true).open(m.p("f")).unwrap().set_modified(old).unwrap();
    assert_eq!(fs::metadata(m.p("f")).unwrap().mtime(), 1_000_000_000);
    let f = File::options().write(true).open(m.p("f")).unwrap();
    f.write_all_at(b"y", 0).unwrap();
    drop(f);
    assert!(fs::metadata(m.p("f")).unwrap().mtime() > 1_000_000_000, "write must update mtime");
}

// ---------------------------------------------------------------- unlink/rename

#[test]
fn unlink() {
    let (_tp, m) = setup();
    fs::write(m.p("f"), b"x").unwrap();
    fs::remove_file(m.p("f")).unwrap();
    assert_errno(fs::metadata(m.p("f")), libc::ENOENT, "stat after unlink");
    assert_errno(fs::remove_file(m.p("f")), libc::ENOENT, "unlink twice");
    assert!(!fs::read_dir(&m.mnt).unwrap().any(|e| e.unwrap().file_name() == "f"));
    fs::create_dir(m.p("d")).unwrap();
    assert_errno(fs::remove_file(m.p("d")), libc::EISDIR, "unlink a directory");
    // re-create under the same name: a new, empty file
    File::create(m.p("f")).unwrap();
    assert_eq!(fs::metadata(m.p("f")).unwrap().len(), 0);
}

#[test]
fn unlink_open_file_keeps_data_until_close() {
    let (_tp, m) = setup();
    let data = pattern(150_000, 10);
    fs::write(m.p("f"), &data).unwrap();
    let f = OpenOptions::new().read(true).write(true).open(m.p("f")).unwrap();
    fs::remove_file(m.p("f")).unwrap();
    assert_errno(fs::metadata(m.p("f")), libc::ENOENT, "name gone");
    let mut buf = vec![0u8; data.len()];
    f.read_exact_at(&mut buf, 0).unwrap();
    assert_bytes_eq(&buf, &data, "read through fd after unlink");
    f.write_all_at(b"still", 0).unwrap();
    let mut b5 = [0u8; 5];
    f.read_exact_at(&mut b5, 0).unwrap();
    assert_eq!(&b5, b"still");
    // a new file with the same name is independent
    fs::write(m.p("f"), b"new").unwrap();
    f.read_exact_at(&mut b5, 0).unwrap();
    assert_eq!(&b5, b"still");
    drop(f);
    assert_eq!(read_all(&m.p("f")), b"new");
}

#[test]
fn unlink_frees_tracks() {
    let (tp, m) = setup();
    let before = volume_json(&m.mnt, "V1")["tracks_used"].as_u64().unwrap();
    fs::write(m.p("big"), vec![7u8; 1 << 20]).unwrap();
    let during = volume_json(&m.mnt, "V1")["tracks_used"].as_u64().unwrap();
    assert!(during >= before + 16, "1 MiB on 64K tracks uses >= 16 tracks ({before} -> {during})");
    fs::remove_file(m.p("big")).unwrap();
    let after = volume_json(&m.mnt, "V1")["tracks_used"].as_u64().unwrap();
    assert_eq!(after, before, "tracks freed after unlink");
    m.unmount();
    fsck_clean(&tp.pool);
}

#[test]
fn rename_over_existing_file() {
    let (_tp, m) = setup();
    fs::write(m.p("a"), b"AAAA").unwrap();
    fs::write(m.p("b"), pattern(100_000, 11)).unwrap();
    let ino_a = fs::metadata(m.p("a")).unwrap().ino();
    fs::rename(m.p("a"), m.p("b")).unwrap();
    assert_errno(fs::metadata(m.p("a")), libc::ENOENT, "source gone");
    assert_eq!(read_all(&m.p("b")), b"AAAA");
    assert_eq!(fs::metadata(m.p("b")).unwrap().ino(), ino_a);
    // the replaced data set is gone from the catalog
    let ls = ls_json(&m.mnt);
    let n = ls["data_sets"].as_array().unwrap().len();
    assert_eq!(n, 1, "one data set after rename-over: {ls:#}");
}

#[test]
fn rename_into_another_dir_and_dirs() {
    let (_tp, m) = setup();
    fs::create_dir_all(m.p("x/y")).unwrap();
    fs::create_dir(m.p("z")).unwrap();
    fs::write(m.p("x/y/f"), b"data").unwrap();
    fs::rename(m.p("x/y/f"), m.p("z/g")).unwrap();
    assert_eq!(read_all(&m.p("z/g")), b"data");
    assert_errno(fs::metadata(m.p("x/y/f")), libc::ENOENT, "old name");
    // rename a whole directory; its contents follow
    fs::rename(m.p("z"), m.p("x/y/z2")).unwrap();
    assert_eq!(read_all(&m.p("x/y/z2/g")), b"data");
    assert!(ls_json(&m.mnt)["data_sets"].as_array().unwrap().iter().any(|d| d["path"] == "/x/y/z2/g"));
    // rename to self is a no-op
    fs::rename(m.p("x/y/z2/g"), m.p("x/y/z2/g")).unwrap();
    assert_eq!(read_all(&m.p("x/y/z2/g")), b"data");
    // a directory cannot move into itself
    assert_errno(fs::rename(m.p("x"), m.p("x/y/inside")), libc::EINVAL, "dir into itself");
    // rename of a missing name
    assert_errno(fs::rename(m.p("missing"), m.p("q")), libc::ENOENT, "rename missing");
}

#[test]
fn rename_kind_mismatches() {
    let (_tp, m) = setup();
    fs::write(m.p("f"), b"x").unwrap();
    fs::create_dir(m.p("d")).unwrap();
    fs::create_dir(m.p("e")).unwrap();
    fs::write(m.p("e/inner"), b"y").unwrap();
    fs::create_dir(m.p("empty")).unwrap();
    assert_errno(fs::rename(m.p("f"), m.p("d")), libc::EISDIR, "file over dir");
    assert_errno(fs::rename(m.p("d"), m.p("f")), libc::ENOTDIR, "dir over file");
    assert_errno(fs::rename(m.p("d"), m.p("e")), libc::ENOTEMPTY, "dir over non-empty dir");
    fs::rename(m.p("d"), m.p("empty")).unwrap(); // dir over empty dir
    assert!(fs::metadata(m.p("empty")).unwrap().is_dir());
    assert_errno(fs::metadata(m.p("d")), libc::ENOENT, "old dir name");
    assert_eq!(read_all(&m.p("e/inner")), b"y");
    assert_eq!(read_all(&m.p("f")), b"x");
}

#[test]
fn rename_noreplace() {
    let (_tp, m) = setup();
    fs::write(m.p("a"), b"A").unwrap();
    fs::write(m.p("b"), b"B").unwrap();
    assert_errno(renameat2(&m.p("a"), &m.p("b"), libc::RENAME_NOREPLACE), libc::EEXIST, "NOREPLACE");
    assert_eq!(read_all(&m.p("a")), b"A");
    assert_eq!(read_all(&m.p("b")), b"B");
    renameat2(&m.p("a"), &m.p("c"), libc::RENAME_NOREPLACE).unwrap();
    assert_eq!(read_all(&m.p("c")), b"A");
    assert_errno(fs::metadata(m.p("a")), libc::ENOENT, "old name");
}

#[test]
fn rename_exchange_swaps_or_is_refused_cleanly() {
    let (_tp, m) = setup();
    fs::write(m.p("a"), b"A").unwrap();
    fs::create_dir(m.p("b")).unwrap();
    fs::write(m.p("b/x"), b"X").unwrap();
    match renameat2(&m.p("a"), &m.p("b"), libc::RENAME_EXCHANGE) {
        Ok(()) => {
            assert!(fs::metadata(m.p("a")).unwrap().is_dir());
            assert_eq!(read_all(&m.p("a/x")), b"X");
            assert_eq!(read_all(&m.p("b")), b"A");
        }
        Err(e) => {
            assert!(
                matches!(e.raw_os_error(), Some(libc::EINVAL) | Some(libc::ENOSYS) | Some(libc::EOPNOTSUPP)),
                "RENAME_EXCHANGE: unexpected error {e}"
            );
            assert_eq!(read_all(&m.p("a")), b"A", "unchanged after refused exchange");
            assert_eq!(read_all(&m.p("b/x")), b"X");
        }
    }
    assert_errno(
        renameat2(&m.p("nope"), &m.p("a"), libc::RENAME_EXCHANGE),
        libc::ENOENT,
        "exchange with a missing name",
    );
}

// ---------------------------------------------------------------- directories

#[test]
fn mkdir_rmdir() {
    let (_tp, m) = setup();
    fs::create_dir(m.p("d")).unwrap();
    assert_errno(fs::create_dir(m.p("d")), libc::EEXIST, "mkdir existing");
    fs::write(m.p("f"), b"").unwrap();
    assert_errno(fs::create_dir(m.p("f")), libc::EEXIST, "mkdir over file");
    fs::create_dir_all(m.p("d/e/f/g")).unwrap();
    assert_errno(fs::remove_dir(m.p("d")), libc::ENOTEMPTY, "rmdir non-empty");
    assert_errno(fs::remove_dir(m.p("f")), libc::ENOTDIR, "rmdir a file");
    assert_errno(fs::remove_dir(m.p("missing")), libc::ENOENT, "rmdir missing");
    assert_errno(fs::create_dir(m.p("missing/x")), libc::ENOENT, "mkdir under missing");
    fs::remove_dir(m.p("d/e/f/g")).unwrap();
    fs::remove_dir_all(m.p("d")).unwrap();
    assert_errno(fs::metadata(m.p("d")), libc::ENOENT, "removed");
    // nlink of a directory counts its subdirectories (2 + n), if the fs reports it
    fs::create_dir_all(m.p("p/c1")).unwrap();
    fs::create_dir_all(m.p("p/c2")).unwrap();
    let nl = fs::metadata(m.p("p")).unwrap().nlink();
    assert!(nl == 4 || nl == 1, "dir nlink {nl}, expected 4 (or 1 = unknown)");
}

#[test]
fn readdir_names_and_types() {
    let (_tp, m) = setup();
    fs::write(m.p("file"), b"").unwrap();
    fs::create_dir(m.p("dir")).unwrap();
    std::os::unix::fs::symlink("file", m.p("link")).unwrap();
    let mut seen = BTreeSet::new();
    for e in fs::read_dir(&m.mnt).unwrap() {
        let e = e.unwrap();
        let name = e.file_name().into_string().unwrap();
        let ft = e.file_type().unwrap();
        match name.as_str() {
            "file" => assert!(ft.is_file()),
            "dir" => assert!(ft.is_dir()),
            "link" => assert!(ft.is_symlink()),
            _ => {}
        }
        assert!(seen.insert(name.clone()), "duplicate entry {name}");
    }
    for n in ["file", "dir", "link"] {
        assert!(seen.contains(n), "readdir misses {n}: {seen:?}");
    }
    assert_eq!(fs::read_dir(m.p("dir")).unwrap().count(), 0, "empty dir lists nothing");
}

#[test]
fn readdir_many_entries_complete() {
    let (_tp, m) = setup();
    fs::create_dir(m.p("many")).unwrap();
    let mut want = BTreeSet::new();
    for i in 0..2000 {
        let name = format!("entry-{i:05}-{}", "x".repeat(i % 50));
        File::create(m.p(&format!("many/{name}"))).unwrap();
        want.insert(name);
    }
    let mut got = BTreeSet::new();
    for e in fs::read_dir(m.p("many")).unwrap() {
        let name = e.unwrap().file_name().into_string().unwrap();
        assert!(got.insert(name.clone()), "duplicate entry {name}");
    }
    assert_eq!(got.len(), want.len(), "readdir returned {} of {}", got.len(), want.len());
    assert_eq!(got, want);
    // delete every other one while listing again
    for (i, n) in want.iter().enumerate() {
        if i % 2 == 0 {
            fs::remove_file(m.p(&format!("many/{n}"))).unwrap();
        }
    }
    assert_eq!(fs::read_dir(m.p("many")).unwrap().count(), 1000);
}

// ---------------------------------------------------------------- links

#[test]
fn symlink_readlink() {
    let (_tp, m) = setup();
    fs::create_dir(m.p("d")).unwrap();
    fs::write(m.p("d/target"), b"through the link").unwrap();
    std::os::unix::fs::symlink("d/target", m.p("rel")).unwrap();
    std::os::unix::fs::symlink("/nonexistent/abs/path", m.p("dangling")).unwrap();
    assert_eq!(fs::read_link(m.p("rel")).unwrap(), Path::new("d/target"));
    assert_eq!(fs::read_link(m.p("dangling")).unwrap(), Path::new("/nonexistent/abs/path"));
    let lmd = fs::symlink_metadata(m.p("rel")).unwrap();
    assert!(lmd.file_type().is_symlink());
    assert_eq!(lmd.len(), "d/target".len() as u64);
    assert_eq!(read_all(&m.p("rel")), b"through the link");
    assert_errno(fs::metadata(m.p("dangling")), libc::ENOENT, "follow dangling");
    assert_errno(std::os::unix::fs::symlink("x", m.p("rel")), libc::EEXIST, "symlink over existing");
    // a long target (up to a page) reads back intact
    let long = "a/".repeat(1000) + "end";
    std::os::unix::fs::symlink(&long, m.p("long")).unwrap();
    assert_eq!(fs::read_link(m.p("long")).unwrap(), Path::new(&long));
    assert_errno(fs::read_link(m.p("d/target")), libc::EINVAL, "readlink on a file");
    fs::remove_file(m.p("rel")).unwrap();
    assert_eq!(read_all(&m.p("d/target")), b"through the link", "unlinking a symlink keeps the target");
}

#[test]
fn hard_link() {
    let (_tp, m) = setup();
    let data = pattern(100_000, 12);
    fs::write(m.p("a"), &data).unwrap();
    fs::create_dir(m.p("d")).unwrap();
    fs::hard_link(m.p("a"), m.p("d/b")).unwrap();
    let (ma, mb) = (fs::metadata(m.p("a")).unwrap(), fs::metadata(m.p("d/b")).unwrap());
    assert_eq!(ma.nlink(), 2);
    assert_eq!(mb.nlink(), 2);
    assert_eq!(ma.ino(), mb.ino());
    assert_bytes_eq(&read_all(&m.p("d/b")), &data, "through second name");
    // a write through one name is seen through the other
    OpenOptions::new().write(true).open(m.p("d/b")).unwrap().write_all_at(b"LINK", 10).unwrap();
    assert_eq!(&read_all(&m.p("a"))[10..14], b"LINK");
    // listed once per path
    let ls = ls_json(&m.mnt);
    let paths: BTreeSet<String> =
        ls["data_sets"].as_array().unwrap().iter().map(|d| d["path"].as_str().unwrap().to_string()).collect();
    assert!(paths.contains("/a") && paths.contains("/d/b"), "ls paths {paths:?}");
    fs::remove_file(m.p("a")).unwrap();
    assert_eq!(fs::metadata(m.p("d/b")).unwrap().nlink(), 1);
    let mut want = data.clone();
    want[10..14].copy_from_slice(b"LINK");
    assert_bytes_eq(&read_all(&m.p("d/b")), &want, "survives unlink of the other name");
    assert_errno(fs::hard_link(m.p("d"), m.p("dl")), libc::EPERM, "hard link to a directory");
    assert_errno(fs::hard_link(m.p("missing"), m.p("x")), libc::ENOENT, "link missing");
    fs::write(m.p("c"), b"").unwrap();
    assert_errno(fs::hard_link(m.p("d/b"), m.p("c")), libc::EEXIST, "link over existing");
}

// ---------------------------------------------------------------- statfs, fallocate

#[test]
fn statfs_reflects_volumes_and_usage() {
    let tp = TestPool::new("64K", &[("V1", "8M"), ("V2", "4M")]);
    let m = tp.mount();
    let st0 = statvfs(&m.mnt);
    let frsize = if st0.f_frsize != 0 { st0.f_frsize } else { st0.f_bsize };
    let total = st0.f_blocks * frsize;
    assert_eq!(total, 12 << 20, "f_blocks*f_frsize = total volume size");
    let free0 = st0.f_bfree * frsize;
    assert!(free0 <= total);
    assert!(st0.f_bavail * frsize <= free0);
    assert!(st0.f_namemax >= 255, "f_namemax {}", st0.f_namemax);
    fs::write(m.p("f"), vec![1u8; 2 << 20]).unwrap();
    File::open(m.p("f")).unwrap().sync_all().unwrap();
    let st1 = statvfs(&m.mnt);
    let free1 = st1.f_bfree * frsize;
    assert_eq!(st1.f_blocks, st0.f_blocks, "total unchanged by writes");
    assert!(free0 - free1 >= 2 << 20, "2 MiB written: free {free0} -> {free1}");
    // agrees with volume list
    let vl = volume_list_json(&m.mnt);
    let ts = vl["track_size_bytes"].as_u64().unwrap();
    let vfree: u64 = vl["volumes"].as_array().unwrap().iter().map(|v| v["tracks_free"].as_u64().unwrap()).sum();
    assert_eq!(free1, vfree * ts, "statfs free = sum of tracks_free");
    fs::remove_file(m.p("f")).unwrap();
    let st2 = statvfs(&m.mnt);
    assert_eq!(st2.f_bfree, st0.f_bfree, "free space back after unlink");
}

/// The story: statfs answered "u32::MAX free inodes" and, as the total, the number in use,
/// so `df -i` showed a negative IUsed. Free inodes never exceed the total now, and total -
/// free counts every data set, directory and symlink.
#[test]
fn statfs_inodes_free_never_exceed_the_total() {
    let tp = TestPool::new("64K", &[("V1", "8M")]);
    let m = tp.mount();
    let used = |st: &libc::statvfs| st.f_files.checked_sub(st.f_ffree);
    let st0 = statvfs(&m.mnt);
    assert!(st0.f_ffree <= st0.f_files, "empty pool: f_ffree {} > f_files {}", st0.f_ffree, st0.f_files);
    assert!(st0.f_favail <= st0.f_ffree, "f_favail {} > f_ffree {}", st0.f_favail, st0.f_ffree);
    let used0 = used(&st0).unwrap();
    assert!(used0 >= 1, "the root directory is an inode");
    fs::create_dir_all(m.p("d/e")).unwrap();
    for i in 0..5 {
        fs::write(m.p(&format!("d/f{i}")), b"x").unwrap();
    }
    std::os::unix::fs::symlink("d/f0", m.p("l")).unwrap();
    let st1 = statvfs(&m.mnt);
    assert!(st1.f_ffree <= st1.f_files, "f_ffree {} > f_files {}", st1.f_ffree, st1.f_files);
    // 2 directories, 5 data sets, 1 symlink
    assert_eq!(used(&st1).unwrap(), used0 + 8, "IUsed counts what was created: {st0:?} -> {st1:?}");
    // and df agrees (no negative IUsed)
    let out = std::process::Command::new("df").args(["--output=itotal,iused,iavail"]).arg(&m.mnt).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let row: Vec<i128> =
        text.lines().nth(1).unwrap_or("").split_whitespace().map(|w| w.parse().unwrap_or(-1)).collect();
    assert!(out.status.success() && row.len() == 3, "df: {text} {}", String::from_utf8_lossy(&out.stderr));
    assert!(row[1] >= 8 && row[2] <= row[0] && row[0] == row[1] + row[2], "df -i: {text}");
    for i in 0..5 {
        fs::remove_file(m.p(&format!("d/f{i}"))).unwrap();
    }
    assert_eq!(used(&statvfs(&m.mnt)).unwrap(), used0 + 3, "unlinks give inodes back");
}

#[test]
fn fallocate_modes() {
    let (_tp, m) = setup();
    let f = OpenOptions::new().read(true).write(true).create(true).truncate(true).open(m.p("f")).unwrap();
    // mode 0 grows the size, reads zeros
    fallocate(&f, 0, 0, 1 << 20).unwrap();
    assert_eq!(f.metadata().unwrap().len(), 1 << 20);
    assert!(read_all(&m.p("f")).iter().all(|&b| b == 0));
    let ds = data_set(&m.mnt, "/f");
    assert!(ds["allocated_tracks"].as_u64().unwrap() >= 16, "fallocate allocates: {ds}");
    // KEEP_SIZE: space beyond EOF, size unchanged
    fallocate(&f, libc::FALLOC_FL_KEEP_SIZE, 1 << 20, 1 << 20).unwrap();
    assert_eq!(f.metadata().unwrap().len(), 1 << 20, "KEEP_SIZE keeps size");
    // write real data, then punch a hole in the middle
    let data = pattern(1 << 20, 13);
    f.write_all_at(&data, 0).unwrap();
    fallocate(&f, libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE, 100_000, 300_000).unwrap();
    assert_eq!(f.metadata().unwrap().len(), 1 << 20, "punch keeps size");
    let got = read_all(&m.p("f"));
    assert_bytes_eq(&got[..100_000], &data[..100_000], "before hole");
    assert!(got[100_000..400_000].iter().all(|&b| b == 0), "hole reads zeros");
    assert_bytes_eq(&got[400_000..], &data[400_000..], "after hole");
    // mode 0 over existing data keeps it and can grow
    fallocate(&f, 0, 500_000, 2 << 20).unwrap();
    assert_eq!(f.metadata().unwrap().len(), 500_000 + (2 << 20));
    let got = read_all(&m.p("f"));
    assert_bytes_eq(&got[400_000..1 << 20], &data[400_000..], "fallocate keeps data");
    assert!(got[1 << 20..].iter().all(|&b| b == 0));
}

// ---------------------------------------------------------------- errors

#[test]
fn name_too_long() {
    let (_tp, m) = setup();
    let ok = "n".repeat(255);
    let bad = "n".repeat(256);
    fs::write(m.p(&ok), b"x").unwrap();
    assert_eq!(read_all(&m.p(&ok)), b"x");
    assert_errno(File::create(m.p(&bad)), libc::ENAMETOOLONG, "create 256-byte name");
    assert_errno(fs::create_dir(m.p(&bad)), libc::ENAMETOOLONG, "mkdir 256-byte name");
    assert_errno(fs::rename(m.p(&ok), m.p(&bad)), libc::ENAMETOOLONG, "rename to 256-byte name");
    assert_errno(std::os::unix::fs::symlink("x", m.p(&bad)), libc::ENAMETOOLONG, "symlink");
    assert_errno(fs::hard_link(m.p(&ok), m.p(&bad)), libc::ENAMETOOLONG, "link");
    let e = fs::metadata(m.p(&bad)).expect_err("stat of a 256-byte name");
    assert!(matches!(e.raw_os_error(), Some(libc::ENAMETOOLONG) | Some(libc::ENOENT)), "stat of a 256-byte name: {e}");
    // multi-byte characters: 255 bytes is the limit, not 255 characters
    let utf = "é".repeat(128); // 256 bytes
    assert_errno(File::create(m.p(&utf)), libc::ENAMETOOLONG, "256-byte UTF-8 name");
}

#[test]
fn eisdir_enotdir() {
    let (_tp, m) = setup();
    fs::create_dir(m.p("d")).unwrap();
    fs::write(m.p("f"), b"x").unwrap();
    assert_errno(OpenOptions::new().write(true).open(m.p("d")), libc::EISDIR, "open dir for write");
    assert_errno(File::create(m.p("d")), libc::EISDIR, "create over dir");
    assert_errno(File::open(m.p("f/x")), libc::ENOTDIR, "path through a file");
    assert_errno(File::create(m.p("f/x")), libc::ENOTDIR, "create under a file");
    assert_errno(fs::create_dir(m.p("f/x")), libc::ENOTDIR, "mkdir under a file");
    assert_errno(fs::read_dir(m.p("f")), libc::ENOTDIR, "readdir of a file");
    // reading a directory handle
    let dirf = File::open(m.p("d")).unwrap();
    let mut buf = [0u8; 4];
    assert_errno((&dirf).read(&mut buf), libc::EISDIR, "read(2) on a directory");
}

#[test]
fn enospc_when_volume_full() {
    let tp = TestPool::new("64K", &[("V1", "1M")]);
    let m = tp.mount();
    let mut f = File::create(m.p("big")).unwrap();
    let chunk = vec![0x5Au8; 64 * 1024];
    let mut written = 0usize;
    let err = loop {
        match f.write_all(&chunk) {
            Ok(()) => written += chunk.len(),
            Err(e) => break e,
        }
        if written > (4 << 20) {
            panic!("wrote {written} bytes to a 1 MiB pool without ENOSPC");
        }
    };
    assert_eq!(errno(&err), libc::ENOSPC, "error when full: {err}");
    assert!(written <= 1 << 20);
    drop(f);
    // a write or fallocate that needs tracks the pool does not have fails, changing nothing
    let size_before = fs::metadata(m.p("big")).unwrap().len();
    let g = OpenOptions::new().write(true).open(m.p("big")).unwrap();
    assert_errno(g.write_all_at(b"x", 7 << 20), libc::ENOSPC, "write far past capacity");
    let f2 = OpenOptions::new().read(true).write(true).open(m.p("big")).unwrap();
    assert_errno(fallocate(&f2, 0, 0, 8 << 20), libc::ENOSPC, "fallocate past capacity");
    drop((g, f2));
    assert_eq!(fs::metadata(m.p("big")).unwrap().len(), size_before, "size unchanged by refused growth");
    // what was acknowledged is intact
    let got = read_all(&m.p("big"));
    assert!(got.len() >= written, "size {} < acknowledged {written}", got.len());
    assert!(got[..written].iter().all(|&b| b == 0x5A), "acknowledged bytes intact");
    // the file system still works after freeing space
    fs::remove_file(m.p("big")).unwrap();
    fs::write(m.p("small"), b"ok").unwrap();
    assert_eq!(read_all(&m.p("small")), b"ok");
    m.unmount();
    fsck_clean(&tp.pool);
}

// ---------------------------------------------------------------- .ferry

#[test]
fn ferry_dir_is_reserved() {
    let (_tp, m) = setup();
    assert!(fs::metadata(m.p(".ferry")).unwrap().is_dir(), ".ferry is a directory");
    assert!(File::create(m.p(".ferry")).is_err(), "create /.ferry must fail");
    assert!(fs::create_dir(m.p(".ferry")).is_err(), "mkdir /.ferry must fail");
    assert!(File::create(m.p(".ferry/mine")).is_err(), "create in .ferry must fail");
    assert!(fs::create_dir(m.p(".ferry/sub")).is_err(), "mkdir in .ferry must fail");
    assert!(!m.p(".ferry/mine").exists() && !m.p(".ferry/sub").exists());
    fs::write(m.p("f"), b"x").unwrap();
    fs::create_dir(m.p("d")).unwrap();
    assert!(fs::rename(m.p("f"), m.p(".ferry/f")).is_err(), "rename into .ferry");
    assert!(fs::rename(m.p("d"), m.p(".ferry")).is_err(), "rename over /.ferry");
    assert!(fs::rename(m.p(".ferry"), m.p("moved")).is_err(), "rename .ferry away");
    assert!(fs::rename(m.p(".ferry/status"), m.p("stolen")).is_err(), "rename status out");
    assert!(fs::remove_file(m.p(".ferry/status")).is_err(), "unlink status");
    assert!(fs::remove_dir(m.p(".ferry")).is_err(), "rmdir .ferry");
    assert!(fs::hard_link(m.p("f"), m.p(".ferry/l")).is_err(), "link into .ferry");
    assert!(std::os::unix::fs::symlink("x", m.p(".ferry")).is_err(), "symlink named .ferry");
    assert!(std::os::unix::fs::symlink("x", m.p(".ferry/s")).is_err(), "symlink in .ferry");
    assert_eq!(read_all(&m.p("f")), b"x");
    assert!(m.p("d").is_dir());
    assert!(m.p(".ferry/status").exists());
    // a .ferry below the root is an ordinary name
    fs::create_dir(m.p("d/.ferry")).unwrap();
    fs::write(m.p("d/.ferry/x"), b"ok").unwrap();
    assert_eq!(read_all(&m.p("d/.ferry/x")), b"ok");
    // no data set is recorded under /.ferry
    let ls = ls_json(&m.mnt);
    for d in ls["data_sets"].as_array().unwrap() {
        assert!(!d["path"].as_str().unwrap().starts_with("/.ferry/"), "{d}");
    }
}

#[test]
fn ferry_status_is_json() {
    let tp = TestPool::new("64K", &[("V1", "8M"), ("V2", "4M")]);
    let m = tp.mount();
    fs::write(m.p("f"), vec![1u8; 100_000]).unwrap();
    let text = fs::read_to_string(m.p(".ferry/status")).unwrap();
    let st = parse_json(&text);
    assert_eq!(st["track_size_bytes"], 65536);
    assert_eq!(st["pid"].as_i64().unwrap() as i32, m.daemon_pid());
    let mp = fs::canonicalize(&m.mnt).unwrap();
    assert_eq!(st["mountpoint"].as_str().unwrap(), mp.to_str().unwrap());
    let pool = fs::canonicalize(&tp.pool).unwrap();
    assert_eq!(st["pool"].as_str().unwrap(), pool.to_str().unwrap());
    let vols = st["volumes"].as_array().unwrap();
    let names: Vec<&str> = vols.iter().map(|v| v["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["V1", "V2"]);
    let used: u64 = vols.iter().map(|v| v["tracks_used"].as_u64().unwrap()).sum();
    assert!(used >= 2, "100000 bytes need 2 tracks, used {used}");
    assert!(st["jobs"].as_array().unwrap().is_empty());
    // stat size is consistent with what read returns (no truncated JSON)
    let mut f = File::open(m.p(".ferry/status")).unwrap();
    let mut all = String::new();
    f.read_to_string(&mut all).unwrap();
    parse_json(&all);
}

// ---------------------------------------------------------------- permissions

/// Runs `sh -c SCRIPT` as uid/gid 65534 with no supplementary groups.
fn as_nobody(script: &str) -> std::process::Output {
    Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "sh", "-c", script])
        .output()
        .expect("spawn setpriv")
}

#[test]
fn other_user_permissions() {
    let tp = TestPool::new("64K", &[("V1", "64M")]);
    // the other user must be able to reach the mountpoint
    fs::set_permissions(tp.dir(), fs::Permissions::from_mode(0o755)).unwrap();
    let m = tp.mount();
    fs::set_permissions(&m.mnt, fs::Permissions::from_mode(0o755)).unwrap();
    fs::create_dir(m.p("home")).unwrap();
    std::os::unix::fs::chown(m.p("home"), Some(NOBODY), Some(NOBODY)).unwrap();
    fs::write(m.p("secret"), b"root only").unwrap();
    fs::set_permissions(m.p("secret"), fs::Permissions::from_mode(0o600)).unwrap();
    fs::write(m.p("public"), b"world readable").unwrap();
    fs::set_permissions(m.p("public"), fs::Permissions::from_mode(0o644)).unwrap();

    let home = m.p("home");
    let out = as_nobody(&format!("echo mine > '{0}/own' && mkdir '{0}/sub' && cat '{0}/own'", home.display()));
    assert!(out.status.success(), "other user cannot write its own dir: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "mine\n");
    let md = fs::metadata(m.p("home/own")).unwrap();
    assert_eq!((md.uid(), md.gid()), (NOBODY, NOBODY), "new file owned by its creator");
    assert_eq!(fs::metadata(m.p("home/sub")).unwrap().uid(), NOBODY);

    let out = as_nobody(&format!("cat '{}'", m.p("secret").display()));
    assert!(!out.status.success(), "other user read a 0600 root file");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("Permission denied"), "expected EACCES, got: {err}");

    let out = as_nobody(&format!("cat '{}'", m.p("public").display()));
    assert!(out.status.success(), "other user cannot read a 0644 file: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "world readable");

    let out = as_nobody(&format!("echo x >> '{}'", m.p("public").display()));
    assert!(!out.status.success(), "other user appended to a 0644 root file");
    assert!(String::from_utf8_lossy(&out.stderr).contains("Permission denied"));

    let out = as_nobody(&format!("touch '{}'", m.p("intruder").display()));
    assert!(!out.status.success(), "other user created a file in root's 0755 dir");
    assert!(!m.p("intruder").exists());

    let out = as_nobody(&format!("chmod 777 '{}'", m.p("secret").display()));
    assert!(!out.status.success(), "other user chmod'ed root's file");
    assert_eq!(fs::metadata(m.p("secret")).unwrap().mode() & 0o777, 0o600);
    assert_eq!(read_all(&m.p("secret")), b"root only");
}

// ---------------------------------------------------------------- mmap, concurrency

#[test]
fn mmap_read_and_shared_write() {
    use std::os::fd::AsRawFd;
    let (_tp, m) = setup();
    let data = pattern(200_000, 14);
    fs::write(m.p("f"), &data).unwrap();
    let f = OpenOptions::new().read(true).write(true).open(m.p("f")).unwrap();
    let len = data.len();
    // read-only private mapping (what git and many readers do)
    // SAFETY: a private read-only mapping of a file this test owns, of its length.
    let p = unsafe { libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ, libc::MAP_PRIVATE, f.as_raw_fd(), 0) };
    assert_ne!(p, libc::MAP_FAILED, "mmap PROT_READ MAP_PRIVATE: errno {}", last_errno());
    // SAFETY: a private read-only mapping of a file this test owns, of its length.
    let got = unsafe { std::slice::from_raw_parts(p as *const u8, len) }.to_vec();
    // SAFETY: a private read-only mapping of a file this test owns, of its length.
    unsafe { libc::munmap(p, len) };
    assert_bytes_eq(&got, &data, "mmap read");
    // shared writable mapping, msync, read back through read(2)
    // SAFETY: a private read-only mapping of a file this test owns, of its length.
    let p = unsafe {
        libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_SHARED, f.as_raw_fd(), 0)
    };
    assert_ne!(p, libc::MAP_FAILED, "mmap MAP_SHARED rw: errno {}", last_errno());
    // SAFETY: the mapping made above, unmapped once.
    unsafe {
        std::ptr::copy_nonoverlapping(b"MMAP".as_ptr(), (p as *mut u8).add(70_000), 4);
        assert_eq!(libc::msync(p, len, libc::MS_SYNC), 0, "msync errno {}", last_errno());
        libc::munmap(p, len);
    }
    drop(f);
    let mut want = data.clone();
    want[70_000..70_004].copy_from_slice(b"MMAP");
    assert_bytes_eq(&read_all(&m.p("f")), &want, "after msync");
}

#[test]
fn concurrent_writers_on_distinct_and_shared_files() {
    let (_tp, m) = setup();
    let shared = File::create(m.p("shared")).unwrap();
    shared.set_len(8 * 256 * 1024).unwrap();
    drop(shared);
    std::thread::scope(|sc| {
        for t in 0..8u64 {
            let m = &m;
            sc.spawn(move || {
                // own file
                let data = pattern(500_000, 300 + t);
                let mut f = File::create(m.p(&format!("own{t}"))).unwrap();
                for c in data.chunks(10_000) {
                    f.write_all(c).unwrap();
                }
                drop(f);
                // own region of a shared file, written in small pieces
                let f = OpenOptions::new().write(true).open(m.p("shared")).unwrap();
                let region = pattern(256 * 1024, 400 + t);
                for (i, c) in region.chunks(4096).enumerate() {
                    f.write_all_at(c, t * 256 * 1024 + (i * 4096) as u64).unwrap();
                }
            });
        }
    });
    for t in 0..8u64 {
        assert_bytes_eq(&read_all(&m.p(&format!("own{t}"))), &pattern(500_000, 300 + t), &format!("own{t}"));
    }
    let all = read_all(&m.p("shared"));
    assert_eq!(all.len(), 8 * 256 * 1024);
    for t in 0..8usize {
        let r = &all[t * 256 * 1024..(t + 1) * 256 * 1024];
        assert_bytes_eq(r, &pattern(256 * 1024, 400 + t as u64), &format!("shared region {t}"));
    }
}

#[test]
fn concurrent_appenders_lose_nothing() {
    let (_tp, m) = setup();
    File::create(m.p("log")).unwrap();
    std::thread::scope(|sc| {
        for t in 0..4u8 {
            let m = &m;
            sc.spawn(move || {
                let mut f = OpenOptions::new().append(true).open(m.p("log")).unwrap();
                for _ in 0..200 {
                    f.write_all(&[b'a' + t; 100]).unwrap();
                }
            });
        }
    });
    let got = read_all(&m.p("log"));
    assert_eq!(got.len(), 4 * 200 * 100, "O_APPEND writes from 4 threads");
    for rec in got.chunks(100) {
        assert!(rec.iter().all(|&b| b == rec[0]), "interleaved O_APPEND record");
    }
    for t in 0..4u8 {
        assert_eq!(got.iter().filter(|&&b| b == b'a' + t).count(), 200 * 100);
    }
}

// ---------------------------------------------------------------- what tools rely on

#[test]
fn large_sequential_io() {
    let (_tp, m) = setup();
    let data = pattern(24 << 20, 15);
    {
        let mut f = File::create(m.p("big")).unwrap();
        for c in data.chunks(1 << 20) {
            f.write_all(c).unwrap();
        }
        f.sync_all().unwrap();
    }
    let mut f = File::open(m.p("big")).unwrap();
    let mut got = Vec::with_capacity(data.len());
    f.read_to_end(&mut got).unwrap();
    assert_bytes_eq(&got, &data, "24 MiB read back");
}

#[test]
fn copy_within_the_mount() {
    // std's copy uses copy_file_range, which the kernel may pass to the file system
    let (_tp, m) = setup();
    let data = pattern(1_000_003, 16);
    fs::write(m.p("src"), &data).unwrap();
    let n = fs::copy(m.p("src"), m.p("dst")).unwrap();
    assert_eq!(n, data.len() as u64);
    assert_bytes_eq(&read_all(&m.p("dst")), &data, "copy");
    // and onto an existing, longer file
    fs::write(m.p("dst2"), vec![9u8; 2_000_000]).unwrap();
    fs::copy(m.p("src"), m.p("dst2")).unwrap();
    assert_bytes_eq(&read_all(&m.p("dst2")), &data, "copy over a longer file");
}

#[test]
fn seek_data_and_hole() {
    use std::os::fd::AsRawFd;
    let (_tp, m) = setup();
    fs::write(m.p("f"), pattern(100_000, 17)).unwrap();
    let f = File::open(m.p("f")).unwrap();
    // SAFETY: lseek on a file descriptor this test owns.
    let d = unsafe { libc::lseek(f.as_raw_fd(), 0, libc::SEEK_DATA) };
    assert_eq!(d, 0, "SEEK_DATA at 0 of a written file, errno {}", last_errno());
    // SAFETY: lseek on a file descriptor this test owns.
    let h = unsafe { libc::lseek(f.as_raw_fd(), 0, libc::SEEK_HOLE) };
    assert!(h > 0 && h <= 100_000, "SEEK_HOLE returned {h}");
    // SAFETY: lseek on a file descriptor this test owns.
    let past = unsafe { libc::lseek(f.as_raw_fd(), 200_000, libc::SEEK_DATA) };
    assert_eq!(past, -1);
    assert_eq!(last_errno(), libc::ENXIO, "SEEK_DATA past EOF");
}

#[test]
fn xattr_calls_on_a_new_file_find_none() {
    // cp -a and rsync -X ask first; a new file lists no attributes and has none of them
    // (tests/xattr.rs does the rest)
    let (_tp, m) = setup();
    fs::write(m.p("f"), b"x").unwrap();
    let c = cpath(&m.p("f"));
    let mut buf = [0u8; 256];
    // SAFETY: valid C strings and a buffer of the length passed.
    let n = unsafe { libc::listxattr(c.as_ptr(), buf.as_mut_ptr() as *mut libc::c_char, buf.len()) };
    assert_eq!(n, 0, "listxattr of a new file, errno {}", last_errno());
    let name = CString::new("user.test").unwrap();
    // SAFETY: valid C strings and a buffer of the length passed.
    let n = unsafe { libc::getxattr(c.as_ptr(), name.as_ptr(), buf.as_mut_ptr() as *mut libc::c_void, buf.len()) };
    assert_eq!(n, -1);
    let e = last_errno();
    assert_eq!(e, libc::ENODATA, "getxattr of a missing attribute");
}

#[test]
fn directory_times_follow_changes() {
    let (_tp, m) = setup();
    fs::create_dir(m.p("d")).unwrap();
    let old = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000_000);
    let set_old = || {
        File::open(m.p("d")).unwrap().set_modified(old).unwrap();
        assert_eq!(fs::metadata(m.p("d")).unwrap().mtime(), 1_000_000_000);
    };
    set_old();
    File::create(m.p("d/f")).unwrap();
    assert!(fs::metadata(m.p("d")).unwrap().mtime() > 1_000_000_000, "create updates the parent's mtime");
    set_old();
    fs::rename(m.p("d/f"), m.p("d/g")).unwrap();
    assert!(fs::metadata(m.p("d")).unwrap().mtime() > 1_000_000_000, "rename updates the parent's mtime");
    set_old();
    fs::remove_file(m.p("d/g")).unwrap();
    assert!(fs::metadata(m.p("d")).unwrap().mtime() > 1_000_000_000, "unlink updates the parent's mtime");
    // chmod changes ctime, not mtime
    fs::write(m.p("h"), b"x").unwrap();
    File::options().write(true).open(m.p("h")).unwrap().set_modified(old).unwrap();
    let before = fs::metadata(m.p("h")).unwrap();
    fs::set_permissions(m.p("h"), fs::Permissions::from_mode(0o600)).unwrap();
    let after = fs::metadata(m.p("h")).unwrap();
    assert_eq!(after.mtime(), 1_000_000_000, "chmod keeps mtime");
    assert!(
        (after.ctime(), after.ctime_nsec()) >= (before.ctime(), before.ctime_nsec()),
        "chmod must not move ctime backwards"
    );
}

#[test]
fn open_handle_survives_rename_and_rename_between_links_is_a_no_op() {
    let (_tp, m) = setup();
    fs::create_dir(m.p("d")).unwrap();
    let f = OpenOptions::new().read(true).write(true).create(true).truncate(true).open(m.p("a")).unwrap();
    f.write_all_at(b"before", 0).unwrap();
    fs::rename(m.p("a"), m.p("d/b")).unwrap();
    f.write_all_at(b"AFTER!", 6).unwrap();
    drop(f);
    assert_eq!(read_all(&m.p("d/b")), b"beforeAFTER!");
    // two names of one inode: rename one onto the other changes nothing
    fs::hard_link(m.p("d/b"), m.p("c")).unwrap();
    fs::rename(m.p("c"), m.p("d/b")).unwrap();
    assert!(m.p("c").exists() && m.p("d/b").exists(), "rename between links of one inode is a no-op");
    assert_eq!(fs::metadata(m.p("c")).unwrap().nlink(), 2);
}

#[test]
fn write_to_read_only_handle_is_ebadf() {
    let (_tp, m) = setup();
    fs::write(m.p("f"), b"abc").unwrap();
    let mut f = File::open(m.p("f")).unwrap();
    assert_errno(f.write(b"x"), libc::EBADF, "write on O_RDONLY");
    assert_eq!(read_all(&m.p("f")), b"abc");
}

// ---------------------------------------------------------------- the harness itself

#[test]
fn harness_unmounts_when_a_test_panics() {
    let tp = TestPool::new("64K", &[("V1", "4M")]);
    let (mnt, pool) = (tp.mnt().to_path_buf(), tp.pool.clone());
    let pid = std::thread::scope(|sc| {
        let (tx, rx) = std::sync::mpsc::channel();
        let tp = &tp;
        let h = sc.spawn(move || {
            let m = tp.mount();
            fs::write(m.p("f"), b"x").unwrap();
            tx.send(m.daemon_pid()).unwrap();
            panic!("deliberate panic with a live mount");
        });
        assert!(h.join().is_err(), "the thread panicked");
        rx.recv().unwrap()
    });
    assert!(!is_mounted(&mnt), "the guard unmounted on panic");
    assert!(!pid_alive(pid), "the daemon is gone");
    fsck_clean(&pool);
}
