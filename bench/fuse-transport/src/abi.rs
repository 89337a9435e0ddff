//! Raw FUSE kernel ABI (include/uapi/linux/fuse.h, protocol 7.42+ for the
//! io_uring parts). Every struct is #[repr(C)] and its size is checked at
//! compile time against the kernel header.

#![allow(dead_code)]

use std::mem::size_of;

/// Marker for plain-old-data wire structs: #[repr(C)], only integer fields,
/// no implicit padding, every bit pattern valid.
///
/// # Safety
/// Implement only for types meeting the above.
pub unsafe trait Wire: Copy + Sized {}

/// Read a wire struct from the front of `b` (unaligned).
pub fn read<T: Wire>(b: &[u8]) -> Option<T> {
    if b.len() < size_of::<T>() {
        return None;
    }
    // SAFETY: length checked; T is Wire so any bytes are a valid T.
    Some(unsafe { std::ptr::read_unaligned(b.as_ptr() as *const T) })
}

/// View a wire struct as bytes.
pub fn bytes<T: Wire>(t: &T) -> &[u8] {
    // SAFETY: T is Wire (no padding), so all size_of::<T>() bytes are initialised.
    unsafe { std::slice::from_raw_parts(t as *const T as *const u8, size_of::<T>()) }
}

/// Write a wire struct at `out[at..]`, returning the end offset.
pub fn put<T: Wire>(out: &mut [u8], at: usize, t: &T) -> usize {
    let b = bytes(t);
    out[at..at + b.len()].copy_from_slice(b);
    at + b.len()
}

/// An all-zero wire struct (valid for every Wire type).
pub fn zeroed<T: Wire>() -> T {
    // SAFETY: Wire types accept every bit pattern, including all zeros.
    unsafe { std::mem::zeroed() }
}

macro_rules! wire {
    ($(#[$m:meta])* $name:ident, $size:expr, { $($field:ident : $ty:ty),* $(,)? }) => {
        $(#[$m])*
        #[repr(C)]
        #[derive(Clone, Copy, Debug)]
        pub struct $name { $(pub $field: $ty),* }
        unsafe impl Wire for $name {}
        const _: () = assert!(size_of::<$name>() == $size);
    };
}

pub const FUSE_KERNEL_VERSION: u32 = 7;
pub const FUSE_ROOT_ID: u64 = 1;

// opcodes
pub const FUSE_LOOKUP: u32 = 1;
pub const FUSE_FORGET: u32 = 2;
pub const FUSE_GETATTR: u32 = 3;
pub const FUSE_SETATTR: u32 = 4;
pub const FUSE_MKNOD: u32 = 8;
pub const FUSE_MKDIR: u32 = 9;
pub const FUSE_UNLINK: u32 = 10;
pub const FUSE_RMDIR: u32 = 11;
pub const FUSE_OPEN: u32 = 14;
pub const FUSE_READ: u32 = 15;
pub const FUSE_WRITE: u32 = 16;
pub const FUSE_STATFS: u32 = 17;
pub const FUSE_RELEASE: u32 = 18;
pub const FUSE_FSYNC: u32 = 20;
pub const FUSE_GETXATTR: u32 = 22;
pub const FUSE_LISTXATTR: u32 = 23;
pub const FUSE_FLUSH: u32 = 25;
pub const FUSE_INIT: u32 = 26;
pub const FUSE_OPENDIR: u32 = 27;
pub const FUSE_READDIR: u32 = 28;
pub const FUSE_RELEASEDIR: u32 = 29;
pub const FUSE_ACCESS: u32 = 34;
pub const FUSE_CREATE: u32 = 35;
pub const FUSE_INTERRUPT: u32 = 36;
pub const FUSE_DESTROY: u32 = 38;
pub const FUSE_BATCH_FORGET: u32 = 42;

pub fn opcode_name(op: u32) -> &'static str {
    match op {
        FUSE_LOOKUP => "LOOKUP",
        FUSE_FORGET => "FORGET",
        FUSE_GETATTR => "GETATTR",
        FUSE_SETATTR => "SETATTR",
        FUSE_MKNOD => "MKNOD",
        FUSE_MKDIR => "MKDIR",
        FUSE_UNLINK => "UNLINK",
        FUSE_RMDIR => "RMDIR",
        FUSE_OPEN => "OPEN",
        FUSE_READ => "READ",
        FUSE_WRITE => "WRITE",
        FUSE_STATFS => "STATFS",
        FUSE_RELEASE => "RELEASE",
        FUSE_FSYNC => "FSYNC",
        FUSE_GETXATTR => "GETXATTR",
        FUSE_LISTXATTR => "LISTXATTR",
        FUSE_FLUSH => "FLUSH",
        FUSE_INIT => "INIT",
        FUSE_OPENDIR => "OPENDIR",
        FUSE_READDIR => "READDIR",
        FUSE_RELEASEDIR => "RELEASEDIR",
        FUSE_ACCESS => "ACCESS",
        FUSE_CREATE => "CREATE",
        FUSE_INTERRUPT => "INTERRUPT",
        FUSE_DESTROY => "DESTROY",
        FUSE_BATCH_FORGET => "BATCH_FORGET",
        _ => "OTHER",
    }
}

// INIT flags (low word = fuse_init_in.flags, high word = flags2)
pub const FUSE_ASYNC_READ: u64 = 1 << 0;
pub const FUSE_BIG_WRITES: u64 = 1 << 5;
pub const FUSE_MAX_PAGES: u64 = 1 << 22;
pub const FUSE_INIT_EXT: u64 = 1 << 30;
pub const FUSE_OVER_IO_URING: u64 = 1 << 41;

pub const FATTR_SIZE: u32 = 1 << 3;

pub const FUSE_DEV_IOC_CLONE: libc::c_ulong = 0x8004_e500; // _IOR(229, 0, uint32_t)

wire!(InHeader, 40, {
    len: u32, opcode: u32, unique: u64, nodeid: u64,
    uid: u32, gid: u32, pid: u32, total_extlen: u16, padding: u16,
});
wire!(OutHeader, 16, { len: u32, error: i32, unique: u64 });

wire!(InitIn, 64, {
    major: u32, minor: u32, max_readahead: u32, flags: u32, flags2: u32, unused: [u32; 11],
});
wire!(InitOut, 64, {
    major: u32, minor: u32, max_readahead: u32, flags: u32,
    max_background: u16, congestion_threshold: u16, max_write: u32, time_gran: u32,
    max_pages: u16, map_alignment: u16, flags2: u32, max_stack_depth: u32,
    request_timeout: u16, padding: u16, unused: [u32; 5],
});

wire!(Attr, 88, {
    ino: u64, size: u64, blocks: u64, atime: u64, mtime: u64, ctime: u64,
    atimensec: u32, mtimensec: u32, ctimensec: u32, mode: u32, nlink: u32,
    uid: u32, gid: u32, rdev: u32, blksize: u32, flags: u32,
});
wire!(EntryOut, 128, {
    nodeid: u64, generation: u64, entry_valid: u64, attr_valid: u64,
    entry_valid_nsec: u32, attr_valid_nsec: u32, attr: Attr,
});
wire!(AttrOut, 104, { attr_valid: u64, attr_valid_nsec: u32, dummy: u32, attr: Attr });
wire!(GetattrIn, 16, { getattr_flags: u32, dummy: u32, fh: u64 });
wire!(SetattrIn, 88, {
    valid: u32, padding: u32, fh: u64, size: u64, lock_owner: u64,
    atime: u64, mtime: u64, ctime: u64, atimensec: u32, mtimensec: u32, ctimensec: u32,
    mode: u32, unused4: u32, uid: u32, gid: u32, unused5: u32,
});
wire!(MknodIn, 16, { mode: u32, rdev: u32, umask: u32, padding: u32 });
wire!(CreateIn, 16, { flags: u32, mode: u32, umask: u32, open_flags: u32 });
wire!(OpenIn, 8, { flags: u32, open_flags: u32 });
wire!(OpenOut, 16, { fh: u64, open_flags: u32, backing_id: i32 });
wire!(ReadIn, 40, {
    fh: u64, offset: u64, size: u32, read_flags: u32, lock_owner: u64, flags: u32, padding: u32,
});
wire!(WriteIn, 40, {
    fh: u64, offset: u64, size: u32, write_flags: u32, lock_owner: u64, flags: u32, padding: u32,
});
wire!(WriteOut, 8, { size: u32, padding: u32 });
wire!(ReleaseIn, 24, { fh: u64, flags: u32, release_flags: u32, lock_owner: u64 });
wire!(FlushIn, 24, { fh: u64, unused: u32, padding: u32, lock_owner: u64 });
wire!(FsyncIn, 16, { fh: u64, fsync_flags: u32, padding: u32 });
wire!(AccessIn, 8, { mask: u32, padding: u32 });
wire!(GetxattrIn, 8, { size: u32, padding: u32 });
wire!(ForgetIn, 8, { nlookup: u64 });
wire!(BatchForgetIn, 8, { count: u32, dummy: u32 });
wire!(ForgetOne, 16, { nodeid: u64, nlookup: u64 });
wire!(InterruptIn, 8, { unique: u64 });
wire!(Kstatfs, 80, {
    blocks: u64, bfree: u64, bavail: u64, files: u64, ffree: u64,
    bsize: u32, namelen: u32, frsize: u32, padding: u32, spare: [u32; 6],
});
wire!(MkdirIn, 8, { mode: u32, umask: u32 });

// ---- FUSE over io_uring (protocol 7.42, Linux 6.14+) ----
pub const FUSE_URING_IN_OUT_HEADER_SZ: usize = 128;
pub const FUSE_URING_OP_IN_OUT_SZ: usize = 128;
pub const FUSE_IO_URING_CMD_REGISTER: u32 = 1;
pub const FUSE_IO_URING_CMD_COMMIT_AND_FETCH: u32 = 2;

wire!(UringEntInOut, 32, { flags: u64, commit_id: u64, payload_sz: u32, padding: u32, reserved: u64 });
wire!(UringReqHeader, 288, {
    in_out: [u8; FUSE_URING_IN_OUT_HEADER_SZ],
    op_in: [u8; FUSE_URING_OP_IN_OUT_SZ],
    ring_ent_in_out: UringEntInOut,
});
wire!(
    /// Lives in the 80-byte command area of a 128-byte SQE.
    UringCmdReq, 24, { flags: u64, commit_id: u64, qid: u16, padding: [u8; 6] });

/// Size of the per-opcode header, i.e. the kernel's args->in_args[0]. Since
/// Linux 6.14 (commit "fuse: make args->in_args[0] to be always the header")
/// this is what io_uring puts into `op_in`; everything after it (names,
/// write data, forget arrays) goes into the payload buffer. Ops whose
/// in_args[0] is zero-sized (LOOKUP, UNLINK, RMDIR) or that have no in-args
/// (STATFS, DESTROY) return 0.
pub fn op_header_size(opcode: u32) -> usize {
    match opcode {
        FUSE_GETATTR => size_of::<GetattrIn>(),
        FUSE_SETATTR => size_of::<SetattrIn>(),
        FUSE_MKNOD => size_of::<MknodIn>(),
        FUSE_MKDIR => size_of::<MkdirIn>(),
        FUSE_CREATE => size_of::<CreateIn>(),
        FUSE_OPEN | FUSE_OPENDIR => size_of::<OpenIn>(),
        FUSE_READ | FUSE_READDIR => size_of::<ReadIn>(),
        FUSE_WRITE => size_of::<WriteIn>(),
        FUSE_RELEASE | FUSE_RELEASEDIR => size_of::<ReleaseIn>(),
        FUSE_FLUSH => size_of::<FlushIn>(),
        FUSE_FSYNC => size_of::<FsyncIn>(),
        FUSE_ACCESS => size_of::<AccessIn>(),
        FUSE_GETXATTR | FUSE_LISTXATTR => size_of::<GetxattrIn>(),
        FUSE_FORGET => size_of::<ForgetIn>(),
        FUSE_BATCH_FORGET => size_of::<BatchForgetIn>(),
        FUSE_INTERRUPT => size_of::<InterruptIn>(),
        FUSE_INIT => size_of::<InitIn>(),
        _ => 0,
    }
}
