//! The CLI's side of the control files: send one command line to `.ferry/control`, read its
//! reply, and follow jobs through `.ferry/status` (`--wait`). A shell script can do the same
//! with `echo` and `cat`; docs/cli.md shows how.

use std::fs::OpenOptions;
use std::io::{IsTerminal, Read, Write};
use std::path::Path;
use std::time::Duration;

use crate::fs::CONTROL_DIR_NAME;
use crate::mount::status_of_mount;
use crate::report::{JobReport, Status};

/// How often `--wait` reads the status.
const POLL: Duration = Duration::from_millis(200);

/// What a command started.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Started {
    pub plan: Option<u64>,
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
                s.plan = words.get(i + 1).and_then(|w| w.parse().ok());
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

/// Send one command line; the reply, or the refusal's text.
pub fn send(mnt: &Path, line: &str) -> Result<String, String> {
    crate::mount::mount_status(mnt)?;
    let path = mnt.join(CONTROL_DIR_NAME).join("control");
    let mut f = OpenOptions::new().read(true).write(true).open(&path).map_err(|e| match e.raw_os_error() {
        Some(libc::EACCES) | Some(libc::EPERM) => {
            format!("{}: only the mount's owner may send commands", path.display())
        }
        Some(libc::EROFS) => format!("{} is mounted read-only (-o ro): it takes no commands", mnt.display()),
        _ => format!("{}: {e}", path.display()),
    })?;
    let wrote = f.write_all(format!("{line}\n").as_bytes());
    let mut reply = String::new();
    f.read_to_string(&mut reply).map_err(|e| format!("{}: {e}", path.display()))?;
    let reply = reply.trim().to_string();
    match (wrote, reply.strip_prefix("error: ")) {
        (_, Some(why)) => Err(why.to_string()),
        (Err(e), None) => Err(format!("{}: {e}", path.display())),
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
        "failed" => format!("job {} {}: failed: {}", j.id, j.path, j.error.clone().unwrap_or_default()),
        p => format!("job {} {}: {p}", j.id, j.path),
    }
}

fn line_of(j: &JobReport) -> String {
    let eta = if j.copy_rate_bytes_per_s > 0 && j.bytes_total > j.bytes_copied {
        format!(", ETA {:.0} s", (j.bytes_total - j.bytes_copied) as f64 / j.copy_rate_bytes_per_s as f64)
    } else {
        String::new()
    };
    format!(
        "job {} {}: {} {:.1}/{:.1} MiB at {:.1} MiB/s, {} dirty tracks{eta}",
        j.id,
        j.path,
        j.phase,
        mib(j.bytes_copied),
        mib(j.bytes_total),
        mib(j.copy_rate_bytes_per_s),
        j.dirty_tracks
    )
}

/// Follow the jobs (and the plan, whose jobs may grow) to their end. On a terminal, a
/// progress bar per job; otherwise a line per phase change. Fails if any job did not switch
/// or the plan did not finish.
pub fn wait(mnt: &Path, what: &Started) -> Result<(), String> {
    let tty = std::io::stdout().is_terminal();
    let multi = indicatif::MultiProgress::new();
    let style = indicatif::ProgressStyle::with_template(
        "{prefix:>8} {bar:30} {bytes:>10}/{total_bytes:<10} {bytes_per_sec:>12} ETA {eta:>4} {msg}",
    )
    .expect("a valid template");
    let mut bars: std::collections::BTreeMap<u64, indicatif::ProgressBar> = Default::default();
    let mut last_phase: std::collections::BTreeMap<u64, String> = Default::default();
    loop {
        let st: Status = status_of_mount(mnt).ok_or_else(|| format!("{} is no longer mounted", mnt.display()))?;
        let plan = what.plan.and_then(|p| st.plans.iter().find(|x| x.id == p));
        let mut ids = what.jobs.clone();
        if let Some(p) = plan {
            ids.extend(p.jobs.iter().copied());
        }
        ids.sort_unstable();
        ids.dedup();
        let jobs: Vec<&JobReport> = st.jobs.iter().filter(|j| ids.contains(&j.id)).collect();
        for j in &jobs {
            let changed = last_phase.get(&j.id) != Some(&j.phase);
            if tty {
                let bar = bars.entry(j.id).or_insert_with(|| {
                    let b = multi.add(indicatif::ProgressBar::new(j.bytes_total.max(1)));
                    b.set_style(style.clone());
                    b.set_prefix(format!("job {}", j.id));
                    b
                });
                if !bar.is_finished() {
                    bar.set_length(j.bytes_total.max(1));
                    bar.set_position(j.bytes_copied.min(j.bytes_total));
                    if is_final(&j.phase) {
                        bar.finish_with_message(summary(j));
                    } else {
                        bar.set_message(format!("{} {}", j.phase, j.path));
                    }
                }
            } else if changed {
                println!("{}", if is_final(&j.phase) { summary(j) } else { line_of(j) });
            }
            if changed {
                last_phase.insert(j.id, j.phase.clone());
            }
        }
        let jobs_done = jobs.len() >= what.jobs.len() && jobs.iter().all(|j| is_final(&j.phase));
        let plan_done = plan.is_none_or(|p| p.phase != "running");
        if jobs_done && plan_done {
            let bad: Vec<String> = jobs.iter().filter(|j| j.phase != "switched").map(|j| summary(j)).collect();
            if let Some(p) = plan {
                println!("plan {} ({}): {}", p.id, p.kind, p.phase);
                if p.phase != "done" {
                    return Err(format!("plan {} {}: {}", p.id, p.phase, p.error.clone().unwrap_or_default()));
                }
            }
            if !bad.is_empty() {
                return Err(format!("{} job(s) did not switch: {}", bad.len(), bad.join("; ")));
            }
            return Ok(());
        }
        std::thread::sleep(POLL);
    }
}

fn is_final(phase: &str) -> bool {
    matches!(phase, "switched" | "cancelled" | "failed" | "stopped")
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
        assert_eq!(started("ok jobs 3 4"), Started { plan: None, jobs: vec![3, 4] });
        assert_eq!(started("ok plan 7 jobs 8 9"), Started { plan: Some(7), jobs: vec![8, 9] });
        assert_eq!(started("ok plan 7 jobs"), Started { plan: Some(7), jobs: vec![] });
    }
}
