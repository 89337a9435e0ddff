//! The two workloads, run against the mounted file system with direct
//! syscalls. Each phase reports ops, wall time, requests the daemon saw
//! (per opcode and per transport) and CPU time.

use crate::daemon::{Daemon, clock_ns};
use crate::fs::StatsSnapshot;
use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Barrier;
use std::time::{Duration, Instant};

pub struct Phase {
    pub name: String,
    pub ops: u64,
    pub secs: f64,
    pub reqs: StatsSnapshot,
    pub daemon_cpu_ns: u64,
    pub proc_cpu_ns: u64,
}

impl Phase {
    pub fn line(&self) -> String {
        let per = self.ops.max(1) as f64;
        let total = self.reqs.total();
        format!(
            "PHASE name={} ops={} secs={:.4} rate={:.1} reqs_per_op={:.3} ring_frac={:.3} daemon_us_per_op={:.3} proc_us_per_op={:.3} dev={} ring={}",
            self.name,
            self.ops,
            self.secs,
            self.ops as f64 / self.secs,
            total as f64 / per,
            if total == 0 { 0.0 } else { self.reqs.ring_total() as f64 / total as f64 },
            self.daemon_cpu_ns as f64 / 1e3 / per,
            self.proc_cpu_ns as f64 / 1e3 / per,
            StatsSnapshot::describe(&self.reqs.dev, self.ops),
            StatsSnapshot::describe(&self.reqs.ring, self.ops),
        )
    }
}

struct Mark {
    stats: StatsSnapshot,
    daemon: u64,
    proc_: u64,
}

fn mark(d: &Daemon) -> Mark {
    Mark {
        stats: d.fs.stats.snapshot(),
        daemon: d.ctl.daemon_cpu_ns(),
        proc_: clock_ns(libc::CLOCK_PROCESS_CPUTIME_ID),
    }
}

/// Let asynchronous requests of the phase (RELEASE, FORGET) drain, then
/// build the phase record. `secs` is the timed part only.
fn finish(d: &Daemon, name: &str, ops: u64, secs: f64, start: Mark) -> Phase {
    std::thread::sleep(Duration::from_millis(150));
    let end = mark(d);
    Phase {
        name: name.to_string(),
        ops,
        secs,
        reqs: end.stats.delta(&start.stats),
        daemon_cpu_ns: end.daemon - start.daemon,
        proc_cpu_ns: end.proc_ - start.proc_,
    }
}

fn os_err(what: &str) -> io::Error {
    let e = io::Error::last_os_error();
    io::Error::new(e.kind(), format!("{what}: {e}"))
}

fn open_dir(mnt: &str) -> io::Result<OwnedFd> {
    let p = CString::new(mnt).unwrap();
    // SAFETY: valid C string. O_PATH: no OPENDIR request.
    let fd = unsafe { libc::open(p.as_ptr(), libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(os_err("open mount root"));
    }
    // SAFETY: fresh fd.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// create+close N files, stat each, unlink each — one thread.
pub fn metadata(d: &Daemon, n: usize) -> io::Result<Vec<Phase>> {
    let dir = open_dir(&d.mount.path)?;
    let dfd = dir.as_raw_fd();
    let names: Vec<CString> = (0..n).map(|i| CString::new(format!("f{i:06}")).unwrap()).collect();
    let mut phases = Vec::new();

    let m = mark(d);
    let t = Instant::now();
    for name in &names {
        // SAFETY: valid dirfd and C string.
        let fd = unsafe {
            libc::openat(dfd, name.as_ptr(), libc::O_CREAT | libc::O_EXCL | libc::O_WRONLY | libc::O_CLOEXEC, 0o644)
        };
        if fd < 0 {
            return Err(os_err("create"));
        }
        // SAFETY: fd is ours.
        unsafe { libc::close(fd) };
    }
    phases.push(finish(d, "create", n as u64, t.elapsed().as_secs_f64(), m));

    let m = mark(d);
    let t = Instant::now();
    for name in &names {
        // SAFETY: zeroed stat is a valid out buffer.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: valid pointers.
        if unsafe { libc::fstatat(dfd, name.as_ptr(), &mut st, 0) } < 0 {
            return Err(os_err("stat"));
        }
    }
    phases.push(finish(d, "stat", n as u64, t.elapsed().as_secs_f64(), m));

    let m = mark(d);
    let t = Instant::now();
    for name in &names {
        // SAFETY: valid pointers.
        if unsafe { libc::unlinkat(dfd, name.as_ptr(), 0) } < 0 {
            return Err(os_err("unlink"));
        }
    }
    phases.push(finish(d, "unlink", n as u64, t.elapsed().as_secs_f64(), m));
    Ok(phases)
}

/// `jobs` threads, each pwrite()s 4 KiB at random 4 KiB-aligned offsets
/// within 64 MiB of its own file for `secs` seconds.
pub fn writes(d: &Daemon, jobs: usize, secs: f64) -> io::Result<Phase> {
    const SPAN_PAGES: u64 = (64 << 20) / 4096;
    let dir = open_dir(&d.mount.path)?;
    let dfd = dir.as_raw_fd();
    let mut files = Vec::new();
    for j in 0..jobs {
        let name = CString::new(format!("w{j}")).unwrap();
        // SAFETY: valid pointers.
        let fd = unsafe { libc::openat(dfd, name.as_ptr(), libc::O_CREAT | libc::O_RDWR | libc::O_CLOEXEC, 0o644) };
        if fd < 0 {
            return Err(os_err("create write file"));
        }
        // SAFETY: fresh fd.
        files.push((name, unsafe { OwnedFd::from_raw_fd(fd) }));
    }
    let barrier = Barrier::new(jobs + 1);
    let dur = Duration::from_secs_f64(secs);
    let mut counts = vec![0u64; jobs];
    let mut failure: Option<String> = None;
    let (m, elapsed) = std::thread::scope(|s| {
        let hs: Vec<_> = files
            .iter()
            .enumerate()
            .map(|(j, (_, f))| {
                let fd = f.as_raw_fd();
                let barrier = &barrier;
                s.spawn(move || -> Result<u64, String> {
                    let buf = vec![0x5au8; 4096];
                    let mut x: u64 = 0x9e37_79b9_7f4a_7c15 ^ (j as u64 + 1);
                    barrier.wait();
                    let t = Instant::now();
                    let mut n = 0u64;
                    while t.elapsed() < dur {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        let off = (x % SPAN_PAGES) * 4096;
                        // SAFETY: buf is 4096 bytes.
                        let w = unsafe { libc::pwrite(fd, buf.as_ptr() as *const libc::c_void, 4096, off as i64) };
                        if w != 4096 {
                            return Err(format!("pwrite returned {w}: {}", io::Error::last_os_error()));
                        }
                        n += 1;
                    }
                    Ok(n)
                })
            })
            .collect();
        let m = mark(d);
        barrier.wait();
        let t = Instant::now();
        for (j, h) in hs.into_iter().enumerate() {
            match h.join() {
                Ok(Ok(n)) => counts[j] = n,
                Ok(Err(e)) => failure = Some(e),
                Err(_) => failure = Some("writer thread panicked".into()),
            }
        }
        (m, t.elapsed().as_secs_f64())
    });
    let total: u64 = counts.iter().sum();
    let phase = finish(d, &format!("write-j{jobs}"), total, elapsed, m);
    for (name, f) in files {
        drop(f);
        // SAFETY: valid pointers.
        unsafe { libc::unlinkat(dfd, name.as_ptr(), 0) };
    }
    if let Some(e) = failure {
        return Err(io::Error::other(e));
    }
    Ok(phase)
}
