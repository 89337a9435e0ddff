//! A pool on disk: the directory holding the catalog, the lock and (by default) the volume
//! images. One pool is one mount; the mount holds `pool.lock` (flock) for its lifetime, so
//! no other writer can open the catalog.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::catalog::model::{Catalog, Meta, Op, VolumeRec};
use crate::catalog::store::{OpenReport, Store, StoreError};
use crate::geometry::Geometry;
use crate::space::VolumeId;
use crate::storage::{Disk, FileStorage, RealDisk, StorageFile};

/// Every volume image of a pool, open, by id.
pub type OpenVolumes = Vec<(VolumeId, Arc<dyn StorageFile>)>;

pub const LOCK_FILE: &str = "pool.lock";
pub const MOUNTED_FILE: &str = "mounted";
pub const VOLUMES_DIR: &str = "volumes";
pub const MOUNT_LOG_FILE: &str = "mount.log";
/// The pool's id (16 random bytes, hex), which the labels of its device volumes carry.
pub const POOL_ID_FILE: &str = "pool.id";
/// Longest volume name.
pub const VOLUME_NAME_MAX_CHARS: usize = 32;

#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
    #[error("{} is not empty; a new pool needs an empty or missing directory", path.display())]
    NotEmpty { path: PathBuf },
    #[error("pool {} is in use{}", path.display(), holder_text(by, holder))]
    Locked { path: PathBuf, by: Option<MountedInfo>, holder: Option<(u32, String)> },
    #[error("bad volume name {name:?}: {why}")]
    BadVolumeName { name: String, why: &'static str },
    #[error("volume {name} already exists in this pool")]
    VolumeExists { name: String },
    #[error("{} already exists; a volume image must be a new file", path.display())]
    ImageExists { path: PathBuf },
    #[error(
        "{} lies inside {}, a mount of this pool: a volume can't live inside its own pool",
        path.display(),
        mountpoint.display()
    )]
    ImageInsideMount { path: PathBuf, mountpoint: PathBuf },
    #[error(
        "{} already exists but no volume of this pool uses it (left by an add that did not finish?); \
         remove it, or give another --path",
        path.display()
    )]
    StrayImage { path: PathBuf },
    #[error("bad volume size {size_bytes} bytes: a volume holds at least one track of {track_bytes} bytes")]
    VolumeTooSmall { size_bytes: u64, track_bytes: u64 },
    #[error("volume {name}: image {path} can't be opened: {source}")]
    Image { name: String, path: String, source: io::Error },
    #[error("no volume named {name:?} in this pool")]
    NoVolume { name: String },
    #[error("volume {name} can't be retired: {why}")]
    NotRetirable { name: String, why: String },
    #[error("volume {name} can't be reopened: {why}")]
    NotReopenable { name: String, why: String },
    #[error("{}: {why}", path.display())]
    DeviceRefused { path: PathBuf, why: String },
    #[error(
        "volume {name}: no device carries its label (it was {path}); attach the device, or retire the volume \
         from a pool that can't find it"
    )]
    DeviceMissing { name: String, path: String },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> PoolError + '_ {
    move |source| PoolError::Io { path: path.to_path_buf(), source }
}

/// Contents of `POOL/mounted` while a mount runs.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MountedInfo {
    pub pid: u32,
    pub mountpoint: String,
}

pub use crate::catalog::model::now_ns;

pub fn validate_volume_name(name: &str) -> Result<(), PoolError> {
    let bad = |why| Err(PoolError::BadVolumeName { name: name.to_string(), why });
    if name.is_empty() {
        return bad("it is empty");
    }
    if name.chars().count() > VOLUME_NAME_MAX_CHARS {
        return bad("it is longer than 32 characters");
    }
    if !name.chars().next().is_some_and(|c| c.is_ascii_alphanumeric()) {
        return bad("it must start with a letter or a digit");
    }
    if !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-') {
        return bad("use only A-Z, a-z, 0-9, '_' and '-'");
    }
    Ok(())
}

/// Create a new pool at `dir`.
pub fn init(dir: &Path, geometry: Geometry) -> Result<(), PoolError> {
    match fs::read_dir(dir) {
        Ok(mut it) => {
            if it.next().is_some() {
                return Err(PoolError::NotEmpty { path: dir.to_path_buf() });
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => fs::create_dir_all(dir).map_err(io_err(dir))?,
        Err(e) => return Err(io_err(dir)(e)),
    }
    fs::create_dir(dir.join(VOLUMES_DIR)).map_err(io_err(dir))?;
    // The pool is its owner's alone, whatever the umask or an empty directory's mode was:
    // its images hold every data set's bytes, its catalog every path.
    for d in [dir.to_path_buf(), dir.join(VOLUMES_DIR)] {
        fs::set_permissions(&d, fs::Permissions::from_mode(0o700)).map_err(io_err(&d))?;
    }
    let now = now_ns();
    // SAFETY: getuid/getgid can't fail.
    let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
    let root = Meta { perm: 0o755, uid, gid, nlink: 2, atime_ns: now, mtime_ns: now, ctime_ns: now };
    Store::create(dir, Catalog::new(geometry, root))?;
    Ok(())
}

/// The pool's id, made (0600, synced) the first time it is asked for with `create`.
pub fn pool_id(dir: &Path, create: bool) -> Result<[u8; 16], PoolError> {
    let path = dir.join(POOL_ID_FILE);
    match fs::read_to_string(&path) {
        Ok(text) => parse_pool_id(text.trim()).ok_or_else(|| PoolError::Io {
            path: path.clone(),
            source: io::Error::new(io::ErrorKind::InvalidData, "not a pool id (32 hex digits)"),
        }),
        Err(e) if e.kind() == io::ErrorKind::NotFound && create => {
            let mut id = [0u8; 16];
            File::open("/dev/urandom")
                .and_then(|mut f| io::Read::read_exact(&mut f, &mut id))
                .map_err(io_err(&path))?;
            let hex: String = id.iter().map(|b| format!("{b:02x}")).collect();
            let tmp = dir.join(format!("{POOL_ID_FILE}.tmp"));
            fs::write(&tmp, format!("{hex}\n"))
                .and_then(|()| File::open(&tmp)?.sync_all())
                .and_then(|()| fs::rename(&tmp, &path))
                .and_then(|()| File::open(dir)?.sync_all())
                .map_err(io_err(&path))?;
            Ok(id)
        }
        Err(e) => Err(io_err(&path)(e)),
    }
}

fn parse_pool_id(hex: &str) -> Option<[u8; 16]> {
    if hex.len() != 32 {
        return None;
    }
    let mut id = [0u8; 16];
    for (i, b) in id.iter_mut().enumerate() {
        *b = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(id)
}

/// The pool lock alone, without opening the catalog (for a repair of a catalog that does not
/// open). It holds while the value lives.
pub struct PoolLock {
    /// The pool directory, canonical.
    pub dir: PathBuf,
    file: File,
}

impl PoolLock {
    /// Take the pool lock or say who holds it (a mount, or another offline command).
    pub fn take(dir: &Path) -> Result<PoolLock, PoolError> {
        let dir = dir.canonicalize().map_err(io_err(dir))?;
        if !dir.join(crate::catalog::store::SNAP_FILE).exists() {
            return Err(StoreError::NotAPool { path: dir }.into());
        }
        let lock_path = dir.join(LOCK_FILE);
        let file =
            OpenOptions::new().create(true).truncate(false).write(true).open(&lock_path).map_err(io_err(&lock_path))?;
        // SAFETY: flock on an fd we own.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let holder = lock_holder(&file);
            return Err(PoolError::Locked { by: read_mounted(&dir), path: dir, holder });
        }
        Ok(PoolLock { dir, file })
    }
}

/// An open, locked pool: the catalog store and the lock.
pub struct Pool {
    pub dir: PathBuf,
    pub store: Store,
    pub report: OpenReport,
    _lock: File,
}

impl Pool {
    /// Open for writing: takes the pool lock or says who holds it.
    pub fn open(dir: &Path) -> Result<Pool, PoolError> {
        let PoolLock { dir, file } = PoolLock::take(dir)?;
        let (store, report) = Store::open(&dir, true)?;
        Ok(Pool { dir, store, report, _lock: file })
    }

    /// Add a volume image: a new sparse file, then the catalog record.
    pub fn add_volume(
        &mut self,
        name: &str,
        size_bytes: u64,
        path: Option<&Path>,
        force: bool,
    ) -> Result<VolumeRec, PoolError> {
        let v = check_new_volume(&self.store.catalog, &self.dir, name, size_bytes, path, force)?;
        let (op, _image) = v.create_image(&RealDisk, &self.dir)?;
        if let Err(e) = self.store.commit(op).and_then(|_| self.store.sync()) {
            v.undo(&RealDisk);
            return Err(e.into());
        }
        Ok(self.store.catalog.volumes[&v.id].clone())
    }

    /// Remove an empty volume from the pool (offline). Returns the image path and whether
    /// the image was deleted (only images inside the pool are).
    pub fn retire_volume(&mut self, name: &str) -> Result<(String, bool), PoolError> {
        let c = &self.store.catalog;
        let v = c.volume_by_name(name).ok_or_else(|| PoolError::NoVolume { name: name.to_string() })?;
        let id = v.id;
        if let Some((_, why)) = retire_refusal(c, id) {
            return Err(PoolError::NotRetirable { name: name.to_string(), why });
        }
        let device = if is_device_volume(v) { Some(locate_device(&self.dir, v)?) } else { None };
        let path = v.path.clone();
        self.store.commit(Op::RemoveVolume { id }).and_then(|_| self.store.sync())?;
        if let Some(at) = device {
            wipe_device_label(&at)?;
            return Ok((at.display().to_string(), false));
        }
        let removed = remove_retired_image(&RealDisk, &self.dir, Path::new(&path));
        Ok((path, removed))
    }

    /// Give a closed volume (a finished plan's source) back to allocation (offline).
    pub fn reopen_volume(&mut self, name: &str) -> Result<(), PoolError> {
        let c = &self.store.catalog;
        let id = c.volume_by_name(name).ok_or_else(|| PoolError::NoVolume { name: name.to_string() })?.id;
        if let Some((_, why)) = reopen_refusal(c, id) {
            return Err(PoolError::NotReopenable { name: name.to_string(), why });
        }
        self.store.commit(Op::ReopenVolume { id }).and_then(|_| self.store.sync())?;
        Ok(())
    }

    /// Split into the store and the lock file; the lock holds while the file stays open.
    pub fn into_parts(self) -> (Store, File) {
        (self.store, self._lock)
    }

    /// Open every volume image of the catalog (a device volume where its label is). With
    /// `record_moves`, a device volume found at another path gets that path in the catalog
    /// (synced), so that `volume list` and the next mount look there first.
    pub fn open_volumes(&mut self, record_moves: bool) -> Result<OpenVolumes, PoolError> {
        let mut out = Vec::new();
        let mut moved = Vec::new();
        for v in self.store.catalog.volumes.values() {
            let path = Path::new(&v.path);
            let io = if is_device_volume(v) {
                let (io, at) = open_device_volume(&self.dir, v)?;
                if at != path {
                    moved.push((v.id, at.display().to_string()));
                }
                io
            } else {
                FileStorage::open_image(path, v.size_bytes).map_err(|source| PoolError::Image {
                    name: v.name.clone(),
                    path: v.path.clone(),
                    source,
                })?
            };
            out.push((v.id, Arc::new(io) as Arc<dyn StorageFile>));
        }
        if record_moves && !moved.is_empty() {
            for (id, path) in moved {
                self.store.commit(Op::SetVolumePath { id, path })?;
            }
            self.store.sync()?;
        }
        Ok(out)
    }
}

/// Is `v` a device volume? (Its recorded path is a block device, or a /dev path that is gone.)
pub fn is_device_volume(v: &VolumeRec) -> bool {
    let path = Path::new(&v.path);
    crate::device::is_block_device(path) || (!path.exists() && path.starts_with("/dev"))
}

/// Where a device volume's label is: its recorded path if the label there is this pool's
/// and this volume's, else the device that carries it now (device names change).
pub fn locate_device(dir: &Path, v: &VolumeRec) -> Result<PathBuf, PoolError> {
    use crate::device;
    let pool = pool_id(dir, false)?;
    let ours = |l: &device::Label| l.pool_id == pool && l.volume_id == v.id.0 && l.size_bytes >= v.size_bytes;
    let recorded = Path::new(&v.path);
    if let Ok(f) = File::open(recorded) {
        if device::read_label(&f).ok().flatten().as_ref().is_some_and(ours) {
            return Ok(recorded.to_path_buf());
        }
    }
    device::find(&pool, v.id.0).ok_or_else(|| PoolError::DeviceMissing { name: v.name.clone(), path: v.path.clone() })
}

/// A device volume, found by its label and opened exclusively; and where it was found.
fn open_device_volume(dir: &Path, v: &VolumeRec) -> Result<(FileStorage, PathBuf), PoolError> {
    let at = locate_device(dir, v)?;
    if at != Path::new(&v.path) {
        log::warn!("volume {}: its device is {} now (it was {})", v.name, at.display(), v.path);
    }
    let f = crate::device::open_exclusive(&at).map_err(|source| PoolError::Image {
        name: v.name.clone(),
        path: at.display().to_string(),
        source: match source.raw_os_error() {
            Some(libc::EBUSY) => io::Error::other(crate::device::IN_USE),
            _ => source,
        },
    })?;
    Ok((FileStorage::from_file(f, v.size_bytes), at))
}

/// A retired device volume keeps its bytes but no longer claims to be the pool's.
pub fn wipe_device_label(path: &Path) -> Result<(), PoolError> {
    let f = crate::device::open_exclusive(path).map_err(|e| match e.raw_os_error() {
        Some(libc::EBUSY) => PoolError::DeviceRefused { path: path.to_path_buf(), why: crate::device::IN_USE.into() },
        _ => io_err(path)(e),
    })?;
    crate::device::write_label(&f, None).map_err(io_err(path))
}

/// A new volume, checked against a catalog: its id, name, image path and size.
#[derive(Debug, Clone)]
pub struct NewVolume {
    pub id: VolumeId,
    pub name: String,
    pub path: PathBuf,
    pub size_bytes: u64,
    pub tracks_total: u64,
    /// A block device (rather than a new image file).
    pub device: bool,
}

/// Checks a new volume against the catalog `cat` of the pool in `dir`: a valid name not in
/// use, at least one track, an image path where no file is, or a block device that is free
/// (`force`: even if it holds a signature or another pool's label). Nothing is written.
/// `size_bytes` 0 means the whole device.
pub fn check_new_volume(
    cat: &Catalog,
    dir: &Path,
    name: &str,
    size_bytes: u64,
    path: Option<&Path>,
    force: bool,
) -> Result<NewVolume, PoolError> {
    validate_volume_name(name)?;
    if cat.volume_by_name(name).is_some() {
        return Err(PoolError::VolumeExists { name: name.to_string() });
    }
    if let Some(p) = path {
        // Before anything stats the path: a stat inside the pool's own mount is a request to
        // the daemon that is asking, which holds the catalog while it checks.
        let lexical =
            if p.is_absolute() { p.to_path_buf() } else { std::env::current_dir().map_err(io_err(p))?.join(p) };
        refuse_inside_own_mount(dir, &lexical)?;
        if crate::device::is_block_device(p) {
            return check_new_device(cat, dir, name, size_bytes, p, force);
        }
    }
    let path = match path {
        Some(p) => {
            // Checked above as written; again once it is resolved.
            let resolved = absolute(p)?;
            refuse_inside_own_mount(dir, &resolved)?;
            resolved
        }
        None => dir.join(VOLUMES_DIR).join(format!("{name}.img")),
    };
    if path.exists() {
        let unused = cat.volumes.values().all(|v| Path::new(&v.path) != path);
        if unused && path.starts_with(dir.join(VOLUMES_DIR)) {
            return Err(PoolError::StrayImage { path });
        }
        return Err(PoolError::ImageExists { path });
    }
    NewVolume::sized(cat, name, path, size_bytes, false)
}

fn check_new_device(
    cat: &Catalog,
    dir: &Path,
    name: &str,
    size_bytes: u64,
    dev: &Path,
    force: bool,
) -> Result<NewVolume, PoolError> {
    use crate::device;
    let refused = |why: String| PoolError::DeviceRefused { path: dev.to_path_buf(), why };
    let path = dev.canonicalize().map_err(io_err(dev))?;
    if let Some(v) = cat.volumes.values().find(|v| Path::new(&v.path) == path) {
        return Err(refused(format!("already volume {} of this pool", v.name)));
    }
    let f = device::open_exclusive(&path).map_err(|e| match e.raw_os_error() {
        Some(libc::EBUSY) => refused(crate::device::IN_USE.into()),
        _ => io_err(&path)(e),
    })?;
    let dev_bytes = device::size_of(&f).map_err(io_err(&path))?;
    if let Some(l) = device::read_label(&f).map_err(io_err(&path))? {
        let ours = pool_id(dir, false).ok() == Some(l.pool_id);
        if ours && cat.volumes.contains_key(&VolumeId(l.volume_id)) {
            return Err(refused(format!("it carries the label of volume {} of this pool", l.name)));
        }
        if !ours && !force {
            return Err(refused(format!(
                "it belongs to another ferryfs pool (its volume {}); --force to take it, losing what it holds",
                l.name
            )));
        }
    }
    let found = device::signatures(&path).map_err(io_err(&path))?;
    if !found.is_empty() && !force {
        return Err(refused(format!(
            "it holds a {} signature; --force to use it anyway, losing what it holds",
            found.join(", ")
        )));
    }
    let usable = dev_bytes.saturating_sub(device::LABEL_BYTES);
    let want = if size_bytes == 0 { usable } else { size_bytes };
    if want > usable {
        return Err(refused(format!("it holds {usable} bytes for a volume (less its label), not {want}")));
    }
    NewVolume::sized(cat, name, path, want, true)
}

impl NewVolume {
    /// The next volume of `cat`, of `size_bytes` rounded down to whole tracks (at least one).
    fn sized(cat: &Catalog, name: &str, path: PathBuf, size_bytes: u64, device: bool) -> Result<NewVolume, PoolError> {
        let g = cat.geometry;
        let tracks_total = g.whole_tracks_in(size_bytes);
        if tracks_total == 0 {
            return Err(PoolError::VolumeTooSmall { size_bytes, track_bytes: g.track_size_bytes() });
        }
        Ok(NewVolume {
            id: VolumeId(cat.next_volume),
            name: name.to_string(),
            path,
            size_bytes: g.bytes_of(tracks_total),
            tracks_total,
            device,
        })
    }

    /// Creates the sparse image (synced, and its directory too) and returns it open, with
    /// the op that records the volume. The caller commits the op, or removes the image if
    /// it can't. Used offline (`Pool::add_volume`) and by a mount (the `add` control verb).
    pub fn create_image(&self, disk: &dyn Disk, pool_dir: &Path) -> Result<(Op, Arc<dyn StorageFile>), PoolError> {
        let op = Op::AddVolume {
            id: self.id,
            name: self.name.clone(),
            path: self.path.to_string_lossy().into_owned(),
            size_bytes: self.size_bytes,
            tracks_total: self.tracks_total,
        };
        if self.device {
            return Ok((op, Arc::new(self.prepare_device(pool_dir)?)));
        }
        let path = &self.path;
        let io = disk.create_new(path, self.size_bytes).map_err(|e| match e.kind() {
            io::ErrorKind::AlreadyExists => PoolError::ImageExists { path: path.clone() },
            _ => PoolError::Io { path: path.clone(), source: e },
        })?;
        let parent = path.parent().unwrap_or(Path::new("/"));
        if let Err((at, e)) = io
            .flush()
            .map_err(|e| (path.clone(), e))
            .and_then(|()| disk.sync_dir(parent).map_err(|e| (parent.to_path_buf(), e)))
        {
            let _ = disk.remove(path);
            return Err(PoolError::Io { path: at, source: e });
        }
        Ok((op, io))
    }

    /// A device becomes a volume: zeroed where the pool will use it (free tracks read as
    /// zeros), then labelled, each flushed.
    fn prepare_device(&self, pool_dir: &Path) -> Result<FileStorage, PoolError> {
        use crate::device;
        let path = &self.path;
        let pool = pool_id(pool_dir, true)?;
        let f = device::open_exclusive(path).map_err(io_err(path))?;
        device::zero_out(&f, self.size_bytes).map_err(io_err(path))?;
        let label =
            device::Label { pool_id: pool, volume_id: self.id.0, name: self.name.clone(), size_bytes: self.size_bytes };
        device::write_label(&f, Some(&label)).map_err(io_err(path))?;
        Ok(FileStorage::from_file(f, self.size_bytes))
    }

    /// Take back what `create_image` did, for an add whose record did not commit.
    pub fn undo(&self, disk: &dyn Disk) {
        if self.device {
            let _ = wipe_device_label(&self.path);
        } else {
            let _ = disk.remove(&self.path);
        }
    }
}

impl PoolError {
    /// The errno a mount answers a refused control command with.
    pub fn errno(&self) -> i32 {
        match self {
            PoolError::BadVolumeName { .. }
            | PoolError::VolumeTooSmall { .. }
            | PoolError::ImageInsideMount { .. }
            | PoolError::DeviceRefused { .. } => libc::EINVAL,
            PoolError::VolumeExists { .. } | PoolError::ImageExists { .. } | PoolError::StrayImage { .. } => {
                libc::EEXIST
            }
            PoolError::NoVolume { .. } => libc::ENOENT,
            PoolError::DeviceMissing { .. } => libc::ENODEV,
            PoolError::NotRetirable { .. } | PoolError::NotReopenable { .. } => libc::EBUSY,
            PoolError::Io { source, .. } | PoolError::Image { source, .. } => {
                source.raw_os_error().unwrap_or(libc::EIO)
            }
            _ => libc::EIO,
        }
    }
}

/// An image inside a mount of its own pool would store the pool inside itself: every write
/// to the volume a write to a data set of the same mount, and the mount deadlocks on itself.
fn refuse_inside_own_mount(pool_dir: &Path, image: &Path) -> Result<(), PoolError> {
    let pool_dir = pool_dir.canonicalize().unwrap_or_else(|_| pool_dir.to_path_buf());
    match crate::mounts::ferryfs_mounts_of(&pool_dir).into_iter().find(|m| image.starts_with(m)) {
        Some(mountpoint) => Err(PoolError::ImageInsideMount { path: image.to_path_buf(), mountpoint }),
        None => Ok(()),
    }
}

fn absolute(p: &Path) -> Result<PathBuf, PoolError> {
    let p = if p.is_absolute() { p.to_path_buf() } else { std::env::current_dir().map_err(io_err(p))?.join(p) };
    // Canonicalize the parent (it must exist), keep the file name.
    let parent = p.parent().unwrap_or(Path::new("/"));
    let parent = parent.canonicalize().map_err(io_err(parent))?;
    Ok(parent.join(p.file_name().unwrap_or_default()))
}

fn holder_text(by: &Option<MountedInfo>, holder: &Option<(u32, String)>) -> String {
    match (by, holder) {
        (Some(m), Some((pid, _))) if m.pid == *pid => format!(" (mounted at {} by pid {pid})", m.mountpoint),
        (_, Some((pid, cmd))) => format!(" (locked by pid {pid}: {cmd})"),
        (Some(m), None) => format!(" (mounted at {} by pid {})", m.mountpoint, m.pid),
        (None, None) => String::new(),
    }
}

/// Who holds the flock on `lock`, from /proc/locks: (pid, command line).
fn lock_holder(lock: &File) -> Option<(u32, String)> {
    use std::os::unix::fs::MetadataExt;
    let md = lock.metadata().ok()?;
    let ino = md.ino();
    let locks = fs::read_to_string("/proc/locks").ok()?;
    for line in locks.lines() {
        // "1: FLOCK  ADVISORY  WRITE 1234 00:2a:5678 0 EOF"
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 6 || f[1] != "FLOCK" {
            continue;
        }
        let file_ino = f[5].rsplit(':').next().and_then(|x| x.parse::<u64>().ok());
        if file_ino == Some(ino) {
            let pid: u32 = f[4].parse().ok()?;
            let cmd = fs::read(format!("/proc/{pid}/cmdline"))
                .map(|b| String::from_utf8_lossy(&b).replace('\0', " ").trim().to_string())
                .unwrap_or_default();
            return Some((pid, cmd));
        }
    }
    None
}

/// Why volume `id` can't leave the pool now, if it can't: it holds tracks (a data set's or a
/// job's), or a plan runs on it; with the errno that says which (ENOTEMPTY, EBUSY). Offline
/// and online retire both ask this.
pub fn retire_refusal(c: &Catalog, id: crate::space::VolumeId) -> Option<(i32, String)> {
    let v = c.volumes.get(&id)?;
    if v.free.free_tracks() != v.free.tracks_total() {
        let used = v.free.tracks_total() - v.free.free_tracks();
        return Some((libc::ENOTEMPTY, format!("it is not empty ({used} tracks in use); drain it first")));
    }
    let p = c.plans.values().find(|p| p.sources.contains(&id) || p.targets.contains(&id))?;
    Some((libc::EBUSY, format!("plan {} is running on it", p.id)))
}

/// Why a volume can't be reopened (with the errno a mount answers), or `None` if it can.
/// The caller has checked that the volume exists.
pub fn reopen_refusal(c: &Catalog, id: crate::space::VolumeId) -> Option<(i32, String)> {
    if let Some(p) = c.plans.values().find(|p| p.sources.contains(&id)) {
        return Some((libc::EBUSY, format!("plan {} is emptying it", p.id)));
    }
    if !c.closed_volumes.contains(&id) {
        return Some((libc::EINVAL, "it is not closed (it takes allocations)".into()));
    }
    None
}

/// Delete a retired volume's image if it lives in the pool's own volumes directory (one
/// given with `--path` elsewhere is the admin's to remove). Returns whether it was deleted.
/// The caller has made the catalog's removal of the volume durable first.
pub fn remove_retired_image(disk: &dyn Disk, pool_dir: &Path, image: &Path) -> bool {
    let inside = image.parent().is_some_and(|p| p == pool_dir.join(VOLUMES_DIR));
    inside && disk.remove(image).is_ok() && disk.sync_dir(&pool_dir.join(VOLUMES_DIR)).is_ok()
}

pub fn read_mounted(dir: &Path) -> Option<MountedInfo> {
    let b = fs::read(dir.join(MOUNTED_FILE)).ok()?;
    serde_json::from_slice(&b).ok()
}

/// Open the catalog without the lock and without writing (ls, volume list, fsck).
pub fn open_read_only(dir: &Path) -> Result<Store, PoolError> {
    let dir = dir.canonicalize().map_err(io_err(dir))?;
    Ok(Store::open(&dir, false)?.0)
}
