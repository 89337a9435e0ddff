//! Shared harness for the integration tests: temp pools, real FUSE mounts that are always
//! unmounted (even when a test panics), and helpers around the `ferryfs` CLI.
#![allow(dead_code)]

pub mod jobs;

use std::ffi::OsStr;
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

use serde_json::Value;
use tempfile::TempDir;

/// The exit codes docs/cli.md promises.
pub mod exit {
    pub const ERROR: i32 = 1;
    pub const USAGE: i32 = 2;
    pub const REFUSED: i32 = 3;
    pub const JOB_FAILED: i32 = 4;
    pub const JOB_CANCELLED: i32 = 5;
    pub const STOPPED: i32 = 6;
}

/// The binary under test.
pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_ferryfs"))
}

/// A path as `&str` (temp paths are always UTF-8).
pub fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// Runs `ferryfs ARGS...` and returns its output, whatever the exit status.
pub fn ferry<I, A>(args: I) -> Output
where
    I: IntoIterator<Item = A>,
    A: AsRef<OsStr>,
{
    Command::new(bin()).args(args).stdin(Stdio::null()).output().expect("spawn ferryfs")
}

/// Formats a command line for messages.
fn cmdline<A: AsRef<OsStr>>(args: &[A]) -> String {
    let mut v = vec!["ferryfs".to_string()];
    v.extend(args.iter().map(|a| a.as_ref().to_string_lossy().into_owned()));
    v.join(" ")
}

/// Runs `ferryfs ARGS...`, panics with stdout and stderr unless it exits 0; returns stdout.
pub fn ferry_ok<A: AsRef<OsStr>>(args: &[A]) -> String {
    let out = ferry(args);
    if !out.status.success() {
        panic!(
            "`{}` failed with {}\nstdout:\n{}\nstderr:\n{}",
            cmdline(args),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    String::from_utf8(out.stdout).expect("utf-8 stdout")
}

/// Runs `ferryfs ARGS...`, panics unless it exits non-zero; returns (exit code, stderr).
pub fn ferry_err<A: AsRef<OsStr>>(args: &[A]) -> (i32, String) {
    let out = ferry(args);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    if out.status.success() {
        panic!(
            "`{}` succeeded but should have failed\nstdout:\n{}\nstderr:\n{}",
            cmdline(args),
            String::from_utf8_lossy(&out.stdout),
            stderr
        );
    }
    (out.status.code().unwrap_or(-1), stderr)
}

/// `ferryfs ls TARGET --json` (TARGET is a pool or a mountpoint).
pub fn ls_json(target: &Path) -> Value {
    parse_json(&ferry_ok(&[OsStr::new("ls"), target.as_os_str(), OsStr::new("--json")]))
}

/// `ferryfs ls TARGET SUBPATH --extents --json`.
pub fn ls_json_at(target: &Path, sub: &str) -> Value {
    parse_json(&ferry_ok(&[
        OsStr::new("ls"),
        target.as_os_str(),
        OsStr::new(sub),
        OsStr::new("--extents"),
        OsStr::new("--json"),
    ]))
}

/// The `ls --json` entry for one path (e.g. "/a/b"), panics if absent.
pub fn data_set(target: &Path, path: &str) -> Value {
    let v = ls_json(target);
    v["data_sets"]
        .as_array()
        .expect("data_sets array")
        .iter()
        .find(|d| d["path"] == path)
        .cloned()
        .unwrap_or_else(|| panic!("no data set {path} in ls --json: {v:#}"))
}

/// `ferryfs volume list TARGET --json`.
pub fn volume_list_json(target: &Path) -> Value {
    parse_json(&ferry_ok(&[OsStr::new("volume"), OsStr::new("list"), target.as_os_str(), OsStr::new("--json")]))
}

/// One volume's entry in `volume list --json`.
pub fn volume_json(target: &Path, name: &str) -> Value {
    let v = volume_list_json(target);
    v["volumes"]
        .as_array()
        .expect("volumes array")
        .iter()
        .find(|d| d["name"] == name)
        .cloned()
        .unwrap_or_else(|| panic!("no volume {name} in volume list --json: {v:#}"))
}

pub fn parse_json(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}):\n{text}"))
}

/// Asserts `ferryfs fsck POOL` exits 0.
pub fn fsck_clean(pool: &Path) {
    let out = ferry([OsStr::new("fsck"), pool.as_os_str()]);
    assert!(
        out.status.success(),
        "fsck {} is not clean ({})\nstdout:\n{}\nstderr:\n{}",
        pool.display(),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Whether PATH is a mountpoint right now (from /proc/self/mountinfo).
pub fn is_mounted(path: &Path) -> bool {
    let want = fs::canonicalize(path.parent().unwrap_or(Path::new("/")))
        .map(|p| p.join(path.file_name().unwrap_or_default()))
        .unwrap_or_else(|_| path.to_path_buf());
    let Ok(info) = fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    info.lines()
        .any(|l| l.split(' ').nth(4).map(|mp| unescape_mountinfo(mp) == want.to_string_lossy()).unwrap_or(false))
}

fn unescape_mountinfo(s: &str) -> String {
    s.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace("\\134", "\\")
}

/// Reruns an unmount command while it reports the mount busy (at most ~10 s).
///
/// Tests run in parallel threads of one process: a child that another thread is starting
/// holds copies of every open file descriptor of the process until it calls exec, so a
/// mount can be briefly busy although this test has closed all its files.
pub fn retry_while_busy(mut run: impl FnMut() -> Output) -> Output {
    let mut out = run();
    for _ in 0..100 {
        let err = String::from_utf8_lossy(&out.stderr).to_lowercase();
        if out.status.success() || !err.contains("busy") {
            break;
        }
        sleep(Duration::from_millis(100));
        out = run();
    }
    out
}

/// Whether a process exists and is not a zombie.
pub fn pid_alive(pid: i32) -> bool {
    if pid <= 0 {
        return false;
    }
    // SAFETY: a signal (signal 0: an existence check) to a pid this test knows.
    if unsafe { libc::kill(pid, 0) } != 0 {
        return false;
    }
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            // state is the field after the parenthesised command name
            let state = stat.rsplit_once(')').map(|(_, r)| r.trim_start().chars().next());
            !matches!(state, Some(Some('Z')) | Some(Some('X')))
        }
        Err(_) => false,
    }
}

/// Waits (bounded) for a pid to be gone; returns whether it is.
pub fn wait_pid_gone(pid: i32, limit: Duration) -> bool {
    let start = Instant::now();
    while pid_alive(pid) {
        if start.elapsed() > limit {
            return false;
        }
        sleep(Duration::from_millis(20));
    }
    true
}

/// Runs a command with a safety limit on how long it may hang (kills it after `limit`).
/// Returns the exit status, or None when it had to be killed or could not start.
fn run_bounded(cmd: &mut Command, limit: Duration) -> Option<std::process::ExitStatus> {
    let mut child = cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null()).spawn().ok()?;
    let start = Instant::now();
    loop {
        match child.try_wait() {
            Ok(Some(st)) => return Some(st),
            Ok(None) if start.elapsed() > limit => {
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
            Ok(None) => sleep(Duration::from_millis(20)),
            Err(_) => return None,
        }
    }
}

/// Lazy-detaches a mount: `fusermount3 -uz`, then umount2(MNT_DETACH).
pub fn lazy_unmount(mnt: &Path) {
    if !is_mounted(mnt) {
        return;
    }
    let _ = run_bounded(Command::new("fusermount3").arg("-uz").arg(mnt), Duration::from_secs(20));
    if is_mounted(mnt) {
        if let Ok(c) = std::ffi::CString::new(s(mnt)) {
            // SAFETY: umount2 with a valid C string.
            unsafe {
                libc::umount2(c.as_ptr(), libc::MNT_DETACH);
            }
        }
    }
}

/// A pool in its own temp directory. When a test that did not fail drops it, the pool must
/// pass `ferryfs fsck` (unless the test broke the catalog on purpose: [`TestPool::corrupted`]).
pub struct TestPool {
    dir: TempDir,
    pub pool: PathBuf,
    mnt: PathBuf,
    fsck_on_drop: std::sync::atomic::AtomicBool,
}

impl TestPool {
    /// `ferryfs init POOL --track-size TRACK`, then `ferryfs volume add POOL NAME --size SIZE`
    /// for each (NAME, SIZE).
    pub fn new(track_size: &str, vols: &[(&str, &str)]) -> TestPool {
        let tp = TestPool::uninit();
        ferry_ok(&["init", s(&tp.pool), "--track-size", track_size]);
        for (name, size) in vols {
            tp.add_volume(name, size);
        }
        tp
    }

    /// A temp directory with the pool path chosen but no `init` run.
    pub fn uninit() -> TestPool {
        let dir = tempfile::Builder::new().prefix("ferryfs-test-").tempdir().expect("tempdir");
        let pool = dir.path().join("pool");
        let mnt = dir.path().join("mnt");
        fs::create_dir(&mnt).expect("mkdir mnt");
        TestPool { dir, pool, mnt, fsck_on_drop: std::sync::atomic::AtomicBool::new(true) }
    }

    /// This test damages the catalog on purpose: no fsck when the pool is dropped.
    pub fn corrupted(&self) {
        self.fsck_on_drop.store(false, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn add_volume(&self, name: &str, size: &str) {
        ferry_ok(&["volume", "add", s(&self.pool), name, "--size", size]);
    }

    /// The temp directory holding pool and mountpoint (for scratch files).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The mountpoint this pool mounts on.
    pub fn mnt(&self) -> &Path {
        &self.mnt
    }

    /// `ferryfs mount POOL MNT`, expecting it may fail.
    pub fn try_mount(&self) -> MountAttempt {
        try_mount(&self.pool, &self.mnt)
    }

    /// `ferryfs mount POOL MNT` (daemon mode); returns once it is serving.
    /// Drop the returned guard (or call `unmount`) before the pool; the pool's own drop
    /// also cleans up a mount that is still there.
    pub fn mount(&self) -> Mounted {
        self.mount_env(&[])
    }

    /// `mount`, with these variables in the daemon's environment (e.g. `FERRYFS_PAUSE`).
    pub fn mount_env(&self, env: &[(&str, &str)]) -> Mounted {
        mount_at_env(&self.pool, &self.mnt, &self.dir.path().join("mount-cmd.out"), env)
    }
}

/// How long a `ferryfs mount` may take before the harness gives up on it (a safety net
/// against a hung mount, not a performance check).
pub const MOUNT_HANG_LIMIT: Duration = Duration::from_secs(120);

/// Runs a prepared `ferryfs mount` command. If it hangs past [`MOUNT_HANG_LIMIT`], kills it,
/// cleans up whatever it mounted and panics.
fn spawn_mount(cmd: &mut Command, pool: &Path, mnt: &Path) -> std::process::ExitStatus {
    let mut child = cmd.spawn().expect("spawn ferryfs mount");
    let start = Instant::now();
    loop {
        if let Some(st) = child.try_wait().expect("wait for ferryfs mount") {
            return st;
        }
        if start.elapsed() > MOUNT_HANG_LIMIT {
            let _ = child.kill();
            let _ = child.wait();
            let mut guard =
                Mounted { mnt: mnt.to_path_buf(), pool: pool.to_path_buf(), pid: read_mounted_pid(pool), done: false };
            guard.force_cleanup();
            guard.done = true;
            let log = fs::read_to_string(pool.join("mount.log")).unwrap_or_default();
            panic!(
                "ferryfs mount {} {} did not return within {:?}\nmount.log:\n{log}",
                pool.display(),
                mnt.display(),
                MOUNT_HANG_LIMIT
            );
        }
        sleep(Duration::from_millis(20));
    }
}

/// The outcome of a `ferryfs mount` that may fail.
pub struct MountAttempt {
    pub status: std::process::ExitStatus,
    pub stdout: String,
    pub stderr: String,
    /// A guard when the mount succeeded (dropping it unmounts).
    pub guard: Option<Mounted>,
}

/// Runs `ferryfs mount POOL MNT` expecting it may fail; stdout and stderr go to files so a
/// daemon that keeps them open cannot hang the test.
pub fn try_mount(pool: &Path, mnt: &Path) -> MountAttempt {
    let base = mnt.parent().unwrap_or(Path::new("/tmp"));
    let name = mnt.file_name().unwrap().to_string_lossy().into_owned();
    let out_p = base.join(format!("{name}.mount-stdout"));
    let err_p = base.join(format!("{name}.mount-stderr"));
    let status = spawn_mount(
        Command::new(bin())
            .args([OsStr::new("mount"), pool.as_os_str(), mnt.as_os_str()])
            .stdin(Stdio::null())
            .stdout(fs::File::create(&out_p).expect("create stdout file"))
            .stderr(fs::File::create(&err_p).expect("create stderr file")),
        pool,
        mnt,
    );
    let guard = if is_mounted(mnt) || status.success() {
        Some(Mounted { mnt: mnt.to_path_buf(), pool: pool.to_path_buf(), pid: read_mounted_pid(pool), done: false })
    } else {
        None
    };
    MountAttempt {
        status,
        stdout: fs::read_to_string(&out_p).unwrap_or_default(),
        stderr: fs::read_to_string(&err_p).unwrap_or_default(),
        guard,
    }
}

/// Asserts an error report is one clear line: `ferryfs: error: ...`, mentioning `word`
/// (case-insensitive, if not empty), and no panic.
#[track_caller]
pub fn assert_one_clear_line(stderr: &str, word: &str) {
    assert!(!stderr.contains("panicked"), "panic instead of an error:\n{stderr}");
    assert!(!stderr.contains("RUST_BACKTRACE"), "panic instead of an error:\n{stderr}");
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "expected one line on stderr, got:\n{stderr}");
    assert!(lines[0].starts_with("ferryfs: error: "), "error line must start with `ferryfs: error: `: {stderr}");
    if !word.is_empty() {
        assert!(lines[0].to_lowercase().contains(&word.to_lowercase()), "error line must mention {word:?}: {stderr}");
    }
}

impl Drop for TestPool {
    fn drop(&mut self) {
        // Never remove the temp directory through a live mount.
        if is_mounted(&self.mnt) {
            let mut guard = Mounted {
                mnt: self.mnt.clone(),
                pool: self.pool.clone(),
                pid: read_mounted_pid(&self.pool),
                done: false,
            };
            guard.force_cleanup();
            guard.done = true;
        }
        // Every pool a passing test leaves behind must be clean.
        if self.fsck_on_drop.load(std::sync::atomic::Ordering::Relaxed)
            && !std::thread::panicking()
            && self.pool.join("catalog.snap").exists()
        {
            let out = ferry([OsStr::new("fsck"), self.pool.as_os_str()]);
            if !out.status.success() {
                panic!(
                    "fsck of the pool this test left is not clean:\n{}{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                );
            }
        }
    }
}

/// Mounts POOL on MNT in daemon mode; stdout and stderr of the CLI go to a file so a
/// daemon that keeps them open cannot hang the test.
pub fn mount_at(pool: &Path, mnt: &Path, out_file: &Path) -> Mounted {
    mount_at_env(pool, mnt, out_file, &[])
}

/// `mount_at` with variables set in the daemon's environment.
pub fn mount_at_env(pool: &Path, mnt: &Path, out_file: &Path, env: &[(&str, &str)]) -> Mounted {
    mount_at_with(pool, mnt, out_file, env, &[])
}

/// `mount_at` with variables set in the daemon's environment and more arguments
/// (`-o ro`, `--threads 2`).
pub fn mount_at_with(pool: &Path, mnt: &Path, out_file: &Path, env: &[(&str, &str)], args: &[&str]) -> Mounted {
    let out = fs::File::create(out_file).expect("create mount output file");
    let err = out.try_clone().unwrap();
    let status = spawn_mount(
        Command::new(bin())
            .args(["mount", s(pool), s(mnt)])
            .args(args)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err),
        pool,
        mnt,
    );
    let mut text = String::new();
    let _ = fs::File::open(out_file).and_then(|mut f| f.read_to_string(&mut text));
    // From here on a guard exists, so a failing check below still unmounts.
    let m = Mounted { mnt: mnt.to_path_buf(), pool: pool.to_path_buf(), pid: None, done: false };
    let log = fs::read_to_string(pool.join("mount.log")).unwrap_or_default();
    assert!(
        status.success(),
        "ferryfs mount {} {} failed ({status}):\n{text}\nmount.log:\n{log}",
        pool.display(),
        mnt.display()
    );
    assert!(
        is_mounted(mnt),
        "ferryfs mount returned 0 but {} is not a mountpoint\n{text}\nmount.log:\n{log}",
        mnt.display()
    );
    let mut m = m;
    m.pid = read_mounted_pid(pool);
    assert!(m.pid.is_some(), "{}/mounted has no pid after mount", pool.display());
    m
}

/// The daemon pid from POOL/mounted, if the file is there and parses.
pub fn read_mounted_pid(pool: &Path) -> Option<i32> {
    let text = fs::read_to_string(pool.join("mounted")).ok()?;
    let v: Value = serde_json::from_str(&text).ok()?;
    v["pid"].as_i64().map(|p| p as i32)
}

/// A running mount. Dropping it always unmounts and makes sure the daemon is gone.
pub struct Mounted {
    pub mnt: PathBuf,
    pool: PathBuf,
    pid: Option<i32>,
    done: bool,
}

impl Mounted {
    /// MNT joined with a relative path ("a/b").
    pub fn p(&self, rel: &str) -> PathBuf {
        self.mnt.join(rel.trim_start_matches('/'))
    }

    pub fn pool(&self) -> &Path {
        &self.pool
    }

    pub fn daemon_pid(&self) -> i32 {
        self.pid.expect("daemon pid")
    }

    /// Clean unmount with `ferryfs umount MNT`; asserts it works and the daemon exits.
    pub fn unmount(mut self) {
        self.done = true;
        let out = retry_while_busy(|| ferry(["umount", s(&self.mnt)]));
        let ok = out.status.success();
        let still = is_mounted(&self.mnt);
        let gone = self.pid.map(|p| wait_pid_gone(p, Duration::from_secs(60))).unwrap_or(true);
        if !ok || still || !gone {
            // Clean up before failing, so the test does not leak a mount.
            self.force_cleanup();
        }
        assert!(
            ok,
            "ferryfs umount {} failed ({}): {}",
            self.mnt.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(!still, "{} still mounted after umount", self.mnt.display());
        assert!(gone, "daemon still running after umount");
        assert!(
            !self.pool.join("mounted").exists(),
            "{}/mounted still exists after a clean umount",
            self.pool.display()
        );
    }

    /// After an unmount done by other means (e.g. `fusermount3 -u`): waits for the daemon to
    /// exit and asserts it cleaned up after itself.
    pub fn wait_daemon_exit(mut self) {
        self.done = true;
        let gone = self.pid.map(|p| wait_pid_gone(p, Duration::from_secs(60))).unwrap_or(true);
        let still = is_mounted(&self.mnt);
        if !gone || still {
            self.force_cleanup();
        }
        assert!(!still, "{} still mounted", self.mnt.display());
        assert!(gone, "daemon did not exit after the file system was unmounted");
        assert!(
            !self.pool.join("mounted").exists(),
            "{}/mounted still exists after the daemon exited",
            self.pool.display()
        );
    }

    /// SIGKILL the daemon, clean the dead mount, wait for the pid to be gone.
    pub fn kill9(mut self) {
        self.done = true;
        if let Some(pid) = self.pid {
            // SAFETY: a signal (signal 0: an existence check) to a pid this test knows.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
            }
            wait_pid_gone(pid, Duration::from_secs(30));
        }
        lazy_unmount(&self.mnt);
        if let Some(pid) = self.pid {
            assert!(!pid_alive(pid), "daemon {pid} survived SIGKILL");
        }
    }

    /// SIGKILL the daemon and wait for the pid to be gone, leaving the dead mount in place
    /// (as a crash leaves it: the next mount must cope with it).
    pub fn kill9_leave_mount(mut self) {
        self.done = true;
        if let Some(pid) = self.pid {
            // SAFETY: a signal (signal 0: an existence check) to a pid this test knows.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
            }
            assert!(wait_pid_gone(pid, Duration::from_secs(30)), "daemon {pid} survived SIGKILL");
        }
    }

    fn force_cleanup(&mut self) {
        if is_mounted(&self.mnt) {
            let _ = run_bounded(Command::new(bin()).arg("umount").arg(&self.mnt), Duration::from_secs(30));
        }
        lazy_unmount(&self.mnt);
        if let Some(pid) = self.pid {
            if !wait_pid_gone(pid, Duration::from_secs(10)) {
                // SAFETY: a signal (signal 0: an existence check) to a pid this test knows.
                unsafe {
                    libc::kill(pid, libc::SIGKILL);
                }
                wait_pid_gone(pid, Duration::from_secs(10));
            }
        }
        // A daemon that came up but whose pid we never read.
        if self.pid.is_none() {
            if let Some(pid) = read_mounted_pid(&self.pool) {
                if pid_alive(pid) {
                    // SAFETY: a signal (signal 0: an existence check) to a pid this test knows.
                    unsafe {
                        libc::kill(pid, libc::SIGKILL);
                    }
                    wait_pid_gone(pid, Duration::from_secs(10));
                }
            }
        }
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if !self.done {
            self.done = true;
            self.force_cleanup();
        }
    }
}

/// Deterministic pseudo-random bytes (xorshift), different for each seed.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(len);
    v
}

/// Asserts two byte slices are equal, reporting the first difference instead of dumping them.
#[track_caller]
pub fn assert_bytes_eq(got: &[u8], want: &[u8], what: &str) {
    if got.len() != want.len() {
        panic!("{what}: length {} != expected {}", got.len(), want.len());
    }
    if let Some(i) = got.iter().zip(want).position(|(a, b)| a != b) {
        panic!("{what}: first difference at byte {i}: got {:#04x}, expected {:#04x}", got[i], want[i]);
    }
}

/// The errno of an io::Error, panicking if it has none.
#[track_caller]
pub fn errno(e: &std::io::Error) -> i32 {
    e.raw_os_error().unwrap_or_else(|| panic!("error without errno: {e}"))
}

/// Asserts that a result is an error with the given errno.
#[track_caller]
pub fn assert_errno<T: std::fmt::Debug>(r: std::io::Result<T>, want: i32, what: &str) {
    match r {
        Ok(v) => panic!("{what}: succeeded ({v:?}), expected errno {want}"),
        Err(e) => assert_eq!(
            e.raw_os_error(),
            Some(want),
            "{what}: got {e}, expected errno {want} ({})",
            std::io::Error::from_raw_os_error(want)
        ),
    }
}

/// The seed of a randomized test: `FERRYFS_TEST_SEED`, or the clock; printed so that a
/// failing run can be repeated.
pub fn seed_from_env(test: &str) -> u64 {
    let seed = std::env::var("FERRYFS_TEST_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64
    });
    eprintln!("{test} seed: {seed} (set FERRYFS_TEST_SEED={seed} to repeat)");
    seed
}

/// A small deterministic generator (xorshift64*) for randomized tests, seeded by the test.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    pub fn pick<'a, T>(&mut self, v: &'a [T]) -> &'a T {
        &v[self.below(v.len() as u64) as usize]
    }
}

/// `path` opened for reading, with the mount's cached pages of it dropped, so that its next
/// read asks the daemon.
pub fn uncached(path: &Path) -> fs::File {
    use std::os::fd::AsRawFd;
    let f = fs::File::open(path).unwrap();
    // SAFETY: an fd this function owns.
    assert_eq!(unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) }, 0);
    f
}

/// Reads whose bytes are fewer than the buffer the daemon fills (a hole, a short file's
/// end), after reads of other bytes: the daemon keeps its reply buffers between replies (and,
/// through io_uring, each entry's payload holds the last request's or reply's bytes), so a
/// stale byte would show here. Each read reaches the daemon (the mount's cached pages are
/// dropped first), many times over, so that every serving thread takes some.
pub fn assert_reads_show_no_stale_bytes(mnt: &Path) {
    use std::os::unix::fs::FileExt;
    let full: Vec<u8> = pattern(1 << 20, 77).into_iter().map(|b| b | 1).collect();
    fs::write(mnt.join("stale-full"), &full).unwrap();
    // 1 MiB with 100 bytes of data at 300 KiB; the rest is a hole.
    let sparse = fs::File::create(mnt.join("stale-sparse")).unwrap();
    sparse.set_len(1 << 20).unwrap();
    sparse.write_all_at(&[9u8; 100], 300 << 10).unwrap();
    let mut want_sparse = vec![0u8; 1 << 20];
    want_sparse[300 << 10..(300 << 10) + 100].fill(9);
    let short = pattern(5000, 78);
    fs::write(mnt.join("stale-short"), &short).unwrap();
    for round in 0..32 {
        let mut buf = vec![0u8; 1 << 20];
        uncached(&mnt.join("stale-full")).read_exact_at(&mut buf, 0).unwrap();
        assert_bytes_eq(&buf, &full, &format!("round {round}: the full file"));
        buf.fill(0xEE);
        uncached(&mnt.join("stale-sparse")).read_exact_at(&mut buf, 0).unwrap();
        assert_bytes_eq(&buf, &want_sparse, &format!("round {round}: the sparse file"));
        buf.fill(0xEE);
        let n = uncached(&mnt.join("stale-short")).read_at(&mut buf, 0).unwrap();
        assert_bytes_eq(&buf[..n], &short, &format!("round {round}: the short file"));
    }
}
