//! Crash durability, checked against a write log.
//!
//! Writer threads write blocks whose bytes are a pure function of (file id, block index,
//! per-block counter). A write enters the log as "in flight" before the syscall starts and
//! as "acknowledged" only after `pwrite` returned; a subset is followed by `fsync`, and the
//! log remembers which acknowledged writes an `fsync` covered. A metadata thread creates,
//! renames and unlinks small files the same way. Then the daemon is killed with SIGKILL
//! (its pid comes from `POOL/mounted`), the pool is mounted again, and every block must hold
//! its last acknowledged write; a write that was in flight at the kill may show the old
//! bytes, the new bytes, or a byte-wise mix of the two, and nothing else. Writers also
//! truncate now and then (to block boundaries): a truncate that returned is visible, one in
//! flight leaves the size before or after it. Renames and unlinks that returned before the
//! kill must be visible; file sizes must match every acknowledged extending write.
//! `ferryfs fsck POOL` must be clean after every remount. A second crash test kills the
//! daemon while `ferryfs umount` runs, and a third checks the same workload across a clean
//! unmount.
mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use common::{fsck_clean, ls_json, Mounted, Rng, TestPool};

/// Track size of the test pools: small, so a file spans many tracks and extents.
const TRACK_SIZE: &str = "16K";
/// Volumes: three small ones that the data (up to ~7.5 MiB) mostly fills, so the allocator
/// has to use all of them and data sets spill across volumes.
const VOLUMES: &[(&str, &str)] = &[("V1", "3M"), ("V2", "3M"), ("V3", "4M")];
/// Data files: the first `OWNED_FILES` each belong to one writer thread; the last one,
/// `SHARED_FILE`, is written by every writer at once.
const FILES: usize = 7;
const OWNED_FILES: usize = 6;
/// Every writer writes this file: thread t writes the blocks b with b % WRITERS == t, so
/// neighbouring blocks, which share tracks, are written concurrently by different threads.
/// Nobody truncates it.
const SHARED_FILE: usize = 6;
/// Writer threads; thread t owns the files f < OWNED_FILES with f % WRITERS == t.
const WRITERS: usize = 3;
/// Block sizes per file: aligned, unaligned, whole tracks, several blocks per track, tiny;
/// the shared file's blocks are unaligned, so one track holds parts of several threads' blocks.
const BLOCK_SIZES_BYTES: [u64; FILES] = [4096, 5000, 16384, 12288, 700, 4096, 3000];
/// Highest block count a file grows to (bounds the data at ~7 MiB).
const BLOCKS_MAX: u64 = 160;
/// About one step in this many is a truncate (to a block boundary, down or up).
const TRUNCATE_ONE_IN: u64 = 40;
/// Every this many writes a writer fsyncs the file it just wrote.
const SYNC_EVERY: u64 = 16;
/// Kill rounds of the crash test.
const ROUNDS: usize = 5;
/// The metadata thread keeps at most this many small files alive.
const META_FILES_MAX: usize = 40;
/// Upper bound on waiting for writers to return once the daemon is dead. Not a timed
/// assertion about ferryfs speed: a writer still blocked after this is stuck for good.
const WRITER_EXIT_LIMIT: Duration = Duration::from_secs(120);

// ---------------------------------------------------------------------------------------
// Block contents

/// The bytes of block `block` of file `file` as written by its write number `counter`.
/// Counter 0 means "never written": zeros. Every other counter starts with a header
/// (magic, file, block, counter) followed by bytes that depend on all three.
fn block_bytes(file: usize, block: u64, counter: u64, len: usize) -> Vec<u8> {
    if counter == 0 {
        return vec![0; len];
    }
    let seed = ((file as u64) << 56) ^ (block << 32) ^ counter;
    let mut v = common::pattern(len, seed ^ 0x5EED_F00D);
    let mut header = Vec::with_capacity(16);
    header.extend_from_slice(b"FRY");
    header.push(file as u8);
    header.extend_from_slice(&(block as u32).to_le_bytes());
    header.extend_from_slice(&(counter as u32).to_le_bytes());
    let n = header.len().min(len);
    v[..n].copy_from_slice(&header[..n]);
    v
}

/// What a block holds, from its header, for messages: "write #7", or another block's header
/// ("file 3 block 12 write #7"), or "no write header" with a count of its zero bytes.
fn describe_block(file: usize, block: u64, bytes: &[u8]) -> String {
    if bytes.len() >= 12 && &bytes[..3] == b"FRY" {
        let f = bytes[3] as usize;
        let b = u32::from_le_bytes(bytes[4..8].try_into().unwrap()) as u64;
        let c = u32::from_le_bytes(bytes[8..12].try_into().unwrap());
        if (f, b) == (file, block) {
            format!("write #{c}")
        } else {
            format!("the header of file f{f} block {b} write #{c}")
        }
    } else {
        let zeros = bytes.iter().filter(|x| **x == 0).count();
        format!("no write header ({zeros} of {} bytes zero)", bytes.len())
    }
}

// ---------------------------------------------------------------------------------------
// The write log

#[derive(Clone, Default, Debug)]
struct BlockLog {
    /// Counter of the last write whose pwrite returned (0: never written).
    acked: u64,
    /// Whether an fsync that returned covered `acked`.
    synced: bool,
    /// A write started but not known to have returned.
    inflight: Option<u64>,
    /// Highest counter ever handed out for this block.
    top: u64,
}

#[derive(Debug)]
struct FileLog {
    id: usize,
    block_size_bytes: u64,
    blocks: Vec<BlockLog>,
    /// Size every acknowledged write implies (no truncates here, so it only grows).
    size_bytes: u64,
    /// A truncate to this many blocks that is in flight.
    inflight_truncate_blocks: Option<u64>,
}

impl FileLog {
    fn new(id: usize) -> FileLog {
        FileLog {
            id,
            block_size_bytes: BLOCK_SIZES_BYTES[id],
            blocks: vec![BlockLog::default(); BLOCKS_MAX as usize],
            size_bytes: 0,
            inflight_truncate_blocks: None,
        }
    }

    fn name(&self) -> String {
        format!("data/f{}", self.id)
    }
}

/// The state of the small files in `meta/`: name to contents.
type MetaState = BTreeMap<String, Vec<u8>>;

/// One metadata step, logged before it starts and applied to the state when it returned.
#[derive(Clone)]
enum MetaOp {
    /// open(O_CREAT|O_EXCL) of a new, empty file.
    Create(String),
    /// One write of the whole contents into an empty file.
    Fill(String, Vec<u8>),
    /// rename(from, to), `to` may exist and is then replaced.
    Rename(String, String),
    Unlink(String),
}

impl std::fmt::Debug for MetaOp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MetaOp::Create(n) => write!(f, "create meta/{n}"),
            MetaOp::Fill(n, d) => write!(f, "write {} bytes to meta/{n}", d.len()),
            MetaOp::Rename(a, b) => write!(f, "rename meta/{a} to meta/{b}"),
            MetaOp::Unlink(n) => write!(f, "unlink meta/{n}"),
        }
    }
}

impl MetaOp {
    fn apply(&self, st: &mut MetaState) {
        match self {
            MetaOp::Create(n) => {
                st.insert(n.clone(), Vec::new());
            }
            MetaOp::Fill(n, data) => {
                st.insert(n.clone(), data.clone());
            }
            MetaOp::Rename(a, b) => {
                if let Some(d) = st.remove(a) {
                    st.insert(b.clone(), d);
                }
            }
            MetaOp::Unlink(n) => {
                st.remove(n);
            }
        }
    }
}

#[derive(Default, Debug)]
struct MetaLog {
    state: MetaState,
    inflight: Option<MetaOp>,
    next_name: u64,
    /// Steps acknowledged in total (to show the test did something).
    acked_ops: u64,
}

struct Log {
    files: Vec<Mutex<FileLog>>,
    meta: Mutex<MetaLog>,
    /// The syscall failures that ended each worker (expected only after a kill).
    errors: Mutex<Vec<String>>,
}

impl Log {
    fn failed(&self, what: String, e: std::io::Error) {
        self.errors.lock().unwrap().push(format!("{what}: {e}"));
    }

    fn new() -> Log {
        Log {
            files: (0..FILES).map(|i| Mutex::new(FileLog::new(i))).collect(),
            meta: Mutex::new(MetaLog::default()),
            errors: Mutex::new(Vec::new()),
        }
    }
}

// ---------------------------------------------------------------------------------------
// Workers

/// Logs a truncate to `blocks` blocks that returned: later blocks are gone (read as holes
/// if the file grows again).
fn apply_truncate(fl: &mut FileLog, blocks: u64) {
    for b in &mut fl.blocks[blocks as usize..] {
        b.acked = 0;
        b.synced = false;
    }
    fl.size_bytes = blocks * fl.block_size_bytes;
    fl.inflight_truncate_blocks = None;
}

/// Writes random blocks of the writer's files until `stop` is set, `ops_max` writes are
/// done, or a syscall fails (the daemon is gone); now and then truncates instead. Returns the
/// number of acknowledged writes and truncates.
fn writer(mnt: &Path, log: &Log, thread_no: usize, seed: u64, stop: &AtomicBool, ops_max: Option<u64>) -> u64 {
    let mut rng = Rng::new(seed ^ ((thread_no as u64 + 1) * 0x1000_0001));
    let mut mine: Vec<usize> = (0..OWNED_FILES).filter(|f| f % WRITERS == thread_no).collect();
    mine.push(SHARED_FILE);
    let mut handles = Vec::new();
    for &f in &mine {
        let name = log.files[f].lock().unwrap().name();
        match OpenOptions::new().write(true).open(mnt.join(&name)) {
            Ok(h) => handles.push(h),
            Err(e) => {
                log.failed(format!("open {name}"), e);
                return 0;
            }
        }
    }
    let mut done = 0u64;
    while !stop.load(Ordering::Relaxed) && ops_max.is_none_or(|m| done < m) {
        let k = rng.below(mine.len() as u64) as usize;
        let f = mine[k];
        if f != SHARED_FILE && rng.below(TRUNCATE_ONE_IN) == 0 {
            let (blocks, bs) = {
                let mut fl = log.files[f].lock().unwrap();
                let bs = fl.block_size_bytes;
                // Shrinks most of the time; sometimes grows by up to two blocks of zeros.
                let blocks = rng.below((fl.size_bytes.div_ceil(bs) + 3).min(BLOCKS_MAX));
                fl.inflight_truncate_blocks = Some(blocks);
                (blocks, bs)
            };
            if let Err(e) = handles[k].set_len(blocks * bs) {
                log.failed(format!("ftruncate f{f} to {blocks} blocks"), e);
                return done; // outcome unknown: stays in flight
            }
            let mut fl = log.files[f].lock().unwrap();
            apply_truncate(&mut fl, blocks);
            done += 1;
            continue;
        }
        let (block, counter, bs, bytes) = {
            let mut fl = log.files[f].lock().unwrap();
            let bs = fl.block_size_bytes;
            let blocks_now = fl.size_bytes.div_ceil(bs);
            // Up to two blocks past the end: extends the file, sometimes leaving a hole.
            let block = if f == SHARED_FILE {
                // This thread's blocks only: b % WRITERS == thread_no.
                let limit = (blocks_now + 2 + WRITERS as u64).min(BLOCKS_MAX);
                let b = rng.below(limit.div_ceil(WRITERS as u64)) * WRITERS as u64 + thread_no as u64;
                if b >= BLOCKS_MAX {
                    b - WRITERS as u64
                } else {
                    b
                }
            } else {
                rng.below((blocks_now + 2).min(BLOCKS_MAX))
            };
            let b = &mut fl.blocks[block as usize];
            let counter = b.top + 1;
            b.top = counter;
            b.inflight = Some(counter);
            (block, counter, bs, block_bytes(f, block, counter, bs as usize))
        };
        if let Err(e) = handles[k].write_all_at(&bytes, block * bs) {
            log.failed(format!("pwrite f{f} block {block}"), e);
            return done; // outcome unknown: stays in flight
        }
        {
            let mut fl = log.files[f].lock().unwrap();
            let b = &mut fl.blocks[block as usize];
            b.acked = counter;
            b.synced = false;
            b.inflight = None;
            fl.size_bytes = fl.size_bytes.max((block + 1) * bs);
        }
        done += 1;
        if done % SYNC_EVERY == 0 {
            // Snapshot what the fsync covers before it starts: writes acknowledged by now.
            let covered: Vec<u64> = log.files[f].lock().unwrap().blocks.iter().map(|b| b.acked).collect();
            if let Err(e) = handles[k].sync_all() {
                log.failed(format!("fsync f{f}"), e);
                return done;
            }
            let mut fl = log.files[f].lock().unwrap();
            for (b, c) in fl.blocks.iter_mut().zip(covered) {
                if b.acked == c && c != 0 {
                    b.synced = true;
                }
            }
        }
    }
    done
}

/// Runs one metadata step: logs it as in flight, performs it, applies it when it returned.
fn meta_step(mnt: &Path, log: &Log, op: MetaOp) -> bool {
    log.meta.lock().unwrap().inflight = Some(op.clone());
    let dir = mnt.join("meta");
    let ok = match &op {
        MetaOp::Create(n) => OpenOptions::new().write(true).create_new(true).open(dir.join(n)).map(drop),
        MetaOp::Fill(n, data) => match OpenOptions::new().write(true).open(dir.join(n)) {
            Ok(mut h) => {
                let r = h.write_all(data);
                if let Err(e) = &r {
                    log.failed(format!("{op:?}"), std::io::Error::from(e.kind()));
                }
                let r = r.is_ok();
                // The write is acknowledged by write(); close is not part of the step.
                if r {
                    let mut m = log.meta.lock().unwrap();
                    op.apply(&mut m.state);
                    m.inflight = None;
                    m.acked_ops += 1;
                }
                drop(h);
                return r;
            }
            Err(e) => Err(e),
        },
        MetaOp::Rename(a, b) => fs::rename(dir.join(a), dir.join(b)),
        MetaOp::Unlink(n) => fs::remove_file(dir.join(n)),
    };
    let ok = match ok {
        Ok(()) => true,
        Err(e) => {
            log.failed(format!("{op:?}"), e);
            false
        }
    };
    if ok {
        let mut m = log.meta.lock().unwrap();
        op.apply(&mut m.state);
        m.inflight = None;
        m.acked_ops += 1;
    }
    ok
}

/// Creates, fills, renames (to new names and over existing ones) and unlinks small files
/// in `meta/` until `stop`, `ops_max` steps, or a failure.
fn meta_worker(mnt: &Path, log: &Log, seed: u64, stop: &AtomicBool, ops_max: Option<u64>) {
    let mut rng = Rng::new(seed ^ 0x00AB_5E17);
    let mut done = 0u64;
    while !stop.load(Ordering::Relaxed) && ops_max.is_none_or(|m| done < m) {
        let (names, fresh): (Vec<String>, String) = {
            let mut m = log.meta.lock().unwrap();
            m.next_name += 1;
            (m.state.keys().cloned().collect(), format!("n{}", m.next_name))
        };
        let pick = |rng: &mut Rng| names[rng.below(names.len() as u64) as usize].clone();
        let choice = rng.below(10);
        let ok = if names.len() >= META_FILES_MAX || (choice < 2 && !names.is_empty()) {
            meta_step(mnt, log, MetaOp::Unlink(pick(&mut rng)))
        } else if choice < 4 && !names.is_empty() {
            let from = pick(&mut rng);
            let to = if rng.below(2) == 0 { fresh } else { pick(&mut rng) };
            meta_step(mnt, log, MetaOp::Rename(from, to))
        } else {
            let len = 1 + rng.below(6000) as usize;
            let data = common::pattern(len, rng.next());
            meta_step(mnt, log, MetaOp::Create(fresh.clone())) && meta_step(mnt, log, MetaOp::Fill(fresh, data))
        };
        if !ok {
            return;
        }
        done += 1;
    }
}

/// The writer and metadata threads of one round.
struct Workers {
    stop: Arc<AtomicBool>,
    handles: Vec<JoinHandle<u64>>,
}

fn start_workers(m: &Mounted, log: &Arc<Log>, seed: u64, ops_max: Option<u64>) -> Workers {
    let stop = Arc::new(AtomicBool::new(false));
    let mut handles = Vec::new();
    for t in 0..WRITERS {
        let (mnt, log, stop) = (m.mnt.clone(), log.clone(), stop.clone());
        handles.push(thread::spawn(move || writer(&mnt, &log, t, seed, &stop, ops_max)));
    }
    {
        let (mnt, log, stop) = (m.mnt.clone(), log.clone(), stop.clone());
        handles.push(thread::spawn(move || {
            meta_worker(&mnt, &log, seed, &stop, ops_max.map(|n| n / 2));
            0
        }));
    }
    Workers { stop, handles }
}

impl Workers {
    /// Sets the stop flag and waits for every thread; returns the acknowledged writes.
    fn finish(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        let start = Instant::now();
        while !self.handles.iter().all(|h| h.is_finished()) {
            assert!(
                start.elapsed() < WRITER_EXIT_LIMIT,
                "a writer is still blocked in a syscall {WRITER_EXIT_LIMIT:?} after it was \
                 told to stop (after a kill, every request to the dead daemon must fail)"
            );
            thread::sleep(Duration::from_millis(20));
        }
        self.join()
    }

    /// Waits for every thread to end by itself; returns the acknowledged writes.
    fn join(self) -> u64 {
        self.handles.into_iter().map(|h| h.join().expect("worker thread panicked")).sum()
    }
}

// ---------------------------------------------------------------------------------------
// Verification

/// Checks one file against its log; appends one line per problem.
fn verify_file(mnt: &Path, fl: &FileLog, problems: &mut Vec<String>) {
    let name = fl.name();
    let data = match fs::read(mnt.join(&name)) {
        Ok(d) => d,
        Err(e) => {
            problems.push(format!("{name}: cannot read after remount: {e}"));
            return;
        }
    };
    let size = data.len() as u64;
    let bs = fl.block_size_bytes;
    // Writes in flight may have extended the file.
    let size_max = fl
        .blocks
        .iter()
        .enumerate()
        .filter(|(_, b)| b.inflight.is_some())
        .map(|(i, _)| (i as u64 + 1) * bs)
        .fold(fl.size_bytes, u64::max);
    if let Some(blocks) = fl.inflight_truncate_blocks {
        if size != fl.size_bytes && size != blocks * bs {
            problems.push(format!(
                "{name}: size {size} after remount, but it must be {} (before the truncate in flight) \
                 or {} (after it)",
                fl.size_bytes,
                blocks * bs
            ));
        }
    } else if size < fl.size_bytes || size > size_max {
        problems.push(format!(
            "{name}: size {size} after remount, acknowledged writes imply {} (at most {size_max} \
             with the write in flight)",
            fl.size_bytes
        ));
    }
    for (i, b) in fl.blocks.iter().enumerate() {
        let start = i as u64 * bs;
        if start >= size && b.acked == 0 {
            continue;
        }
        let end = (start + bs).min(size);
        let got: &[u8] = if start < size { &data[start as usize..end as usize] } else { &[] };
        let old = block_bytes(fl.id, i as u64, b.acked, bs as usize);
        if fl.inflight_truncate_blocks.is_some_and(|t| i as u64 >= t) {
            // Cut by a truncate in flight: each byte is the old one or zero (gone, or a
            // partly cut track whose tail was already cleared).
            if let Some(k) = got.iter().zip(&old).position(|(g, o)| g != o && *g != 0) {
                problems.push(format!(
                    "{name} block {i} (offset {start}): a truncate was in flight, but byte +{k} is \
                     neither from write #{} nor zero; the block holds {}",
                    b.acked,
                    describe_block(fl.id, i as u64, got)
                ));
            }
            continue;
        }
        match b.inflight {
            None => {
                if got.len() as u64 != bs && b.acked != 0 {
                    problems.push(format!(
                        "{name} block {i}: acknowledged write #{} ({}) is cut off by size {size}",
                        b.acked,
                        if b.synced { "fsynced" } else { "not fsynced" }
                    ));
                } else if got != &old[..got.len()] {
                    problems.push(format!(
                        "{name} block {i} (offset {start}): holds {} but the last acknowledged \
                         write is #{} ({}); first bad byte at +{}",
                        describe_block(fl.id, i as u64, got),
                        b.acked,
                        if b.synced { "fsynced" } else { "not fsynced" },
                        got.iter().zip(&old).position(|(x, y)| x != y).unwrap_or(0)
                    ));
                }
            }
            Some(new_counter) => {
                let new = block_bytes(fl.id, i as u64, new_counter, bs as usize);
                let bad = got.iter().enumerate().position(|(k, &x)| x != old[k] && x != new[k]);
                if let Some(k) = bad {
                    problems.push(format!(
                        "{name} block {i} (offset {start}): write #{new_counter} was in flight \
                         over #{}, but byte +{k} is neither old nor new; the block holds {}",
                        b.acked,
                        describe_block(fl.id, i as u64, got)
                    ));
                }
                if b.acked != 0 && (got.len() as u64) < bs && start + bs <= fl.size_bytes {
                    problems.push(format!("{name} block {i}: acknowledged data cut off by size {size}"));
                }
            }
        }
    }
}

/// Lists and reads `meta/` after a remount.
fn read_meta(mnt: &Path) -> Result<MetaState, String> {
    let mut st = MetaState::new();
    let rd = fs::read_dir(mnt.join("meta")).map_err(|e| format!("readdir meta: {e}"))?;
    for e in rd {
        let e = e.map_err(|e| format!("readdir meta: {e}"))?;
        let name = e.file_name().to_string_lossy().into_owned();
        let data = fs::read(e.path()).map_err(|err| format!("read meta/{name}: {err}"))?;
        st.insert(name, data);
    }
    Ok(st)
}

/// Whether `got` is what a possibly torn `Fill(name, data)` could leave behind.
fn fill_torn_ok(got: &[u8], data: &[u8]) -> bool {
    got.is_empty() || (got.len() == data.len() && got.iter().zip(data).all(|(g, d)| g == d || *g == 0))
}

fn describe_diff(got: &MetaState, want: &MetaState) -> String {
    let g: BTreeSet<_> = got.keys().collect();
    let w: BTreeSet<_> = want.keys().collect();
    let missing: Vec<_> = w.difference(&g).collect();
    let extra: Vec<_> = g.difference(&w).collect();
    let differ: Vec<_> = g
        .intersection(&w)
        .filter(|k| got[**k] != want[**k])
        .map(|k| format!("{k} ({} bytes, expected {})", got[*k].len(), want[*k].len()))
        .collect();
    format!("missing {missing:?}, unexpected {extra:?}, different contents {differ:?}")
}

/// Checks `meta/` against its log: the state after the last acknowledged step, or, when a
/// step was in flight, the state before or after it. Returns the state found.
fn verify_meta(mnt: &Path, ml: &MetaLog, problems: &mut Vec<String>) -> MetaState {
    let got = match read_meta(mnt) {
        Ok(g) => g,
        Err(e) => {
            problems.push(e);
            return ml.state.clone();
        }
    };
    if got == ml.state {
        return got;
    }
    if let Some(op) = &ml.inflight {
        let mut after = ml.state.clone();
        op.apply(&mut after);
        if got == after {
            return got;
        }
        if let MetaOp::Fill(n, data) = op {
            // Same names as before; the filled file may hold a torn write.
            let same_names = got.keys().eq(ml.state.keys());
            let others_ok = got.iter().filter(|(k, _)| *k != n).all(|(k, v)| ml.state.get(k) == Some(v));
            if same_names && others_ok && got.get(n).is_some_and(|g| fill_torn_ok(g, data)) {
                return got;
            }
        }
        problems.push(format!(
            "meta/: matches neither the state before nor after the step in flight ({op:?}): \
             against before: {}; against after: {}",
            describe_diff(&got, &ml.state),
            describe_diff(&got, &after)
        ));
    } else {
        problems.push(format!("meta/: does not match the acknowledged state: {}", describe_diff(&got, &ml.state)));
    }
    got
}

/// Verifies the whole mount against the log and panics with every problem found.
fn verify(m: &Mounted, log: &Log, when: &str) -> MetaState {
    let mut problems = Vec::new();
    for f in &log.files {
        verify_file(&m.mnt, &f.lock().unwrap(), &mut problems);
    }
    let meta = verify_meta(&m.mnt, &log.meta.lock().unwrap(), &mut problems);
    if !problems.is_empty() {
        let synced_lost = problems.iter().filter(|p| p.contains("(fsynced)")).count();
        let shown: Vec<_> = problems.iter().take(40).cloned().collect();
        panic!("{when}: {} problems ({synced_lost} of them lose fsynced data):\n{}", problems.len(), shown.join("\n"));
    }
    meta
}

/// After a verified crash: settles every write that was in flight by writing the block
/// again (acknowledged, on the new mount) and adopts the metadata state that was found,
/// so the next round starts from an exactly known state.
fn settle(m: &Mounted, log: &Log, meta_found: MetaState) {
    for f in &log.files {
        let mut fl = f.lock().unwrap();
        let fl = &mut *fl;
        let h = OpenOptions::new().write(true).open(m.mnt.join(fl.name())).expect("open data file after remount");
        let bs = fl.block_size_bytes;
        let size = fs::metadata(m.mnt.join(fl.name())).unwrap().len();
        let mut size_now = size;
        for (i, b) in fl.blocks.iter_mut().enumerate() {
            if b.inflight.take().is_some() {
                let counter = b.top + 1;
                b.top = counter;
                h.write_all_at(&block_bytes(fl.id, i as u64, counter, bs as usize), i as u64 * bs)
                    .expect("rewrite of a block in flight at the kill");
                b.acked = counter;
                b.synced = false;
                size_now = size_now.max((i as u64 + 1) * bs);
            }
        }
        fl.size_bytes = size_now;
        if let Some(blocks) = fl.inflight_truncate_blocks {
            // Repeat the truncate on the new mount, so the state is known again.
            h.set_len(blocks * bs).expect("repeat of a truncate in flight at the kill");
            apply_truncate(fl, blocks);
        }
    }
    let mut ml = log.meta.lock().unwrap();
    ml.state = meta_found;
    ml.inflight = None;
}

/// Creates the directories and the (empty) data files; all acknowledged before workers run.
fn prepare(m: &Mounted, log: &Log) {
    fs::create_dir(m.p("data")).expect("mkdir data");
    fs::create_dir(m.p("meta")).expect("mkdir meta");
    for f in &log.files {
        let fl = f.lock().unwrap();
        OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o644)
            .open(m.mnt.join(fl.name()))
            .expect("create data file");
    }
}

/// Sanity check of the log: after a remount, `ls --json` reports the sizes read through
/// the mount.
fn check_ls_sizes(m: &Mounted) {
    let v = ls_json(&m.mnt);
    for d in v["data_sets"].as_array().expect("data_sets") {
        let path = d["path"].as_str().unwrap();
        let size = fs::metadata(m.p(path)).map(|md| md.len());
        assert_eq!(
            Some(d["size_bytes"].as_u64().unwrap()),
            size.ok(),
            "ls --json size of {path} differs from stat through the mount"
        );
    }
}

// ---------------------------------------------------------------------------------------
// Tests

/// Five rounds of: writers and metadata changes running, SIGKILL of the daemon at a random
/// moment, remount, fsck, and a check of every acknowledged write. Ends with a clean
/// unmount and one more remount of the same data.
#[test]
fn kill9_while_writing_keeps_every_acknowledged_write() {
    let seed = common::seed_from_env("durability");
    let mut rng = Rng::new(seed);
    let tp = TestPool::new(TRACK_SIZE, VOLUMES);
    let log = Arc::new(Log::new());
    let mut m = tp.mount();
    prepare(&m, &log);
    let mut total_writes = 0;
    for round in 0..ROUNDS {
        let workers = start_workers(&m, &log, seed.wrapping_add(round as u64 * 7919), None);
        // Random kill moment: sometimes almost at once, sometimes after a lot of I/O.
        let delay_ms = match rng.below(4) {
            0 => rng.below(50),
            _ => 50 + rng.below(1500),
        };
        thread::sleep(Duration::from_millis(delay_ms));
        let pid = m.daemon_pid();
        m.kill9();
        let writes = workers.finish();
        total_writes += writes;
        let meta_ops = log.meta.lock().unwrap().acked_ops;
        let first_error = log.errors.lock().unwrap().drain(..).next().unwrap_or_default();
        eprintln!(
            "round {round}: killed daemon {pid} after {delay_ms} ms; {writes} writes, {meta_ops} metadata \
             steps acknowledged so far; first failure seen by a worker: {first_error}"
        );

        m = tp.mount();
        fsck_clean(&tp.pool);
        let meta = verify(&m, &log, &format!("round {round}, after kill -9 and remount"));
        settle(&m, &log, meta);
        check_ls_sizes(&m);
    }
    assert!(total_writes > 0, "no write was acknowledged in {ROUNDS} rounds");
    assert!(log.meta.lock().unwrap().acked_ops > 0, "no metadata step was acknowledged in {ROUNDS} rounds");

    // The premise of the small volumes: the data sets spread over more than one volume.
    let vols = common::volume_list_json(&m.mnt);
    let used = vols["volumes"].as_array().unwrap().iter().filter(|v| v["tracks_used"].as_u64().unwrap() > 0).count();
    assert!(used >= 2, "the workload was meant to fill more than one volume: {vols:#}");

    // The same data survives a clean unmount and another mount.
    m.unmount();
    fsck_clean(&tp.pool);
    let m = tp.mount();
    verify(&m, &log, "after the kill rounds, a clean unmount and a remount");
    m.unmount();
    fsck_clean(&tp.pool);
}

/// A bounded amount of the same workload, then a clean unmount: after the remount every
/// write is exactly there (nothing was in flight).
#[test]
fn clean_unmount_remount_keeps_every_write() {
    let seed = common::seed_from_env("durability");
    let tp = TestPool::new(TRACK_SIZE, VOLUMES);
    let log = Arc::new(Log::new());
    let m = tp.mount();
    prepare(&m, &log);
    let writes = start_workers(&m, &log, seed, Some(400)).join();
    let errors = log.errors.lock().unwrap().clone();
    assert!(errors.is_empty(), "syscalls failed on a healthy mount: {errors:#?}");
    assert_eq!(writes, 400 * WRITERS as u64, "some writes failed on a healthy mount");
    // Nothing may be in flight on a healthy mount.
    for f in &log.files {
        let fl = f.lock().unwrap();
        assert!(fl.blocks.iter().all(|b| b.inflight.is_none()), "{}: write left in flight", fl.name());
    }
    assert!(log.meta.lock().unwrap().inflight.is_none(), "metadata step left in flight");
    verify(&m, &log, "before unmount");
    m.unmount();
    fsck_clean(&tp.pool);

    let m = tp.mount();
    fsck_clean(&tp.pool);
    verify(&m, &log, "after a clean unmount and a remount");
    check_ls_sizes(&m);
    m.unmount();
    fsck_clean(&tp.pool);
}

/// SIGKILL of the daemon while `ferryfs umount` runs (the daemon writes its catalog on the
/// way out): each of five rounds runs a bounded workload to completion, starts the unmount,
/// kills the daemon after a random short delay, mounts again and checks every write, all
/// of which were acknowledged before the unmount began.
#[test]
fn kill9_during_unmount_keeps_every_write() {
    let seed = common::seed_from_env("durability");
    let mut rng = Rng::new(seed ^ 0x0D15_EA5E);
    let tp = TestPool::new(TRACK_SIZE, VOLUMES);
    let log = Arc::new(Log::new());
    let mut m = tp.mount();
    prepare(&m, &log);
    for round in 0..ROUNDS {
        let writes = start_workers(&m, &log, seed.wrapping_add(round as u64 * 104_729), Some(150)).join();
        let errors: Vec<String> = log.errors.lock().unwrap().drain(..).collect();
        assert!(errors.is_empty(), "round {round}: syscalls failed on a healthy mount: {errors:#?}");
        assert_eq!(writes, 150 * WRITERS as u64, "round {round}: some writes failed on a healthy mount");

        let umount = std::process::Command::new(common::bin())
            .arg("umount")
            .arg(&m.mnt)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("spawn ferryfs umount");
        let delay_us = rng.below(6_000);
        thread::sleep(Duration::from_micros(delay_us));
        m.kill9();
        let mut umount = umount;
        let status = umount.wait().expect("wait for ferryfs umount");
        eprintln!("round {round}: killed the daemon {delay_us} us into the unmount (umount exited {status})");

        m = tp.mount();
        fsck_clean(&tp.pool);
        verify(&m, &log, &format!("round {round}, after kill -9 during unmount and a remount"));
        check_ls_sizes(&m);
    }
    m.unmount();
    fsck_clean(&tp.pool);
}
