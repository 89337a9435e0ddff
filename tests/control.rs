//! `.ferry/control` as a stream of lines: a command may arrive in pieces, every line gets
//! exactly one reply, and a line has a length limit.

mod common;

use std::fs::OpenOptions;
use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;

use common::jobs::{events, status};
use common::TestPool;

fn control(m: &common::Mounted) -> std::fs::File {
    OpenOptions::new().read(true).write(true).custom_flags(libc::O_NONBLOCK).open(m.p(".ferry/control")).unwrap()
}

fn replies(f: &mut std::fs::File) -> String {
    let mut s = String::new();
    f.read_to_string(&mut s).unwrap();
    s
}

/// The story: each write() was taken as whole lines. `set max-jobs=6` then `4\n` set 6 and
/// refused "4"; a refused line silently dropped the lines after it in the same write; and a
/// 5 MB line was echoed whole into the events and the mount's log.
#[test]
fn control_lines_are_buffered_answered_one_by_one_and_capped() {
    let tp = TestPool::new("64K", &[("V1", "16M")]);
    let m = tp.mount();

    // One command in two writes.
    let mut f = control(&m);
    f.write_all(b"set max-jobs=1").unwrap();
    assert_eq!(status(&m.mnt)["max_jobs"], 2, "half a line does nothing yet");
    f.write_all(b"2\n").unwrap();
    assert_eq!(status(&m.mnt)["max_jobs"], 12);
    assert_eq!(replies(&mut f), "ok max-jobs=12\n");

    // A refused line does not drop the lines after it; each line gets one reply, and the
    // write says a line was refused.
    let e = f.write_all(b"frobnicate\nset max-jobs=3\n# a comment\n\nset copy-rate=5M\n").unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EINVAL), "{e}");
    assert_eq!(status(&m.mnt)["max_jobs"], 3, "the line after the refused one ran");
    let r = replies(&mut f);
    let lines: Vec<&str> = r.lines().collect();
    assert_eq!(lines.len(), 3, "one reply per command line: {r:?}");
    assert!(lines[0].starts_with("error: "), "{r:?}");
    assert_eq!(lines[1], "ok max-jobs=3");
    assert_eq!(lines[2], "ok copy-rate=5242880");

    // A 5 MB line: refused with a clear error, echoed nowhere in full; the next line works.
    let long = format!("migrate /{} to V1\n", "x".repeat(5 << 20));
    let e = f.write_all(long.as_bytes()).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EINVAL));
    f.write_all(b"set max-jobs=4\n").unwrap();
    let r = replies(&mut f);
    assert!(r.starts_with("error: a command line holds at most 4096 bytes"), "{r:?}");
    assert!(r.ends_with("ok max-jobs=4\n"), "{r:?}");
    let ev = events(&m.mnt);
    assert!(ev.len() < 64 << 10, "the events hold {} bytes", ev.len());
    assert!(!ev.contains(&"x".repeat(1000)));
    drop(f);
    m.unmount();
    let log = std::fs::read_to_string(tp.pool.join("mount.log")).unwrap_or_default();
    assert!(!log.contains(&"x".repeat(1000)), "the mount's log holds the long line");

    // A last line without its newline runs when the handle is closed.
    let m = tp.mount();
    {
        let mut f = control(&m);
        f.write_all(b"set max-jobs=5").unwrap();
    }
    assert_eq!(status(&m.mnt)["max_jobs"], 5);
    m.unmount();
}
