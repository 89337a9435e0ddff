//! The CLI's side of the control files: send one command line to `.ferry/control`, read its
//! reply, and follow jobs through `.ferry/status` (`--wait`). A shell script can do the same
//! with `echo` and `cat`; docs/cli.md shows how.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::OpenOptions;
use std::io::{IsTerminal, Read, Write};
use std::path::Path;
use std::time::{Duration, Instant};

use crate::fs::CONTROL_DIR_NAME;
use crate::mount::status_of_mount;
use crate::report::{JobReport, PlanReport, Status};

/// How often `wait` reads the status (and redraws the bars), at the least.
const POLL: Duration = Duration::from_millis(200);
/// How often it reads it when a job's end is near ([`next_look`]).
const NEAR: Duration = Duration::from_millis(10);

/// What a command started, or what `ferryfs wait` follows.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Started {
    pub plans: Vec<u64>,
    pub jobs: Vec<u64>,
}

/// Parse an `ok ...` reply: `ok jobs 3 4`, `ok plan 7 jobs 8 9`.
pub fn started(reply: &str) -> Started {
    let words: Vec<&str> = reply.split_whitespace().collect();
    let mut s = Started::default();
    let mut i = 1;
    while i < words.len() {
        match words[i] {
            "plan" => {
                s.plans.extend(words.get(i + 1).and_then(|w| w.parse::<u64>().ok()));
                i += 2;
            }
            "jobs" => {
                i += 1;
                while let Some(Ok(id)) = words.get(i).map(|w| w.parse::<u64>()) {
                    s.jobs.push(id);
                    i += 1;
                }
            }
            _ => i += 1,
        }
    }
    s
}

/// Why a command line got no `ok`.
#[derive(Debug, PartialEq, Eq)]
pub enum SendError {
    /// The mount understood the line and declined it (its `error:` reply); nothing changed.
    Refused(String),
    /// No reply: not a mount, not ours, or the control file failed.
    Failed(String),
}

/// Send one command line; the reply, or why there is none.
pub fn send(mnt: &Path, line: &str) -> Result<String, SendError> {
    crate::mount::mount_status(mnt).map_err(SendError::Failed)?;
    let path = mnt.join(CONTROL_DIR_NAME).join("control");
    let mut f = OpenOptions::new().read(true).write(true).open(&path).map_err(|e| match e.raw_os_error() {
        Some(libc::EACCES) | Some(libc::EPERM) => {
            SendError::Failed(format!("{}: only the mount's owner may send commands", path.display()))
        }
        Some(libc::EROFS) => {
            SendError::Refused(format!("{} is mounted read-only (-o ro): it takes no commands", mnt.display()))
        }
        _ => SendError::Failed(format!("{}: {e}", path.display())),
    })?;
    let wrote = f.write_all(format!("{line}\n").as_bytes());
    let mut reply = String::new();
    f.read_to_string(&mut reply).map_err(|e| SendError::Failed(format!("{}: {e}", path.display())))?;
    let reply = reply.trim().to_string();
    match (wrote, reply.strip_prefix("error: ")) {
        (_, Some(why)) => Err(SendError::Refused(why.to_string())),
        (Err(e), None) => Err(SendError::Failed(format!("{}: {e}", path.display()))),
        (Ok(()), None) => Ok(reply),
    }
}

/// The contents of the mount's `.ferry/metrics`; the refusals say what `ferryfs status`
/// says (not a ferryfs mount, or another user's).
pub fn metrics(mnt: &Path) -> Result<Vec<u8>, String> {
    crate::mount::mount_status(mnt)?;
    let path = mnt.join(CONTROL_DIR_NAME).join("metrics");
    std::fs::read(&path).map_err(|e| match e.raw_os_error() {
        Some(libc::EACCES) | Some(libc::EPERM) => {
            format!("{}: a ferryfs mount of another user; only the mount's owner may use it", mnt.display())
        }
        _ => format!("{}: {e}", path.display()),
    })
}

/// `ferryfs metrics MNT`: the metrics, as they are, on standard output.
pub fn print_metrics(mnt: &Path) -> Result<(), String> {
    let text = metrics(mnt)?;
    let mut out = std::io::stdout().lock();
    out.write_all(&text).and_then(|()| out.flush()).map_err(|e| format!("standard output: {e}"))
}

fn mib(b: u64) -> f64 {
    b as f64 / (1 << 20) as f64
}

fn summary(j: &JobReport) -> String {
    let how = match (j.stall_us, j.window_us) {
        (Some(us), _) => format!("writes held {:.3} ms", us as f64 / 1000.0),
        (_, Some(us)) => format!("downtime window {:.3} ms", us as f64 / 1000.0),
        _ => String::new(),
    };
    let how = match (&j.verify, j.verified_tracks, j.verify_us) {
        (Some(_), Some(n), Some(us)) => format!("{how}; verified {n} tracks in {:.3} ms", us as f64 / 1000.0),
        _ => how,
    };
    match j.phase.as_str() {
        "switched" => format!(
            "job {} {}: switched to {} ({how}; {:.1} MiB copied, {:.1} MiB re-synced in {} passes, mirrored writes {}, {:.1} MiB/s)",
            j.id,
            j.path,
            j.targets.join(","),
            mib(j.bytes_copied),
            mib(j.bytes_resynced),
            j.passes,
            if j.mirrored { "on" } else { "off" },
            mib(j.copy_rate_bytes_per_s)
        ),
        "gone" => format!("job {} {}: the data set was deleted; nothing to move", j.id, j.path),
        "failed" => format!("job {} {}: failed: {}", j.id, j.path, j.error.clone().unwrap_or_default()),
        "stopped" => format!("job {} {}: stopped (the mount is unmounting; its next mount starts it again)", j.id, j.path),
        p => format!("job {} {}: {p}", j.id, j.path),
    }
}

/// How long the job takes to copy `bytes` at its rate; `None` while the rate is not known.
fn time_for(bytes: u64, j: &JobReport) -> Option<Duration> {
    (j.copy_rate_bytes_per_s > 0).then(|| Duration::from_secs_f64(bytes as f64 / j.copy_rate_bytes_per_s as f64))
}

/// The rate and the time left, as the bars and the lines show them: the job's own average
/// (`copy_rate_bytes_per_s`, the summary's rate too), not an estimate of the CLI's.
fn rate_and_eta(j: &JobReport) -> String {
    let eta = match time_for(j.bytes_total.saturating_sub(j.bytes_copied), j) {
        Some(t) if !t.is_zero() => format!(", ETA {:.0} s", t.as_secs_f64()),
        _ => String::new(),
    };
    format!("{:.1} MiB/s{eta}", mib(j.copy_rate_bytes_per_s))
}

/// A progress line: job id, path, phase, copied/total, rate.
fn line_of(j: &JobReport) -> String {
    format!(
        "job {} {}: {} {:.1}/{:.1} MiB at {}, {} dirty tracks",
        j.id,
        j.path,
        j.phase,
        mib(j.bytes_copied),
        mib(j.bytes_total),
        rate_and_eta(j),
        j.dirty_tracks
    )
}

fn plan_line(p: &PlanReport) -> String {
    let why = p.error.as_ref().map(|e| format!(": {e}")).unwrap_or_default();
    format!("plan {} ({}): {}{why}", p.id, p.kind, p.phase)
}

/// How the jobs and plans that `wait` followed ended, worst last: the worst one decides.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Ending {
    /// Every job switched and every plan finished.
    Switched,
    /// The mount went away, or stopped the jobs to unmount; its next mount starts them again.
    Stopped,
    /// A job or a plan was cancelled.
    Cancelled,
    /// A job or a plan failed.
    Failed,
}

/// Why `wait` did not end with every job switched.
#[derive(Debug, PartialEq, Eq)]
pub struct Unfinished {
    pub ending: Ending,
    pub why: String,
}

fn ending_of_job(phase: &str) -> Ending {
    match phase {
        "failed" => Ending::Failed,
        "cancelled" => Ending::Cancelled,
        "stopped" => Ending::Stopped,
        _ => Ending::Switched,
    }
}

fn ending_of_plan(phase: &str) -> Ending {
    match phase {
        "failed" => Ending::Failed,
        "cancelled" => Ending::Cancelled,
        _ => Ending::Switched,
    }
}

/// How `wait` shows progress.
enum Display {
    /// stdout is a terminal: a bar per job, drawn on stdout (so `2>file` hides none of it),
    /// and each job's summary printed above the bars as it ends.
    Bars {
        multi: indicatif::MultiProgress,
        style: indicatif::ProgressStyle,
        bars: BTreeMap<u64, indicatif::ProgressBar>,
    },
    /// Anything else: a line per job at each phase change and every `interval`, and a
    /// summary line per job as it ends.
    Lines { interval: Duration, next: Instant },
}

impl Display {
    fn new(interval: Duration) -> Display {
        if std::io::stdout().is_terminal() {
            let multi = indicatif::MultiProgress::with_draw_target(indicatif::ProgressDrawTarget::stdout());
            let style =
                indicatif::ProgressStyle::with_template("{prefix:>8} {bar:30} {bytes:>10}/{total_bytes:<10} {msg}")
                    .expect("a valid template");
            Display::Bars { multi, style, bars: BTreeMap::new() }
        } else {
            Display::Lines { interval, next: Instant::now() + interval }
        }
    }

    fn println(&self, line: &str) {
        match self {
            // Above the bars, on the terminal the bars are drawn on.
            Display::Bars { multi, .. } if multi.println(line).is_ok() => {}
            _ => println!("{line}"),
        }
    }

    /// One reading of the jobs: `changed` says which changed phase since the last.
    fn show(&mut self, jobs: &[&JobReport], changed: &BTreeSet<u64>) {
        match self {
            Display::Bars { multi, style, bars } => {
                for j in jobs {
                    let bar = bars.entry(j.id).or_insert_with(|| {
                        let b = multi.add(indicatif::ProgressBar::new(j.bytes_total.max(1)));
                        b.set_style(style.clone());
                        b.set_prefix(format!("job {}", j.id));
                        b
                    });
                    if bar.is_finished() {
                        continue;
                    }
                    bar.set_length(j.bytes_total.max(1));
                    bar.set_position(j.bytes_copied.min(j.bytes_total));
                    if is_final(&j.phase) {
                        bar.finish_and_clear();
                        let _ = multi.println(summary(j));
                    } else {
                        bar.set_message(format!("{} {} {}", rate_and_eta(j), j.phase, j.path));
                    }
                }
            }
            Display::Lines { interval, next } => {
                let tick = Instant::now() >= *next;
                if tick {
                    *next = Instant::now() + *interval;
                }
                for j in jobs {
                    if changed.contains(&j.id) && is_final(&j.phase) {
                        println!("{}", summary(j));
                    } else if !is_final(&j.phase) && (tick || changed.contains(&j.id)) {
                        println!("{}", line_of(j));
                    }
                }
            }
        }
    }
}

/// Follow the jobs and the plans (whose jobs may grow) to their end. On a terminal, a
/// progress bar per job; otherwise a line per job at each phase change and every
/// `interval`. Each job's summary is printed as it ends, and each plan's at the end.
pub fn wait(mnt: &Path, what: &Started, interval: Duration) -> Result<(), Unfinished> {
    let mut display = Display::new(interval);
    let mut last_phase: BTreeMap<u64, String> = BTreeMap::new();
    let mut plans_shown: BTreeSet<u64> = BTreeSet::new();
    loop {
        let looked = Instant::now();
        let st = status_of_mount(mnt);
        let took = looked.elapsed();
        let Some(st) = st else {
            return Err(Unfinished {
                ending: Ending::Stopped,
                why: format!(
                    "{} is no longer mounted before the jobs ended (its next mount starts them again)",
                    mnt.display()
                ),
            });
        };
        let plans: Vec<&PlanReport> = st.plans.iter().filter(|p| what.plans.contains(&p.id)).collect();
        let mut ids: BTreeSet<u64> = what.jobs.iter().copied().collect();
        ids.extend(plans.iter().flat_map(|p| p.jobs.iter().copied()));
        let jobs: Vec<&JobReport> = st.jobs.iter().filter(|j| ids.contains(&j.id)).collect();
        let changed: BTreeSet<u64> =
            jobs.iter().filter(|j| last_phase.get(&j.id) != Some(&j.phase)).map(|j| j.id).collect();
        display.show(&jobs, &changed);
        for j in &jobs {
            last_phase.insert(j.id, j.phase.clone());
        }
        for p in plans.iter().filter(|p| p.phase != "running" && plans_shown.insert(p.id)) {
            display.println(&plan_line(p));
        }
        let jobs_done =
            what.jobs.iter().all(|id| jobs.iter().any(|j| j.id == *id)) && jobs.iter().all(|j| is_final(&j.phase));
        let plans_done = plans.len() == what.plans.len() && plans.iter().all(|p| p.phase != "running");
        if jobs_done && plans_done {
            let mut ending = Ending::Switched;
            let mut why = Vec::new();
            // A job whose data set was deleted had nothing to move: it ended well.
            for j in jobs.iter().filter(|j| j.phase != "switched" && j.phase != "gone") {
                ending = ending.max(ending_of_job(&j.phase));
                why.push(summary(j));
            }
            for p in plans.iter().filter(|p| p.phase != "done") {
                ending = ending.max(ending_of_plan(&p.phase));
                why.push(plan_line(p));
            }
            return match ending {
                Ending::Switched => Ok(()),
                _ => Err(Unfinished { ending, why: format!("not every job switched: {}", why.join("; ")) }),
            };
        }
        std::thread::sleep(next_look(&jobs, took).min(interval));
    }
}

/// How long `wait` sleeps before its next look at the status. Nothing wakes it at a change
/// (the mount answers no poll: fs/mod.rs says why; and a file kept open would make an
/// unmount find the mount busy), so it looks often where the end is near:
/// every [`NEAR`] while a job is in its cutover or has (nearly) nothing left to re-sync, and,
/// while a job copies or verifies, when that should be done. At most [`POLL`]; and at least four
/// times what the last look took, so that a large status (a plan of many jobs) costs the
/// mount no more than a fifth of a thread.
fn next_look(jobs: &[&JobReport], took: Duration) -> Duration {
    let left = |bytes: u64, j: &JobReport| time_for(bytes, j).unwrap_or(POLL);
    let soon = jobs
        .iter()
        .map(|j| match j.phase.as_str() {
            "cutover" => NEAR,
            // Reads source and target whole, with writes held: about two copies' time.
            "verifying" => left(j.bytes_total.saturating_mul(2), j),
            "copying" => left(j.bytes_total.saturating_sub(j.bytes_copied), j),
            "resyncing" => left(j.dirty_tracks.saturating_mul(j.track_size_bytes), j),
            _ => POLL,
        })
        .min()
        .unwrap_or(POLL);
    soon.clamp(NEAR, POLL).max(took * 4)
}

fn is_final(phase: &str) -> bool {
    matches!(phase, "switched" | "gone" | "cancelled" | "failed" | "stopped")
}

/// What `ferryfs wait` follows: the ids given (each a job or a plan of this mount; job and
/// plan ids share one counter), or, without ids, every job and plan that has not ended.
pub fn resolve(st: &Status, ids: &[u64]) -> Result<Started, String> {
    let mut what = Started::default();
    if ids.is_empty() {
        what.jobs = st.jobs.iter().filter(|j| !is_final(&j.phase)).map(|j| j.id).collect();
        what.plans = st.plans.iter().filter(|p| p.phase == "running").map(|p| p.id).collect();
        return Ok(what);
    }
    for &id in ids {
        if st.jobs.iter().any(|j| j.id == id) {
            what.jobs.push(id);
        } else if st.plans.iter().any(|p| p.id == id) {
            what.plans.push(id);
        } else {
            return Err(format!(
                "no job or plan {id} on {} (jobs and plans of an earlier mount are not listed)",
                st.mountpoint
            ));
        }
    }
    Ok(what)
}

/// `ferryfs status`: the jobs, as a table.
pub fn print_jobs(st: &Status) {
    if st.jobs.is_empty() {
        println!("jobs: none");
        return;
    }
    println!(
        "{:>5} {:<30} {:<14} {:>6} {:>20} {:>7} {:>6} {:>8}  TIMES",
        "JOB", "DATA SET", "PHASE", "MODE", "COPIED/TOTAL MiB", "DIRTY", "PASSES", "MIRROR"
    );
    for j in &st.jobs {
        let times = match (j.stall_us, j.window_us) {
            (Some(us), _) => format!("stall {us} us"),
            (_, Some(us)) => format!("window {us} us"),
            _ => String::new(),
        };
        let times = match &j.verify {
            Some(v) => format!("{times} verify={v}").trim_start().to_string(),
            None => times,
        };
        println!(
            "{:>5} {:<30} {:<14} {:>6} {:>20} {:>7} {:>6} {:>8}  {times}{}",
            j.id,
            j.path,
            j.phase,
            j.cutover,
            format!("{:.1}/{:.1}", mib(j.bytes_copied), mib(j.bytes_total)),
            j.dirty_tracks,
            j.passes,
            if j.mirrored { "on" } else { "off" },
            j.error.as_ref().map(|e| format!(" error: {e}")).unwrap_or_default()
        );
    }
    for p in &st.plans {
        println!(
            "plan {} {} {} -> {}: {} ({} jobs){}",
            p.id,
            p.kind,
            p.sources.join(","),
            p.targets.join(","),
            p.phase,
            p.jobs.len(),
            p.error.as_ref().map(|e| format!(" error: {e}")).unwrap_or_default()
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_parse() {
        assert_eq!(started("ok jobs 3 4"), Started { plans: vec![], jobs: vec![3, 4] });
        assert_eq!(started("ok plan 7 jobs 8 9"), Started { plans: vec![7], jobs: vec![8, 9] });
        assert_eq!(started("ok plan 7 jobs"), Started { plans: vec![7], jobs: vec![] });
    }

    fn job(phase: &str, copied: u64, total: u64, dirty: u64, rate: u64) -> JobReport {
        JobReport {
            phase: phase.into(),
            bytes_copied: copied,
            bytes_total: total,
            dirty_tracks: dirty,
            track_size_bytes: 65536,
            copy_rate_bytes_per_s: rate,
            ..JobReport::default()
        }
    }

    #[test]
    fn wait_looks_again_when_the_end_is_near() {
        let ms = Duration::from_millis;
        let look = |jobs: &[JobReport], took| next_look(&jobs.iter().collect::<Vec<_>>(), took);
        let mib = 1 << 20;
        // Queued, or copying at a rate not known yet: the usual 0.2 s.
        assert_eq!(look(&[job("queued", 0, 0, 0, 0)], ms(1)), POLL);
        assert_eq!(look(&[job("copying", 0, 100 * mib, 0, 0)], ms(1)), POLL);
        // 5 MiB left at 100 MiB/s: when the copy should be done.
        assert_eq!(look(&[job("copying", 95 * mib, 100 * mib, 0, 100 * mib)], ms(1)), ms(50));
        // Far from done, or awaiting a close: no sooner than 0.2 s.
        assert_eq!(look(&[job("copying", 0, 100 * mib, 0, 100 * mib)], ms(1)), POLL);
        assert_eq!(look(&[job("awaiting-close", 100 * mib, 100 * mib, 0, 100 * mib)], ms(1)), POLL);
        // In the cutover, or nothing left to re-sync: every 10 ms; the nearest job decides.
        assert_eq!(look(&[job("cutover", 100 * mib, 100 * mib, 0, 100 * mib)], ms(1)), NEAR);
        assert_eq!(look(&[job("resyncing", 100 * mib, 100 * mib, 0, 100 * mib)], ms(1)), NEAR);
        let two = [job("copying", 0, 100 * mib, 0, 100 * mib), job("cutover", 1, 1, 0, 1)];
        assert_eq!(look(&two, ms(1)), NEAR);
        // Verifying reads the data set twice: a small one is looked at soon, a large one
        // every 0.2 s.
        assert_eq!(look(&[job("verifying", mib, mib, 0, 100 * mib)], ms(1)), ms(20));
        assert_eq!(look(&[job("verifying", 100 * mib, 100 * mib, 0, 100 * mib)], ms(1)), POLL);
        // A status that takes 30 ms to read is read at most every 120 ms.
        assert_eq!(look(&[job("cutover", 1, 1, 0, 1)], ms(30)), ms(120));
    }
}
