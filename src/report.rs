//! What the admin views print: `ls`, `volume list` and `.ferry/status`, as stable JSON
//! (documented in docs/cli.md; scripts and tests parse it).

use serde::{Deserialize, Serialize};

use crate::catalog::model::{Body, Catalog, Ino, ROOT_INO};
use crate::space::VolumeId;

#[derive(Debug, Serialize, Deserialize)]
pub struct VolumeReport {
    pub name: String,
    pub path: String,
    pub size_bytes: u64,
    pub tracks_total: u64,
    pub tracks_used: u64,
    pub tracks_free: u64,
    pub data_sets: u64,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct VolumeList {
    pub track_size_bytes: u64,
    pub volumes: Vec<VolumeReport>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct ExtentReport {
    /// The data set's logical track the extent starts at (holes lie between extents).
    pub logical_track: u64,
    pub volume: String,
    pub first_track: u64,
    pub track_count: u64,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct DataSetReport {
    pub path: String,
    pub ino: Ino,
    pub size_bytes: u64,
    pub allocated_tracks: u64,
    pub extent_count: usize,
    pub volumes: Vec<String>,
    pub extents: Vec<ExtentReport>,
}

/// A fifo, socket or device node: no tracks, nothing for a migration to move.
#[derive(Debug, Serialize, Deserialize)]
pub struct SpecialReport {
    pub path: String,
    pub ino: Ino,
    /// `fifo`, `socket`, `char-device` or `block-device`.
    pub kind: String,
    /// A device's number, as `major:minor`; absent for a fifo or a socket.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Listing {
    pub track_size_bytes: u64,
    pub data_sets: Vec<DataSetReport>,
    /// The special files at or below the path (since they exist).
    #[serde(default)]
    pub special_files: Vec<SpecialReport>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Status {
    pub pool: String,
    pub mountpoint: String,
    pub pid: u32,
    pub track_size_bytes: u64,
    pub volumes: Vec<VolumeReport>,
    /// Volumes that take no new allocation (sources of a merge or drain, running or done).
    pub closed_volumes: Vec<String>,
    pub max_jobs: usize,
    pub copy_rate_limit_bytes_per_s: u64,
    /// How the kernel's requests reach the daemon: "/dev/fuse", or "io_uring" (`-o uring`,
    /// when the kernel took it).
    #[serde(default)]
    pub fuse_transport: String,
    /// Requests that came through the io_uring queues.
    #[serde(default)]
    pub fuse_ring_requests: u64,
    /// The applications' fsyncs (and O_SYNC/O_DSYNC writes) on this mount, which pace the
    /// copiers.
    #[serde(default)]
    pub app_syncs: AppSyncReport,
    pub jobs: Vec<JobReport>,
    pub plans: Vec<PlanReport>,
}

pub use crate::monitor::AppSyncReport;

/// One migration job, as `.ferry/status` shows it (docs/cli.md).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct JobReport {
    pub id: u64,
    pub path: String,
    pub plan: Option<u64>,
    /// queued, assessing, allocating, copying, resyncing, awaiting-close, cutover (verifying,
    /// with `verify=yes`), then one of switched, gone, cancelled, failed, stopped.
    pub phase: String,
    pub cutover: String,
    pub targets: Vec<String>,
    /// First-pass copy progress (at most `bytes_total`).
    pub bytes_copied: u64,
    /// Bytes copied again by re-sync passes.
    pub bytes_resynced: u64,
    /// The data set's allocation (it follows growth).
    pub bytes_total: u64,
    pub dirty_tracks: u64,
    pub track_size_bytes: u64,
    pub passes: u32,
    /// Mirrored writes on (the dirty set stopped shrinking).
    pub mirrored: bool,
    pub mirrored_writes: u64,
    pub rate_limit_bytes_per_s: u64,
    pub copy_rate_bytes_per_s: u64,
    pub started: String,
    pub started_ns: i64,
    pub ended_ns: Option<i64>,
    /// Live cutover: how long writes were held.
    pub stall_us: Option<u64>,
    /// Close cutover: how long opens were held (the downtime window).
    pub window_us: Option<u64>,
    pub error: Option<String>,
    /// A failed job: the phase it was in when it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failed_in: Option<String>,
    /// Asked to verify before the switch (`verify=yes`): pending, then ok or mismatch (the
    /// job failed), or not-run (it ended before the cutover). Absent when not asked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verify: Option<String>,
    /// Tracks whose checksums the verification compared.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verified_tracks: Option<u64>,
    /// How long the verification took (inside the cutover's hold).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verify_us: Option<u64>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PlanReport {
    pub id: u64,
    /// merge or drain.
    pub kind: String,
    /// running, done, failed or cancelled.
    pub phase: String,
    pub sources: Vec<String>,
    pub targets: Vec<String>,
    pub cutover: String,
    pub jobs: Vec<u64>,
    pub error: Option<String>,
}

pub fn volumes(c: &Catalog) -> Vec<VolumeReport> {
    volumes_by_id(c).into_iter().map(|(_, v)| v).collect()
}

/// [`volumes`], each with its id (to join with what the engine counts per volume). O(volumes):
/// the catalog keeps the data sets of each volume counted as ops apply.
pub fn volumes_by_id(c: &Catalog) -> Vec<(VolumeId, VolumeReport)> {
    c.volumes
        .values()
        .map(|v| {
            let report = VolumeReport {
                name: v.name.clone(),
                path: v.path.clone(),
                size_bytes: v.size_bytes,
                tracks_total: v.free.tracks_total(),
                tracks_used: v.free.tracks_total() - v.free.free_tracks(),
                tracks_free: v.free.free_tracks(),
                data_sets: c.data_sets_on(v.id),
            };
            (v.id, report)
        })
        .collect()
}

/// Resolve a path inside the pool ("/a/b" or "a/b") to an inode.
pub fn resolve(c: &Catalog, path: &str) -> Option<Ino> {
    let mut at = ROOT_INO;
    for part in path.split('/').filter(|p| !p.is_empty() && *p != ".") {
        at = c.lookup(at, part.as_bytes())?;
    }
    Some(at)
}

/// Every data set at or below `path`, in path order.
pub fn list(c: &Catalog, path: &str) -> Option<Listing> {
    let start = resolve(c, path)?;
    let base = {
        let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty() && *p != ".").collect();
        format!("/{}", parts.join("/"))
    };
    let mut out = Vec::new();
    let mut special_files = Vec::new();
    let mut stack = vec![(start, base)];
    while let Some((ino, p)) = stack.pop() {
        let Some(i) = c.get(ino) else { continue };
        match &i.body {
            Body::Dir { entries, .. } => {
                for (name, &child) in entries.iter().rev() {
                    let sep = if p.ends_with('/') { "" } else { "/" };
                    stack.push((child, format!("{p}{sep}{}", String::from_utf8_lossy(name))));
                }
            }
            Body::File { size_bytes, layout, .. } => {
                let name = |id: VolumeId| c.volumes.get(&id).map(|v| v.name.clone()).unwrap_or(format!("#{}", id.0));
                let mut vols: Vec<String> = Vec::new();
                for e in layout.extents() {
                    let n = name(e.volume);
                    if !vols.contains(&n) {
                        vols.push(n);
                    }
                }
                out.push(DataSetReport {
                    path: p,
                    ino,
                    size_bytes: *size_bytes,
                    allocated_tracks: layout.mapped_tracks(),
                    extent_count: layout.runs().len(),
                    volumes: vols,
                    extents: layout
                        .runs()
                        .iter()
                        .map(|r| ExtentReport {
                            logical_track: r.logical,
                            volume: name(r.extent.volume),
                            first_track: r.extent.first.0,
                            track_count: r.extent.count_tracks,
                        })
                        .collect(),
                });
            }
            Body::Symlink { .. } => {}
            Body::Special { kind, rdev } => special_files.push(SpecialReport {
                path: p,
                ino,
                kind: kind.name().to_string(),
                // The kernel's 32-bit device number encoding (new_encode_dev).
                device: kind
                    .is_device()
                    .then(|| format!("{}:{}", (rdev >> 8) & 0xfff, (rdev & 0xff) | ((rdev >> 12) & 0xfff00))),
            }),
        }
    }
    Some(Listing { track_size_bytes: c.geometry.track_size_bytes(), data_sets: out, special_files })
}
