//! `.ferry/`, the control directory at the root of every mount. It is not in the catalog:
//! its inodes live above every inode number the catalog hands out, and no user entry can be
//! created, renamed or removed there.
//!
//! - `.ferry/status` reads as JSON: the pool, its volumes and their usage, and the jobs.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::time::UNIX_EPOCH;

use fuser::{FileAttr, FileType, INodeNo};

use super::{FsError, FsResult, Shared};
use crate::catalog::model::{Ino, ROOT_INO};
use crate::report;

pub const CONTROL_DIR_NAME: &str = ".ferry";
/// Catalog inode numbers count up from 1 and never reach this.
pub const CONTROL_DIR_INO: Ino = 1 << 62;
pub const STATUS_INO: Ino = CONTROL_DIR_INO + 1;
const STATUS_NAME: &str = "status";

fn fixed_attr(ino: Ino, kind: FileType, perm: u16) -> FileAttr {
    FileAttr {
        ino: INodeNo(ino),
        size: 0,
        blocks: 0,
        atime: UNIX_EPOCH,
        mtime: UNIX_EPOCH,
        ctime: UNIX_EPOCH,
        crtime: UNIX_EPOCH,
        kind,
        perm,
        nlink: if kind == FileType::Directory { 2 } else { 1 },
        uid: 0,
        gid: 0,
        rdev: 0,
        blksize: 4096,
        flags: 0,
    }
}

pub fn attr(_shared: &Shared, ino: Ino) -> Option<FileAttr> {
    match ino {
        CONTROL_DIR_INO => Some(fixed_attr(ino, FileType::Directory, 0o555)),
        STATUS_INO => Some(fixed_attr(ino, FileType::RegularFile, 0o444)),
        _ => None,
    }
}

pub fn lookup(shared: &Shared, parent: Ino, name: &OsStr) -> Option<FileAttr> {
    match (parent, name.as_bytes()) {
        (ROOT_INO, n) if n == CONTROL_DIR_NAME.as_bytes() => attr(shared, CONTROL_DIR_INO),
        (CONTROL_DIR_INO, n) if n == STATUS_NAME.as_bytes() => attr(shared, STATUS_INO),
        _ => None,
    }
}

/// Names no user may create, rename or remove.
pub fn is_reserved(parent: Ino, name: &[u8]) -> bool {
    parent == CONTROL_DIR_INO || (parent == ROOT_INO && name == CONTROL_DIR_NAME.as_bytes())
}

pub fn dir_entries(ino: Ino) -> Option<Vec<(Vec<u8>, Ino, FileType)>> {
    (ino == CONTROL_DIR_INO).then(|| {
        vec![
            (b".".to_vec(), CONTROL_DIR_INO, FileType::Directory),
            (b"..".to_vec(), ROOT_INO, FileType::Directory),
            (STATUS_NAME.as_bytes().to_vec(), STATUS_INO, FileType::RegularFile),
        ]
    })
}

/// Open a control file: its contents, generated now.
pub fn open(shared: &Shared, ino: Ino) -> Option<FsResult<Vec<u8>>> {
    match ino {
        STATUS_INO => {
            let cat = shared.catalog.lock();
            let status = report::Status {
                pool: shared.pool_dir.to_string_lossy().into_owned(),
                mountpoint: shared.mountpoint.to_string_lossy().into_owned(),
                pid: std::process::id(),
                track_size_bytes: cat.catalog.geometry.track_size_bytes(),
                volumes: report::volumes(&cat.catalog),
                jobs: Vec::new(),
            };
            let mut bytes = serde_json::to_vec_pretty(&status).expect("status serializes");
            bytes.push(b'\n');
            Some(Ok(bytes))
        }
        CONTROL_DIR_INO => Some(Err(FsError::IsDir)),
        _ => None,
    }
}
