//! The kernel's mount table, as util-linux's libmount reads it (through `findmnt`).
//!
//! ferryfs asks the table, never the mountpoint: a stat of a FUSE mountpoint is a request to
//! its daemon, which may be dead (kill -9) or not serving yet. /proc/self/mountinfo escapes a
//! space, a tab, a newline and a backslash in a path as octal (`\040`); findmnt's JSON output
//! gives the paths as they are. findmnt is part of util-linux, which every Linux system that
//! has mount(8) has, and it runs in this process's mount namespace.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The file system type of a ferryfs mount, as the kernel reports it.
pub const FSTYPE: &str = "fuse.ferryfs";
/// The prefix of a ferryfs mount's source: `ferryfs:POOL`.
pub const SOURCE_PREFIX: &str = "ferryfs:";

/// One mount, as the table lists it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Deserialize)]
pub struct MountEntry {
    pub target: PathBuf,
    #[serde(default)]
    pub source: Option<String>,
    pub fstype: String,
    /// The device number of the mount, `major:minor`.
    #[serde(rename = "maj:min")]
    pub majmin: String,
}

impl MountEntry {
    /// Is this a ferryfs mount? (Mounts made before the type was `fuse.ferryfs` have the
    /// type `fuse` and a `ferryfs:` source.)
    pub fn is_ferryfs(&self) -> bool {
        self.fstype == FSTYPE || (self.fstype == "fuse" && self.pool().is_some())
    }

    /// The pool directory of a ferryfs mount.
    pub fn pool(&self) -> Option<&Path> {
        self.source.as_deref()?.strip_prefix(SOURCE_PREFIX).map(Path::new)
    }
}

#[derive(serde::Deserialize)]
struct Table {
    filesystems: Vec<MountEntry>,
}

/// Every mount this process sees, in the order they were mounted.
pub fn table() -> Result<Vec<MountEntry>, String> {
    let out = Command::new("findmnt")
        .args(["--kernel", "--list", "--json", "--output", "TARGET,SOURCE,FSTYPE,MAJ:MIN"])
        .output()
        .map_err(|e| format!("can't read the mount table (findmnt, from util-linux): {e}"))?;
    if !out.status.success() {
        return Err(format!("findmnt failed: {}", String::from_utf8_lossy(&out.stderr).trim()));
    }
    parse(&out.stdout)
}

fn parse(json: &[u8]) -> Result<Vec<MountEntry>, String> {
    let t: Table = serde_json::from_slice(json).map_err(|e| format!("findmnt's output: {e}"))?;
    Ok(t.filesystems)
}

/// The newest mount at `mnt` (an absolute path), the one a lookup of `mnt` reaches.
pub fn at(mnt: &Path) -> Option<MountEntry> {
    table().ok()?.into_iter().rev().find(|m| m.target == mnt)
}

/// The mountpoints of the ferryfs mounts of the pool at `pool_dir` (canonical).
pub fn ferryfs_mounts_of(pool_dir: &Path) -> Vec<PathBuf> {
    let table = table().unwrap_or_default();
    table.into_iter().filter(|m| m.is_ferryfs() && m.pool() == Some(pool_dir)).map(|m| m.target).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn findmnt_json_parses() {
        let j = br#"{"filesystems": [
            {"target": "/", "source": "/dev/vda1", "fstype": "ext4", "maj:min": "254:1"},
            {"target": "/tmp/a b\\c", "source": "ferryfs:/srv/my pool", "fstype": "fuse.ferryfs", "maj:min": "0:52"},
            {"target": "/old", "source": "ferryfs:/srv/p", "fstype": "fuse", "maj:min": "0:53"},
            {"target": "/x", "source": null, "fstype": "tmpfs", "maj:min": "0:54"}
        ]}"#;
        let t = parse(j).unwrap();
        assert_eq!(t[1].target, PathBuf::from("/tmp/a b\\c"));
        assert_eq!(t[1].pool(), Some(Path::new("/srv/my pool")));
        assert!(t[1].is_ferryfs() && t[2].is_ferryfs());
        assert!(!t[0].is_ferryfs() && !t[3].is_ferryfs());
    }

    #[test]
    fn the_live_table_reads() {
        let t = table().expect("findmnt runs");
        assert!(t.iter().any(|m| m.target == Path::new("/")), "{t:?}");
    }
}
