//! Synced appends, the pattern of a log or a journal: each write grows the data set and is
//! followed by fdatasync. Past the second such fsync, ferryfs writes zeros ahead of the
//! data set's end so that the next appends overwrite allocated blocks (engine/io.rs,
//! `Engine::zeros_ahead`). Those zeros must never land on bytes someone wrote: not on a
//! writer's bytes ahead of the end, not on the appends themselves, and a kill -9 must lose
//! nothing that an fdatasync acknowledged.

mod common;

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{Seek, Write};
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;

use common::*;

const REC: usize = 4096;

/// An appender (O_APPEND, fdatasync after each record) and a second writer that keeps
/// writing a few records just past the data set's end, where the zeros go: at the end,
/// every record of each is where it was written, and every other byte is zero.
#[test]
fn a_writer_just_past_the_end_keeps_its_bytes_beside_a_synced_appender() {
    let tp = TestPool::new("64K", &[("V1", "64M")]);
    let m = tp.mount();
    let path = m.p("journal");
    File::create(&path).unwrap();
    // (offset, seed) of every record written, by either thread.
    let records: Arc<Mutex<Vec<(u64, u64)>>> = Arc::default();
    let done = Arc::new(AtomicBool::new(false));
    let ahead = {
        let (path, records, done) = (path.clone(), records.clone(), done.clone());
        thread::spawn(move || {
            let f = OpenOptions::new().write(true).open(&path).unwrap();
            let mut seed = 1_000_000;
            // Each record takes a track of its own (64 KiB): at most 600 of them, about one
            // per append, so that the pool never fills whatever the two threads' speeds.
            while !done.load(Ordering::Relaxed) && seed < 1_000_600 {
                // 128-252 KiB past the end: inside the window of zeros ahead (256 KiB), at its far
                // side, which the zeros reach last.
                let end = fs::metadata(&path).unwrap().len();
                let at = (end / REC as u64 + 32 + seed % 31) * REC as u64;
                f.write_all_at(&pattern(REC, seed), at).unwrap();
                records.lock().unwrap().push((at, seed));
                seed += 1;
                thread::sleep(std::time::Duration::from_micros(200));
            }
        })
    };
    let mut f = OpenOptions::new().append(true).open(&path).unwrap();
    for seed in 0..400u64 {
        f.write_all(&pattern(REC, seed)).unwrap();
        f.sync_data().unwrap();
        let at = f.stream_position().unwrap() - REC as u64;
        records.lock().unwrap().push((at, seed));
    }
    done.store(true, Ordering::Relaxed);
    ahead.join().unwrap();
    drop(f);

    // Every block holds one of the records written at its offset (the two threads may both
    // write one offset, when the appender catches up with the second writer), and a block no
    // record went to reads as zeros.
    let got = fs::read(&path).unwrap();
    let mut at_offset: HashMap<u64, Vec<u64>> = HashMap::new();
    for (at, seed) in records.lock().unwrap().iter() {
        at_offset.entry(*at).or_default().push(*seed);
    }
    assert_eq!(got.len() % REC, 0);
    for (i, block) in got.chunks(REC).enumerate() {
        let at = (i * REC) as u64;
        match at_offset.get(&at) {
            Some(seeds) => assert!(
                seeds.iter().any(|&seed| block == pattern(REC, seed).as_slice()),
                "block at {at}: not any of the records {seeds:?} written there"
            ),
            None => assert!(block.iter().all(|&b| b == 0), "block at {at}: no record went there, yet not zeros"),
        }
    }
    m.unmount();
}

/// Synced appends survive a kill -9 of the daemon, with zeros past their end.
#[test]
fn synced_appends_survive_a_kill9() {
    let tp = TestPool::new("64K", &[("V1", "64M")]);
    let m = tp.mount();
    let path = m.p("wal");
    let want = pattern(300 * REC, 7);
    let mut f = OpenOptions::new().create(true).append(true).open(&path).unwrap();
    for rec in want.chunks(REC) {
        f.write_all(rec).unwrap();
        f.sync_data().unwrap();
    }
    // Unsynced past the synced part: may be lost, but must not take synced bytes along.
    f.write_all(&pattern(REC, 8)).unwrap();
    drop(f);
    m.kill9();
    let m = tp.mount();
    let got = fs::read(m.p("wal")).unwrap();
    assert!(got.len() >= want.len(), "{} bytes after the kill, {} synced", got.len(), want.len());
    assert_bytes_eq(&got[..want.len()], &want, "the synced appends");
    let f = OpenOptions::new().read(true).write(true).open(m.p("wal")).unwrap();
    f.set_len(want.len() as u64 + 512 * 1024).unwrap();
    let mut tail = vec![0xEEu8; 512 * 1024];
    f.read_exact_at(&mut tail, want.len() as u64).unwrap_or_else(|e| panic!("read past the appends: {e}"));
    if got.len() > want.len() {
        let extra = got.len() - want.len();
        assert_bytes_eq(&tail[..extra], &pattern(REC, 8)[..extra], "the unsynced record that survived");
        tail.drain(..extra);
    }
    assert!(tail.iter().all(|&b| b == 0), "past the appends: zeros");
    drop(f);
    fsck_clean(m.pool());
    m.unmount();
}
