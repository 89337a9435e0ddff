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

fn poll_one(f: &std::fs::File, events: i16, timeout_ms: i32) -> i16 {
    use std::os::fd::AsRawFd;
    let mut pfd = libc::pollfd { fd: f.as_raw_fd(), events, revents: 0 };
    // SAFETY: one pollfd, valid for the call.
    let n = unsafe { libc::poll(&mut pfd, 1, timeout_ms) };
    assert!(n >= 0, "poll: {}", std::io::Error::last_os_error());
    pfd.revents
}

/// The story: `ferryfs migrate --wait` read the status every 200 ms, so it returned up to
/// 200 ms after its job ended (a fifth of a 1 GiB migration's time). An open `.ferry/status`
/// or `.ferry/events` is now ready for POLLPRI (and POLLERR, as a sysfs attribute) once a job
/// or a plan changed after the open, and the daemon wakes a poll asleep on it at the change.
/// Every other file is always ready, as on a local file system.
#[test]
fn status_and_events_wake_a_poll_at_the_next_change() {
    let tp = TestPool::new("64K", &[("V1", "16M"), ("V2", "16M")]);
    let m = tp.mount();
    std::fs::write(m.p("f"), common::pattern(1 << 20, 1)).unwrap();
    let st = std::fs::File::open(m.p(".ferry/status")).unwrap();
    let ev = std::fs::File::open(m.p(".ferry/events")).unwrap();
    assert_eq!(poll_one(&st, libc::POLLPRI, 0), 0, "nothing changed since the status was opened");
    assert_eq!(poll_one(&ev, libc::POLLPRI, 0), 0, "nothing changed since the events were opened");

    // A poll asleep on the status with no timeout (the kernel looks once more when a timeout
    // runs out, which would hide a wake that never came), woken by the job. Should the job
    // start before the poll sleeps, the poll finds the change at once. The 60 s are a bound
    // for a wake that never comes, not a measure.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || tx.send(poll_one(&st, libc::POLLPRI, -1)));
    std::thread::sleep(std::time::Duration::from_millis(300));
    let reply = common::jobs::control(&m.mnt, "migrate /f to V2").unwrap();
    let ids = common::jobs::reply_jobs(&reply);
    let woke = rx.recv_timeout(std::time::Duration::from_secs(60)).expect("the job's start wakes the status's poll");
    assert_eq!(woke, libc::POLLPRI | libc::POLLERR);
    assert_eq!(poll_one(&ev, libc::POLLPRI, 60_000), libc::POLLPRI | libc::POLLERR);
    common::jobs::wait_switched(&m.mnt, &ids);

    // A data set is always ready: poll(2) does not wait on it.
    let f = OpenOptions::new().read(true).write(true).open(m.p("f")).unwrap();
    assert_eq!(poll_one(&f, libc::POLLIN | libc::POLLOUT, 60_000), libc::POLLIN | libc::POLLOUT);
    assert_eq!(std::fs::read(m.p("f")).unwrap(), common::pattern(1 << 20, 1));
    drop((f, ev));
    m.unmount();
}
