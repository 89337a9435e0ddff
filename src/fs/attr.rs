//! Catalog inodes as FUSE attributes.

use fuser::{FileAttr, FileType, INodeNo};

use super::ts;
use crate::catalog::model::{Body, Inode};
use crate::geometry::Geometry;

/// st_blksize: the preferred I/O size. A track, capped at the largest write.
const PREFERRED_IO_MAX_BYTES: u64 = 1 << 20;

pub fn kind_of(i: &Inode) -> FileType {
    match i.body {
        Body::Dir { .. } => FileType::Directory,
        Body::File { .. } => FileType::RegularFile,
        Body::Symlink { .. } => FileType::Symlink,
    }
}

pub fn attr(g: Geometry, i: &Inode) -> FileAttr {
    let blocks = g.bytes_of(i.allocated_tracks()) / 512;
    FileAttr {
        ino: INodeNo(i.ino),
        size: i.size_bytes(),
        blocks,
        atime: ts(i.meta.atime_ns),
        mtime: ts(i.meta.mtime_ns),
        ctime: ts(i.meta.ctime_ns),
        crtime: ts(i.meta.ctime_ns),
        kind: kind_of(i),
        perm: (i.meta.perm & 0o7777) as u16,
        nlink: i.meta.nlink,
        uid: i.meta.uid,
        gid: i.meta.gid,
        rdev: 0,
        blksize: g.track_size_bytes().min(PREFERRED_IO_MAX_BYTES) as u32,
        flags: 0,
    }
}
