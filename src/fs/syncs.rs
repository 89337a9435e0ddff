//! Where fsyncs wait when a FUSE thread should not: threads of their own, so that a flush
//! never holds the last thread that serves requests.
//!
//! An fsync waits for the disk (a flush of the data set's images and often of the catalog
//! log: hundreds of microseconds, milliseconds under load). Served on a FUSE thread, it takes
//! that thread out for the whole wait, so a mount used to need a thread more than it has
//! cores just to keep serving while one application synced, and that extra thread cost
//! every other request wake-ups (docs/benchmarks.md, "Issue 10, fifth round"). Now an fsync
//! waits on its FUSE thread only while another FUSE thread stays free (the lone syncing
//! writer's case: no hand-off at all, fs/mod.rs `run_sync`); else the FUSE thread hands it
//! here and goes back to the kernel's queue, and the worker flushes and sends the reply.
//!
//! A mount that serves through io_uring (`-o uring`) sends every fsync here, and also a write
//! that a cutover holds and an open in a downtime window: a queue's thread serves every
//! request of its CPU, so it never waits (docs/design.md, "FUSE over io_uring").
//!
//! Workers start on demand, one per fsync in flight, up to [`SYNC_WORKERS_MAX`], and then
//! stay (idle ones wait on a condition variable). Past the cap, fsyncs queue in arrival
//! order. Closing the pool (at unmount, before the engine's shutdown) runs what is queued
//! and joins every worker; a job handed to a closed pool runs on the caller's thread.

use std::collections::VecDeque;
use std::sync::Arc;
use std::thread::JoinHandle;

use log::warn;
use parking_lot::{Condvar, Mutex};

/// Most fsyncs that wait for the disk at once. More would only queue in the disk: the
/// engine's log sync already covers every fsync that arrived while one was in flight.
pub const SYNC_WORKERS_MAX: usize = 16;

type Job = Box<dyn FnOnce() + Send>;

#[derive(Default)]
struct State {
    jobs: VecDeque<Job>,
    /// Workers waiting for a job.
    idle: usize,
    workers: Vec<JoinHandle<()>>,
    closed: bool,
}

#[derive(Default)]
struct Shared {
    state: Mutex<State>,
    wake: Condvar,
}

/// The pool. Dropping it closes it.
pub struct SyncWorkers {
    shared: Arc<Shared>,
    max: usize,
}

impl SyncWorkers {
    /// A pool of at most `max` workers (at least one), none started yet.
    pub fn new(max: usize) -> SyncWorkers {
        SyncWorkers { shared: Arc::default(), max: max.max(1) }
    }

    /// Runs `job` on a worker: an idle one, a new one if none is idle and the cap allows,
    /// else the first to come free. On a closed pool, or if no thread can be started and
    /// none exists, runs it here.
    pub fn run(&self, job: impl FnOnce() + Send + 'static) {
        let mut st = self.shared.state.lock();
        if st.closed {
            drop(st);
            return job();
        }
        st.jobs.push_back(Box::new(job));
        // A worker notified but not yet running is out of the wait set, so each notify
        // wakes a different one: enough idle workers for the queue means no new thread.
        if st.jobs.len() <= st.idle {
            self.shared.wake.notify_one();
            return;
        }
        if st.workers.len() < self.max {
            let shared = self.shared.clone();
            let n = st.workers.len();
            match std::thread::Builder::new().name(format!("fsync-{n}")).spawn(move || work(&shared)) {
                Ok(h) => return st.workers.push(h),
                Err(e) => warn!("can't start a sync worker ({e}); the fsync waits for a busy one"),
            }
        }
        if st.workers.is_empty() {
            let job = st.jobs.pop_back().expect("just pushed");
            drop(st);
            job();
        }
    }

    /// Runs what is queued, then stops and joins every worker. Later jobs run on their
    /// caller's thread.
    pub fn close(&self) {
        let workers = {
            let mut st = self.shared.state.lock();
            st.closed = true;
            std::mem::take(&mut st.workers)
        };
        self.shared.wake.notify_all();
        for w in workers {
            let _ = w.join();
        }
    }

    /// Workers started so far.
    #[cfg(test)]
    pub fn started(&self) -> usize {
        self.shared.state.lock().workers.len()
    }
}

impl Drop for SyncWorkers {
    fn drop(&mut self) {
        self.close();
    }
}

fn work(shared: &Shared) {
    let mut st = shared.state.lock();
    loop {
        if let Some(job) = st.jobs.pop_front() {
            drop(st);
            job();
            st = shared.state.lock();
        } else if st.closed {
            return;
        } else {
            st.idle += 1;
            shared.wake.wait(&mut st);
            st.idle -= 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;
    use std::time::Duration;

    #[test]
    fn a_blocked_job_does_not_hold_the_next_one() {
        let pool = SyncWorkers::new(4);
        let (release_tx, release_rx) = mpsc::channel::<()>();
        let (done_tx, done_rx) = mpsc::channel::<&str>();
        let d1 = done_tx.clone();
        pool.run(move || {
            release_rx.recv().unwrap();
            d1.send("blocked").unwrap();
        });
        pool.run(move || done_tx.send("second").unwrap());
        // The second job finishes while the first still waits (it would deadlock here if
        // both shared one thread: the first waits for a release sent only after this).
        assert_eq!(done_rx.recv_timeout(Duration::from_secs(60)).unwrap(), "second");
        release_tx.send(()).unwrap();
        assert_eq!(done_rx.recv_timeout(Duration::from_secs(60)).unwrap(), "blocked");
        assert_eq!(pool.started(), 2);
    }

    #[test]
    fn idle_workers_are_reused_and_the_cap_queues() {
        let pool = SyncWorkers::new(2);
        for _ in 0..3 {
            let (tx, rx) = mpsc::channel();
            pool.run(move || tx.send(()).unwrap());
            rx.recv_timeout(Duration::from_secs(60)).unwrap();
        }
        // One at a time: the first worker took them all once idle (it may not have reached
        // its wait before the second job came, hence at most two).
        assert!(pool.started() <= 2, "{} workers for jobs one at a time", pool.started());

        let (release_tx, release_rx) = mpsc::channel::<()>();
        let release_rx = Arc::new(std::sync::Mutex::new(release_rx));
        let (done_tx, done_rx) = mpsc::channel();
        for i in 0..5 {
            let (r, d) = (release_rx.clone(), done_tx.clone());
            pool.run(move || {
                r.lock().unwrap().recv().unwrap();
                d.send(i).unwrap();
            });
        }
        assert_eq!(pool.started(), 2, "the cap holds");
        for _ in 0..5 {
            release_tx.send(()).unwrap();
        }
        let mut got: Vec<i32> = (0..5).map(|_| done_rx.recv_timeout(Duration::from_secs(60)).unwrap()).collect();
        got.sort();
        assert_eq!(got, [0, 1, 2, 3, 4], "every queued job ran");
    }

    #[test]
    fn close_runs_what_is_queued_and_later_jobs_run_inline() {
        let pool = SyncWorkers::new(1);
        let (tx, rx) = mpsc::channel();
        for i in 0..3 {
            let tx = tx.clone();
            pool.run(move || {
                std::thread::sleep(Duration::from_millis(20));
                tx.send(i).unwrap();
            });
        }
        pool.close();
        assert_eq!(rx.try_iter().collect::<Vec<_>>(), [0, 1, 2], "all ran before close returned");
        let here = std::thread::current().id();
        let (tx2, rx2) = mpsc::channel();
        pool.run(move || tx2.send(std::thread::current().id()).unwrap());
        assert_eq!(rx2.try_recv().unwrap(), here, "a closed pool runs the job on the caller");
    }
}
