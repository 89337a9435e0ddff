//! FUSE over io_uring (Linux 6.14 and later, `fs/fuse/dev_uring.c`): requests arrive in
//! ring entries that the daemon registered, one queue per possible CPU, and a reply goes
//! back with the same io_uring command that fetches the entry's next request.
//!
//! Why: with `/dev/fuse`, each request wakes whichever reader thread waits first, often on
//! the other CPU, and costs a `read` and a `writev`. A ring queue serves the requests of
//! the CPU the application runs on, from a thread pinned to that CPU, with one system call
//! per request (docs: ferryfs's docs/benchmarks.md, "FUSE over io_uring").
//!
//! The kernel offers it only when the `fuse` module's `enable_uring` parameter is on, and a
//! file system asks for it by adding `InitFlags::FUSE_OVER_IO_URING` in `init`. What the
//! ring does not carry (FORGET, BATCH_FORGET, INTERRUPT, and everything before the ring is
//! ready) still comes through `/dev/fuse`, so the classic threads keep running beside it.
//!
//! The memory of an entry: a 288-byte header (`struct fuse_uring_req_header`: the
//! `fuse_in_header` or `fuse_out_header` in `in_out`, the op's own header in `op_in`, then
//! `fuse_uring_ent_in_out`) and a payload buffer (the request's further arguments, or the
//! reply's). The payload sits [`GAP`] bytes into a larger buffer; the request's headers are
//! copied into the gap in front of it, so the parser sees one contiguous request, as read
//! from `/dev/fuse`, without copying the payload (a write's data).

use std::alloc::{Layout, alloc_zeroed, dealloc};
use std::io::{self, IoSlice};
use std::mem::size_of;
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use io_uring::{IoUring, cqueue, opcode, squeue, types};
use log::{debug, error, warn};
use parking_lot::Mutex;

use crate::Errno;
use crate::Filesystem;
use crate::channel::Channel;
use crate::ll;
use crate::reply::{Reply, ReplyEmpty, ReplyRaw, ReplySender};
use crate::request::RequestWithSender;
use crate::session::SessionEventLoop;

const CMD_REGISTER: u32 = 1;
const CMD_COMMIT_AND_FETCH: u32 = 2;
const IN_HEADER_BYTES: usize = 40;
const OUT_HEADER_BYTES: usize = 16;
const OP_IN_BYTES: usize = 128;
/// Room in front of the payload for a request's `fuse_in_header` and its op header.
const GAP: usize = 256;
/// Where `__u32 len` sits in `struct io_uring_sqe` (the io-uring crate has no setter for it
/// on a command, and REGISTER needs it: the number of iovecs).
const SQE_LEN_OFFSET: usize = 24;
/// How long a queue thread waits for a completion before it looks at the stop flag.
const WAIT_SECS: u64 = 1;
/// The user data of the no-op that wakes a queue's thread for a handed-over commit.
const WAKE: u64 = u64::MAX;

/// `struct fuse_uring_ent_in_out`.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct EntInOut {
    flags: u64,
    commit_id: u64,
    payload_sz: u32,
    padding: u32,
    reserved: u64,
}

/// `struct fuse_uring_req_header`.
#[repr(C)]
struct ReqHeader {
    in_out: [u8; 128],
    op_in: [u8; OP_IN_BYTES],
    ent: EntInOut,
}

/// `struct fuse_uring_cmd_req`, in the command area of the SQE.
#[repr(C)]
struct CmdReq {
    flags: u64,
    commit_id: u64,
    qid: u16,
    padding: [u8; 6],
}

const _: () = assert!(size_of::<EntInOut>() == 32);
const _: () = assert!(size_of::<ReqHeader>() == 288);
const _: () = assert!(size_of::<CmdReq>() == 24);
const _: () = assert!(size_of::<squeue::Entry128>() == 128);
const _: () = assert!(IN_HEADER_BYTES == size_of::<ll::fuse_abi::fuse_in_header>());
const _: () = assert!(GAP >= IN_HEADER_BYTES + OP_IN_BYTES && GAP % 8 == 0);

/// The possible CPUs (`/sys/devices/system/cpu/possible`): the kernel makes a queue for each.
pub(crate) fn possible_cpus() -> io::Result<Vec<u16>> {
    let s = std::fs::read_to_string("/sys/devices/system/cpu/possible")?;
    let mut cpus = Vec::new();
    for part in s.trim().split(',').filter(|p| !p.is_empty()) {
        let bad = || io::Error::new(io::ErrorKind::InvalidData, format!("possible CPUs: {s:?}"));
        let (a, b) = part.split_once('-').unwrap_or((part, part));
        let (a, b): (u16, u16) = (a.parse().map_err(|_| bad())?, b.parse().map_err(|_| bad())?);
        cpus.extend(a..=b);
    }
    Ok(cpus)
}

/// An entry's memory. The kernel holds raw pointers to it from REGISTER until the entry
/// comes back cancelled, so it never moves, and it is freed only with its queue.
struct EntryMem {
    hdr: *mut ReqHeader,
    /// [`GAP`] bytes, then the payload.
    buf: *mut u8,
    payload_len: usize,
    iov: Box<[libc::iovec; 2]>,
}

impl EntryMem {
    fn layout(payload_len: usize) -> Layout {
        Layout::from_size_align(GAP + payload_len, 4096).expect("entry layout")
    }

    fn new(payload_len: usize) -> EntryMem {
        // SAFETY: the header is plain data, all zeros is a valid value.
        let hdr = Box::into_raw(Box::new(unsafe { std::mem::zeroed::<ReqHeader>() }));
        // SAFETY: the layout's size is not zero.
        let buf = unsafe { alloc_zeroed(Self::layout(payload_len)) };
        if buf.is_null() {
            std::alloc::handle_alloc_error(Self::layout(payload_len));
        }
        let iov = Box::new([
            libc::iovec { iov_base: hdr.cast(), iov_len: size_of::<ReqHeader>() },
            // SAFETY: inside the allocation.
            libc::iovec { iov_base: unsafe { buf.add(GAP) }.cast(), iov_len: payload_len },
        ]);
        EntryMem { hdr, buf, payload_len, iov }
    }

    fn payload(&self) -> *mut u8 {
        // SAFETY: inside the allocation.
        unsafe { self.buf.add(GAP) }
    }
}

impl Drop for EntryMem {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with these layouts; dropped only with the queue, once
        // the kernel gave every entry back (or never, see `serve`).
        unsafe {
            drop(Box::from_raw(self.hdr));
            dealloc(self.buf, Self::layout(self.payload_len));
        }
    }
}

#[derive(Default)]
struct EntryState {
    commit_id: u64,
    /// The queue thread is dispatching this entry's request.
    dispatching: bool,
    /// ... and the request's bytes in the payload are borrowed meanwhile.
    payload_borrowed: bool,
    /// A reply given while the payload was borrowed, sent once the dispatch returns.
    stash: Option<Vec<u8>>,
}

struct Entry {
    mem: EntryMem,
    state: Mutex<EntryState>,
}

/// One queue: its ring and its entries.
pub(crate) struct RingQueue {
    qid: u16,
    fd: RawFd,
    ring: IoUring<squeue::Entry128, cqueue::Entry>,
    /// Pushes to the submission queue, from the queue thread and from any thread that
    /// replies later.
    sq: Mutex<()>,
    entries: Vec<Entry>,
    /// The thread that waits for the queue's completions.
    owner: std::sync::OnceLock<std::thread::ThreadId>,
    /// Replies given on other threads, for the queue's thread to commit.
    handoff: Mutex<Vec<(usize, u64)>>,
}

// SAFETY: the raw pointers of the entries point to memory owned by the queue; the entries'
// state is behind a mutex, and the submission queue is only pushed to under `sq`. The
// completion queue is read only by the queue's own thread (`serve`).
unsafe impl Send for RingQueue {}
unsafe impl Sync for RingQueue {}

/// Where a reply goes: an entry of a queue.
#[derive(Clone)]
pub(crate) struct RingSlot {
    queue: Arc<RingQueue>,
    entry: usize,
}

impl std::fmt::Debug for RingSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RingSlot(queue {}, entry {})", self.queue.qid, self.entry)
    }
}

impl RingSlot {
    /// Send the reply `bufs` (a `fuse_out_header`, then its arguments).
    pub(crate) fn reply(&self, bufs: &[IoSlice<'_>]) -> io::Result<()> {
        let q = &self.queue;
        let mut st = q.entries[self.entry].state.lock();
        if st.dispatching && st.payload_borrowed {
            // The dispatch still reads the request's payload, where the reply goes: keep it
            // until the dispatch returns.
            st.stash = Some(bufs.iter().map(|b| &b[..]).collect::<Vec<_>>().concat());
            return Ok(());
        }
        let commit_id = st.commit_id;
        drop(st);
        q.write_reply(self.entry, bufs)?;
        q.commit(self.entry, commit_id)
    }

    /// Send a reply of at most `max` bytes that `fill` writes straight into the entry's
    /// payload. Gives `fill` back if the reply does not fit, or if the request's own bytes
    /// there are still being read (the caller then fills a buffer of its own).
    pub(crate) fn reply_filled<F>(&self, unique: ll::RequestId, max: usize, fill: F) -> Result<io::Result<()>, F>
    where
        F: FnOnce(&mut [u8]) -> Result<usize, Errno>,
    {
        let q = &self.queue;
        let e = &q.entries[self.entry];
        let commit_id = {
            let st = e.state.lock();
            if max > e.mem.payload_len || (st.dispatching && st.payload_borrowed) {
                return Err(fill);
            }
            st.commit_id
        };
        // SAFETY: the entry's own memory, alive as long as the queue (held by `self`); the
        // kernel does not touch it until the commit, and a request gets one reply, so
        // nothing else writes to it meanwhile.
        let payload = unsafe { std::slice::from_raw_parts_mut(e.mem.payload(), max) };
        let (len, error) = match fill(payload) {
            Ok(n) => (n.min(max), 0),
            Err(e) => (0, -e.code()),
        };
        let mut header = [0u8; OUT_HEADER_BYTES];
        header[..4].copy_from_slice(&((OUT_HEADER_BYTES + len) as u32).to_ne_bytes());
        header[4..8].copy_from_slice(&error.to_ne_bytes());
        header[8..].copy_from_slice(&unique.0.to_ne_bytes());
        // SAFETY: 16 of the header's 128 bytes, untouched by the kernel until the commit.
        unsafe {
            (&mut (*e.mem.hdr).in_out)[..OUT_HEADER_BYTES].copy_from_slice(&header);
            (*e.mem.hdr).ent.payload_sz = len as u32;
        }
        Ok(q.commit(self.entry, commit_id))
    }
}

impl RingQueue {
    fn new(fd: RawFd, qid: u16, entries: usize, payload_len: usize) -> io::Result<RingQueue> {
        let depth = (entries * 2).next_power_of_two() as u32;
        // Room in the completion queue for every entry and for a burst of wake-ups (one per
        // reply handed over), so that it does not overflow.
        let ring = IoUring::<squeue::Entry128, cqueue::Entry>::builder().setup_cqsize(depth * 8).build(depth)?;
        let entries = (0..entries)
            .map(|_| Entry { mem: EntryMem::new(payload_len), state: Mutex::new(EntryState::default()) })
            .collect();
        Ok(RingQueue { qid, fd, ring, sq: Mutex::new(()), entries, owner: std::sync::OnceLock::new(), handoff: Mutex::new(Vec::new()) })
    }

    fn command(&self, op: u32, commit_id: u64, entry: usize, iov: Option<&[libc::iovec; 2]>) -> squeue::Entry128 {
        let req = CmdReq { flags: 0, commit_id, qid: self.qid, padding: [0; 6] };
        let mut cmd = [0u8; 80];
        // SAFETY: CmdReq is plain data of 24 bytes.
        cmd[..size_of::<CmdReq>()].copy_from_slice(unsafe {
            std::slice::from_raw_parts((&req as *const CmdReq).cast::<u8>(), size_of::<CmdReq>())
        });
        let mut b = opcode::UringCmd80::new(types::Fd(self.fd), op).cmd(cmd);
        if let Some(iov) = iov {
            b = b.addr(Some(iov.as_ptr() as u64));
        }
        let sqe = b.build().user_data(entry as u64);
        let Some(iov) = iov else { return sqe };
        // SAFETY: Entry128 is 128 bytes of plain data (`struct io_uring_sqe` and 64 more
        // bytes of command), any bytes are a valid value.
        let mut raw: [u8; 128] = unsafe { std::mem::transmute(sqe) };
        raw[SQE_LEN_OFFSET..SQE_LEN_OFFSET + 4].copy_from_slice(&(iov.len() as u32).to_ne_bytes());
        unsafe { std::mem::transmute::<[u8; 128], squeue::Entry128>(raw) }
    }

    /// Push `sqe` and submit it; on the queue's own thread (`own`), only push it: its next
    /// wait submits it, in the same system call.
    ///
    /// A command pushed is never lost: if the kernel refuses to take it now (EBUSY: the
    /// completion queue overflowed until the queue's thread reaps it; EAGAIN), it stays in
    /// the submission queue, and the queue's thread submits it with its next wait.
    fn submit(&self, sqe: &squeue::Entry128, own: bool) -> io::Result<()> {
        let _sq = self.sq.lock();
        loop {
            // SAFETY: pushes happen only under `sq`; the command's pointers (REGISTER's
            // iovecs) live as long as the queue.
            let pushed = unsafe { self.ring.submission_shared().push(sqe) };
            if pushed.is_ok() {
                break;
            }
            // Full: only a submission makes room (the queue's thread reaps meanwhile).
            match self.ring.submit() {
                Ok(_) => {}
                Err(e) if !own && is_busy(&e) => std::thread::sleep(std::time::Duration::from_micros(100)),
                Err(e) => return Err(e),
            }
        }
        if !own {
            match self.ring.submit() {
                Ok(_) => {}
                Err(e) if is_busy(&e) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Send entry `entry`'s reply back and fetch its next request. Only the queue's own
    /// thread issues the command: the kernel delivers the entry's next request by task work
    /// of the task that issued it, and a thread that replied from elsewhere (an fsync done
    /// on a worker) may be asleep by then. Another thread hands the commit over and wakes
    /// the queue's thread with a no-op.
    fn commit(&self, entry: usize, commit_id: u64) -> io::Result<()> {
        if self.owner.get() == Some(&std::thread::current().id()) {
            return self.submit(&self.command(CMD_COMMIT_AND_FETCH, commit_id, entry, None), true);
        }
        self.handoff.lock().push((entry, commit_id));
        self.submit(&opcode::Nop::new().build().user_data(WAKE).into(), false)
    }

    /// Commit what other threads handed over (on the queue's own thread).
    fn take_handoff(&self) -> io::Result<()> {
        let handed = std::mem::take(&mut *self.handoff.lock());
        for (entry, commit_id) in handed {
            self.submit(&self.command(CMD_COMMIT_AND_FETCH, commit_id, entry, None), true)?;
        }
        Ok(())
    }

    /// Write a reply into entry `entry`: its `fuse_out_header` into the header, the rest
    /// into the payload.
    fn write_reply(&self, entry: usize, bufs: &[IoSlice<'_>]) -> io::Result<()> {
        let mem = &self.entries[entry].mem;
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        if total < OUT_HEADER_BYTES || total - OUT_HEADER_BYTES > mem.payload_len {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("a reply of {total} bytes does not fit an io_uring entry"),
            ));
        }
        let mut at = 0;
        for b in bufs {
            let mut rest: &[u8] = b;
            // SAFETY: the header part stays inside `in_out` (16 of its 128 bytes), the
            // payload part inside the payload (checked above); the kernel does not touch the
            // entry until it is committed.
            unsafe {
                if at < OUT_HEADER_BYTES {
                    let n = rest.len().min(OUT_HEADER_BYTES - at);
                    std::ptr::copy_nonoverlapping(rest.as_ptr(), (*mem.hdr).in_out.as_mut_ptr().add(at), n);
                    at += n;
                    rest = &rest[n..];
                }
                std::ptr::copy_nonoverlapping(rest.as_ptr(), mem.payload().add(at - OUT_HEADER_BYTES), rest.len());
            }
            at += rest.len();
        }
        // SAFETY: as above.
        unsafe { (*mem.hdr).ent.payload_sz = (total - OUT_HEADER_BYTES) as u32 };
        Ok(())
    }
}

/// How a session runs its io_uring queues.
#[derive(Debug)]
pub(crate) struct UringParams {
    pub(crate) entries: usize,
    pub(crate) payload_len: usize,
}

/// Register the queue of CPU `qid`; runs on its own thread, pinned to that CPU. Returns
/// once the connection ends (every entry came back cancelled) or `stop` is set.
pub(crate) fn serve<FS: Filesystem>(
    ch: &Channel,
    qid: u16,
    params: &UringParams,
    se: &SessionEventLoop<FS>,
    stop: &AtomicBool,
    requests: &AtomicU64,
) -> io::Result<()> {
    // On the CPU whose requests it serves: measured against no pinning and against the
    // other CPU's, this was the fastest by far (docs/benchmarks.md of ferryfs).
    pin_to_cpu(qid);
    let q = Arc::new(RingQueue::new(ch.as_fd().as_raw_fd(), qid, params.entries, params.payload_len)?);
    let mut live = 0;
    let res = run_queue(ch, &q, se, stop, requests, &mut live);
    if live > 0 {
        // The kernel may still write into the entries: never free them.
        std::mem::forget(q);
    }
    debug!("io_uring queue {qid} stopped");
    res
}

/// Register the entries of `q` and serve them; `live` counts the entries the kernel holds.
fn run_queue<FS: Filesystem>(
    ch: &Channel,
    q: &Arc<RingQueue>,
    se: &SessionEventLoop<FS>,
    stop: &AtomicBool,
    requests: &AtomicU64,
    live: &mut usize,
) -> io::Result<()> {
    for (i, e) in q.entries.iter().enumerate() {
        // Before the thread owns the queue: each is submitted at once.
        q.submit(&q.command(CMD_REGISTER, 0, i, Some(&e.mem.iov)), false)?;
        *live += 1;
    }
    q.owner.set(std::thread::current().id()).expect("one owner");
    let wait = types::Timespec::new().sec(WAIT_SECS);
    let args = types::SubmitArgs::new().timespec(&wait);
    let mut done = Vec::with_capacity(q.entries.len());
    while *live > 0 && !stop.load(Ordering::Acquire) {
        match q.ring.submitter().submit_with_args(1, &args) {
            Ok(_) => {}
            Err(e) if matches!(e.raw_os_error(), Some(libc::ETIME | libc::EINTR | libc::EBUSY)) => {}
            Err(e) => return Err(e),
        }
        // SAFETY: only this thread reads the completion queue.
        done.extend(unsafe { q.ring.completion_shared() }.map(|c| (c.user_data() as usize, c.result())));
        q.take_handoff()?;
        for (entry, res) in done.drain(..) {
            if entry as u64 == WAKE {
                continue;
            }
            if res < 0 {
                // Cancelled at the connection's end; anything else means the kernel gave up
                // on the entry (it then serves through /dev/fuse).
                *live -= 1;
                if res != -libc::ENOTCONN && res != -libc::ECANCELED {
                    warn!("io_uring queue {}: entry {entry} ended: {}", q.qid, io::Error::from_raw_os_error(-res));
                }
                continue;
            }
            requests.fetch_add(1, Ordering::Relaxed);
            handle(ch, q, entry, se);
        }
    }
    Ok(())
}

/// Dispatch the request in entry `entry`, and send the reply that was kept while it ran.
fn handle<FS: Filesystem>(ch: &Channel, q: &Arc<RingQueue>, entry: usize, se: &SessionEventLoop<FS>) {
    let mem = &q.entries[entry].mem;
    // SAFETY: the kernel does not touch the entry between the completion and the commit.
    let (in_out, op_in, ent) = unsafe { ((*mem.hdr).in_out, (*mem.hdr).op_in, (*mem.hdr).ent) };
    let len = u32::from_ne_bytes(in_out[..4].try_into().expect("4 bytes")) as usize;
    let unique = u64::from_ne_bytes(in_out[8..16].try_into().expect("8 bytes"));
    let payload = ent.payload_sz as usize;
    {
        let mut st = q.entries[entry].state.lock();
        *st = EntryState { commit_id: ent.commit_id, dispatching: true, payload_borrowed: payload > 0, stash: None };
    }
    let slot = RingSlot { queue: q.clone(), entry };
    let op = len.checked_sub(IN_HEADER_BYTES + payload).filter(|&op| op <= OP_IN_BYTES && payload <= mem.payload_len);
    let mut scratch: Vec<u64> = Vec::new();
    let request = op.map(|op| {
        if op % 8 == 0 {
            // SAFETY: the gap is ours (the kernel writes only the payload after it), and
            // `start` is 8-aligned as the parser wants; the slice ends inside the payload
            // the kernel filled.
            unsafe {
                let start = mem.buf.add(GAP - IN_HEADER_BYTES - op);
                std::ptr::copy_nonoverlapping(in_out.as_ptr(), start, IN_HEADER_BYTES);
                std::ptr::copy_nonoverlapping(op_in.as_ptr(), start.add(IN_HEADER_BYTES), op);
                std::slice::from_raw_parts(start as *const u8, len)
            }
        } else {
            // An op header whose size is not a multiple of 8 (none known): copy it all.
            scratch = vec![0u64; len.div_ceil(8)];
            // SAFETY: `scratch` holds `len` bytes; the payload holds `payload` bytes.
            unsafe {
                let dst = scratch.as_mut_ptr().cast::<u8>();
                std::ptr::copy_nonoverlapping(in_out.as_ptr(), dst, IN_HEADER_BYTES);
                std::ptr::copy_nonoverlapping(op_in.as_ptr(), dst.add(IN_HEADER_BYTES), op);
                std::ptr::copy_nonoverlapping(mem.payload(), dst.add(IN_HEADER_BYTES + op), payload);
                std::slice::from_raw_parts(dst as *const u8, len)
            }
        }
    });
    match request.and_then(|data| RequestWithSender::new(ch.ring_sender(slot.clone()), data)) {
        Some(req) => {
            if let Ok(ll::Operation::Destroy(_)) = req.request.operation() {
                req.reply::<ReplyEmpty>().ok();
            } else {
                req.dispatch(se);
            }
        }
        None => {
            error!("io_uring queue {}: a malformed request ({len} bytes, payload {payload})", q.qid);
            <ReplyRaw as Reply>::new(ll::RequestId(unique), ReplySender::Channel(ch.ring_sender(slot)))
                .error(ll::Errno::EIO);
        }
    }
    drop(scratch);
    let stash = {
        let mut st = q.entries[entry].state.lock();
        st.dispatching = false;
        st.payload_borrowed = false;
        st.stash.take().map(|s| (s, st.commit_id))
    };
    if let Some((reply, commit_id)) = stash {
        let sent = q.write_reply(entry, &[IoSlice::new(&reply)]).and_then(|()| q.commit(entry, commit_id));
        if let Err(e) = sent {
            error!("io_uring queue {}: failed to send a reply: {e}", q.qid);
        }
    }
}

/// The kernel cannot take more submissions now; they stay queued.
fn is_busy(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EBUSY | libc::EAGAIN))
}

fn pin_to_cpu(cpu: u16) {
    // SAFETY: a zeroed cpu_set_t is empty; the call changes the calling thread only.
    let rc = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu as usize, &mut set);
        libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set)
    };
    if rc != 0 {
        warn!("io_uring queue {cpu}: can't pin its thread to CPU {cpu}: {}", io::Error::last_os_error());
    }
}
