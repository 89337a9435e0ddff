//! Damage in the synced part of the catalog log is refused with the way out named, and
//! `ferryfs fsck --repair` takes it: it keeps a copy of the log, cuts it at the last good
//! frame, and the pool mounts and checks clean again.

mod common;

use std::fs::{self, File};
use std::path::Path;

use common::*;

const LOG_HEADER_BYTES: usize = 20;
const FRAME_HEADER_BYTES: usize = 16;

/// The (offset, length) of every whole frame of a catalog log.
fn frames(log: &[u8]) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    let mut at = LOG_HEADER_BYTES;
    while at + FRAME_HEADER_BYTES <= log.len() && &log[at..at + 4] == b"FYOP" {
        let len = u32::from_le_bytes(log[at + 8..at + 12].try_into().unwrap()) as usize;
        let total = FRAME_HEADER_BYTES + len + 4;
        if at + total > log.len() {
            break;
        }
        out.push((at, total));
        at += total;
    }
    out
}

fn create_files(dir: &Path, from: usize, to: usize) {
    for i in from..to {
        File::create(dir.join(format!("f{i:04}"))).unwrap();
    }
    File::open(dir).unwrap().sync_all().unwrap();
}

fn damaged_copies(pool: &Path) -> Vec<std::path::PathBuf> {
    fs::read_dir(pool)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.file_name().unwrap().to_string_lossy().starts_with("catalog.log.damaged-"))
        .collect()
}

#[test]
fn damage_in_synced_log_is_refused_and_fsck_repair_fixes_it() {
    let tp = TestPool::new("64K", &[("V1", "64M")]);
    let m = tp.mount();
    fs::create_dir(m.p("d")).unwrap();
    create_files(&m.p("d"), 0, 200);
    create_files(&m.p("d"), 200, 400);
    // No unmount: the log is not compacted.
    m.kill9();

    let log_path = tp.pool.join("catalog.log");
    let mut log = fs::read(&log_path).unwrap();
    let fr = frames(&log);
    assert!(log.len() > 8192 && fr.len() >= 400, "the log holds {} bytes in {} frames", log.len(), fr.len());
    // The frames written after the first directory sync say the early sectors are durable.
    let sectors = |at: usize| u16::from_le_bytes([log[at + 6], log[at + 7]]);
    let (last_at, _) = *fr.last().unwrap();
    assert!(sectors(last_at) >= 2, "the last frame says {} sectors are durable", sectors(last_at));

    // A flipped byte in the payload of an early frame.
    let (at, _) = fr[5];
    log[at + FRAME_HEADER_BYTES + 1] ^= 0x5A;
    fs::write(&log_path, &log).unwrap();
    tp.corrupted();

    let attempt = tp.try_mount();
    let mounted = attempt.guard.is_some();
    drop(attempt.guard);
    assert!(!mounted, "a log damaged in synced data was mounted");
    eprintln!("mount refused: {}", attempt.stderr);
    assert_one_clear_line(&attempt.stderr, "fsck --repair");
    assert!(attempt.stderr.contains(&format!("byte {at} ")), "the error names the damaged frame: {}", attempt.stderr);
    let (_, err) = ferry_err(&["fsck", s(&tp.pool)]);
    assert!(err.contains("fsck --repair"), "{err}");
    assert_eq!(fs::read(&log_path).unwrap(), log, "a refused mount or fsck changed the log");

    let out = ferry_ok(&["fsck", "--repair", s(&tp.pool)]);
    eprintln!("{out}");
    assert!(out.contains("kept a copy"), "{out}");
    assert!(out.contains(&format!("cut the catalog log at byte {at} ")), "{out}");
    assert!(out.contains("clean:"), "{out}");
    let copies = damaged_copies(&tp.pool);
    assert_eq!(copies.len(), 1, "{copies:?}");
    assert_eq!(fs::read(&copies[0]).unwrap(), log, "the copy holds the log as it was");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(fs::metadata(&copies[0]).unwrap().permissions().mode() & 0o777, 0o600);
    // The frames before the cut were folded into a new snapshot; the log starts afresh.
    assert!(fs::metadata(&log_path).unwrap().len() < 64, "the log after the repair holds frames");

    // A healthy pool: the repair changes nothing and says so.
    let out = ferry_ok(&["fsck", "--repair", s(&tp.pool)]);
    assert!(out.contains("nothing changed"), "{out}");
    assert_eq!(damaged_copies(&tp.pool).len(), 1);

    let m = tp.mount();
    assert!(m.p("d").is_dir());
    let n = fs::read_dir(m.p("d")).unwrap().count();
    assert!(n < 400, "the frames after the damage are gone, found {n} files");
    File::create(m.p("d/after-repair")).unwrap();
    m.unmount();
    fsck_clean(&tp.pool);

    // While mounted, the repair is refused (the mount holds the pool lock).
    let m = tp.mount();
    let (_, err) = ferry_err(&["fsck", "--repair", s(&tp.pool)]);
    assert_one_clear_line(&err, "in use");
    m.unmount();
    fsck_clean(&tp.pool);
}
