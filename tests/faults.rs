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
