//! Mounting with mount(2), unmounting, and making sure no mount is left
//! behind (Drop guard, SIGINT/SIGTERM/SIGHUP handler, panic hook), plus the
//! private temporary mount point used when `--mnt` is not given.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::sync::atomic::{AtomicI32, AtomicPtr, Ordering};

/// Mount point currently mounted, for the signal handler / panic hook.
/// Whoever swaps it to null owns the unmount (so it happens exactly once).
static ACTIVE_MNT: AtomicPtr<libc::c_char> = AtomicPtr::new(std::ptr::null_mut());
/// Private temporary directory to rmdir on a signal (only ever rmdir, never
/// a recursive removal: nothing mounted can be deleted through it).
static TEMP_DIR: AtomicPtr<libc::c_char> = AtomicPtr::new(std::ptr::null_mut());
/// `all`: the child running at the moment, to pass a signal on to.
static CHILD_PID: AtomicI32 = AtomicI32::new(0);

fn cstr(s: &str) -> CString {
    CString::new(s).expect("no NUL in path")
}

fn last_err(what: &str) -> io::Error {
    let e = io::Error::last_os_error();
    io::Error::new(e.kind(), format!("{what}: {e}"))
}

/// Unmount ACTIVE_MNT if this caller is the first to claim it. Async-signal-safe.
fn detach_active() {
    let p = ACTIVE_MNT.swap(std::ptr::null_mut(), Ordering::SeqCst);
    if !p.is_null() {
        // SAFETY: p is a leaked, NUL-terminated CString; umount2 is async-signal-safe.
        // It is leaked on purpose here (freeing is not async-signal-safe).
        unsafe { libc::umount2(p, libc::MNT_DETACH) };
    }
}

extern "C" fn on_signal(sig: libc::c_int) {
    let child = CHILD_PID.load(Ordering::SeqCst);
    if child > 0 {
        // SAFETY: kill/waitpid are async-signal-safe; the child unmounts itself on SIGTERM.
        unsafe {
            libc::kill(child, libc::SIGTERM);
            libc::waitpid(child, std::ptr::null_mut(), 0);
        }
    }
    detach_active();
    let d = TEMP_DIR.swap(std::ptr::null_mut(), Ordering::SeqCst);
    if !d.is_null() {
        // SAFETY: leaked NUL-terminated CString; rmdir is async-signal-safe.
        unsafe { libc::rmdir(d) };
    }
    // SAFETY: _exit is async-signal-safe.
    unsafe { libc::_exit(128 + sig) };
}

/// Install the SIGINT/SIGTERM/SIGHUP handler and the panic hook (once per process).
pub fn install_cleanup_handlers() {
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: sigaction with a valid extern "C" handler; all signals blocked while it runs.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_signal as *const () as libc::sighandler_t;
            libc::sigfillset(&mut sa.sa_mask);
            libc::sigaction(sig, &sa, std::ptr::null_mut());
        }
    }
    let prev = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        // A panic in any thread (daemon or workload) removes the mount at once.
        detach_active();
        prev(info);
    }));
}

/// Remember the child process `all` is waiting for (0: none).
pub fn set_child(pid: u32) {
    CHILD_PID.store(pid as i32, Ordering::SeqCst);
}

/// A private (0700) temporary directory, removed with rmdir(2) when dropped
/// or on a signal.
pub struct TempDir {
    pub path: String,
}

impl TempDir {
    /// mkdtemp(3) under $TMPDIR (default /var/tmp).
    pub fn new(prefix: &str) -> io::Result<TempDir> {
        let base = std::env::var("TMPDIR").ok().filter(|s| !s.is_empty()).unwrap_or_else(|| "/var/tmp".into());
        let tmpl = cstr(&format!("{}/{prefix}.XXXXXX", base.trim_end_matches('/')));
        let raw = tmpl.into_raw();
        // SAFETY: raw is a writable NUL-terminated template ending in XXXXXX.
        let r = unsafe { libc::mkdtemp(raw) };
        // SAFETY: raw came from into_raw above.
        let owned = unsafe { CString::from_raw(raw) };
        if r.is_null() {
            return Err(last_err("mkdtemp"));
        }
        let path = owned.to_str().expect("utf-8 path").to_string();
        // mkdtemp makes it 0700 already.
        let old = TEMP_DIR.swap(cstr(&path).into_raw(), Ordering::SeqCst);
        if !old.is_null() {
            // SAFETY: from into_raw; only one TempDir per process in practice.
            drop(unsafe { CString::from_raw(old) });
        }
        Ok(TempDir { path })
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let p = TEMP_DIR.swap(std::ptr::null_mut(), Ordering::SeqCst);
        if !p.is_null() {
            // SAFETY: from into_raw in new().
            drop(unsafe { CString::from_raw(p) });
        }
        if let Err(e) = std::fs::remove_dir(&self.path) {
            eprintln!("warning: rmdir {}: {e}", self.path);
        }
    }
}

/// Make sure `path` is a real directory (not a symlink) that root can mount
/// on: create it 0700 if missing; return its canonical path.
fn prepare_mountpoint(path: &str) -> io::Result<String> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_symlink() => {
            return Err(io::Error::other(format!("mount point {path} is a symlink; refusing")));
        }
        Ok(m) if !m.is_dir() => return Err(io::Error::other(format!("mount point {path} is not a directory"))),
        Ok(m) => {
            if m.uid() != 0 || m.permissions().mode() & 0o022 != 0 {
                eprintln!("warning: mount point {path} is not a root-owned directory writable only by its owner");
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            std::fs::DirBuilder::new()
                .mode(0o700)
                .create(path)
                .map_err(|e| io::Error::new(e.kind(), format!("mkdir {path}: {e}")))?;
        }
        Err(e) => return Err(io::Error::new(e.kind(), format!("{path}: {e}"))),
    }
    let canon = std::fs::canonicalize(path)?;
    canon.to_str().map(str::to_string).ok_or_else(|| io::Error::other("mount point is not UTF-8"))
}

pub struct Mount {
    /// Canonical path of the mount point.
    pub path: String,
    pub dev: OwnedFd,
    /// /sys/fs/fuse/connections/<conn> (minor of st_dev); None if not found.
    pub conn: Option<u32>,
    mounted: bool,
}

impl Mount {
    pub fn new(path: &str) -> io::Result<Mount> {
        let path = prepare_mountpoint(path)?;
        // SAFETY: open(2) with a valid C string.
        let fd = unsafe { libc::open(c"/dev/fuse".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
        if fd < 0 {
            return Err(last_err("open /dev/fuse"));
        }
        // SAFETY: fd was just returned by open and is owned by nobody else.
        let dev = unsafe { OwnedFd::from_raw_fd(fd) };
        let opts = cstr(&format!("fd={fd},rootmode=40000,user_id=0,group_id=0,default_permissions"));
        let target = cstr(&path);
        // Publish the mount point before mounting, so that a signal arriving
        // right after mount(2) still removes it (umount2 of a path that is
        // not mounted yet fails harmlessly).
        let published = target.clone().into_raw();
        ACTIVE_MNT.store(published, Ordering::SeqCst);
        // SAFETY: all pointers are valid NUL-terminated strings.
        let r = unsafe {
            libc::mount(
                c"ferryprobe".as_ptr(),
                target.as_ptr(),
                c"fuse.ferryprobe".as_ptr(),
                libc::MS_NOSUID | libc::MS_NODEV,
                opts.as_ptr() as *const libc::c_void,
            )
        };
        if r < 0 {
            let e = last_err("mount");
            let p = ACTIVE_MNT.swap(std::ptr::null_mut(), Ordering::SeqCst);
            if !p.is_null() {
                // SAFETY: p came from into_raw above.
                drop(unsafe { CString::from_raw(p) });
            }
            return Err(e);
        }
        // The connection number is the minor of the mount's st_dev; stat
        // would block until INIT is answered, so take it from mountinfo.
        let conn = conn_from_mountinfo(&path);
        Ok(Mount { path, dev, conn, mounted: true })
    }

    pub fn fd(&self) -> RawFd {
        self.dev.as_raw_fd()
    }

    pub fn unmount(&mut self) -> io::Result<()> {
        if !self.mounted {
            return Ok(());
        }
        self.mounted = false;
        let p = ACTIVE_MNT.swap(std::ptr::null_mut(), Ordering::SeqCst);
        if p.is_null() {
            // Already detached by the panic hook.
            return Ok(());
        }
        // SAFETY: p came from CString::into_raw in new().
        let target = unsafe { CString::from_raw(p) };
        // SAFETY: valid C string.
        if unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) } < 0 {
            return Err(last_err("umount2"));
        }
        Ok(())
    }

    /// Last resort if the daemon threads do not notice the unmount.
    pub fn abort_connection(&self) {
        if let Some(c) = self.conn {
            let _ = std::fs::write(format!("/sys/fs/fuse/connections/{c}/abort"), "1");
        }
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        if let Err(e) = self.unmount() {
            eprintln!("warning: {e}");
        }
    }
}

/// Undo the octal escapes (`\040` etc.) of /proc/self/mountinfo.
fn unescape_mountinfo(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let oct = |j: usize| b.get(j).filter(|c| (b'0'..=b'7').contains(c)).map(|c| c - b'0');
        if b[i] == b'\\'
            && let (Some(x), Some(y), Some(z)) = (oct(i + 1), oct(i + 2), oct(i + 3))
        {
            out.push(x.wrapping_mul(64).wrapping_add(y * 8).wrapping_add(z));
            i += 4;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn conn_from_mountinfo(path: &str) -> Option<u32> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    // fields: id parent major:minor root mountpoint ... - fstype source options
    info.lines().rev().find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        if f.len() > 4 && unescape_mountinfo(f[4]) == path && l.contains(" - fuse.ferryprobe ") {
            f[2].split(':').nth(1)?.parse().ok()
        } else {
            None
        }
    })
}
