//! Starting and stopping the daemon side: mount, INIT, transport threads,
//! unmount, join (with an abort fallback so no run can hang forever).

use crate::classic;
use crate::fs::Fs;
use crate::mount::Mount;
use crate::uring;
use std::os::fd::{FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

#[derive(Clone, Copy, Debug)]
pub enum Transport {
    /// `pin`: pin reader thread i to the i-th CPU this process may run on (mod their number).
    Classic {
        threads: usize,
        pin: bool,
    },
    Uring {
        entries: usize,
    },
}

/// Shared bookkeeping of daemon threads.
#[derive(Default)]
pub struct Control {
    clocks: Mutex<Vec<libc::clockid_t>>,
    alive: AtomicUsize,
    errors: Mutex<Vec<String>>,
    force: AtomicBool,
}

impl Control {
    /// Called by each daemon thread at start: remember its CPU clock.
    pub fn register_thread(&self) {
        let mut clk: libc::clockid_t = 0;
        // SAFETY: querying the calling thread's CPU clock id.
        if unsafe { libc::pthread_getcpuclockid(libc::pthread_self(), &mut clk) } == 0 {
            self.clocks.lock().unwrap().push(clk);
        }
    }
    /// Called by each daemon thread at start; the returned guard marks the
    /// thread as finished when dropped, even if the thread panics.
    pub fn thread_guard(&self) -> ThreadGuard<'_> {
        ThreadGuard(self)
    }
    pub fn error(&self, e: String) {
        eprintln!("daemon error: {e}");
        self.errors.lock().unwrap().push(e);
    }
    pub fn errors(&self) -> Vec<String> {
        self.errors.lock().unwrap().clone()
    }
    pub fn force_stop(&self) -> bool {
        self.force.load(Ordering::SeqCst)
    }
    /// Sum of CPU time (user+sys) of all live daemon threads, in ns.
    pub fn daemon_cpu_ns(&self) -> u64 {
        self.clocks.lock().unwrap().iter().map(|&c| clock_ns(c)).sum()
    }
}

pub struct ThreadGuard<'a>(&'a Control);

impl Drop for ThreadGuard<'_> {
    fn drop(&mut self) {
        self.0.alive.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Why a daemon could not be started.
pub enum StartError {
    /// The kernel did not agree to the requested transport (io_uring not
    /// offered in INIT): nothing was measured, and nothing must be.
    Unavailable(String),
    Failed(String),
}

impl From<String> for StartError {
    fn from(s: String) -> StartError {
        StartError::Failed(s)
    }
}

/// The CPUs this process may run on (sched_getaffinity), in ascending order.
pub fn allowed_cpus() -> Vec<usize> {
    // SAFETY: cpu_set_t is plain data; sched_getaffinity fills it for this thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) < 0 {
            return Vec::new();
        }
        (0..libc::CPU_SETSIZE as usize).filter(|&c| libc::CPU_ISSET(c, &set)).collect()
    }
}

pub fn clock_ns(clk: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: valid out pointer.
    if unsafe { libc::clock_gettime(clk, &mut ts) } != 0 {
        return 0;
    }
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

pub const ENABLE_URING: &str = "/sys/module/fuse/parameters/enable_uring";

pub struct Daemon {
    pub fs: Arc<Fs>,
    pub ctl: Arc<Control>,
    pub mount: Mount,
    handles: Vec<JoinHandle<()>>,
    extra_fds: Vec<OwnedFd>,
    pub info: Vec<String>,
}

impl Daemon {
    pub fn start(mnt: &str, transport: Transport) -> Result<Daemon, StartError> {
        let want_uring = matches!(transport, Transport::Uring { .. });
        let mount = Mount::new(mnt).map_err(|e| StartError::Failed(e.to_string()))?;
        let mut d = Daemon {
            fs: Arc::new(Fs::new(want_uring)),
            ctl: Arc::new(Control::default()),
            mount,
            handles: Vec::new(),
            extra_fds: Vec::new(),
            info: Vec::new(),
        };
        match d.start_inner(transport) {
            Ok(()) => Ok(d),
            Err(e) => {
                let _ = d.stop();
                Err(e)
            }
        }
    }

    fn spawn(&mut self, name: String, f: impl FnOnce() + Send + 'static) -> Result<(), String> {
        self.ctl.alive.fetch_add(1, Ordering::SeqCst);
        match std::thread::Builder::new().name(name).spawn(f) {
            Ok(h) => {
                self.handles.push(h);
                Ok(())
            }
            Err(e) => {
                self.ctl.alive.fetch_sub(1, Ordering::SeqCst);
                Err(format!("spawn: {e}"))
            }
        }
    }

    fn start_inner(&mut self, transport: Transport) -> Result<(), StartError> {
        let fd = self.mount.fd();
        // Answer INIT on this thread, before any transport thread exists:
        // io_uring REGISTER is refused with EAGAIN until INIT is done.
        let mut buf = vec![0u8; classic::READ_BUF];
        let mut out = vec![0u8; classic::READ_BUF];
        loop {
            match classic::serve_one(fd, &self.fs, &mut buf, &mut out) {
                Ok(classic::Step::Handled(op)) if op == crate::abi::FUSE_INIT => break,
                Ok(classic::Step::Handled(op)) => return Err(format!("expected INIT, got opcode {op}").into()),
                Ok(classic::Step::Retry) => continue,
                Ok(classic::Step::Gone) => return Err("connection gone before INIT".to_string().into()),
                Err(e) => return Err(format!("INIT: {e}").into()),
            }
        }
        let offered = self.fs.kernel_init_flags.load(Ordering::Relaxed);
        let granted = self.fs.granted_uring.load(Ordering::Relaxed) != 0;
        self.info.push(format!(
            "kernel_minor={} kernel_offers_over_io_uring={} requested_uring={} conn={}",
            self.fs.kernel_minor.load(Ordering::Relaxed),
            offered & crate::abi::FUSE_OVER_IO_URING != 0,
            granted,
            self.mount.conn.map_or("?".to_string(), |c| c.to_string())
        ));
        match transport {
            Transport::Classic { threads, pin } => {
                let cpus = if pin { allowed_cpus() } else { Vec::new() };
                if pin && cpus.is_empty() {
                    return Err("--pin: sched_getaffinity gave no CPUs".to_string().into());
                }
                let mut placement = Vec::new();
                for t in 0..threads.max(1) {
                    let tfd = if t == 0 {
                        fd
                    } else {
                        let c = classic::clone_fd(fd).map_err(|e| format!("FUSE_DEV_IOC_CLONE: {e}"))?;
                        // SAFETY: c is a fresh fd we own.
                        self.extra_fds.push(unsafe { OwnedFd::from_raw_fd(c) });
                        c
                    };
                    let cpu = if pin { Some(cpus[t % cpus.len()]) } else { None };
                    if let Some(c) = cpu {
                        placement.push(format!("fuse-rd{t}:cpu{c}"));
                    }
                    let (fs, ctl) = (self.fs.clone(), self.ctl.clone());
                    self.spawn(format!("fuse-rd{t}"), move || {
                        if let Some(c) = cpu
                            && let Err(e) = uring::pin_to_cpu(c)
                        {
                            eprintln!("warning: pin fuse-rd{t} to cpu {c}: {e}");
                        }
                        classic::reader_loop(tfd, &fs, &ctl)
                    })?;
                }
                if pin {
                    self.info.push(format!("classic_pinned {}", placement.join(" ")));
                }
            }
            Transport::Uring { entries } => {
                if !granted {
                    let param = std::fs::read_to_string(ENABLE_URING)
                        .map(|v| v.trim().to_string())
                        .unwrap_or_else(|_| "missing (kernel without CONFIG_FUSE_IO_URING?)".to_string());
                    return Err(StartError::Unavailable(format!(
                        "kernel did not offer FUSE_OVER_IO_URING in INIT (init flags {offered:#x}, \
                         {ENABLE_URING} = {param})"
                    )));
                }
                // /dev/fuse still carries FORGET/BATCH_FORGET and INTERRUPT.
                let (fs, ctl) = (self.fs.clone(), self.ctl.clone());
                self.spawn("fuse-dev".into(), move || classic::reader_loop(fd, &fs, &ctl))?;
                let cpus = uring::possible_cpus();
                let (tx, rx) = mpsc::channel();
                for &cpu in &cpus {
                    let cfg = uring::QueueConfig {
                        fd,
                        qid: cpu as u16,
                        cpu,
                        entries,
                        payload_len: crate::fs::MAX_WRITE as usize,
                    };
                    let (fs, ctl, tx) = (self.fs.clone(), self.ctl.clone(), tx.clone());
                    self.spawn(format!("fuse-q{cpu}"), move || uring::queue_loop(cfg, &fs, &ctl, tx))?;
                }
                for _ in &cpus {
                    match rx.recv_timeout(Duration::from_secs(10)) {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => return Err(e.into()),
                        Err(_) => return Err("uring queue did not report readiness in 10 s".to_string().into()),
                    }
                }
                self.info.push(format!("uring queues={} entries_per_queue={entries}", cpus.len()));
            }
        }
        Ok(())
    }

    fn wait_alive_zero(&self, d: Duration) -> bool {
        let t = Instant::now();
        while self.ctl.alive.load(Ordering::SeqCst) > 0 {
            if t.elapsed() > d {
                return false;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        true
    }

    /// Unmount, wait for every daemon thread to notice, join them.
    pub fn stop(&mut self) -> Result<(), String> {
        let mut problems = Vec::new();
        if let Err(e) = self.mount.unmount() {
            problems.push(e.to_string());
        }
        if !self.wait_alive_zero(Duration::from_secs(5)) {
            problems.push(format!(
                "daemon threads still running 5 s after unmount; aborting connection {:?}",
                self.mount.conn
            ));
            self.mount.abort_connection();
            if !self.wait_alive_zero(Duration::from_secs(5)) {
                self.ctl.force.store(true, Ordering::SeqCst);
                if !self.wait_alive_zero(Duration::from_secs(3)) {
                    problems.push("daemon threads did not exit; leaving them".into());
                    self.handles.clear();
                }
            }
        }
        for h in self.handles.drain(..) {
            let _ = h.join();
        }
        self.extra_fds.clear();
        if problems.is_empty() { Ok(()) } else { Err(problems.join("; ")) }
    }
}
