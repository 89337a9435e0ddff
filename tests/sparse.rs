//! Sparse data sets through a real mount: holes take no tracks, st_blocks says what is
//! mapped, SEEK_DATA and SEEK_HOLE find the data, a punched hole frees whole tracks,
//! fallocate allocates and its preallocation is kept, and a migration copies only the data
//! and keeps the holes, also while an application fills and punches holes during it.

mod common;

use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use common::jobs::*;
use common::*;

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;
const GIB: u64 = 1024 * MIB;
/// The pools here have 64 KiB tracks: st_blocks counts 128 per track.
const TRACK: u64 = 64 * KIB;

fn blocks(p: &Path) -> u64 {
    fs::metadata(p).unwrap().blocks()
}

fn used_tracks(target: &Path, vol: &str) -> u64 {
    volume_json(target, vol)["tracks_used"].as_u64().unwrap()
}

/// lseek(fd, offset, whence): the offset, or the errno.
fn seek(f: &File, offset: u64, whence: i32) -> Result<u64, i32> {
    // SAFETY: lseek on a descriptor this test owns.
    let r = unsafe { libc::lseek(f.as_raw_fd(), offset as libc::off_t, whence) };
    if r < 0 {
        Err(std::io::Error::last_os_error().raw_os_error().unwrap())
    } else {
        Ok(r as u64)
    }
}

fn fallocate(f: &File, mode: i32, offset: u64, len: u64) -> Result<(), i32> {
    // SAFETY: fallocate on a descriptor this test owns.
    let r = unsafe { libc::fallocate(f.as_raw_fd(), mode, offset as libc::off_t, len as libc::off_t) };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error().raw_os_error().unwrap())
    }
}

fn read_at(p: &Path, offset: u64, len: usize) -> Vec<u8> {
    let f = File::open(p).unwrap();
    // SAFETY: fadvise on a descriptor this test owns: the read comes from the volumes.
    unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    let mut buf = vec![0xEEu8; len];
    f.read_exact_at(&mut buf, offset).unwrap();
    buf
}

#[test]
fn a_10_gib_sparse_image_lives_on_a_64_mib_pool() {
    let tp = TestPool::new("64K", &[("V1", "64M")]);
    let m = tp.mount();
    let p = m.p("vm.img");
    let f = OpenOptions::new().create_new(true).read(true).write(true).open(&p).unwrap();
    f.set_len(10 * GIB).unwrap();
    assert_eq!(fs::metadata(&p).unwrap().len(), 10 * GIB);
    assert_eq!(blocks(&p), 0, "a hole takes no tracks");
    assert_eq!(used_tracks(tp.mnt(), "V1"), 0);

    // 4 KiB at 5 GiB + 1000 maps the one track around it.
    let at = 5 * GIB + 1000;
    f.write_all_at(&[7u8; 4096], at).unwrap();
    f.sync_all().unwrap();
    assert_eq!(blocks(&p), TRACK / 512, "one track mapped");
    assert_eq!(used_tracks(tp.mnt(), "V1"), 1);
    let track_start = at / TRACK * TRACK;

    // SEEK_DATA and SEEK_HOLE see the track.
    assert_eq!(seek(&f, 0, libc::SEEK_DATA), Ok(track_start));
    assert_eq!(seek(&f, at + 5, libc::SEEK_DATA), Ok(at + 5), "inside data: the offset itself");
    assert_eq!(seek(&f, 0, libc::SEEK_HOLE), Ok(0));
    assert_eq!(seek(&f, track_start, libc::SEEK_HOLE), Ok(track_start + TRACK));
    assert_eq!(seek(&f, track_start + TRACK, libc::SEEK_DATA), Err(libc::ENXIO), "no data after the track");
    assert_eq!(seek(&f, 10 * GIB, libc::SEEK_HOLE), Err(libc::ENXIO), "past the end");

    // The bytes: the write, zeros around it, zeros in the holes.
    let got = read_at(&p, at - 10, 4116);
    assert!(got[..10].iter().all(|&b| b == 0) && got[10..4106].iter().all(|&b| b == 7));
    assert!(got[4106..].iter().all(|&b| b == 0));
    assert!(read_at(&p, GIB, 1 << 20).iter().all(|&b| b == 0));
    drop(f);

    // A remount reads the same catalog: still one track.
    m.unmount();
    let m = tp.mount();
    assert_eq!(blocks(&m.p("vm.img")), TRACK / 512);
    assert_eq!(read_at(&m.p("vm.img"), at, 4096), vec![7u8; 4096]);
    // cp --sparse=always of the image takes no space either (it seeks over the holes).
    let out = std::process::Command::new("cp")
        .args(["--sparse=always", s(&m.p("vm.img")), s(&m.p("copy.img"))])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(blocks(&m.p("copy.img")), TRACK / 512, "the copy maps one track too");
    m.unmount();
}

#[test]
fn a_punched_hole_frees_whole_tracks_and_fallocate_maps_them_again() {
    let tp = TestPool::new("64K", &[("V1", "16M")]);
    let m = tp.mount();
    let p = m.p("f");
    let f = OpenOptions::new().create_new(true).read(true).write(true).open(&p).unwrap();
    let data: Vec<u8> = (0..MIB).map(|i| (i % 251) as u8 + 1).collect();
    f.write_all_at(&data, 0).unwrap();
    f.sync_all().unwrap();
    assert_eq!(blocks(&p), 16 * TRACK / 512);
    let used = used_tracks(tp.mnt(), "V1");

    // Punch 100 KiB .. 600 KiB: tracks 2..9 are whole inside it and are freed; the parts of
    // tracks 1 and 9 read as zeros.
    let (from, to) = (100 * KIB, 600 * KIB);
    fallocate(&f, libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE, from, to - from).unwrap();
    assert_eq!(fs::metadata(&p).unwrap().len(), MIB, "the size stays");
    assert_eq!(blocks(&p), 9 * TRACK / 512, "7 whole tracks were unmapped");
    assert_eq!(used_tracks(tp.mnt(), "V1"), used - 7, "and freed");
    let got = read_at(&p, 0, MIB as usize);
    assert_eq!(&got[..from as usize], &data[..from as usize]);
    assert!(got[from as usize..to as usize].iter().all(|&b| b == 0), "the punched range reads zeros");
    assert_eq!(&got[to as usize..], &data[to as usize..]);
    assert_eq!(seek(&f, from, libc::SEEK_HOLE), Ok(2 * TRACK), "the hole starts at the first whole track");
    assert_eq!(seek(&f, 2 * TRACK, libc::SEEK_DATA), Ok(9 * TRACK));

    // fallocate maps the hole again; it reads zeros.
    fallocate(&f, 0, 2 * TRACK, 7 * TRACK).unwrap();
    assert_eq!(blocks(&p), 16 * TRACK / 512);
    assert!(read_at(&p, 2 * TRACK, 7 * TRACK as usize).iter().all(|&b| b == 0));
    drop(f);
    m.unmount();
    fsck_clean(&tp.pool);
}

/// `fallocate -n` (KEEP_SIZE) past the end is kept: neither pressure from another data set
/// nor a clean unmount takes it back, so a later write into it can't fail with ENOSPC. A
/// truncate gives it back.
#[test]
fn keep_size_preallocation_is_kept_until_a_truncate() {
    // 16 tracks of 64 KiB.
    let tp = TestPool::new("64K", &[("V1", "1M")]);
    let m = tp.mount();
    let p = m.p("log");
    let f = OpenOptions::new().create_new(true).read(true).write(true).open(&p).unwrap();
    fallocate(&f, libc::FALLOC_FL_KEEP_SIZE, 0, 512 * KIB).unwrap();
    assert_eq!((fs::metadata(&p).unwrap().len(), blocks(&p)), (0, 8 * TRACK / 512));
    drop(f);
    m.unmount();
    let m = tp.mount();
    assert_eq!(blocks(&m.p("log")), 8 * TRACK / 512, "a clean unmount kept the preallocation");

    // Another data set takes everything else, and no more.
    let g = File::create(m.p("other")).unwrap();
    let chunk = vec![1u8; TRACK as usize];
    let mut written = 0;
    let err = loop {
        match g.write_all_at(&chunk, written) {
            Ok(()) => written += TRACK,
            Err(e) => break e,
        }
        assert!(written <= MIB, "wrote more than the pool holds");
    };
    assert_eq!(err.raw_os_error(), Some(libc::ENOSPC), "{err}");
    assert_eq!(written, 8 * TRACK, "the other data set got the 8 free tracks");
    drop(g);

    // Writes into the preallocated range succeed.
    let f = OpenOptions::new().read(true).write(true).open(m.p("log")).unwrap();
    let data = vec![9u8; 512 * KIB as usize];
    f.write_all_at(&data, 0).unwrap();
    f.sync_all().unwrap();
    assert_eq!(read_at(&m.p("log"), 0, data.len()), data);
    // A truncate frees it, and the other data set can grow again.
    f.set_len(0).unwrap();
    assert_eq!(blocks(&m.p("log")), 0);
    drop(f);
    let g = OpenOptions::new().write(true).open(m.p("other")).unwrap();
    g.write_all_at(&chunk, written).unwrap();
    drop(g);
    m.unmount();
    fsck_clean(&tp.pool);
}

/// A migration copies only the mapped tracks, and the data set keeps its holes on the
/// target: the same st_blocks, the same SEEK_DATA answers, the same bytes.
#[test]
fn a_migration_keeps_the_holes() {
    let tp = TestPool::new("64K", &[("V1", "64M"), ("V2", "64M")]);
    let m = tp.mount();
    let p = m.p("sparse");
    let f = OpenOptions::new().create_new(true).read(true).write(true).open(&p).unwrap();
    f.set_len(100 * GIB).unwrap();
    let offsets = [0, 3 * MIB + 17, GIB, 50 * GIB - 100, 100 * GIB - 4096];
    for (k, &at) in offsets.iter().enumerate() {
        f.write_all_at(&vec![k as u8 + 1; 4096], at).unwrap();
    }
    f.sync_all().unwrap();
    let before_blocks = blocks(&p);
    let before_seeks: Vec<_> = offsets.iter().map(|&at| seek(&f, at.saturating_sub(TRACK), libc::SEEK_DATA)).collect();
    drop(f);

    let reply = control(tp.mnt(), "migrate /sparse to V2").unwrap();
    let jobs = reply_jobs(&reply);
    let done = wait_switched(tp.mnt(), &jobs);
    assert!(done[0]["bytes_copied"].as_u64().unwrap() <= 8 * TRACK, "only the mapped tracks were copied: {}", done[0]);
    assert_eq!(placement(tp.mnt(), "/sparse").0, vec!["V2"]);
    assert_eq!(used_tracks(tp.mnt(), "V1"), 0);
    assert_eq!(blocks(&p), before_blocks, "the holes are still holes");
    let f = File::open(&p).unwrap();
    let after_seeks: Vec<_> = offsets.iter().map(|&at| seek(&f, at.saturating_sub(TRACK), libc::SEEK_DATA)).collect();
    assert_eq!(after_seeks, before_seeks);
    drop(f);
    for (k, &at) in offsets.iter().enumerate() {
        assert_eq!(read_at(&p, at, 4096), vec![k as u8 + 1; 4096], "the bytes at {at}");
    }
    assert!(read_at(&p, 2 * GIB, 1 << 20).iter().all(|&b| b == 0));
    m.unmount();
    fsck_clean(&tp.pool);
}

/// While a rate-capped migration runs, an application fills holes, punches holes and writes
/// data: the job converges and switches, and the data set ends as the application left it.
#[test]
fn holes_filled_and_punched_during_a_migration_end_right() {
    let tp = TestPool::new("64K", &[("V1", "64M"), ("V2", "64M")]);
    let m = tp.mount();
    let p = m.p("f");
    const SLOTS: u64 = 64;
    let slot = 2 * TRACK;
    let f = Arc::new(OpenOptions::new().create_new(true).read(true).write(true).open(&p).unwrap());
    f.set_len(SLOTS * slot).unwrap();
    // Every other slot starts with data.
    let mut model: Vec<Option<u8>> = vec![None; SLOTS as usize];
    for k in (0..SLOTS).step_by(2) {
        f.write_all_at(&vec![k as u8 + 1; slot as usize], k * slot).unwrap();
        model[k as usize] = Some(k as u8 + 1);
    }
    f.sync_all().unwrap();
    let reply = control(tp.mnt(), "migrate /f to V2 rate=1M").unwrap();
    let jobs = reply_jobs(&reply);
    let stop = Arc::new(AtomicBool::new(false));
    let app = {
        let (f, stop) = (f.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut model = model;
            let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
            let mut round = 0u32;
            while !stop.load(Ordering::Relaxed) || round < 200 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let k = x % SLOTS;
                let fill = (round % 200) as u8 + 1;
                if x % 3 == 0 {
                    fallocate(&f, libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE, k * slot, slot).unwrap();
                    model[k as usize] = None;
                } else {
                    f.write_all_at(&vec![fill; slot as usize], k * slot).unwrap();
                    model[k as usize] = Some(fill);
                }
                round += 1;
                std::thread::sleep(std::time::Duration::from_millis(2));
            }
            model
        })
    };
    // Let the application work while the job copies, then stop it.
    std::thread::sleep(std::time::Duration::from_millis(1500));
    stop.store(true, Ordering::Relaxed);
    let model = app.join().unwrap();
    let done = wait_switched(tp.mnt(), &jobs);
    assert_eq!(done[0]["phase"], "switched", "{}", done[0]);
    assert_eq!(placement(tp.mnt(), "/f").0, vec!["V2"]);
    let got = read_at(&p, 0, (SLOTS * slot) as usize);
    let mut mapped = 0;
    for (k, want) in model.iter().enumerate() {
        let bytes = &got[k * slot as usize..(k + 1) * slot as usize];
        match want {
            Some(v) => {
                assert!(bytes.iter().all(|b| b == v), "slot {k}: want {v}, got {:?}..", &bytes[..8]);
                mapped += 2;
            }
            None => assert!(bytes.iter().all(|&b| b == 0), "slot {k} was punched, reads {:?}..", &bytes[..8]),
        }
    }
    assert_eq!(blocks(&p), mapped * TRACK / 512, "punched slots are holes on the target too");
    assert_eq!(used_tracks(tp.mnt(), "V1"), 0);
    drop(f);
    m.unmount();
    fsck_clean(&tp.pool);
}

#[test]
fn holes_and_short_files_read_back_without_stale_bytes() {
    let tp = TestPool::new("64K", &[("V1", "64M")]);
    let m = tp.mount();
    assert_reads_show_no_stale_bytes(&m.mnt);
    m.unmount();
}
