//! fuse-transport-probe: does FUSE-over-io_uring make small FUSE requests
//! cheaper than the classic /dev/fuse read/writev transport?
//!
//!   fuse-transport-probe one --transport classic|uring [--threads T] [--pin] [--entries E]
//!                            --workload meta|write [--files N] [--jobs J] [--secs S] [--mnt DIR]
//!   fuse-transport-probe all [--reps R] [--files N] [--secs S] [--entries E] [--configs A,B,..] [--mnt DIR]
//!   fuse-transport-probe table RESULT_FILE...   (merge saved `all` outputs)
//!
//! `one` mounts, runs one workload, unmounts and prints INFO/PHASE lines.
//! `all` runs `one` in fresh child processes in interleaved order and
//! prints every run plus medians. Without `--mnt`, the mount point is a
//! private (0700) temporary directory under $TMPDIR (default /var/tmp).

mod abi;
mod classic;
mod daemon;
mod fs;
mod mount;
mod uring;
mod workload;

use daemon::{Daemon, StartError, Transport};
use std::collections::BTreeMap;
use std::process::{Command, Stdio};

/// Exit status of `one` when the kernel refuses the requested transport.
const EXIT_UNAVAILABLE: i32 = 3;
/// The line `one` prints then (and `all` looks for).
const UNAVAILABLE: &str = "UNAVAILABLE";

/// Options that take a value, and options that are flags.
const VALUE_OPTS: &[&str] = &[
    "--transport",
    "--threads",
    "--entries",
    "--workload",
    "--files",
    "--jobs",
    "--secs",
    "--mnt",
    "--reps",
    "--configs",
];
const FLAG_OPTS: &[&str] = &["--pin"];

struct Args {
    values: BTreeMap<String, String>,
    flags: Vec<String>,
}

impl Args {
    /// Parse `--key value` pairs and flags; anything unknown is an error
    /// (a mistyped option must not silently fall back to a default).
    fn parse(argv: &[String]) -> Args {
        let mut a = Args { values: BTreeMap::new(), flags: Vec::new() };
        let mut it = argv.iter();
        while let Some(k) = it.next() {
            if FLAG_OPTS.contains(&k.as_str()) {
                a.flags.push(k.clone());
            } else if VALUE_OPTS.contains(&k.as_str()) {
                let v = it.next().unwrap_or_else(|| die(&format!("{k} needs a value")));
                a.values.insert(k.clone(), v.clone());
            } else {
                die(&format!("unknown argument {k}"));
            }
        }
        a
    }
    fn get(&self, key: &str) -> Option<&str> {
        self.values.get(key).map(|s| s.as_str())
    }
    fn has(&self, flag: &str) -> bool {
        self.flags.iter().any(|f| f == flag)
    }
    fn num(&self, key: &str, default: usize) -> usize {
        self.get(key).map(|v| v.parse().unwrap_or_else(|_| die(&format!("bad {key}: {v}")))).unwrap_or(default)
    }
    fn float(&self, key: &str, default: f64) -> f64 {
        let v = self.get(key).map(|v| v.parse().unwrap_or_else(|_| die(&format!("bad {key}: {v}")))).unwrap_or(default);
        if !(v.is_finite() && v > 0.0) {
            die(&format!("bad {key}: {v}"));
        }
        v
    }
}

/// Only for argument errors, before anything is mounted (exit() skips Drop).
fn die(msg: &str) -> ! {
    eprintln!("error: {msg}");
    std::process::exit(2)
}

fn main() {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    match argv.first().map(|s| s.as_str()) {
        Some("one") => std::process::exit(run_one(&Args::parse(&argv[1..]))),
        Some("all") => std::process::exit(run_all(&Args::parse(&argv[1..]))),
        Some("table") => std::process::exit(run_table(&argv[1..])),
        _ => die("usage: fuse-transport-probe one|all|table [options] (see README.md)"),
    }
}

enum Work {
    Meta { files: usize },
    Write { jobs: usize, secs: f64 },
}

fn run_one(args: &Args) -> i32 {
    // Everything is parsed and checked before the mount exists.
    let transport = match args.get("--transport").unwrap_or("classic") {
        "classic" => Transport::Classic { threads: args.num("--threads", 1).max(1), pin: args.has("--pin") },
        "uring" => Transport::Uring { entries: args.num("--entries", 8).max(1) },
        t => die(&format!("unknown transport {t}")),
    };
    if args.has("--pin") && !matches!(transport, Transport::Classic { .. }) {
        die("--pin is for --transport classic (the uring queues are always pinned)");
    }
    let work = match args.get("--workload").unwrap_or("meta") {
        "meta" => Work::Meta { files: args.num("--files", 20000) },
        "write" => Work::Write { jobs: args.num("--jobs", 1).max(1), secs: args.float("--secs", 5.0) },
        w => die(&format!("unknown workload {w}")),
    };
    mount::install_cleanup_handlers();
    let tmp;
    let mnt = match args.get("--mnt") {
        Some(m) => m.to_string(),
        None => {
            tmp = match mount::TempDir::new("fuse-transport-probe") {
                Ok(t) => t,
                Err(e) => {
                    println!("ERROR mount point: {e}");
                    return 1;
                }
            };
            tmp.path.clone()
        }
    };
    run_one_at(&mnt, transport, work)
}

fn run_one_at(mnt: &str, transport: Transport, work: Work) -> i32 {
    // Noise indicators: load average and machine-wide CPU ticks over the run.
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!("INFO loadavg_at_start={}", load.split_whitespace().take(3).collect::<Vec<_>>().join(","));
    let ticks0 = cpu_ticks();
    let mut d = match Daemon::start(mnt, transport) {
        Ok(d) => d,
        Err(StartError::Unavailable(e)) => {
            println!("{UNAVAILABLE} transport=uring NOT MEASURED: {e}");
            return EXIT_UNAVAILABLE;
        }
        Err(StartError::Failed(e)) => {
            println!("ERROR start: {e}");
            return 1;
        }
    };
    for i in &d.info {
        println!("INFO {i}");
    }
    let result = match work {
        Work::Meta { files } => workload::metadata(&d, files),
        Work::Write { jobs, secs } => workload::writes(&d, jobs, secs).map(|p| vec![p]),
    };
    let mut rc = 0;
    match result {
        Ok(phases) => {
            for p in phases {
                println!("{}", p.line());
            }
        }
        Err(e) => {
            println!("ERROR workload: {e}");
            rc = 1;
        }
    }
    let mm = d.fs.stats.ring_len_mismatch.load(std::sync::atomic::Ordering::Relaxed);
    if mm > 0 {
        println!(
            "INFO ring_len_mismatch={mm} last_opcode={}",
            d.fs.stats.ring_len_mismatch_op.load(std::sync::atomic::Ordering::Relaxed)
        );
    }
    if let Err(e) = d.stop() {
        println!("ERROR stop: {e}");
        rc = 1;
    }
    for e in d.ctl.errors() {
        println!("ERROR daemon: {e}");
        rc = 1;
    }
    let ticks1 = cpu_ticks();
    let names = ["user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal"];
    let deltas: Vec<String> = names
        .iter()
        .zip(ticks1.iter().zip(&ticks0))
        .map(|(n, (a, b))| format!("{n}={}", a.saturating_sub(*b)))
        .collect();
    println!("INFO machine_cpu_ticks_during_run {}", deltas.join(" "));
    rc
}

/// First line of /proc/stat: user nice system idle iowait irq softirq steal.
fn cpu_ticks() -> Vec<u64> {
    let s = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    s.lines().next().unwrap_or("").split_whitespace().skip(1).take(8).map(|v| v.parse().unwrap_or(0)).collect()
}

#[derive(Clone)]
struct Rec {
    run: usize,
    config: String,
    phase: String,
    rate: f64,
    reqs_per_op: f64,
    ring_frac: f64,
    daemon_us: f64,
    proc_us: f64,
    dev: String,
    ring: String,
}

fn field<'a>(line: &'a str, key: &str) -> &'a str {
    line.split_whitespace().find_map(|kv| kv.strip_prefix(key).and_then(|r| r.strip_prefix('='))).unwrap_or("")
}

fn parse_phase(run: usize, config: &str, workload: &str, l: &str) -> Rec {
    let num = |k: &str| field(l, k).parse::<f64>().unwrap_or(f64::NAN);
    let pname = field(l, "name");
    let phase = if workload == "meta" { format!("meta-{pname}") } else { pname.to_string() };
    Rec {
        run,
        config: config.to_string(),
        phase,
        rate: num("rate"),
        reqs_per_op: num("reqs_per_op"),
        ring_frac: num("ring_frac"),
        daemon_us: num("daemon_us_per_op"),
        proc_us: num("proc_us_per_op"),
        dev: field(l, "dev").to_string(),
        ring: field(l, "ring").to_string(),
    }
}

/// `table FILE...`: combine saved outputs of `all` (lines
/// "run=N rep=R config=C workload=W | PHASE ...") into one table.
fn run_table(files: &[String]) -> i32 {
    let mut recs = Vec::new();
    for (fi, f) in files.iter().enumerate() {
        let text = std::fs::read_to_string(f).unwrap_or_else(|e| die(&format!("{f}: {e}")));
        for l in text.lines() {
            let Some((pre, phase)) = l.split_once(" | ") else { continue };
            if !phase.starts_with("PHASE") {
                continue;
            }
            let run: usize = field(pre, "run").parse().unwrap_or(0);
            recs.push(parse_phase((fi + 1) * 1000 + run, field(pre, "config"), field(pre, "workload"), phase));
        }
    }
    print_tables(&recs);
    0
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n == 0 {
        f64::NAN
    } else if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn print_tables(recs: &[Rec]) {
    println!("\n== RAW RUNS ==");
    println!(
        "{:>4} {:<17} {:<12} {:>11} {:>7} {:>6} {:>10} {:>10}",
        "run", "config", "phase", "ops/s", "req/op", "ring%", "dmn_us/op", "proc_us/op"
    );
    let mut sorted = recs.to_vec();
    sorted.sort_by(|a, b| {
        (a.phase.as_str(), a.config.as_str(), a.run).cmp(&(b.phase.as_str(), b.config.as_str(), b.run))
    });
    for r in &sorted {
        println!(
            "{:>4} {:<17} {:<12} {:>11.0} {:>7.3} {:>6.1} {:>10.2} {:>10.2}",
            r.run,
            r.config,
            r.phase,
            r.rate,
            r.reqs_per_op,
            r.ring_frac * 100.0,
            r.daemon_us,
            r.proc_us
        );
    }

    println!("\n== MEDIANS ==");
    println!(
        "{:<12} {:<17} {:>2} {:>11} {:>11} {:>11} {:>7} {:>10} {:>10}",
        "phase", "config", "n", "med ops/s", "min", "max", "req/op", "dmn_us/op", "proc_us/op"
    );
    let mut groups: BTreeMap<(String, String), Vec<Rec>> = BTreeMap::new();
    for r in recs {
        groups.entry((r.phase.clone(), r.config.clone())).or_default().push(r.clone());
    }
    for ((phase, config), rs) in &groups {
        let mut rate: Vec<f64> = rs.iter().map(|r| r.rate).collect();
        let mut rq: Vec<f64> = rs.iter().map(|r| r.reqs_per_op).collect();
        let mut du: Vec<f64> = rs.iter().map(|r| r.daemon_us).collect();
        let mut pu: Vec<f64> = rs.iter().map(|r| r.proc_us).collect();
        let (mn, mx) = rate.iter().fold((f64::MAX, f64::MIN), |(a, b), &x| (a.min(x), b.max(x)));
        println!(
            "{:<12} {:<17} {:>2} {:>11.0} {:>11.0} {:>11.0} {:>7.3} {:>10.2} {:>10.2}",
            phase,
            config,
            rs.len(),
            median(&mut rate),
            mn,
            mx,
            median(&mut rq),
            median(&mut du),
            median(&mut pu)
        );
    }

    println!("\n== REQUESTS PER OP BY OPCODE (last run of each) ==");
    for ((phase, config), rs) in &groups {
        let r = rs.last().unwrap();
        println!("{phase:<12} {config:<17} dev[{}] ring[{}]", r.dev, r.ring);
    }
}

/// The setups of the matrix, in their interleaving order.
const CONFIGS: &[&str] = &["classic-t1", "classic-t2", "uring", "classic-t2-pinned"];

fn config_args(name: &str, entries: &str) -> Vec<String> {
    let v: &[&str] = match name {
        "classic-t1" => &["--transport", "classic", "--threads", "1"],
        "classic-t2" => &["--transport", "classic", "--threads", "2"],
        "classic-t2-pinned" => &["--transport", "classic", "--threads", "2", "--pin"],
        "uring" => &["--transport", "uring", "--entries", entries],
        _ => die(&format!("unknown config {name} (known: {})", CONFIGS.join(","))),
    };
    v.iter().map(|s| s.to_string()).collect()
}

fn run_all(args: &Args) -> i32 {
    let reps = args.num("--reps", 3);
    let files = args.num("--files", 20000).to_string();
    let secs = args.float("--secs", 5.0).to_string();
    let entries = args.num("--entries", 8).max(1).to_string();
    let names: Vec<String> = match args.get("--configs") {
        Some(c) => c.split(',').filter(|s| !s.is_empty()).map(str::to_string).collect(),
        None => CONFIGS.iter().map(|s| s.to_string()).collect(),
    };
    if names.is_empty() {
        die("--configs: no setups given");
    }
    let configs: Vec<(String, Vec<String>)> = names.iter().map(|n| (n.clone(), config_args(n, &entries))).collect();
    let workloads: Vec<(&str, Vec<&str>)> = vec![
        ("meta", vec!["--workload", "meta", "--files", &files]),
        ("write-j1", vec!["--workload", "write", "--jobs", "1", "--secs", &secs]),
        ("write-j4", vec!["--workload", "write", "--jobs", "4", "--secs", &secs]),
    ];
    mount::install_cleanup_handlers();
    let tmp;
    let mnt = match args.get("--mnt") {
        Some(m) => m.to_string(),
        None => {
            tmp = mount::TempDir::new("fuse-transport-probe").unwrap_or_else(|e| die(&format!("mount point: {e}")));
            tmp.path.clone()
        }
    };
    let exe = std::env::current_exe().expect("current_exe");
    let mut recs: Vec<Rec> = Vec::new();
    let mut failures: Vec<String> = Vec::new();
    // Setups the kernel refused (config -> reason): not retried, not measured.
    let mut unavailable: BTreeMap<String, String> = BTreeMap::new();
    let total = reps * workloads.len() * configs.len();
    let mut run = 0;
    for rep in 0..reps {
        for (wname, wargs) in &workloads {
            // interleave transports; rotate the starting one every rep
            for k in 0..configs.len() {
                let (cname, cargs) = &configs[(k + rep) % configs.len()];
                run += 1;
                if let Some(why) = unavailable.get(cname) {
                    println!("run={run} rep={rep} config={cname} workload={wname} | {UNAVAILABLE} skipped: {why}");
                    continue;
                }
                eprintln!("run {run}/{total}: rep {rep} {cname} {wname}");
                let child = Command::new(&exe)
                    .arg("one")
                    .args(cargs)
                    .args(wargs)
                    .args(["--mnt", &mnt])
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped())
                    .spawn()
                    .expect("spawn child");
                mount::set_child(child.id());
                let out = child.wait_with_output().expect("wait for child");
                mount::set_child(0);
                let stdout = String::from_utf8_lossy(&out.stdout);
                let stderr = String::from_utf8_lossy(&out.stderr);
                for l in stdout.lines() {
                    println!("run={run} rep={rep} config={cname} workload={wname} | {l}");
                    if l.starts_with("PHASE") {
                        recs.push(parse_phase(run, cname, wname, l));
                    }
                }
                for l in stderr.lines() {
                    println!("run={run} config={cname} workload={wname} | stderr: {l}");
                }
                if out.status.code() == Some(EXIT_UNAVAILABLE) {
                    let why = stdout
                        .lines()
                        .find_map(|l| l.strip_prefix(UNAVAILABLE))
                        .unwrap_or(" (no reason printed)")
                        .trim()
                        .to_string();
                    eprintln!("{UNAVAILABLE}: {cname}: {why}");
                    unavailable.insert(cname.clone(), why);
                } else if !out.status.success() {
                    failures.push(format!("run {run} {cname} {wname}: exit {}", out.status));
                }
            }
        }
    }

    print_tables(&recs);
    if !unavailable.is_empty() {
        println!("\n== {UNAVAILABLE} (NOT MEASURED) ==");
        for (c, why) in &unavailable {
            println!("{c}: {why}");
        }
    }
    if !failures.is_empty() {
        println!("\n== FAILURES ==");
        for f in &failures {
            println!("{f}");
        }
        return 1;
    }
    if !unavailable.is_empty() {
        return EXIT_UNAVAILABLE;
    }
    0
}
