//! Mounting like any other FUSE file system: the type `fuse.ferryfs`, `-o` options (ro, and
//! a clear refusal of unknown ones), a mountpoint whose path holds a space, systemd's
//! readiness protocol, and a stop that logs no spurious warning.

mod common;

use std::fs;
use std::io::Write;
use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

/// The mount table's entry for `mnt`, as findmnt prints it: (fstype, options).
fn findmnt(mnt: &Path) -> Option<(String, String)> {
    let out = Command::new("findmnt").args(["-n", "-o", "FSTYPE,OPTIONS", "--mountpoint"]).arg(mnt).output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let (t, o) = text.split_once(char::is_whitespace)?;
    Some((t.to_string(), o.trim().to_string()))
}

fn catalog_bytes(pool: &Path) -> (Vec<u8>, Vec<u8>) {
    (fs::read(pool.join("catalog.snap")).unwrap(), fs::read(pool.join("catalog.log")).unwrap())
}

#[test]
fn the_mount_type_is_fuse_ferryfs_and_a_space_in_the_mountpoint_survives_a_kill9() {
    let tp = TestPool::new("64K", &[("V1", "8M")]);
    let mnt = tp.dir().join("mount point");
    fs::create_dir(&mnt).unwrap();
    let m = mount_at(&tp.pool, &mnt, &tp.dir().join("mount.out"));
    let (fstype, _) = findmnt(&mnt).expect("findmnt finds the mount");
    assert_eq!(fstype, "fuse.ferryfs");
    let listed = Command::new("findmnt").args(["-n", "-o", "TARGET", "-t", "fuse.ferryfs"]).output().unwrap();
    assert!(
        String::from_utf8_lossy(&listed.stdout).lines().any(|l| Path::new(l.trim()) == mnt),
        "findmnt -t fuse.ferryfs"
    );

    let data = pattern(200_000, 7);
    let mut f = fs::File::create(m.p("kept")).unwrap();
    f.write_all(&data).unwrap();
    f.sync_all().unwrap();
    drop(f);
    // The daemon dies; its dead mount stays at a path that mountinfo writes as `mount\040point`.
    m.kill9_leave_mount();
    let m = mount_at(&tp.pool, &mnt, &tp.dir().join("mount2.out"));
    assert_bytes_eq(&fs::read(m.p("kept")).unwrap(), &data, "a synced data set after kill -9 and remount");
    let log = fs::read_to_string(tp.pool.join("mount.log")).unwrap();
    assert!(log.contains("detached the dead ferryfs mount"), "the dead mount was detached:\n{log}");
    let out = ferry_ok(&["umount", s(&mnt)]);
    assert!(out.contains("unmounted"));
    m.wait_daemon_exit();
}

#[test]
fn a_read_only_mount_changes_nothing_and_takes_no_command() {
    let tp = TestPool::new("64K", &[("V1", "8M"), ("V2", "8M")]);
    let data = pattern(300_000, 3);
    {
        let m = tp.mount();
        fs::write(m.p("a"), &data).unwrap();
        m.unmount();
    }
    let before = catalog_bytes(&tp.pool);
    let m = mount_at_with(&tp.pool, tp.mnt(), &tp.dir().join("ro.out"), &[], &["-o", "ro"]);
    let (_, opts) = findmnt(tp.mnt()).unwrap();
    assert!(opts.split(',').any(|o| o == "ro"), "the kernel mount is read-only: {opts}");
    assert_bytes_eq(&fs::read(m.p("a")).unwrap(), &data, "reads work");
    assert_errno(fs::write(m.p("b"), b"x"), libc::EROFS, "create");
    assert_errno(fs::OpenOptions::new().write(true).open(m.p("a")), libc::EROFS, "open for write");
    assert_errno(fs::create_dir(m.p("d")), libc::EROFS, "mkdir");
    assert_errno(fs::remove_file(m.p("a")), libc::EROFS, "unlink");
    let (_, err) = ferry_err(&["migrate", s(tp.mnt()), "/a", "--to", "V2"]);
    assert_one_clear_line(&err, "read-only");
    let (_, err) = ferry_err(&["volume", "add", s(tp.mnt()), "V3", "--size", "8M"]);
    assert_one_clear_line(&err, "read-only");
    let st = parse_json(&ferry_ok(&["status", s(tp.mnt()), "--json"]));
    assert_eq!(st["jobs"].as_array().map(|j| j.len()), Some(0), "no job started: {st:#}");
    m.unmount();
    assert_eq!(catalog_bytes(&tp.pool), before, "a read-only mount leaves the catalog as it found it");
    assert_eq!(volume_json(&tp.pool, "V2")["tracks_used"].as_u64(), Some(0), "nothing moved to V2");

    // A mount given rw after ro (the last one wins) writes again.
    let m = mount_at_with(&tp.pool, tp.mnt(), &tp.dir().join("rw.out"), &[], &["-o", "ro", "-o", "rw"]);
    fs::write(m.p("b"), b"written").unwrap();
    m.unmount();
}

#[test]
fn unknown_mount_options_are_refused_by_name_and_nothing_is_mounted() {
    let tp = TestPool::new("64K", &[("V1", "8M")]);
    let (code, err) = ferry_err(&["mount", s(&tp.pool), s(tp.mnt()), "-o", "ro,bogus,nofail,frob=3"]);
    assert_ne!(code, 0);
    assert_one_clear_line(&err, "unknown mount options bogus, frob=3");
    assert!(!is_mounted(tp.mnt()));
    let (_, err) = ferry_err(&["mount", s(&tp.pool), s(tp.mnt()), "-o", "threads=0"]);
    assert_one_clear_line(&err, "threads must be 1..=64");
    assert!(!is_mounted(tp.mnt()));
    // fstab's and systemd's own options are theirs, and pass.
    let m = mount_at_with(
        &tp.pool,
        tp.mnt(),
        &tp.dir().join("m.out"),
        &[],
        &["-o", "defaults,nofail,_netdev,noauto,x-systemd.requires-mounts-for=/srv,threads=2,noexec"],
    );
    let (_, opts) = findmnt(tp.mnt()).unwrap();
    assert!(opts.split(',').any(|o| o == "noexec"), "{opts}");
    m.unmount();
}

#[test]
fn a_stop_by_umount_or_by_signal_logs_no_warning() {
    let tp = TestPool::new("64K", &[("V1", "8M")]);
    let m = tp.mount();
    fs::write(m.p("f"), b"x").unwrap();
    m.unmount();
    let m = tp.mount();
    let pid = m.daemon_pid();
    // SAFETY: a signal to the daemon this test started.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    m.wait_daemon_exit();
    let log = fs::read_to_string(tp.pool.join("mount.log")).unwrap();
    assert_eq!(log.matches("unmounted ").count(), 2, "two clean stops:\n{log}");
    let bad: Vec<&str> = log.lines().filter(|l| l.contains(" WARN ") || l.contains(" ERROR ")).collect();
    assert!(bad.is_empty(), "a clean stop logs no warning:\n{}", bad.join("\n"));
}

#[test]
fn a_foreground_mount_tells_systemd_when_it_is_ready_and_when_it_stops() {
    let tp = TestPool::new("64K", &[("V1", "8M")]);
    let sock_path = tp.dir().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let log = fs::File::create(tp.dir().join("fg.log")).unwrap();
    let mut child = Command::new(bin())
        .args(["mount", s(&tp.pool), s(tp.mnt()), "--foreground"])
        .env("NOTIFY_SOCKET", &sock_path)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let mut buf = [0u8; 4096];
    let got = sock.recv(&mut buf);
    let ready = got.map(|n| String::from_utf8_lossy(&buf[..n]).into_owned());
    // Serving by the time READY=1 arrives: the control files answer.
    let serving = status_of(tp.mnt());
    // SAFETY: a signal to the child this test started.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let stopping = sock.recv(&mut buf).map(|n| String::from_utf8_lossy(&buf[..n]).into_owned());
    let exit = child.wait().unwrap();
    lazy_unmount(tp.mnt());
    let ready = ready.expect("READY=1 within a minute");
    assert!(ready.lines().any(|l| l == "READY=1"), "{ready:?}");
    assert!(ready.lines().any(|l| l.starts_with("STATUS=serving ")), "{ready:?}");
    assert!(serving, "the mount serves when READY=1 is sent");
    assert_eq!(stopping.expect("STOPPING=1 after SIGTERM").trim(), "STOPPING=1");
    assert!(exit.success(), "the daemon exits 0 after SIGTERM: {exit}");
    assert!(!is_mounted(tp.mnt()));
}

fn status_of(mnt: &Path) -> bool {
    fs::read(mnt.join(".ferry/status")).is_ok()
}

/// Under systemd, stderr is the journal's stream (JOURNAL_STREAM names it) and the daemon
/// logs to the journal's socket instead, with priorities. The test stands in for journald:
/// in a private mount namespace, a datagram socket at /run/systemd/journal/socket.
#[test]
fn under_systemd_the_daemon_logs_to_the_journal() {
    let tp = TestPool::new("64K", &[("V1", "8M")]);
    let d = tp.dir();
    let script = format!(
        r#"
set -eu
mount -t tmpfs run /run
mkdir -p /run/systemd/journal
python3 - >{d}/journal.txt <<'PY' &
import socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
s.bind("/run/systemd/journal/socket")
open("{d}/listening", "w").close()
s.settimeout(60)
seen = b""
while b"unmounted " not in seen:
    seen += s.recv(1 << 16) + b"\n--\n"
sys.stdout.write(seen.decode(errors="replace"))
PY
while [ ! -e {d}/listening ]; do sleep 0.05; done
exec 2>{d}/stderr.txt
export JOURNAL_STREAM=$(stat -L -c '%d:%i' /proc/self/fd/2)
{bin} mount {pool} {mnt} --foreground &
daemon=$!
while [ ! -e {mnt}/.ferry/status ]; do sleep 0.05; done
{bin} umount {mnt} >/dev/null
wait $daemon
wait
"#,
        d = s(d),
        bin = s(&bin()),
        pool = s(&tp.pool),
        mnt = s(tp.mnt())
    );
    let out =
        Command::new("unshare").args(["--mount", "--propagation", "private", "bash", "-c", &script]).output().unwrap();
    lazy_unmount(tp.mnt());
    let journal = fs::read_to_string(d.join("journal.txt")).unwrap_or_default();
    let stderr = fs::read_to_string(d.join("stderr.txt")).unwrap_or_default();
    assert!(
        out.status.success(),
        "{}{}\njournal:\n{journal}\nstderr:\n{stderr}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(journal.contains("SYSLOG_IDENTIFIER=ferryfs"), "{journal}");
    // MESSAGE is sent in the journal protocol's binary form (a length, then the bytes).
    assert!(journal.contains("MESSAGE") && journal.contains("serving "), "{journal}");
    assert!(journal.contains("PRIORITY=5"), "info records carry the journal's priority 5:\n{journal}");
    assert!(journal.contains("TARGET=ferryfs::mount"), "{journal}");
    assert!(journal.contains("unmounted "), "{journal}");
    assert!(!stderr.contains("serving"), "the log went to the journal, not to stderr:\n{stderr}");
}

/// A flush an application waits for (an fsync, an O_DSYNC write) waits on a worker of its
/// own, never holding the last thread that serves requests: while two are held in flight
/// (the `fsync` pause point), a mount served by a single thread still answers a read, a
/// create, a write and a listing; then both return and their bytes read back. (With the
/// flush on the serving thread, every one of those would wait behind it, and the check that
/// the flushes are still in flight would fail.)
#[test]
fn an_fsync_in_flight_leaves_the_mount_serving() {
    use std::os::unix::fs::OpenOptionsExt;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::time::Instant;

    let tp = TestPool::new("64K", &[("V1", "8M")]);
    let out = tp.dir().join("mount-cmd.out");
    let m = mount_at_with(&tp.pool, tp.mnt(), &out, &[("FERRYFS_PAUSE", "fsync=10s")], &["--threads", "1"]);
    let mnt = tp.mnt().to_path_buf();
    fs::write(mnt.join("other"), b"other bytes").unwrap();

    let journal = pattern(300_000, 11);
    let record = pattern(4096, 12);
    let returned = Arc::new(AtomicUsize::new(0));
    let fsyncer = std::thread::spawn({
        let (path, data, returned) = (mnt.join("journal"), journal.clone(), returned.clone());
        move || {
            let mut f = fs::File::create(path).unwrap();
            f.write_all(&data).unwrap();
            let r = f.sync_all();
            returned.fetch_add(1, Ordering::SeqCst);
            r
        }
    });
    let dsync_writer = std::thread::spawn({
        let (path, data, returned) = (mnt.join("records"), record.clone(), returned.clone());
        move || {
            let mut f = fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .custom_flags(libc::O_DSYNC)
                .open(path)
                .unwrap();
            let r = f.write_all(&data);
            returned.fetch_add(1, Ordering::SeqCst);
            r
        }
    });
    // The daemon says when each flush is in its pause (a safety limit, not a timing check).
    let start = Instant::now();
    while fs::read_to_string(tp.pool.join("mount.log")).unwrap_or_default().matches("pause point fsync").count() < 2 {
        assert_eq!(returned.load(Ordering::SeqCst), 0, "a flush returned before its pause point");
        assert!(start.elapsed() < Duration::from_secs(60), "the two flushes did not both reach their pause point");
        std::thread::sleep(Duration::from_millis(20));
    }

    assert_eq!(fs::read(mnt.join("other")).unwrap(), b"other bytes");
    fs::write(mnt.join("third"), b"written while two flushes wait").unwrap();
    let mut names: Vec<String> =
        fs::read_dir(&mnt).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    assert_eq!(names, [".ferry", "journal", "other", "records", "third"]);
    assert_eq!(returned.load(Ordering::SeqCst), 0, "the mount served the others only after a flush");

    fsyncer.join().unwrap().expect("the held fsync succeeds");
    dsync_writer.join().unwrap().expect("the held O_DSYNC write succeeds");
    assert_eq!(fs::read(mnt.join("journal")).unwrap(), journal);
    assert_eq!(fs::read(mnt.join("records")).unwrap(), record);
    assert_eq!(fs::read(mnt.join("third")).unwrap(), b"written while two flushes wait");
    m.unmount();
}
