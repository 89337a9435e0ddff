//! Extended attributes and POSIX ACLs of a mounted pool, as users and their tools see them:
//! libc's *xattr calls and their errors, getfattr/setfattr, setfacl/getfacl, cp -a,
//! rsync -aX and tar --xattrs, across a remount and a kill -9.

mod common;

use std::ffi::CString;
use std::fs::{self, File};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};

use common::*;

/// A pool with one 64 MiB volume, mounted.
fn setup() -> (TestPool, Mounted) {
    let tp = TestPool::new("64K", &[("V1", "64M")]);
    let m = tp.mount();
    (tp, m)
}

fn cpath(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).unwrap()
}

fn cname(n: &str) -> CString {
    CString::new(n).unwrap()
}

fn check(n: isize) -> std::io::Result<usize> {
    if n < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

fn set(p: &Path, name: &str, value: &[u8], flags: i32) -> std::io::Result<usize> {
    let (p, n) = (cpath(p), cname(name));
    // SAFETY: valid C strings and a buffer of the length passed.
    check(unsafe { libc::setxattr(p.as_ptr(), n.as_ptr(), value.as_ptr().cast(), value.len(), flags) } as isize)
}

/// getxattr into a buffer of `size` bytes (0: ask for the size).
fn get_sized(p: &Path, name: &str, size: usize) -> std::io::Result<Vec<u8>> {
    let (p, n) = (cpath(p), cname(name));
    let mut buf = vec![0u8; size];
    // SAFETY: valid C strings and a buffer of the length passed.
    let got = check(unsafe { libc::getxattr(p.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), size) })?;
    buf.truncate(if size == 0 { 0 } else { got });
    if size == 0 {
        buf = got.to_le_bytes().to_vec();
    }
    Ok(buf)
}

/// The value, asked the way tools do: the size first, then the bytes.
fn get(p: &Path, name: &str) -> std::io::Result<Vec<u8>> {
    let size = usize::from_le_bytes(get_sized(p, name, 0)?.try_into().unwrap());
    if size == 0 {
        return Ok(Vec::new());
    }
    get_sized(p, name, size)
}

fn list_sized(p: &Path, size: usize) -> std::io::Result<Vec<u8>> {
    let p = cpath(p);
    let mut buf = vec![0u8; size];
    // SAFETY: valid C strings and a buffer of the length passed.
    let got = check(unsafe { libc::listxattr(p.as_ptr(), buf.as_mut_ptr().cast(), size) })?;
    if size == 0 {
        return Ok(got.to_le_bytes().to_vec());
    }
    buf.truncate(got);
    Ok(buf)
}

fn list(p: &Path) -> Vec<String> {
    let size = usize::from_le_bytes(list_sized(p, 0).unwrap().try_into().unwrap());
    if size == 0 {
        return Vec::new();
    }
    let raw = list_sized(p, size).unwrap();
    raw.split(|&b| b == 0).filter(|n| !n.is_empty()).map(|n| String::from_utf8_lossy(n).into_owned()).collect()
}

fn remove(p: &Path, name: &str) -> std::io::Result<usize> {
    let (p, n) = (cpath(p), cname(name));
    // SAFETY: valid C strings.
    check(unsafe { libc::removexattr(p.as_ptr(), n.as_ptr()) } as isize)
}

fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn as_nobody(args: &[&str]) -> Output {
    Command::new("setpriv")
        .args(["--reuid=nobody", "--regid=nogroup", "--clear-groups"])
        .args(args)
        .output()
        .expect("setpriv runs")
}

/// `getfattr -d` of every user.* attribute under `dir`, paths relative to it.
fn dump(dir: &Path) -> String {
    let out = run(Command::new("getfattr").args(["-R", "-d", "-e", "hex", "."]).current_dir(dir));
    String::from_utf8(out.stdout).unwrap()
}

/// A value with every byte, NULs included: a value is bytes, not a string.
fn binary(len: usize, seed: u64) -> Vec<u8> {
    let mut v = pattern(len, seed);
    if len > 2 {
        v[1] = 0;
        v[len - 1] = 0xff;
    }
    v
}

#[test]
fn values_come_back_byte_exact_with_linux_errors() {
    let (_tp, m) = setup();
    let f = m.p("f");
    fs::write(&f, b"data").unwrap();
    assert_eq!(list(&f), Vec::<String>::new(), "a new file has no attributes");
    assert_errno(get(&f, "user.missing"), libc::ENODATA, "getxattr of a missing attribute");

    let v = binary(1000, 1);
    set(&f, "user.bin", &v, 0).unwrap();
    set(&f, "user.empty", b"", 0).unwrap();
    assert_eq!(get(&f, "user.bin").unwrap(), v);
    assert_eq!(get(&f, "user.empty").unwrap(), b"");
    assert_eq!(list(&f), ["user.bin", "user.empty"]);

    // The size probe, then a buffer too small: ERANGE, for values and for the list.
    assert_eq!(get_sized(&f, "user.bin", 0).unwrap(), 1000usize.to_le_bytes());
    assert_errno(get_sized(&f, "user.bin", 999), libc::ERANGE, "getxattr into a small buffer");
    assert_errno(list_sized(&f, 5), libc::ERANGE, "listxattr into a small buffer");

    // Create and replace.
    assert_errno(set(&f, "user.bin", b"x", libc::XATTR_CREATE), libc::EEXIST, "XATTR_CREATE of an existing one");
    assert_errno(set(&f, "user.nope", b"x", libc::XATTR_REPLACE), libc::ENODATA, "XATTR_REPLACE of a missing one");
    set(&f, "user.bin", b"short", libc::XATTR_REPLACE).unwrap();
    assert_eq!(get(&f, "user.bin").unwrap(), b"short", "a replace shrinks the value");
    set(&f, "user.new", b"n", libc::XATTR_CREATE).unwrap();

    // Limits: a name of 255 bytes passes, 256 is ERANGE; a value of 64 KiB passes, more is E2BIG.
    let name255 = format!("user.{}", "n".repeat(250));
    set(&f, &name255, b"long name", 0).unwrap();
    assert_eq!(get(&f, &name255).unwrap(), b"long name");
    assert_errno(set(&f, &format!("user.{}", "n".repeat(251)), b"x", 0), libc::ERANGE, "a 256-byte name");
    assert_errno(set(&f, "user.big", &vec![7u8; 65537], 0), libc::E2BIG, "a value over 64 KiB");

    // Namespaces: unknown ones are not supported.
    assert_errno(set(&f, "os2.thing", b"x", 0), libc::EOPNOTSUPP, "an unknown namespace");
    assert_errno(set(&f, "system.other", b"x", 0), libc::EOPNOTSUPP, "an unknown system attribute");
    set(&f, "trusted.t", b"root may", 0).unwrap();
    set(&f, "security.s", b"label", 0).unwrap();
    assert_eq!(get(&f, "trusted.t").unwrap(), b"root may");

    // Remove.
    remove(&f, "user.empty").unwrap();
    assert_errno(remove(&f, "user.empty"), libc::ENODATA, "removexattr of a removed one");
    assert_errno(get(&f, "user.empty"), libc::ENODATA, "getxattr of a removed one");

    // The per-node cap (256 KiB of names and values): three 64 KiB values fit, a fourth is
    // ENOSPC, and the space comes back when one goes.
    let g = m.p("g");
    fs::write(&g, b"").unwrap();
    for i in 0..3 {
        set(&g, &format!("user.v{i}"), &binary(65536, i), 0).unwrap();
    }
    assert_errno(set(&g, "user.v3", &binary(65536, 3), 0), libc::ENOSPC, "past the per-node cap");
    remove(&g, "user.v0").unwrap();
    set(&g, "user.v3", &binary(65536, 3), 0).unwrap();
    assert_eq!(get(&g, "user.v3").unwrap(), binary(65536, 3));

    // Directories and symlinks' targets hold them too; user.* on a fifo is the kernel's EPERM.
    fs::create_dir(m.p("d")).unwrap();
    set(&m.p("d"), "user.dir", b"yes", 0).unwrap();
    assert_eq!(get(&m.p("d"), "user.dir").unwrap(), b"yes");
    let fifo = cpath(&m.p("p"));
    // SAFETY: a valid C string.
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o644) }, 0);
    assert_errno(set(&m.p("p"), "user.x", b"x", 0), libc::EPERM, "user.* on a fifo");
    set(&m.p("p"), "trusted.x", b"x", 0).unwrap();

    // The control files hold none and take none.
    assert_errno(set(&m.p(".ferry/status"), "user.x", b"x", 0), libc::EPERM, "setxattr on .ferry/status");
    assert_errno(get(&m.p(".ferry/status"), "user.x"), libc::ENODATA, "getxattr on .ferry/status");
    assert_errno(remove(&m.p(".ferry/control"), "user.x"), libc::EPERM, "removexattr on .ferry/control");
    drop(m);
    fsck_clean(&_tp.pool);
}

#[test]
fn attributes_survive_a_remount_and_a_kill9_after_fsync() {
    let tp = TestPool::new("64K", &[("V1", "64M")]);
    let m = tp.mount();
    let f = m.p("f");
    fs::write(&f, b"data").unwrap();
    fs::create_dir(m.p("d")).unwrap();
    let values: Vec<(String, Vec<u8>)> = (0..20).map(|i| (format!("user.k{i}"), binary(i * 301, i as u64))).collect();
    for (n, v) in &values {
        set(&f, n, v, 0).unwrap();
    }
    set(&m.p("d"), "user.on-dir", b"dir value", 0).unwrap();
    remove(&f, "user.k3").unwrap();
    File::open(&f).unwrap().sync_all().unwrap();
    m.kill9();

    let want = |f: &Path| {
        for (n, v) in &values {
            if n == "user.k3" {
                assert_errno(get(f, n), libc::ENODATA, "the removed attribute stays removed");
            } else {
                assert_eq!(&get(f, n).unwrap(), v, "{n} after the crash");
            }
        }
        assert_eq!(list(f).len(), values.len() - 1);
    };
    let m = tp.mount();
    want(&m.p("f"));
    assert_eq!(get(&m.p("d"), "user.on-dir").unwrap(), b"dir value");
    m.unmount();
    fsck_clean(&tp.pool);
    let m = tp.mount();
    want(&m.p("f"));
    // An unlinked file's attributes go with it: a new file of the same name has none.
    fs::remove_file(m.p("f")).unwrap();
    fs::write(m.p("f"), b"").unwrap();
    assert_eq!(list(&m.p("f")), Vec::<String>::new());
    m.unmount();
    fsck_clean(&tp.pool);
}

/// The tree the copying tools carry: files and a directory with user.* attributes.
fn make_tree(root: &Path) {
    fs::create_dir_all(root.join("sub")).unwrap();
    fs::write(root.join("a.txt"), b"alpha").unwrap();
    fs::write(root.join("sub/b.bin"), pattern(70_000, 3)).unwrap();
    set(&root.join("a.txt"), "user.mime_type", b"text/plain", 0).unwrap();
    set(&root.join("a.txt"), "user.checksum", &binary(32, 9), 0).unwrap();
    set(&root.join("sub/b.bin"), "user.big", &binary(4000, 4), 0).unwrap();
    set(&root.join("sub"), "user.dirnote", b"kept", 0).unwrap();
}

#[test]
fn cp_rsync_and_tar_keep_user_attributes() {
    let (tp, m) = setup();
    let src = m.p("src");
    make_tree(&src);
    let want = dump(&src);
    assert!(want.contains("user.mime_type=0x746578742f706c61696e"), "{want}");

    run(Command::new("cp").arg("-a").arg(&src).arg(m.p("cp")));
    assert_eq!(dump(&m.p("cp")), want, "cp -a");

    run(Command::new("rsync").arg("-aX").arg(format!("{}/", src.display())).arg(m.p("rsync")));
    assert_eq!(dump(&m.p("rsync")), want, "rsync -aX");

    let tar = tp.dir().join("t.tar");
    run(Command::new("tar")
        .args(["--xattrs", "--xattrs-include=user.*", "-cf"])
        .arg(&tar)
        .arg("-C")
        .arg(&src)
        .arg("."));
    fs::create_dir(m.p("tar")).unwrap();
    run(Command::new("tar").args(["--xattrs", "--xattrs-include=user.*", "-xf"]).arg(&tar).arg("-C").arg(m.p("tar")));
    assert_eq!(dump(&m.p("tar")), want, "tar --xattrs");

    // Out of the mount and back: the attributes leave as they are.
    let outside = tp.dir().join("outside");
    run(Command::new("cp").arg("-a").arg(&src).arg(&outside));
    if dump(&outside) == want {
        run(Command::new("rsync").arg("-aX").arg(format!("{}/", outside.display())).arg(m.p("back")));
        assert_eq!(dump(&m.p("back")), want, "rsync -aX back in");
    }
    m.unmount();
    let m = tp.mount();
    for d in ["cp", "rsync", "tar"] {
        assert_eq!(dump(&m.p(d)), want, "{d} after a remount");
    }
}

#[test]
fn trusted_attributes_are_roots_and_setcap_works() {
    let (_tp, m) = setup();
    let f = m.p("f");
    fs::write(&f, b"#!/bin/sh\n").unwrap();
    fs::set_permissions(&f, fs::Permissions::from_mode(0o777)).unwrap();
    fs::set_permissions(m.p(""), fs::Permissions::from_mode(0o777)).unwrap();
    let out = as_nobody(&["setfattr", "-n", "trusted.x", "-v", "1", s(&f)]);
    assert!(!out.status.success(), "an unprivileged user set a trusted attribute");
    assert!(String::from_utf8_lossy(&out.stderr).contains("Operation not permitted"), "{out:?}");
    let out = as_nobody(&["setfattr", "-n", "user.x", "-v", "1", s(&f)]);
    assert!(out.status.success(), "the owner's write permission is enough for user.*: {out:?}");
    set(&f, "trusted.x", b"1", 0).unwrap();
    let out = as_nobody(&["getfattr", "-n", "trusted.x", s(&f)]);
    assert!(!String::from_utf8_lossy(&out.stdout).contains("trusted.x"), "nobody sees trusted.*: {out:?}");

    // File capabilities are security.capability, which the kernel checks and stores.
    run(Command::new("setcap").args(["cap_net_raw+ep", s(&f)]));
    let out = run(Command::new("getcap").arg(&f));
    assert!(String::from_utf8_lossy(&out.stdout).contains("cap_net_raw=ep"), "{out:?}");
}

#[test]
fn the_kernel_enforces_acls() {
    let (tp, m) = setup();
    fs::set_permissions(m.p(""), fs::Permissions::from_mode(0o755)).unwrap();
    let f = m.p("secret");
    fs::write(&f, b"for nobody's eyes").unwrap();
    fs::set_permissions(&f, fs::Permissions::from_mode(0o600)).unwrap();
    let read = || as_nobody(&["cat", s(&f)]).status.success();
    assert!(!read(), "0600 root's file");

    run(Command::new("setfacl").args(["-m", "u:nobody:r", s(&f)]));
    assert!(read(), "the ACL lets nobody read");
    let mode = fs::metadata(&f).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o640, "the group bits show the ACL's mask");
    let acl = String::from_utf8(run(Command::new("getfacl").arg("-c").arg(&f)).stdout).unwrap();
    assert!(acl.contains("user:nobody:r--") && acl.contains("mask::r--"), "{acl}");

    // A chmod narrows the mask, and with it the named entry.
    fs::set_permissions(&f, fs::Permissions::from_mode(0o600)).unwrap();
    assert!(!read(), "chmod 600 masks the ACL entry");
    let acl = String::from_utf8(run(Command::new("getfacl").arg("-c").arg(&f)).stdout).unwrap();
    assert!(acl.contains("mask::---"), "{acl}");
    fs::set_permissions(&f, fs::Permissions::from_mode(0o640)).unwrap();
    assert!(read());

    run(Command::new("setfacl").args(["-x", "u:nobody", s(&f)]));
    assert!(!read(), "the entry removed, nobody reads no more");
    run(Command::new("setfacl").args(["-m", "u:nobody:r", s(&f)]));
    run(Command::new("setfacl").args(["-b", s(&f)]));
    assert!(!read(), "setfacl -b removes the ACL");

    // A default ACL is inherited by what is created under it, umask or not.
    let d = m.p("shared");
    fs::create_dir(&d).unwrap();
    run(Command::new("setfacl").args(["-d", "-m", "u:nobody:rwx", s(&d)]));
    run(Command::new("sh").arg("-c").arg(format!("umask 077; echo x > {0}/new; mkdir {0}/sub", d.display())));
    let acl = String::from_utf8(run(Command::new("getfacl").arg("-c").arg(d.join("new"))).stdout).unwrap();
    assert!(acl.contains("user:nobody:rwx\t#effective:rw-") || acl.contains("user:nobody:rwx"), "{acl}");
    assert!(as_nobody(&["cat", s(&d.join("new"))]).status.success(), "nobody reads through the inherited ACL");
    let acl = String::from_utf8(run(Command::new("getfacl").arg("-c").arg(d.join("sub"))).stdout).unwrap();
    assert!(acl.contains("default:user:nobody:rwx"), "a new directory inherits the default ACL: {acl}");

    // All of it is in the catalog.
    m.unmount();
    fsck_clean(&tp.pool);
    let m = tp.mount();
    assert!(as_nobody(&["cat", s(&m.p("shared/new"))]).status.success(), "after a remount");
    let acl = String::from_utf8(run(Command::new("getfacl").arg("-c").arg(m.p("shared/sub"))).stdout).unwrap();
    assert!(acl.contains("default:user:nobody:rwx"), "{acl}");
}

/// What a write drops, as on a local file system: set-user-ID, and set-group-ID where the
/// group may execute, when the writer lacks CAP_FSETID; a file capability on any write,
/// root's too, also when it was set after earlier writes (which the kernel may have taken
/// as "nothing to drop on this inode"). The mount takes these on itself rather than answer
/// a security.capability lookup before every write.
#[test]
fn a_write_drops_set_id_bits_and_file_capabilities() {
    let (_tp, m) = setup();
    use std::io::Write;
    fs::set_permissions(m.p(""), fs::Permissions::from_mode(0o777)).unwrap();
    let mode_of = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o7777;
    let append_as_nobody = |p: &Path| {
        let out = as_nobody(&["sh", "-c", &format!("echo more >> '{}'", p.display())]);
        assert!(out.status.success(), "nobody appends to {}: {out:?}", p.display());
    };
    for (mode, after) in [(0o6777, 0o0777), (0o4766, 0o0766), (0o2767, 0o2767), (0o0777, 0o0777)] {
        let f = m.p(&format!("f{mode:o}"));
        fs::write(&f, b"data\n").unwrap();
        fs::set_permissions(&f, fs::Permissions::from_mode(mode)).unwrap();
        append_as_nobody(&f);
        // `stat -c %a` asks the kernel for the mode alone (statx STATX_MODE), which it
        // answers from its attribute cache unless the mount told it the mode changed.
        let shown = String::from_utf8(run(Command::new("stat").args(["-c", "%a", s(&f)])).stdout).unwrap();
        assert_eq!(shown.trim(), format!("{after:o}"), "stat -c %a right after a write by nobody to a {mode:o} file");
        assert_eq!(mode_of(&f), after, "mode {mode:o} after a write by nobody");
        // Twice: the second write meets what the first left.
        append_as_nobody(&f);
        assert_eq!(mode_of(&f), after, "mode {mode:o} after a second write by nobody");
        assert_eq!(fs::read(&f).unwrap(), b"data\nmore\nmore\n");
    }
    // What else drops them, as on ext4: a chown (whoever asks), a truncate or an O_TRUNC
    // open by a caller without CAP_FSETID; root's truncate keeps them.
    let g = m.p("g");
    for (who, cmd, after) in [
        ("root", "chown nobody g", 0o777),
        ("root", "chgrp nogroup g", 0o777),
        ("root", "truncate -s 1 g", 0o6777),
        ("nobody", "truncate -s 1 g", 0o777),
        ("nobody", ": > g", 0o777),
    ] {
        fs::write(&g, b"data\n").unwrap();
        fs::set_permissions(&g, fs::Permissions::from_mode(0o6777)).unwrap();
        let script = format!("cd '{}' && {cmd}", m.p("").display());
        let out = if who == "root" {
            Command::new("sh").args(["-c", &script]).output().unwrap()
        } else {
            as_nobody(&["sh", "-c", &script])
        };
        assert!(out.status.success(), "{who}: {cmd}: {out:?}");
        let shown = String::from_utf8(run(Command::new("stat").args(["-c", "%a", s(&g)])).stdout).unwrap();
        assert_eq!(shown.trim(), format!("{after:o}"), "{who}: {cmd} on a 6777 file");
    }

    // Root keeps its set-ID bits (CAP_FSETID).
    let f = m.p("root-suid");
    fs::write(&f, b"x").unwrap();
    fs::set_permissions(&f, fs::Permissions::from_mode(0o4755)).unwrap();
    fs::OpenOptions::new().append(true).open(&f).unwrap().write_all(b"y").unwrap();
    assert_eq!(mode_of(&f), 0o4755, "root's write keeps set-user-ID");

    // A capability set after writes is dropped by the next write, root's included.
    let f = m.p("cap");
    let mut w = fs::OpenOptions::new().create(true).append(true).open(&f).unwrap();
    w.write_all(b"#!/bin/sh\n").unwrap();
    w.write_all(b"true\n").unwrap();
    run(Command::new("setcap").args(["cap_net_raw+ep", s(&f)]));
    assert!(String::from_utf8_lossy(&run(Command::new("getcap").arg(&f)).stdout).contains("cap_net_raw=ep"));
    w.write_all(b"exit 0\n").unwrap();
    drop(w);
    let caps = run(Command::new("getcap").arg(&f));
    assert!(!String::from_utf8_lossy(&caps.stdout).contains("cap_net_raw"), "a write drops the capability: {caps:?}");
    assert!(get(&f, "security.capability").is_err(), "security.capability is gone");
    assert_eq!(fs::read(&f).unwrap(), b"#!/bin/sh\ntrue\nexit 0\n");

    // The same through a read-write handle (the kernel's page cache path), and a truncate.
    use std::os::unix::fs::FileExt;
    let rw = fs::OpenOptions::new().read(true).write(true).open(&f).unwrap();
    rw.write_all_at(b"#", 0).unwrap();
    run(Command::new("setcap").args(["cap_net_raw+ep", s(&f)]));
    rw.write_all_at(b"#", 0).unwrap();
    assert!(get(&f, "security.capability").is_err(), "a write through a read-write handle drops it");
    run(Command::new("setcap").args(["cap_net_raw+ep", s(&f)]));
    rw.set_len(4).unwrap();
    assert!(get(&f, "security.capability").is_err(), "a truncate drops it");
    run(Command::new("setcap").args(["cap_net_raw+ep", s(&f)]));
    run(Command::new("chown").args(["nobody", s(&f)]));
    assert!(get(&f, "security.capability").is_err(), "a chown drops it");
    assert_eq!(fs::read(&f).unwrap(), b"#!/b");
}
