//! The CLI on long jobs: the rate caps hold (and the rate it shows is the rate they held);
//! `--wait`, `ferryfs wait` and `status --watch` follow jobs, with lines at an interval when
//! stdout is not a terminal and bars on stdout when it is; and the exit code says how the
//! followed jobs ended (docs/cli.md, "Exit codes").
//!
//! Time is asserted from below only: a cap makes a job last at least so long, and a slow or
//! busy machine only makes it longer.

mod common;

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant, SystemTime};

use serde_json::Value;

use common::jobs::*;
use common::*;

const MIB: f64 = (1 << 20) as f64;

fn u(v: &Value) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("not an unsigned integer: {v}"))
}

fn write_data_set(path: &Path, len: usize, seed: u64) {
    let f = File::create(path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
    f.write_all_at(&pattern(len, seed), 0).unwrap();
    f.sync_all().unwrap();
}

/// The time of the first events line with `needle` (lines start with an RFC 3339 stamp).
#[track_caller]
fn event_time(ev: &str, needle: &str) -> SystemTime {
    let line = ev.lines().find(|l| l.contains(needle)).unwrap_or_else(|| panic!("no event {needle:?}:\n{ev}"));
    let stamp = line.split_whitespace().next().unwrap();
    humantime::parse_rfc3339(stamp).unwrap_or_else(|e| panic!("{stamp}: {e}"))
}

/// How long job `id` copied (step f), from its `job-start` and `copy-done` events.
fn copy_secs(mnt: &Path, id: u64) -> f64 {
    let ev = events(mnt);
    let start = event_time(&ev, &format!("job {id} job-start"));
    let done = event_time(&ev, &format!("job {id} copy-done"));
    done.duration_since(start).unwrap().as_secs_f64()
}

/// A job under a cap of `cap` bytes/s: its copy took at least 90 % of size/cap, and the rate
/// it reports is at most the cap (10 % slack) and agrees with its own bytes and time. (Not
/// at least the cap: a loaded machine copies slower, and that is no fault of the cap.)
#[track_caller]
fn assert_held(mnt: &Path, j: &Value, cap: u64) {
    let id = u(&j["id"]);
    let copied = u(&j["bytes_copied"]);
    let secs = copy_secs(mnt, id);
    let floor = 0.9 * copied as f64 / cap as f64;
    assert!(secs >= floor, "job {id} copied {copied} bytes in {secs:.3} s, under a cap of {cap}/s: floor {floor:.3} s");
    let rate = u(&j["copy_rate_bytes_per_s"]) as f64;
    assert!(rate <= 1.1 * cap as f64, "job {id} reports {rate} bytes/s under a cap of {cap}/s");
    let measured = copied as f64 / secs;
    assert!(
        (rate - measured).abs() <= 0.05 * measured,
        "job {id} reports {rate} bytes/s, its events say {measured:.0} ({copied} bytes in {secs:.3} s)"
    );
}

/// The story: `--rate 48M` copied an 8 MiB data set at 410 MiB/s. The cap was a token
/// bucket that started full (a quarter second's worth) and was asked after each 4 MiB chunk,
/// so a small data set went in one burst, and the rate shown left out the last wait.
#[test]
fn a_job_rate_holds_from_the_first_second() {
    // New data sets go to the volume with the most room: V1.
    let tp = TestPool::new("64K", &[("V1", "48M"), ("V2", "32M")]);
    let m = tp.mount();
    let mnt = s(&m.mnt).to_string();
    write_data_set(&m.p("f"), 16 << 20, 1);
    let out = ferry_ok(&["migrate", &mnt, "/f", "--to", "V2", "--rate", "4M", "--wait"]);
    let id = reply_jobs(out.lines().next().unwrap())[0];
    let j = job(&m.mnt, id);
    assert_eq!(j["phase"], "switched", "{j:#}");
    assert_eq!(u(&j["bytes_copied"]), 16 << 20);
    assert_held(&m.mnt, &j, 4 << 20);
    // The summary shows the same rate as the status.
    let want = format!("{:.1} MiB/s", u(&j["copy_rate_bytes_per_s"]) as f64 / MIB);
    let summary =
        out.lines().find(|l| l.contains(&format!("job {id} /f: switched"))).unwrap_or_else(|| panic!("{out}"));
    assert!(summary.contains(&want), "summary {summary:?} should show {want}");

    // A small data set under a high cap: the first chunk waits for itself too.
    write_data_set(&m.p("g"), 8 << 20, 2);
    let out = ferry_ok(&["migrate", &mnt, "/g", "--to", "V2", "--rate", "16M", "--wait"]);
    let id = reply_jobs(out.lines().next().unwrap())[0];
    let j = job(&m.mnt, id);
    let secs = copy_secs(&m.mnt, id);
    assert!(secs >= 0.9 * 0.5, "8 MiB at 16 MiB/s took {secs:.3} s");
    assert!(u(&j["copy_rate_bytes_per_s"]) as f64 <= 1.1 * (16u64 << 20) as f64, "{j:#}");
    m.unmount();
}

/// The pool-wide cap (`set copy-rate=`, as `mount --copy-rate` sets it) holds for two jobs
/// that copy at once: together they take the time the cap gives their bytes.
#[test]
fn the_pool_copy_rate_holds_across_jobs() {
    let tp = TestPool::new("64K", &[("V1", "48M"), ("V2", "32M")]);
    let m = tp.mount();
    write_data_set(&m.p("a"), 8 << 20, 3);
    write_data_set(&m.p("b"), 8 << 20, 4);
    assert_eq!(control(&m.mnt, "set copy-rate=4M").unwrap(), format!("ok copy-rate={}", 4 << 20));
    let ids = reply_jobs(&control(&m.mnt, "migrate /a /b to V2").unwrap());
    assert_eq!(ids.len(), 2);
    let jobs = wait_switched(&m.mnt, &ids);
    let ev = events(&m.mnt);
    let start = ids.iter().map(|id| event_time(&ev, &format!("job {id} job-start"))).min().unwrap();
    let done = ids.iter().map(|id| event_time(&ev, &format!("job {id} copy-done"))).max().unwrap();
    let secs = done.duration_since(start).unwrap().as_secs_f64();
    assert!(secs >= 0.9 * 4.0, "16 MiB under a pool cap of 4 MiB/s copied in {secs:.3} s");
    let total: f64 = jobs.iter().map(|j| u(&j["copy_rate_bytes_per_s"]) as f64).sum();
    assert!(total <= 1.1 * (4u64 << 20) as f64, "the jobs' rates add up to {total} bytes/s: {jobs:#?}");
    m.unmount();
}

// ---------------------------------------------------------------- following jobs

/// A `ferryfs` process whose stdout lines are read as they come, each with its arrival time.
struct Follower {
    what: String,
    child: Child,
    lines: Arc<Mutex<Vec<(Instant, String)>>>,
    reader: JoinHandle<()>,
}

fn follow(args: &[&str]) -> Follower {
    let mut child = Command::new(bin())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn ferryfs");
    let lines = Arc::new(Mutex::new(Vec::new()));
    let (out, sink) = (child.stdout.take().unwrap(), lines.clone());
    let reader = thread::spawn(move || {
        for line in BufReader::new(out).lines() {
            let Ok(line) = line else { break };
            sink.lock().unwrap().push((Instant::now(), line));
        }
    });
    Follower { what: format!("ferryfs {}", args.join(" ")), child, lines, reader }
}

impl Follower {
    /// The lines so far.
    fn lines(&self) -> Vec<String> {
        self.lines.lock().unwrap().iter().map(|(_, l)| l.clone()).collect()
    }

    /// Wait (bounded) until a line satisfies `f`; that line.
    fn wait_line(&self, f: impl Fn(&str) -> bool) -> String {
        let start = Instant::now();
        loop {
            if let Some(l) = self.lines().into_iter().find(|l| f(l)) {
                return l;
            }
            assert!(start.elapsed() < JOB_LIMIT, "{}: no such line in:\n{}", self.what, self.lines().join("\n"));
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Wait (bounded) for the exit: (code, stdout lines with their times, stderr).
    fn finish(mut self) -> (i32, Vec<(Instant, String)>, String) {
        let start = Instant::now();
        let status = loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                break st;
            }
            if start.elapsed() > JOB_LIMIT {
                let _ = self.child.kill();
                panic!("{} did not end:\n{}", self.what, self.lines().join("\n"));
            }
            thread::sleep(Duration::from_millis(20));
        };
        self.reader.join().unwrap();
        let mut err = String::new();
        self.child.stderr.take().unwrap().read_to_string(&mut err).unwrap();
        let lines = std::mem::take(&mut *self.lines.lock().unwrap());
        (status.code().unwrap_or(-1), lines, err)
    }
}

/// Wait until job `id` copies (past queued/assessing/allocating).
fn wait_copying(mnt: &Path, id: u64) {
    let start = Instant::now();
    loop {
        let j = job(mnt, id);
        let phase = j["phase"].as_str().unwrap_or("");
        assert!(!is_final(phase), "test setup: job {id} ended before the test could act: {j:#}");
        if phase == "copying" && u(&j["bytes_copied"]) > 0 {
            return;
        }
        assert!(start.elapsed() < JOB_LIMIT, "job {id} never copied: {j:#}");
        thread::sleep(Duration::from_millis(20));
    }
}

/// A progress line: "job ID /PATH: PHASE COPIED/TOTAL MiB at RATE MiB/s, ...".
fn progress(line: &str, id: u64, path: &str) -> Option<(String, f64, f64, f64)> {
    let rest = line.strip_prefix(&format!("job {id} {path}: "))?;
    let mut w = rest.split_whitespace();
    let phase = w.next()?.to_string();
    let (copied, total) = w.next()?.split_once('/')?;
    if w.next()? != "MiB" || w.next()? != "at" {
        return None;
    }
    let rate = w.next()?;
    Some((phase, copied.parse().ok()?, total.parse().ok()?, rate.parse().ok()?))
}

/// `--wait` with stdout a pipe prints a line per job every --interval (job id, path, phase,
/// copied/total, rate) and a summary at the end; `ferryfs wait` re-attaches to a running job
/// and prints the same.
#[test]
fn wait_prints_a_line_every_interval_and_reattaches() {
    let tp = TestPool::new("64K", &[("V1", "48M"), ("V2", "32M")]);
    let m = tp.mount();
    let mnt = s(&m.mnt).to_string();
    write_data_set(&m.p("f"), 8 << 20, 5);
    let w = follow(&["migrate", &mnt, "/f", "--to", "V2", "--rate", "2M", "--wait", "--interval", "0.5"]);
    let id = reply_jobs(&w.wait_line(|l| l.starts_with("ok jobs")))[0];
    // A second follower, attached while the job runs.
    wait_copying(&m.mnt, id);
    let again = follow(&["wait", &mnt, &id.to_string(), "--interval", "0.5"]);
    let (code, lines, err) = w.finish();
    assert_eq!(code, 0, "{err}\n{lines:?}");
    assert!(err.is_empty(), "nothing on stderr: {err}");
    let copying: Vec<(Instant, f64, f64)> = lines
        .iter()
        .filter_map(|(t, l)| progress(l, id, "/f").filter(|p| p.0 == "copying").map(|p| (*t, p.1, p.3)))
        .collect();
    let text: Vec<&str> = lines.iter().map(|(_, l)| l.as_str()).collect();
    // 8 MiB at 2 MiB/s: about 4 s of copying, a line every 0.5 s.
    assert!(copying.len() >= 4, "a line every 0.5 s while copying:\n{}", text.join("\n"));
    for pair in copying.windows(2) {
        let gap = pair[1].0.duration_since(pair[0].0);
        assert!(gap >= Duration::from_millis(400), "lines {gap:?} apart:\n{}", text.join("\n"));
        assert!(pair[1].1 >= pair[0].1, "copied went backwards:\n{}", text.join("\n"));
    }
    assert!(copying.iter().all(|c| c.2 <= 2.2), "rates within the cap:\n{}", text.join("\n"));
    let summary = text.iter().find(|l| l.starts_with(&format!("job {id} /f: switched to V2"))).expect("a summary");
    assert!(summary.contains("MiB/s"), "{summary}");
    assert_eq!(text.last(), Some(summary), "the summary ends the output");

    let (code, lines, err) = again.finish();
    let text: Vec<&str> = lines.iter().map(|(_, l)| l.as_str()).collect();
    assert_eq!(code, 0, "{err}\n{}", text.join("\n"));
    assert!(text.iter().any(|l| progress(l, id, "/f").is_some()), "{}", text.join("\n"));
    assert!(text.last().unwrap().starts_with(&format!("job {id} /f: switched")), "{}", text.join("\n"));

    // An ended job: its summary at once. Nothing running: nothing to wait for.
    let out = ferry_ok(&["wait", &mnt, &id.to_string()]);
    assert!(out.trim().starts_with(&format!("job {id} /f: switched")), "{out}");
    let out = ferry_ok(&["wait", &mnt]);
    assert!(out.contains("nothing to wait for"), "{out}");
    let (code, err) = ferry_err(&["wait", &mnt, "9999"]);
    assert_eq!(code, exit::ERROR, "{err}");
    assert_one_clear_line(&err, "no job or plan 9999");
    m.unmount();
}

/// On a terminal the bars are drawn on stdout, and the summary is a line on stdout: with
/// stderr sent to a file, nothing is lost and the file stays empty.
#[test]
fn bars_and_the_summary_go_to_the_terminal_on_stdout() {
    let tp = TestPool::new("64K", &[("V1", "48M"), ("V2", "32M")]);
    let m = tp.mount();
    write_data_set(&m.p("f"), 4 << 20, 6);
    let err_file = tp.dir().join("stderr.txt");
    let cmd = format!("{} migrate {} /f --to V2 --rate 2M --wait 2>{}", s(&bin()), s(&m.mnt), s(&err_file));
    // `script` runs the command on a pseudo-terminal and copies what it draws to our pipe.
    let out =
        Command::new("script").args(["-qec", &cmd, "/dev/null"]).env("TERM", "xterm").stdin(Stdio::null()).output();
    let out = out.expect("script (util-linux) runs a command on a pseudo-terminal");
    let screen = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{screen}");
    let id = reply_jobs(screen.lines().next().unwrap_or("").trim())[0];
    assert!(screen.contains(&format!("job {id}")) && screen.contains("MiB/s"), "a bar with the rate:\n{screen}");
    assert!(screen.contains('\u{1b}') || screen.contains('\r'), "bars redraw in place:\n{screen:?}");
    assert!(screen.contains(&format!("job {id} /f: switched to V2")), "the summary on stdout:\n{screen}");
    let err = std::fs::read_to_string(&err_file).unwrap();
    assert!(err.is_empty(), "nothing on stderr: {err:?}");
    m.unmount();
}

/// Each kind of outcome exits with its own code: 2 a usage error, 3 a refusal, 4 a failed
/// job, 5 a cancelled one (for every process that follows it).
#[test]
fn exit_codes_tell_usage_refusal_failure_and_cancel_apart() {
    let tp = TestPool::new("64K", &[("V1", "48M"), ("V2", "4M")]);
    let m = tp.mount();
    let mnt = s(&m.mnt).to_string();
    write_data_set(&m.p("f"), 2 << 20, 7);
    write_data_set(&m.p("g"), 2 << 20, 8);

    let (code, err) = ferry_err(&["migrate", &mnt, "/f", "--to", "V2", "--bogus"]);
    assert_eq!(code, exit::USAGE, "{err}");
    let (code, err) = ferry_err(&["migrate", &mnt, "/f", "--to", "V2", "--rate", "fast"]);
    assert_eq!(code, exit::USAGE, "{err}");
    let (code, err) = ferry_err(&["migrate", &mnt, "/f", "--to", "NOPE"]);
    assert_eq!(code, exit::REFUSED, "{err}");
    assert_one_clear_line(&err, "no volume named \"NOPE\"");

    // A job that fails: the data set grows past what its target can hold.
    let w = follow(&["migrate", &mnt, "/f", "--to", "V2", "--rate", "256K", "--wait", "--interval", "1"]);
    let id = reply_jobs(&w.wait_line(|l| l.starts_with("ok jobs")))[0];
    wait_copying(&m.mnt, id);
    let f = OpenOptions::new().append(true).open(m.p("f")).unwrap();
    (&f).write_all(&pattern(4 << 20, 9)).unwrap();
    f.sync_all().unwrap();
    drop(f);
    let (code, lines, err) = w.finish();
    let text: Vec<&str> = lines.iter().map(|(_, l)| l.as_str()).collect();
    assert_eq!(code, exit::JOB_FAILED, "{err}\n{}", text.join("\n"));
    assert_one_clear_line(&err, "not every job switched");
    assert!(text.iter().any(|l| l.starts_with(&format!("job {id} /f: failed: target full"))), "{}", text.join("\n"));
    let (code, err) = ferry_err(&["wait", &mnt, &id.to_string()]);
    assert_eq!(code, exit::JOB_FAILED, "`ferryfs wait` on the failed job: {err}");

    // A job that is cancelled, followed by --wait and by `ferryfs wait`.
    let w = follow(&["migrate", &mnt, "/g", "--to", "V2", "--rate", "256K", "--wait"]);
    let id = reply_jobs(&w.wait_line(|l| l.starts_with("ok jobs")))[0];
    wait_copying(&m.mnt, id);
    let again = follow(&["wait", &mnt, &id.to_string()]);
    again.wait_line(|l| progress(l, id, "/g").is_some());
    assert_eq!(ferry_ok(&["cancel", &mnt, &id.to_string()]).trim(), format!("ok cancelling job {id}"));
    for f in [w, again] {
        let what = f.what.clone();
        let (code, lines, err) = f.finish();
        let text: Vec<&str> = lines.iter().map(|(_, l)| l.as_str()).collect();
        assert_eq!(code, exit::JOB_CANCELLED, "{what}: {err}\n{}", text.join("\n"));
        assert!(text.contains(&format!("job {id} /g: cancelled").as_str()), "{what}:\n{}", text.join("\n"));
    }
    let (code, err) = ferry_err(&["cancel", &mnt, &id.to_string()]);
    assert_eq!(code, exit::REFUSED, "cancel of an ended job: {err}");
    m.unmount();
}

/// An unmount while jobs are followed: `wait` and `status --watch` say the mount went away
/// and exit 6; until then `status --watch` prints a block (or, with --json, a line of JSON)
/// every --interval.
#[test]
fn an_unmount_ends_wait_and_status_watch_with_exit_6() {
    let tp = TestPool::new("64K", &[("V1", "48M"), ("V2", "32M")]);
    let m = tp.mount();
    let mnt = s(&m.mnt).to_string();
    write_data_set(&m.p("f"), 4 << 20, 10);
    let id = reply_jobs(&control(&m.mnt, "migrate /f to V2 rate=256K").unwrap())[0];
    wait_copying(&m.mnt, id);
    let w = follow(&["wait", &mnt, "--interval", "0.3"]);
    let watch = follow(&["status", &mnt, "--watch", "--interval", "0.3"]);
    let watch_json = follow(&["status", &mnt, "--watch", "--json", "--interval", "0.3"]);
    w.wait_line(|l| progress(l, id, "/f").is_some());
    watch.wait_line(|l| l.starts_with("---"));
    let start = Instant::now();
    while watch.lines().iter().filter(|l| l.starts_with("---")).count() < 3 {
        assert!(start.elapsed() < JOB_LIMIT, "{}", watch.lines().join("\n"));
        thread::sleep(Duration::from_millis(50));
    }
    watch_json.wait_line(|l| l.starts_with('{'));
    m.unmount();
    let (code, lines, err) = w.finish();
    let text: Vec<&str> = lines.iter().map(|(_, l)| l.as_str()).collect();
    assert_eq!(code, exit::STOPPED, "{err}\n{}", text.join("\n"));
    assert!(err.contains("no longer mounted") || err.contains("stopped"), "{err}");
    let (code, lines, err) = watch.finish();
    assert_eq!(code, exit::STOPPED, "{err}");
    assert_one_clear_line(&err, "no longer mounted");
    let blocks: Vec<&str> = lines.iter().map(|(_, l)| l.as_str()).filter(|l| l.starts_with("--- ")).collect();
    assert!(blocks.len() >= 3, "{lines:?}");
    assert!(lines.iter().any(|(_, l)| l.starts_with(&format!("{id:>5} /f"))), "the job in the table: {lines:?}");
    let (code, lines, err) = watch_json.finish();
    assert_eq!(code, exit::STOPPED, "{err}");
    for (_, l) in &lines {
        let v = parse_json(l);
        assert!(v["jobs"].as_array().is_some_and(|j| j.iter().any(|j| j["id"] == id)), "{l}");
    }
}
