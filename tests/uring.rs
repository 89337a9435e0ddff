//! `-o uring`: FUSE over io_uring. The kernel delivers requests to a queue per CPU, served by
//! a thread pinned to it, and the reply goes back with the command that fetches the next
//! request. Everything a mount does must work through it as through /dev/fuse: the bytes,
//! replies given later on another thread (fsync), requests with a payload (writes, names),
//! unmount, and a kill -9 of the daemon.
//!
//! The kernel offers the transport only while the `fuse` module's `enable_uring` parameter is
//! on: these tests turn it on (it changes nothing for mounts that do not ask) and leave it on,
//! since tests run in parallel. On a kernel without the parameter (before 6.14, or built
//! without CONFIG_FUSE_IO_URING) there is nothing to test, and the tests say so.

mod common;

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::thread;

use common::jobs::*;
use common::*;

const ENABLE_URING: &str = "/sys/module/fuse/parameters/enable_uring";

/// Turn the kernel's FUSE over io_uring on; false (after saying why) if this kernel has none.
fn uring_available() -> bool {
    if !Path::new(ENABLE_URING).exists() {
        eprintln!("skipped: this kernel has no FUSE over io_uring ({ENABLE_URING} is missing)");
        return false;
    }
    if fs::read_to_string(ENABLE_URING).unwrap().trim() != "Y" {
        fs::write(ENABLE_URING, "Y").unwrap_or_else(|e| panic!("turn on {ENABLE_URING} (needs root): {e}"));
    }
    true
}

fn mount_uring(tp: &TestPool) -> Mounted {
    mount_at_with(&tp.pool, tp.mnt(), &tp.dir().join("uring.out"), &[], &["-o", "uring"])
}

fn ring_requests(mnt: &Path) -> u64 {
    let st = status(mnt);
    assert_eq!(st["fuse_transport"], "io_uring", "{st}");
    st["fuse_ring_requests"].as_u64().unwrap()
}

#[test]
fn a_uring_mount_serves_every_kind_of_request_through_its_queues() {
    if !uring_available() {
        return;
    }
    let tp = TestPool::new("64K", &[("V1", "256M")]);
    let m = mount_uring(&tp);
    let before = ring_requests(&m.mnt);

    // Writes of every size: one byte, a page, and 9 MiB in one write(2) (more than one
    // request of max_write, so more than one entry's payload).
    let sizes = [1usize, 4096, 9 << 20];
    for (i, &n) in sizes.iter().enumerate() {
        let mut f = File::create(m.p(&format!("f{i}"))).unwrap();
        f.write_all(&pattern(n, i as u64)).unwrap();
        // fsync is answered by a sync worker, not the queue's thread.
        f.sync_all().unwrap();
    }
    // Overwrites in place at odd offsets, and a read that crosses them.
    let f = OpenOptions::new().read(true).write(true).open(m.p("f2")).unwrap();
    f.write_all_at(b"middle", 5 << 20).unwrap();
    f.sync_data().unwrap();
    let mut expect2 = pattern(9 << 20, 2);
    expect2[5 << 20..(5 << 20) + 6].copy_from_slice(b"middle");
    drop(f);
    // Names: directories, renames, links, symlinks, extended attributes, unlink.
    fs::create_dir(m.p("d")).unwrap();
    fs::rename(m.p("f0"), m.p("d/moved")).unwrap();
    fs::hard_link(m.p("d/moved"), m.p("d/link")).unwrap();
    std::os::unix::fs::symlink("moved", m.p("d/sym")).unwrap();
    assert_eq!(fs::read_link(m.p("d/sym")).unwrap(), Path::new("moved"));
    let c = std::ffi::CString::new(m.p("f1").into_os_string().into_encoded_bytes()).unwrap();
    // SAFETY: a valid path and name, and a buffer of the given length.
    let rc = unsafe { libc::setxattr(c.as_ptr(), c"user.colour".as_ptr(), b"teal".as_ptr().cast(), 4, 0) };
    assert_eq!(rc, 0, "setxattr: {}", std::io::Error::last_os_error());
    let mut value = [0u8; 16];
    // SAFETY: as above.
    let n = unsafe { libc::getxattr(c.as_ptr(), c"user.colour".as_ptr(), value.as_mut_ptr().cast(), value.len()) };
    assert_eq!(&value[..n as usize], b"teal");
    let mut names: Vec<_> = fs::read_dir(m.p("d")).unwrap().map(|e| e.unwrap().file_name()).collect();
    names.sort();
    assert_eq!(names, ["link", "moved", "sym"]);
    fs::remove_file(m.p("d/link")).unwrap();

    // The bytes read back (through the mount's cache, then with it dropped).
    let check = |root: &Path| {
        assert_eq!(fs::read(root.join("d/moved")).unwrap(), pattern(1, 0));
        assert_eq!(fs::read(root.join("f1")).unwrap(), pattern(4096, 1));
        assert!(fs::read(root.join("f2")).unwrap() == expect2, "f2 differs");
    };
    check(&m.mnt);
    for f in ["d/moved", "f1", "f2"] {
        uncached(&m.p(f));
    }
    check(&m.mnt);
    let after = ring_requests(&m.mnt);
    assert!(after > before + 50, "the queues carried {} requests for all of that", after - before);
    let mnt = m.mnt.clone();
    m.unmount();

    // And from the pool after a clean unmount, through /dev/fuse.
    let m = tp.mount();
    assert_eq!(status(&m.mnt)["fuse_transport"], "/dev/fuse");
    check(&mnt);
    m.unmount();
}

#[test]
fn writers_on_every_cpu_each_read_back_their_own_bytes() {
    if !uring_available() {
        return;
    }
    let tp = TestPool::new("64K", &[("V1", "256M")]);
    let m = mount_uring(&tp);
    const WRITERS: u64 = 4;
    const BLOCKS: u64 = 256;
    let block = |w: u64, b: u64, round: u64| pattern(4096, w << 32 | b << 8 | round);
    thread::scope(|s| {
        for w in 0..WRITERS {
            let path = m.p(&format!("w{w}"));
            s.spawn(move || {
                let f = OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&path).unwrap();
                let mut rng = Rng::new(w + 1);
                // Three rounds of random 4 KiB overwrites over the file, each synced, each
                // block read back at once (so the reads race other writers' requests).
                for round in 0..3 {
                    for _ in 0..BLOCKS {
                        let b = rng.next() % BLOCKS;
                        f.write_all_at(&block(w, b, round + 1), b * 4096).unwrap();
                        let mut back = vec![0u8; 4096];
                        f.read_exact_at(&mut back, b * 4096).unwrap();
                        assert!(back == block(w, b, round + 1), "writer {w} block {b}: read back differs");
                    }
                    f.sync_all().unwrap();
                }
                // Last: every block once more, in order, so the expected contents are known.
                for b in 0..BLOCKS {
                    f.write_all_at(&block(w, b, 9), b * 4096).unwrap();
                }
                f.sync_all().unwrap();
            });
        }
    });
    for w in 0..WRITERS {
        uncached(&m.p(&format!("w{w}")));
        let mut got = Vec::new();
        File::open(m.p(&format!("w{w}"))).unwrap().read_to_end(&mut got).unwrap();
        assert_eq!(got.len() as u64, BLOCKS * 4096);
        for b in 0..BLOCKS {
            let at = (b * 4096) as usize;
            assert!(got[at..at + 4096] == block(w, b, 9)[..], "writer {w} block {b} after the caches were dropped");
        }
    }
    assert!(ring_requests(&m.mnt) > WRITERS * BLOCKS * 3, "the writes did not go through the queues");
    m.unmount();
}

#[test]
fn a_kill9_of_a_uring_daemon_loses_nothing_synced() {
    if !uring_available() {
        return;
    }
    let tp = TestPool::new("64K", &[("V1", "128M")]);
    let m = mount_uring(&tp);
    let synced = pattern(3 << 20, 7);
    let mut f = File::create(m.p("kept")).unwrap();
    f.write_all(&synced).unwrap();
    f.sync_all().unwrap();
    // Unsynced writes in flight when the daemon dies may be lost, never the synced ones.
    f.write_all(&pattern(1 << 20, 8)).unwrap();
    drop(f);
    ring_requests(&m.mnt);
    let mnt = m.mnt.clone();
    // The kernel ends the connection, and with it the queues' entries: the kill does not hang.
    m.kill9();
    let m = mount_uring(&tp);
    let got = fs::read(mnt.join("kept")).unwrap();
    assert!(got.len() >= synced.len(), "{} bytes survived of {} synced", got.len(), synced.len());
    assert!(got[..synced.len()] == synced[..], "synced bytes differ after the kill -9");
    m.unmount();
}

#[test]
fn replies_written_into_the_entries_show_no_stale_bytes() {
    if !uring_available() {
        return;
    }
    let tp = TestPool::new("64K", &[("V1", "64M")]);
    let m = mount_uring(&tp);
    let before = ring_requests(&m.mnt);
    assert_reads_show_no_stale_bytes(&m.mnt);
    assert!(ring_requests(&m.mnt) > before + 96, "the reads went through the queues");
    m.unmount();
}
