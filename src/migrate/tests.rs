//! The migration engine's race test over in-memory volumes.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::*;
use crate::engine::read_pieces;
use crate::engine::tests::engine_with;
use crate::extent_map::ExtentMap;
use crate::storage::mem::MemVolume;

/// The monitor's promise (monitor.rs): with writers hammering a data set while a job
/// copies, re-syncs (and mirrors, once the dirty set stops shrinking) and switches, every
/// block ends with its last acknowledged write, read back from the target volume.
#[test]
fn no_write_slips_past_the_copier() {
    for (writers, cutover) in [(1, "live"), (3, "live"), (2, "close")] {
        let mut report = writers_race_a_job(writers, cutover);
        if cutover == "live" {
            // The writers dirty every track during every pass, so the job has to mirror;
            // unless they hardly ran (a loaded machine can starve them for the whole
            // copy). Then the race is run again: the test is of the mirror.
            let mirrored = |r: &crate::report::JobReport| r.mirrored && r.mirrored_writes > 0;
            for _ in 0..4 {
                if mirrored(&report) {
                    break;
                }
                eprintln!("{writers} writers, live: the job did not mirror ({report:?}); again");
                report = writers_race_a_job(writers, cutover);
            }
            assert!(mirrored(&report), "{report:?}");
        }
    }
}

/// `verify=yes` under writers: the comparison runs in the hold, after the final re-sync, so
/// it finds the target equal to the source and the job switches; the report says so.
#[test]
fn verify_under_writers_finds_the_target_equal() {
    for cutover in ["live", "close"] {
        let r = race_a_job(2, cutover, " verify=yes");
        assert_eq!(r.verify.as_deref(), Some("ok"), "{r:?}");
        assert_eq!(r.verified_tracks, Some(512), "every track of the data set: {r:?}");
        assert!(r.verify_us.is_some(), "{r:?}");
    }
    let r = race_a_job(1, "live", "");
    assert_eq!((r.verify.as_deref(), r.verified_tracks), (None, None), "not asked: {r:?}");
}

/// One race of `no_write_slips_past_the_copier`: checks every block on the target and
/// returns the job's report.
fn writers_race_a_job(writers: usize, cutover: &str) -> crate::report::JobReport {
    race_a_job(writers, cutover, "")
}

/// [`writers_race_a_job`], with more options on the control line.
fn race_a_job(writers: usize, cutover: &str, options: &str) -> crate::report::JobReport {
    let dir = tempfile::tempdir().unwrap();
    let (sh, node) = engine_with(Arc::new(MemVolume::new(64 * 4096)), dir.path());
    for (id, name) in [(2, "V2"), (3, "V3")] {
        sh.adopt_volume(VolumeId(id), Arc::new(MemVolume::new(1024 * 4096)));
        let mut cat = sh.catalog.lock();
        cat.commit(Op::AddVolume {
            id: VolumeId(id),
            name: name.into(),
            path: format!("/mem{id}"),
            size_bytes: 1024 * 4096,
            tracks_total: 1024,
        })
        .unwrap();
    }
    let m = Migrations::new(sh.clone());
    const BLOCKS: u64 = 2048; // 1 KiB blocks over 512 tracks of 4 KiB
    let block = |b: u64, c: u64| vec![(b as u8) ^ (c as u8).wrapping_mul(31) | 1; 1024];
    for b in 0..BLOCKS {
        sh.write(&node, b * 1024, &block(b, 0)).unwrap();
    }
    let acked: Arc<Vec<AtomicU64>> = Arc::new((0..BLOCKS).map(|_| AtomicU64::new(0)).collect());
    let stop = Arc::new(AtomicBool::new(false));
    let threads: Vec<_> = (0..writers)
        .map(|k| {
            let (sh, node, acked, stop) = (sh.clone(), node.clone(), acked.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut c = 0u64;
                let mut x = 0x9E37_79B9u64 + k as u64;
                while !stop.load(Ordering::Relaxed) {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let b = (x % (BLOCKS / writers as u64)) * writers as u64 + k as u64;
                    c += 1;
                    sh.write(&node, b * 1024, &block(b, c)).unwrap();
                    acked[b as usize].store(c, Ordering::Release);
                }
            })
        })
        .collect();
    // To the big volume it is not on. Capped, so that passes take long enough for the
    // writers to outrun them.
    let on_v2 = matches!(sh.catalog.lock().catalog.get(2).map(|i| &i.body),
        Some(Body::File { layout, .. }) if layout.extents().any(|e| e.volume == VolumeId(2)));
    let (to, to_id) = if on_v2 { ("V3", VolumeId(3)) } else { ("V2", VolumeId(2)) };
    let reply = execute(&m, &format!("migrate /f to {to} cutover={cutover} rate=4M{options}")).unwrap();
    assert_eq!(reply, "ok jobs 1");
    let phase = |m: &Arc<Migrations>| m.reports().0[0].phase.clone();
    let t0 = std::time::Instant::now();
    // Close mode: the writers keep the data set open until the job asks for a close.
    while !["switched", "failed", "awaiting-close"].contains(&phase(&m).as_str()) {
        assert!(t0.elapsed() < Duration::from_secs(60), "stuck in {}", phase(&m));
        std::thread::sleep(Duration::from_millis(1));
    }
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        t.join().unwrap();
    }
    if cutover == "close" {
        sh.release(&node).unwrap();
    }
    while !["switched", "failed"].contains(&phase(&m).as_str()) {
        assert!(t0.elapsed() < Duration::from_secs(60), "stuck in {}", phase(&m));
        std::thread::sleep(Duration::from_millis(1));
    }
    let report = m.reports().0[0].clone();
    assert_eq!(report.phase, "switched", "{report:?}");
    let cat = sh.catalog.lock();
    let Some(Body::File { layout, .. }) = cat.catalog.get(2).map(|i| &i.body) else { panic!() };
    assert!(layout.extents().all(|e| e.volume == to_id), "all on the target: {layout:?}");
    let map = ExtentMap::new(sh.geometry, layout);
    drop(cat);
    let mut got = vec![0u8; (BLOCKS * 1024) as usize];
    read_pieces(&sh.volumes(), &map, 0, &mut got).unwrap();
    for b in 0..BLOCKS {
        let want = block(b, acked[b as usize].load(Ordering::Acquire));
        let at = (b * 1024) as usize;
        assert!(got[at..at + 1024] == want[..], "{writers} writers, {cutover}: block {b} is stale on the target");
    }
    assert!(crate::catalog::check::check(&sh.catalog.lock().catalog).problems.is_empty());
    report
}

/// A refused step is a bug, and it must not take the mount down: the state stays as it was,
/// and a job ended through `settle` ends failed, saying why, instead of panicking. Once
/// final, nothing moves it.
#[test]
fn a_refused_transition_fails_the_job_instead_of_panicking() {
    let dir = tempfile::tempdir().unwrap();
    let (sh, _node) = engine_with(Arc::new(MemVolume::new(64 * 4096)), dir.path());
    let m = Migrations::new(sh);
    let rec = JobRec { verify: true, ..JobRec::queued(7, 2, "/f", Vec::new()) };
    let job = JobState::new(&rec);
    assert_eq!(job.report(&m.engine.catalog.lock().catalog, 4096).verify.as_deref(), Some("pending"));
    let e = job.transition(State::Copying).unwrap_err();
    assert_eq!((e.from.name(), e.to.name()), ("queued", "copying"));
    assert_eq!(job.state(), State::Queued, "a refused step changes nothing");
    for s in [State::Assessing, State::Allocating, State::Copying, State::Resyncing] {
        job.transition(s).unwrap();
    }
    job.settle(&m, State::Switched { held_us: 1, verified: None });
    match job.state() {
        State::Failed { reason, during, verified: None } => {
            assert!(reason.contains("internal error: refused state transition resyncing -> switched"), "{reason}");
            assert_eq!(during, Phase::Resyncing);
        }
        s => panic!("{s:?}"),
    }
    let r = job.report(&m.engine.catalog.lock().catalog, 4096);
    assert_eq!(
        (r.phase.as_str(), r.failed_in.as_deref(), r.verify.as_deref()),
        ("failed", Some("resyncing"), Some("not-run"))
    );
    assert!(r.ended_ns.is_some());
    assert!(String::from_utf8(m.events_text()).unwrap().contains("job 7 failed path=/f phase=resyncing"));
    // Final: even a failure is refused now, and the state keeps its first reason.
    job.fail(&m, "again".into(), None);
    assert!(matches!(job.state(), State::Failed { reason, .. } if reason.contains("internal error")));
    assert_eq!(String::from_utf8(m.events_text()).unwrap().matches(" failed ").count(), 1, "one end, one event");
    assert!(job.transition(State::Cancelled).is_err());
}
