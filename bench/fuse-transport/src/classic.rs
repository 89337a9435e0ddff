//! Classic transport: read(2) a request from /dev/fuse, handle it, writev(2)
//! the reply.

use crate::abi::*;
use crate::daemon::Control;
use crate::fs::{Fs, Outcome, Via};
use std::io;
use std::mem::size_of;
use std::os::fd::RawFd;

pub const READ_BUF: usize = crate::fs::MAX_WRITE as usize + 4096;

/// Clone a /dev/fuse fd for another reader thread (FUSE_DEV_IOC_CLONE).
pub fn clone_fd(fd: RawFd) -> io::Result<RawFd> {
    // SAFETY: plain open(2)/ioctl(2) on valid arguments.
    unsafe {
        let n = libc::open(c"/dev/fuse".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC);
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let src: u32 = fd as u32;
        if libc::ioctl(n, FUSE_DEV_IOC_CLONE, &src as *const u32) < 0 {
            let e = io::Error::last_os_error();
            libc::close(n);
            return Err(e);
        }
        Ok(n)
    }
}

pub enum Step {
    Handled(u32),
    Retry,
    Gone,
}

/// Read one request and answer it. `buf` >= READ_BUF, `out` >= MAX_WRITE.
pub fn serve_one(fd: RawFd, fs: &Fs, buf: &mut [u8], out: &mut [u8]) -> io::Result<Step> {
    // SAFETY: buf is a valid writable buffer of buf.len() bytes.
    let n = unsafe { libc::read(fd, buf.as_mut_ptr() as *mut libc::c_void, buf.len()) };
    if n < 0 {
        let e = io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::EINTR) | Some(libc::EAGAIN) | Some(libc::ENOENT) => Ok(Step::Retry),
            Some(libc::ENODEV) | Some(libc::ECONNABORTED) => Ok(Step::Gone),
            _ => Err(e),
        };
    }
    let n = n as usize;
    let Some(h) = read::<InHeader>(&buf[..n]) else {
        return Err(io::Error::other(format!("short read from /dev/fuse: {n} bytes")));
    };
    let args = &buf[size_of::<InHeader>()..n];
    let hs = op_header_size(h.opcode).min(args.len());
    let (op, rest) = args.split_at(hs);
    let (error, len) = match fs.handle(Via::Dev, &h, op, rest, out) {
        Outcome::NoReply => return Ok(Step::Handled(h.opcode)),
        Outcome::Reply { error, len } => (error, len),
    };
    let oh = OutHeader { len: (size_of::<OutHeader>() + len) as u32, error, unique: h.unique };
    let iov = [
        libc::iovec { iov_base: &oh as *const OutHeader as *mut libc::c_void, iov_len: size_of::<OutHeader>() },
        libc::iovec { iov_base: out.as_mut_ptr() as *mut libc::c_void, iov_len: len },
    ];
    let cnt = if len == 0 { 1 } else { 2 };
    // SAFETY: both iovecs point to live buffers of the stated lengths.
    let w = unsafe { libc::writev(fd, iov.as_ptr(), cnt) };
    if w < 0 {
        let e = io::Error::last_os_error();
        return match e.raw_os_error() {
            // request was interrupted/aborted meanwhile: harmless
            Some(libc::ENOENT) | Some(libc::EINTR) => Ok(Step::Handled(h.opcode)),
            Some(libc::ENODEV) | Some(libc::ECONNABORTED) => Ok(Step::Gone),
            _ => Err(io::Error::new(e.kind(), format!("writev reply to {}: {e}", opcode_name(h.opcode)))),
        };
    }
    Ok(Step::Handled(h.opcode))
}

/// Reader thread body: serve until the connection goes away.
pub fn reader_loop(fd: RawFd, fs: &Fs, ctl: &Control) {
    ctl.register_thread();
    let _alive = ctl.thread_guard();
    let mut buf = vec![0u8; READ_BUF];
    let mut out = vec![0u8; READ_BUF];
    loop {
        match serve_one(fd, fs, &mut buf, &mut out) {
            Ok(Step::Handled(_)) | Ok(Step::Retry) => {}
            Ok(Step::Gone) => break,
            Err(e) => {
                ctl.error(format!("/dev/fuse reader: {e}"));
                break;
            }
        }
    }
}
