//! FUSE-over-io_uring transport (Linux 6.14+, fs/fuse/dev_uring.c).
//!
//! One thread per possible CPU (= kernel queue id), pinned to that CPU, each
//! with its own io_uring using 128-byte SQEs. Every ring entry owns a
//! header buffer (struct fuse_uring_req_header, 288 bytes) and a payload
//! buffer (>= the kernel's max_payload_sz = max(8192, max_write,
//! max_pages * PAGE_SIZE)). REGISTER hands both to the kernel as a 2-element
//! iovec in sqe->addr/sqe->len; its completion carries the first request.
//! Thereafter COMMIT_AND_FETCH returns the reply and waits for the next one.

use crate::abi::*;
use crate::daemon::Control;
use crate::fs::{Fs, Outcome, Via};
use io_uring::{IoUring, cqueue, opcode, squeue, types};
use std::alloc::{Layout, alloc_zeroed, dealloc};
use std::io;
use std::mem::size_of;
use std::os::fd::RawFd;

const _: () = assert!(size_of::<squeue::Entry128>() == 128);
/// Offset of `__u32 len` in struct io_uring_sqe.
const SQE_LEN_OFFSET: usize = 24;

/// CPUs in /sys/devices/system/cpu/possible (the kernel makes one queue per
/// possible CPU and the ring is ready only when every queue has an entry).
pub fn possible_cpus() -> Vec<usize> {
    let s = std::fs::read_to_string("/sys/devices/system/cpu/possible").unwrap_or_else(|_| "0".into());
    let mut v = Vec::new();
    for part in s.trim().split(',') {
        match part.split_once('-') {
            Some((a, b)) => {
                if let (Ok(a), Ok(b)) = (a.parse::<usize>(), b.parse::<usize>()) {
                    v.extend(a..=b);
                }
            }
            None => {
                if let Ok(a) = part.parse() {
                    v.push(a);
                }
            }
        }
    }
    v
}

pub fn pin_to_cpu(cpu: usize) -> io::Result<()> {
    // SAFETY: cpu_set_t is plain data; sched_setaffinity on the calling thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Buffers of one ring entry. The kernel keeps raw user pointers to them
/// from REGISTER until the ring is torn down, so they must never move and
/// are only freed once the kernel has given the entry back.
struct EntryBufs {
    hdr: *mut UringReqHeader,
    payload: *mut u8,
    payload_len: usize,
    iov: Box<[libc::iovec; 2]>,
}

impl EntryBufs {
    fn new(payload_len: usize) -> EntryBufs {
        let hdr = Box::into_raw(Box::new(zeroed::<UringReqHeader>()));
        let layout = Layout::from_size_align(payload_len, 4096).expect("layout");
        // SAFETY: non-zero size layout.
        let payload = unsafe { alloc_zeroed(layout) };
        assert!(!payload.is_null(), "out of memory");
        let iov = Box::new([
            libc::iovec { iov_base: hdr as *mut libc::c_void, iov_len: size_of::<UringReqHeader>() },
            libc::iovec { iov_base: payload as *mut libc::c_void, iov_len: payload_len },
        ]);
        EntryBufs { hdr, payload, payload_len, iov }
    }
}

impl Drop for EntryBufs {
    fn drop(&mut self) {
        // SAFETY: allocated in new() with the same layout; only dropped when
        // the kernel no longer references the entry.
        unsafe {
            drop(Box::from_raw(self.hdr));
            dealloc(self.payload, Layout::from_size_align(self.payload_len, 4096).unwrap());
        }
    }
}

fn uring_cmd(
    fd: RawFd,
    cmd_op: u32,
    qid: u16,
    commit_id: u64,
    iov: Option<&[libc::iovec; 2]>,
    ud: u64,
) -> squeue::Entry128 {
    let req = UringCmdReq { flags: 0, commit_id, qid, padding: [0; 6] };
    let mut cmd = [0u8; 80];
    put(&mut cmd, 0, &req);
    let mut b = opcode::UringCmd80::new(types::Fd(fd), cmd_op).cmd(cmd);
    if let Some(iov) = iov {
        b = b.addr(Some(iov.as_ptr() as u64));
    }
    let e = b.build().user_data(ud);
    if iov.is_none() {
        return e;
    }
    // The io-uring crate has no setter for sqe->len on UringCmd80, but the
    // kernel's REGISTER requires len == 2 (number of iovecs). Patch the raw
    // SQE bytes: Entry128 is #[repr(C)] (struct io_uring_sqe + 64 cmd bytes).
    // SAFETY: Entry128 is 128 bytes of plain data (asserted above).
    let mut raw: [u8; 128] = unsafe { std::mem::transmute(e) };
    raw[SQE_LEN_OFFSET..SQE_LEN_OFFSET + 4].copy_from_slice(&2u32.to_ne_bytes());
    // SAFETY: same size, and any byte pattern is a valid Entry128.
    unsafe { std::mem::transmute::<[u8; 128], squeue::Entry128>(raw) }
}

pub struct QueueConfig {
    pub fd: RawFd,
    pub qid: u16,
    pub cpu: usize,
    pub entries: usize,
    pub payload_len: usize,
}

/// Handle the request sitting in entry `e`; write the reply into the same
/// entry; return the commit id.
fn handle_entry(e: &EntryBufs, fs: &Fs, out: &mut [u8]) -> u64 {
    // SAFETY: after the CQE the kernel does not touch the entry until we
    // submit COMMIT_AND_FETCH; we copy the header out first.
    let hdr: UringReqHeader = unsafe { std::ptr::read(e.hdr) };
    let h = read::<InHeader>(&hdr.in_out).expect("in_out holds a fuse_in_header");
    let io = hdr.ring_ent_in_out;
    let hs = op_header_size(h.opcode).min(FUSE_URING_OP_IN_OUT_SZ);
    let psz = (io.payload_sz as usize).min(e.payload_len);
    if size_of::<InHeader>() + hs + psz != h.len as usize {
        fs.stats.ring_len_mismatch.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        fs.stats.ring_len_mismatch_op.store(h.opcode as u64, std::sync::atomic::Ordering::Relaxed);
    }
    let (error, len) = {
        // SAFETY: payload buffer is ours until commit; psz <= payload_len.
        let rest = unsafe { std::slice::from_raw_parts(e.payload, psz) };
        match fs.handle(Via::Ring, &h, &hdr.op_in[..hs], rest, out) {
            Outcome::Reply { error, len } => (error, len),
            // Every ring request needs a commit; FORGET/INTERRUPT never come
            // through the ring (they stay on /dev/fuse), so this is defensive.
            Outcome::NoReply => (-libc::ENOSYS, 0),
        }
    };
    let len = if error != 0 { 0 } else { len.min(e.payload_len) };
    let oh = OutHeader { len: (size_of::<OutHeader>() + len) as u32, error, unique: h.unique };
    // SAFETY: writes into our own entry buffers, sizes checked.
    unsafe {
        std::ptr::copy_nonoverlapping(out.as_ptr(), e.payload, len);
        let hp = e.hdr;
        std::ptr::copy_nonoverlapping(bytes(&oh).as_ptr(), (*hp).in_out.as_mut_ptr(), size_of::<OutHeader>());
        (*hp).ring_ent_in_out.payload_sz = len as u32;
    }
    io.commit_id
}

/// Queue thread body. Sends Ok(()) on `ready` once its REGISTERs are in the
/// kernel without immediate error, or Err(description).
pub fn queue_loop(cfg: QueueConfig, fs: &Fs, ctl: &Control, ready: std::sync::mpsc::Sender<Result<(), String>>) {
    ctl.register_thread();
    let _alive = ctl.thread_guard();
    let res = run_queue(&cfg, fs, ctl, &ready);
    if let Err(e) = res {
        let msg = format!("uring queue {}: {e}", cfg.qid);
        let _ = ready.send(Err(msg.clone()));
        ctl.error(msg);
    }
}

fn run_queue(
    cfg: &QueueConfig,
    fs: &Fs,
    ctl: &Control,
    ready: &std::sync::mpsc::Sender<Result<(), String>>,
) -> io::Result<()> {
    if let Err(e) = pin_to_cpu(cfg.cpu) {
        eprintln!("warning: pin queue {} to cpu {}: {e}", cfg.qid, cfg.cpu);
    }
    let depth = (cfg.entries * 2).next_power_of_two() as u32;
    let mut ring: IoUring<squeue::Entry128, cqueue::Entry> = IoUring::builder().build(depth)?;
    let bufs: Vec<EntryBufs> = (0..cfg.entries).map(|_| EntryBufs::new(cfg.payload_len)).collect();
    for (i, b) in bufs.iter().enumerate() {
        let sqe = uring_cmd(cfg.fd, FUSE_IO_URING_CMD_REGISTER, cfg.qid, 0, Some(&b.iov), i as u64);
        // SAFETY: the iovec and the buffers it points to outlive the ring use.
        unsafe { ring.submission().push(&sqe) }.map_err(|_| io::Error::other("SQ full"))?;
    }
    ring.submit()?;
    // REGISTER normally stays pending (-EIOCBQUEUED) until a request comes;
    // validation errors complete immediately.
    let mut live = cfg.entries;
    let mut first_err = None;
    let mut pending: Vec<(u64, i32)> = Vec::new();
    for c in ring.completion() {
        pending.push((c.user_data(), c.result()));
    }
    for &(ud, res) in &pending {
        if res < 0 {
            live -= 1;
            first_err.get_or_insert(format!(
                "FUSE_IO_URING_CMD_REGISTER entry {ud} failed: {} ({})",
                io::Error::from_raw_os_error(-res),
                res
            ));
        }
    }
    if let Some(e) = first_err {
        if live > 0 {
            // Other entries are still registered in the kernel: keep buffers.
            std::mem::forget(bufs);
        }
        return Err(io::Error::other(e));
    }
    let _ = ready.send(Ok(()));

    let mut out = vec![0u8; cfg.payload_len];
    let ts = types::Timespec::new().sec(1);
    let args = types::SubmitArgs::new().timespec(&ts);
    let mut unexpected: Option<String> = None;
    // `pending` currently holds only non-error completions (none in practice).
    pending.retain(|&(_, r)| r >= 0);
    while live > 0 {
        for (ud, res) in pending.drain(..) {
            if res < 0 {
                live -= 1;
                if res != -libc::ENOTCONN && res != -libc::ECANCELED && unexpected.is_none() {
                    unexpected =
                        Some(format!("entry {ud} completed with {} ({res})", io::Error::from_raw_os_error(-res)));
                }
                continue;
            }
            let commit_id = handle_entry(&bufs[ud as usize], fs, &mut out);
            let sqe = uring_cmd(cfg.fd, FUSE_IO_URING_CMD_COMMIT_AND_FETCH, cfg.qid, commit_id, None, ud);
            // SAFETY: COMMIT_AND_FETCH carries no user pointers.
            while unsafe { ring.submission().push(&sqe) }.is_err() {
                ring.submit()?;
            }
        }
        if live == 0 {
            break;
        }
        match ring.submitter().submit_with_args(1, &args) {
            Ok(_) => {}
            Err(e) if matches!(e.raw_os_error(), Some(libc::ETIME) | Some(libc::EINTR) | Some(libc::EBUSY)) => {}
            Err(e) => return Err(e),
        }
        if ctl.force_stop() {
            std::mem::forget(bufs);
            return Err(io::Error::other(format!("forced stop with {live} entries still in the kernel")));
        }
        for c in ring.completion() {
            pending.push((c.user_data(), c.result()));
        }
    }
    drop(ring);
    drop(bufs);
    match unexpected {
        Some(u) => Err(io::Error::other(u)),
        None => Ok(()),
    }
}
