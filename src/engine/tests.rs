//! Engine unit tests over in-memory volumes.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::*;
use crate::catalog::model::{Catalog, Meta, NewKind, ROOT_INO};
use crate::catalog::ring;
use crate::geometry::Geometry;
use crate::storage::mem::{FaultyVolume, MemVolume};

pub(crate) fn meta() -> Meta {
    Meta { perm: 0o644, uid: 0, gid: 0, nlink: 1, atime_ns: 0, mtime_ns: 0, ctime_ns: 0 }
}

/// An engine over one volume of 64 tracks of 4 KiB, with a data set at inode 2 (open).
pub(crate) fn engine_with(vol: Arc<dyn StorageFile>, dir: &Path) -> (Arc<Engine>, Arc<FileNode>) {
    engine_of_tracks(vol, dir, 64)
}

/// [`engine_with`], with a volume of `tracks` tracks of 4 KiB.
fn engine_of_tracks(vol: Arc<dyn StorageFile>, dir: &Path, tracks: u64) -> (Arc<Engine>, Arc<FileNode>) {
    let g = Geometry::new(4096).unwrap();
    let mut store = Store::create(dir, Catalog::new(g, meta())).unwrap();
    store
        .commit(Op::AddVolume {
            id: VolumeId(1),
            name: "V1".into(),
            path: "/mem".into(),
            size_bytes: tracks * 4096,
            tracks_total: tracks,
        })
        .unwrap();
    store
        .commit(Op::MakeNode { ino: 2, parent: ROOT_INO, name: b"f".to_vec(), meta: meta(), kind: NewKind::File })
        .unwrap();
    let engine = Arc::new(Engine::new(store, dir.into(), crate::storage::real(), vec![(VolumeId(1), vol)]));
    let node = engine.open(2).unwrap();
    (engine, node)
}

/// The monitor's promise (monitor.rs): with writers hammering a data set while a job
/// copies, re-syncs (and mirrors, once the dirty set stops shrinking) and switches, every
/// block ends with its last acknowledged write, read back from the target volume.
#[test]
fn writes_span_tracks_and_read_back() {
    let dir = tempfile::tempdir().unwrap();
    let (sh, node) = engine_with(Arc::new(MemVolume::new(64 * 4096)), dir.path());
    let data: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
    sh.write(&node, 3000, &data).unwrap();
    assert_eq!(node.size_bytes.load(Ordering::Acquire), 13_000);
    let got = sh.read(&node, 0, 20_000).unwrap();
    assert_eq!(got.len(), 13_000);
    assert!(got[..3000].iter().all(|&b| b == 0), "the gap before the write reads zeros");
    assert_eq!(&got[3000..], &data[..]);
    // Truncate down into a track, then up: the cut bytes read as zeros.
    sh.truncate(2, 5000, 1).unwrap();
    sh.truncate(2, 9000, 2).unwrap();
    let got = sh.read(&node, 0, 20_000).unwrap();
    assert_eq!(&got[3000..5000], &data[..2000]);
    assert!(got[5000..].iter().all(|&b| b == 0));
    assert!(crate::catalog::check::check(&sh.catalog.lock().catalog).problems.is_empty());
}

#[test]
fn full_pool_is_enospc_and_keeps_the_data() {
    let dir = tempfile::tempdir().unwrap();
    let (sh, node) = engine_with(Arc::new(MemVolume::new(64 * 4096)), dir.path());
    sh.write(&node, 0, &[7u8; 60 * 4096]).unwrap();
    let e = sh.write(&node, 60 * 4096, &[8u8; 8 * 4096]).unwrap_err();
    assert_eq!(e.errno(), libc::ENOSPC);
    assert_eq!(node.size_bytes.load(Ordering::Acquire), 60 * 4096);
    assert!(sh.read(&node, 0, 60 * 4096).unwrap().iter().all(|&b| b == 7));
}

#[test]
fn volume_io_error_reaches_the_caller_and_fsync_stays_failed() {
    let dir = tempfile::tempdir().unwrap();
    // Allow a handful of operations (the punch at allocation, a write), then EIO.
    let vol = Arc::new(FaultyVolume::new(MemVolume::new(64 * 4096), 3, libc::EIO));
    let (sh, node) = engine_with(vol, dir.path());
    sh.write(&node, 0, b"acknowledged").unwrap();
    let mut failed = None;
    for i in 1..10u64 {
        if let Err(e) = sh.write(&node, i * 100, b"more") {
            failed = Some(e);
            break;
        }
    }
    let e = failed.expect("the faulty volume fails");
    assert_eq!(e.errno(), libc::EIO);
    assert_eq!(sh.fsync(&node, false).unwrap_err().errno(), libc::EIO, "fsync reports the latched error");
}

/// An engine over a volume with room for a ring, whose data set was written and fsync'd.
fn journal_fsynced(dir: &Path) -> Arc<Engine> {
    let (sh, node) = engine_with(Arc::new(MemVolume::growable(64 * 4096)), dir);
    sh.write(&node, 0, b"journal").unwrap();
    sh.fsync(&node, false).unwrap();
    sh
}

/// An fsync copies the log's tail into the ring past the volume's tracks, and the log is not
/// synced (catalog/ring.rs).
#[test]
fn an_fsync_keeps_the_log_tail_in_the_ring() {
    let dir = tempfile::tempdir().unwrap();
    let sh = journal_fsynced(dir.path());
    let cat = sh.catalog.lock();
    assert_eq!(cat.stats().tail_records, 1);
    assert!(cat.durable_mark() < cat.appended_mark(), "the fsync synced the log");
    let v = cat.catalog.volumes.values().next().unwrap();
    let mut slot = vec![0u8; ring::SLOT_BYTES as usize];
    sh.volume(v.id).unwrap().read_at(&mut slot, ring::slot_offset(v, 0)).unwrap();
    let f = ring::Fragment::decode(&slot).expect("a fragment in the ring's first slot");
    assert!(!f.bytes.is_empty() && f.volume == v.id);
}

/// A directory's fsync after a data set's fsync that copied the log's tail into a ring has
/// nothing left to make durable: it does not sync the log. After a create it does.
#[test]
fn a_directory_fsync_after_a_ring_fsync_costs_no_flush() {
    let dir = tempfile::tempdir().unwrap();
    let sh = journal_fsynced(dir.path());
    let before = sh.catalog.lock().durable_mark();
    sh.fsyncdir().unwrap();
    assert_eq!(sh.catalog.lock().durable_mark(), before, "the directory's fsync synced the log");
    sh.make(ROOT_INO, b"g", 0o644, 0, NewKind::File, 0, 0).unwrap();
    sh.fsyncdir().unwrap();
    let cat = sh.catalog.lock();
    assert_eq!(cat.durable_mark(), cat.appended_mark(), "the create was not made durable");
}

/// The story: on a backing file system with no room past a volume's tracks, the ring's
/// first write failed with ENOSPC, and that failed the fsync and latched the image: every
/// later write of the volume failed too. The ring's room is now reserved at its first use;
/// when that fails, the fsyncs of the volume's data sets sync the log, and nothing fails.
#[test]
fn no_room_for_a_ring_syncs_the_log_and_fails_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (sh, node) = engine_with(Arc::new(MemVolume::new(64 * 4096)), dir.path());
    for i in 0..3u64 {
        sh.write(&node, i * 5000, b"record").unwrap();
        sh.fsync(&node, i % 2 == 0).unwrap();
    }
    let cat = sh.catalog.lock();
    assert_eq!(cat.stats().tail_records, 0, "a ring was written where there is no room");
    assert_eq!(cat.durable_mark(), cat.appended_mark(), "the fsync did not sync the log");
    drop(cat);
    assert_eq!(&sh.read(&node, 10_000, 6).unwrap()[..], b"record");
}

/// The story: recovery rolled a running job back and left starting it again to the mount's
/// last step; a mount that failed after recovery (a dead mount in the way) lost the job for
/// good. Recovery now queues it again in the catalog, so a recovery whose mount never
/// serves still leaves the job for the next one.
#[test]
fn a_job_rolled_back_by_recovery_survives_a_mount_that_never_serves() {
    use crate::catalog::model::JobRec;
    let dir = tempfile::tempdir().unwrap();
    let (sh, node) = engine_with(Arc::new(MemVolume::new(64 * 4096)), dir.path());
    sh.write(&node, 0, &[5u8; 10_000]).unwrap();
    let job = queued_job(7);
    sh.commit(&mut sh.catalog.lock(), Op::JobStart { job }).unwrap();
    sh.sync_log().unwrap();
    drop((sh, node));
    for round in 0..2 {
        // A mount: recovery, then (say) the FUSE mount fails and the process exits.
        let (store, _) = Store::open(dir.path(), true).unwrap();
        let vol: Arc<dyn StorageFile> = Arc::new(MemVolume::new(64 * 4096));
        let e = Engine::new(store, dir.path().into(), crate::storage::real(), vec![(VolumeId(1), vol)]);
        let r = e.recover(true).unwrap();
        assert_eq!(r.jobs_requeued.len(), 1, "round {round}: {r:?}");
        let cat = e.catalog.lock();
        let jobs: Vec<&JobRec> = cat.catalog.jobs.values().collect();
        assert_eq!(jobs.len(), 1, "round {round}: the job is queued again in the catalog");
        assert!(jobs[0].target.is_empty() && !jobs[0].switched && jobs[0].ino == 2);
    }
}

/// The story: the quarantine let recovery forget the tracks it freed without zeroing them
/// on a clean mount. A job stopped by a clean unmount keeps its record; the next mount rolls
/// it back, and its target held a copy of the data set. Those tracks must read as zeros
/// before anything can be handed them.
#[test]
fn recovery_zeroes_a_rolled_back_target_on_a_clean_mount() {
    use crate::geometry::TrackNo;
    use crate::space::Extent;
    let dir = tempfile::tempdir().unwrap();
    let vol = Arc::new(MemVolume::new(64 * 4096));
    let (sh, node) = engine_with(vol.clone(), dir.path());
    sh.write(&node, 0, &[5u8; 4096]).unwrap();
    let job = queued_job(9);
    let target = Extent { volume: VolumeId(1), first: TrackNo(40), count_tracks: 2 };
    {
        let mut cat = sh.catalog.lock();
        sh.commit(&mut cat, Op::JobStart { job }).unwrap();
        sh.commit(&mut cat, Op::JobGrow { job: 9, extents: vec![target] }).unwrap();
    }
    // The copy reached the target.
    vol.write_at(&[5u8; 8192], 40 * 4096).unwrap();
    sh.sync_log().unwrap();
    drop((sh, node));
    let (store, _) = Store::open(dir.path(), true).unwrap();
    let e = Engine::new(store, dir.path().into(), crate::storage::real(), vec![(VolumeId(1), vol.clone())]);
    let r = e.recover(false).unwrap();
    assert_eq!(r.jobs_rolled_back, vec![9]);
    let mut buf = vec![1u8; 8192];
    vol.read_at(&mut buf, 40 * 4096).unwrap();
    assert!(buf.iter().all(|&b| b == 0), "the rolled-back target still holds the copy");
}

/// A free that takes the quarantine past its cap settles it in the freeing op, as the
/// backing file system's truncate frees its blocks: the tracks read as zeros on the volume
/// when the truncate returns, and the next writer's allocation has nothing left to settle.
/// A smaller free stays quarantined until a sync of the log.
#[test]
fn a_large_free_settles_its_quarantine_itself() {
    use crate::engine::QUARANTINE_TRACKS_MAX;
    let dir = tempfile::tempdir().unwrap();
    let g = Geometry::new(4096).unwrap();
    let tracks = 2 * QUARANTINE_TRACKS_MAX;
    let mut store = Store::create(dir.path(), Catalog::new(g, meta())).unwrap();
    store
        .commit(Op::AddVolume {
            id: VolumeId(1),
            name: "V1".into(),
            path: "/mem".into(),
            size_bytes: tracks * 4096,
            tracks_total: tracks,
        })
        .unwrap();
    for (ino, name) in [(2, b"big".to_vec()), (3, b"small".to_vec())] {
        store.commit(Op::MakeNode { ino, parent: ROOT_INO, name, meta: meta(), kind: NewKind::File }).unwrap();
    }
    let vol = Arc::new(MemVolume::new(tracks * 4096));
    let e = Arc::new(Engine::new(store, dir.path().into(), crate::storage::real(), vec![(VolumeId(1), vol.clone())]));
    let (big, small) = (e.open(2).unwrap(), e.open(3).unwrap());
    let big_len = (QUARANTINE_TRACKS_MAX + 8) * 4096;
    e.write(&small, 0, &[6u8; 8 * 4096]).unwrap();
    e.write(&big, 0, &vec![5u8; big_len as usize]).unwrap();
    let where_small = e.geometry.track_offset(small.map.load().extents().next().unwrap().first);
    e.truncate(3, 0, 1).unwrap();
    assert_eq!(e.quarantine.lock().len(), 1, "a small free stays quarantined");
    let mut buf = vec![0u8; 4096];
    vol.read_at(&mut buf, where_small).unwrap();
    assert!(buf.iter().all(|&b| b == 6), "a quarantined track is not punched before the log holds its free");
    e.truncate(2, 0, 1).unwrap();
    assert!(e.quarantine.lock().is_empty(), "the large free settled the quarantine, the small one's tracks too");
    let mut all = vec![1u8; (tracks * 4096) as usize];
    vol.read_at(&mut all, 0).unwrap();
    assert!(all.iter().all(|&b| b == 0), "every freed track reads as zeros when the truncate returns");
    assert!(e.catalog.lock().all_durable(), "the frees are in the log, synced");
}

/// A job record of data set 2 to volume 1, queued (no target yet).
fn queued_job(id: u64) -> crate::catalog::model::JobRec {
    crate::catalog::model::JobRec::queued(id, 2, "/f", vec![VolumeId(1)])
}

/// Zeros written ahead of a data set that grows by synced appends (`Engine::zeros_ahead`)
/// never land on bytes written past its end: a second writer keeps writing there, at the
/// engine with no kernel lock between the two, on a host file (where the zeros are real
/// writes). Every block ends holding one of the records written at its offset, or zeros.
#[test]
fn zeros_ahead_of_synced_appends_spare_a_writer_past_the_end() {
    use crate::storage::FileStorage;
    use std::sync::atomic::AtomicBool;
    use std::sync::Mutex;
    const REC: u64 = 4096;
    let dir = tempfile::tempdir().unwrap();
    let vol = Arc::new(FileStorage::create(&dir.path().join("V1.img"), 8192 * REC).unwrap());
    let (sh, node) = engine_of_tracks(vol, dir.path(), 8192);
    let rec = |seed: u64| -> Vec<u8> { (0..REC).map(|i| ((seed * 7 + i) % 251) as u8 + 1).collect() };
    let records: Mutex<Vec<(u64, u64)>> = Mutex::default();
    let done = AtomicBool::new(false);
    std::thread::scope(|s| {
        s.spawn(|| {
            let mut seed = 1_000_000u64;
            while !done.load(Ordering::Relaxed) {
                // 32-252 KiB past the end: inside the window of zeros ahead.
                let end = node.size_bytes.load(Ordering::Acquire).next_multiple_of(REC);
                let at = end + (8 + seed % 56) * REC;
                if at + REC > 6000 * REC {
                    break;
                }
                sh.write(&node, at, &rec(seed)).unwrap();
                records.lock().unwrap().push((at, seed));
                seed += 1;
                // Now and then the gate is free for long enough for an fsync to take it.
                if seed % 4 == 0 {
                    std::thread::sleep(std::time::Duration::from_micros(20));
                }
            }
        });
        for seed in 0..400u64 {
            let at = node.size_bytes.load(Ordering::Acquire).next_multiple_of(REC);
            if at + REC > 6000 * REC {
                break;
            }
            sh.write(&node, at, &rec(seed)).unwrap();
            sh.fsync(&node, true).unwrap();
            records.lock().unwrap().push((at, seed));
        }
        done.store(true, Ordering::Relaxed);
    });
    assert!(node.zeroed_end.load(Ordering::Acquire) > 0, "zeros went ahead of the appends at least once");
    let size = node.size_bytes.load(Ordering::Acquire);
    let got = sh.read(&node, 0, size as u32).unwrap();
    let mut at_offset: HashMap<u64, Vec<u64>> = HashMap::new();
    for &(at, seed) in records.lock().unwrap().iter() {
        at_offset.entry(at).or_default().push(seed);
    }
    for (i, block) in got.chunks(REC as usize).enumerate() {
        let at = i as u64 * REC;
        match at_offset.get(&at) {
            Some(seeds) => assert!(
                seeds.iter().any(|&seed| block == rec(seed).as_slice()),
                "block at {at}: none of the records {seeds:?} written there"
            ),
            None => assert!(block.iter().all(|&b| b == 0), "block at {at}: no record went there, yet not zeros"),
        }
    }
}
