//! `.ferry/`, the control directory at the root of every mount. It is not in the catalog:
//! its inodes live above every inode number the catalog hands out, and no user entry can be
//! created, renamed or removed there.
//!
//! - `.ferry/status` reads as JSON: the pool, its volumes and their usage, the jobs and the
//!   plans (report.rs; docs/cli.md).
//! - `.ferry/events` reads as timestamped lines, one per event of a job or a plan.
//! - `.ferry/metrics` reads as the Prometheus text exposition format (metrics.rs; docs/cli.md).
//! - `.ferry/control` takes commands as text lines (migrate/command.rs). Only the mount's
//!   owner may open it for writing. Each line's reply (`ok ...` or `error: ...`) reads back
//!   from the same open file, as a stream; a refused line also fails its write with an
//!   errno that says what kind of refusal it was.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::time::UNIX_EPOCH;

use fuser::{FileAttr, FileType, INodeNo};

use super::{FerryFs, FsError, FsResult};
use crate::catalog::model::{Ino, ROOT_INO};
use crate::{metrics, report};

pub use crate::catalog::model::CONTROL_DIR_NAME;
/// Catalog inode numbers count up from 1 and never reach this.
pub const CONTROL_DIR_INO: Ino = 1 << 62;
pub const STATUS_INO: Ino = CONTROL_DIR_INO + 1;
pub const CONTROL_INO: Ino = CONTROL_DIR_INO + 2;
pub const EVENTS_INO: Ino = CONTROL_DIR_INO + 3;
pub const METRICS_INO: Ino = CONTROL_DIR_INO + 4;
const STATUS_NAME: &str = "status";
const CONTROL_NAME: &str = "control";
const EVENTS_NAME: &str = "events";
const METRICS_NAME: &str = "metrics";

fn fixed_attr(ino: Ino, kind: FileType, perm: u16, uid: u32) -> FileAttr {
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
        uid,
        gid: 0,
        rdev: 0,
        blksize: 4096,
        flags: 0,
    }
}

pub fn attr(fs: &FerryFs, ino: Ino) -> Option<FileAttr> {
    let owner = fs.owner_uid;
    match ino {
        // The mount's owner's alone: status, events and metrics name every path and job.
        CONTROL_DIR_INO => Some(fixed_attr(ino, FileType::Directory, 0o500, owner)),
        STATUS_INO | EVENTS_INO | METRICS_INO => Some(fixed_attr(ino, FileType::RegularFile, 0o400, owner)),
        CONTROL_INO => Some(fixed_attr(ino, FileType::RegularFile, 0o600, owner)),
        _ => None,
    }
}

pub fn lookup(fs: &FerryFs, parent: Ino, name: &OsStr) -> Option<FileAttr> {
    match (parent, name.as_bytes()) {
        (ROOT_INO, n) if n == CONTROL_DIR_NAME.as_bytes() => attr(fs, CONTROL_DIR_INO),
        (CONTROL_DIR_INO, n) if n == STATUS_NAME.as_bytes() => attr(fs, STATUS_INO),
        (CONTROL_DIR_INO, n) if n == CONTROL_NAME.as_bytes() => attr(fs, CONTROL_INO),
        (CONTROL_DIR_INO, n) if n == EVENTS_NAME.as_bytes() => attr(fs, EVENTS_INO),
        (CONTROL_DIR_INO, n) if n == METRICS_NAME.as_bytes() => attr(fs, METRICS_INO),
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
            (CONTROL_NAME.as_bytes().to_vec(), CONTROL_INO, FileType::RegularFile),
            (EVENTS_NAME.as_bytes().to_vec(), EVENTS_INO, FileType::RegularFile),
            (METRICS_NAME.as_bytes().to_vec(), METRICS_INO, FileType::RegularFile),
            (STATUS_NAME.as_bytes().to_vec(), STATUS_INO, FileType::RegularFile),
        ]
    })
}

/// Open a control file: its contents, generated now.
pub fn open(fs: &FerryFs, ino: Ino) -> Option<FsResult<Vec<u8>>> {
    match ino {
        STATUS_INO => {
            let m = &fs.migrations;
            let (jobs, plans) = m.reports();
            let cat = fs.engine.catalog.lock();
            let c = &cat.catalog;
            let status = report::Status {
                pool: fs.engine.pool_dir.to_string_lossy().into_owned(),
                mountpoint: fs.mountpoint.to_string_lossy().into_owned(),
                pid: std::process::id(),
                track_size_bytes: c.geometry.track_size_bytes(),
                volumes: report::volumes(c),
                closed_volumes: c.closed_volumes.iter().map(|&v| crate::migrate::plan::volume_name(c, v)).collect(),
                max_jobs: m.max_jobs(),
                copy_rate_limit_bytes_per_s: m.copy_rate.rate(),
                fuse_transport: fs.transport.get().map_or("/dev/fuse", |t| t.name()).to_string(),
                fuse_ring_requests: fs
                    .transport
                    .get()
                    .map_or(0, |t| t.ring_requests.load(std::sync::atomic::Ordering::Relaxed)),
                app_syncs: fs.engine.app_syncs.report(),
                jobs,
                plans,
            };
            let mut bytes = serde_json::to_vec_pretty(&status).expect("status serializes");
            bytes.push(b'\n');
            Some(Ok(bytes))
        }
        EVENTS_INO => Some(Ok(fs.migrations.events_text())),
        METRICS_INO => Some(Ok(metrics::render(&metrics::Mount {
            engine: &fs.engine,
            migrations: &fs.migrations,
            app: &fs.app_io,
            mountpoint: &fs.mountpoint,
            started_ns: fs.started_ns,
        })
        .into_bytes())),
        CONTROL_DIR_INO => Some(Err(FsError::IsDir)),
        _ => None,
    }
}
