//! The namespace: names, directories, links and attributes of data sets, as catalog ops.

use std::sync::atomic::Ordering;

use super::node::set_id_to_drop;
use super::{Engine, Error, Result};
use crate::catalog::model::now_ns;
use crate::catalog::model::{Body, Ino, Inode, Meta, NewKind, Op, SpecialKind, NAME_MAX_BYTES};

/// rename(2) flags, as the kernel passes them.
pub const RENAME_NOREPLACE: u32 = libc::RENAME_NOREPLACE;
pub const RENAME_EXCHANGE: u32 = libc::RENAME_EXCHANGE;
pub const RENAME_WHITEOUT: u32 = libc::RENAME_WHITEOUT;

/// What a node is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    File,
    Dir,
    Symlink,
    /// A fifo, a socket or a device node.
    Special(SpecialKind),
}

/// A node's attributes, as stat(2) shows them.
#[derive(Clone, Debug)]
pub struct Attr {
    pub ino: Ino,
    pub kind: Kind,
    pub size_bytes: u64,
    pub allocated_tracks: u64,
    pub meta: Meta,
    /// A device node's device number; 0 for everything else.
    pub rdev: u32,
}

impl Attr {
    pub fn of(i: &Inode) -> Attr {
        let (kind, rdev) = match i.body {
            Body::Dir { .. } => (Kind::Dir, 0),
            Body::File { .. } => (Kind::File, 0),
            Body::Symlink { .. } => (Kind::Symlink, 0),
            Body::Special { kind, rdev } => (Kind::Special(kind), rdev),
        };
        Attr {
            ino: i.ino,
            kind,
            size_bytes: i.size_bytes(),
            allocated_tracks: i.allocated_tracks(),
            meta: i.meta.clone(),
            rdev,
        }
    }
}

/// The changes a setattr asks for (times in ns since the epoch).
#[derive(Clone, Debug, Default)]
pub struct SetAttr {
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub size: Option<u64>,
    pub atime_ns: Option<i64>,
    pub mtime_ns: Option<i64>,
    /// The caller lacks CAP_FSETID: a truncate then drops set-ID bits, as a write does.
    pub unprivileged: bool,
}

/// A name for a new entry: not empty, not `.` or `..`, no `/`, at most NAME_MAX bytes.
pub fn check_name(b: &[u8]) -> Result<&[u8]> {
    if b.len() > NAME_MAX_BYTES {
        return Err(Error::NameTooLong);
    }
    if b.is_empty() || b == b"." || b == b".." || b.contains(&b'/') {
        return Err(Error::Invalid);
    }
    Ok(b)
}

impl Engine {
    /// A node's attributes, with the mtime of in-place writes not persisted yet.
    pub fn attr(&self, ino: Ino) -> Result<Attr> {
        let node = self.nodes.lock().get(&ino).cloned();
        let cat = self.catalog.lock();
        let mut a = Attr::of(cat.catalog.get(ino).ok_or(Error::NotFound)?);
        if let Some(n) = node {
            if n.mtime_dirty.load(Ordering::Acquire) {
                a.meta.mtime_ns = n.mtime_ns.load(Ordering::Acquire);
                a.meta.ctime_ns = a.meta.mtime_ns;
            }
        }
        Ok(a)
    }

    /// The inode `name` in directory `parent`.
    pub fn lookup(&self, parent: Ino, name: &[u8]) -> Result<Ino> {
        if name.len() > NAME_MAX_BYTES {
            return Err(Error::NameTooLong);
        }
        let cat = self.catalog.lock();
        match cat.catalog.get(parent).map(|i| &i.body) {
            Some(Body::Dir { entries, .. }) => entries.get(name).copied().ok_or(Error::NotFound),
            Some(_) => Err(Error::NotDir),
            None => Err(Error::NotFound),
        }
    }

    /// Create a node (file, dir, symlink, special file) in `parent`, owned by `uid`/`gid`.
    /// The `umask` applies unless `parent` has a default ACL, which the node inherits
    /// instead ([`super::xattr::inherit`]).
    #[allow(clippy::too_many_arguments)]
    pub fn make(
        &self,
        parent: Ino,
        name: &[u8],
        perm: u32,
        umask: u32,
        kind: NewKind,
        uid: u32,
        gid: u32,
    ) -> Result<Ino> {
        let name = check_name(name)?;
        let now = now_ns();
        let mut cat = self.catalog.lock();
        let p = cat.catalog.get(parent).ok_or(Error::NotFound)?;
        let Body::Dir { entries, .. } = &p.body else { return Err(Error::NotDir) };
        if entries.contains_key(name) {
            return Err(Error::Exists);
        }
        // A set-group-id directory passes its group (and, to directories, the bit) on.
        let (gid, perm) = if p.meta.perm & libc::S_ISGID != 0 {
            (p.meta.gid, if matches!(kind, NewKind::Dir) { perm | libc::S_ISGID } else { perm })
        } else {
            (gid, perm)
        };
        let (perm, xattrs) = super::xattr::inherit(cat.catalog.xattrs.get(&parent), perm & 0o7777, umask, &kind);
        let ino = cat.catalog.next_ino;
        let meta = Meta { perm, uid, gid, nlink: 1, atime_ns: now, mtime_ns: now, ctime_ns: now };
        let name = name.to_vec();
        let op = if xattrs.is_empty() {
            Op::MakeNode { ino, parent, name, meta, kind }
        } else {
            Op::MakeNodeXattrs { ino, parent, name, meta, kind, xattrs }
        };
        self.commit(&mut cat, op)?;
        Ok(ino)
    }

    pub fn setattr(&self, ino: Ino, set: SetAttr) -> Result<Attr> {
        let SetAttr { mut mode, uid, gid, size, atime_ns, mtime_ns, unprivileged } = set;
        let now = now_ns();
        // What the VFS leaves to the file system with FUSE_HANDLE_KILLPRIV_V2 (fs/mod.rs):
        // a chown of a regular file drops set-user-ID, and set-group-ID where the group may
        // execute, whoever asks; a truncate does so when the caller lacks CAP_FSETID. A
        // mode in the same request is the caller's own word and wins.
        let chown = uid.is_some() || gid.is_some();
        if mode.is_none() && (chown || (size.is_some() && unprivileged)) {
            let a = self.attr(ino)?;
            if a.kind == Kind::File {
                let perm = a.meta.perm & 0o7777;
                let kill = set_id_to_drop(perm);
                if kill != 0 {
                    mode = Some(perm & !kill);
                }
            }
        }
        if let Some(size) = size {
            self.truncate(ino, size, now)?;
        }
        if mode.is_some() || uid.is_some() || gid.is_some() || atime_ns.is_some() || mtime_ns.is_some() {
            let node = self.nodes.lock().get(&ino).cloned();
            if let (Some(n), Some(_)) = (&node, &mtime_ns) {
                n.mtime_dirty.store(false, Ordering::Release);
            }
            let mut cat = self.catalog.lock();
            cat.catalog.get(ino).ok_or(Error::NotFound)?;
            self.commit(
                &mut cat,
                Op::SetMeta { ino, perm: mode.map(|m| m & 0o7777), uid, gid, atime_ns, mtime_ns, ctime_ns: now },
            )?;
            // A chown drops a file capability too (the VFS's ATTR_KILL_PRIV).
            if chown {
                self.drop_capability(&mut cat, ino, now)?;
            }
            drop(cat);
            if mode.is_some_and(|m| m & (libc::S_ISUID | libc::S_ISGID) != 0) {
                self.may_be_privileged(ino);
            }
        }
        self.attr(ino)
    }

    /// unlink(2) (`want_dir`: rmdir(2)).
    pub fn unlink(&self, parent: Ino, name: &[u8], want_dir: bool) -> Result<()> {
        let name = check_name(name)?;
        let nodes = self.nodes.lock();
        let mut cat = self.catalog.lock();
        let ino = cat.catalog.lookup(parent, name).ok_or_else(|| match cat.catalog.get(parent) {
            Some(p) if !p.is_dir() => Error::NotDir,
            _ => Error::NotFound,
        })?;
        let target = cat.catalog.get(ino).ok_or(Error::NotFound)?;
        match (&target.body, want_dir) {
            (Body::Dir { entries, .. }, true) if !entries.is_empty() => return Err(Error::NotEmpty),
            (Body::Dir { .. }, false) => return Err(Error::IsDir),
            (Body::Dir { .. }, true) => {}
            (_, true) => return Err(Error::NotDir),
            (_, false) => {}
        }
        self.commit(&mut cat, Op::Unlink { parent, name: name.to_vec(), time_ns: now_ns() })?;
        self.destroy_if_unused(&nodes, &mut cat, ino)?;
        Ok(())
    }

    /// rename(2) with its flags ([`RENAME_NOREPLACE`], [`RENAME_EXCHANGE`]).
    pub fn rename(&self, parent: Ino, name: &[u8], new_parent: Ino, new_name: &[u8], flags: u32) -> Result<()> {
        let name = check_name(name)?;
        let new_name = check_name(new_name)?;
        let exchange = flags & RENAME_EXCHANGE != 0;
        let noreplace = flags & RENAME_NOREPLACE != 0;
        if (exchange && noreplace) || flags & RENAME_WHITEOUT != 0 {
            return Err(Error::Invalid);
        }
        let nodes = self.nodes.lock();
        let mut cat = self.catalog.lock();
        let c = &cat.catalog;
        for p in [parent, new_parent] {
            match c.get(p) {
                Some(i) if i.is_dir() => {}
                Some(_) => return Err(Error::NotDir),
                None => return Err(Error::NotFound),
            }
        }
        let src = c.lookup(parent, name).ok_or(Error::NotFound)?;
        let src_is_dir = c.get(src).is_some_and(|i| i.is_dir());
        let dst = c.lookup(new_parent, new_name);
        // A directory can't move under itself.
        if (src_is_dir || exchange) && c.is_within(new_parent, src) {
            return Err(Error::Invalid);
        }
        if exchange {
            let Some(dst) = dst else { return Err(Error::NotFound) };
            if c.get(dst).is_some_and(|i| i.is_dir()) && c.is_within(parent, dst) {
                return Err(Error::Invalid);
            }
        } else if let Some(dst) = dst {
            if noreplace {
                return Err(Error::Exists);
            }
            if dst == src {
                return Ok(()); // two links of one inode: POSIX says do nothing
            }
            match (&c.get(dst).ok_or(Error::NotFound)?.body, src_is_dir) {
                (Body::Dir { entries, .. }, true) if !entries.is_empty() => return Err(Error::NotEmpty),
                (Body::Dir { .. }, false) => return Err(Error::IsDir),
                (Body::Dir { .. }, true) => {}
                (_, true) => return Err(Error::NotDir),
                (_, false) => {}
            }
        }
        self.commit(
            &mut cat,
            Op::Rename {
                parent,
                name: name.to_vec(),
                new_parent,
                new_name: new_name.to_vec(),
                exchange,
                time_ns: now_ns(),
            },
        )?;
        if let (Some(dst), false) = (dst, exchange) {
            self.destroy_if_unused(&nodes, &mut cat, dst)?;
        }
        Ok(())
    }

    /// link(2): a new name for `ino` in `new_parent`.
    pub fn link(&self, ino: Ino, new_parent: Ino, new_name: &[u8]) -> Result<Attr> {
        let name = check_name(new_name)?;
        {
            let mut cat = self.catalog.lock();
            match cat.catalog.get(ino) {
                Some(i) if i.is_dir() => return Err(Error::NotPermitted),
                Some(_) => {}
                None => return Err(Error::NotFound),
            }
            match cat.catalog.get(new_parent).map(|i| &i.body) {
                Some(Body::Dir { entries, .. }) if entries.contains_key(name) => return Err(Error::Exists),
                Some(Body::Dir { .. }) => {}
                Some(_) => return Err(Error::NotDir),
                None => return Err(Error::NotFound),
            }
            self.commit(&mut cat, Op::Link { ino, parent: new_parent, name: name.to_vec(), time_ns: now_ns() })?;
        }
        self.attr(ino)
    }

    pub fn readlink(&self, ino: Ino) -> Result<Vec<u8>> {
        let cat = self.catalog.lock();
        match cat.catalog.get(ino).map(|i| &i.body) {
            Some(Body::Symlink { target }) => Ok(target.clone()),
            Some(_) => Err(Error::Invalid),
            None => Err(Error::NotFound),
        }
    }

    /// A directory's entries: `.`, `..`, then its names, each with its inode and kind.
    pub fn dir_entries(&self, ino: Ino) -> Result<Vec<(Vec<u8>, Ino, Kind)>> {
        let cat = self.catalog.lock();
        let d = cat.catalog.get(ino).ok_or(Error::NotFound)?;
        let Body::Dir { parent, entries } = &d.body else { return Err(Error::NotDir) };
        let mut out = Vec::with_capacity(entries.len() + 2);
        out.push((b".".to_vec(), ino, Kind::Dir));
        out.push((b"..".to_vec(), *parent, Kind::Dir));
        for (name, &child) in entries {
            let kind = cat.catalog.get(child).map(|i| Attr::of(i).kind).unwrap_or(Kind::File);
            out.push((name.clone(), child, kind));
        }
        Ok(out)
    }

    /// The numbers statfs(2) reports (`df`, `df -i`).
    pub fn statfs(&self) -> FsStats {
        let cat = self.catalog.lock();
        let tracks_total = cat.catalog.volumes.values().map(|v| v.free.tracks_total()).sum();
        let tracks_free = cat.catalog.volumes.values().map(|v| v.free.free_tracks()).sum();
        FsStats::new(tracks_total, tracks_free, cat.catalog.inodes.len() as u64)
    }
}

/// The inodes statfs reports in all. The catalog has no inode table, so nothing runs out
/// below memory; tools only need a total that the used count fits under (`df -i` prints
/// total - free as used), and 2^32 - 1 is one every 32-bit `statvfs` can carry.
pub const INODES_REPORTED: u64 = u32::MAX as u64;

/// What statfs(2) reports: space in tracks, and inodes (data sets, directories, symlinks).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FsStats {
    pub tracks_total: u64,
    pub tracks_free: u64,
    pub inodes_total: u64,
    /// At most `inodes_total`: `df -i` shows total - free as used.
    pub inodes_free: u64,
}

impl FsStats {
    pub fn new(tracks_total: u64, tracks_free: u64, inodes_used: u64) -> FsStats {
        let inodes_total = INODES_REPORTED.max(inodes_used);
        FsStats { tracks_total, tracks_free, inodes_total, inodes_free: inodes_total - inodes_used }
    }
}
