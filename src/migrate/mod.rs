//! Migrations: jobs (one data set each), plans of jobs (merge, drain), the control verbs,
//! events and status. docs/design.md maps the method's steps (a to m) to this code.
//!
//! - [`execute`] runs one control line (from `.ferry/control` or the CLI).
//! - A job is recorded in the catalog when it is queued ([`Op::JobStart`] with no target);
//!   its target is reserved when it starts ([`Op::JobGrow`]). A plan is recorded too
//!   ([`Op::PlanStart`]), and its source volumes stop taking allocations.
//! - At most `max-jobs` jobs run at once, each on its own thread (job.rs); the rest wait in
//!   the queue.
//! - A job's state is one enum (state.rs), changed only by [`JobState::transition`], which
//!   refuses an impossible step; docs/design.md ("The state of a job") draws the table.
//! - With `verify=yes` a job compares source and target track by track in the cutover's hold,
//!   before the switch; a mismatch fails it and rolls it back (job.rs, `Runner::verify`).
//! - [`recover`] runs at mount: a job that switched frees its source; one that did not
//!   resumes from its checkpoint under its own id (its target kept; job.rs,
//!   `Runner::checkpoint`, and engine/intent.rs keep the checkpoint true), or, without one,
//!   is rolled back (its target freed, the source untouched) and started again from the
//!   beginning; a plan carries on with whatever is still on its sources.

pub mod command;
mod job;
pub mod pace;
pub mod plan;
pub mod state;
pub mod turns;

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwapOption;
use log::{error, info, warn};
use parking_lot::Mutex;

use crate::catalog::model::now_ns;
use crate::catalog::model::{Body, Catalog, Cutover, Ino, JobRec, Op, PlanKind, PlanRec};
use crate::engine::{Engine, Error as FsError};
use crate::monitor::JobLink;
use crate::report::{self, JobReport, PlanReport};
use crate::space::VolumeId;
use command::{Command, JobOptions};
use pace::RateCap;
use plan::{names, tracks_text, PlannedJob};
pub use state::{BadTransition, Phase, State, Verified};

/// Lines of `.ferry/events` kept in memory (the oldest go first).
pub const EVENTS_KEPT: usize = 10_000;
/// Jobs that copy at once, unless `mount --max-jobs` or `set max-jobs=` says otherwise.
pub const DEFAULT_MAX_JOBS: usize = 2;
/// A plan re-plans this many times for data sets that still sit on its sources (moved there
/// by growth that raced the plan) before it gives up.
const PLAN_ROUNDS: u32 = 3;

/// A job as this mount runs it.
#[derive(Debug)]
pub struct JobState {
    pub id: u64,
    pub ino: Ino,
    pub path: String,
    pub targets: Vec<VolumeId>,
    pub cutover: Cutover,
    /// Compare source and target before the switch (`verify=yes`; in its record, so a job
    /// that a later mount resumes or starts again verifies too).
    pub verify: bool,
    pub plan: Option<u64>,
    pub started_ns: i64,
    pub rate: RateCap,
    /// The state, and when it became final. Changed only by [`JobState::transition`].
    life: Mutex<Life>,
    /// A cancel was asked for: a request, not a state. The copier reads it between chunks
    /// and in its sleeps; [`JobState::begin_switch`] reads it under the `life` lock.
    cancel: AtomicBool,
    // Progress counters: the copier bumps them per chunk and the status reads them without
    // the state's lock; they outlive the phase that counts them (a switched job still shows
    // its bytes and passes), so they are not part of [`State`].
    pub bytes_copied: AtomicU64,
    pub bytes_resynced: AtomicU64,
    pub bytes_total: AtomicU64,
    pub passes: AtomicU32,
    pub mirrored: AtomicBool,
    /// The first copy's (step f) average: bytes copied / time since it started, as of its
    /// latest chunk; it holds still once step f is done. What the CLI shows as the job's rate.
    pub copy_rate: AtomicU64,
    /// Mirrored writes, kept when the link goes.
    pub mirrored_writes: AtomicU64,
    pub link: ArcSwapOption<JobLink>,
}

#[derive(Debug)]
struct Life {
    state: State,
    ended_ns: Option<i64>,
}

impl JobState {
    fn new(rec: &JobRec) -> JobState {
        JobState {
            id: rec.id,
            ino: rec.ino,
            path: rec.path.clone(),
            targets: rec.targets.clone(),
            cutover: rec.cutover,
            verify: rec.verify,
            plan: rec.plan,
            started_ns: rec.started_ns,
            rate: RateCap::new(rec.rate_bytes_per_s),
            life: Mutex::new(Life { state: State::Queued, ended_ns: None }),
            cancel: AtomicBool::new(false),
            bytes_copied: AtomicU64::new(0),
            bytes_resynced: AtomicU64::new(0),
            bytes_total: AtomicU64::new(0),
            passes: AtomicU32::new(0),
            mirrored: AtomicBool::new(false),
            copy_rate: AtomicU64::new(0),
            mirrored_writes: AtomicU64::new(0),
            link: ArcSwapOption::empty(),
        }
    }

    pub fn phase(&self) -> Phase {
        self.life.lock().state.phase()
    }

    pub fn state(&self) -> State {
        self.life.lock().state.clone()
    }

    /// The one place a job's state changes: to `to` if [`State::allows`] the step, stamping
    /// the end time when `to` is final. A refusal changes nothing; it is a bug, and the
    /// caller fails the job ([`JobState::settle`], `Runner::enter`).
    pub fn transition(&self, to: State) -> Result<(), BadTransition> {
        let mut life = self.life.lock();
        Self::step(&mut life, to)
    }

    fn step(life: &mut Life, to: State) -> Result<(), BadTransition> {
        life.state = life.state.next(to)?;
        if life.state.is_final() {
            life.ended_ns = Some(now_ns());
        }
        Ok(())
    }

    /// The job ends in `to`; if that step is refused (a bug), it is logged and the job fails.
    fn settle(&self, m: &Migrations, to: State) {
        if let Err(e) = self.transition(to) {
            error!("job {}: {e}", self.id);
            self.fail(m, format!("internal error: {e}"), None);
        }
    }

    fn cancel_requested(&self) -> bool {
        self.cancel.load(Ordering::Acquire)
    }

    /// The cutover's point of no return, with writes held: `Ok(false)` if a cancel came first
    /// (the job must roll back), else the state says `switching` and every later cancel is
    /// refused. The `life` lock makes this and [`cancel`]'s check-and-set one order: no cancel
    /// is acknowledged that the switch does not see.
    fn begin_switch(&self) -> Result<bool, BadTransition> {
        let mut life = self.life.lock();
        if self.cancel_requested() {
            return Ok(false);
        }
        Self::step(&mut life, State::Cutover { switching: true })?;
        Ok(true)
    }

    /// The job is done with its link: keep what the report needs from it.
    fn unlink(&self) {
        if let Some(l) = self.link.swap(None) {
            self.mirrored_writes.store(l.mirrored_writes.load(Ordering::Relaxed), Ordering::Relaxed);
        }
    }

    /// The job failed (and was rolled back); `verified`: what a verification found.
    fn fail(&self, m: &Migrations, why: String, verified: Option<Verified>) {
        let during = self.phase();
        let event = format!("job {} failed path={} phase={} reason={why:?}", self.id, self.path, during.name());
        match self.transition(State::Failed { reason: why, during, verified }) {
            Ok(()) => m.event(event),
            // Already ended (a bug): it keeps the end it had; nothing to do but say so.
            Err(e) => error!("job {}: {e}", self.id),
        }
    }

    fn report(&self, c: &Catalog, track_bytes: u64) -> JobReport {
        let link = self.link.load();
        let (state, ended_ns) = {
            let life = self.life.lock();
            (life.state.clone(), life.ended_ns)
        };
        let held_us = match &state {
            State::Switched { held_us, .. } => Some(*held_us),
            _ => None,
        };
        let (error, failed_in) = match &state {
            State::Failed { reason, during, .. } => (Some(reason.clone()), Some(during.name().to_string())),
            _ => (None, None),
        };
        let verified = match &state {
            State::Switched { verified, .. } | State::Failed { verified, .. } => *verified,
            _ => None,
        };
        let verify = self.verify.then(|| {
            match verified {
                Some(v) if v.first_mismatch.is_some() => "mismatch",
                Some(_) => "ok",
                None if state.is_final() => "not-run",
                None => "pending",
            }
            .to_string()
        });
        JobReport {
            id: self.id,
            path: self.path.clone(),
            plan: self.plan,
            phase: state.name().into(),
            cutover: self.cutover.name().into(),
            targets: self.targets.iter().map(|&v| plan::volume_name(c, v)).collect(),
            bytes_copied: self.bytes_copied.load(Ordering::Relaxed),
            bytes_resynced: self.bytes_resynced.load(Ordering::Relaxed),
            bytes_total: self.bytes_total.load(Ordering::Relaxed),
            dirty_tracks: link.as_ref().map_or(0, |l| l.dirty.count_dirty()),
            track_size_bytes: track_bytes,
            passes: self.passes.load(Ordering::Relaxed),
            mirrored: self.mirrored.load(Ordering::Relaxed),
            mirrored_writes: link
                .as_ref()
                .map_or(self.mirrored_writes.load(Ordering::Relaxed), |l| l.mirrored_writes.load(Ordering::Relaxed)),
            rate_limit_bytes_per_s: self.rate.rate(),
            copy_rate_bytes_per_s: self.copy_rate.load(Ordering::Relaxed),
            started: rfc3339(self.started_ns),
            started_ns: self.started_ns,
            ended_ns,
            stall_us: held_us.filter(|_| self.cutover == Cutover::Live),
            window_us: held_us.filter(|_| self.cutover == Cutover::Close),
            error,
            failed_in,
            verify,
            verified_tracks: verified.map(|v| v.tracks),
            verify_us: verified.map(|v| v.elapsed_us),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum PlanPhase {
    Running,
    Done,
    Failed,
    Cancelled,
}

#[derive(Debug)]
pub struct PlanState {
    rec: PlanRec,
    jobs: Mutex<Vec<u64>>,
    phase: Mutex<PlanPhase>,
    error: Mutex<Option<String>>,
    rounds: AtomicU32,
    cancel: AtomicBool,
}

impl PlanState {
    fn new(rec: PlanRec) -> PlanState {
        PlanState {
            rec,
            jobs: Mutex::new(Vec::new()),
            phase: Mutex::new(PlanPhase::Running),
            error: Mutex::new(None),
            rounds: AtomicU32::new(0),
            cancel: AtomicBool::new(false),
        }
    }
}

#[derive(Default)]
struct Inner {
    jobs: BTreeMap<u64, Arc<JobState>>,
    plans: BTreeMap<u64, Arc<PlanState>>,
    queue: VecDeque<Arc<JobState>>,
    running: usize,
    threads: Vec<JoinHandle<()>>,
    next_id: u64,
}

/// The migrations of one mount, over its engine.
pub struct Migrations {
    pub engine: Arc<Engine>,
    inner: Mutex<Inner>,
    events: Mutex<VecDeque<String>>,
    /// The pool-wide copy rate cap (0: none).
    pub copy_rate: RateCap,
    max_jobs: AtomicUsize,
    stopping: AtomicBool,
    /// Set by simulation tests: job threads run one at a time, when given the turn.
    pub turns: Option<Arc<turns::Turns>>,
}

/// A refused control line: what to say, and the errno for the write that carried it.
#[derive(Debug)]
pub struct Refusal {
    pub errno: i32,
    pub message: String,
}

fn refuse<T>(errno: i32, message: impl Into<String>) -> Result<T, Refusal> {
    Err(Refusal { errno, message: message.into() })
}

impl From<FsError> for Refusal {
    fn from(e: FsError) -> Refusal {
        Refusal { errno: e.errno(), message: e.to_string() }
    }
}

pub fn rfc3339(ns: i64) -> String {
    let t = UNIX_EPOCH + Duration::from_nanos(ns.max(0) as u64);
    humantime::format_rfc3339_micros(t).to_string()
}

impl Migrations {
    pub fn new(engine: Arc<Engine>) -> Arc<Migrations> {
        Self::build(engine, None)
    }

    /// For simulation tests: jobs take turns with the test's driver ([`turns::Turns`]), copy
    /// in small chunks and never pace by the clock, so that a seed replays exactly.
    pub fn simulated(engine: Arc<Engine>, turns: Arc<turns::Turns>) -> Arc<Migrations> {
        Self::build(engine, Some(turns))
    }

    fn build(engine: Arc<Engine>, turns: Option<Arc<turns::Turns>>) -> Arc<Migrations> {
        Arc::new(Migrations {
            engine,
            inner: Mutex::default(),
            events: Mutex::default(),
            copy_rate: RateCap::default(),
            max_jobs: AtomicUsize::new(0),
            stopping: AtomicBool::new(false),
            turns,
        })
    }

    pub fn stopping(&self) -> bool {
        self.stopping.load(Ordering::Acquire)
    }

    pub fn max_jobs(&self) -> usize {
        match self.max_jobs.load(Ordering::Relaxed) {
            0 => DEFAULT_MAX_JOBS,
            n => n,
        }
    }

    pub fn set_max_jobs(&self, n: usize) {
        self.max_jobs.store(n, Ordering::Relaxed);
    }

    /// Append a timestamped line to `.ferry/events` (and the mount's log).
    pub fn event(&self, text: String) {
        let line = format!("{} {text}", humantime::format_rfc3339_micros(SystemTime::now()));
        info!("{text}");
        let mut ev = self.events.lock();
        if ev.len() >= EVENTS_KEPT {
            ev.pop_front();
        }
        ev.push_back(line);
    }

    pub fn events_text(&self) -> Vec<u8> {
        let ev = self.events.lock();
        let mut out = Vec::new();
        for l in ev.iter() {
            out.extend_from_slice(l.as_bytes());
            out.push(b'\n');
        }
        out
    }

    /// Every job and plan of this mount. Lock order: `inner` before the catalog, so the
    /// caller must not hold the catalog.
    pub fn reports(&self) -> (Vec<JobReport>, Vec<PlanReport>) {
        let (jobs, plans): (Vec<Arc<JobState>>, Vec<Arc<PlanState>>) = {
            let inner = self.inner.lock();
            (inner.jobs.values().cloned().collect(), inner.plans.values().cloned().collect())
        };
        let cat = self.engine.catalog.lock();
        let c = &cat.catalog;
        let tb = c.geometry.track_size_bytes();
        let jobs = jobs.iter().map(|j| j.report(c, tb)).collect();
        let plans = plans
            .iter()
            .map(|p| PlanReport {
                id: p.rec.id,
                kind: p.rec.kind.name().into(),
                phase: match *p.phase.lock() {
                    PlanPhase::Running => "running",
                    PlanPhase::Done => "done",
                    PlanPhase::Failed => "failed",
                    PlanPhase::Cancelled => "cancelled",
                }
                .into(),
                sources: p.rec.sources.iter().map(|&v| plan::volume_name(c, v)).collect(),
                targets: p.rec.targets.iter().map(|&v| plan::volume_name(c, v)).collect(),
                cutover: p.rec.cutover.name().into(),
                jobs: p.jobs.lock().clone(),
                error: p.error.lock().clone(),
            })
            .collect();
        (jobs, plans)
    }

    /// Inodes with a job that has not ended.
    fn busy(&self) -> HashSet<Ino> {
        self.inner.lock().jobs.values().filter(|j| !j.phase().is_final()).map(|j| j.ino).collect()
    }

    fn next_id(inner: &mut Inner, c: &Catalog) -> u64 {
        inner.next_id = inner.next_id.max(c.next_job);
        let id = inner.next_id;
        inner.next_id += 1;
        id
    }

    /// Roll a job back in the catalog: its target (if any) is freed and punched.
    fn drop_record(&self, id: u64) -> Result<(), FsError> {
        let mut cat = self.engine.catalog.lock();
        if cat.catalog.jobs.get(&id).is_some_and(|j| !j.switched) {
            self.engine.commit(&mut cat, Op::JobCancel { job: id })?;
        }
        Ok(())
    }

    /// Stop every job (at unmount): each detaches from its data set and leaves its record,
    /// which the next mount rolls back and starts again; unless its data set is gone
    /// (removed while the job was queued or ran, and destroyed when the job let go of it,
    /// or unlinked and reachable by no name): nothing could start that job again, so its
    /// record is settled now, and no record outlives its data set.
    pub fn stop(&self) {
        self.stopping.store(true, Ordering::Release);
        if let Some(t) = &self.turns {
            t.release_all();
        }
        let threads = std::mem::take(&mut self.inner.lock().threads);
        for t in threads {
            let _ = t.join();
        }
        let mut cat = self.engine.catalog.lock();
        let gone: Vec<(u64, bool, String)> = cat
            .catalog
            .jobs
            .values()
            .filter(|j| {
                !cat.catalog.get(j.ino).is_some_and(|i| i.meta.nlink > 0 && matches!(i.body, Body::File { .. }))
            })
            .map(|j| (j.id, j.switched, j.path.clone()))
            .collect();
        for (id, switched, path) in gone {
            let op = if switched { Op::JobRelease { job: id } } else { Op::JobCancel { job: id } };
            match self.engine.commit(&mut cat, op) {
                Ok(_) => info!("job {id} ({path}): the data set is gone; its record is settled at unmount"),
                Err(e) => warn!("job {id} ({path}): settling the record of a data set that is gone: {e}"),
            }
        }
    }
}

/// Queue a job (recorded in the catalog, no target yet).
fn enqueue(
    m: &Arc<Migrations>,
    inner: &mut Inner,
    cat: &mut crate::catalog::store::Store,
    p: &PlannedJob,
    opts: &JobOptions,
    plan: Option<u64>,
) -> Result<Arc<JobState>, FsError> {
    let id = Migrations::next_id(inner, &cat.catalog);
    let rec = JobRec {
        cutover: opts.cutover,
        rate_bytes_per_s: opts.rate_bytes_per_s,
        plan,
        started_ns: now_ns(),
        verify: opts.verify,
        ..JobRec::queued(id, p.ino, p.path.clone(), p.targets.clone())
    };
    m.engine.commit(cat, Op::JobStart { job: rec.clone() })?;
    let job = Arc::new(JobState::new(&rec));
    inner.jobs.insert(id, job.clone());
    inner.queue.push_back(job.clone());
    Ok(job)
}

/// Start queued jobs while there are free slots.
fn pump(m: &Arc<Migrations>) {
    let mut inner = m.inner.lock();
    inner.threads.retain(|t| !t.is_finished());
    while inner.running < m.max_jobs() && !m.stopping() {
        let Some(job) = inner.queue.pop_front() else { break };
        if job.phase().is_final() {
            continue;
        }
        inner.running += 1;
        let sh = m.clone();
        if let Some(t) = &m.turns {
            t.enlist(job.id);
        }
        let spawned = std::thread::Builder::new().name(format!("ferry-job-{}", job.id)).spawn(move || {
            // However the thread ends (a panic included), the turn goes back.
            let _turn = sh.turns.clone().map(|t| turns::Held::take(t, job.id));
            job::run(&sh, &job);
            finished(&sh, &job);
        });
        match spawned {
            Ok(t) => inner.threads.push(t),
            Err(e) => {
                inner.running -= 1;
                warn!("starting a job thread: {e}");
                break;
            }
        }
    }
}

fn finished(m: &Arc<Migrations>, job: &Arc<JobState>) {
    m.inner.lock().running -= 1;
    if m.stopping() {
        return;
    }
    // Any running plan may be waiting for this data set (a job of its own, or one that
    // started before the plan and kept the data set busy).
    let _ = job;
    let plans: Vec<Arc<PlanState>> = m.inner.lock().plans.values().cloned().collect();
    for plan in plans {
        plan_progress(m, &plan);
    }
    pump(m);
}

/// A plan's jobs have all ended, or one did: finish the plan when its sources are empty,
/// re-plan what is still on them, or give up.
fn plan_progress(m: &Arc<Migrations>, plan: &Arc<PlanState>) {
    let mut inner = m.inner.lock();
    if *plan.phase.lock() != PlanPhase::Running {
        return;
    }
    // Every job that ends calls this for every running plan: look for one still running
    // from the newest job back (jobs start in queue order, so the newest are the last to
    // end), which finds one at once until the plan's last round ends, instead of walking
    // all of a plan's jobs per ended job (quadratic in the plan's size).
    let open = |id: &u64| inner.jobs.get(id).is_some_and(|j| !j.phase().is_final());
    if plan.jobs.lock().iter().rev().any(open) {
        return;
    }
    let ids = plan.jobs.lock().clone();
    let states: Vec<Arc<JobState>> = ids.iter().filter_map(|id| inner.jobs.get(id).cloned()).collect();
    let busy: HashSet<Ino> = inner.jobs.values().filter(|j| !j.phase().is_final()).map(|j| j.ino).collect();
    let mut cat = m.engine.catalog.lock();
    let failed = states.iter().find(|j| j.phase() == Phase::Failed);
    let end = |cat: &mut crate::catalog::store::Store, phase: PlanPhase, why: Option<String>| {
        let reopen = phase != PlanPhase::Done;
        if let Err(e) = m.engine.commit(cat, Op::PlanEnd { plan: plan.rec.id, reopen }) {
            warn!("ending plan {}: {e}", plan.rec.id);
        }
        *plan.phase.lock() = phase;
        let kind = plan.rec.kind.name();
        match &why {
            None => m.event(format!(
                "plan {} {kind}-done sources={} (empty)",
                plan.rec.id,
                names(&cat.catalog, &plan.rec.sources)
            )),
            Some(w) => m.event(format!(
                "plan {} {kind}-{} reason={w:?}",
                plan.rec.id,
                if phase == PlanPhase::Cancelled { "cancelled" } else { "failed" }
            )),
        }
        *plan.error.lock() = why;
    };
    if plan.cancel.load(Ordering::Acquire) {
        end(&mut cat, PlanPhase::Cancelled, Some("cancelled".into()));
        return;
    }
    if let Some(f) = failed {
        let reason = match f.state() {
            State::Failed { reason, .. } => reason,
            _ => String::new(),
        };
        let why = format!("job {} failed: {reason}", f.id);
        end(&mut cat, PlanPhase::Failed, Some(why));
        return;
    }
    // Data sets on the sources that another job is moving: wait for it to end.
    if busy.iter().any(|ino| on_any(&cat.catalog, *ino, &plan.rec.sources)) {
        return;
    }
    let left = match replan(&cat.catalog, &plan.rec, &busy) {
        Ok(left) => left,
        Err(e) => {
            end(&mut cat, PlanPhase::Failed, Some(e));
            return;
        }
    };
    if left.is_empty() {
        let gone = states.iter().filter(|j| j.phase() == Phase::Gone).count();
        if gone > 0 {
            m.event(format!(
                "plan {} {gone} data sets were deleted before they were moved; nothing to move",
                plan.rec.id
            ));
        }
        end(&mut cat, PlanPhase::Done, None);
        return;
    }
    if plan.rounds.fetch_add(1, Ordering::AcqRel) + 1 >= PLAN_ROUNDS {
        end(&mut cat, PlanPhase::Failed, Some(format!("{} data sets are still on the sources", left.len())));
        return;
    }
    let opts =
        JobOptions { cutover: plan.rec.cutover, rate_bytes_per_s: plan.rec.rate_bytes_per_s, verify: plan.rec.verify };
    for p in &left {
        match enqueue(m, &mut inner, &mut cat, p, &opts, Some(plan.rec.id)) {
            Ok(j) => plan.jobs.lock().push(j.id),
            Err(e) => warn!("plan {}: queueing {}: {e}", plan.rec.id, p.path),
        }
    }
}

fn replan(c: &Catalog, rec: &PlanRec, busy: &HashSet<Ino>) -> Result<Vec<PlannedJob>, String> {
    match rec.kind {
        PlanKind::Merge => plan::plan_merge(c, &rec.sources, rec.targets[0], busy),
        PlanKind::Drain => plan::plan_drain(c, rec.sources[0], &rec.targets, busy),
    }
}

fn volume_id(c: &Catalog, name: &str) -> Result<VolumeId, Refusal> {
    match c.volume_by_name(name) {
        Some(v) => Ok(v.id),
        None => {
            let known: Vec<&str> = c.volumes.values().map(|v| v.name.as_str()).collect();
            refuse(libc::ENOENT, format!("no volume named {name:?} (the pool has {})", known.join(", ")))
        }
    }
}

fn open_target(c: &Catalog, name: &str) -> Result<VolumeId, Refusal> {
    let id = volume_id(c, name)?;
    if c.closed_volumes.contains(&id) {
        return refuse(
            libc::EINVAL,
            format!("volume {name} is being emptied (a merge or drain source); it takes no data"),
        );
    }
    Ok(id)
}

/// The data sets at `path` (itself, or every one under a directory).
fn data_sets_at(c: &Catalog, path: &str) -> Result<Vec<PlannedJob>, Refusal> {
    let Some(ino) = report::resolve(c, path) else { return refuse(libc::ENOENT, format!("no such path: {path}")) };
    match c.get(ino).map(|i| &i.body) {
        Some(Body::File { .. }) | Some(Body::Dir { .. }) => {}
        _ => return refuse(libc::EINVAL, format!("{path} is not a data set or a directory")),
    }
    let list = report::list(c, path).map(|l| l.data_sets).unwrap_or_default();
    Ok(list
        .into_iter()
        .map(|d| PlannedJob {
            ino: d.ino,
            path: d.path,
            tracks: c.get(d.ino).map_or(0, |i| i.data_tracks(c.geometry)),
            targets: Vec::new(),
        })
        .collect())
}

/// Run one control line. `Ok` is the reply line (without its newline).
pub fn execute(m: &Arc<Migrations>, line: &str) -> Result<String, Refusal> {
    let cmd = match command::parse(line.trim()) {
        Ok(c) => c,
        Err(e) => return refuse(libc::EINVAL, e),
    };
    if m.stopping() {
        return refuse(libc::ESHUTDOWN, "the mount is stopping");
    }
    let reply = match cmd {
        Command::Migrate { paths, to, opts } => migrate(m, &paths, &to, &opts)?,
        Command::Merge { sources, into, opts } => start_plan(m, PlanKind::Merge, &sources, &[into], &opts)?,
        Command::Drain { source, to, opts } => start_plan(m, PlanKind::Drain, &[source], &to, &opts)?,
        Command::Cancel { id } => cancel(m, id)?,
        Command::Add { volume, size_bytes, path, force } => add_volume(m, &volume, size_bytes, path.as_deref(), force)?,
        Command::Retire { volume } => retire(m, &volume)?,
        Command::Reopen { volume } => reopen(m, &volume)?,
        Command::SetCopyRate { bytes_per_s } => {
            m.copy_rate.set_rate(bytes_per_s);
            format!("ok copy-rate={bytes_per_s}")
        }
        Command::SetMaxJobs { jobs } => {
            m.set_max_jobs(jobs);
            pump(m);
            format!("ok max-jobs={jobs}")
        }
    };
    pump(m);
    Ok(reply)
}

fn job_list(jobs: &[Arc<JobState>]) -> String {
    jobs.iter().map(|j| j.id.to_string()).collect::<Vec<_>>().join(" ")
}

fn migrate(m: &Arc<Migrations>, paths: &[String], to: &[String], opts: &JobOptions) -> Result<String, Refusal> {
    let busy = m.busy();
    let mut inner = m.inner.lock();
    let mut cat = m.engine.catalog.lock();
    let c = &cat.catalog;
    let targets = to.iter().map(|n| open_target(c, n)).collect::<Result<Vec<_>, _>>()?;
    let mut planned: Vec<PlannedJob> = Vec::new();
    let mut seen = HashSet::new();
    let mut in_place = 0;
    for p in paths {
        for mut d in data_sets_at(c, p)? {
            if !seen.insert(d.ino) {
                continue;
            }
            // Already where it is asked to go, in one extent (its runs, holes between them,
            // one after another on one target volume): nothing to move. (One in several
            // extents on its own volume is combined: that is a move too.)
            if let Some(Body::File { layout, .. }) = c.get(d.ino).map(|i| &i.body) {
                let extents: Vec<_> = layout.extents().collect();
                let one_run = extents.windows(2).all(|w| w[0].volume == w[1].volume && w[0].end() == w[1].first);
                if one_run && extents.iter().all(|e| targets.contains(&e.volume)) {
                    in_place += 1;
                    continue;
                }
            }
            if busy.contains(&d.ino) || c.job_of(d.ino).is_some() {
                return refuse(libc::EBUSY, format!("{} is already being migrated", d.path));
            }
            d.targets = targets.clone();
            planned.push(d);
        }
    }
    if planned.is_empty() && in_place > 0 {
        return refuse(
            libc::EINVAL,
            format!("nothing to move: {} already in one extent on {}", paths.join(" "), names(c, &targets)),
        );
    }
    if planned.is_empty() {
        return refuse(libc::ENOENT, format!("no data set under {}", paths.join(" ")));
    }
    let need: u64 = planned.iter().map(|p| p.tracks).sum();
    let free = plan::free_on(c, &targets);
    if need > free {
        return refuse(
            libc::ENOSPC,
            format!(
                "target full: the data sets hold {}; {} {} free",
                tracks_text(c, need),
                names(c, &targets),
                tracks_text(c, free)
            ),
        );
    }
    let mut jobs = Vec::new();
    for p in &planned {
        jobs.push(enqueue(m, &mut inner, &mut cat, p, opts, None)?);
    }
    drop(cat);
    drop(inner);
    let skipped = if in_place > 0 { format!(" (skipped {in_place} already in place)") } else { String::new() };
    Ok(format!("ok jobs {}{skipped}", job_list(&jobs)))
}

fn start_plan(
    m: &Arc<Migrations>,
    kind: PlanKind,
    sources: &[String],
    targets: &[String],
    opts: &JobOptions,
) -> Result<String, Refusal> {
    let busy = m.busy();
    let mut inner = m.inner.lock();
    let mut cat = m.engine.catalog.lock();
    let c = &cat.catalog;
    let sources = sources.iter().map(|n| volume_id(c, n)).collect::<Result<Vec<_>, _>>()?;
    let mut uniq = sources.clone();
    uniq.sort_unstable();
    uniq.dedup();
    if uniq.len() != sources.len() {
        return refuse(libc::EINVAL, "a source volume is named twice");
    }
    let targets = if targets.is_empty() {
        c.open_volumes().map(|v| v.id).filter(|v| !sources.contains(v)).collect()
    } else {
        targets.iter().map(|n| open_target(c, n)).collect::<Result<Vec<_>, _>>()?
    };
    if targets.is_empty() {
        return refuse(libc::ENOSPC, "no volume is left to move the data sets to");
    }
    if let Some(t) = targets.iter().find(|t| sources.contains(t)) {
        return refuse(libc::EINVAL, format!("volume {} is both a source and a target", plan::volume_name(c, *t)));
    }
    // Plans must not work against each other: a volume that a running plan empties takes
    // nothing new, and one that a running plan (or job) fills is not emptied under it.
    if let Some(p) = c.plans.values().find(|p| p.sources.iter().any(|s| sources.contains(s) || targets.contains(s))) {
        return refuse(libc::EBUSY, format!("plan {} is already emptying {}", p.id, names(c, &p.sources)));
    }
    if let Some((p, v)) = c.plans.values().find_map(|p| p.targets.iter().find(|t| sources.contains(t)).map(|v| (p, *v)))
    {
        return refuse(
            libc::EBUSY,
            format!("volume {} is the target of plan {}, which is still filling it", plan::volume_name(c, v), p.id),
        );
    }
    if let Some((j, v)) = inner
        .jobs
        .values()
        .filter(|j| !j.phase().is_final())
        .find_map(|j| j.targets.iter().find(|t| sources.contains(t)).map(|v| (j, *v)))
    {
        return refuse(
            libc::EBUSY,
            format!(
                "volume {} is the target of job {}, which is still moving {}",
                plan::volume_name(c, v),
                j.id,
                j.path
            ),
        );
    }
    let id = Migrations::next_id(&mut inner, c);
    let rec = PlanRec {
        id,
        kind,
        sources: sources.clone(),
        targets: targets.clone(),
        cutover: opts.cutover,
        rate_bytes_per_s: opts.rate_bytes_per_s,
        started_ns: now_ns(),
        verify: opts.verify,
    };
    let planned = replan(c, &rec, &busy).map_err(|e| Refusal { errno: libc::ENOSPC, message: e })?;
    m.engine.commit(&mut cat, Op::PlanStart { plan: rec.clone() })?;
    let state = Arc::new(PlanState::new(rec));
    inner.plans.insert(id, state.clone());
    let mut jobs = Vec::new();
    for p in &planned {
        jobs.push(enqueue(m, &mut inner, &mut cat, p, opts, Some(id))?);
    }
    *state.jobs.lock() = jobs.iter().map(|j| j.id).collect();
    let c = &cat.catalog;
    m.event(format!(
        "plan {id} {}-start sources={} targets={} jobs={}",
        kind.name(),
        names(c, &sources),
        names(c, &targets),
        jobs.len()
    ));
    drop(cat);
    drop(inner);
    if jobs.is_empty() {
        plan_progress(m, &state);
    }
    Ok(format!("ok plan {id} jobs {}", job_list(&jobs)).trim_end().to_string())
}

fn on_any(c: &Catalog, ino: Ino, vols: &[VolumeId]) -> bool {
    matches!(c.get(ino).map(|i| &i.body), Some(Body::File { layout, .. }) if layout.extents().any(|e| vols.contains(&e.volume)))
}

fn cancel(m: &Arc<Migrations>, id: u64) -> Result<String, Refusal> {
    let (job, plan) = {
        let inner = m.inner.lock();
        (inner.jobs.get(&id).cloned(), inner.plans.get(&id).cloned())
    };
    if let Some(plan) = plan {
        if *plan.phase.lock() != PlanPhase::Running {
            return refuse(libc::EINVAL, format!("plan {id} has already ended"));
        }
        plan.cancel.store(true, Ordering::Release);
        let ids = plan.jobs.lock().clone();
        for j in ids {
            let _ = cancel(m, j);
        }
        plan_progress(m, &plan);
        return Ok(format!("ok cancelling plan {id}"));
    }
    let Some(job) = job else { return refuse(libc::ENOENT, format!("no job or plan {id}")) };
    // Checked and set under the state's lock, as the job's point of no return is
    // (`JobState::begin_switch`): an acknowledged cancel always wins.
    let queued = {
        let life = job.life.lock();
        match &life.state {
            State::Switched { .. } => return refuse(libc::EINVAL, format!("job {id} already switched")),
            s if s.is_final() => return refuse(libc::EINVAL, format!("job {id} has already ended ({})", s.name())),
            s if s.past_no_return() => {
                return refuse(libc::EBUSY, format!("job {id}: too late: the switch is under way"))
            }
            s => {
                job.cancel.store(true, Ordering::Release);
                *s == State::Queued
            }
        }
    };
    if queued {
        let removed = {
            let mut inner = m.inner.lock();
            let before = inner.queue.len();
            inner.queue.retain(|j| j.id != id);
            before != inner.queue.len()
        };
        if removed {
            job::detach_queued(m, &job);
            m.drop_record(id)?;
            job.settle(m, State::Cancelled);
            m.event(format!("job {id} cancelled path={} (it had not started)", job.path));
            if let Some(p) = job.plan {
                let plan = m.inner.lock().plans.get(&p).cloned();
                if let Some(plan) = plan {
                    plan_progress(m, &plan);
                }
            }
        }
    }
    Ok(format!("ok cancelling job {id}"))
}

/// `add VOL size=N [path=IMAGE]`: a new volume while the pool is mounted, open for
/// allocations and as a target at once. The image is made and put in the volume table
/// first; the catalog records it last (`Op::AddVolume`, synced), so a crash in between
/// leaves at most an image file that no catalog names (a later add at that path is refused
/// until the file is removed, as offline).
fn add_volume(
    m: &Arc<Migrations>,
    name: &str,
    size_bytes: u64,
    path: Option<&str>,
    force: bool,
) -> Result<String, Refusal> {
    let refusal = |e: crate::pool::PoolError| Refusal { errno: e.errno(), message: e.to_string() };
    // Adds and retires are serialised by the jobs lock; the catalog is only held to check
    // the name and to commit, not while the image is made.
    let _inner = m.inner.lock();
    let v = {
        let cat = m.engine.catalog.lock();
        crate::pool::check_new_volume(
            &cat.catalog,
            &m.engine.pool_dir,
            name,
            size_bytes,
            path.map(std::path::Path::new),
            force,
        )
        .map_err(refusal)?
    };
    let (op, io) = v.create_image(&*m.engine.disk, &m.engine.pool_dir).map_err(refusal)?;
    let (id, img_path) = (v.id, &v.path);
    m.engine.adopt_volume(id, io);
    let committed = {
        let mut cat = m.engine.catalog.lock();
        m.engine.commit(&mut cat, op)
    };
    if let Err(e) = committed.and_then(|_| m.engine.sync_log()) {
        // Not recorded: no trace of it. Recorded but not synced: the volume stays (the
        // log's error is latched; the admin hears of it here).
        if !m.engine.catalog.lock().catalog.volumes.contains_key(&id) {
            m.engine.forget_volume(id);
            v.undo(&*m.engine.disk);
        }
        return Err(e.into());
    }
    let tracks = v.tracks_total;
    m.event(format!("volume {name} added size={} tracks={tracks} image={}", v.size_bytes, img_path.display()));
    Ok(format!("ok added {name} tracks={tracks} image={}", img_path.display()))
}

fn retire(m: &Arc<Migrations>, name: &str) -> Result<String, Refusal> {
    let inner = m.inner.lock();
    let mut cat = m.engine.catalog.lock();
    let c = &cat.catalog;
    let id = volume_id(c, name)?;
    if let Some(j) = inner.jobs.values().find(|j| !j.phase().is_final() && j.targets.contains(&id)) {
        return refuse(libc::EBUSY, format!("volume {name} is a target of job {}", j.id));
    }
    if let Some((errno, why)) = crate::pool::retire_refusal(c, id) {
        return refuse(errno, format!("volume {name} can't be retired: {why}"));
    }
    let v = &c.volumes[&id];
    let device = match crate::pool::is_device_volume(v) {
        true => Some(
            crate::pool::locate_device(&m.engine.pool_dir, v)
                .map_err(|e| Refusal { errno: e.errno(), message: e.to_string() })?,
        ),
        false => None,
    };
    let path = v.path.clone();
    m.engine.commit(&mut cat, Op::RemoveVolume { id })?;
    drop(cat);
    drop(inner);
    m.engine.sync_log()?;
    m.engine.forget_volume(id);
    if let Some(at) = device {
        // The device keeps its bytes, and no longer claims to be this pool's.
        let wiped = crate::pool::wipe_device_label(&at);
        m.event(format!("volume {name} retired device={} label_wiped={}", at.display(), wiped.is_ok()));
        return match wiped {
            Ok(()) => Ok(format!("ok retired {name} (device {} keeps its bytes; its label is wiped)", at.display())),
            Err(e) => Ok(format!("ok retired {name} (its label on {} could not be wiped: {e})", at.display())),
        };
    }
    let removed = crate::pool::remove_retired_image(&*m.engine.disk, &m.engine.pool_dir, std::path::Path::new(&path));
    m.event(format!("volume {name} retired image={path} removed={removed}"));
    Ok(format!("ok retired {name}{}", if removed { "" } else { " (its image is outside the pool and was kept)" }))
}

/// `reopen VOL`: a closed volume (a finished plan's source) takes allocations again, and
/// can be a target.
fn reopen(m: &Arc<Migrations>, name: &str) -> Result<String, Refusal> {
    let _inner = m.inner.lock();
    let mut cat = m.engine.catalog.lock();
    let id = volume_id(&cat.catalog, name)?;
    if let Some((errno, why)) = crate::pool::reopen_refusal(&cat.catalog, id) {
        return refuse(errno, format!("volume {name} can't be reopened: {why}"));
    }
    m.engine.commit(&mut cat, Op::ReopenVolume { id })?;
    drop(cat);
    m.engine.sync_log()?;
    m.event(format!("volume {name} reopened"));
    Ok(format!("ok reopened {name}"))
}

/// After the engine's recovery (engine/recovery.rs): start the jobs it queued again (every
/// job record left in the catalog is one), and carry on with the recorded plans.
pub fn resume(m: &Arc<Migrations>, recovered: &crate::engine::RecoveryReport) {
    for (old, new, path) in &recovered.jobs_requeued {
        m.event(format!("job {old} resumed as job {new} path={path} (from the start)"));
    }
    for (old, path) in &recovered.jobs_dropped {
        m.event(format!("job {old} not resumed path={path} (the data set is gone)"));
    }
    {
        let mut inner = m.inner.lock();
        let (recs, checkpointed): (Vec<JobRec>, HashSet<u64>) = {
            let cat = m.engine.catalog.lock();
            (cat.catalog.jobs.values().cloned().collect(), cat.catalog.checkpoints.keys().copied().collect())
        };
        for rec in &recs {
            let job = Arc::new(JobState::new(rec));
            inner.next_id = inner.next_id.max(rec.id + 1);
            // Recovery kept it for its checkpoint (it rolls back those it can't resume).
            if checkpointed.contains(&rec.id) {
                // Its monitor goes on now, before the mount serves (the job may wait its turn).
                match job::attach_checkpoint(m, &job) {
                    Ok((copied, tracks, dirty)) => m.event(format!(
                        "job {} resumed at {} % (from checkpoint) path={} copied_tracks={copied} tracks={tracks} \
                         dirty_regions={dirty}",
                        rec.id,
                        job::percent(copied, tracks),
                        rec.path
                    )),
                    Err(e) => {
                        job::detach_queued(m, &job);
                        if let Err(e) = m.drop_record(rec.id) {
                            warn!("job {}: rolling back: {e}", rec.id);
                        }
                        job.fail(m, format!("resuming from the checkpoint: {e}"), None);
                        inner.jobs.insert(rec.id, job);
                        continue;
                    }
                }
            }
            inner.jobs.insert(rec.id, job.clone());
            inner.queue.push_back(job);
        }
        let cat = m.engine.catalog.lock();
        let plans: Vec<PlanRec> = cat.catalog.plans.values().cloned().collect();
        for rec in plans {
            let id = rec.id;
            let state = Arc::new(PlanState::new(rec));
            // Its jobs that resume from their checkpoints are its own again.
            *state.jobs.lock() = recs.iter().filter(|j| j.plan == Some(id)).map(|j| j.id).collect();
            inner.plans.insert(id, state);
            m.event(format!("plan {id} resumed"));
        }
    }
    let plans: Vec<Arc<PlanState>> = m.inner.lock().plans.values().cloned().collect();
    for p in plans {
        plan_progress(m, &p);
    }
    pump(m);
}

#[cfg(test)]
mod tests;
