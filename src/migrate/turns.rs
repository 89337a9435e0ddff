//! Turns: deterministic scheduling of job threads, for simulation tests.
//!
//! A job runs on its own thread (job.rs). In production the threads run freely. A
//! simulation needs the same interleaving of application operations and job steps for the
//! same seed, so a simulated mount gives its [`Migrations`](super::Migrations) a `Turns`:
//! then a job thread runs only while it holds the turn, and gives it back at each yield point
//! (where the job holds no lock: between chunks of the copy, between re-sync runs, while it
//! waits for a close). The test's driver holds the turn otherwise, and hands it to one
//! parked job at a time with [`Turns::step`], which returns when that job yields again or
//! ends. Inside the cutover's hold there is no yield point, so the driver never finds
//! writes held or opens waiting. A power cut can still land anywhere, since the simulated
//! disk counts every I/O.

use std::collections::BTreeSet;

use parking_lot::{Condvar, Mutex};

#[derive(Debug, Default)]
struct State {
    /// The job holding the turn; `None`: the driver.
    running: Option<u64>,
    /// Jobs waiting for the turn (enlisted at spawn, or parked at a yield point).
    parked: BTreeSet<u64>,
    /// Teardown: nobody waits for a turn any more.
    released: bool,
}

#[derive(Debug, Default)]
pub struct Turns {
    state: Mutex<State>,
    cv: Condvar,
}

impl Turns {
    /// A job thread is about to be spawned: it waits for its first turn.
    pub(super) fn enlist(&self, job: u64) {
        self.state.lock().parked.insert(job);
    }

    /// Job side: give the turn back (if held) and wait until it is given again.
    pub(super) fn park(&self, job: u64) {
        let mut st = self.state.lock();
        st.parked.insert(job);
        if st.running == Some(job) {
            st.running = None;
            self.cv.notify_all();
        }
        while st.running != Some(job) && !st.released {
            self.cv.wait(&mut st);
        }
        st.parked.remove(&job);
    }

    /// Job side, at the thread's start: wait for the first turn (the job was enlisted when
    /// it was spawned). Unlike [`Turns::park`] it gives nothing back: the driver may already
    /// have handed the turn to a thread that had not reached here yet.
    fn first_turn(&self, job: u64) {
        let mut st = self.state.lock();
        while st.running != Some(job) && !st.released {
            self.cv.wait(&mut st);
        }
        st.parked.remove(&job);
    }

    /// Job side: the job's thread is done; the turn goes back to the driver.
    pub(super) fn done(&self, job: u64) {
        let mut st = self.state.lock();
        st.parked.remove(&job);
        if st.running == Some(job) {
            st.running = None;
            self.cv.notify_all();
        }
    }

    /// Driver side: the jobs waiting for a turn, in id order.
    pub fn parked(&self) -> Vec<u64> {
        self.state.lock().parked.iter().copied().collect()
    }

    /// Driver side: let `job` run until it yields or ends.
    pub fn step(&self, job: u64) {
        let mut st = self.state.lock();
        if !st.parked.contains(&job) || st.released {
            return;
        }
        st.running = Some(job);
        self.cv.notify_all();
        while st.running == Some(job) && !st.released {
            self.cv.wait(&mut st);
        }
    }

    /// Teardown: every job runs freely from now on (to see that the mount is stopping).
    pub fn release_all(&self) {
        let mut st = self.state.lock();
        st.released = true;
        st.running = None;
        self.cv.notify_all();
    }
}

/// A job thread's place in the turns: taken (waiting for the first turn) at the thread's
/// start, given back when the thread ends, however it ends.
pub(super) struct Held {
    turns: std::sync::Arc<Turns>,
    job: u64,
}

impl Held {
    pub(super) fn take(turns: std::sync::Arc<Turns>, job: u64) -> Held {
        turns.first_turn(job);
        Held { turns, job }
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.turns.done(self.job);
    }
}
