//! I/O errors on a volume image reach the application, lose nothing that was acknowledged,
//! and are latched: a later fsync can't pretend the lost write is safe.
//!
//! The fault is real: the volume image lives on a small tmpfs, so the image is sparse with
//! more nominal size than the tmpfs has room for, and the backing file system runs out of
//! space under the image (ENOSPC from the backing pwrite) while the pool still has free tracks.

mod common;

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;

/// A tmpfs mounted for one test, unmounted on drop.
struct Tmpfs {
    dir: PathBuf,
}

impl Tmpfs {
    fn new(at: &Path, size: &str) -> Option<Tmpfs> {
        fs::create_dir_all(at).unwrap();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(at)
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        ok.then(|| Tmpfs { dir: at.to_path_buf() })
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
    }
}

#[test]
fn backing_file_system_full_fails_the_write_and_keeps_acknowledged_data() {
    let tp = TestPool::new("64K", &[]);
    let Some(tmp) = Tmpfs::new(&tp.dir().join("small"), "2m") else {
        eprintln!("skipping: can't mount a tmpfs here (needs root)");
        return;
    };
    let image = tmp.dir.join("V1.img");
    ferry_ok(&["volume", "add", s(&tp.pool), "V1", "--size", "64M", "--path", s(&image)]);
    let m = tp.mount();

    // 1 MiB fits on the tmpfs: written, fsync'ed, acknowledged.
    let first = pattern(1 << 20, 7);
    {
        let mut f = File::create(m.p("a")).unwrap();
        f.write_all(&first).unwrap();
        f.sync_all().unwrap();
    }
    // The next MiBs do not: the backing pwrite fails with ENOSPC.
    let mut f = OpenOptions::new().write(true).open(m.p("b")).or_else(|_| File::create(m.p("b"))).unwrap();
    let chunk = pattern(256 << 10, 9);
    let mut err = None;
    for _ in 0..16 {
        if let Err(e) = f.write_all(&chunk) {
            err = Some(e);
            break;
        }
    }
    let err = err.expect("writing 4 MiB onto a 2 MiB tmpfs must fail");
    assert!([libc::ENOSPC, libc::EIO].contains(&errno(&err)), "the write fails with ENOSPC or EIO, got {err}");
    // The failure is latched on the volume: fsync must not report success.
    let sync = f.sync_all();
    assert!(sync.is_err(), "fsync after a failed write on the volume must fail");
    drop(f);

    // What was acknowledged before is intact.
    assert_bytes_eq(&fs::read(m.p("a")).unwrap(), &first, "acknowledged data set");
    m.unmount();
    fsck_clean(&tp.pool);
    // The image goes away with the tmpfs: the pool is checked above, not when dropped.
    tp.corrupted();
    drop(tmp);
}

#[test]
fn missing_volume_image_refuses_the_mount_with_one_line() {
    let tp = TestPool::new("64K", &[("V1", "4M")]);
    {
        let m = tp.mount();
        fs::write(m.p("x"), b"data").unwrap();
        m.unmount();
    }
    let img = tp.pool.join("volumes/V1.img");
    fs::rename(&img, tp.pool.join("moved.img")).unwrap();
    let at = try_mount(&tp.pool, tp.mnt());
    assert!(at.guard.is_none(), "mounted a pool whose volume image is missing");
    assert_one_clear_line(&at.stderr, "V1");
    // fsck names the problem too.
    let (_, err) = ferry_err(&["fsck", s(&tp.pool)]);
    assert!(err.contains("problem"), "fsck: {err}");
    // Putting the image back makes everything as before.
    fs::rename(tp.pool.join("moved.img"), &img).unwrap();
    let m = tp.mount();
    assert_eq!(fs::read(m.p("x")).unwrap(), b"data");
}

/// The catalog's own file system fills up: the log append fails, the operation fails with
/// ENOSPC (or EIO), nothing half-done stays in the log, and once there is room again the
/// mount carries on and a remount sees exactly the operations that succeeded.
#[test]
fn full_catalog_file_system_fails_the_op_and_loses_nothing() {
    let outer = tempfile::tempdir().unwrap();
    let Some(tmp) = Tmpfs::new(&outer.path().join("cat"), "4m") else {
        eprintln!("skipping: can't mount a tmpfs here (needs root)");
        return;
    };
    let pool = tmp.dir.join("pool");
    let mnt = outer.path().join("mnt");
    fs::create_dir(&mnt).unwrap();
    ferry_ok(&["init", s(&pool)]);
    // The volume image lives elsewhere: only the catalog is short of room.
    let image = outer.path().join("V1.img");
    ferry_ok(&["volume", "add", s(&pool), "V1", "--size", "64M", "--path", s(&image)]);
    let m = mount_at(&pool, &mnt, &outer.path().join("mount.out"));
    fs::write(m.p("before"), b"made before the catalog filled").unwrap();

    // Fill the tmpfs that holds the catalog.
    let filler = tmp.dir.join("filler");
    {
        let mut f = File::create(&filler).unwrap();
        let block = vec![0u8; 64 << 10];
        while f.write_all(&block).is_ok() {}
    }
    let mut refused = 0;
    let mut made = Vec::new();
    for i in 0..200 {
        let name = format!("after{i}");
        // A create is one catalog op: it either happened and returned, or failed and left nothing.
        match File::create(m.p(&name)) {
            Ok(_) => made.push(name),
            Err(e) => {
                assert!([libc::ENOSPC, libc::EIO].contains(&errno(&e)), "create on a full catalog: {e}");
                refused += 1;
            }
        }
    }
    assert!(refused > 0, "some creates must fail once the catalog's file system is full");
    // Room again: the mount carries on.
    fs::remove_file(&filler).unwrap();
    fs::write(m.p("later"), b"made after room came back").unwrap();
    m.unmount();
    fsck_clean(&pool);

    let m = mount_at(&pool, &mnt, &outer.path().join("mount2.out"));
    assert_eq!(fs::read(m.p("before")).unwrap(), b"made before the catalog filled");
    assert_eq!(fs::read(m.p("later")).unwrap(), b"made after room came back");
    for name in &made {
        assert!(m.p(name).exists(), "{name} was created (acknowledged) before the failures");
    }
    let names: Vec<String> =
        fs::read_dir(&m.mnt).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    let names: Vec<String> = names.into_iter().filter(|n| n != ".ferry").collect();
    assert_eq!(names.len(), made.len() + 2, "exactly the acknowledged creates exist: {names:?}");
    m.unmount();
    fsck_clean(&pool);
    drop(tmp);
}
