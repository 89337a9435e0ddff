//! Running a mount: the daemon (foreground session), daemonizing, and unmounting.

mod options;

pub use options::{threads_default, MountOptions, THREADS_MAX};

use std::fs::OpenOptions;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::io::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fuser::{Config, MountOption, SessionACL};
use log::{info, warn};

use crate::catalog::store::replace_file;
use crate::engine::Engine;
use crate::fs::{FerryFs, CONTROL_DIR_NAME, READAHEAD_BYTES, WRITE_MAX_BYTES};
use crate::migrate::Migrations;
use crate::pool::{MountedInfo, Pool, MOUNTED_FILE, MOUNT_LOG_FILE};
use crate::report::Status;

/// Environment variable that tells a foreground mount to report readiness on stdout (set by
/// the parent when daemonizing).
const NOTIFY_ENV: &str = "FERRYFS_NOTIFY_READY";
const READY_LINE: &str = "ready";
/// How long `umount` waits for the daemon to write its catalog and exit.
const UMOUNT_WAIT: Duration = Duration::from_secs(120);
pub fn status_of_mount(mnt: &Path) -> Option<Status> {
    let b = std::fs::read(mnt.join(CONTROL_DIR_NAME).join("status")).ok()?;
    serde_json::from_slice(&b).ok()
}

/// The status of the ferryfs mount at `mnt`, or one line saying why there is none: not a
/// ferryfs mount, or one whose control files belong to another user.
pub fn mount_status(mnt: &Path) -> Result<Status, String> {
    match std::fs::read(mnt.join(CONTROL_DIR_NAME).join("status")) {
        // The control directory is there, its files are not ours to read. (Inside a directory
        // we may not search, such as another user's pool, even the lookup fails.)
        Err(e)
            if e.raw_os_error() == Some(libc::EACCES)
                && (mnt.join(CONTROL_DIR_NAME).symlink_metadata().is_ok() || is_ferryfs_mountpoint(mnt)) =>
        {
            Err(format!("{}: a ferryfs mount of another user; only the mount's owner may use it", mnt.display()))
        }
        Ok(b) => serde_json::from_slice(&b).map_err(|_| format!("{} is not a ferryfs mount", mnt.display())),
        Err(_) => Err(format!("{} is not a ferryfs mount", mnt.display())),
    }
}

/// Mount in the background: start a foreground mount as a detached child and wait until it
/// says it is ready (or why it is not).
pub fn mount_daemon(pool: &Path, mnt: &Path, opts: &MountOptions) -> Result<u32, String> {
    // Refuse a non-pool before writing anything into it (the daemon's log goes there).
    if !pool.join(crate::catalog::store::SNAP_FILE).is_file() {
        return Err(crate::catalog::StoreError::NotAPool { path: pool.to_path_buf() }.to_string());
    }
    let exe = std::env::current_exe().map_err(|e| format!("can't find the ferryfs binary: {e}"))?;
    let log_path = pool.join(MOUNT_LOG_FILE);
    let log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .map_err(|e| format!("{}: {e}", log_path.display()))?;
    let mut cmd = Command::new(exe);
    cmd.arg("mount")
        .arg(pool)
        .arg(mnt)
        .arg("--foreground")
        .arg("-o")
        .arg(opts.to_list())
        .env(NOTIFY_ENV, "1")
        // Not the journal's stream any more, whatever the parent's stderr was.
        .env_remove("JOURNAL_STREAM")
        .env(crate::logging::LOG_FILE_ENV, &log_path)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log);
    // SAFETY: setsid is async-signal-safe; the child leaves our session so that a closing
    // terminal doesn't signal the daemon.
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    let mut child = cmd.spawn().map_err(|e| format!("can't start the mount daemon: {e}"))?;
    let pid = child.id();
    let mut line = String::new();
    let stdout = child.stdout.take().expect("piped");
    let _ = BufReader::new(stdout).read_line(&mut line);
    let line = line.trim();
    if line == READY_LINE {
        return Ok(pid);
    }
    let _ = child.wait();
    if line.is_empty() {
        Err(format!("the mount daemon exited; see {}", log_path.display()))
    } else {
        Err(line.to_string())
    }
}

/// Mount and serve until unmounted. Reports readiness (or the error) on stdout when run as a
/// daemon child, and to systemd (sd_notify: READY=1, STOPPING=1) when it runs as a unit of
/// `Type=notify`.
pub fn mount_foreground(pool: &Path, mnt: &Path, opts: &MountOptions) -> Result<(), String> {
    let notify = std::env::var_os(NOTIFY_ENV).is_some();
    match crate::failpoint::init_from_env().and_then(|()| prepare(pool, mnt, opts)) {
        Ok((session, migrations, mnt, recovered)) => {
            // Jobs start once the mount serves (they don't need it, but the admin does). A
            // read-only mount starts none: queued jobs wait for a read-write mount.
            if !opts.read_only {
                crate::migrate::resume(&migrations, &recovered);
            }
            let pool_dir = migrations.engine.pool_dir.clone();
            if notify {
                println!("{READY_LINE}");
                let _ = std::io::stdout().flush();
                // Detach from the parent's pipe.
                if let Ok(null) = OpenOptions::new().write(true).open("/dev/null") {
                    // SAFETY: dup2 onto stdout, both fds valid.
                    unsafe { libc::dup2(null.as_raw_fd(), 1) };
                }
            } else {
                println!("mounted {} at {} (pid {})", pool_dir.display(), mnt.display(), std::process::id());
            }
            let _ = sd_notify::notify(&[
                sd_notify::NotifyState::Ready,
                sd_notify::NotifyState::Status(&format!("serving {} at {}", pool_dir.display(), mnt.display())),
            ]);
            info!(
                "serving {} at {}{}",
                pool_dir.display(),
                mnt.display(),
                if opts.read_only { " (read-only)" } else { "" }
            );
            let res = serve(session, &mnt);
            // destroy() folded the log into a snapshot and cut the rings off: the pool
            // is clean now. If the fold failed, the marker stays, and the next open treats
            // the stop as unclean (recovery, and the rings read: catalog/ring.rs).
            // A read-only mount changed nothing (it recovered first if it had to).
            if opts.read_only || migrations.engine.stopped_cleanly.load(std::sync::atomic::Ordering::Acquire) {
                let _ = std::fs::remove_file(pool_dir.join(MOUNTED_FILE));
            }
            info!("unmounted {}", mnt.display());
            res
        }
        Err(e) => {
            if notify {
                println!("{e}");
            }
            Err(e)
        }
    }
}

/// Run the session until the mount goes away (umount, `ferryfs umount`, a signal).
///
/// The session's own end would try to unmount once more, after the kernel has already
/// unmounted (its loop ends at the kernel's DESTROY, before the connection closes), and log
/// a warning on every stop. So the session runs in the background and its mount handle is
/// never dropped; a mount that outlives a failed session is detached here instead.
fn serve(session: fuser::Session<FerryFs>, mnt: &Path) -> Result<(), String> {
    let mut bg = session.spawn().map_err(|e| format!("can't start serving: {e}"))?;
    let worker = std::mem::replace(&mut bg.guard, std::thread::spawn(|| Ok(())));
    let res = worker.join().unwrap_or_else(|_| Err(std::io::Error::other("the FUSE session panicked")));
    std::mem::forget(bg);
    if res.is_err() && crate::mounts::at(mnt).is_some_and(|m| m.is_ferryfs()) {
        detach(mnt);
    }
    res.map_err(|e| format!("FUSE session ended with an error: {e}"))
}

/// Unmount lazily: gone from the namespace now, the session ends when the last file closes.
fn detach(mnt: &Path) -> bool {
    let Ok(c) = std::ffi::CString::new(mnt.as_os_str().as_encoded_bytes()) else { return false };
    // SAFETY: umount2 with a valid C string.
    let detached = unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } == 0;
    detached || Command::new("fusermount3").arg("-uz").arg(mnt).status().is_ok_and(|s| s.success())
}

type Prepared = (fuser::Session<FerryFs>, Arc<Migrations>, PathBuf, crate::engine::RecoveryReport);

/// A ferryfs mount whose daemon died (kill -9, OOM) leaves the kernel mount behind, and
/// every access to it fails with ENOTCONN. Detach it, so that the pool can be mounted again.
/// Returns whether there was one.
pub fn detach_dead_mount(mnt: &Path) -> bool {
    let abs = std::path::absolute(mnt).unwrap_or_else(|_| mnt.to_path_buf());
    if !connection_is_dead(&abs) || !is_ferryfs_mountpoint(&abs) {
        return false;
    }
    let ok = detach(&abs);
    if ok {
        warn!("detached the dead ferryfs mount at {}", abs.display());
    }
    ok
}

/// Is `mnt` a ferryfs mountpoint, by the mount table (a mount without allow_other answers
/// nothing to other users, not even a stat)?
fn is_ferryfs_mountpoint(mnt: &Path) -> bool {
    let abs = std::path::absolute(mnt).unwrap_or_else(|_| mnt.to_path_buf());
    crate::mounts::at(&abs).is_some_and(|m| m.is_ferryfs())
}

/// Whether the FUSE mount at `mnt` has lost its daemon. Asked with statfs(2), which the
/// kernel always sends to the daemon: a stat would be answered from the attribute cache for
/// up to ten seconds after the daemon died, and miss it. ENOTCONN once the connection is
/// gone. A daemon that served through io_uring leaves it dying for some milliseconds after
/// its process is gone (its queues are torn down after it): a request then ends ECANCELED
/// or ECONNABORTED, and is asked again until the answer is ENOTCONN (or, for at most a
/// second, not).
fn connection_is_dead(mnt: &Path) -> bool {
    let Ok(c) = std::ffi::CString::new(mnt.as_os_str().as_encoded_bytes()) else { return false };
    for _ in 0..100 {
        // SAFETY: statfs with a valid C string and a zeroed out-parameter of the right type.
        let rc = unsafe {
            let mut st: libc::statfs = std::mem::zeroed();
            libc::statfs(c.as_ptr(), &mut st)
        };
        match (rc, std::io::Error::last_os_error().raw_os_error()) {
            (0, _) => return false,
            (_, Some(libc::ENOTCONN)) => return true,
            (_, Some(libc::ECANCELED | libc::ECONNABORTED)) => std::thread::sleep(Duration::from_millis(10)),
            _ => return false,
        }
    }
    false
}

/// Readahead of the block device under `path`, in KiB, if it has one.
fn backing_readahead_kb(path: &Path) -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    let dev = std::fs::metadata(path).ok()?.dev();
    let (major, minor) = (libc::major(dev), libc::minor(dev));
    [
        format!("/sys/class/bdi/{major}:{minor}/read_ahead_kb"),
        format!("/sys/dev/block/{major}:{minor}/queue/read_ahead_kb"),
        // A partition: the queue belongs to the whole disk.
        format!("/sys/dev/block/{major}:{minor}/../queue/read_ahead_kb"),
    ]
    .iter()
    .find_map(|p| std::fs::read_to_string(p).ok()?.trim().parse().ok())
}

/// Best effort: raise the mount's readahead (bdi read_ahead_kb) to at least
/// [`READAHEAD_BYTES`], and to the readahead of the device under the pool, so that a cold
/// sequential read through the mount asks the images for as much as a native read would.
fn raise_readahead(mnt: &Path, pool_dir: &Path) {
    let Some(dev) = crate::mounts::at(mnt).map(|m| m.majmin) else { return };
    let kb = backing_readahead_kb(pool_dir).unwrap_or(0).max(READAHEAD_BYTES as u64 / 1024);
    let path = format!("/sys/class/bdi/{dev}/read_ahead_kb");
    if let Err(e) = std::fs::write(&path, format!("{kb}")) {
        info!("could not raise readahead ({path}): {e}");
    }
}

/// The kernel's limit on a FUSE request, in pages.
const MAX_PAGES_LIMIT: &str = "/proc/sys/fs/fuse/max_pages_limit";

/// Let the kernel send writes of up to [`WRITE_MAX_BYTES`] (and reads of up to the
/// readahead): raise `fs.fuse.max_pages_limit` (kernel 6.13 and later; root only) if it is
/// lower. The limit is a ceiling for every FUSE file system, each of which still asks for
/// its own size at init, so raising it changes nothing for the others; it is never lowered.
/// Where it can't be raised, requests stay at the kernel's limit and the mount says so.
fn raise_max_pages() {
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as u64;
    let want = (WRITE_MAX_BYTES.max(READAHEAD_BYTES) as u64).div_ceil(page);
    let Some(have) = std::fs::read_to_string(MAX_PAGES_LIMIT).ok().and_then(|s| s.trim().parse::<u64>().ok()) else {
        return; // an older kernel: its own fixed limit applies
    };
    if have >= want {
        return;
    }
    match std::fs::write(MAX_PAGES_LIMIT, want.to_string()) {
        Ok(()) => info!("raised {MAX_PAGES_LIMIT} from {have} to {want}: requests of up to {} KiB", want * page / 1024),
        Err(e) => info!("requests stay at most {} KiB: could not raise {MAX_PAGES_LIMIT} ({e})", have * page / 1024),
    }
}

/// How long a mount waits for the pool lock of a daemon that is dying (killed, its main
/// thread already a zombie, another thread still finishing an fsync).
const DYING_HOLDER_WAIT: Duration = Duration::from_secs(20);

/// Open the pool for writing. A lock held by a process that is gone or dying is waited for:
/// right after a kill -9, the kernel may still be tearing the old daemon down.
fn open_pool_after_crash(pool: &Path) -> Result<Pool, String> {
    let start = std::time::Instant::now();
    loop {
        match Pool::open(pool) {
            Err(crate::pool::PoolError::Locked { holder, by, .. })
                if start.elapsed() < DYING_HOLDER_WAIT
                    && holder
                        .as_ref()
                        .map(|h| h.0)
                        .or(by.as_ref().map(|b| b.pid))
                        .is_some_and(|pid| !pid_alive(pid)) =>
            {
                std::thread::sleep(Duration::from_millis(50));
            }
            r => return r.map_err(|e| e.to_string()),
        }
    }
}

fn prepare(pool: &Path, mnt: &Path, opts: &MountOptions) -> Result<Prepared, String> {
    opts.check()?;
    detach_dead_mount(mnt);
    let mnt = mnt.canonicalize().map_err(|e| format!("mountpoint {}: {e}", mnt.display()))?;
    if !mnt.is_dir() {
        return Err(format!("mountpoint {} is not a directory", mnt.display()));
    }
    if status_of_mount(&mnt).is_some() {
        return Err(format!("{} is already a ferryfs mount", mnt.display()));
    }
    let mut p = open_pool_after_crash(pool)?;
    // The marker outlives a mount that did not stop cleanly.
    let unclean = p.dir.join(MOUNTED_FILE).exists();
    // A read-only mount leaves the catalog as it is, even the path of a device that moved.
    let volumes = p.open_volumes(!opts.read_only).map_err(|e| e.to_string())?;
    let report = p.report.clone();
    let pool_dir = p.dir.clone();
    let (store, lock) = p.into_parts();
    // The pool lock holds for as long as this process lives: no second writer, ever.
    std::mem::forget(lock);
    let engine = Arc::new(Engine::new(store, pool_dir.clone(), crate::storage::real(), volumes));
    if report.torn_tail_bytes > 0 {
        warn!(
            "catalog log: dropped a torn tail of {} bytes ({} whole frames after the damage), \
             never synced: what a crash or a power cut leaves of appends in flight",
            report.torn_tail_bytes, report.frames_dropped
        );
    }
    // After a clean unmount the catalog is consistent as it is, and a read-only mount leaves
    // it so (job records wait for a read-write mount). After an unclean stop, even a
    // read-only mount recovers first, as a journaling file system replays its journal.
    let recovered = if opts.read_only && !unclean {
        crate::engine::RecoveryReport::default()
    } else {
        engine.recover(unclean).map_err(|e| format!("recovery: {e}"))?
    };
    if unclean {
        warn!(
            "the previous mount stopped without unmounting: replayed {} ops, freed {} orphans, \
             zeroed {} tails and {} free runs",
            report.ops_replayed, recovered.orphans_freed, recovered.tails_zeroed, recovered.free_runs_zeroed
        );
    }
    let migrations = Migrations::new(engine);
    migrations.set_max_jobs(opts.max_jobs);
    migrations.copy_rate.set_rate(opts.copy_rate);
    let info = MountedInfo { pid: std::process::id(), mountpoint: mnt.to_string_lossy().into_owned() };
    replace_file(&pool_dir, MOUNTED_FILE, &serde_json::to_vec(&info).expect("serializes"))
        .map_err(|e| e.to_string())?;

    let mut config = Config::default();
    config.mount_options = vec![
        MountOption::FSName(format!("{}{}", crate::mounts::SOURCE_PREFIX, pool_dir.display())),
        // The kernel's own option, which makes the type fuse.ferryfs (fuser's Subtype goes
        // only to fusermount3, and a mount by root would be of type plain fuse).
        MountOption::CUSTOM("subtype=ferryfs".into()),
        MountOption::DefaultPermissions,
        if opts.dev { MountOption::Dev } else { MountOption::NoDev },
        MountOption::NoSuid,
    ];
    for (on, flag) in
        [(opts.read_only, MountOption::RO), (opts.no_exec, MountOption::NoExec), (opts.no_atime, MountOption::NoAtime)]
    {
        if on {
            config.mount_options.push(flag);
        }
    }
    // SAFETY: geteuid can't fail.
    config.acl = if unsafe { libc::geteuid() } == 0 { SessionACL::All } else { SessionACL::Owner };
    config.n_threads = Some(opts.threads);
    config.clone_fd = true;
    block_signals_and_unmount_on_them(mnt.clone())?;
    raise_max_pages();
    let fs = FerryFs::new(migrations.engine.clone(), migrations.clone(), mnt.clone())
        .read_only(opts.read_only)
        .writeback(opts.writeback)
        .uring(opts.uring)
        .threads(opts.threads);
    let notifier = fs.notifier_slot();
    let transport = fs.transport_slot();
    let session = fuser::Session::new(fs, &mnt, &config).map_err(|e| {
        let _ = std::fs::remove_file(pool_dir.join(MOUNTED_FILE));
        format!("mount {}: {e}", mnt.display())
    })?;
    let _ = notifier.set(session.notifier());
    if opts.uring && !session.uses_io_uring() {
        warn!(
            "-o uring: the kernel did not offer FUSE over io_uring (is /sys/module/fuse/parameters/enable_uring Y?); \
             serving through /dev/fuse"
        );
    }
    let _ = transport
        .set(crate::fs::FuseTransport { io_uring: session.uses_io_uring(), ring_requests: session.ring_requests() });
    raise_readahead(&mnt, &pool_dir);
    Ok((session, migrations, mnt, recovered))
}

/// SIGTERM, SIGINT and SIGHUP unmount (lazily), which ends the session cleanly.
fn block_signals_and_unmount_on_them(mnt: PathBuf) -> Result<(), String> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGTERM, SIGINT, SIGHUP])
        .map_err(|e| format!("can't take signals: {e}"))?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            if let Some(sig) = signals.forever().next() {
                info!("signal {sig}: unmounting");
                let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
                detach(&mnt);
            }
        })
        .map_err(|e| format!("can't start the signal thread: {e}"))?;
    Ok(())
}

fn pid_alive(pid: u32) -> bool {
    // SAFETY: kill with signal 0 only checks for existence.
    let r = unsafe { libc::kill(pid as libc::pid_t, 0) };
    if r != 0 {
        return std::io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH);
    }
    // A zombie is as good as gone.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => !s.rsplit(')').next().is_some_and(|rest| rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

/// Can the pool lock be taken now? (Taken and released at once.)
fn lock_free(lock_path: &Path) -> bool {
    let Ok(f) = std::fs::File::open(lock_path) else { return true };
    // SAFETY: flock on an fd we own; closing it releases the lock.
    unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) == 0 }
}

/// Unmount and wait for the daemon to finish writing the catalog.
/// `lazy`: detach it even if files are open, and don't wait.
pub fn umount(mnt: &Path, lazy: bool) -> Result<(), String> {
    if detach_dead_mount(mnt) {
        return Ok(());
    }
    let mnt = mnt.canonicalize().map_err(|e| format!("{}: {e}", mnt.display()))?;
    let status = mount_status(&mnt)?;
    if lazy {
        return if detach(&mnt) { Ok(()) } else { Err(format!("can't detach {}", mnt.display())) };
    }
    let c = std::ffi::CString::new(mnt.as_os_str().as_encoded_bytes()).map_err(|e| e.to_string())?;
    // SAFETY: umount2 with a valid C string.
    if unsafe { libc::umount2(c.as_ptr(), 0) } != 0 {
        let err = std::io::Error::last_os_error();
        match err.raw_os_error() {
            Some(libc::EBUSY) => return Err(format!("{} is busy: close the files open on it first", mnt.display())),
            Some(libc::EPERM) => {
                let ok = Command::new("fusermount3").arg("-u").arg(&mnt).status().map(|s| s.success()).unwrap_or(false);
                if !ok {
                    return Err(format!("fusermount3 -u {} failed", mnt.display()));
                }
            }
            _ => return Err(format!("unmount {}: {err}", mnt.display())),
        }
    }
    // Done means the pool can be mounted again: the daemon is gone and so is its lock. (Its
    // main thread turns zombie before the other threads have exited and closed the lock.)
    let start = Instant::now();
    let lock_path = Path::new(&status.pool).join(crate::pool::LOCK_FILE);
    while pid_alive(status.pid) || !lock_free(&lock_path) {
        if start.elapsed() > UMOUNT_WAIT {
            return Err(format!(
                "unmounted, but the daemon (pid {}) has not exited; see {}/{MOUNT_LOG_FILE}",
                status.pid, status.pool
            ));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(())
}
