//! The CLI on long jobs: the rate caps hold (and the rate it shows is the rate they held).
//!
//! Time is asserted from below only: a cap makes a job last at least so long, and a slow or
//! busy machine only makes it longer.

mod common;

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::SystemTime;

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
/// it reports is the cap within 10 % and agrees with its own bytes and time.
#[track_caller]
fn assert_held(mnt: &Path, j: &Value, cap: u64) {
    let id = u(&j["id"]);
    let copied = u(&j["bytes_copied"]);
    let secs = copy_secs(mnt, id);
    let floor = 0.9 * copied as f64 / cap as f64;
    assert!(secs >= floor, "job {id} copied {copied} bytes in {secs:.3} s, under a cap of {cap}/s: floor {floor:.3} s");
    let rate = u(&j["copy_rate_bytes_per_s"]) as f64;
    assert!((rate - cap as f64).abs() <= 0.1 * cap as f64, "job {id} reports {rate} bytes/s under a cap of {cap}/s");
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
