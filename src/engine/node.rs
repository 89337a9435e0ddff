//! Data sets in memory: a node per open (or pinned) data set, and the table that keeps each
//! node unique.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;

use arc_swap::{ArcSwap, ArcSwapOption};
use parking_lot::RwLock;

use super::{Engine, Error, Result};
use crate::catalog::model::{now_ns, Body, Ino, Op};
use crate::catalog::store::Store;
use crate::extent_map::ExtentMap;
use crate::monitor::JobLink;
use crate::space::Extent;

/// A data set that is open (or being changed): its live extent map and size.
pub struct FileNode {
    pub ino: Ino,
    pub map: ArcSwap<ExtentMap>,
    pub size_bytes: AtomicU64,
    /// The catalog's explicit preallocation mark (logical tracks kept past the size).
    pub prealloc_end: AtomicU64,
    /// Shared by whatever changes the bytes or the size; exclusive while a cutover holds writes.
    pub write_hold: RwLock<()>,
    /// Shared for I/O, exclusive to free tracks.
    pub gate: RwLock<()>,
    pub open_handles: AtomicU32,
    /// The mtime of in-place writes, persisted at fsync, release and setattr.
    pub(super) mtime_ns: AtomicI64,
    pub(super) mtime_dirty: AtomicBool,
    /// Present while a migration watches this data set (the monitor). The node stays in
    /// the `nodes` table while it is set.
    pub job: ArcSwapOption<JobLink>,
    /// The data set may hold what a write must drop (set-ID bits, a file capability): a
    /// write then looks in the catalog ([`Engine::drop_privileges`]). Set when they may have
    /// appeared, cleared once a look finds none, so a write to a plain file costs nothing.
    pub privileged: AtomicBool,
    /// The size at the last fsync, and how many fsyncs in a row found it grown: a data set
    /// that grows by synced appends gets zeros written ahead of its end ([`Engine::fsync`]).
    pub(super) synced_size: AtomicU64,
    pub(super) growing_syncs: AtomicU32,
    /// The end of the zeros written ahead of the size (0: none to count on).
    pub(super) zeroed_end: AtomicU64,
}

/// The name of a file capability, which any write drops.
pub const CAPABILITY_XATTR: &[u8] = b"security.capability";

/// Does the catalog give `ino` set-ID bits or a file capability?
fn privileged(cat: &Store, ino: Ino) -> bool {
    let perm = cat.catalog.get(ino).map_or(0, |i| i.meta.perm);
    perm & (libc::S_ISUID | libc::S_ISGID) != 0
        || cat.catalog.xattrs.get(&ino).is_some_and(|x| x.contains_key(CAPABILITY_XATTR))
}

/// The set-ID bits of `perm` that a write, truncate or chown takes away: set-user-ID, and
/// set-group-ID where the group may execute (without it, set-group-ID marks mandatory
/// locking, which the VFS leaves alone).
pub(super) fn set_id_to_drop(perm: u32) -> u32 {
    let mut kill = perm & libc::S_ISUID;
    if perm & (libc::S_ISGID | libc::S_IXGRP) == libc::S_ISGID | libc::S_IXGRP {
        kill |= libc::S_ISGID;
    }
    kill
}

impl Engine {
    /// Remove `ino`'s file capability, if it has one (the VFS's ATTR_KILL_PRIV).
    pub(super) fn drop_capability(&self, cat: &mut Store, ino: Ino, now: i64) -> Result<()> {
        if cat.catalog.xattrs.get(&ino).is_some_and(|x| x.contains_key(CAPABILITY_XATTR)) {
            self.commit(cat, Op::RemoveXattr { ino, name: CAPABILITY_XATTR.to_vec(), ctime_ns: now })?;
        }
        Ok(())
    }

    /// What a write takes away, as the VFS does on a local file system: the file capability
    /// on any write; set-user-ID, and set-group-ID where the group may execute, when the
    /// writer lacks CAP_FSETID (`kill_suidgid`: the kernel's `FUSE_WRITE_KILL_SUIDGID`). The
    /// kernel does neither for a direct-I/O handle, and with `FUSE_HANDLE_KILLPRIV_V2` it
    /// leaves them to us on inodes it marked as having nothing to drop. Called only when
    /// the node is marked [`FileNode::privileged`]. Returns whether the mode changed (the
    /// kernel's cached attributes are then stale).
    pub fn drop_privileges(&self, node: &FileNode, kill_suidgid: bool) -> Result<bool> {
        let mut cat = self.catalog.lock();
        let ino = node.ino;
        let perm = cat.catalog.get(ino).ok_or(Error::NotFound)?.meta.perm;
        self.drop_capability(&mut cat, ino, now_ns())?;
        let kill = if kill_suidgid { set_id_to_drop(perm) } else { 0 };
        if kill != 0 {
            let op = Op::SetMeta {
                ino,
                perm: Some(perm & !kill),
                uid: None,
                gid: None,
                atime_ns: None,
                mtime_ns: None,
                ctime_ns: now_ns(),
            };
            self.commit(&mut cat, op)?;
        }
        node.privileged.store(privileged(&cat, ino), Ordering::Release);
        Ok(kill != 0)
    }

    /// After a change that may have given `ino` set-ID bits or a file capability: the next
    /// write looks. Called without the catalog lock (`nodes` is taken first).
    pub(super) fn may_be_privileged(&self, ino: Ino) {
        if let Some(n) = self.nodes.lock().get(&ino) {
            n.privileged.store(true, Ordering::Release);
        }
    }

    fn make_node(&self, cat: &Store, ino: Ino) -> Result<Arc<FileNode>> {
        let i = cat.catalog.get(ino).ok_or(Error::NotFound)?;
        let Body::File { size_bytes, layout, prealloc_end } = &i.body else { return Err(Error::IsDir) };
        Ok(Arc::new(FileNode {
            ino,
            map: ArcSwap::from_pointee(ExtentMap::new(self.geometry, layout)),
            size_bytes: AtomicU64::new(*size_bytes),
            prealloc_end: AtomicU64::new(*prealloc_end),
            gate: RwLock::new(()),
            open_handles: AtomicU32::new(0),
            mtime_ns: AtomicI64::new(i.meta.mtime_ns),
            mtime_dirty: AtomicBool::new(false),
            write_hold: RwLock::new(()),
            job: ArcSwapOption::empty(),
            privileged: AtomicBool::new(privileged(cat, ino)),
            synced_size: AtomicU64::new(*size_bytes),
            growing_syncs: AtomicU32::new(0),
            zeroed_end: AtomicU64::new(0),
        }))
    }

    /// The data set's node in the table, built from the catalog (and entered) if it is not
    /// there. The caller holds `nodes`.
    fn node_in_table(&self, nodes: &mut HashMap<Ino, Arc<FileNode>>, ino: Ino) -> Result<Arc<FileNode>> {
        if let Some(n) = nodes.get(&ino) {
            return Ok(n.clone());
        }
        let cat = self.catalog.lock();
        let n = self.make_node(&cat, ino)?;
        // Under the catalog lock: reclaim_surplus must not trim what this map holds.
        self.open_inodes.lock().insert(ino);
        drop(cat);
        nodes.insert(ino, n.clone());
        Ok(n)
    }

    /// The node of an open data set, or a fresh one built from the catalog.
    pub(super) fn node_for(&self, nodes: &HashMap<Ino, Arc<FileNode>>, ino: Ino) -> Result<Arc<FileNode>> {
        if let Some(n) = nodes.get(&ino) {
            return Ok(n.clone());
        }
        let cat = self.catalog.lock();
        self.make_node(&cat, ino)
    }

    /// The node of a data set if it is open (or pinned).
    pub fn open_node(&self, ino: Ino) -> Option<Arc<FileNode>> {
        self.nodes.lock().get(&ino).cloned()
    }

    /// Open a data set: its node, with one more open handle. In a close-mode cutover's
    /// downtime window the open waits (it doesn't fail) until the data set is switched
    /// (step m).
    pub fn open(&self, ino: Ino) -> Result<Arc<FileNode>> {
        loop {
            match self.try_open(ino) {
                Ok(res) => return res,
                Err(window) => window.wait_window(),
            }
        }
    }

    /// [`Engine::open`], unless the data set is in a close-mode downtime window: then the
    /// job's link at once (`Err`), whose [`JobLink::wait_window`] a thread that may wait
    /// can wait on before it tries again.
    pub fn try_open(&self, ino: Ino) -> std::result::Result<Result<Arc<FileNode>>, Arc<JobLink>> {
        let mut nodes = self.nodes.lock();
        if let Some(link) = nodes.get(&ino).and_then(|n| n.job.load_full()).filter(|l| l.in_window()) {
            return Err(link);
        }
        let node = self.node_in_table(&mut nodes, ino);
        if let Ok(node) = &node {
            node.open_handles.fetch_add(1, Ordering::AcqRel);
        }
        Ok(node)
    }

    /// Release one open handle of a data set. The last release persists the mtime and, for
    /// an unlinked data set, destroys it (unless a migration pins it: then the job learns
    /// that the data set closed).
    pub fn release(&self, node: &Arc<FileNode>) -> Result<()> {
        let mut nodes = self.nodes.lock();
        if node.open_handles.fetch_sub(1, Ordering::AcqRel) == 1 {
            if let Some(link) = node.job.load_full() {
                drop(nodes);
                self.persist_mtime(node)?;
                link.notify_closed();
                return Ok(());
            }
            nodes.remove(&node.ino);
            self.last_close(&nodes, node)?;
        } else {
            drop(nodes);
            self.persist_mtime(node)?;
        }
        Ok(())
    }

    /// Keep a data set's node in the table while a migration works on it (so the job's link
    /// reaches every open and every write), and out of surplus reclaim.
    pub fn pin_node(&self, ino: Ino, link: Arc<JobLink>) -> Result<Arc<FileNode>> {
        let mut nodes = self.nodes.lock();
        let node = self.node_in_table(&mut nodes, ino)?;
        // With writes held: a write in flight now finished before the monitor starts, and
        // every later one sees it (so the copy that follows misses nothing).
        {
            let _hold = node.write_hold.write();
            node.job.store(Some(link));
        }
        Ok(node)
    }

    /// The migration is over: detach its link; a node nobody has open leaves the table (and
    /// an unlinked data set is destroyed), as at a last close.
    pub fn unpin_node(&self, node: &FileNode) -> Result<()> {
        let mut nodes = self.nodes.lock();
        node.job.store(None);
        let ours = nodes.get(&node.ino).is_some_and(|n| std::ptr::eq(Arc::as_ptr(n), node));
        if ours && node.open_handles.load(Ordering::Acquire) == 0 {
            nodes.remove(&node.ino);
            self.last_close(&nodes, node)?;
        }
        Ok(())
    }

    /// Close mode: open the downtime window if no handle of the data set is open. Under the
    /// `nodes` lock, so that no open slips in between the check and the window.
    pub fn open_window_if_closed(&self, node: &FileNode, link: &JobLink) -> bool {
        let _nodes = self.nodes.lock();
        if node.open_handles.load(Ordering::Acquire) == 0 {
            link.set_window(true);
            true
        } else {
            false
        }
    }

    /// Re-read a data set's extents from the catalog into its node (after grow or trim).
    pub fn refresh_map(&self, cat: &Store, node: &FileNode) {
        if let Some(Body::File { layout, size_bytes, prealloc_end }) = cat.catalog.get(node.ino).map(|i| &i.body) {
            node.map.store(Arc::new(ExtentMap::new(self.geometry, layout)));
            node.prealloc_end.store(*prealloc_end, Ordering::Release);
            node.size_bytes.store(*size_bytes, Ordering::Release);
        }
    }

    /// Persist the mtime of in-place writes, if any.
    pub(super) fn persist_mtime(&self, node: &FileNode) -> Result<()> {
        if node.mtime_dirty.swap(false, Ordering::AcqRel) {
            let t = node.mtime_ns.load(Ordering::Acquire);
            let mut cat = self.catalog.lock();
            if cat.catalog.get(node.ino).is_some() {
                self.commit(&mut cat, Op::set_mtime(node.ino, t))?;
            }
        }
        Ok(())
    }

    /// Drop a link; destroy the inode if nothing holds it any more. Caller holds `nodes`.
    pub(super) fn destroy_if_unused(
        &self,
        nodes: &HashMap<Ino, Arc<FileNode>>,
        cat: &mut Store,
        ino: Ino,
    ) -> Result<Vec<Extent>> {
        match cat.catalog.get(ino) {
            Some(i) if i.meta.nlink == 0 && !nodes.contains_key(&ino) => Ok(self.commit(cat, Op::Destroy { ino })?),
            _ => Ok(Vec::new()),
        }
    }

    /// Last close of a data set: persist mtime, destroy it if it was unlinked. The
    /// over-provisioned tail is kept (a file appended by open-append-close keeps growing in
    /// place); [`Engine::reclaim_surplus`] takes it back when the pool runs short, and clean
    /// unmount trims it. Caller holds `nodes` and has removed the node from it.
    fn last_close(&self, nodes: &HashMap<Ino, Arc<FileNode>>, node: &FileNode) -> Result<()> {
        self.persist_mtime(node)?;
        let _excl = node.gate.write();
        let mut cat = self.catalog.lock();
        self.open_inodes.lock().remove(&node.ino);
        self.destroy_if_unused(nodes, &mut cat, node.ino)?;
        Ok(())
    }

    /// Trim the over-provisioned tails of every data set that is not open: the tracks past
    /// its size and past its explicit preallocation. Returns the tracks freed. Called with the catalog lock held; `open_inodes` is only changed under it too,
    /// so no data set opens (and builds its extent map) halfway through.
    pub(super) fn reclaim_surplus(&self, cat: &mut Store) -> Result<u64> {
        let g = self.geometry;
        let open = self.open_inodes.lock().clone();
        let victims: Vec<(Ino, u64)> = cat
            .catalog
            .inodes
            .values()
            .filter(|i| !open.contains(&i.ino))
            .filter_map(|i| match &i.body {
                Body::File { size_bytes, layout, prealloc_end } => {
                    let keep = g.tracks_for(*size_bytes).max(*prealloc_end);
                    (layout.end() > keep).then_some((i.ino, keep))
                }
                _ => None,
            })
            .collect();
        let mut victims = victims;
        // In inode order: the log (and a simulation's replay of it) is the same every run.
        victims.sort_unstable();
        let mut freed_tracks = 0;
        for (ino, keep_tracks) in victims {
            let freed = self.commit(cat, Op::Trim { ino, keep_tracks })?;
            freed_tracks += freed.iter().map(|e| e.count_tracks).sum::<u64>();
        }
        Ok(freed_tracks)
    }
}
