//! Fifos, sockets and device nodes in a mounted pool: catalog nodes that hold no tracks, with
//! the mode, device number, owner and times stat(2) expects; a fifo carries data through the
//! kernel; a device opens only in a `-o dev` mount; merges and fsck take them in stride.

mod common;

use std::ffi::CString;
use std::fs::{self, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::process::Command;
use std::time::{SystemTime, UNIX_EPOCH};

use common::*;

const NOBODY: u32 = 65534;

fn cpath(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).unwrap()
}

fn mknod(p: &Path, mode: u32, dev: libc::dev_t) -> std::io::Result<()> {
    let c = cpath(p);
    // SAFETY: a valid C string.
    if unsafe { libc::mknod(c.as_ptr(), mode, dev) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

fn now_secs() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() as i64
}

/// The special files every test here makes: a fifo, a socket, /dev/null's twin and a loop
/// device's.
fn make_all(m: &Mounted) -> UnixListener {
    mknod(&m.p("fifo"), libc::S_IFIFO | 0o640, 0).unwrap();
    mknod(&m.p("null"), libc::S_IFCHR | 0o666, libc::makedev(1, 3)).unwrap();
    mknod(&m.p("loop"), libc::S_IFBLK | 0o600, libc::makedev(7, 200)).unwrap();
    UnixListener::bind(m.p("sock")).unwrap()
}

fn assert_all(m: &Mounted, since_secs: i64) {
    let f = fs::symlink_metadata(m.p("fifo")).unwrap();
    assert!(f.file_type().is_fifo(), "{f:?}");
    assert_eq!(f.mode() & 0o7777, 0o640 & !0o022, "the umask applies");
    assert_eq!((f.rdev(), f.size(), f.blocks(), f.nlink()), (0, 0, 0, 1));
    let n = fs::symlink_metadata(m.p("null")).unwrap();
    assert!(n.file_type().is_char_device());
    assert_eq!(n.rdev(), libc::makedev(1, 3));
    assert_eq!(n.mode() & 0o7777, 0o644);
    let b = fs::symlink_metadata(m.p("loop")).unwrap();
    assert!(b.file_type().is_block_device());
    assert_eq!((b.rdev(), b.mode() & 0o7777), (libc::makedev(7, 200), 0o600));
    let s = fs::symlink_metadata(m.p("sock")).unwrap();
    assert!(s.file_type().is_socket());
    assert_eq!(s.rdev(), 0);
    for md in [&f, &n, &b, &s] {
        assert_eq!((md.uid(), md.gid(), md.size(), md.blocks()), (0, 0, 0, 0));
        for t in [md.atime(), md.mtime(), md.ctime()] {
            assert!(t >= since_secs - 1 && t <= now_secs() + 1, "times are the creation's: {t}, {md:?}");
        }
    }
}

#[test]
fn special_files_stat_as_made_and_persist() {
    // SAFETY: umask has no failure mode; this test process owns its umask.
    unsafe { libc::umask(0o022) };
    let tp = TestPool::new("64K", &[("V1", "64M")]);
    let m = tp.mount();
    let t0 = now_secs();
    let listener = make_all(&m);
    assert_all(&m, t0);
    // The socket is a real one: the kernel connects to it by its inode.
    let mut c = UnixStream::connect(m.p("sock")).unwrap();
    let (mut server, _) = listener.accept().unwrap();
    c.write_all(b"ping").unwrap();
    let mut got = [0u8; 4];
    server.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"ping");
    drop((c, server, listener));

    // An unprivileged user makes a fifo, owned by them (mknod of a device is the kernel's EPERM).
    fs::set_permissions(m.p(""), fs::Permissions::from_mode(0o777)).unwrap();
    let out = Command::new("setpriv")
        .args(["--reuid=nobody", "--regid=nogroup", "--clear-groups", "mkfifo", "-m", "0600", s(&m.p("theirs"))])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let t = fs::symlink_metadata(m.p("theirs")).unwrap();
    assert_eq!((t.uid(), t.gid(), t.mode() & 0o7777), (NOBODY, NOBODY, 0o600));
    let out = Command::new("setpriv")
        .args(["--reuid=nobody", "--regid=nogroup", "--clear-groups", "mknod", s(&m.p("dev")), "c", "1", "3"])
        .output()
        .unwrap();
    assert!(!out.status.success(), "nobody made a device node");

    // Links, renames and unlinks work as on any node.
    fs::hard_link(m.p("fifo"), m.p("fifo2")).unwrap();
    assert_eq!(fs::symlink_metadata(m.p("fifo")).unwrap().nlink(), 2);
    fs::rename(m.p("fifo2"), m.p("fifo3")).unwrap();
    fs::remove_file(m.p("fifo3")).unwrap();
    assert_eq!(fs::symlink_metadata(m.p("fifo")).unwrap().nlink(), 1);
    fs::create_dir(m.p("d")).unwrap();
    fs::rename(m.p("theirs"), m.p("d/theirs")).unwrap();
    fs::remove_file(m.p("d/theirs")).unwrap();
    fs::remove_dir(m.p("d")).unwrap();
    assert_errno(mknod(&m.p("null"), libc::S_IFIFO | 0o644, 0), libc::EEXIST, "mknod over an existing name");

    // ls names them apart from the data sets; a remount and a kill -9 keep them.
    let l = ls_json(tp.mnt());
    let kinds: Vec<(String, String)> = l["special_files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| (f["path"].as_str().unwrap().to_string(), f["kind"].as_str().unwrap().to_string()))
        .collect();
    assert!(kinds.contains(&("/fifo".into(), "fifo".into())), "{l:#}");
    assert!(kinds.contains(&("/sock".into(), "socket".into())), "{l:#}");
    let null = l["special_files"].as_array().unwrap().iter().find(|f| f["path"] == "/null").unwrap();
    assert_eq!((null["kind"].as_str(), null["device"].as_str()), (Some("char-device"), Some("1:3")));
    assert!(l["data_sets"].as_array().unwrap().is_empty(), "no special file is a data set: {l:#}");
    m.unmount();
    fsck_clean(&tp.pool);
    let m = tp.mount();
    assert_all(&m, t0);
    m.kill9();
    let m = tp.mount();
    assert_all(&m, t0);
    m.unmount();
    let out = ferry_ok(&["fsck", s(&tp.pool)]);
    assert!(out.contains("4 special files"), "{out}");
}

#[test]
fn a_fifo_carries_data_between_a_writer_and_a_reader() {
    let tp = TestPool::new("64K", &[("V1", "64M")]);
    let m = tp.mount();
    mknod(&m.p("pipe"), libc::S_IFIFO | 0o666, 0).unwrap();
    let path = m.p("pipe");
    let payload = pattern(300_000, 5);
    let want = payload.clone();
    let writer = std::thread::spawn(move || {
        let mut w = OpenOptions::new().write(true).open(&path).unwrap();
        w.write_all(&payload).unwrap();
    });
    let mut got = Vec::new();
    fs::File::open(m.p("pipe")).unwrap().read_to_end(&mut got).unwrap();
    writer.join().unwrap();
    assert_bytes_eq(&got, &want, "what went through the fifo");
    // Through a shell, the way scripts use one.
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!("(echo hello > {0} &) ; cat {0}", m.p("pipe").display()))
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "hello\n", "{out:?}");
    assert_eq!(fs::symlink_metadata(m.p("pipe")).unwrap().size(), 0, "nothing of it reaches the pool");
}

#[test]
fn a_device_node_opens_only_in_a_dev_mount() {
    let tp = TestPool::new("64K", &[("V1", "64M")]);
    let m = tp.mount();
    mknod(&m.p("null"), libc::S_IFCHR | 0o666, libc::makedev(1, 3)).unwrap();
    assert_errno(OpenOptions::new().write(true).open(m.p("null")), libc::EACCES, "a device in a nodev mount");
    assert_errno(fs::File::open(m.p("null")), libc::EACCES, "a device in a nodev mount, for reading");
    m.unmount();

    let m = mount_at_with(&tp.pool, tp.mnt(), &tp.dir().join("dev.out"), &[], &["-o", "dev"]);
    let mut w = OpenOptions::new().write(true).open(m.p("null")).unwrap();
    w.write_all(&[1u8; 10_000]).unwrap();
    let mut got = Vec::new();
    fs::File::open(m.p("null")).unwrap().read_to_end(&mut got).unwrap();
    assert!(got.is_empty(), "it reads like /dev/null");
    assert_eq!(fs::metadata(m.p("null")).unwrap().size(), 0);
    drop(w);
    m.unmount();
    let (code, err) = ferry_err(&["mount", s(&tp.pool), s(tp.mnt()), "-o", "suid"]);
    assert_ne!(code, 0, "{err}");
}

#[test]
fn a_merge_moves_the_data_sets_and_leaves_special_files_be() {
    let tp = TestPool::new("64K", &[("V1", "64M"), ("V2", "64M")]);
    let m = tp.mount();
    fs::create_dir(m.p("db")).unwrap();
    fs::write(m.p("db/a"), pattern(1_000_000, 1)).unwrap();
    mknod(&m.p("db/fifo"), libc::S_IFIFO | 0o644, 0).unwrap();
    mknod(&m.p("db/null"), libc::S_IFCHR | 0o644, libc::makedev(1, 3)).unwrap();
    fs::write(m.p("db/b"), pattern(500_000, 2)).unwrap();
    let mnt = s(tp.mnt()).to_string();
    ferry_ok(&["merge", &mnt, "V1", "--into", "V2", "--wait"]);
    for d in ls_json(tp.mnt())["data_sets"].as_array().unwrap() {
        assert_eq!(d["volumes"], serde_json::json!(["V2"]), "{d:#}");
    }
    assert_eq!(fs::read(m.p("db/a")).unwrap(), pattern(1_000_000, 1));
    assert_eq!(fs::read(m.p("db/b")).unwrap(), pattern(500_000, 2));
    assert!(fs::symlink_metadata(m.p("db/fifo")).unwrap().file_type().is_fifo());
    assert_eq!(fs::symlink_metadata(m.p("db/null")).unwrap().rdev(), libc::makedev(1, 3));
    ferry_ok(&["volume", "retire", &mnt, "V1"]);
    m.unmount();
    fsck_clean(&tp.pool);
}
