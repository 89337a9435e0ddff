//! The trivial in-memory file system: one root directory holding regular
//! files; written data is discarded, reads return zeros. Transport-neutral:
//! `handle` gets the fuse_in_header, the per-op header (in_args[0]) and the
//! rest of the input, and writes the reply's out-args into `out`.

use crate::abi::*;
use std::collections::HashMap;
use std::mem::size_of;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

pub const MAX_WRITE: u32 = 1 << 20;
pub const MAX_PAGES: u16 = (MAX_WRITE / 4096) as u16;
const TTL_SECS: u64 = 10;
const NOPS: usize = 64;

/// Which transport delivered a request.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Via {
    Dev,
    Ring,
}

pub enum Outcome {
    /// Reply with `error` (0 or -errno) and `len` bytes of out-args in `out`.
    Reply { error: i32, len: usize },
    /// No reply (FORGET, BATCH_FORGET, INTERRUPT).
    NoReply,
}

/// Per-opcode request counters, split by transport.
pub struct Stats {
    dev: [AtomicU64; NOPS],
    ring: [AtomicU64; NOPS],
    /// io_uring requests whose in.len != 40 + op header + payload_sz
    pub ring_len_mismatch: AtomicU64,
    pub ring_len_mismatch_op: AtomicU64,
}

#[derive(Clone, Default, Debug)]
pub struct StatsSnapshot {
    pub dev: Vec<u64>,
    pub ring: Vec<u64>,
}

impl StatsSnapshot {
    pub fn delta(&self, earlier: &StatsSnapshot) -> StatsSnapshot {
        let sub = |a: &[u64], b: &[u64]| a.iter().zip(b).map(|(x, y)| x - y).collect();
        StatsSnapshot { dev: sub(&self.dev, &earlier.dev), ring: sub(&self.ring, &earlier.ring) }
    }
    pub fn total(&self) -> u64 {
        self.dev.iter().sum::<u64>() + self.ring.iter().sum::<u64>()
    }
    pub fn ring_total(&self) -> u64 {
        self.ring.iter().sum()
    }
    /// e.g. "UNLINK:1.00,GETATTR:1.00" per `per` operations
    pub fn describe(counts: &[u64], per: u64) -> String {
        let mut parts = Vec::new();
        for (op, &n) in counts.iter().enumerate() {
            if n > 0 {
                let name = if op == NOPS - 1 { "OTHER" } else { opcode_name(op as u32) };
                parts.push(format!("{}:{:.3}", name, n as f64 / per.max(1) as f64));
            }
        }
        if parts.is_empty() { "-".to_string() } else { parts.join(",") }
    }
}

impl Stats {
    fn new() -> Stats {
        Stats {
            dev: std::array::from_fn(|_| AtomicU64::new(0)),
            ring: std::array::from_fn(|_| AtomicU64::new(0)),
            ring_len_mismatch: AtomicU64::new(0),
            ring_len_mismatch_op: AtomicU64::new(0),
        }
    }
    fn count(&self, via: Via, opcode: u32) {
        let i = (opcode as usize).min(NOPS - 1);
        let arr = if via == Via::Dev { &self.dev } else { &self.ring };
        arr[i].fetch_add(1, Ordering::Relaxed);
    }
    pub fn snapshot(&self) -> StatsSnapshot {
        StatsSnapshot {
            dev: self.dev.iter().map(|a| a.load(Ordering::Relaxed)).collect(),
            ring: self.ring.iter().map(|a| a.load(Ordering::Relaxed)).collect(),
        }
    }
}

struct Node {
    size: u64,
    nlookup: u64,
    linked: bool,
}

struct State {
    names: HashMap<Vec<u8>, u64>,
    nodes: HashMap<u64, Node>,
    next_ino: u64,
    next_fh: u64,
}

pub struct Fs {
    state: Mutex<State>,
    pub stats: Stats,
    /// Ask for FUSE_OVER_IO_URING in the INIT reply.
    want_uring: bool,
    /// What the kernel offered in INIT (flags | flags2 << 32), and its minor.
    pub kernel_init_flags: AtomicU64,
    pub kernel_minor: AtomicU64,
    pub granted_uring: AtomicU64,
    start_time: u64,
}

fn errno(e: i32) -> Outcome {
    Outcome::Reply { error: -e, len: 0 }
}

fn ok(len: usize) -> Outcome {
    Outcome::Reply { error: 0, len }
}

/// Name argument: NUL-terminated bytes at the front of `rest`.
fn name_of(rest: &[u8]) -> Option<&[u8]> {
    let end = rest.iter().position(|&c| c == 0)?;
    Some(&rest[..end])
}

impl Fs {
    pub fn new(want_uring: bool) -> Fs {
        let mut nodes = HashMap::new();
        nodes.insert(FUSE_ROOT_ID, Node { size: 0, nlookup: 1, linked: true });
        let start_time =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        Fs {
            state: Mutex::new(State { names: HashMap::new(), nodes, next_ino: 2, next_fh: 1 }),
            stats: Stats::new(),
            want_uring,
            kernel_init_flags: AtomicU64::new(0),
            kernel_minor: AtomicU64::new(0),
            granted_uring: AtomicU64::new(0),
            start_time,
        }
    }

    fn attr(&self, ino: u64, node: &Node) -> Attr {
        let dir = ino == FUSE_ROOT_ID;
        Attr {
            ino,
            size: node.size,
            blocks: node.size.div_ceil(512),
            atime: self.start_time,
            mtime: self.start_time,
            ctime: self.start_time,
            mode: if dir { 0o040755 } else { 0o100644 },
            nlink: if dir {
                2
            } else if node.linked {
                1
            } else {
                0
            },
            blksize: 4096,
            ..zeroed()
        }
    }

    fn entry_out(&self, ino: u64, node: &Node) -> EntryOut {
        EntryOut {
            nodeid: ino,
            generation: 0,
            entry_valid: TTL_SECS,
            attr_valid: TTL_SECS,
            entry_valid_nsec: 0,
            attr_valid_nsec: 0,
            attr: self.attr(ino, node),
        }
    }

    fn attr_out(&self, ino: u64, node: &Node) -> AttrOut {
        AttrOut { attr_valid: TTL_SECS, attr_valid_nsec: 0, dummy: 0, attr: self.attr(ino, node) }
    }

    fn forget(st: &mut State, ino: u64, n: u64) {
        if ino == FUSE_ROOT_ID {
            return;
        }
        let remove = match st.nodes.get_mut(&ino) {
            Some(node) => {
                node.nlookup = node.nlookup.saturating_sub(n);
                node.nlookup == 0 && !node.linked
            }
            None => false,
        };
        if remove {
            st.nodes.remove(&ino);
        }
    }

    /// Create a regular file named `name` in the root; returns its ino.
    fn create_node(st: &mut State, name: &[u8]) -> Result<u64, i32> {
        if st.names.contains_key(name) {
            return Err(libc::EEXIST);
        }
        let ino = st.next_ino;
        st.next_ino += 1;
        st.names.insert(name.to_vec(), ino);
        st.nodes.insert(ino, Node { size: 0, nlookup: 1, linked: true });
        Ok(ino)
    }

    pub fn handle(&self, via: Via, h: &InHeader, op: &[u8], rest: &[u8], out: &mut [u8]) -> Outcome {
        self.stats.count(via, h.opcode);
        match h.opcode {
            FUSE_INIT => self.init(op, out),
            FUSE_LOOKUP => {
                if h.nodeid != FUSE_ROOT_ID {
                    return errno(libc::ENOTDIR);
                }
                let Some(name) = name_of(rest) else { return errno(libc::EINVAL) };
                let mut st = self.state.lock().unwrap();
                let Some(&ino) = st.names.get(name) else { return errno(libc::ENOENT) };
                let node = st.nodes.get_mut(&ino).expect("named node exists");
                node.nlookup += 1;
                let e = self.entry_out(ino, node);
                ok(put(out, 0, &e))
            }
            FUSE_CREATE | FUSE_MKNOD => {
                if h.nodeid != FUSE_ROOT_ID {
                    return errno(libc::ENOTDIR);
                }
                let mode = if h.opcode == FUSE_CREATE {
                    read::<CreateIn>(op).map(|c| c.mode)
                } else {
                    read::<MknodIn>(op).map(|m| m.mode)
                };
                let Some(mode) = mode else { return errno(libc::EINVAL) };
                if mode & libc::S_IFMT != libc::S_IFREG {
                    return errno(libc::EPERM);
                }
                let Some(name) = name_of(rest) else { return errno(libc::EINVAL) };
                let mut st = self.state.lock().unwrap();
                let ino = match Self::create_node(&mut st, name) {
                    Ok(i) => i,
                    Err(e) => return errno(e),
                };
                let e = self.entry_out(ino, &st.nodes[&ino]);
                let mut len = put(out, 0, &e);
                if h.opcode == FUSE_CREATE {
                    let fh = st.next_fh;
                    st.next_fh += 1;
                    len = put(out, len, &OpenOut { fh, open_flags: 0, backing_id: 0 });
                }
                ok(len)
            }
            FUSE_OPEN | FUSE_OPENDIR => {
                let mut st = self.state.lock().unwrap();
                if !st.nodes.contains_key(&h.nodeid) {
                    return errno(libc::ENOENT);
                }
                let fh = st.next_fh;
                st.next_fh += 1;
                ok(put(out, 0, &OpenOut { fh, open_flags: 0, backing_id: 0 }))
            }
            FUSE_FLUSH | FUSE_RELEASE | FUSE_RELEASEDIR | FUSE_FSYNC | FUSE_DESTROY => ok(0),
            FUSE_ACCESS => ok(0),
            FUSE_GETATTR => {
                let st = self.state.lock().unwrap();
                let Some(node) = st.nodes.get(&h.nodeid) else { return errno(libc::ENOENT) };
                let a = self.attr_out(h.nodeid, node);
                ok(put(out, 0, &a))
            }
            FUSE_SETATTR => {
                let Some(sa) = read::<SetattrIn>(op) else { return errno(libc::EINVAL) };
                let mut st = self.state.lock().unwrap();
                let Some(node) = st.nodes.get_mut(&h.nodeid) else { return errno(libc::ENOENT) };
                if sa.valid & FATTR_SIZE != 0 {
                    if h.nodeid == FUSE_ROOT_ID {
                        return errno(libc::EISDIR);
                    }
                    node.size = sa.size;
                }
                let a = self.attr_out(h.nodeid, node);
                ok(put(out, 0, &a))
            }
            FUSE_WRITE => {
                let Some(w) = read::<WriteIn>(op) else { return errno(libc::EINVAL) };
                if rest.len() < w.size as usize {
                    return errno(libc::EINVAL);
                }
                let mut st = self.state.lock().unwrap();
                let Some(node) = st.nodes.get_mut(&h.nodeid) else { return errno(libc::ENOENT) };
                node.size = node.size.max(w.offset + w.size as u64);
                ok(put(out, 0, &WriteOut { size: w.size, padding: 0 }))
            }
            FUSE_READ => {
                let Some(r) = read::<ReadIn>(op) else { return errno(libc::EINVAL) };
                let st = self.state.lock().unwrap();
                let Some(node) = st.nodes.get(&h.nodeid) else { return errno(libc::ENOENT) };
                let n = node.size.saturating_sub(r.offset).min(r.size as u64) as usize;
                let n = n.min(out.len());
                out[..n].fill(0);
                ok(n)
            }
            FUSE_READDIR => ok(0), // empty listing is enough for the probe
            FUSE_UNLINK => {
                if h.nodeid != FUSE_ROOT_ID {
                    return errno(libc::ENOTDIR);
                }
                let Some(name) = name_of(rest) else { return errno(libc::EINVAL) };
                let mut st = self.state.lock().unwrap();
                let Some(ino) = st.names.remove(name) else { return errno(libc::ENOENT) };
                let gone = {
                    let node = st.nodes.get_mut(&ino).expect("named node exists");
                    node.linked = false;
                    node.nlookup == 0
                };
                if gone {
                    st.nodes.remove(&ino);
                }
                ok(0)
            }
            FUSE_FORGET => {
                if let Some(f) = read::<ForgetIn>(op) {
                    Self::forget(&mut self.state.lock().unwrap(), h.nodeid, f.nlookup);
                }
                Outcome::NoReply
            }
            FUSE_BATCH_FORGET => {
                if let Some(b) = read::<BatchForgetIn>(op) {
                    let mut st = self.state.lock().unwrap();
                    for i in 0..b.count as usize {
                        let at = i * size_of::<ForgetOne>();
                        match rest.get(at..).and_then(read::<ForgetOne>) {
                            Some(f) => Self::forget(&mut st, f.nodeid, f.nlookup),
                            None => break,
                        }
                    }
                }
                Outcome::NoReply
            }
            FUSE_INTERRUPT => Outcome::NoReply, // every request is answered promptly anyway
            FUSE_STATFS => {
                let st = self.state.lock().unwrap();
                let k = Kstatfs {
                    blocks: 1 << 30,
                    bfree: 1 << 30,
                    bavail: 1 << 30,
                    files: 1 << 20,
                    ffree: (1u64 << 20).saturating_sub(st.nodes.len() as u64),
                    bsize: 4096,
                    namelen: 255,
                    frsize: 4096,
                    ..zeroed()
                };
                ok(put(out, 0, &k))
            }
            FUSE_GETXATTR | FUSE_LISTXATTR => errno(libc::ENOSYS),
            _ => errno(libc::ENOSYS),
        }
    }

    fn init(&self, op: &[u8], out: &mut [u8]) -> Outcome {
        let Some(i) = read::<InitIn>(op) else { return errno(libc::EINVAL) };
        if i.major != FUSE_KERNEL_VERSION {
            return errno(libc::EPROTO);
        }
        let mut offered = i.flags as u64;
        if offered & FUSE_INIT_EXT != 0 {
            offered |= (i.flags2 as u64) << 32;
        }
        self.kernel_init_flags.store(offered, Ordering::Relaxed);
        self.kernel_minor.store(i.minor as u64, Ordering::Relaxed);
        let mut want = FUSE_BIG_WRITES | FUSE_MAX_PAGES | FUSE_INIT_EXT;
        if self.want_uring {
            want |= FUSE_OVER_IO_URING;
        }
        let flags = offered & want;
        self.granted_uring.store(((flags & FUSE_OVER_IO_URING) != 0) as u64, Ordering::Relaxed);
        let o = InitOut {
            major: FUSE_KERNEL_VERSION,
            minor: i.minor.min(45),
            max_readahead: i.max_readahead,
            flags: flags as u32,
            max_background: 16,
            congestion_threshold: 12,
            max_write: MAX_WRITE,
            time_gran: 1,
            max_pages: MAX_PAGES,
            flags2: (flags >> 32) as u32,
            ..zeroed()
        };
        ok(put(out, 0, &o))
    }
}
