//! Engine attributes as FUSE attributes.

use fuser::{FileAttr, FileType, INodeNo};

use super::ts;
use crate::catalog::model::SpecialKind;
use crate::engine::{Attr, Kind};
use crate::geometry::Geometry;

/// st_blksize: the preferred I/O size. A track, capped at the largest write.
const PREFERRED_IO_MAX_BYTES: u64 = 1 << 20;

pub fn file_type(k: Kind) -> FileType {
    match k {
        Kind::Dir => FileType::Directory,
        Kind::File => FileType::RegularFile,
        Kind::Symlink => FileType::Symlink,
        Kind::Special(SpecialKind::Fifo) => FileType::NamedPipe,
        Kind::Special(SpecialKind::Socket) => FileType::Socket,
        Kind::Special(SpecialKind::CharDev) => FileType::CharDevice,
        Kind::Special(SpecialKind::BlockDev) => FileType::BlockDevice,
    }
}

pub fn attr(g: Geometry, a: &Attr) -> FileAttr {
    let blocks = g.bytes_of(a.allocated_tracks) / 512;
    FileAttr {
        ino: INodeNo(a.ino),
        size: a.size_bytes,
        blocks,
        atime: ts(a.meta.atime_ns),
        mtime: ts(a.meta.mtime_ns),
        ctime: ts(a.meta.ctime_ns),
        crtime: ts(a.meta.ctime_ns),
        kind: file_type(a.kind),
        perm: (a.meta.perm & 0o7777) as u16,
        nlink: a.meta.nlink,
        uid: a.meta.uid,
        gid: a.meta.gid,
        rdev: a.rdev,
        blksize: g.track_size_bytes().min(PREFERRED_IO_MAX_BYTES) as u32,
        flags: 0,
    }
}
