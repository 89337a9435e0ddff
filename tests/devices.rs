//! Volumes on block devices, tried on loop devices (losetup) over sparse files: data sets
//! move between file and device volumes, devices merge, a device in use or holding a file
//! system or another pool is refused, a pool finds its devices after their names change, and
//! a new device's tracks read as zeros.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;

/// A loop device over a sparse file; detached when dropped, even when a test fails.
struct Loop {
    dev: PathBuf,
    backing: PathBuf,
}

impl Loop {
    fn new(dir: &Path, name: &str, size: u64) -> Loop {
        let backing = dir.join(format!("{name}.raw"));
        fs::File::create(&backing).unwrap().set_len(size).unwrap();
        Loop::attach(&backing)
    }

    fn attach(backing: &Path) -> Loop {
        let out = Command::new("losetup").args(["-f", "--show"]).arg(backing).output().expect("losetup runs");
        assert!(out.status.success(), "losetup: {}", String::from_utf8_lossy(&out.stderr));
        let dev = PathBuf::from(String::from_utf8(out.stdout).unwrap().trim());
        Loop { dev, backing: backing.to_path_buf() }
    }

    fn s(&self) -> &str {
        s(&self.dev)
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.dev).status();
    }
}

fn have_loop() -> bool {
    Path::new("/dev/loop-control").exists()
}

fn write_sync(p: &Path, data: &[u8]) {
    use std::io::Write;
    let mut f = fs::File::create(p).unwrap();
    f.write_all(data).unwrap();
    f.sync_all().unwrap();
}

/// Move a data set onto `vol`, unless the allocator put it there already.
fn put_on(mnt: &Path, path: &str, vol: &str) {
    if volumes_of(mnt, path) != [vol] {
        ferry_ok(&["migrate", s(mnt), path, "--to", vol, "--wait"]);
    }
    assert_eq!(volumes_of(mnt, path), [vol]);
}

fn volumes_of(target: &Path, path: &str) -> Vec<String> {
    data_set(target, path)["volumes"].as_array().unwrap().iter().map(|v| v.as_str().unwrap().to_string()).collect()
}

#[test]
fn file_and_device_volumes_trade_data_sets_and_two_devices_merge_into_a_third() {
    if !have_loop() {
        eprintln!("SKIPPED: no loop devices");
        return;
    }
    let tp = TestPool::new("64K", &[("F1", "32M")]);
    let (d1, d2, d3) =
        (Loop::new(tp.dir(), "d1", 16 << 20), Loop::new(tp.dir(), "d2", 16 << 20), Loop::new(tp.dir(), "d3", 40 << 20));
    let out = ferry_ok(&["volume", "add", s(&tp.pool), "D1", "--path", d1.s()]);
    assert!(out.contains(&format!("at {}", d1.s())), "{out}");
    // The size is the device's, less its 4 KiB label, in whole tracks.
    assert_eq!(volume_json(&tp.pool, "D1")["size_bytes"], ((16u64 << 20) - 65536));
    let m = tp.mount();
    // A device joins the running mount too.
    ferry_ok(&["volume", "add", s(tp.mnt()), "D2", "--path", d2.s()]);
    let a = pattern(3 << 20, 1);
    let b = pattern(2 << 20, 2);
    write_sync(&m.p("a"), &a);
    write_sync(&m.p("b"), &b);
    put_on(tp.mnt(), "/a", "D1");
    put_on(tp.mnt(), "/b", "D2");
    put_on(tp.mnt(), "/a", "F1");
    put_on(tp.mnt(), "/a", "D1");
    ferry_ok(&["volume", "add", s(tp.mnt()), "D3", "--path", d3.s()]);
    ferry_ok(&["merge", s(tp.mnt()), "D1", "D2", "--into", "D3", "--wait"]);
    assert_eq!(volumes_of(tp.mnt(), "/a"), ["D3"]);
    assert_eq!(volumes_of(tp.mnt(), "/b"), ["D3"]);
    assert_bytes_eq(&fs::read(m.p("a")).unwrap(), &a, "a after the merge");
    assert_bytes_eq(&fs::read(m.p("b")).unwrap(), &b, "b after the merge");
    let out = ferry_ok(&["volume", "retire", s(tp.mnt()), "D2"]);
    assert!(out.contains("keeps its bytes; its label is wiped"), "{out}");
    m.unmount();
    let m = tp.mount();
    assert_bytes_eq(&fs::read(m.p("a")).unwrap(), &a, "a after a remount");
    m.unmount();
    // The retired device is free to be added again, to this pool or another.
    ferry_ok(&["volume", "add", s(&tp.pool), "D2b", "--path", d2.s()]);
    // The pool's fsck at its drop needs its devices attached.
    drop(tp);
}

#[test]
fn a_device_in_use_holding_a_file_system_or_another_pool_is_refused() {
    if !have_loop() {
        eprintln!("SKIPPED: no loop devices");
        return;
    }
    let tp = TestPool::new("64K", &[("F1", "8M")]);
    let other = TestPool::new("64K", &[("G1", "8M")]);
    let fsdev = Loop::new(tp.dir(), "fs", 16 << 20);
    let mkfs = Command::new("mkfs.ext4").args(["-q", "-F", fsdev.s()]).status().unwrap();
    assert!(mkfs.success());
    let (code, err) = ferry_err(&["volume", "add", s(&tp.pool), "D1", "--path", fsdev.s()]);
    assert_eq!(code, 3, "a refusal: {err}");
    assert_one_clear_line(&err, "holds a ext4 signature; --force");
    // Mounted, it is in use: refused even with --force.
    let mnt = tp.dir().join("ext4");
    fs::create_dir(&mnt).unwrap();
    assert!(Command::new("mount").arg(fsdev.s()).arg(&mnt).status().unwrap().success());
    let (code, err) = ferry_err(&["volume", "add", s(&tp.pool), "D1", "--path", fsdev.s(), "--force"]);
    let _ = Command::new("umount").arg(&mnt).status();
    assert_eq!(code, 3, "{err}");
    assert_one_clear_line(&err, "is in use");
    // Unmounted, --force takes it.
    ferry_ok(&["volume", "add", s(&tp.pool), "D1", "--path", fsdev.s(), "--force"]);
    let (_, err) = ferry_err(&["volume", "add", s(&tp.pool), "D1b", "--path", fsdev.s()]);
    assert_one_clear_line(&err, "already volume D1 of this pool");
    // Another pool's device.
    let (code, err) = ferry_err(&["volume", "add", s(&other.pool), "G2", "--path", fsdev.s()]);
    assert_eq!(code, 3);
    assert_one_clear_line(&err, "belongs to another ferryfs pool (its volume D1)");
    // An image file still needs a size.
    let (_, err) = ferry_err(&["volume", "add", s(&tp.pool), "F2"]);
    assert_one_clear_line(&err, "--size is needed for an image file");
    // While the pool is mounted, its devices are its own: nobody else opens them exclusively.
    let m = tp.mount();
    let (_, err) = ferry_err(&["volume", "add", s(&other.pool), "G2", "--path", fsdev.s(), "--force"]);
    assert_one_clear_line(&err, "is in use");
    m.unmount();
    drop(tp);
}

#[test]
fn a_pool_finds_its_devices_after_their_names_change() {
    if !have_loop() {
        eprintln!("SKIPPED: no loop devices");
        return;
    }
    let tp = TestPool::new("64K", &[("F1", "8M")]);
    let d1 = Loop::new(tp.dir(), "d1", 16 << 20);
    let d2 = Loop::new(tp.dir(), "d2", 16 << 20);
    ferry_ok(&["volume", "add", s(&tp.pool), "D1", "--path", d1.s()]);
    ferry_ok(&["volume", "add", s(&tp.pool), "D2", "--path", d2.s()]);
    let one = pattern(1 << 20, 11);
    let two = pattern(1 << 20, 12);
    {
        let m = tp.mount();
        write_sync(&m.p("one"), &one);
        write_sync(&m.p("two"), &two);
        put_on(tp.mnt(), "/one", "D1");
        put_on(tp.mnt(), "/two", "D2");
        m.unmount();
    }
    // Detach both and attach them again the other way round: each name now holds the
    // other volume.
    let (b1, b2) = (d1.backing.clone(), d2.backing.clone());
    drop(d1);
    drop(d2);
    let n2 = Loop::attach(&b2);
    let n1 = Loop::attach(&b1);
    let out = ferry_ok(&["fsck", s(&tp.pool)]);
    assert!(out.contains("clean:"), "{out}");
    let m = tp.mount();
    assert_bytes_eq(&fs::read(m.p("one")).unwrap(), &one, "D1's data set");
    assert_bytes_eq(&fs::read(m.p("two")).unwrap(), &two, "D2's data set");
    let log = fs::read_to_string(tp.pool.join("mount.log")).unwrap();
    assert!(log.contains(&format!("volume D1: its device is {} now", n1.s())), "{log}");
    // The catalog now records where each device is: `volume list` shows it.
    assert_eq!(volume_json(tp.mnt(), "D1")["path"], n1.s(), "D1's recorded path follows its device");
    assert_eq!(volume_json(tp.mnt(), "D2")["path"], n2.s(), "D2's recorded path follows its device");
    // Retiring D2 wipes D2's label, wherever D2 is, never D1's.
    put_on(tp.mnt(), "/two", "F1");
    let out = ferry_ok(&["volume", "retire", s(tp.mnt()), "D2"]);
    assert!(out.contains(n2.s()), "{out}");
    m.unmount();
    let m = tp.mount();
    assert_bytes_eq(&fs::read(m.p("one")).unwrap(), &one, "D1's data set after D2 retired");
    m.unmount();
    // A device that is gone: the pool says which volume misses it.
    drop(n1);
    let (_, err) = ferry_err(&["fsck", s(&tp.pool)]);
    assert!(err.contains("volume D1: no device carries its label") || err.contains("problem"), "{err}");
    let a = tp.try_mount();
    assert!(!a.status.success());
    assert!(a.stderr.contains("volume D1: no device carries its label"), "{}", a.stderr);
    tp.corrupted(); // no fsck at the end: the device is gone on purpose
    drop(n2);
}

#[test]
fn a_new_device_reads_as_zeros_where_it_held_old_bytes() {
    if !have_loop() {
        eprintln!("SKIPPED: no loop devices");
        return;
    }
    let tp = TestPool::new("64K", &[]);
    let dir = tp.dir().to_path_buf();
    let backing = dir.join("old.raw");
    fs::write(&backing, pattern(8 << 20, 99)).unwrap();
    let d = Loop::attach(&backing);
    ferry_ok(&["volume", "add", s(&tp.pool), "D1", "--path", d.s(), "--force"]);
    let m = tp.mount();
    write_sync(&m.p("f"), b"head");
    // fallocate maps tracks that were never written (a truncate up would only make a hole).
    let f = fs::OpenOptions::new().write(true).open(m.p("f")).unwrap();
    use std::os::unix::{fs::MetadataExt, io::AsRawFd};
    // SAFETY: fallocate on a descriptor this test owns.
    assert_eq!(unsafe { libc::fallocate(f.as_raw_fd(), 0, 0, 4 << 20) }, 0, "fallocate");
    f.sync_all().unwrap();
    assert!(fs::metadata(m.p("f")).unwrap().blocks() >= (4 << 20) / 512, "the tracks are mapped");
    drop(f);
    let got = fs::read(m.p("f")).unwrap();
    assert_eq!(&got[..4], b"head");
    assert!(got[4..].iter().all(|&b| b == 0), "old bytes of the device leaked into a data set");
    m.unmount();
    drop(tp);
}
