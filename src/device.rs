//! Volumes on block devices: whole disks, partitions, LUNs (iSCSI, NVMe-oF, RBD through
//! their kernel devices), and loop devices.
//!
//! - The size is the device's, less the label at its end.
//! - A device is opened exclusively (O_EXCL): one that is mounted, or held by another
//!   exclusive opener (a file system, an LVM or md member, another mount of ferryfs), is
//!   refused, and while a pool is mounted nobody else can take its devices.
//! - A device that holds a file system or another signature (as libblkid's low-level probe
//!   sees it) is refused unless `--force`, as mkfs and pvcreate do.
//! - The last [`LABEL_BYTES`] of the device hold a label: the pool's id, the volume's id and
//!   name and the size it was added with, with a checksum. A pool finds its volumes by their
//!   labels when device names change, and refuses a device labelled for another pool.
//! - Adding a device zeroes the part the pool uses (the kernel's zero-out, which is fast
//!   where the device offloads it): free tracks must read as zeros, since freed tracks never
//!   leak old bytes. Freed tracks are zeroed with fallocate PUNCH_HOLE, which the kernel
//!   turns into a zero-out on a block device (never a discard that may not zero).
//! - A flush (fsync) of a device flushes its write cache.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The label's room at the end of a device.
pub const LABEL_BYTES: u64 = 4096;
const MAGIC: &[u8; 16] = b"FERRYFS-VOLUME-1";

/// What a device's label says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Label {
    pub pool_id: [u8; 16],
    pub volume_id: u32,
    pub name: String,
    pub size_bytes: u64,
}

impl Label {
    fn encode(&self) -> Vec<u8> {
        let mut b = vec![0u8; LABEL_BYTES as usize];
        b[..16].copy_from_slice(MAGIC);
        b[16..32].copy_from_slice(&self.pool_id);
        b[32..36].copy_from_slice(&self.volume_id.to_le_bytes());
        b[36..44].copy_from_slice(&self.size_bytes.to_le_bytes());
        let name = self.name.as_bytes();
        b[44] = name.len() as u8;
        b[45..45 + name.len()].copy_from_slice(name);
        let crc = crc32c::crc32c(&b[..LABEL_BYTES as usize - 4]);
        let n = b.len();
        b[n - 4..].copy_from_slice(&crc.to_le_bytes());
        b
    }

    fn decode(b: &[u8]) -> Option<Label> {
        if b.len() != LABEL_BYTES as usize || &b[..16] != MAGIC {
            return None;
        }
        let n = b.len();
        let crc = u32::from_le_bytes(b[n - 4..].try_into().ok()?);
        if crc != crc32c::crc32c(&b[..n - 4]) {
            return None;
        }
        let len = b[44] as usize;
        Some(Label {
            pool_id: b[16..32].try_into().ok()?,
            volume_id: u32::from_le_bytes(b[32..36].try_into().ok()?),
            size_bytes: u64::from_le_bytes(b[36..44].try_into().ok()?),
            name: String::from_utf8_lossy(b.get(45..45 + len)?).into_owned(),
        })
    }
}

/// Is `path` a block device?
pub fn is_block_device(path: &Path) -> bool {
    std::fs::metadata(path).is_ok_and(|m| m.file_type().is_block_device())
}

/// The size of the open block device, in bytes.
pub fn size_of(f: &File) -> io::Result<u64> {
    let mut size: u64 = 0;
    // SAFETY: BLKGETSIZE64 writes one u64 through the pointer, which points at `size`.
    let rc = unsafe { libc::ioctl(f.as_raw_fd(), BLKGETSIZE64, &mut size as *mut u64) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(size)
}

// _IOR(0x12, 114, size_t)
const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;

/// Open a device for the pool's use: read-write and exclusive. EBUSY says it is in use
/// ([`IN_USE`] says it to a person).
pub fn open_exclusive(path: &Path) -> io::Result<File> {
    OpenOptions::new().read(true).write(true).custom_flags(libc::O_EXCL).open(path)
}

/// What EBUSY from [`open_exclusive`] means.
pub const IN_USE: &str = "it is in use (mounted, or held by a file system, LVM, md or another pool)";

/// The label at the end of the device, if it has one.
pub fn read_label(f: &File) -> io::Result<Option<Label>> {
    let size = size_of(f)?;
    if size < LABEL_BYTES {
        return Ok(None);
    }
    let mut b = vec![0u8; LABEL_BYTES as usize];
    f.read_exact_at(&mut b, size - LABEL_BYTES)?;
    Ok(Label::decode(&b))
}

/// Write (or with `None`, wipe) the label, and flush it.
pub fn write_label(f: &File, label: Option<&Label>) -> io::Result<()> {
    let size = size_of(f)?;
    let b = label.map(Label::encode).unwrap_or_else(|| vec![0u8; LABEL_BYTES as usize]);
    f.write_all_at(&b, size - LABEL_BYTES)?;
    f.sync_all()
}

/// Zero `len` bytes from the start of the device, through the kernel's zero-out.
pub fn zero_out(f: &File, len: u64) -> io::Result<()> {
    // SAFETY: fallocate on an fd we own, with plain integer arguments.
    let rc = unsafe {
        libc::fallocate(f.as_raw_fd(), libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE, 0, len as libc::off_t)
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    f.sync_all()
}

/// The signatures (file systems, partition tables, RAID or LVM members) libblkid's
/// low-level probe finds on the device, as `TYPE` values; empty if none.
pub fn signatures(path: &Path) -> io::Result<Vec<String>> {
    let out = Command::new("blkid").args(["-p", "-o", "export"]).arg(path).output().map_err(|e| {
        io::Error::new(e.kind(), format!("can't probe {} for signatures (blkid, from util-linux): {e}", path.display()))
    })?;
    // blkid exits 2 when it finds nothing.
    if out.status.code() == Some(2) {
        return Ok(Vec::new());
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let found: Vec<String> = text
        .lines()
        .filter_map(|l| l.strip_prefix("TYPE=").or_else(|| l.strip_prefix("PTTYPE=")))
        .map(str::to_string)
        .collect();
    if found.is_empty() && !out.status.success() {
        return Err(io::Error::other(format!(
            "probing {} for signatures failed: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(found)
}

/// Every block device of the system (/sys/class/block), as /dev paths.
fn all_devices() -> Vec<PathBuf> {
    let Ok(rd) = std::fs::read_dir("/sys/class/block") else { return Vec::new() };
    rd.filter_map(|e| e.ok()).map(|e| Path::new("/dev").join(e.file_name())).filter(|p| is_block_device(p)).collect()
}

/// The device that carries this pool's label for `volume_id`, wherever it is now.
pub fn find(pool_id: &[u8; 16], volume_id: u32) -> Option<PathBuf> {
    all_devices().into_iter().find(|p| {
        let Ok(f) = File::open(p) else { return false };
        read_label(&f).ok().flatten().is_some_and(|l| &l.pool_id == pool_id && l.volume_id == volume_id)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_label_round_trips_and_a_damaged_one_reads_as_none() {
        let l = Label { pool_id: [7; 16], volume_id: 3, name: "VOL003".into(), size_bytes: 1 << 30 };
        let b = l.encode();
        assert_eq!(Label::decode(&b), Some(l));
        let mut bad = b.clone();
        bad[40] ^= 1;
        assert_eq!(Label::decode(&bad), None, "a checksum mismatch");
        assert_eq!(Label::decode(&vec![0u8; LABEL_BYTES as usize]), None, "no label");
    }
}
