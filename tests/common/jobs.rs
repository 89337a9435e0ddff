//! Helpers for migration tests: the control files, waiting for jobs, and writers whose
//! every acknowledged write is logged so that the bytes can be checked afterwards.
#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use serde_json::Value;

/// How long a job may take before a test calls it stuck. Not a speed assertion: a job that
/// has not ended after this never will.
pub const JOB_LIMIT: Duration = Duration::from_secs(180);

/// Write one line to MNT/.ferry/control; the reply line, or the refusal's text (without
/// "error: ").
pub fn control(mnt: &Path, line: &str) -> Result<String, String> {
    let path = mnt.join(".ferry/control");
    let mut f = OpenOptions::new().read(true).write(true).open(&path).map_err(|e| format!("open: {e}"))?;
    let wrote = f.write_all(format!("{line}\n").as_bytes());
    let mut reply = String::new();
    f.read_to_string(&mut reply).map_err(|e| format!("read: {e}"))?;
    let reply = reply.trim().to_string();
    match (wrote, reply.strip_prefix("error: ")) {
        (_, Some(why)) => Err(why.to_string()),
        (Err(e), None) => Err(format!("write failed without a reply: {e}")),
        (Ok(()), None) => Ok(reply),
    }
}

/// The job ids of an "ok jobs 1 2" / "ok plan 3 jobs 4 5" reply.
pub fn reply_jobs(reply: &str) -> Vec<u64> {
    let words: Vec<&str> = reply.split_whitespace().collect();
    match words.iter().position(|w| *w == "jobs") {
        Some(i) => words[i + 1..].iter().map_while(|w| w.parse().ok()).collect(),
        None => Vec::new(),
    }
}

/// The plan id of an "ok plan 3 jobs ..." reply.
pub fn reply_plan(reply: &str) -> Option<u64> {
    let words: Vec<&str> = reply.split_whitespace().collect();
    words.iter().position(|w| *w == "plan").and_then(|i| words.get(i + 1)?.parse().ok())
}

pub fn status(mnt: &Path) -> Value {
    let text = fs::read_to_string(mnt.join(".ferry/status")).expect("read .ferry/status");
    serde_json::from_str(&text).expect("status is JSON")
}

pub fn events(mnt: &Path) -> String {
    fs::read_to_string(mnt.join(".ferry/events")).expect("read .ferry/events")
}

pub fn job(mnt: &Path, id: u64) -> Value {
    status(mnt)["jobs"].as_array().unwrap().iter().find(|j| j["id"] == id).cloned().unwrap_or(Value::Null)
}

pub fn is_final(phase: &str) -> bool {
    matches!(phase, "switched" | "gone" | "cancelled" | "failed" | "stopped")
}

/// Wait until every job in `ids` has ended; their final reports.
pub fn wait_jobs(mnt: &Path, ids: &[u64]) -> Vec<Value> {
    let start = Instant::now();
    loop {
        let st = status(mnt);
        let jobs: Vec<Value> = ids
            .iter()
            .map(|id| st["jobs"].as_array().unwrap().iter().find(|j| j["id"] == *id).cloned().unwrap_or(Value::Null))
            .collect();
        if jobs.iter().all(|j| j["phase"].as_str().is_some_and(is_final)) {
            return jobs;
        }
        assert!(start.elapsed() < JOB_LIMIT, "jobs {ids:?} did not end:\n{st:#}\nevents:\n{}", events(mnt));
        thread::sleep(Duration::from_millis(50));
    }
}

/// Wait until every job ends and assert each switched.
pub fn wait_switched(mnt: &Path, ids: &[u64]) -> Vec<Value> {
    let jobs = wait_jobs(mnt, ids);
    for j in &jobs {
        assert_eq!(j["phase"], "switched", "job did not switch: {j:#}\nevents:\n{}", events(mnt));
    }
    jobs
}

/// Wait until a plan has ended; its report.
pub fn wait_plan(mnt: &Path, plan: u64) -> Value {
    let start = Instant::now();
    loop {
        let st = status(mnt);
        if let Some(p) = st["plans"].as_array().unwrap().iter().find(|p| p["id"] == plan) {
            if p["phase"] != "running" {
                return p.clone();
            }
        }
        assert!(start.elapsed() < JOB_LIMIT, "plan {plan} did not end:\n{st:#}\nevents:\n{}", events(mnt));
        thread::sleep(Duration::from_millis(50));
    }
}

/// Wait until job `id` is in `phase` (or has ended, which fails the test).
pub fn wait_phase(mnt: &Path, id: u64, phase: &str) -> Value {
    let start = Instant::now();
    loop {
        let j = job(mnt, id);
        if j["phase"] == phase {
            return j;
        }
        if j["phase"].as_str().is_some_and(is_final) {
            panic!("job {id} ended before reaching {phase}: {j:#}\nevents:\n{}", events(mnt));
        }
        assert!(start.elapsed() < JOB_LIMIT, "job {id} never reached {phase}: {j:#}");
        thread::sleep(Duration::from_millis(5));
    }
}

// ---------------------------------------------------------------------------------------
// Logged writers

/// The bytes of block `block` as written by write number `counter` of a file tagged `tag`
/// (0: never written, zeros). A header (magic, tag, block, counter) makes a mismatch
/// readable.
pub fn block_bytes(tag: u32, block: u64, counter: u64, len: usize) -> Vec<u8> {
    if counter == 0 {
        return vec![0; len];
    }
    let mut v = super::pattern(len, (u64::from(tag) << 48) ^ (block << 24) ^ counter ^ 0xB10C);
    let mut h = Vec::with_capacity(20);
    h.extend_from_slice(b"MIG!");
    h.extend_from_slice(&tag.to_le_bytes());
    h.extend_from_slice(&block.to_le_bytes());
    h.extend_from_slice(&(counter as u32).to_le_bytes());
    let n = h.len().min(len);
    v[..n].copy_from_slice(&h[..n]);
    v
}

fn describe(bytes: &[u8]) -> String {
    if bytes.len() >= 20 && &bytes[..4] == b"MIG!" {
        let tag = u32::from_le_bytes(bytes[4..8].try_into().unwrap());
        let block = u64::from_le_bytes(bytes[8..16].try_into().unwrap());
        let c = u32::from_le_bytes(bytes[16..20].try_into().unwrap());
        format!("tag {tag} block {block} write #{c}")
    } else {
        format!("no header ({} zero bytes of {})", bytes.iter().filter(|b| **b == 0).count(), bytes.len())
    }
}

/// Per block: the counter of the last acknowledged write, and one that may be in flight.
#[derive(Clone, Copy, Default, Debug)]
pub struct BlockState {
    pub acked: u64,
    pub inflight: Option<u64>,
}

/// A file written block by block by writer threads; each block belongs to one thread, so
/// the log knows exactly what every block must hold.
pub struct LoggedFile {
    pub path: PathBuf,
    pub tag: u32,
    pub block_bytes: usize,
    pub blocks: Mutex<Vec<BlockState>>,
    counter: AtomicU64,
}

impl LoggedFile {
    /// Create the file with `blocks` blocks, each written once (fsync'ed).
    pub fn create(path: &Path, tag: u32, block_bytes: usize, blocks: u64) -> Arc<LoggedFile> {
        let f = File::create(path).expect("create the logged file");
        let lf = LoggedFile {
            path: path.to_path_buf(),
            tag,
            block_bytes,
            blocks: Mutex::new(vec![BlockState::default(); blocks as usize]),
            counter: AtomicU64::new(1),
        };
        let mut buf = Vec::with_capacity(block_bytes * 64);
        for b in 0..blocks {
            buf.extend_from_slice(&block_bytes_of(&lf, b, 1));
            if buf.len() >= block_bytes * 64 || b + 1 == blocks {
                let at = (b + 1) * block_bytes as u64 - buf.len() as u64;
                f.write_all_at(&buf, at).expect("fill the logged file");
                buf.clear();
            }
        }
        f.sync_all().expect("fsync the logged file");
        for s in lf.blocks.lock().unwrap().iter_mut() {
            s.acked = 1;
        }
        Arc::new(lf)
    }

    /// Write block `b` through `f` with the next counter; logs before and after.
    pub fn write_block(&self, f: &File, b: u64) -> std::io::Result<()> {
        let c = self.counter.fetch_add(1, Ordering::Relaxed) + 1;
        {
            let mut bl = self.blocks.lock().unwrap();
            if bl.len() <= b as usize {
                bl.resize(b as usize + 1, BlockState::default());
            }
            bl[b as usize].inflight = Some(c);
        }
        let r = f.write_all_at(&block_bytes_of(self, b, c), b * self.block_bytes as u64);
        let mut bl = self.blocks.lock().unwrap();
        if r.is_ok() {
            bl[b as usize].acked = c;
            bl[b as usize].inflight = None;
        }
        r
    }

    pub fn len_blocks(&self) -> u64 {
        self.blocks.lock().unwrap().len() as u64
    }

    /// Check every block (through `path`, which may be a new mount's): it holds its last
    /// acknowledged write, or, with `allow_inflight`, a write that was in flight at a crash —
    /// whole, or a byte-wise mix of it and the acknowledged one (a write the kill cut short).
    /// Returns the problems, at most 10.
    pub fn verify_at(&self, path: &Path, allow_inflight: bool) -> Vec<String> {
        let bl = self.blocks.lock().unwrap().clone();
        let mut got = vec![0u8; self.block_bytes];
        let f = File::open(path).expect("open the logged file to verify");
        let mut problems = Vec::new();
        for (b, s) in bl.iter().enumerate() {
            got.fill(0);
            let n = f.read_at(&mut got, (b * self.block_bytes) as u64).unwrap_or(0);
            let acked = block_bytes_of(self, b as u64, s.acked);
            if n == self.block_bytes && got == acked {
                continue;
            }
            if let (true, Some(c)) = (allow_inflight, s.inflight) {
                let new = block_bytes_of(self, b as u64, c);
                if n == self.block_bytes && got.iter().zip(acked.iter().zip(&new)).all(|(g, (o, w))| g == o || g == w) {
                    continue;
                }
            }
            if problems.len() < 10 {
                let first = got.iter().zip(&acked).position(|(g, w)| g != w).unwrap_or(0);
                problems.push(format!(
                    "{}: block {b} ({n} bytes read) holds {}, expected write #{}{}; first difference at byte {first}",
                    path.display(),
                    describe(&got[..n.min(got.len())]),
                    s.acked,
                    s.inflight.map(|c| format!(" or #{c} (in flight)")).unwrap_or_default()
                ));
            }
        }
        problems
    }

    pub fn verify(&self) -> Vec<String> {
        self.verify_at(&self.path, false)
    }
}

fn block_bytes_of(lf: &LoggedFile, b: u64, c: u64) -> Vec<u8> {
    block_bytes(lf.tag, b, c, lf.block_bytes)
}

/// Threads writing random blocks of a file (thread k owns the blocks b with b % n == k)
/// until stopped. Each thread opens its own handle (O_RDWR).
pub struct Writers {
    stop: Arc<AtomicBool>,
    handles: Vec<JoinHandle<u64>>,
    pub file: Arc<LoggedFile>,
}

impl Writers {
    pub fn start(file: &Arc<LoggedFile>, threads: usize, seed: u64) -> Writers {
        let stop = Arc::new(AtomicBool::new(false));
        let handles = (0..threads)
            .map(|k| {
                let (file, stop) = (file.clone(), stop.clone());
                thread::spawn(move || {
                    let f = OpenOptions::new().read(true).write(true).open(&file.path).expect("open for writing");
                    let n = file.len_blocks();
                    let mine: Vec<u64> = (0..n).filter(|b| b % threads as u64 == k as u64).collect();
                    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (k as u64 + 1);
                    let mut writes = 0;
                    while !stop.load(Ordering::Relaxed) && !mine.is_empty() {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        let b = mine[(x % mine.len() as u64) as usize];
                        if file.write_block(&f, b).is_err() {
                            break;
                        }
                        writes += 1;
                    }
                    writes
                })
            })
            .collect();
        Writers { stop, handles, file: file.clone() }
    }

    /// Stop the threads; the number of writes they acknowledged.
    pub fn stop(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.handles.into_iter().map(|h| h.join().expect("writer thread")).sum()
    }
}

/// The volumes a data set's extents are on, and its extent count, from `ferryfs ls`.
pub fn placement(target: &Path, path: &str) -> (Vec<String>, usize) {
    let d = super::data_set(target, path);
    let vols = d["volumes"].as_array().unwrap().iter().map(|v| v.as_str().unwrap().to_string()).collect();
    (vols, d["extent_count"].as_u64().unwrap() as usize)
}

/// Per volume, the tracks the data sets' extents hold (each data set once, whatever its
/// links), from `ferryfs ls --json` of `target` (a pool or a mountpoint); and that listing.
pub fn held_tracks(target: &Path) -> (BTreeMap<String, u64>, Value) {
    let ls = super::ls_json_at(target, "/");
    let mut held: BTreeMap<String, u64> = BTreeMap::new();
    let mut seen = BTreeSet::new();
    for d in ls["data_sets"].as_array().expect("data_sets") {
        if !seen.insert(d["ino"].as_u64().unwrap()) {
            continue;
        }
        for e in d["extents"].as_array().expect("extents") {
            *held.entry(e["volume"].as_str().unwrap().to_string()).or_default() += e["track_count"].as_u64().unwrap();
        }
    }
    (held, ls)
}
