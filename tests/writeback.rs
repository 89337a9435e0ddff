//! `-o writeback`: the kernel's write-back cache. Writes are acknowledged from the page cache
//! and reach the daemon later; fsync makes them durable as without the option; a kill -9
//! may lose what no fsync covered, and nothing else: every block holds its last fsync'd
//! write or a later acknowledged one, whole. A clean unmount writes everything, and a
//! migration under the cache keeps every write.

mod common;

use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use common::jobs::*;
use common::*;

const BLOCK: usize = 4096;
const BLOCKS: u64 = 512;
const WRITERS: u64 = 2;

fn mount_wb(tp: &TestPool) -> Mounted {
    mount_at_with(&tp.pool, tp.mnt(), &tp.dir().join("wb.out"), &[], &["-o", "writeback"])
}

/// The bytes of version `c` of block `b` (0: never written, zeros).
fn version(b: u64, c: u64) -> Vec<u8> {
    if c == 0 {
        return vec![0; BLOCK];
    }
    let mut v = vec![0u8; BLOCK];
    for (i, x) in v.iter_mut().enumerate() {
        *x = ((b.wrapping_mul(31) ^ c.wrapping_mul(0x9E37) ^ (i as u64 / 8)) % 251) as u8 + 1;
    }
    v
}

/// Per block: the versions that may be on the disk after a crash: from the last one an
/// fsync covered to the last one written (a write in flight included).
#[derive(Clone, Copy, Default, Debug)]
struct Block {
    synced: u64,
    last: u64,
}

#[test]
fn the_mount_says_it_and_reads_what_it_wrote() {
    let tp = TestPool::new("64K", &[("V1", "64M")]);
    let m = mount_wb(&tp);
    let log = fs::read_to_string(tp.pool.join("mount.log")).unwrap();
    assert!(log.contains("write-back cache on"), "{log}");
    // Appends, overwrites through a write-only handle (the kernel upgrades it to read-write
    // to fill partial pages), and a sparse write past the end.
    fs::write(m.p("a"), b"hello ").unwrap();
    OpenOptions::new().append(true).open(m.p("a")).unwrap().write_all_at(b"world", 0).unwrap();
    let w = OpenOptions::new().write(true).open(m.p("a")).unwrap();
    w.write_all_at(b"J", 0).unwrap();
    w.write_all_at(b"!", 20_000).unwrap();
    drop(w);
    let got = fs::read(m.p("a")).unwrap();
    assert_eq!(got.len(), 20_001);
    assert_eq!(&got[..11], b"Jello world");
    assert!(got[11..20_000].iter().all(|&b| b == 0));
    assert_eq!(fs::metadata(m.p("a")).unwrap().len(), 20_001);
    // A truncate down and up through the cache.
    OpenOptions::new().write(true).open(m.p("a")).unwrap().set_len(5).unwrap();
    OpenOptions::new().write(true).open(m.p("a")).unwrap().set_len(8).unwrap();
    assert_eq!(fs::read(m.p("a")).unwrap(), b"Jello\0\0\0");
    m.unmount();
    fsck_clean(&tp.pool);
    // Without the option, the same bytes.
    let m = tp.mount();
    assert_eq!(fs::read(m.p("a")).unwrap(), b"Jello\0\0\0");
    m.unmount();
}

/// Writers overwrite 4 KiB blocks and fsync now and then; the daemon is killed with -9 at a
/// random moment, three times. After each remount every block holds a version between its
/// last fsync'd one and its last written one, whole (the kernel writes back whole pages).
#[test]
fn a_kill_9_loses_only_what_no_fsync_covered() {
    let seed = seed_from_env("writeback");
    let mut rng = Rng::new(seed);
    let tp = TestPool::new("64K", &[("V1", "64M")]);
    let mut m = mount_wb(&tp);
    let path = m.p("f");
    {
        let f = File::create(&path).unwrap();
        for b in 0..BLOCKS {
            f.write_all_at(&version(b, 0), b * BLOCK as u64).unwrap();
        }
        f.sync_all().unwrap();
    }
    let state = Arc::new(Mutex::new(vec![Block::default(); BLOCKS as usize]));
    let mut lost_some = false;
    for round in 0..3u64 {
        let stop = Arc::new(AtomicBool::new(false));
        let workers: Vec<_> = (0..WRITERS)
            .map(|k| {
                let (state, stop, path) = (state.clone(), stop.clone(), path.clone());
                let mut x = seed ^ (round * 7919 + k + 1);
                thread::spawn(move || {
                    let Ok(f) = OpenOptions::new().read(true).write(true).open(&path) else { return };
                    let mut n = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        let b = (x % (BLOCKS / WRITERS)) * WRITERS + k;
                        let c = {
                            let mut s = state.lock().unwrap();
                            s[b as usize].last += 1;
                            s[b as usize].last
                        };
                        if f.write_all_at(&version(b, c), b * BLOCK as u64).is_err() {
                            return;
                        }
                        n += 1;
                        if n % 16 == 0 {
                            // What this thread wrote before the fsync is durable after it.
                            let before: Vec<u64> = state.lock().unwrap().iter().map(|s| s.last).collect();
                            if f.sync_data().is_err() {
                                return;
                            }
                            let mut s = state.lock().unwrap();
                            for bb in (k..BLOCKS).step_by(WRITERS as usize) {
                                let i = bb as usize;
                                s[i].synced = s[i].synced.max(before[i]);
                            }
                        }
                    }
                })
            })
            .collect();
        thread::sleep(Duration::from_millis(200 + rng.below(800)));
        m.kill9();
        stop.store(true, Ordering::Relaxed);
        for w in workers {
            w.join().unwrap();
        }
        m = mount_wb(&tp);
        fsck_clean(&tp.pool);
        let got = fs::read(&path).unwrap();
        assert_eq!(got.len(), BLOCKS as usize * BLOCK, "round {round}: the size was set before any of this");
        let mut s = state.lock().unwrap();
        let mut problems = Vec::new();
        for b in 0..BLOCKS {
            let i = b as usize;
            let bytes = &got[i * BLOCK..(i + 1) * BLOCK];
            match (s[i].synced..=s[i].last).find(|&c| version(b, c) == bytes) {
                Some(c) => {
                    lost_some |= c < s[i].last;
                    // What is on the disk now is where both marks start from.
                    s[i] = Block { synced: c, last: c };
                }
                None => problems.push(format!(
                    "block {b}: holds none of versions {}..={} (first bytes {:?})",
                    s[i].synced,
                    s[i].last,
                    &bytes[..8]
                )),
            }
        }
        assert!(problems.is_empty(), "round {round}:\n{}", problems.join("\n"));
    }
    eprintln!("writes that no fsync covered were lost in some round: {lost_some}");
    m.unmount();
    fsck_clean(&tp.pool);
}

/// A live migration of a data set that writers overwrite through the write-back cache: the
/// job switches, and after a clean unmount every acknowledged write is on the target.
#[test]
fn a_migration_under_the_write_back_cache_keeps_every_write() {
    let tp = TestPool::new("64K", &[("V1", "64M"), ("V2", "64M")]);
    let m = mount_wb(&tp);
    let lf = LoggedFile::create(&m.p("db"), 7, 4096, 2048);
    let to = if placement(tp.mnt(), "/db").0 == ["V1"] { "V2" } else { "V1" };
    let writers = Writers::start(&lf, 2, 11);
    let id = reply_jobs(&control(tp.mnt(), &format!("migrate /db to {to} rate=4M")).unwrap())[0];
    let done = wait_switched(tp.mnt(), &[id]);
    assert_eq!(done[0]["phase"], "switched", "{}", done[0]);
    let writes = writers.stop();
    assert!(writes > 0, "the writers wrote nothing");
    assert_eq!(placement(tp.mnt(), "/db").0, vec![to.to_string()]);
    m.unmount();
    fsck_clean(&tp.pool);
    let m = tp.mount();
    let problems = lf.verify_at(&m.p("db"), false);
    assert!(problems.is_empty(), "after the switch, an unmount and a mount:\n{}", problems.join("\n"));
    m.unmount();
}
